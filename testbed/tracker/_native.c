/*
 * _native: the shared-page trackers as a kernel would write them, in C.
 *
 * Python timings of testbed/tracker/ compare interpreters, not data structures (issue 13 §2).
 * This module holds the same structures in the form the kernel would use, with the Python
 * trackers as their reference models (tests/test_tracker_native.py proves them equal):
 *
 *   Bitmap -- one bit per guest page in u64 words; a range is stored a word at a time (a masked
 *             head and tail, memset between), runs are found with ctz over whole words.
 *   Ranges -- a sorted array of {start, end} records (end exclusive), disjoint and never
 *             adjacent; merge on insert, split on remove; found by a finger search (the eight
 *             records around the last index touched, counted branch-free, else a binary
 *             search), records shifted in place (a short tail as one fixed block, a long one by
 *             memmove); at most max_ranges records, after which a conversion
 *             that would add one poisons the tracker and freezes it (testbed/tracker/base.py).
 *   Tree   -- an AVL tree of closed intervals [start, last] keyed by start and augmented with
 *             each subtree's largest `last`, searched with the kernel's interval-tree walk
 *             (include/linux/interval_tree_generic.h, ITSTATIC ..._iter_first); the same
 *             disjoint, merged records, bound and poison as Ranges. Reference model:
 *             testbed/tracker/tree.py.
 *
 * Validation is the caller's cheap test: gfn and npages must be ints with 0 <= gfn,
 * 1 <= npages and gfn + npages <= guest_pages, else ValueError/TypeError/OverflowError and
 * nothing recorded; the Python wrapper (testbed/tracker/native.py) turns that into the
 * InvalidRangeError naming the field. Optional, like testbed/hw/_nativemmu.c: setup.py builds it
 * with optional=True and testbed.tracker works without it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
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

/* The cheap single-page test of is_shared(gfn); returns 0 and sets an exception when it fails. */
static int
parse_gfn(PyObject *ogfn, uint64_t guest_pages, uint64_t *gfn)
{
    if (!PyLong_Check(ogfn)) {
        PyErr_SetString(PyExc_TypeError, "gfn must be an int");
        return 0;
    }
    long long g = PyLong_AsLongLong(ogfn);
    if (g == -1 && PyErr_Occurred())
        return 0;
    if (g < 0 || (uint64_t)g >= guest_pages) {
        PyErr_SetString(PyExc_ValueError, "gfn outside guest memory");
        return 0;
    }
    *gfn = (uint64_t)g;
    return 1;
}

/* One conversion of [gfn, end) on a tracker: 0 done (or dropped by the poison), -1 error set. */
typedef int (*convert_fn)(PyObject *self, uint64_t gfn, uint64_t end, int shared);

/* apply(seq) -> n for every tracker: applies entries until the first one that is not a valid
 * (gfn, npages, shared) triple and returns how many it applied, with no exception set (the
 * wrapper reports it). Always inlined with a constant `convert`, so each tracker gets its own
 * loop with the conversion inlined, as if written out by hand. */
static inline __attribute__((always_inline)) PyObject *
apply_ops(PyObject *self, PyObject *seq, uint64_t guest_pages, convert_fn convert)
{
    /* A tuple of the entries, which nothing can change under the loop: PyObject_IsTrue on an
     * entry's `shared` may run Python code (__bool__) that empties or grows a list being
     * walked; a tuple copy holds its own reference to every entry. */
    PyObject *fast;
    if (PyTuple_CheckExact(seq)) {
        Py_INCREF(seq);
        fast = seq;
    } else {
        fast = PySequence_Tuple(seq);
        if (!fast) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_TypeError, "apply() needs a sequence");
            }
            return NULL;
        }
    }
    Py_ssize_t n = PyTuple_GET_SIZE(fast), k;
    PyObject **items = &PyTuple_GET_ITEM(fast, 0);
    for (k = 0; k < n; k++) {
        PyObject *t = items[k];
        uint64_t gfn, end;
        if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 3)
            break;
        if (!parse_range(PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1), guest_pages, &gfn, &end)) {
            PyErr_Clear();
            break;
        }
        int shared = PyObject_IsTrue(PyTuple_GET_ITEM(t, 2));
        if (shared < 0 || convert(self, gfn, end, shared) < 0) {
            Py_DECREF(fast);
            return NULL;
        }
    }
    Py_DECREF(fast);
    return PyLong_FromSsize_t(k);
}

/* set_shared(gfn, npages) / set_private(gfn, npages) for every tracker. */
static inline __attribute__((always_inline)) PyObject *
store_one(PyObject *self, PyObject *const *args, Py_ssize_t nargs, uint64_t guest_pages, int shared,
          convert_fn convert)
{
    uint64_t gfn, end;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "expected (gfn, npages)");
        return NULL;
    }
    if (!parse_range(args[0], args[1], guest_pages, &gfn, &end))
        return NULL;
    if (convert(self, gfn, end, shared) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* The shared ranges as [(gfn, npages)], from an iterator over (start, end) pairs. */
typedef int (*next_fn)(void *it, uint64_t *start, uint64_t *end);

static PyObject *
ranges_list(void *it, next_fn next)
{
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    uint64_t s, e;
    while (next(it, &s, &e)) {
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)s, (unsigned long long)(e - s));
        if (!t || PyList_Append(list, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(t);
    }
    return list;
}

/* export(buf) -> records needed; writes them (16 bytes each, little-endian) only if all fit.
 * `count` is the number of records the iterator yields. */
static PyObject *
export_records(PyObject *obj, Py_ssize_t count, void *it, next_fn next)
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (count * 16 <= view.len) {
        uint8_t *p = view.buf;
        uint64_t s, e;
        while (next(it, &s, &e)) {
            put_u64le(p, s);
            put_u64le(p + 8, e - s);
            p += 16;
        }
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(count);
}

/* Memory hotplug: the new guest size from `arg`, in [the current size, 2**52]; 0 and an
 * exception otherwise (memory only grows). */
static int
parse_grow(PyObject *arg, uint64_t current, uint64_t *pages)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(arg);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return 0;
    if (v < current || v > (1ULL << 52)) {
        PyErr_SetString(PyExc_ValueError, "guest_pages must be in [the current size, 2**52]");
        return 0;
    }
    *pages = v;
    return 1;
}

/* The Python-facing conversion methods every tracker type has: set_shared(gfn, npages),
 * set_private(gfn, npages), apply(seq), each on the type's `convert` (store_one / apply_ops). */
#define TRACKER_STORE_METHODS(Type, convert)                                                        \
    static PyObject *Type##_set_shared(Type *self, PyObject *const *args, Py_ssize_t nargs)        \
    {                                                                                              \
        return store_one((PyObject *)self, args, nargs, self->guest_pages, 1, convert);            \
    }                                                                                              \
    static PyObject *Type##_set_private(Type *self, PyObject *const *args, Py_ssize_t nargs)       \
    {                                                                                              \
        return store_one((PyObject *)self, args, nargs, self->guest_pages, 0, convert);            \
    }                                                                                              \
    static PyObject *Type##_apply(Type *self, PyObject *seq)                                       \
    {                                                                                              \
        return apply_ops((PyObject *)self, seq, self->guest_pages, convert);                       \
    }

/* Memory hotplug for the bounded structures: only the bound moves; the records stay. */
#define TRACKER_GROW_BOUND(Type)                                                                   \
    static PyObject *Type##_grow(Type *self, PyObject *arg)                                        \
    {                                                                                              \
        uint64_t pages;                                                                            \
        if (!parse_grow(arg, self->guest_pages, &pages))                                           \
            return NULL;                                                                           \
        self->guest_pages = pages;                                                                 \
        Py_RETURN_NONE;                                                                            \
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
    uint64_t nwords = (pages + 63) / 64;
    /* Zeroed now, not calloc'd: calloc maps a large bitmap lazily, and the first conversion in
     * each 4 KiB of it would pay a page fault. The kernel's bitmap (vzalloc) has its pages
     * allocated and zeroed up front too. Allocated before the old one is freed: a failed
     * (re-)__init__ leaves the object as it was. */
    uint64_t *words = PyMem_Malloc((size_t)nwords * 8);
    if (!words) {
        PyErr_NoMemory();
        return -1;
    }
    memset(words, 0, (size_t)nwords * 8);
    PyMem_Free(self->words);
    self->words = words;
    self->nwords = nwords;
    self->guest_pages = pages;
    return 0;
}

static void
Bitmap_dealloc(Bitmap *self)
{
    PyMem_Free(self->words);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
bm_convert(PyObject *obj, uint64_t gfn, uint64_t end, int shared)
{
    Bitmap *self = (Bitmap *)obj;
    if (end == gfn + 1) {
        uint64_t bit = 1ULL << (gfn & 63);
        if (shared)
            self->words[gfn >> 6] |= bit;
        else
            self->words[gfn >> 6] &= ~bit;
    } else {
        bm_fill(self->words, gfn, end, shared);
    }
    return 0;
}

TRACKER_STORE_METHODS(Bitmap, bm_convert)

static PyObject *
Bitmap_is_shared(Bitmap *self, PyObject *ogfn)
{
    uint64_t g;
    if (!parse_gfn(ogfn, self->guest_pages, &g))
        return NULL;
    return PyBool_FromLong((long)((self->words[g >> 6] >> (g & 63)) & 1));
}

/* The runs of set bits, in order. */
typedef struct {
    const Bitmap *bm;
    uint64_t s;
} BitmapIter;

static BitmapIter
bm_iter(const Bitmap *self)
{
    return (BitmapIter){self, bm_find(self, 0, 1)};
}

static int
bm_next(void *p, uint64_t *start, uint64_t *end)
{
    BitmapIter *it = p;
    if (it->s >= it->bm->guest_pages)
        return 0;
    *start = it->s;
    *end = bm_find(it->bm, it->s, 0);
    it->s = bm_find(it->bm, *end, 1);
    return 1;
}

static PyObject *
Bitmap_ranges(Bitmap *self, PyObject *Py_UNUSED(ignored))
{
    BitmapIter it = bm_iter(self);
    return ranges_list(&it, bm_next);
}

static Py_ssize_t
bm_count(const Bitmap *self)
{
    Py_ssize_t n = 0;
    uint64_t s, e;
    for (BitmapIter it = bm_iter(self); bm_next(&it, &s, &e);)
        n++;
    return n;
}

static PyObject *
Bitmap_range_count(Bitmap *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(bm_count(self));
}

static PyObject *
Bitmap_export(Bitmap *self, PyObject *obj)
{
    BitmapIter it = bm_iter(self);
    return export_records(obj, bm_count(self), &it, bm_next);
}

static PyObject *
Bitmap_shared_pages(Bitmap *self, PyObject *Py_UNUSED(ignored))
{
    unsigned long long n = 0;
    for (uint64_t i = 0; i < self->nwords; i++)
        n += (unsigned long long)__builtin_popcountll(self->words[i]);
    return PyLong_FromUnsignedLongLong(n);
}

/* Memory hotplug: the map grows to `pages` (new pages private), as the series' bitmap was
 * resized from the memslots; a smaller size is refused (memory only grows). */
static PyObject *
Bitmap_grow(Bitmap *self, PyObject *arg)
{
    uint64_t pages;
    if (!parse_grow(arg, self->guest_pages, &pages))
        return NULL;
    uint64_t nwords = (pages + 63) / 64;
    if (nwords > self->nwords) {
        uint64_t *words = PyMem_Realloc(self->words, (size_t)nwords * 8);
        if (!words)
            return PyErr_NoMemory();
        memset(&words[self->nwords], 0, (size_t)(nwords - self->nwords) * 8);
        self->words = words;
        self->nwords = nwords;
    }
    self->guest_pages = pages;
    Py_RETURN_NONE;
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
    {"grow", (PyCFunction)Bitmap_grow, METH_O, "grow(guest_pages): memory hotplug, new pages private"},
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

/* The short loops below stay loops: -O3 would turn them into memmove/memset calls,
 * which cost more than the loop for the few records DMA churn moves. */
#pragma GCC push_options
#pragma GCC optimize("no-tree-loop-distribute-patterns")

/* One record: the shared pages [start, end). Interleaved (not two arrays) so that inserting or
 * deleting a record is one move of 16-byte elements. */
typedef struct {
    uint64_t start, end;
} Range;

typedef struct {
    PyObject_HEAD
    Range *r;
    Py_ssize_t n, cap, max;
    Py_ssize_t finger; /* the index the last conversion found: where the next one usually lands */
    uint64_t guest_pages;
    int poisoned;
} Ranges;

/* Record k lies wholly before the answer of a search for `key`: its end < key (strict: <=). */
#define RG_BEFORE(r, k, key, strict) ((strict) ? (r)[k].end <= (key) : (r)[k].end < (key))

/* First index in [lo, hi) whose record is not RG_BEFORE, or hi. Branch-free (the comparison
 * compiles to a conditional move): on DMA churn the probes are unpredictable, and a mispredicted
 * branch per step cost more than the search. */
static inline Py_ssize_t
rg_bsearch(const Range *r, Py_ssize_t lo, Py_ssize_t hi, uint64_t key, int strict)
{
    Py_ssize_t len = hi - lo;
    if (len <= 0)
        return lo;
    const Range *base = r + lo;
    while (len > 1) {
        Py_ssize_t half = len / 2;
        base = RG_BEFORE(base, half - 1, key, strict) ? base + half : base;
        len -= half;
    }
    return (base - r) + RG_BEFORE(base, 0, key, strict);
}

/* The finger's window: the records [f - RG_WINDOW / 2, f + RG_WINDOW / 2) around the index the
 * previous conversion found. On DMA churn the answer is the finger itself half the time (a
 * buffer freed right after it was allocated) and inside the window 96 % of the time (the
 * benchmark's dma_churn at 64 GiB). */
#define RG_WINDOW 8

/* The first record with end >= key (strict: end > key), or n: the records in the finger's
 * window are counted branch-free (RG_BEFORE holds for a prefix of the sorted array, so the
 * count is the answer's offset into the window whenever the answer is inside it); otherwise a
 * binary search over the whole array. Counting eight records costs less than one mispredicted
 * branch of a walk whose length varies with every conversion. */
static inline Py_ssize_t
rg_find(const Ranges *self, uint64_t key, int strict)
{
    const Range *r = self->r;
    Py_ssize_t n = self->n;
    if (n >= RG_WINDOW) {
        Py_ssize_t lo = self->finger - RG_WINDOW / 2;
        lo = lo < 0 ? 0 : lo;
        lo = lo > n - RG_WINDOW ? n - RG_WINDOW : lo;
        const Range *w = r + lo;
        Py_ssize_t c = 0;
        for (int k = 0; k < RG_WINDOW; k++)
            c += RG_BEFORE(w, k, key, strict);
        /* Inside when some but not all are before it, or at an end of the array. */
        if ((c > 0 || lo == 0) && (c < RG_WINDOW || lo + RG_WINDOW == n))
            return lo + c;
    }
    return rg_bsearch(r, 0, n, key, strict);
}

/* First index in [lo, n) with start > key (strict) or start >= key, or n. */
static inline Py_ssize_t
rg_find_start(const Range *r, Py_ssize_t lo, Py_ssize_t n, uint64_t key, int strict)
{
    while (lo < n && (strict ? r[lo].start <= key : r[lo].start < key))
        lo++;
    return lo;
}

/* Move records [from, n) to start at index `to`. DMA churn moves a handful of records: a short
 * tail moves as one fixed block of RG_BLOCK records (loaded whole into registers, then stored:
 * no loop, no size dispatch, no mispredicted exit), which may carry stale records past n along
 * -- the array keeps RG_BLOCK + 1 spare records past its capacity for that; a long tail (a
 * hostile guest's list) goes to memmove. */
#define RG_BLOCK 8

static inline void
rg_shift(Range *r, Py_ssize_t to, Py_ssize_t from, Py_ssize_t n)
{
    if (n - from <= RG_BLOCK) {
#if defined(__SSE2__)
        /* Eight 16-byte registers: a memcpy through a local block was spilled to the stack
         * (and, inlined into some callers, became `rep movs`, slow to start for 128 bytes). */
        const __m128i *src = (const __m128i *)&r[from];
        __m128i *dst = (__m128i *)&r[to];
        __m128i b0 = _mm_loadu_si128(src), b1 = _mm_loadu_si128(src + 1), b2 = _mm_loadu_si128(src + 2),
                b3 = _mm_loadu_si128(src + 3), b4 = _mm_loadu_si128(src + 4), b5 = _mm_loadu_si128(src + 5),
                b6 = _mm_loadu_si128(src + 6), b7 = _mm_loadu_si128(src + 7);
        _mm_storeu_si128(dst, b0);
        _mm_storeu_si128(dst + 1, b1);
        _mm_storeu_si128(dst + 2, b2);
        _mm_storeu_si128(dst + 3, b3);
        _mm_storeu_si128(dst + 4, b4);
        _mm_storeu_si128(dst + 5, b5);
        _mm_storeu_si128(dst + 6, b6);
        _mm_storeu_si128(dst + 7, b7);
#else
        Range block[RG_BLOCK];
        memcpy(block, &r[from], sizeof block);
        memcpy(&r[to], block, sizeof block);
#endif
    } else {
        memmove(&r[to], &r[from], (size_t)(n - from) * sizeof(Range));
    }
}

/* Out of line: rare, and kept out of the single-page paths' registers. */
static __attribute__((noinline, cold)) int
rg_reserve(Ranges *self, Py_ssize_t need)
{
    Py_ssize_t cap = self->cap ? self->cap * 2 : 16;
    if (cap > self->max)
        cap = self->max;
    if (cap < need)
        cap = need;
    Range *r = PyMem_Realloc(self->r, (size_t)(cap + RG_BLOCK + 1) * sizeof(Range));
    if (!r) {
        PyErr_NoMemory();
        return -1;
    }
    memset(&r[self->cap], 0, (size_t)(cap - self->cap + RG_BLOCK + 1) * sizeof(Range));
    self->r = r;
    self->cap = cap;
    return 0;
}

/* Insert [a, b) at index i; 1 done, 0 poisoned (no room under the bound), -1 error. */
static inline int
rg_insert(Ranges *self, Py_ssize_t i, uint64_t a, uint64_t b)
{
    if (self->n >= self->max) {
        self->poisoned = 1;
        return 0;
    }
    if (self->n >= self->cap && rg_reserve(self, self->n + 1) < 0)
        return -1;
    rg_shift(self->r, i + 1, i, self->n);
    self->r[i] = (Range){a, b};
    self->n++;
    return 1;
}

/* Remove records [i, j). */
static inline void
rg_remove(Ranges *self, Py_ssize_t i, Py_ssize_t j)
{
    if (j <= i)
        return;
    rg_shift(self->r, i, j, self->n);
    self->n -= j - i;
}

/* set_shared of [gfn, end) spanning any number of pages; range i is the first with end >= gfn.
 * Out of line: DMA churn converts single pages, whose paths below stay small. */
static __attribute__((noinline)) int
rg_share_span(Ranges *self, Py_ssize_t i, uint64_t gfn, uint64_t end)
{
    Range *r = self->r;
    Py_ssize_t j = rg_find_start(r, i, self->n, end, 1); /* first start > end */
    if (i == j)
        return rg_insert(self, i, gfn, end) < 0 ? -1 : 0;
    if (r[i].start > gfn)
        r[i].start = gfn;
    uint64_t last = r[j - 1].end;
    r[i].end = last > end ? last : end;
    rg_remove(self, i + 1, j);
    return 0;
}

static inline int
rg_set_shared(Ranges *self, uint64_t gfn, uint64_t end)
{
    if (self->poisoned)
        return 0;
    Range *r = self->r;
    Py_ssize_t i = rg_find(self, gfn, 0); /* first end >= gfn: touches [gfn, end] or lies right */
    self->finger = i;
    if (end != gfn + 1)
        return rg_share_span(self, i, gfn, end);
    /* One page (DMA churn is almost all single pages): range i touches it or lies right of it,
     * so one search decides; only a page filling a one-page gap joins two records. */
    if (i < self->n && r[i].start <= gfn) {
        if (r[i].end == gfn) {
            if (i + 1 < self->n && r[i + 1].start == end) {
                r[i].end = r[i + 1].end;
                rg_remove(self, i + 1, i + 2);
            } else {
                r[i].end = end;
            }
        }
        return 0; /* (or already shared) */
    }
    if (i < self->n && r[i].start == end) {
        r[i].start = gfn;
        return 0;
    }
    return rg_insert(self, i, gfn, end) < 0 ? -1 : 0;
}

/* set_private of [gfn, end) in general; range i is the first with end > gfn. Out of line, as
 * rg_share_span. */
static __attribute__((noinline)) int
rg_unshare_span(Ranges *self, Py_ssize_t i, uint64_t gfn, uint64_t end)
{
    Range *r = self->r;
    Py_ssize_t j = rg_find_start(r, i, self->n, end, 0); /* first start >= end */
    if (i == j)
        return 0;
    uint64_t first = r[i].start, last = r[j - 1].end;
    if (first < gfn && last > end) {
        if (j - i == 1) {
            /* Punching a hole: the only way set_private grows the list. */
            if (self->n >= self->max) {
                self->poisoned = 1;
                return 0;
            }
            r[i].end = gfn;
            return rg_insert(self, i + 1, end, last) < 0 ? -1 : 0;
        }
        r[i].end = gfn;
        r[j - 1].start = end;
        rg_remove(self, i + 1, j - 1);
    } else if (first < gfn) {
        r[i].end = gfn;
        rg_remove(self, i + 1, j);
    } else if (last > end) {
        r[j - 1].start = end;
        rg_remove(self, i, j - 1);
    } else {
        rg_remove(self, i, j);
    }
    return 0;
}

static inline int
rg_set_private(Ranges *self, uint64_t gfn, uint64_t end)
{
    if (self->poisoned)
        return 0;
    Range *r = self->r;
    Py_ssize_t i = rg_find(self, gfn, 1); /* first end > gfn: the first that can overlap */
    self->finger = i;
    if (end != gfn + 1)
        return rg_unshare_span(self, i, gfn, end);
    /* One page: only range i can hold it. */
    if (i == self->n || r[i].start > gfn)
        return 0; /* already private */
    uint64_t s = r[i].start, e = r[i].end;
    if (s == gfn) {
        if (e == end)
            rg_remove(self, i, i + 1);
        else
            r[i].start = end;
        return 0;
    }
    if (e == end) {
        r[i].end = gfn;
        return 0;
    }
    return rg_unshare_span(self, i, gfn, end); /* punching a hole */
}

static int
rg_convert(PyObject *self, uint64_t gfn, uint64_t end, int shared)
{
    return shared ? rg_set_shared((Ranges *)self, gfn, end) : rg_set_private((Ranges *)self, gfn, end);
}

/* (guest_pages, max_ranges) of a bounded tracker, checked; 0 and an exception when bad. */
static int
parse_bounded(PyObject *args, PyObject *kwds, uint64_t *pages, Py_ssize_t *max, Py_ssize_t max_max)
{
    unsigned long long p;
    Py_ssize_t m;
    static char *kwlist[] = {"guest_pages", "max_ranges", NULL};
    /* Into locals: a refused (re-)__init__ leaves the object as it was. */
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Kn", kwlist, &p, &m))
        return 0;
    if (p < 1 || p > (1ULL << 52) || m < 1 || m > max_max) {
        PyErr_Format(PyExc_ValueError, "guest_pages must be in [1, 2**52] and max_ranges in [1, %zd]", max_max);
        return 0;
    }
    *pages = p;
    *max = m;
    return 1;
}

static int
Ranges_init(Ranges *self, PyObject *args, PyObject *kwds)
{
    if (!parse_bounded(args, kwds, &self->guest_pages, &self->max, PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(Range)))
        return -1;
    self->n = 0;
    self->finger = 0;
    self->poisoned = 0;
    return 0;
}

static void
Ranges_dealloc(Ranges *self)
{
    PyMem_Free(self->r);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

TRACKER_STORE_METHODS(Ranges, rg_convert)

static PyObject *
Ranges_is_shared(Ranges *self, PyObject *ogfn)
{
    uint64_t g;
    if (!parse_gfn(ogfn, self->guest_pages, &g))
        return NULL;
    Py_ssize_t i = rg_bsearch(self->r, 0, self->n, g, 1); /* first end > gfn */
    return PyBool_FromLong(i < self->n && self->r[i].start <= g);
}

typedef struct {
    const Ranges *rg;
    Py_ssize_t i;
} RangesIter;

static int
rg_next(void *p, uint64_t *start, uint64_t *end)
{
    RangesIter *it = p;
    if (it->i >= it->rg->n)
        return 0;
    *start = it->rg->r[it->i].start;
    *end = it->rg->r[it->i].end;
    it->i++;
    return 1;
}

static PyObject *
Ranges_ranges(Ranges *self, PyObject *Py_UNUSED(ignored))
{
    RangesIter it = {self, 0};
    return ranges_list(&it, rg_next);
}

static PyObject *
Ranges_range_count(Ranges *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(self->n);
}

static PyObject *
Ranges_export(Ranges *self, PyObject *obj)
{
    RangesIter it = {self, 0};
    return export_records(obj, self->n, &it, rg_next);
}

TRACKER_GROW_BOUND(Ranges)

static PyObject *
Ranges_clear(Ranges *self, PyObject *Py_UNUSED(ignored))
{
    self->n = 0;
    self->finger = 0;
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
    size_t spare = self->cap ? RG_BLOCK + 1 : 0; /* the fixed block's overhang (rg_shift) */
    return PyLong_FromSize_t(sizeof(Ranges) + ((size_t)self->cap + spare) * sizeof(Range));
}

static PyObject *
Ranges_bound(Ranges *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(sizeof(Ranges) + ((size_t)self->max + RG_BLOCK + 1) * sizeof(Range));
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
    {"grow", (PyCFunction)Ranges_grow, METH_O, "grow(guest_pages): memory hotplug, the records stay"},
    {"__sizeof__", (PyCFunction)Ranges_sizeof, METH_NOARGS, "bytes used, the array included"},
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
    .tp_doc = "Ranges(guest_pages, max_ranges): a sorted array of shared ranges, bounded and poisoned",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ranges_init,
    .tp_dealloc = (destructor)Ranges_dealloc,
    .tp_methods = Ranges_methods,
    .tp_getset = Ranges_getset,
};

#pragma GCC pop_options

/* ============================================================================================
 * Tree
 * ========================================================================================== */

/* One node: the shared pages [start, last] (closed, as the kernel's interval tree keeps them),
 * its AVL links and height, and `max`: the largest `last` in its subtree -- the augmentation
 * (the kernel's __subtree_last). Nodes live in one array and link by index (0 is "none"), so
 * the tree is a single allocation that grows by doubling up to max_ranges + 1 nodes, and freed
 * nodes go on a free list threaded through `left`. */
typedef struct {
    uint64_t start, last, max;
    uint32_t left, right;
    int32_t height;
} TNode;

typedef struct {
    PyObject_HEAD
    TNode *t;               /* t[0] is the "none" node: height 0, never read otherwise */
    uint32_t root, free, used, cap;
    Py_ssize_t count, max;
    uint64_t guest_pages;
    int poisoned;
} Tree;

/* Nodes are indexed by u32 and node 0 is "none". */
#define TREE_MAX_RANGES ((Py_ssize_t)0x7ffffffe)

static inline int32_t
tr_height(const Tree *self, uint32_t x)
{
    return x ? self->t[x].height : 0;
}

/* Recompute x's height and augmentation from its children (the kernel's ..._compute_max). */
static inline void
tr_update(Tree *self, uint32_t x)
{
    TNode *n = &self->t[x];
    int32_t hl = tr_height(self, n->left), hr = tr_height(self, n->right);
    n->height = 1 + (hl > hr ? hl : hr);
    uint64_t m = n->last;
    if (n->left && self->t[n->left].max > m)
        m = self->t[n->left].max;
    if (n->right && self->t[n->right].max > m)
        m = self->t[n->right].max;
    n->max = m;
}

static uint32_t
tr_rotate_right(Tree *self, uint32_t x)
{
    uint32_t l = self->t[x].left;
    self->t[x].left = self->t[l].right;
    self->t[l].right = x;
    tr_update(self, x);
    tr_update(self, l);
    return l;
}

static uint32_t
tr_rotate_left(Tree *self, uint32_t x)
{
    uint32_t r = self->t[x].right;
    self->t[x].right = self->t[r].left;
    self->t[r].left = x;
    tr_update(self, x);
    tr_update(self, r);
    return r;
}

/* Update x and restore the AVL balance at it; returns the subtree's new root. */
static uint32_t
tr_balance(Tree *self, uint32_t x)
{
    tr_update(self, x);
    TNode *n = &self->t[x];
    int32_t bf = tr_height(self, n->left) - tr_height(self, n->right);
    if (bf > 1) {
        uint32_t l = n->left;
        if (tr_height(self, self->t[l].left) < tr_height(self, self->t[l].right))
            self->t[x].left = tr_rotate_left(self, l);
        return tr_rotate_right(self, x);
    }
    if (bf < -1) {
        uint32_t r = n->right;
        if (tr_height(self, self->t[r].right) < tr_height(self, self->t[r].left))
            self->t[x].right = tr_rotate_right(self, r);
        return tr_rotate_left(self, x);
    }
    return x;
}

/* Insert node z into the subtree at x (keys are distinct starts); returns the new subtree root. */
static uint32_t
tr_insert_at(Tree *self, uint32_t x, uint32_t z)
{
    if (!x)
        return z;
    if (self->t[z].start < self->t[x].start)
        self->t[x].left = tr_insert_at(self, self->t[x].left, z);
    else
        self->t[x].right = tr_insert_at(self, self->t[x].right, z);
    return tr_balance(self, x);
}

/* Detach the leftmost node of the subtree at x into *min; returns the new subtree root. */
static uint32_t
tr_detach_min(Tree *self, uint32_t x, uint32_t *min)
{
    if (!self->t[x].left) {
        *min = x;
        return self->t[x].right;
    }
    self->t[x].left = tr_detach_min(self, self->t[x].left, min);
    return tr_balance(self, x);
}

/* Unlink the node whose start is `key` from the subtree at x and free it; returns the new root. */
static uint32_t
tr_delete_at(Tree *self, uint32_t x, uint64_t key)
{
    TNode *n = &self->t[x];
    if (key < n->start) {
        n->left = tr_delete_at(self, n->left, key);
        return tr_balance(self, x);
    }
    if (key > n->start) {
        n->right = tr_delete_at(self, n->right, key);
        return tr_balance(self, x);
    }
    uint32_t l = n->left, r = n->right, y;
    n->left = self->free; /* onto the free list */
    self->free = x;
    if (!r)
        return l;
    r = tr_detach_min(self, r, &y); /* the successor takes x's place: node identities stay */
    self->t[y].left = l;
    self->t[y].right = r;
    return tr_balance(self, y);
}

/* Recompute the augmentation on the path to the node whose start is `key`, after its `last`
 * changed in place (its start may have changed too, without passing a neighbour's). */
static void
tr_fix_path(Tree *self, uint32_t x, uint64_t key)
{
    if (!x)
        return;
    if (key < self->t[x].start)
        tr_fix_path(self, self->t[x].left, key);
    else if (key > self->t[x].start)
        tr_fix_path(self, self->t[x].right, key);
    tr_update(self, x);
}

/* The leftmost node overlapping [first, last], or 0: the kernel's interval-tree walk
 * (interval_tree_generic.h, ..._subtree_search), pruning every subtree whose `max` ends before
 * `first`. With the disjoint records kept here, a node's left subtree holds only records that
 * start before it, so the walk is one root-to-leaf path. */
static uint32_t
tr_first(const Tree *self, uint64_t first, uint64_t last)
{
    uint32_t x = self->root;
    if (!x || self->t[x].max < first)
        return 0;
    for (;;) {
        const TNode *n = &self->t[x];
        if (n->left && self->t[n->left].max >= first) {
            x = n->left; /* the leftmost candidate is in there, or nowhere */
            continue;
        }
        if (n->start <= last) {
            if (n->last >= first)
                return x;
            if (n->right && self->t[n->right].max >= first) {
                x = n->right;
                continue;
            }
        }
        return 0;
    }
}

static int
tr_reserve(Tree *self)
{
    if (self->free || self->used < self->cap)
        return 0;
    Py_ssize_t cap = self->cap ? (Py_ssize_t)self->cap * 2 : 16;
    if (cap > self->max + 1)
        cap = self->max + 1;
    TNode *t = PyMem_Realloc(self->t, (size_t)cap * sizeof(TNode));
    if (!t) {
        PyErr_NoMemory();
        return -1;
    }
    if (!self->t)
        memset(&t[0], 0, sizeof(TNode)); /* node 0: "none", height 0 */
    self->t = t;
    self->cap = (uint32_t)cap;
    return 0;
}

/* Add the record [start, last]; 1 done, 0 poisoned (no room under the bound), -1 error. */
static int
tr_add(Tree *self, uint64_t start, uint64_t last)
{
    if (self->count >= self->max) {
        self->poisoned = 1;
        return 0;
    }
    if (tr_reserve(self) < 0)
        return -1;
    uint32_t z;
    if (self->free) {
        z = self->free;
        self->free = self->t[z].left;
    } else {
        z = self->used++;
    }
    self->t[z] = (TNode){start, last, last, 0, 0, 1};
    self->root = tr_insert_at(self, self->root, z);
    self->count++;
    return 1;
}

static void
tr_drop(Tree *self, uint64_t start)
{
    self->root = tr_delete_at(self, self->root, start);
    self->count--;
}

static int
tr_set_shared(Tree *self, uint64_t gfn, uint64_t end)
{
    if (self->poisoned)
        return 0;
    /* Every record overlapping or touching [gfn, end) overlaps the closed [gfn - 1, end]. */
    uint64_t qfirst = gfn ? gfn - 1 : 0, last = end - 1;
    uint32_t a = tr_first(self, qfirst, end);
    if (!a)
        return tr_add(self, gfn, last) < 0 ? -1 : 0;
    /* a is the leftmost touching record: it absorbs the others, right of it, one by one. */
    uint64_t new_last = self->t[a].last > last ? self->t[a].last : last;
    uint32_t b;
    while ((b = tr_first(self, self->t[a].last + 1, end)) != 0) {
        if (self->t[b].last > new_last)
            new_last = self->t[b].last;
        tr_drop(self, self->t[b].start);
    }
    if (self->t[a].start > gfn)
        self->t[a].start = gfn; /* still right of the record before it, which ends before gfn - 1 */
    self->t[a].last = new_last;
    tr_fix_path(self, self->root, self->t[a].start);
    return 0;
}

static int
tr_set_private(Tree *self, uint64_t gfn, uint64_t end)
{
    if (self->poisoned)
        return 0;
    uint64_t last = end - 1;
    uint32_t a = tr_first(self, gfn, last);
    if (!a)
        return 0;
    TNode *n = &self->t[a];
    if (n->start < gfn) {
        uint64_t old_last = n->last;
        if (old_last > last) {
            /* Punching a hole: the only way set_private adds a record. */
            if (self->count >= self->max) {
                self->poisoned = 1;
                return 0;
            }
            n->last = gfn - 1;
            tr_fix_path(self, self->root, n->start);
            return tr_add(self, end, old_last) < 0 ? -1 : 0;
        }
        n->last = gfn - 1;
        tr_fix_path(self, self->root, n->start);
        a = tr_first(self, gfn, last);
    }
    /* The rest start inside [gfn, last]: drop them, trim the one that reaches past it. */
    for (; a; a = tr_first(self, gfn, last)) {
        n = &self->t[a];
        if (n->last > last) {
            n->start = end; /* max unchanged: its last did not move */
            break;
        }
        tr_drop(self, n->start);
    }
    return 0;
}

static int
tr_convert(PyObject *self, uint64_t gfn, uint64_t end, int shared)
{
    return shared ? tr_set_shared((Tree *)self, gfn, end) : tr_set_private((Tree *)self, gfn, end);
}

static int
Tree_init(Tree *self, PyObject *args, PyObject *kwds)
{
    if (!parse_bounded(args, kwds, &self->guest_pages, &self->max, TREE_MAX_RANGES))
        return -1;
    self->root = self->free = 0;
    self->used = 1;
    self->count = 0;
    self->poisoned = 0;
    return 0;
}

static void
Tree_dealloc(Tree *self)
{
    PyMem_Free(self->t);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

TRACKER_STORE_METHODS(Tree, tr_convert)

static PyObject *
Tree_is_shared(Tree *self, PyObject *ogfn)
{
    uint64_t g;
    if (!parse_gfn(ogfn, self->guest_pages, &g))
        return NULL;
    return PyBool_FromLong(tr_first(self, g, g) != 0);
}

/* In-order walk with an explicit stack (an AVL tree of < 2**32 nodes is < 46 levels high). */
typedef struct {
    const Tree *tr;
    uint32_t stack[64];
    int depth;
    uint32_t x;
} TreeIter;

static void
tr_iter_init(TreeIter *it, const Tree *self)
{
    it->tr = self;
    it->depth = 0;
    it->x = self->root;
}

static int
tr_next(void *p, uint64_t *start, uint64_t *end)
{
    TreeIter *it = p;
    const TNode *t = it->tr->t;
    while (it->x) {
        it->stack[it->depth++] = it->x;
        it->x = t[it->x].left;
    }
    if (!it->depth)
        return 0;
    uint32_t x = it->stack[--it->depth];
    *start = t[x].start;
    *end = t[x].last + 1;
    it->x = t[x].right;
    return 1;
}

static PyObject *
Tree_ranges(Tree *self, PyObject *Py_UNUSED(ignored))
{
    TreeIter it;
    tr_iter_init(&it, self);
    return ranges_list(&it, tr_next);
}

static PyObject *
Tree_range_count(Tree *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(self->count);
}

static PyObject *
Tree_export(Tree *self, PyObject *obj)
{
    TreeIter it;
    tr_iter_init(&it, self);
    return export_records(obj, self->count, &it, tr_next);
}

TRACKER_GROW_BOUND(Tree)

static PyObject *
Tree_clear(Tree *self, PyObject *Py_UNUSED(ignored))
{
    self->root = self->free = 0;
    self->used = 1;
    self->count = 0;
    self->poisoned = 0;
    Py_RETURN_NONE;
}

static PyObject *
Tree_get_poisoned(Tree *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->poisoned);
}

static PyObject *
Tree_get_height(Tree *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(tr_height(self, self->root));
}

/* Walk the subtree at x checking order, balance, heights and the augmentation; returns the
 * node count, or -1 with *what naming the first broken invariant. `lo` is the smallest start
 * the subtree may hold (the previous record's last + 2: disjoint and never adjacent). */
static Py_ssize_t
tr_check_at(const Tree *self, uint32_t x, uint64_t *lo, const char **what)
{
    if (!x)
        return 0;
    const TNode *n = &self->t[x];
    Py_ssize_t nl = tr_check_at(self, n->left, lo, what);
    if (nl < 0)
        return -1;
    if (n->start < *lo || n->last < n->start || n->last >= self->guest_pages) {
        *what = "records out of order, overlapping, touching or outside guest memory";
        return -1;
    }
    *lo = n->last + 2;
    Py_ssize_t nr = tr_check_at(self, n->right, lo, what);
    if (nr < 0)
        return -1;
    int32_t hl = tr_height(self, n->left), hr = tr_height(self, n->right);
    if (n->height != 1 + (hl > hr ? hl : hr) || hl - hr > 1 || hr - hl > 1) {
        *what = "AVL height or balance broken";
        return -1;
    }
    uint64_t m = n->last;
    if (n->left && self->t[n->left].max > m)
        m = self->t[n->left].max;
    if (n->right && self->t[n->right].max > m)
        m = self->t[n->right].max;
    if (n->max != m) {
        *what = "subtree max (the augmentation) is stale";
        return -1;
    }
    return nl + nr + 1;
}

static PyObject *
Tree_check(Tree *self, PyObject *Py_UNUSED(ignored))
{
    uint64_t lo = 0;
    const char *what = NULL;
    Py_ssize_t n = tr_check_at(self, self->root, &lo, &what);
    if (n >= 0 && n != self->count)
        what = "node count differs from the record count";
    if (n >= 0 && self->count > self->max)
        what = "more records than max_ranges";
    if (what) {
        PyErr_SetString(PyExc_AssertionError, what);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Tree_sizeof(Tree *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(sizeof(Tree) + (size_t)self->cap * sizeof(TNode));
}

static PyObject *
Tree_bound(Tree *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(sizeof(Tree) + (size_t)(self->max + 1) * sizeof(TNode));
}

static PyMethodDef Tree_methods[] = {
    {"set_shared", (PyCFunction)(void (*)(void))Tree_set_shared, METH_FASTCALL, "set_shared(gfn, npages)"},
    {"set_private", (PyCFunction)(void (*)(void))Tree_set_private, METH_FASTCALL, "set_private(gfn, npages)"},
    {"apply", (PyCFunction)Tree_apply, METH_O, "apply(seq) -> entries applied before the first invalid one"},
    {"is_shared", (PyCFunction)Tree_is_shared, METH_O, "is_shared(gfn) -> bool"},
    {"ranges", (PyCFunction)Tree_ranges, METH_NOARGS, "ranges() -> [(gfn, npages)]"},
    {"range_count", (PyCFunction)Tree_range_count, METH_NOARGS, "range_count() -> int"},
    {"export", (PyCFunction)Tree_export, METH_O, "export(buf) -> records needed (written iff all fit)"},
    {"clear", (PyCFunction)Tree_clear, METH_NOARGS, "clear(): no records, no poison"},
    {"grow", (PyCFunction)Tree_grow, METH_O, "grow(guest_pages): memory hotplug, the records stay"},
    {"check", (PyCFunction)Tree_check, METH_NOARGS, "check(): AssertionError naming a broken invariant"},
    {"__sizeof__", (PyCFunction)Tree_sizeof, METH_NOARGS, "bytes used, the node array included"},
    {"bound_bytes", (PyCFunction)Tree_bound, METH_NOARGS, "bytes used at max_ranges records"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Tree_getset[] = {
    {"poisoned", (getter)Tree_get_poisoned, NULL, "a conversion was dropped at the bound", NULL},
    {"height", (getter)Tree_get_height, NULL, "levels of the AVL tree (0 when empty)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TreeType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "testbed.tracker._native.Tree",
    .tp_basicsize = sizeof(Tree),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Tree(guest_pages, max_ranges): an augmented AVL interval tree of shared ranges, bounded and poisoned",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Tree_init,
    .tp_dealloc = (destructor)Tree_dealloc,
    .tp_methods = Tree_methods,
    .tp_getset = Tree_getset,
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_native", "The shared-page trackers in C (testbed/tracker/native.py wraps them).",
    -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    if (PyType_Ready(&BitmapType) < 0 || PyType_Ready(&RangesType) < 0 || PyType_Ready(&TreeType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    Py_INCREF(&BitmapType);
    Py_INCREF(&RangesType);
    Py_INCREF(&TreeType);
    if (PyModule_AddObject(m, "Bitmap", (PyObject *)&BitmapType) < 0 ||
        PyModule_AddObject(m, "Ranges", (PyObject *)&RangesType) < 0 ||
        PyModule_AddObject(m, "Tree", (PyObject *)&TreeType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
