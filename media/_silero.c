/* Silero VAD v6.2's forward pass in C: the same weights and the same arithmetic as the graph
 * media/silero_graph.py builds for ONNX Runtime, without a runtime around it.
 *
 * The model is small (about 360 thousand multiply-adds a window at 8 kHz), so in ONNX
 * Runtime a run costs more in the executor's per-node work (33 nodes) than in its
 * arithmetic: a lone window about 43 us, of which the products are under 10. Here a run of
 * windows is a handful of matrix products with a register-blocked kernel, the activations
 * and the LSTM's recurrence.
 *
 * For each window of a run (rows of 4.5 STFT hops: the window with its context):
 *   the STFT       right-padded by reflection (half a hop), four frames of two hops each,
 *                  times the basis; magnitudes of (real, imaginary) pairs;
 *   the encoder    four convolutions (kernel 3, padding 1, strides 1, 2, 2, 1), ReLU, each
 *                  a product of its taps, gathered from the zero-padded steps, with the
 *                  kernel (the taps that can only see padding left out);
 *   the LSTM       one cell (128), the state carried from window to window (PyTorch's gate
 *                  order i, f, g, o; the input's share for all windows in one product);
 *   the decoder    ReLU, a dot product, a sigmoid.
 *
 * Python builds a `Model` from the weights once (media/silero_native.py lays them out) and
 * calls `Model.run(rows, h, c, probs)`, which writes each window's probability and updates
 * the state in place; a stream binds its own arrays once (`Model.bind`) and runs the
 * binding, as with ONNX Runtime's I/O binding. The sums run in another order than ONNX Runtime's (and with fused
 * multiply-adds where the CPU has them), so results agree to float rounding, not bit for bit;
 * media/vad.py compares the two at start-up and keeps ONNX Runtime if they disagree.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define HIDDEN 128
#define GATES (4 * HIDDEN)
#define FRAMES 4
#define CHUNK 4 /* windows whose encoder runs together (the scratch is on the stack) */
#define COLS 16 /* a weight matrix's columns are padded to a multiple of this */

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
/* One build for CPUs with AVX2 and FMA, one for any x86-64; chosen once, when loaded. */
#define DISPATCH __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DISPATCH
#endif
#define INLINE static inline __attribute__((always_inline))

typedef float v8 __attribute__((vector_size(32)));

INLINE v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static int padded(int n) { return (n + COLS - 1) / COLS * COLS; }

/* Weight matrices (k x n) are stored in panels of COLS columns: panel p holds columns
 * p*COLS .. p*COLS+COLS-1 of every row, row after row, so a kernel walks each panel's memory
 * in order. c[m][n0..n0+8 NV) = bias + a[m] . b for MR rows at a time; the MR x NV
 * accumulators stay in registers across k. */
#define KERNEL(MR, NV)                                                                       \
    INLINE void kernel_##MR##_##NV(int k, int n0, const float *a, int lda, const float *b,   \
                                   const float *bias, float *c, int ldc) {                   \
        v8 acc[MR][NV];                                                                      \
        const float *p[NV];                                                                  \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) {                               \
            int n = n0 + 8 * v;                                                              \
            p[v] = b + (size_t)(n / COLS) * k * COLS + n % COLS;                             \
        }                                                                                    \
        _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                 \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                             \
                acc[m][v] = load8(bias + n0 + 8 * v);                                        \
        for (int i = 0; i < k; i++) {                                                        \
            v8 w[NV];                                                                        \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) w[v] = load8(p[v] + i * COLS); \
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++) {                           \
                float s = a[m * lda + i];                                                    \
                v8 x = {s, s, s, s, s, s, s, s};                                             \
                _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) acc[m][v] += x * w[v];  \
            }                                                                                \
        }                                                                                    \
        _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                 \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                             \
                store8(c + m * ldc + n0 + 8 * v, acc[m][v]);                                 \
    }

KERNEL(4, 2)
KERNEL(2, 4)
KERNEL(1, 8)
KERNEL(1, 2)

/* c (m x np, row stride ldc) = bias + a (m x k, row stride lda) . b (k x np, in panels); np
 * a multiple of COLS. Rows in fours, then a pair, then one; one row goes 64 columns at a time. */
INLINE void gemm(int m, int k, int np, const float *a, int lda, const float *b,
                 const float *bias, float *c, int ldc) {
    int r = 0;
    for (; r + 4 <= m; r += 4)
        for (int n0 = 0; n0 < np; n0 += 16)
            kernel_4_2(k, n0, a + r * lda, lda, b, bias, c + r * ldc, ldc);
    for (; r + 2 <= m; r += 2)
        for (int n0 = 0; n0 < np; n0 += 32) {
            if (n0 + 32 <= np)
                kernel_2_4(k, n0, a + r * lda, lda, b, bias, c + r * ldc, ldc);
            else {
                kernel_1_2(k, n0, a + r * lda, lda, b, bias, c + r * ldc, ldc);
                kernel_1_2(k, n0, a + (r + 1) * lda, lda, b, bias, c + (r + 1) * ldc, ldc);
            }
        }
    for (; r < m; r++) {
        int n0 = 0;
        for (; n0 + 64 <= np; n0 += 64)
            kernel_1_8(k, n0, a + r * lda, lda, b, bias, c + r * ldc, ldc);
        for (; n0 < np; n0 += 16)
            kernel_1_2(k, n0, a + r * lda, lda, b, bias, c + r * ldc, ldc);
    }
}

INLINE void relu(float *x, int n) {
    for (int i = 0; i < n; i++) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

INLINE float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* tanh through expf (libm's tanhf goes through expm1f, three times slower); within float
 * rounding of it in absolute terms, which is what the LSTM's sums see. */
INLINE float tanh_(float x) { return 2.0f / (1.0f + expf(-2.0f * x)) - 1.0f; }

typedef struct {
    PyObject_HEAD
    int block;   /* the STFT's hop: 64 at 8 kHz, 128 at 16 kHz */
    int bins;    /* block + 1 */
    int row;     /* samples in a window with its context: 4.5 blocks */
    int stft_np; /* padded(2 * bins) */
    float *stft; /* 2 block x stft_np: real then imaginary columns */
    float *w0, *b0; /* 3 bins x 128 */
    float *w1, *b1; /* 3 * 128 x 64 */
    float *w2, *b2; /* 2 * 64 x 64 (the taps that see the two steps) */
    float *w3, *b3; /* 64 x 128 (the middle tap) */
    float *wx;      /* 128 x 512: the LSTM's input weights, transposed */
    float *wh;      /* 128 x 512: its recurrent weights, transposed */
    float *bg;      /* 512: both biases summed */
    float *head;    /* 128 */
    float head_bias;
    float *zeros;   /* a zero bias, for the STFT (which has none) */
} Model;

/* A window's context and samples, padded and cut into frames, through the encoder: each of
 * `n` windows (n <= CHUNK) gives a row of 128 in `out`. */
DISPATCH static void encode(const Model *md, const float *rows, int n, float *out) {
    const int block = md->block, bins = md->bins, row = md->row, frame = 2 * block;
    float frames[CHUNK * FRAMES * 256];          /* frame <= 256 */
    float spectrum[CHUNK * FRAMES * 272];        /* stft_np <= padded(258) */
    float cols0[CHUNK * FRAMES * 3 * 129];       /* 3 bins, bins <= 129 */
    float x0[CHUNK * FRAMES * HIDDEN];
    float cols1[CHUNK * 2 * 3 * HIDDEN];
    float x1[CHUNK * 2 * 64];
    float x2[CHUNK * 64];
    for (int w = 0; w < n; w++) {
        const float *x = rows + (size_t)w * row;
        for (int t = 0; t < FRAMES; t++) {
            float *f = frames + (w * FRAMES + t) * frame;
            int start = t * block;
            for (int j = 0; j < frame; j++) {
                int i = start + j; /* the right padding reflects, without the edge */
                f[j] = i < row ? x[i] : x[2 * (row - 1) - i];
            }
        }
    }
    const int np = md->stft_np;
    gemm(n * FRAMES, frame, np, frames, frame, md->stft, md->zeros, spectrum, np);
    /* magnitudes, laid out as layer 0's taps: step t's columns are steps t-1, t, t+1 */
    memset(cols0, 0, sizeof(float) * n * FRAMES * 3 * bins);
    for (int s = 0; s < n * FRAMES; s++) {
        const float *sp = spectrum + s * np;
        int t = s % FRAMES;
        float *base = cols0 + s * 3 * bins;
        for (int f = 0; f < bins; f++) {
            float re = sp[f], im = sp[bins + f];
            float mag = sqrtf(re * re + im * im);
            base[bins + f] = mag;                                   /* tap 1 of step t */
            if (t > 0) base[-3 * bins + 2 * bins + f] = mag;        /* tap 2 of step t-1 */
            if (t < FRAMES - 1) base[3 * bins + f] = mag;           /* tap 0 of step t+1 */
        }
    }
    gemm(n * FRAMES, 3 * bins, HIDDEN, cols0, 3 * bins, md->w0, md->b0, x0, HIDDEN);
    relu(x0, n * FRAMES * HIDDEN);
    /* layer 1, stride 2 over four steps: out step u takes steps 2u-1, 2u, 2u+1 */
    for (int w = 0; w < n; w++) {
        const float *s = x0 + w * FRAMES * HIDDEN;
        float *c0 = cols1 + (w * 2) * 3 * HIDDEN, *c1 = c0 + 3 * HIDDEN;
        memset(c0, 0, sizeof(float) * HIDDEN);
        memcpy(c0 + HIDDEN, s, sizeof(float) * 2 * HIDDEN);          /* steps 0, 1 */
        memcpy(c1, s + HIDDEN, sizeof(float) * 3 * HIDDEN);          /* steps 1, 2, 3 */
    }
    gemm(n * 2, 3 * HIDDEN, 64, cols1, 3 * HIDDEN, md->w1, md->b1, x1, 64);
    relu(x1, n * 2 * 64);
    /* layer 2, stride 2 over two steps: taps 1 and 2 see them; layer 3 its middle tap */
    gemm(n, 2 * 64, 64, x1, 2 * 64, md->w2, md->b2, x2, 64);
    relu(x2, n * 64);
    gemm(n, 64, HIDDEN, x2, 64, md->w3, md->b3, out, HIDDEN);
    relu(out, n * HIDDEN);
}

/* The LSTM over `n` encoded windows from state (h, c), updated in place; each window's
 * probability in probs. */
DISPATCH static void decode(const Model *md, const float *encoded, int n, float *h, float *c,
                            float *probs) {
    float xg[CHUNK * GATES], g[GATES];
    gemm(n, HIDDEN, GATES, encoded, HIDDEN, md->wx, md->bg, xg, GATES);
    for (int w = 0; w < n; w++) {
        gemm(1, HIDDEN, GATES, h, HIDDEN, md->wh, xg + w * GATES, g, GATES);
        float logit = md->head_bias;
        for (int j = 0; j < HIDDEN; j++) {
            float i = sigmoid(g[j]), f = sigmoid(g[HIDDEN + j]);
            float u = tanh_(g[2 * HIDDEN + j]), o = sigmoid(g[3 * HIDDEN + j]);
            float cell = f * c[j] + i * u;
            c[j] = cell;
            h[j] = o * tanh_(cell);
            logit += (h[j] > 0.0f ? h[j] : 0.0f) * md->head[j];
        }
        probs[w] = sigmoid(logit);
    }
}

/* -- the Python type ------------------------------------------------------------------- */

static void model_dealloc(Model *self) {
    float **owned[] = {&self->stft, &self->w0, &self->b0, &self->w1, &self->b1, &self->w2,
                       &self->b2, &self->w3, &self->b3, &self->wx, &self->wh, &self->bg,
                       &self->head, &self->zeros};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(*owned[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A copy of a float32 buffer of exactly `rows` x `cols` values, its columns padded with zeros
 * to `np` (a multiple of COLS) and laid out in panels (a vector: rows 1); NULL with an
 * exception set otherwise. */
static float *take(PyObject *obj, const char *name, Py_ssize_t rows, Py_ssize_t cols,
                   Py_ssize_t np) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    float *out = NULL;
    if (view.itemsize != 4 || view.format == NULL || strcmp(view.format, "f") != 0 ||
        view.len != rows * cols * 4) {
        PyErr_Format(PyExc_ValueError, "%s: want %zd x %zd float32 values", name, rows, cols);
    } else if ((out = calloc((size_t)(rows * np + 8), sizeof(float))) == NULL) {
        PyErr_NoMemory();
    } else {
        const float *in = view.buf;
        for (Py_ssize_t r = 0; r < rows; r++)
            for (Py_ssize_t j = 0; j < cols; j++)
                out[(j / COLS) * rows * COLS + r * COLS + j % COLS] = in[r * cols + j];
    }
    PyBuffer_Release(&view);
    return out;
}

static PyObject *model_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"block", "stft", "w0", "b0", "w1", "b1", "w2", "b2", "w3", "b3",
                            "wx", "wh", "bias", "head", "head_bias", NULL};
    int block;
    float head_bias;
    PyObject *o[13];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iOOOOOOOOOOOOOf", names, &block, &o[0],
                                     &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                                     &o[9], &o[10], &o[11], &o[12], &head_bias))
        return NULL;
    if (block != 64 && block != 128) {
        PyErr_SetString(PyExc_ValueError, "block: the STFT hop is 64 (8 kHz) or 128 (16 kHz)");
        return NULL;
    }
    Model *self = (Model *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    int bins = block + 1;
    self->block = block;
    self->bins = bins;
    self->row = 9 * block / 2;
    self->stft_np = padded(2 * bins);
    self->head_bias = head_bias;
    if ((self->stft = take(o[0], "stft", 2 * block, 2 * bins, self->stft_np)) == NULL ||
        (self->w0 = take(o[1], "w0", 3 * bins, HIDDEN, HIDDEN)) == NULL ||
        (self->b0 = take(o[2], "b0", 1, HIDDEN, HIDDEN)) == NULL ||
        (self->w1 = take(o[3], "w1", 3 * HIDDEN, 64, 64)) == NULL ||
        (self->b1 = take(o[4], "b1", 1, 64, 64)) == NULL ||
        (self->w2 = take(o[5], "w2", 2 * 64, 64, 64)) == NULL ||
        (self->b2 = take(o[6], "b2", 1, 64, 64)) == NULL ||
        (self->w3 = take(o[7], "w3", 64, HIDDEN, HIDDEN)) == NULL ||
        (self->b3 = take(o[8], "b3", 1, HIDDEN, HIDDEN)) == NULL ||
        (self->wx = take(o[9], "wx", HIDDEN, GATES, GATES)) == NULL ||
        (self->wh = take(o[10], "wh", HIDDEN, GATES, GATES)) == NULL ||
        (self->bg = take(o[11], "bias", 1, GATES, GATES)) == NULL ||
        (self->head = take(o[12], "head", 1, HIDDEN, HIDDEN)) == NULL ||
        (self->zeros = calloc(GATES, sizeof(float))) == NULL) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* A float32 buffer (writable if asked); 0 on success. */
static int float_buffer(PyObject *obj, Py_buffer *view, int writable, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT |
                                          (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->itemsize != 4 || view->format == NULL || strcmp(view->format, "f") != 0) {
        PyErr_Format(PyExc_ValueError, "%s: want float32 values", name);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The four arrays of a run: rows (n x row), h and c (128 each), probs (n or more). */
typedef struct {
    Py_buffer rows, h, c, probs;
    Py_ssize_t n;
} Arrays;

/* Takes the four buffers and checks their sizes; 0 on success, or -1 with an exception set
 * and nothing held. */
static int take_arrays(const Model *md, PyObject *const *args, Arrays *a) {
    if (float_buffer(args[0], &a->rows, 0, "rows") < 0) return -1;
    if (float_buffer(args[1], &a->h, 1, "h") < 0) goto rows_done;
    if (float_buffer(args[2], &a->c, 1, "c") < 0) goto h_done;
    if (float_buffer(args[3], &a->probs, 1, "probs") < 0) goto c_done;
    Py_ssize_t row_bytes = (Py_ssize_t)md->row * 4;
    a->n = a->rows.len / row_bytes;
    if (a->rows.len % row_bytes == 0 && a->h.len == HIDDEN * 4 && a->c.len == HIDDEN * 4 &&
        a->probs.len >= a->n * 4)
        return 0;
    PyErr_Format(PyExc_ValueError,
                 "run: rows must be n x %d float32, h and c %d, probs at least n", md->row,
                 HIDDEN);
    PyBuffer_Release(&a->probs);
c_done:
    PyBuffer_Release(&a->c);
h_done:
    PyBuffer_Release(&a->h);
rows_done:
    PyBuffer_Release(&a->rows);
    return -1;
}

static void release_arrays(Arrays *a) {
    PyBuffer_Release(&a->probs);
    PyBuffer_Release(&a->c);
    PyBuffer_Release(&a->h);
    PyBuffer_Release(&a->rows);
}

static void forward(const Model *md, const Arrays *a) {
    float encoded[CHUNK * HIDDEN];
    for (Py_ssize_t w = 0; w < a->n; w += CHUNK) {
        int k = (int)(a->n - w < CHUNK ? a->n - w : CHUNK);
        encode(md, (const float *)a->rows.buf + w * md->row, k, encoded);
        decode(md, encoded, k, a->h.buf, a->c.buf, (float *)a->probs.buf + w);
    }
}

PyDoc_STRVAR(run_doc,
"run(rows, h, c, probs)\n\n"
"Consecutive windows of one stream with their context (rows: n x 4.5 blocks, float32) from\n"
"the LSTM state (h, c: 128 float32 each, updated in place): each window's speech\n"
"probability in probs (at least n float32).");

static PyObject *model_run(Model *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "run(rows, h, c, probs) takes 4 arguments");
        return NULL;
    }
    Arrays a;
    if (take_arrays(self, args, &a) < 0) return NULL;
    forward(self, &a);
    release_arrays(&a);
    Py_RETURN_NONE;
}

/* -- a binding: `run` with its arrays taken once ------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Model *model;
    Arrays arrays;
} Binding;

static void binding_dealloc(Binding *self) {
    release_arrays(&self->arrays);
    Py_DECREF(self->model);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *binding_run(Binding *self, PyObject *Py_UNUSED(ignored)) {
    forward(self->model, &self->arrays);
    Py_RETURN_NONE;
}

static PyMethodDef binding_methods[] = {
    {"run", (PyCFunction)binding_run, METH_NOARGS,
     "run()\n\nThe bound rows through the model, as Model.run(rows, h, c, probs) would."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BindingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "media._silero.Binding",
    .tp_basicsize = sizeof(Binding),
    .tp_dealloc = (destructor)binding_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Model.run's four arrays, taken once (Model.bind); the arrays stay exported, "
              "so they cannot be resized, while it lives.",
    .tp_methods = binding_methods,
};

PyDoc_STRVAR(bind_doc,
"bind(rows, h, c, probs) -> Binding\n\n"
"run's arrays, checked and held: Binding.run() then scores what rows holds at that moment,\n"
"without taking the buffers again (a stream's arrays are its own and reused).");

static PyObject *model_bind(Model *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "bind(rows, h, c, probs) takes 4 arguments");
        return NULL;
    }
    Binding *binding = PyObject_New(Binding, &BindingType);
    if (binding == NULL) return NULL;
    if (take_arrays(self, args, &binding->arrays) < 0) {
        PyObject_Free(binding);
        return NULL;
    }
    binding->model = (Model *)Py_NewRef(self);
    return (PyObject *)binding;
}

static PyMethodDef model_methods[] = {
    {"run", (PyCFunction)(void (*)(void))model_run, METH_FASTCALL, run_doc},
    {"bind", (PyCFunction)(void (*)(void))model_bind, METH_FASTCALL, bind_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "media._silero.Model",
    .tp_basicsize = sizeof(Model),
    .tp_dealloc = (destructor)model_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Silero VAD v6.2's forward pass over one sample rate's weights "
              "(media/silero_native.py builds it).",
    .tp_methods = model_methods,
    .tp_new = model_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "media._silero",
    "Silero VAD's forward pass in C (media/silero_native.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__silero(void) {
    if (PyType_Ready(&ModelType) < 0 || PyType_Ready(&BindingType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Model", (PyObject *)&ModelType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
