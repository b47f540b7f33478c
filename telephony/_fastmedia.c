/* Twilio's compact `media` message, read in C (telephony/messages.py, `_media_by_layout`).
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

/* Strict base64 of whole quartets -> a new bytes object, or NULL (no exception) when the
 * text is not that. */
static PyObject *decode_b64(const char *s, Py_ssize_t n) {
    if (n % 4 != 0)
        return NULL;
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
    return NULL;
}

static PyObject *media_fields(PyObject *self, PyObject *args) {
    PyObject *text;
    Py_ssize_t max_payload;
    if (!PyArg_ParseTuple(args, "Un", &text, &max_payload))
        return NULL;
    if (!PyUnicode_IS_ASCII(text))
        Py_RETURN_NONE;
    const char *p = (const char *)PyUnicode_DATA(text);
    const char *end = p + PyUnicode_GET_LENGTH(text);
    long long sequence, chunk, timestamp;
    const char *track, *sid, *payload;
    Py_ssize_t track_len, sid_len;

    if (!EXPECT("{\"event\":\"media\",\"sequenceNumber\":") || !quoted_digits(&p, end, &sequence)
        || !EXPECT(",\"media\":{\"track\":")
        || !quoted_word(&p, end, is_track_char, 32, &track, &track_len)
        || !EXPECT(",\"chunk\":") || !quoted_digits(&p, end, &chunk)
        || !EXPECT(",\"timestamp\":") || !quoted_digits(&p, end, &timestamp)
        || !EXPECT(",\"payload\":\""))
        Py_RETURN_NONE;
    payload = p;
    while (p < end && *p != '"')
        p++;
    if (p >= end)
        Py_RETURN_NONE;
    Py_ssize_t payload_len = p - payload;
    p++;
    if (!EXPECT("},\"streamSid\":") || !quoted_word(&p, end, is_sid_char, 64, &sid, &sid_len)
        || !EXPECT("}") || p != end || payload_len > max_payload)
        Py_RETURN_NONE;
    PyObject *bytes = decode_b64(payload, payload_len);
    if (bytes == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(s#s#LLNL)", sid, sid_len, track, track_len, chunk, timestamp, bytes,
                         sequence);
}

static PyMethodDef methods[] = {
    {"media_fields", media_fields, METH_VARARGS,
     "media_fields(text, max_payload_b64) -> (stream_sid, track, chunk, timestamp, payload, "
     "sequence_number) for Twilio's compact media message, or None."},
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
