/*
 * _native: the shared-page trackers as a kernel would write them, in C.
 *
 * Python timings of testbed/tracker/ compare interpreters, not data structures (issue 13 §2).
 * This module holds the same structures in the form the kernel would use, with the Python
 * trackers as their reference models (tests/test_tracker_native.py proves them equal):
 *
 *   Bitmap -- one bit per guest page in u64 words; a range is stored a word at a time (a masked
 *             head and tail, memset between), runs are found with ctz over whole words.
 *   Ranges -- sorted parallel arrays of u64 starts and exclusive ends, disjoint and never
 *             adjacent; binary search, merge on insert, memmove to insert or delete; at most
 *             max_ranges records, after which a conversion that would add one poisons the
 *             tracker and freezes it (the semantics of testbed/tracker/base.py).
 *
 * Validation is the caller's cheap test: gfn and npages must be ints with 0 <= gfn,
 * 1 <= npages and gfn + npages <= guest_pages, else ValueError/TypeError/OverflowError and
 * nothing recorded; the Python wrapper (testbed/tracker/native.py) turns that into the
 * InvalidRangeError naming the field. Optional, like testbed/hw/_nativemmu.c: setup.py builds it
 * with optional=True and testbed.tracker works without it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

/* The cheap range test; returns 0 and sets an exception when the range is bad. */
static int
parse_range(PyObject *ogfn, PyObject *onpages, uint64_t guest_pages, uint64_t *gfn, uint64_t *end)
{
    if (!PyLong_Check(ogfn) || !PyLong_Check(onpages)) {
        PyErr_SetString(PyExc_TypeError, "gfn and npages must be ints");
        return 0;
    }
    long long g = PyLong_AsLongLong(ogfn);
    if (g == -1 && PyErr_Occurred())
        return 0;
    long long n = PyLong_AsLongLong(onpages);
    if (n == -1 && PyErr_Occurred())
        return 0;
    if (g < 0 || n < 1 || (uint64_t)n > guest_pages || (uint64_t)g > guest_pages - (uint64_t)n) {
        PyErr_SetString(PyExc_ValueError, "range outside guest memory");
        return 0;
    }
    *gfn = (uint64_t)g;
    *end = (uint64_t)g + (uint64_t)n;
    return 1;
}

/* One export record field: u64 little-endian (testbed/tracker/export.py). */
static inline void
put_u64le(uint8_t *p, uint64_t v)
{
    for (int k = 0; k < 8; k++)
        p[k] = (uint8_t)(v >> (8 * k));
}

/* ============================================================================================
 * Bitmap
 * ========================================================================================== */

typedef struct {
    PyObject_HEAD
    uint64_t *words;
    uint64_t nwords;
    uint64_t guest_pages;
} Bitmap;

static void
bm_fill(uint64_t *w, uint64_t a, uint64_t b, int value)
{
    uint64_t wa = a >> 6, wb = (b - 1) >> 6;
    uint64_t head = ~0ULL << (a & 63);
    uint64_t tail = ~0ULL >> (63 - ((b - 1) & 63));
    if (wa == wb) {
        uint64_t m = head & tail;
        w[wa] = value ? (w[wa] | m) : (w[wa] & ~m);
        return;
    }
    w[wa] = value ? (w[wa] | head) : (w[wa] & ~head);
    if (wb > wa + 1)
        memset(&w[wa + 1], value ? 0xff : 0, (size_t)(wb - wa - 1) * 8);
    w[wb] = value ? (w[wb] | tail) : (w[wb] & ~tail);
}

/* The first page >= from whose bit equals `value`, or guest_pages. */
static uint64_t
bm_find(const Bitmap *self, uint64_t from, int value)
{
    if (from >= self->guest_pages)
        return self->guest_pages;
    uint64_t i = from >> 6;
    uint64_t w = (value ? self->words[i] : ~self->words[i]) & (~0ULL << (from & 63));
    while (!w) {
        if (++i >= self->nwords)
            return self->guest_pages;
        w = value ? self->words[i] : ~self->words[i];
    }
    uint64_t pos = (i << 6) + (uint64_t)__builtin_ctzll(w);
    return pos < self->guest_pages ? pos : self->guest_pages;
}

static int
Bitmap_init(Bitmap *self, PyObject *args, PyObject *kwds)
{
    unsigned long long pages;
    static char *kwlist[] = {"guest_pages", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "K", kwlist, &pages))
        return -1;
    if (pages < 1 || pages > (1ULL << 52)) {
        PyErr_SetString(PyExc_ValueError, "guest_pages must be in [1, 2**52]");
        return -1;
    }
    PyMem_Free(self->words);
    self->nwords = (pages + 63) / 64;
    self->words = PyMem_Calloc((size_t)self->nwords, 8);
    if (!self->words) {
        PyErr_NoMemory();
        return -1;
    }
    self->guest_pages = pages;
    return 0;
}

static void
Bitmap_dealloc(Bitmap *self)
{
    PyMem_Free(self->words);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
bm_store(Bitmap *self, PyObject *const *args, Py_ssize_t nargs, int value)
{
    uint64_t gfn, end;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "expected (gfn, npages)");
        return NULL;
    }
    if (!parse_range(args[0], args[1], self->guest_pages, &gfn, &end))
        return NULL;
    bm_fill(self->words, gfn, end, value);
    Py_RETURN_NONE;
}

static PyObject *
Bitmap_set_shared(Bitmap *self, PyObject *const *args, Py_ssize_t nargs)
{
    return bm_store(self, args, nargs, 1);
}

static PyObject *
Bitmap_set_private(Bitmap *self, PyObject *const *args, Py_ssize_t nargs)
{
    return bm_store(self, args, nargs, 0);
}

/* apply(seq) -> n: applies entries until the first one that is not a valid (gfn, npages, shared)
 * triple and returns how many it applied, with no exception set (the wrapper reports it). */
static PyObject *
Bitmap_apply(Bitmap *self, PyObject *seq)
{
    PyObject *fast = PySequence_Fast(seq, "apply() needs a sequence");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast), k;
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (k = 0; k < n; k++) {
        PyObject *t = items[k];
        uint64_t gfn, end;
        if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 3)
            break;
        if (!parse_range(PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1), self->guest_pages, &gfn, &end)) {
            PyErr_Clear();
            break;
        }
        int shared = PyObject_IsTrue(PyTuple_GET_ITEM(t, 2));
        if (shared < 0) {
            Py_DECREF(fast);
            return NULL;
        }
        if (end == gfn + 1) {
            uint64_t bit = 1ULL << (gfn & 63);
            if (shared)
                self->words[gfn >> 6] |= bit;
            else
                self->words[gfn >> 6] &= ~bit;
        } else {
            bm_fill(self->words, gfn, end, shared);
        }
    }
    Py_DECREF(fast);
    return PyLong_FromSsize_t(k);
}

static PyObject *
Bitmap_is_shared(Bitmap *self, PyObject *ogfn)
{
    if (!PyLong_Check(ogfn)) {
        PyErr_SetString(PyExc_TypeError, "gfn must be an int");
        return NULL;
    }
    long long g = PyLong_AsLongLong(ogfn);
    if (g == -1 && PyErr_Occurred())
        return NULL;
    if (g < 0 || (uint64_t)g >= self->guest_pages) {
        PyErr_SetString(PyExc_ValueError, "gfn outside guest memory");
        return NULL;
    }
    return PyBool_FromLong((long)((self->words[(uint64_t)g >> 6] >> ((uint64_t)g & 63)) & 1));
}

static PyObject *
Bitmap_ranges(Bitmap *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    for (uint64_t s = bm_find(self, 0, 1); s < self->guest_pages;) {
        uint64_t e = bm_find(self, s, 0);
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)s, (unsigned long long)(e - s));
        if (!t || PyList_Append(list, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(t);
        s = bm_find(self, e, 1);
    }
    return list;
}

static Py_ssize_t
bm_count(const Bitmap *self)
{
    Py_ssize_t n = 0;
    for (uint64_t s = bm_find(self, 0, 1); s < self->guest_pages; n++)
        s = bm_find(self, bm_find(self, s, 0), 1);
    return n;
}

static PyObject *
Bitmap_range_count(Bitmap *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(bm_count(self));
}

/* export(buf) -> records needed; writes them (16 bytes each, little-endian) only if all fit. */
static PyObject *
Bitmap_export(Bitmap *self, PyObject *obj)
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    Py_ssize_t n = bm_count(self);
    if (n * 16 <= view.len) {
        uint8_t *p = view.buf;
        for (uint64_t s = bm_find(self, 0, 1); s < self->guest_pages;) {
            uint64_t e = bm_find(self, s, 0);
            put_u64le(p, s);
            put_u64le(p + 8, e - s);
            p += 16;
            s = bm_find(self, e, 1);
        }
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(n);
}

static PyObject *
Bitmap_shared_pages(Bitmap *self, PyObject *Py_UNUSED(ignored))
{
    unsigned long long n = 0;
    for (uint64_t i = 0; i < self->nwords; i++)
        n += (unsigned long long)__builtin_popcountll(self->words[i]);
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *
Bitmap_clear(Bitmap *self, PyObject *Py_UNUSED(ignored))
{
    memset(self->words, 0, (size_t)self->nwords * 8);
    Py_RETURN_NONE;
}

static PyObject *
Bitmap_sizeof(Bitmap *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(sizeof(Bitmap) + (size_t)self->nwords * 8);
}

static PyMethodDef Bitmap_methods[] = {
    {"set_shared", (PyCFunction)(void (*)(void))Bitmap_set_shared, METH_FASTCALL, "set_shared(gfn, npages)"},
    {"set_private", (PyCFunction)(void (*)(void))Bitmap_set_private, METH_FASTCALL, "set_private(gfn, npages)"},
    {"apply", (PyCFunction)Bitmap_apply, METH_O, "apply(seq) -> entries applied before the first invalid one"},
    {"is_shared", (PyCFunction)Bitmap_is_shared, METH_O, "is_shared(gfn) -> bool"},
    {"ranges", (PyCFunction)Bitmap_ranges, METH_NOARGS, "ranges() -> [(gfn, npages)]"},
    {"range_count", (PyCFunction)Bitmap_range_count, METH_NOARGS, "range_count() -> int"},
    {"export", (PyCFunction)Bitmap_export, METH_O, "export(buf) -> records needed (written iff all fit)"},
    {"shared_pages", (PyCFunction)Bitmap_shared_pages, METH_NOARGS, "shared_pages() -> popcount"},
    {"clear", (PyCFunction)Bitmap_clear, METH_NOARGS, "clear()"},
    {"__sizeof__", (PyCFunction)Bitmap_sizeof, METH_NOARGS, "bytes used, words included"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BitmapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "testbed.tracker._native.Bitmap",
    .tp_basicsize = sizeof(Bitmap),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Bitmap(guest_pages): one bit per page in u64 words",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Bitmap_init,
    .tp_dealloc = (destructor)Bitmap_dealloc,
    .tp_methods = Bitmap_methods,
};

/* ============================================================================================
 * Ranges
 * ========================================================================================== */

typedef struct {
    PyObject_HEAD
    uint64_t *starts;
    uint64_t *ends; /* exclusive */
    Py_ssize_t n, cap, max;
    uint64_t guest_pages;
    int poisoned;
} Ranges;

/* First index in [lo, n) with a[i] >= key (strict: a[i] > key), or n. Branch-free (the
 * comparison compiles to a conditional move): on DMA churn the probes are unpredictable, and a
 * mispredicted branch per step cost more than the search. */
static inline Py_ssize_t
lower_bound(const uint64_t *a, Py_ssize_t lo, Py_ssize_t n, uint64_t key, int strict)
{
    Py_ssize_t len = n - lo;
    if (len <= 0)
        return lo;
    const uint64_t *base = a + lo;
    while (len > 1) {
        Py_ssize_t half = len / 2;
        base = (strict ? base[half - 1] <= key : base[half - 1] < key) ? base + half : base;
        len -= half;
    }
    return (base - a) + (strict ? *base <= key : *base < key);
}

static int
rg_reserve(Ranges *self, Py_ssize_t need)
{
    if (need <= self->cap)
        return 0;
    Py_ssize_t cap = self->cap ? self->cap * 2 : 16;
    if (cap > self->max)
        cap = self->max;
    if (cap < need)
        cap = need;
    uint64_t *s = PyMem_Realloc(self->starts, (size_t)cap * 8);
    if (!s)
        goto nomem;
    self->starts = s;
    uint64_t *e = PyMem_Realloc(self->ends, (size_t)cap * 8);
    if (!e)
        goto nomem;
    self->ends = e;
    self->cap = cap;
    return 0;
nomem:
    PyErr_NoMemory();
    return -1;
}

/* Insert [a, b) at index i; 1 done, 0 poisoned (no room under the bound), -1 error. */
static int
rg_insert(Ranges *self, Py_ssize_t i, uint64_t a, uint64_t b)
{
    if (self->n >= self->max) {
        self->poisoned = 1;
        return 0;
    }
    if (rg_reserve(self, self->n + 1) < 0)
        return -1;
    memmove(&self->starts[i + 1], &self->starts[i], (size_t)(self->n - i) * 8);
    memmove(&self->ends[i + 1], &self->ends[i], (size_t)(self->n - i) * 8);
    self->starts[i] = a;
    self->ends[i] = b;
    self->n++;
    return 1;
}

/* Remove records [i, j). */
static void
rg_remove(Ranges *self, Py_ssize_t i, Py_ssize_t j)
{
    if (j <= i)
        return;
    memmove(&self->starts[i], &self->starts[j], (size_t)(self->n - j) * 8);
    memmove(&self->ends[i], &self->ends[j], (size_t)(self->n - j) * 8);
    self->n -= j - i;
}

static int
rg_set_shared(Ranges *self, uint64_t gfn, uint64_t end)
{
    if (self->poisoned)
        return 0;
    Py_ssize_t i = lower_bound(self->ends, 0, self->n, gfn, 0);     /* first end >= gfn */
    if (end == gfn + 1) {
        /* One page (DMA churn is almost all single pages): range i touches it or lies right of
         * it, so one search decides; only a page filling a one-page gap joins two records. */
        if (i < self->n && self->starts[i] <= gfn) {
            if (self->ends[i] == gfn) {
                if (i + 1 < self->n && self->starts[i + 1] == end) {
                    self->ends[i] = self->ends[i + 1];
                    rg_remove(self, i + 1, i + 2);
                } else {
                    self->ends[i] = end;
                }
            }
            return 0; /* (or already shared) */
        }
        if (i < self->n && self->starts[i] == end) {
            self->starts[i] = gfn;
            return 0;
        }
        return rg_insert(self, i, gfn, end) < 0 ? -1 : 0;
    }
    Py_ssize_t j = lower_bound(self->starts, i, self->n, end, 1);   /* first start > end */
    if (i == j)
        return rg_insert(self, i, gfn, end) < 0 ? -1 : 0;
    if (self->starts[i] > gfn)
        self->starts[i] = gfn;
    uint64_t last = self->ends[j - 1];
    self->ends[i] = last > end ? last : end;
    rg_remove(self, i + 1, j);
    return 0;
}

static int
rg_set_private(Ranges *self, uint64_t gfn, uint64_t end)
{
    if (self->poisoned)
        return 0;
    Py_ssize_t i = lower_bound(self->ends, 0, self->n, gfn, 1);     /* first end > gfn */
    if (end == gfn + 1) {
        /* One page: only range i can hold it. */
        if (i == self->n || self->starts[i] > gfn)
            return 0; /* already private */
        uint64_t s = self->starts[i], e = self->ends[i];
        if (s == gfn) {
            if (e == end)
                rg_remove(self, i, i + 1);
            else
                self->starts[i] = end;
            return 0;
        }
        if (e == end) {
            self->ends[i] = gfn;
            return 0;
        }
        /* fall through: punching a hole, the general path below */
    }
    Py_ssize_t j = lower_bound(self->starts, i, self->n, end, 0);   /* first start >= end */
    if (i == j)
        return 0;
    uint64_t first = self->starts[i], last = self->ends[j - 1];
    if (first < gfn && last > end) {
        if (j - i == 1) {
            /* Punching a hole: the only way set_private grows the list. */
            if (self->n >= self->max) {
                self->poisoned = 1;
                return 0;
            }
            self->ends[i] = gfn;
            return rg_insert(self, i + 1, end, last) < 0 ? -1 : 0;
        }
        self->ends[i] = gfn;
        self->starts[j - 1] = end;
        rg_remove(self, i + 1, j - 1);
    } else if (first < gfn) {
        self->ends[i] = gfn;
        rg_remove(self, i + 1, j);
    } else if (last > end) {
        self->starts[j - 1] = end;
        rg_remove(self, i, j - 1);
    } else {
        rg_remove(self, i, j);
    }
    return 0;
}

static int
Ranges_init(Ranges *self, PyObject *args, PyObject *kwds)
{
    unsigned long long pages;
    Py_ssize_t max;
    static char *kwlist[] = {"guest_pages", "max_ranges", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Kn", kwlist, &pages, &max))
        return -1;
    if (pages < 1 || pages > (1ULL << 52) || max < 1) {
        PyErr_SetString(PyExc_ValueError, "guest_pages must be in [1, 2**52] and max_ranges >= 1");
        return -1;
    }
    self->guest_pages = pages;
    self->max = max;
    self->n = 0;
    self->poisoned = 0;
    return 0;
}

static void
Ranges_dealloc(Ranges *self)
{
    PyMem_Free(self->starts);
    PyMem_Free(self->ends);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
rg_store(Ranges *self, PyObject *const *args, Py_ssize_t nargs, int shared)
{
    uint64_t gfn, end;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "expected (gfn, npages)");
        return NULL;
    }
    if (!parse_range(args[0], args[1], self->guest_pages, &gfn, &end))
        return NULL;
    if ((shared ? rg_set_shared(self, gfn, end) : rg_set_private(self, gfn, end)) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Ranges_set_shared(Ranges *self, PyObject *const *args, Py_ssize_t nargs)
{
    return rg_store(self, args, nargs, 1);
}

static PyObject *
Ranges_set_private(Ranges *self, PyObject *const *args, Py_ssize_t nargs)
{
    return rg_store(self, args, nargs, 0);
}

static PyObject *
Ranges_apply(Ranges *self, PyObject *seq)
{
    PyObject *fast = PySequence_Fast(seq, "apply() needs a sequence");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast), k;
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (k = 0; k < n; k++) {
        PyObject *t = items[k];
        uint64_t gfn, end;
        if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 3)
            break;
        if (!parse_range(PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1), self->guest_pages, &gfn, &end)) {
            PyErr_Clear();
            break;
        }
        int shared = PyObject_IsTrue(PyTuple_GET_ITEM(t, 2));
        if (shared < 0 || (shared ? rg_set_shared(self, gfn, end) : rg_set_private(self, gfn, end)) < 0) {
            Py_DECREF(fast);
            return NULL;
        }
    }
    Py_DECREF(fast);
    return PyLong_FromSsize_t(k);
}

static PyObject *
Ranges_is_shared(Ranges *self, PyObject *ogfn)
{
    if (!PyLong_Check(ogfn)) {
        PyErr_SetString(PyExc_TypeError, "gfn must be an int");
        return NULL;
    }
    long long g = PyLong_AsLongLong(ogfn);
    if (g == -1 && PyErr_Occurred())
        return NULL;
    if (g < 0 || (uint64_t)g >= self->guest_pages) {
        PyErr_SetString(PyExc_ValueError, "gfn outside guest memory");
        return NULL;
    }
    Py_ssize_t i = lower_bound(self->ends, 0, self->n, (uint64_t)g, 1); /* first end > gfn */
    return PyBool_FromLong(i < self->n && self->starts[i] <= (uint64_t)g);
}

static PyObject *
Ranges_ranges(Ranges *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = PyList_New(self->n);
    if (!list)
        return NULL;
    for (Py_ssize_t i = 0; i < self->n; i++) {
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)self->starts[i],
                                    (unsigned long long)(self->ends[i] - self->starts[i]));
        if (!t) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    return list;
}

static PyObject *
Ranges_range_count(Ranges *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(self->n);
}

static PyObject *
Ranges_export(Ranges *self, PyObject *obj)
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (self->n * 16 <= view.len) {
        uint8_t *p = view.buf;
        for (Py_ssize_t i = 0; i < self->n; i++, p += 16) {
            put_u64le(p, self->starts[i]);
            put_u64le(p + 8, self->ends[i] - self->starts[i]);
        }
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(self->n);
}

static PyObject *
Ranges_clear(Ranges *self, PyObject *Py_UNUSED(ignored))
{
    self->n = 0;
    self->poisoned = 0;
    Py_RETURN_NONE;
}

static PyObject *
Ranges_get_poisoned(Ranges *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->poisoned);
}

static PyObject *
Ranges_sizeof(Ranges *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(sizeof(Ranges) + (size_t)self->cap * 16);
}

static PyObject *
Ranges_bound(Ranges *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(sizeof(Ranges) + (size_t)self->max * 16);
}

static PyMethodDef Ranges_methods[] = {
    {"set_shared", (PyCFunction)(void (*)(void))Ranges_set_shared, METH_FASTCALL, "set_shared(gfn, npages)"},
    {"set_private", (PyCFunction)(void (*)(void))Ranges_set_private, METH_FASTCALL, "set_private(gfn, npages)"},
    {"apply", (PyCFunction)Ranges_apply, METH_O, "apply(seq) -> entries applied before the first invalid one"},
    {"is_shared", (PyCFunction)Ranges_is_shared, METH_O, "is_shared(gfn) -> bool"},
    {"ranges", (PyCFunction)Ranges_ranges, METH_NOARGS, "ranges() -> [(gfn, npages)]"},
    {"range_count", (PyCFunction)Ranges_range_count, METH_NOARGS, "range_count() -> int"},
    {"export", (PyCFunction)Ranges_export, METH_O, "export(buf) -> records needed (written iff all fit)"},
    {"clear", (PyCFunction)Ranges_clear, METH_NOARGS, "clear(): no records, no poison"},
    {"__sizeof__", (PyCFunction)Ranges_sizeof, METH_NOARGS, "bytes used, arrays included"},
    {"bound_bytes", (PyCFunction)Ranges_bound, METH_NOARGS, "bytes used at max_ranges records"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ranges_getset[] = {
    {"poisoned", (getter)Ranges_get_poisoned, NULL, "a conversion was dropped at the bound", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RangesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "testbed.tracker._native.Ranges",
    .tp_basicsize = sizeof(Ranges),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ranges(guest_pages, max_ranges): sorted arrays of shared ranges, bounded and poisoned",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ranges_init,
    .tp_dealloc = (destructor)Ranges_dealloc,
    .tp_methods = Ranges_methods,
    .tp_getset = Ranges_getset,
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_native", "The shared-page trackers in C (testbed/tracker/native.py wraps them).",
    -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    if (PyType_Ready(&BitmapType) < 0 || PyType_Ready(&RangesType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    Py_INCREF(&BitmapType);
    Py_INCREF(&RangesType);
    if (PyModule_AddObject(m, "Bitmap", (PyObject *)&BitmapType) < 0 ||
        PyModule_AddObject(m, "Ranges", (PyObject *)&RangesType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
