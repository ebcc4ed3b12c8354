/*
 * _fastexit: the hardware model's hot exit path, in C.
 *
 * A hypercall exit costs two Python<->C crossings per register access through ctypes plus a
 * ctypes callback trampoline; on the testbed's machines those crossings, not the model's
 * logic, dominated an exit (docs/emulator-facts.md). This module removes them and nothing
 * else: it registers Unicorn's UC_HOOK_INSN_INVALID hook with a C callback that reads the
 * exit's register snapshot (the VMCB save area KVM reads) in one uc_reg_read_batch and calls
 * the Python hardware model with the values; and it offers one call to write RAX and RIP back
 * (write2), or RAX, RIP and RFLAGS (write3: PVALIDATE's result and CF), and one to read RFLAGS
 * (read3), which PVALIDATE alone needs: the snapshot stays what a hypercall exit reads.
 * Every decision stays in Python (testbed/hw/intercepts.py, `_on_invalid_exit`, which delivers every
 * exit through the one entry into the hypervisor).
 *
 * It does not link against libunicorn: the Python side passes the addresses of
 * uc_hook_add, uc_reg_read_batch and uc_reg_write_batch it got from ctypes. Optional: if it
 * cannot be built, cpu.py uses the same path through ctypes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>

typedef int (*reg_batch_fn)(void *uc, int *ids, void **vals, int count);
typedef int (*hook_add_fn)(void *uc, size_t *hh, int type, void *callback, void *user_data, uint64_t begin,
                           uint64_t end, ...);

#define UC_HOOK_INSN_INVALID (1 << 14)
#define NSNAP 8
#define NWRITE 3

typedef struct {
    PyObject_HEAD
    void *uc;
    reg_batch_fn read_batch;
    reg_batch_fn write_batch;
    int snap_ids[NSNAP];
    uint64_t snap[NSNAP];
    void *snap_ptrs[NSNAP];
    int cs_index;
    int wr_ids[NWRITE];
    uint64_t wr[NWRITE];
    void *wr_ptrs[NWRITE];
    PyObject *handler;
    size_t hook;
} FastExit;

static bool on_invalid(void *uc, void *user_data)
{
    FastExit *fe = (FastExit *)user_data;
    PyGILState_STATE gil = PyGILState_Ensure();
    bool resume = false;
    PyObject *args[NSNAP];
    int i;

    fe->snap[fe->cs_index] = 0; /* a segment register fills only the low bytes of its slot */
    /* After close() (or a GC clear) there is no handler: stop emulation, as an unhandled
     * invalid instruction does. */
    if (fe->handler != NULL && fe->read_batch(uc, fe->snap_ids, fe->snap_ptrs, NSNAP) == 0) {
        for (i = 0; i < NSNAP; i++)
            args[i] = PyLong_FromUnsignedLongLong(fe->snap[i]);
        PyObject *result = PyObject_Vectorcall(fe->handler, args, NSNAP, NULL);
        for (i = 0; i < NSNAP; i++)
            Py_XDECREF(args[i]);
        if (result != NULL) {
            resume = PyObject_IsTrue(result) == 1;
            Py_DECREF(result);
        } else {
            /* The Python handler records its own exceptions; anything escaping it is a bug
             * that must not unwind through Unicorn: stop emulation, print it. */
            PyErr_Print();
        }
    }
    PyGILState_Release(gil);
    return resume;
}

static int FastExit_init(FastExit *self, PyObject *args, PyObject *kwds)
{
    unsigned long long uc, hook_add, read_batch, write_batch;
    PyObject *ids, *wids, *handler;
    int cs_index;
    if (!PyArg_ParseTuple(args, "KKKKOiOO", &uc, &hook_add, &read_batch, &write_batch, &ids, &cs_index, &wids,
                          &handler))
        return -1;
    if (!PyCallable_Check(handler)) {
        PyErr_SetString(PyExc_TypeError, "handler must be callable");
        return -1;
    }
    if (!PySequence_Check(ids) || PySequence_Size(ids) != NSNAP || !PySequence_Check(wids) ||
        PySequence_Size(wids) != NWRITE || cs_index < 0 || cs_index >= NSNAP) {
        PyErr_SetString(PyExc_ValueError, "expected 8 snapshot register ids, the CS index and 3 write ids");
        return -1;
    }
    for (int i = 0; i < NSNAP; i++) {
        PyObject *item = PySequence_GetItem(ids, i);
        if (item == NULL)
            return -1;
        self->snap_ids[i] = (int)PyLong_AsLong(item);
        Py_DECREF(item);
        self->snap_ptrs[i] = &self->snap[i];
    }
    for (int i = 0; i < NWRITE; i++) {
        PyObject *item = PySequence_GetItem(wids, i);
        if (item == NULL)
            return -1;
        self->wr_ids[i] = (int)PyLong_AsLong(item);
        Py_DECREF(item);
        self->wr_ptrs[i] = &self->wr[i];
    }
    if (PyErr_Occurred())
        return -1;
    self->uc = (void *)(uintptr_t)uc;
    self->read_batch = (reg_batch_fn)(uintptr_t)read_batch;
    self->write_batch = (reg_batch_fn)(uintptr_t)write_batch;
    self->cs_index = cs_index;
    Py_INCREF(handler);
    Py_XSETREF(self->handler, handler);
    int err = ((hook_add_fn)(uintptr_t)hook_add)(self->uc, &self->hook, UC_HOOK_INSN_INVALID, (void *)on_invalid,
                                                 self, (uint64_t)1, (uint64_t)0);
    if (err != 0) {
        PyErr_Format(PyExc_RuntimeError, "uc_hook_add(UC_HOOK_INSN_INVALID) failed: %d", err);
        return -1;
    }
    return 0;
}

/* The first `n` write registers (RAX, RIP[, RFLAGS]) from args, in one uc_reg_write_batch. */
static PyObject *fastexit_write(FastExit *self, PyObject *const *args, Py_ssize_t nargs, int n, const char *usage)
{
    if (nargs != n) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    for (int i = 0; i < n; i++)
        self->wr[i] = PyLong_AsUnsignedLongLongMask(args[i]);
    if (PyErr_Occurred())
        return NULL;
    if (self->uc == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "FastExit write after close(): the emulator is released");
        return NULL;
    }
    if (self->write_batch(self->uc, self->wr_ids, self->wr_ptrs, n) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "uc_reg_write_batch failed");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* read3() -> the third write register (RFLAGS), in one uc_reg_read_batch. */
static PyObject *FastExit_read3(FastExit *self, PyObject *Py_UNUSED(ignored))
{
    uint64_t value = 0;
    void *ptr = &value;
    if (self->uc == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "FastExit read after close(): the emulator is released");
        return NULL;
    }
    if (self->read_batch(self->uc, &self->wr_ids[2], &ptr, 1) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "uc_reg_read_batch failed");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(value);
}

static PyObject *FastExit_write2(FastExit *self, PyObject *const *args, Py_ssize_t nargs)
{
    return fastexit_write(self, args, nargs, 2, "write2(rax, rip)");
}

static PyObject *FastExit_write3(FastExit *self, PyObject *const *args, Py_ssize_t nargs)
{
    return fastexit_write(self, args, nargs, 3, "write3(rax, rip, rflags)");
}

/*
 * The handler is a bound method of the vCPU, and the vCPU holds this object: a reference cycle.
 * The type takes part in garbage collection (tp_traverse/tp_clear) so that cycle is collected
 * when the machine is dropped without close(); close() breaks it explicitly.
 */
static int FastExit_traverse(FastExit *self, visitproc visit, void *arg)
{
    Py_VISIT(self->handler);
    return 0;
}

static int FastExit_clear(FastExit *self)
{
    Py_CLEAR(self->handler);
    return 0;
}

static void FastExit_dealloc(FastExit *self)
{
    /* The hook stays registered as long as the Uc lives; the vCPU keeps this object alive as
     * long as the Uc can run (it closes the Uc first), so user_data never dangles while
     * emulation can run. Garbage-collected together, neither can run again. */
    PyObject_GC_UnTrack(self);
    FastExit_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *FastExit_close(FastExit *self, PyObject *Py_UNUSED(ignored))
{
    /* Called after uc_close (which drops the hook): forget the engine and the handler. */
    self->uc = NULL;
    Py_CLEAR(self->handler);
    Py_RETURN_NONE;
}

static PyMethodDef FastExit_methods[] = {
    {"write2", (PyCFunction)(void (*)(void))FastExit_write2, METH_FASTCALL,
     "Write the first two registers given at construction (RAX, RIP) in one uc_reg_write_batch."},
    {"read3", (PyCFunction)FastExit_read3, METH_NOARGS,
     "Read the third register given at construction (RFLAGS) in one uc_reg_read_batch."},
    {"write3", (PyCFunction)(void (*)(void))FastExit_write3, METH_FASTCALL,
     "Write the three registers given at construction (RAX, RIP, RFLAGS) in one uc_reg_write_batch."},
    {"close", (PyCFunction)FastExit_close, METH_NOARGS,
     "Drop the handler and the engine pointer (after uc_close); idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FastExitType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "testbed.hw._fastexit.FastExit",
    .tp_basicsize = sizeof(FastExit),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "UC_HOOK_INSN_INVALID in C with a batched register snapshot, calling a Python handler.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FastExit_init,
    .tp_dealloc = (destructor)FastExit_dealloc,
    .tp_traverse = (traverseproc)FastExit_traverse,
    .tp_clear = (inquiry)FastExit_clear,
    .tp_free = PyObject_GC_Del,
    .tp_methods = FastExit_methods,
};

/*
 * The benchmark's ceiling (testbed/bench.py, owned there): an INSN_INVALID hook that only moves
 * RIP past the instruction, entirely in C, so `testbed bench` can measure what an exit costs
 * Unicorn itself with no Python at all. Not used by the hardware model.
 */
#define SKIP_HOOK_CAPSULE "testbed.hw._fastexit.SkipHook"

typedef struct {
    reg_batch_fn read_batch;
    reg_batch_fn write_batch;
    int rip_id;
    uint64_t length;
} SkipHook;

static bool on_invalid_skip(void *uc, void *user_data)
{
    SkipHook *s = (SkipHook *)user_data;
    uint64_t rip = 0;
    void *ptr = &rip;
    if (s->read_batch(uc, &s->rip_id, &ptr, 1) != 0)
        return false;
    rip += s->length;
    return s->write_batch(uc, &s->rip_id, &ptr, 1) == 0;
}

static void skip_hook_free(PyObject *capsule)
{
    PyMem_Free(PyCapsule_GetPointer(capsule, SKIP_HOOK_CAPSULE));
}

static PyObject *fastexit_skip_hook(PyObject *Py_UNUSED(module), PyObject *args)
{
    unsigned long long uc, hook_add, read_batch, write_batch, length;
    int rip_id;
    size_t hh;
    if (!PyArg_ParseTuple(args, "KKKKiK", &uc, &hook_add, &read_batch, &write_batch, &rip_id, &length))
        return NULL;
    SkipHook *s = PyMem_Malloc(sizeof(SkipHook));
    if (s == NULL)
        return PyErr_NoMemory();
    s->read_batch = (reg_batch_fn)(uintptr_t)read_batch;
    s->write_batch = (reg_batch_fn)(uintptr_t)write_batch;
    s->rip_id = rip_id;
    s->length = length;
    PyObject *capsule = PyCapsule_New(s, SKIP_HOOK_CAPSULE, skip_hook_free);
    if (capsule == NULL) {
        PyMem_Free(s);
        return NULL;
    }
    int err = ((hook_add_fn)(uintptr_t)hook_add)((void *)(uintptr_t)uc, &hh, UC_HOOK_INSN_INVALID,
                                                 (void *)on_invalid_skip, s, (uint64_t)1, (uint64_t)0);
    if (err != 0) {
        Py_DECREF(capsule);
        PyErr_Format(PyExc_RuntimeError, "uc_hook_add(UC_HOOK_INSN_INVALID) failed: %d", err);
        return NULL;
    }
    return capsule;
}

static PyMethodDef fastexit_functions[] = {
    {"skip_hook", fastexit_skip_hook, METH_VARARGS,
     "skip_hook(uc, hook_add, read_batch, write_batch, rip_id, length): the benchmark's C-only INSN_INVALID "
     "hook (RIP += length); keep the returned capsule alive as long as the engine runs."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastexit_module = {
    PyModuleDef_HEAD_INIT, "_fastexit", "The hardware model's hot exit path (see the file's comment).", -1,
    fastexit_functions,
};

PyMODINIT_FUNC PyInit__fastexit(void)
{
    if (PyType_Ready(&FastExitType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastexit_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FastExitType);
    if (PyModule_AddObject(m, "FastExit", (PyObject *)&FastExitType) < 0) {
        Py_DECREF(&FastExitType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
