/* Twilio's compact `media` message, read in C (telephony/messages.py, `_media_by_layout`),
 * the WebSocket text frame that carries it (`masked_text`), and the caller's quiet frames kept
 * for a stream without a Python call each (`QuietHold`, `masked_hold`, at the end).
 *
 * media_fields(text, max_payload_b64) reads exactly the layout Twilio sends, with no
 * whitespace:
 *
 *   {"event":"media","sequenceNumber":"<digits>","media":{"track":"<letters>",
 *    "chunk":"<digits>","timestamp":"<digits>","payload":"<base64>"},"streamSid":"<sid>"}
 *
 * and returns (stream_sid, track, chunk, timestamp, payload bytes, sequence number), the
 * fields of `messages.Media` in order. It accepts a subset of what the Python reader accepts,
 * with the same result: digits 1 to 15, a track of 1 to 32 letters or underscores, a stream
 * SID of 1 to 64 of [A-Za-z0-9_.-], and a payload of whole base64 quartets (the last one may
 * end in one or two '=') no longer than `max_payload_b64`, decoded as strict
 * `binascii.a2b_base64` decodes it. Anything else (another layout, an escape, a bad payload,
 * a non-ASCII string) returns None, and the Python reader decides, errors included.
 *
 * inbound_media(text, stream_sid, max_payload_b64) is the stream's hot path for the caller's
 * audio (telephony/stream.py, `TwilioStream._take`): the same reading, and (payload,
 * timestamp) only for a frame of this stream (its SID equal to `stream_sid`), of an inbound
 * track ("inbound" or "inbound_track"), with a payload; None for anything else, which the
 * stream then parses and dispatches as before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <time.h>

static signed char B64[256];

static int expect(const char **p, const char *end, const char *literal, Py_ssize_t n) {
    if (end - *p < n || memcmp(*p, literal, (size_t)n) != 0)
        return 0;
    *p += n;
    return 1;
}

#define EXPECT(lit) expect(&p, end, lit, (Py_ssize_t)(sizeof(lit) - 1))

/* "<1 to 15 digits>" -> value; the closing quote consumed. */
static int quoted_digits(const char **p, const char *end, long long *value) {
    const char *s = *p;
    long long v = 0;
    int n = 0;
    if (s >= end || *s != '"')
        return 0;
    s++;
    while (s < end && *s >= '0' && *s <= '9') {
        if (++n > 15)
            return 0;
        v = v * 10 + (*s - '0');
        s++;
    }
    if (n == 0 || s >= end || *s != '"')
        return 0;
    *p = s + 1;
    *value = v;
    return 1;
}

static int is_track_char(char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_';
}

static int is_sid_char(char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
           || c == '_' || c == '.' || c == '-';
}

/* "<chars of the class, 1 to max>" -> [*start, *start + *len); the closing quote consumed. */
static int quoted_word(const char **p, const char *end, int (*allowed)(char), int max,
                       const char **start, Py_ssize_t *len) {
    const char *s = *p;
    if (s >= end || *s != '"')
        return 0;
    s++;
    const char *first = s;
    while (s < end && allowed(*s)) {
        s++;
        if (s - first > max)
            return 0;
    }
    if (s == first || s >= end || *s != '"')
        return 0;
    *start = first;
    *len = s - first;
    *p = s + 1;
    return 1;
}

/* How many '=' end whole quartets of base64 (n a multiple of 4): 0, 1 or 2. */
static Py_ssize_t b64_pad(const char *s, Py_ssize_t n) {
    if (n == 0 || s[n - 1] != '=')
        return 0;
    return s[n - 2] == '=' ? 2 : 1;
}

/* Strict base64 of whole quartets into `o` (room for n / 4 * 3 - b64_pad bytes) -> the
 * decoded length, or -1 when the text is not that. */
static Py_ssize_t b64_into(const char *s, Py_ssize_t n, unsigned char *o) {
    if (n % 4 != 0)
        return -1;
    Py_ssize_t pad = b64_pad(s, n);
    unsigned char *start = o;
    Py_ssize_t full = pad ? n - 4 : n;
    Py_ssize_t i;
    for (i = 0; i < full; i += 4) {
        int a = B64[(unsigned char)s[i]], b = B64[(unsigned char)s[i + 1]];
        int c = B64[(unsigned char)s[i + 2]], d = B64[(unsigned char)s[i + 3]];
        if ((a | b | c | d) < 0)
            return -1;
        unsigned int v = ((unsigned int)a << 18) | ((unsigned int)b << 12)
                         | ((unsigned int)c << 6) | (unsigned int)d;
        *o++ = (unsigned char)(v >> 16);
        *o++ = (unsigned char)(v >> 8);
        *o++ = (unsigned char)v;
    }
    if (pad) {
        int a = B64[(unsigned char)s[i]], b = B64[(unsigned char)s[i + 1]];
        int c = pad == 1 ? B64[(unsigned char)s[i + 2]] : 0;
        if ((a | b | c) < 0)
            return -1;
        unsigned int v = ((unsigned int)a << 18) | ((unsigned int)b << 12)
                         | ((unsigned int)c << 6);
        *o++ = (unsigned char)(v >> 16);
        if (pad == 1)
            *o++ = (unsigned char)(v >> 8);
    }
    return o - start;
}

/* Strict base64 of whole quartets -> a new bytes object; None when the text is not that;
 * NULL with the error set (out of memory). */
static PyObject *decode_b64(const char *s, Py_ssize_t n) {
    if (n % 4 != 0)
        Py_RETURN_NONE;
    /* Sized exactly, as `b64_into` writes it: the usual 160-byte frame ends in "==", and no
     * resize follows. */
    PyObject *out = PyBytes_FromStringAndSize(NULL, n / 4 * 3 - b64_pad(s, n));
    if (out == NULL)
        return NULL;
    if (b64_into(s, n, (unsigned char *)PyBytes_AS_STRING(out)) < 0) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    return out;
}

/* The compact layout's fields, pointing into the text. */
typedef struct {
    long long sequence, chunk, timestamp;
    const char *track, *sid, *payload;
    Py_ssize_t track_len, sid_len, payload_len;
} Fields;

/* The compact layout in [p, end), all of it ASCII. */
static int read_compact_chars(const char *p, const char *end, Py_ssize_t max_payload,
                              Fields *f) {
    if (!EXPECT("{\"event\":\"media\",\"sequenceNumber\":")
        || !quoted_digits(&p, end, &f->sequence) || !EXPECT(",\"media\":{\"track\":")
        || !quoted_word(&p, end, is_track_char, 32, &f->track, &f->track_len)
        || !EXPECT(",\"chunk\":") || !quoted_digits(&p, end, &f->chunk)
        || !EXPECT(",\"timestamp\":") || !quoted_digits(&p, end, &f->timestamp)
        || !EXPECT(",\"payload\":\""))
        return 0;
    f->payload = p;
    while (p < end && *p != '"')
        p++;
    if (p >= end)
        return 0;
    f->payload_len = p - f->payload;
    p++;
    return EXPECT("},\"streamSid\":") && quoted_word(&p, end, is_sid_char, 64, &f->sid, &f->sid_len)
           && EXPECT("}") && p == end && f->payload_len <= max_payload;
}

static int read_compact(PyObject *text, Py_ssize_t max_payload, Fields *f) {
    if (!PyUnicode_IS_ASCII(text))
        return 0;
    const char *p = (const char *)PyUnicode_DATA(text);
    return read_compact_chars(p, p + PyUnicode_GET_LENGTH(text), max_payload, f);
}

/* An inbound track: "inbound" or "inbound_track". */
static int inbound_track(const Fields *f) {
    return (f->track_len == 7 && memcmp(f->track, "inbound", 7) == 0)
           || (f->track_len == 13 && memcmp(f->track, "inbound_track", 13) == 0);
}

static PyObject *media_fields(PyObject *self, PyObject *args) {
    PyObject *text;
    Py_ssize_t max_payload;
    Fields f;
    if (!PyArg_ParseTuple(args, "Un", &text, &max_payload))
        return NULL;
    if (!read_compact(text, max_payload, &f))
        Py_RETURN_NONE;
    PyObject *bytes = decode_b64(f.payload, f.payload_len);
    if (bytes == NULL || bytes == Py_None)
        return bytes;
    return Py_BuildValue("(s#s#LLNL)", f.sid, f.sid_len, f.track, f.track_len, f.chunk,
                         f.timestamp, bytes, f.sequence);
}

/* (first, second), taking both references; NULL (the error set) when `second` is. */
static PyObject *pair(PyObject *first, PyObject *second) {
    if (second == NULL) {
        Py_DECREF(first);
        return NULL;
    }
    PyObject *out = PyTuple_Pack(2, first, second);
    Py_DECREF(first);
    Py_DECREF(second);
    return out;
}

/* inbound_media(text, stream_sid, max_payload_b64) -> (payload, timestamp) when `text` is the
 * compact layout (as `media_fields` reads it) of a frame of the caller's audio on this stream:
 * its streamSid equal to `stream_sid`, its track "inbound" or "inbound_track", its payload not
 * empty. Anything else returns None (the general path decides, errors included). */
static PyObject *inbound_media(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Fields f;
    if (nargs != 3 || !PyUnicode_Check(args[0]) || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "inbound_media(text: str, stream_sid: str, max: int)");
        return NULL;
    }
    Py_ssize_t max_payload = PyLong_AsSsize_t(args[2]);
    if (max_payload == -1 && PyErr_Occurred())
        return NULL;
    PyObject *want = args[1];
    if (!read_compact(args[0], max_payload, &f) || f.payload_len == 0
        || !PyUnicode_IS_ASCII(want) || PyUnicode_GET_LENGTH(want) != f.sid_len
        || memcmp(PyUnicode_DATA(want), f.sid, (size_t)f.sid_len) != 0)
        Py_RETURN_NONE;
    if (!inbound_track(&f))
        Py_RETURN_NONE;
    PyObject *bytes = decode_b64(f.payload, f.payload_len);
    if (bytes == NULL || bytes == Py_None)
        return bytes;
    return pair(bytes, PyLong_FromLongLong(f.timestamp));
}

/* One whole WebSocket frame at `pos` that is final, a text frame, masked, without extension
 * bits (first byte 0x81), with a payload of at most `max_size` bytes (-1: no limit): 1 and its
 * mask, payload and end; 0 for anything else (not yet whole, another kind, too long). */
static int text_frame_at(const unsigned char *d, Py_ssize_t n, Py_ssize_t pos, long long max_size,
                         const unsigned char **mask, const unsigned char **payload,
                         Py_ssize_t *len) {
    if (pos < 0 || n - pos < 2 || d[pos] != 0x81 || !(d[pos + 1] & 0x80))
        return 0;
    unsigned long long length = d[pos + 1] & 0x7F;
    Py_ssize_t head = 2;
    if (length == 126) {
        if (n - pos < 4)
            return 0;
        length = ((unsigned long long)d[pos + 2] << 8) | d[pos + 3];
        head = 4;
    } else if (length == 127) {
        if (n - pos < 10)
            return 0;
        length = 0;
        for (int i = 2; i < 10; i++)
            length = (length << 8) | d[pos + i];
        head = 10;
    }
    head += 4; /* the mask */
    if (n - pos < head)
        return 0;
    if ((max_size >= 0 && length > (unsigned long long)max_size)
        || length > (unsigned long long)(n - pos - head))
        return 0; /* too long, or not all here yet */
    *mask = d + pos + head - 4;
    *payload = d + pos + head;
    *len = (Py_ssize_t)length;
    return 1;
}

/* The frame's payload unmasked and decoded -> (text, end); None when it is not UTF-8. */
static PyObject *frame_text(const unsigned char *mask, const unsigned char *payload,
                            Py_ssize_t len, Py_ssize_t end) {
    char small[1024];
    char *buf = len <= (Py_ssize_t)sizeof(small) ? small : PyMem_Malloc((size_t)len);
    if (buf == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < len; i++)
        buf[i] = (char)(payload[i] ^ mask[i & 3]);
    PyObject *text = PyUnicode_DecodeUTF8(buf, len, NULL);
    if (buf != small)
        PyMem_Free(buf);
    if (text == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            return NULL;
        PyErr_Clear(); /* the general path decodes it again, and closes with 1007 */
        Py_RETURN_NONE;
    }
    return pair(text, PyLong_FromSsize_t(end));
}

/* The frame readers' arguments: (data: bytes, pos: int, max_size: int, ...); 0 with a
 * TypeError giving `usage` when they are not that. */
static int frame_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *usage,
                      Py_ssize_t *pos, long long *max_size) {
    if (nargs != want || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, usage);
        return 0;
    }
    *pos = PyLong_AsSsize_t(args[1]);
    if (*pos == -1 && PyErr_Occurred())
        return 0;
    *max_size = PyLong_AsLongLong(args[2]);
    return !(*max_size == -1 && PyErr_Occurred());
}

/* masked_text(data, pos, max_size) -> (text, end) when `data` holds, from `pos`, one whole
 * WebSocket frame that is final, a text frame, masked, without extension bits (first byte
 * 0x81), with a payload of at most `max_size` bytes (-1: no limit) that is valid UTF-8: the
 * payload unmasked and decoded, and the index just past the frame. None for anything else (a
 * frame not yet whole, any other kind, a payload too long or not UTF-8): the caller's general
 * path reads it (voicebot/ws_protocol.py, `DirectTextProtocol._read_frames`). */
static PyObject *masked_text(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t pos, len;
    long long max_size;
    const unsigned char *mask, *payload;
    if (!frame_args(args, nargs, 3, "masked_text(data: bytes, pos: int, max_size: int)", &pos,
                    &max_size))
        return NULL;
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    if (!text_frame_at(d, PyBytes_GET_SIZE(args[0]), pos, max_size, &mask, &payload, &len))
        Py_RETURN_NONE;
    return frame_text(mask, payload, len, payload - d + len);
}

/* -- Quiet frames held in C (telephony/stream.py, "the quiet hold") ---------------------------
 *
 * A `QuietHold` belongs to one stream. While its `limit` is above its `count`, `masked_hold`
 * keeps each frame of the caller's audio that `Conversation.hear` would only have held: the
 * compact layout of this stream's SID on an inbound track, its payload FRAME bytes of μ-law
 * whose every code is quiet (the table the stream gives, `media.mulaw`'s). The stream takes
 * them with `take()` and hands them to the conversation as one block, with each frame's
 * timestamp and when it was read (CLOCK_MONOTONIC, as `time.monotonic()`). */

#define FRAME 160
#define HOLD_MAX 64

typedef struct {
    PyObject_HEAD
    char sid[65];
    Py_ssize_t sid_len;
    Py_ssize_t max_text; /* the stream's message limit, in characters */
    unsigned char quiet[256];
    int limit, count;
    unsigned char audio[HOLD_MAX * FRAME];
    long long stamps[HOLD_MAX];
    double arrivals[HOLD_MAX];
} QuietHold;

static int hold_init(QuietHold *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"stream_sid", "quiet_codes", "max_text", NULL};
    const char *sid, *codes;
    Py_ssize_t sid_len, codes_len, max_text;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s#y#n", names, &sid, &sid_len, &codes,
                                     &codes_len, &max_text))
        return -1;
    if (sid_len < 1 || sid_len > 64) {
        PyErr_SetString(PyExc_ValueError, "stream_sid: 1 to 64 characters");
        return -1;
    }
    memcpy(self->sid, sid, (size_t)sid_len);
    self->sid_len = sid_len;
    self->max_text = max_text;
    memset(self->quiet, 0, sizeof(self->quiet));
    for (Py_ssize_t i = 0; i < codes_len; i++)
        self->quiet[(unsigned char)codes[i]] = 1;
    self->limit = self->count = 0;
    return 0;
}

/* take() -> (audio, timestamps, arrivals): the frames held, in order, and none held after. */
static PyObject *hold_take(QuietHold *self, PyObject *unused) {
    int n = self->count;
    PyObject *audio = PyBytes_FromStringAndSize((const char *)self->audio, (Py_ssize_t)n * FRAME);
    PyObject *stamps = PyList_New(n), *arrivals = PyList_New(n);
    if (audio == NULL || stamps == NULL || arrivals == NULL)
        goto fail;
    for (int i = 0; i < n; i++) {
        PyObject *stamp = PyLong_FromLongLong(self->stamps[i]);
        PyObject *arrival = PyFloat_FromDouble(self->arrivals[i]);
        if (stamp == NULL || arrival == NULL) {
            Py_XDECREF(stamp);
            Py_XDECREF(arrival);
            goto fail;
        }
        PyList_SET_ITEM(stamps, i, stamp);
        PyList_SET_ITEM(arrivals, i, arrival);
    }
    self->count = 0;
    return Py_BuildValue("(NNN)", audio, stamps, arrivals);
fail:
    Py_XDECREF(audio);
    Py_XDECREF(stamps);
    Py_XDECREF(arrivals);
    return NULL;
}

static PyObject *hold_get_limit(QuietHold *self, void *closure) {
    return PyLong_FromLong(self->limit);
}

static int hold_set_limit(QuietHold *self, PyObject *value, void *closure) {
    long limit = value == NULL ? -1 : PyLong_AsLong(value);
    if (limit == -1 && PyErr_Occurred())
        return -1;
    if (limit < 0 || limit > HOLD_MAX) {
        PyErr_Format(PyExc_ValueError, "limit: 0 to %d frames", HOLD_MAX);
        return -1;
    }
    self->limit = (int)limit;
    return 0;
}

static PyObject *hold_get_count(QuietHold *self, void *closure) {
    return PyLong_FromLong(self->count);
}

static PyGetSetDef hold_getset[] = {
    {"limit", (getter)hold_get_limit, (setter)hold_set_limit,
     "frames it may hold in all (0: it holds none); the stream sets it", NULL},
    {"count", (getter)hold_get_count, NULL, "frames held now", NULL},
    {NULL},
};

static PyMethodDef hold_methods[] = {
    {"take", (PyCFunction)hold_take, METH_NOARGS,
     "take() -> (audio, timestamps, arrivals): the frames held, in order; none after."},
    {NULL},
};

static PyTypeObject QuietHoldType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "telephony._fastmedia.QuietHold",
    .tp_basicsize = sizeof(QuietHold),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "QuietHold(stream_sid, quiet_codes, max_text): quiet frames of the caller's "
              "audio held in C for one stream (see masked_hold).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)hold_init,
    .tp_getset = hold_getset,
    .tp_methods = hold_methods,
};

/* Hold the frame's message if it is one the hold takes (see above); 1 when it did. */
static int hold_frame(QuietHold *h, const unsigned char *mask, const unsigned char *payload,
                      Py_ssize_t len) {
    char text[512];
    unsigned char ulaw[FRAME + 2];
    Fields f;
    if (len > (Py_ssize_t)sizeof(text) || len > h->max_text)
        return 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        text[i] = (char)(payload[i] ^ mask[i & 3]);
        if (text[i] & 0x80)
            return 0; /* not ASCII: the general path reads it */
    }
    if (!read_compact_chars(text, text + len, (FRAME + 2) / 3 * 4, &f) || f.sid_len != h->sid_len
        || memcmp(f.sid, h->sid, (size_t)f.sid_len) != 0 || !inbound_track(&f)
        || f.payload_len != (FRAME + 2) / 3 * 4 || b64_into(f.payload, f.payload_len, ulaw) != FRAME)
        return 0;
    for (int i = 0; i < FRAME; i++)
        if (!h->quiet[ulaw[i]])
            return 0;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    int k = h->count++;
    memcpy(h->audio + (Py_ssize_t)k * FRAME, ulaw, FRAME);
    h->stamps[k] = f.timestamp;
    h->arrivals[k] = (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
    return 1;
}

/* masked_hold(data, pos, max_size, hold) reads frames as `masked_text` does, from `pos`, and
 * keeps those the hold takes while its count is below its limit. It returns (None, end) when
 * it kept frames up to `end` (it stops there when the hold is full, or at a frame it does not
 * keep, or at the end of what is whole); otherwise what `masked_text` returns for the frame at
 * `pos`. */
static PyObject *masked_hold(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char usage[] = "masked_hold(data: bytes, pos: int, max_size: int, hold: QuietHold)";
    Py_ssize_t pos, len;
    long long max_size;
    const unsigned char *mask, *payload;
    if (!frame_args(args, nargs, 4, usage, &pos, &max_size))
        return NULL;
    if (!PyObject_TypeCheck(args[3], &QuietHoldType)) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    QuietHold *h = (QuietHold *)args[3];
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    int kept = 0;
    while (text_frame_at(d, n, pos, max_size, &mask, &payload, &len)) {
        if (h->count >= h->limit || !hold_frame(h, mask, payload, len)) {
            if (kept)
                break;
            return frame_text(mask, payload, len, payload - d + len);
        }
        kept = 1;
        pos = payload - d + len;
    }
    if (!kept)
        Py_RETURN_NONE;
    return pair(Py_NewRef(Py_None), PyLong_FromSsize_t(pos));
}

static PyMethodDef methods[] = {
    {"media_fields", media_fields, METH_VARARGS,
     "media_fields(text, max_payload_b64) -> (stream_sid, track, chunk, timestamp, payload, "
     "sequence_number) for Twilio's compact media message, or None."},
    {"inbound_media", (PyCFunction)(void (*)(void))inbound_media, METH_FASTCALL,
     "inbound_media(text, stream_sid, max_payload_b64) -> (payload, timestamp) for a compact "
     "media message of the caller's audio on this stream, or None."},
    {"masked_text", (PyCFunction)(void (*)(void))masked_text, METH_FASTCALL,
     "masked_text(data, pos, max_size) -> (text, end) for one whole, final, masked text "
     "frame at pos whose payload is valid UTF-8 of at most max_size bytes, or None."},
    {"masked_hold", (PyCFunction)(void (*)(void))masked_hold, METH_FASTCALL,
     "masked_hold(data, pos, max_size, hold) -> (None, end) when it held frames up to end, "
     "else what masked_text(data, pos, max_size) returns."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastmedia", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastmedia(void) {
    const char *alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    memset(B64, -1, sizeof(B64));
    for (int i = 0; i < 64; i++)
        B64[(unsigned char)alphabet[i]] = (signed char)i;
    if (PyType_Ready(&QuietHoldType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "QuietHold", (PyObject *)&QuietHoldType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
