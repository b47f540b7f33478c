/* Twilio's compact `media` message, read in C (telephony/messages.py, `_media_by_layout`),
 * and the WebSocket text frame that carries it (`masked_text`, at the end).
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

/* Strict base64 of whole quartets -> a new bytes object; None when the text is not that;
 * NULL with the error set (out of memory). */
static PyObject *decode_b64(const char *s, Py_ssize_t n) {
    if (n % 4 != 0)
        Py_RETURN_NONE;
    Py_ssize_t pad = 0;
    if (n > 0 && s[n - 1] == '=') {
        pad = (s[n - 2] == '=') ? 2 : 1;
    }
    Py_ssize_t out_len = n / 4 * 3 - pad;
    PyObject *out = PyBytes_FromStringAndSize(NULL, out_len);
    if (out == NULL)
        return NULL;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    Py_ssize_t full = pad ? n - 4 : n;
    Py_ssize_t i;
    for (i = 0; i < full; i += 4) {
        int a = B64[(unsigned char)s[i]], b = B64[(unsigned char)s[i + 1]];
        int c = B64[(unsigned char)s[i + 2]], d = B64[(unsigned char)s[i + 3]];
        if ((a | b | c | d) < 0)
            goto bad;
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
            goto bad;
        unsigned int v = ((unsigned int)a << 18) | ((unsigned int)b << 12)
                         | ((unsigned int)c << 6);
        *o++ = (unsigned char)(v >> 16);
        if (pad == 1)
            *o++ = (unsigned char)(v >> 8);
    }
    return out;
bad:
    Py_DECREF(out);
    Py_RETURN_NONE;
}

/* The compact layout's fields, pointing into the text. */
typedef struct {
    long long sequence, chunk, timestamp;
    const char *track, *sid, *payload;
    Py_ssize_t track_len, sid_len, payload_len;
} Fields;

static int read_compact(PyObject *text, Py_ssize_t max_payload, Fields *f) {
    if (!PyUnicode_IS_ASCII(text))
        return 0;
    const char *p = (const char *)PyUnicode_DATA(text);
    const char *end = p + PyUnicode_GET_LENGTH(text);
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
    if (!((f.track_len == 7 && memcmp(f.track, "inbound", 7) == 0)
          || (f.track_len == 13 && memcmp(f.track, "inbound_track", 13) == 0)))
        Py_RETURN_NONE;
    PyObject *bytes = decode_b64(f.payload, f.payload_len);
    if (bytes == NULL || bytes == Py_None)
        return bytes;
    return pair(bytes, PyLong_FromLongLong(f.timestamp));
}

/* masked_text(data, pos, max_size) -> (text, end) when `data` holds, from `pos`, one whole
 * WebSocket frame that is final, a text frame, masked, without extension bits (first byte
 * 0x81), with a payload of at most `max_size` bytes (-1: no limit) that is valid UTF-8: the
 * payload unmasked and decoded, and the index just past the frame. None for anything else (a
 * frame not yet whole, any other kind, a payload too long or not UTF-8): the caller's general
 * path reads it (voicebot/ws_protocol.py, `DirectTextProtocol._read_frames`). */
static PyObject *masked_text(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "masked_text(data: bytes, pos: int, max_size: int)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    long long max_size = PyLong_AsLongLong(args[2]);
    if (max_size == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    if (pos < 0 || n - pos < 2 || d[pos] != 0x81 || !(d[pos + 1] & 0x80))
        Py_RETURN_NONE;
    unsigned long long length = d[pos + 1] & 0x7F;
    Py_ssize_t head = 2;
    if (length == 126) {
        if (n - pos < 4)
            Py_RETURN_NONE;
        length = ((unsigned long long)d[pos + 2] << 8) | d[pos + 3];
        head = 4;
    } else if (length == 127) {
        if (n - pos < 10)
            Py_RETURN_NONE;
        length = 0;
        for (int i = 2; i < 10; i++)
            length = (length << 8) | d[pos + i];
        head = 10;
    }
    head += 4; /* the mask */
    if (n - pos < head)
        Py_RETURN_NONE;
    if ((max_size >= 0 && length > (unsigned long long)max_size)
        || length > (unsigned long long)(n - pos - head))
        Py_RETURN_NONE; /* too long, or not all here yet */
    const unsigned char *mask = d + pos + head - 4;
    const unsigned char *payload = d + pos + head;
    Py_ssize_t len = (Py_ssize_t)length;
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
    return pair(text, PyLong_FromSsize_t(pos + head + len));
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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastmedia", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastmedia(void) {
    const char *alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    memset(B64, -1, sizeof(B64));
    for (int i = 0; i < 64; i++)
        B64[(unsigned char)alphabet[i]] = (signed char)i;
    return PyModule_Create(&module);
}
