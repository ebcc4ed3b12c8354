/*
 * _nativemmu: the page walk and the TLB fill of the hardware model, in C.
 *
 * A TLB fill through Python cost 25-35 us (a ctypes trampoline, a batched register read, the
 * walker's loop and the fill's bookkeeping), so a guest touching many pages ran at 1-1.5 % of
 * bare Unicorn. This module is the same arithmetic with no Python in the common case; every
 * decision that is not hardware arithmetic stays in Python. Optional, like _fastexit: when it
 * is not built (or TESTBED_NO_NATIVE_MMU is set) the binding registers the Python fill hook.
 * It does not link against libunicorn: the Python side passes uc_hook_add and
 * uc_reg_read_batch as addresses it got from ctypes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

typedef int (*reg_batch_fn)(void *uc, int *ids, void **vals, int count);
typedef int (*hook_add_fn)(void *uc, size_t *hh, int type, void *callback, void *user_data, uint64_t begin,
                           uint64_t end, ...);
/* ================================================================================================
 * The page walk and the TLB fill in C (NativeMmu), with the Python walker as reference model.
 *
 * `walk_core` is testbed/x86/paging.py `walk` line for line: 4 levels, PS at levels 3 and 2,
 * reserved bits (51:MAXPHYADDR, the large-page address bits below the page size except PAT,
 * PS in a PML4E, NX without EFER.NXE), U/S, R/W with CR0.WP, NX, and the encryption bit
 * (the SEV C-bit, set = private, or the TDX shared bit, set = shared) stripped from every
 * address. tests/test_mmu_native.py proves the two equal on random page tables.
 *
 * The fill hook (`on_tlb_fill`) does the whole fill of testbed/hw/mmu.py `_tlb_fill` for the
 * common case without the GIL: the walk reads entries from the backing the Python walker
 * would (plain buffer; legacy SEV: the private alias when the frame is owned private;
 * guest_memfd: the backing the GFN's attribute selects, read from KVM's attribute array),
 * then the stage-2 and RMP checks, W^X for code frames and the alias selection. Every other
 * case - any fault, a frame that would need transcoding (an ownership move), a code frame not
 * yet scanned for intercepted instructions, a non-canonical address, a pending fault - goes to
 * the Python `_tlb_fill`, which decides as before. Nothing here is a KVM decision: the stage-2
 * attribute array is KVM's, read as the hardware reads its NPT.
 * ============================================================================================== */

#define PTE_P (1ULL << 0)
#define PTE_RW (1ULL << 1)
#define PTE_US (1ULL << 2)
#define PTE_PS (1ULL << 7)
#define PTE_NX (1ULL << 63)
#define PFERR_PRESENT 1
#define PFERR_WRITE 2
#define PFERR_USER 4
#define PFERR_RSVD 8
#define PFERR_FETCH 16
#define ACCESS_READ 0
#define ACCESS_WRITE 1
#define ACCESS_FETCH 2
#define CR0_WP (1ULL << 16)
#define PROT_READ 1
#define PROT_WRITE 2
#define PROT_EXEC 4
#define UC_MEM_READ 16
#define UC_MEM_WRITE 17
#define UC_MEM_FETCH 18
#define UC_HOOK_TLB_FILL (1 << 17)

enum { MODEL_PLAIN = 0, MODEL_LEGACY = 1, MODEL_GMEM = 2 };
enum { WALK_OK = 0, WALK_PF = 1, WALK_NPF_TABLE = 2, WALK_PYTHON = 3 };

typedef struct {
    const uint8_t *dram;    /* plain / DRAM alias / shared backing */
    const uint8_t *priv;    /* private alias / guest_memfd backing (NULL: none) */
    uint64_t size;          /* guest memory size in bytes */
    int model;              /* MODEL_* */
    const uint8_t *owner;   /* legacy: 1 = the frame is owned by the private alias */
    const uint8_t *attrs;   /* KVM's attribute array (1 = private), NULL: all shared / unknown */
    int attrs_unknown;      /* a stage 2 exists but its array is not readable: ask Python */
    uint64_t addr_mask, rsvd_mask, enc_mask;
    int enc_means_private;
    const uint8_t *validated; /* SNP: a table in a frame not validated is Python's (#VC 0x404) */
} WalkMem;

typedef struct {
    int kind;
    uint64_t gpa, error_code, table_gpa;
    int writable, user, executable, encrypted;
} WalkOut;

static void masks_for(int phys_bits, uint64_t enc_mask, uint64_t *addr_mask, uint64_t *rsvd_mask)
{
    uint64_t phys = phys_bits >= 64 ? ~0ULL : ((1ULL << phys_bits) - 1);
    *addr_mask = phys & ~0xFFFULL & ~enc_mask;
    *rsvd_mask = (((1ULL << 52) - 1) & ~phys) & ~enc_mask;
}

/* One entry as the CPU's walk reads it: 0 read, 1 outside guest memory, 2 needs Python. */
static int read_entry(const WalkMem *m, uint64_t gpa, uint64_t *out)
{
    const uint8_t *buf;
    if (gpa > m->size || m->size - gpa < 8)
        return 1;
    uint64_t frame = gpa >> 12;
    switch (m->model) {
    case MODEL_PLAIN:
        buf = m->dram;
        break;
    case MODEL_LEGACY: /* the walk is a private access: plaintext only if the frame is private */
        if (!m->owner[frame])
            return 2;
        buf = m->priv;
        break;
    default: /* guest_memfd: the backing the GFN's attribute selects */
        if (m->attrs_unknown)
            return 2;
        if (m->validated != NULL && !m->validated[frame])
            return 2; /* SNP: a page-table access to a page not validated is a #VC */
        buf = (m->attrs != NULL && m->attrs[frame]) ? m->priv : m->dram;
        break;
    }
    memcpy(out, buf + gpa, 8);
    return 0;
}

static void walk_core(const WalkMem *m, uint64_t cr3, uint64_t va, int access, int user, int wp, int nxe,
                      WalkOut *o)
{
    uint64_t err_base = (access == ACCESS_WRITE ? PFERR_WRITE : 0) | (user ? PFERR_USER : 0);
    if (access == ACCESS_FETCH && nxe)
        err_base |= PFERR_FETCH;
    uint64_t table = cr3 & m->addr_mask, entry = 0;
    int writable = 1, usr = 1, nx = 0, level = 4, shift;
    memset(o, 0, sizeof(*o));
    for (;;) {
        shift = 12 + 9 * (level - 1);
        uint64_t entry_gpa = table + ((va >> shift) & 0x1FF) * 8;
        int r = read_entry(m, entry_gpa, &entry);
        if (r == 1) {
            o->kind = WALK_NPF_TABLE;
            o->error_code = err_base;
            o->table_gpa = entry_gpa;
            return;
        }
        if (r == 2) {
            o->kind = WALK_PYTHON;
            return;
        }
        if (!(entry & PTE_P)) {
            o->kind = WALK_PF;
            o->error_code = err_base;
            return;
        }
        int leaf = level == 1 || ((level == 2 || level == 3) && (entry & PTE_PS));
        uint64_t bad = entry & m->rsvd_mask;
        if (leaf && level > 1)
            bad |= entry & (((1ULL << shift) - 1) & ~0x1FFFULL) & m->addr_mask;
        if (level == 4 && (entry & PTE_PS))
            bad |= PTE_PS;
        if (!nxe && (entry & PTE_NX))
            bad |= PTE_NX;
        if (bad) {
            o->kind = WALK_PF;
            o->error_code = err_base | PFERR_PRESENT | PFERR_RSVD;
            return;
        }
        writable &= (entry & PTE_RW) != 0;
        usr &= (entry & PTE_US) != 0;
        nx |= (entry & PTE_NX) != 0 && nxe;
        if (leaf)
            break;
        table = entry & m->addr_mask;
        level--;
    }
    if ((user && !usr) || (access == ACCESS_WRITE && !writable && (user || wp)) || (access == ACCESS_FETCH && nx)) {
        o->kind = WALK_PF;
        o->error_code = err_base | PFERR_PRESENT;
        return;
    }
    uint64_t low = (1ULL << shift) - 1;
    o->kind = WALK_OK;
    o->gpa = (entry & m->addr_mask & ~low) | (va & low & ~0xFFFULL);
    o->writable = writable || (!user && !wp);
    o->user = usr;
    o->executable = !nx;
    int enc_bit = m->enc_mask != 0 && (entry & m->enc_mask) != 0;
    o->encrypted = m->enc_means_private ? enc_bit : (!enc_bit && m->enc_mask != 0);
}

static PyObject *walk_result(const WalkOut *o)
{
    switch (o->kind) {
    case WALK_OK:
        return Py_BuildValue("(iKOOOO)", 0, (unsigned long long)o->gpa, o->writable ? Py_True : Py_False,
                             o->user ? Py_True : Py_False, o->executable ? Py_True : Py_False,
                             o->encrypted ? Py_True : Py_False);
    case WALK_PF:
        return Py_BuildValue("(iKO)", 1, (unsigned long long)o->error_code, Py_None);
    case WALK_NPF_TABLE:
        return Py_BuildValue("(iKK)", 1, (unsigned long long)o->error_code, (unsigned long long)o->table_gpa);
    default:
        Py_RETURN_NONE;
    }
}

/* walk(memory, cr3, va, access, user, phys_bits, enc_mask, enc_means_private, wp, nxe): the walk
 * over one plain buffer (guest memory = the buffer), for the reference-model test. */
static PyObject *nativemmu_walk(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer mem;
    unsigned long long cr3, va, enc_mask;
    int access, user, phys_bits, enc_private, wp, nxe;
    if (!PyArg_ParseTuple(args, "y*KKipiKppp", &mem, &cr3, &va, &access, &user, &phys_bits, &enc_mask, &enc_private,
                          &wp, &nxe))
        return NULL;
    if (phys_bits < 12 || phys_bits > 52 || access < ACCESS_READ || access > ACCESS_FETCH) {
        PyBuffer_Release(&mem);
        PyErr_SetString(PyExc_ValueError, "walk: phys_bits must be in 12..52 and access one of ACCESS_*");
        return NULL;
    }
    WalkMem m = {.dram = mem.buf, .size = (uint64_t)mem.len, .model = MODEL_PLAIN, .enc_mask = enc_mask,
                 .enc_means_private = enc_private};
    masks_for(phys_bits, enc_mask, &m.addr_mask, &m.rsvd_mask);
    WalkOut o;
    walk_core(&m, cr3, va, access, user, wp, nxe, &o);
    PyBuffer_Release(&mem);
    return walk_result(&o);
}

#define XLAT_BITS 12
#define XLAT_N (1 << XLAT_BITS)
#define NREGS 3
#define MSR_EFER 0xC0000080u
#define EFER_NXE (1ull << 11)

/* Unicorn's uc_x86_msr: what UC_X86_REG_MSR reads (rid in, value out) */
typedef struct {
    uint32_t rid;
    uint64_t value;
} UcMsr;
#define NBUFS 7

typedef struct {
    uint64_t paddr;
    uint32_t perms;
} TlbEntry;

typedef struct {
    PyObject_HEAD
    void *uc;
    reg_batch_fn read_batch;
    int reg_ids[NREGS + 1]; /* CS, CR3, CR0, then UC_X86_REG_MSR for EFER */
    uint64_t regs[NREGS];
    UcMsr efer; /* uc_x86_msr: EFER, read in the same batch (NXE) */
    void *reg_ptrs[NREGS + 1];
    PyObject *fallback; /* the Python fill: (vaddr, access) -> (upa, perms) | None */
    size_t hook;
    int configured;
    int python_only;    /* a pending fault or a quiesced vCPU: every fill is Python's */
    WalkMem mem;
    uint8_t *exec_bits, *scanned_bits; /* one byte per frame, shared with the Python MMU */
    const uint8_t *validated;          /* SNP: the RMP's Validated bit per frame */
    const uint8_t *present;            /* guest_memfd: PRESENT_* bits per frame (hw/memory.py), NULL: none */
    const uint64_t *scan_vas;          /* per frame: the guest-virtual page it was scanned at, | 1 (0: none) */
    uint8_t *dirty;                    /* KVM's dirty bitmap (bit per frame, LSB first) while logging, else NULL */
    uint64_t dirty_frames;             /* frames the dirty bitmap covers */
    Py_buffer dirty_buf;
    int has_dirty_buf;
    unsigned long long dirty_faults;   /* write-protection faults taken here (the page's bit set) */
    int snp, stage2, legacy_stage2;
    uint64_t alias_base;
    unsigned long long fills;          /* fills completed here (the Python ones count there) */
    Py_buffer bufs[NBUFS];
    int nbufs;
    uint64_t xlat_tag[XLAT_N]; /* guest-virtual page + 1 -> unicorn-physical page of the fill */
    uint64_t xlat_upa[XLAT_N];
} NativeMmu;

static void nm_release_dirty(NativeMmu *self)
{
    if (self->has_dirty_buf)
        PyBuffer_Release(&self->dirty_buf);
    self->has_dirty_buf = 0;
    self->dirty = NULL;
    self->dirty_frames = 0;
}

static void nm_release_buffers(NativeMmu *self)
{
    nm_release_dirty(self);
    for (int i = 0; i < self->nbufs; i++)
        PyBuffer_Release(&self->bufs[i]);
    self->nbufs = 0;
    self->configured = 0;
    memset(&self->mem, 0, sizeof(self->mem));
    self->exec_bits = self->scanned_bits = NULL;
    self->validated = NULL;
    self->present = NULL;
    self->scan_vas = NULL;
}

static inline void xlat_record(NativeMmu *self, uint64_t vpage, uint64_t upa)
{
    unsigned i = (unsigned)(vpage & (XLAT_N - 1));
    self->xlat_tag[i] = vpage + 1;
    self->xlat_upa[i] = upa;
}

static int fill_with_regs(NativeMmu *self, uint64_t vaddr, int access, uint64_t cs, uint64_t cr3, uint64_t cr0,
                          uint64_t efer, TlbEntry *entry);

/* The common-case fill; 0 = done (entry set), 1 = ask Python. No Python object is touched. */
static int fast_fill(NativeMmu *self, void *uc, uint64_t vaddr, int access, TlbEntry *entry)
{
    if (self->python_only || !self->configured)
        return 1;
    if ((uint64_t)(((int64_t)(vaddr << 16)) >> 16) != vaddr)
        return 1; /* non-canonical: #GP, Python's */
    self->regs[0] = 0; /* CS fills only the low bytes of its slot */
    if (self->read_batch(uc, self->reg_ids, self->reg_ptrs, NREGS + 1) != 0)
        return 1;
    return fill_with_regs(self, vaddr, access, self->regs[0], self->regs[1], self->regs[2], self->efer.value,
                          entry);
}

/* The fill after the register read (also reached from Python by `fill`, for the tests). */
static int fill_with_regs(NativeMmu *self, uint64_t vaddr, int access, uint64_t cs, uint64_t cr3, uint64_t cr0,
                          uint64_t efer, TlbEntry *entry)
{
    int user = (cs & 3) == 3;
    WalkOut o;
    walk_core(&self->mem, cr3, vaddr, access, user, (cr0 & CR0_WP) != 0, (efer & EFER_NXE) != 0, &o);
    if (o.kind != WALK_OK)
        return 1;
    const WalkMem *m = &self->mem;
    uint64_t gpa = o.gpa;
    if (gpa >= m->size)
        return 1;
    uint64_t frame = gpa >> 12;
    int frame_private = m->attrs != NULL && m->attrs[frame];
    if (self->stage2 && (m->model == MODEL_LEGACY || self->snp)) {
        if (m->attrs_unknown)
            return 1;
        int access_private = o.encrypted || access == ACCESS_FETCH;
        if (frame_private != access_private)
            return 1; /* a nested page fault */
        if (self->snp && access_private && (self->validated == NULL || !self->validated[frame]))
            return 1; /* #VC PAGE_NOT_VALIDATED (or no RMP array to read) */
    }
    int legacy_private = m->model == MODEL_LEGACY && (access == ACCESS_FETCH || o.encrypted);
    if (m->model == MODEL_LEGACY && m->owner[frame] != (legacy_private ? 1 : 0))
        return 1; /* the access moves the frame's ownership: transcoding is Python's */
    if (m->model == MODEL_GMEM && self->stage2 && m->attrs_unknown)
        return 1;
    if (m->model == MODEL_GMEM && self->present != NULL &&
        !(self->present[frame] & ((self->stage2 && frame_private) ? 2 : 1)))
        return 1; /* the first fault on the backing page: Python allocates and counts it */
    /* The frame's sites are hooked, and at this guest-virtual page (hooks are per address). */
    int hooked_here = self->scanned_bits[frame] &&
                      (self->scan_vas == NULL || self->scan_vas[frame] == ((vaddr & ~(uint64_t)0xFFF) | 1));
    if (access == ACCESS_FETCH) {
        if (!hooked_here)
            return 1; /* not scanned, or through another address: Python scans and hooks it first */
        if (!self->exec_bits[frame])
            return 1; /* it becomes code: Python flushes the TLB (W^X for writable entries elsewhere) */
    } else if (access == ACCESS_WRITE && self->exec_bits[frame]) {
        return 1; /* W^X takes execute away from code: Python, which also flushes its other addresses */
    }
    int code_frame = self->exec_bits[frame] != 0;
    uint32_t perms = PROT_READ;
    if (o.writable && !code_frame)
        perms |= PROT_WRITE;
    /* Execute only where the frame's sites are hooked: a read fill through an alias of a code
     * frame scanned elsewhere must not hand that alias an executable entry, which a later fetch
     * there would use without a fill (and so without a scan there); nor one to a frame not
     * recorded as scanned (watched or rewritten: fetched, and rescanned, first). */
    int exec_ok = o.executable && code_frame && hooked_here;
    if (self->dirty != NULL && (perms & PROT_WRITE) && frame < self->dirty_frames) {
        /* Dirty logging (kvm/dirty_log.py): a clean page is write-protected in stage 2. A read
         * maps it read-only; a store takes KVM's write fault, which sets the page's bit and
         * makes it writable (mmu.c fast_page_fault -> mark_page_dirty). */
        uint8_t bit = (uint8_t)(1u << (frame & 7));
        if (!(self->dirty[frame >> 3] & bit)) {
            if (access == ACCESS_WRITE) {
                self->dirty[frame >> 3] |= bit;
                self->dirty_faults++;
            } else {
                perms &= ~(uint32_t)PROT_WRITE;
            }
        }
    }
    uint64_t upa;
    if (m->model == MODEL_GMEM) {
        if (exec_ok)
            perms |= PROT_EXEC;
        upa = (self->stage2 && frame_private) ? self->alias_base + gpa : gpa;
    } else if (m->model == MODEL_PLAIN) {
        if (exec_ok)
            perms |= PROT_EXEC;
        upa = gpa;
    } else if (legacy_private) {
        upa = self->alias_base + gpa;
        if (o.encrypted) {
            if (exec_ok)
                perms |= PROT_EXEC;
        } else {
            perms = PROT_EXEC; /* data accesses through this C=0 mapping use DRAM */
        }
    } else {
        upa = gpa;
    }
    xlat_record(self, vaddr >> 12, upa);
    self->fills++;
    entry->paddr = upa;
    entry->perms = perms;
    return 0;
}

static bool on_tlb_fill(void *uc, uint64_t vaddr, int uc_access, TlbEntry *entry, void *user_data)
{
    NativeMmu *self = (NativeMmu *)user_data;
    int access = uc_access == UC_MEM_WRITE ? ACCESS_WRITE : uc_access == UC_MEM_FETCH ? ACCESS_FETCH : ACCESS_READ;
    if (fast_fill(self, uc, vaddr, access, entry) == 0)
        return true;
    bool ok = false;
    PyGILState_STATE gil = PyGILState_Ensure();
    if (self->fallback != NULL) {
        PyObject *result = PyObject_CallFunction(self->fallback, "Ki", (unsigned long long)vaddr, access);
        if (result == NULL) {
            PyErr_Print(); /* the fallback is guarded: anything escaping it is a bug */
        } else if (result != Py_None) {
            unsigned long long upa;
            unsigned int perms;
            if (PyArg_ParseTuple(result, "KI", &upa, &perms)) {
                entry->paddr = upa;
                entry->perms = perms;
                ok = true;
            } else {
                PyErr_Print();
            }
        }
        Py_XDECREF(result);
    }
    PyGILState_Release(gil);
    return ok;
}

static int NativeMmu_init(NativeMmu *self, PyObject *args, PyObject *kwds)
{
    unsigned long long uc, hook_add, read_batch;
    PyObject *ids, *fallback;
    if (!PyArg_ParseTuple(args, "KKKOO", &uc, &hook_add, &read_batch, &ids, &fallback))
        return -1;
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "NativeMmu: the fallback fill must be callable");
        return -1;
    }
    if (!PySequence_Check(ids) || PySequence_Size(ids) != NREGS + 1) {
        PyErr_SetString(PyExc_ValueError, "NativeMmu: expected the register ids of CS, CR3, CR0 and MSR");
        return -1;
    }
    for (int i = 0; i <= NREGS; i++) {
        PyObject *item = PySequence_GetItem(ids, i);
        if (item == NULL)
            return -1;
        self->reg_ids[i] = (int)PyLong_AsLong(item);
        Py_DECREF(item);
        self->reg_ptrs[i] = i < NREGS ? (void *)&self->regs[i] : (void *)&self->efer;
    }
    self->efer.rid = MSR_EFER;
    if (PyErr_Occurred())
        return -1;
    self->uc = (void *)(uintptr_t)uc;
    self->read_batch = (reg_batch_fn)(uintptr_t)read_batch;
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    if (self->uc != NULL) {
        int err = ((hook_add_fn)(uintptr_t)hook_add)(self->uc, &self->hook, UC_HOOK_TLB_FILL, (void *)on_tlb_fill,
                                                     self, (uint64_t)1, (uint64_t)0);
        if (err != 0) {
            PyErr_Format(PyExc_RuntimeError, "uc_hook_add(UC_HOOK_TLB_FILL) failed: %d", err);
            return -1;
        }
    }
    return 0;
}

/* Take a buffer of at least `need` bytes (writable if asked); NULL and no error for None. */
static int nm_buffer(NativeMmu *self, PyObject *obj, Py_ssize_t need, int writable, const char *what,
                     uint8_t **out)
{
    *out = NULL;
    if (obj == Py_None)
        return 0;
    Py_buffer *view = &self->bufs[self->nbufs];
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    self->nbufs++;
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "NativeMmu: %s has %zd bytes, the guest needs %zd", what,
                     view->len, need);
        return -1;
    }
    *out = view->buf;
    return 0;
}

static PyObject *NativeMmu_configure(NativeMmu *self, PyObject *args)
{
    unsigned long long dram, priv, size, enc_mask, alias_base;
    int model, phys_bits, enc_private, snp, stage2;
    PyObject *owner, *attrs, *validated, *exec_bits, *scanned_bits;
    if (!PyArg_ParseTuple(args, "KKKiOOOOOiKpppK", &dram, &priv, &size, &model, &owner, &attrs, &validated,
                          &exec_bits, &scanned_bits, &phys_bits, &enc_mask, &enc_private, &snp, &stage2, &alias_base))
        return NULL;
    nm_release_buffers(self);
    Py_ssize_t nframes = (Py_ssize_t)(size >> 12);
    uint8_t *p_owner, *p_attrs, *p_valid, *p_exec, *p_scan;
    if (model < MODEL_PLAIN || model > MODEL_GMEM || phys_bits < 12 || phys_bits > 52 || dram == 0 ||
        (model != MODEL_PLAIN && priv == 0) || size == 0 || (size & 0xFFF)) {
        PyErr_SetString(PyExc_ValueError, "NativeMmu.configure: bad memory model, size or address width");
        return NULL;
    }
    if (nm_buffer(self, owner, nframes, 0, "the owner array", &p_owner) < 0 ||
        nm_buffer(self, attrs, nframes, 0, "the attribute array", &p_attrs) < 0 ||
        nm_buffer(self, validated, nframes, 0, "the RMP's validated array", &p_valid) < 0 ||
        nm_buffer(self, exec_bits, nframes, 1, "the code-frame array", &p_exec) < 0 ||
        nm_buffer(self, scanned_bits, nframes, 1, "the scanned-frame array", &p_scan) < 0) {
        nm_release_buffers(self);
        return NULL;
    }
    if (p_exec == NULL || p_scan == NULL || (model == MODEL_LEGACY && p_owner == NULL)) {
        nm_release_buffers(self);
        PyErr_SetString(PyExc_ValueError, "NativeMmu.configure: the frame arrays (and a legacy owner array) are required");
        return NULL;
    }
    WalkMem *m = &self->mem;
    m->dram = (const uint8_t *)(uintptr_t)dram;
    m->priv = (const uint8_t *)(uintptr_t)priv;
    m->size = size;
    m->model = model;
    m->owner = p_owner;
    m->attrs = p_attrs;
    m->attrs_unknown = stage2 && p_attrs == NULL;
    m->enc_mask = enc_mask;
    m->enc_means_private = enc_private;
    masks_for(phys_bits, enc_mask, &m->addr_mask, &m->rsvd_mask);
    self->validated = p_valid;
    m->validated = snp ? p_valid : NULL;
    self->exec_bits = p_exec;
    self->scanned_bits = p_scan;
    self->snp = snp;
    self->stage2 = stage2;
    self->alias_base = alias_base;
    memset(self->xlat_tag, 0, sizeof(self->xlat_tag));
    self->configured = 1;
    Py_RETURN_NONE;
}

static PyObject *NativeMmu_set_python_only(NativeMmu *self, PyObject *arg)
{
    int v = PyObject_IsTrue(arg);
    if (v < 0)
        return NULL;
    self->python_only = v;
    Py_RETURN_NONE;
}

/* After configure (which releases them): one more per-frame buffer, `need` bytes, for `method`. */
static int nm_late_buffer(NativeMmu *self, PyObject *arg, Py_ssize_t need, const char *method, const char *what,
                          uint8_t **out)
{
    *out = NULL;
    if (!self->configured) {
        PyErr_Format(PyExc_ValueError, "NativeMmu.%s: configure first", method);
        return -1;
    }
    if (self->nbufs >= NBUFS) {
        PyErr_Format(PyExc_ValueError, "NativeMmu.%s: no buffer slot left", method);
        return -1;
    }
    return nm_buffer(self, arg, need, 0, what, out);
}

static PyObject *NativeMmu_set_present(NativeMmu *self, PyObject *arg)
{
    /* The guest_memfd present bytes, or None. */
    uint8_t *p;
    if (nm_late_buffer(self, arg, (Py_ssize_t)(self->mem.size >> 12), "set_present", "the present array", &p) < 0)
        return NULL;
    self->present = p;
    Py_RETURN_NONE;
}

static PyObject *NativeMmu_set_scan_vas(NativeMmu *self, PyObject *arg)
{
    /* Per frame, the guest-virtual page its sites were hooked at, | 1 (uint64 per frame), or
     * None. A fetch through another page is Python's. */
    uint8_t *p;
    if (nm_late_buffer(self, arg, (Py_ssize_t)(self->mem.size >> 12) * 8, "set_scan_vas", "the scan-address array",
                       &p) < 0)
        return NULL;
    self->scan_vas = (const uint64_t *)p;
    Py_RETURN_NONE;
}

static PyObject *NativeMmu_set_dirty_log(NativeMmu *self, PyObject *arg)
{
    /* After configure (which releases it): KVM's dirty bitmap (writable, a bit per frame), or
     * None when dirty logging is off. */
    if (!self->configured) {
        PyErr_SetString(PyExc_ValueError, "NativeMmu.set_dirty_log: configure first");
        return NULL;
    }
    nm_release_dirty(self);
    if (arg == Py_None)
        Py_RETURN_NONE;
    if (PyObject_GetBuffer(arg, &self->dirty_buf, PyBUF_WRITABLE) < 0)
        return NULL;
    self->has_dirty_buf = 1;
    uint64_t frames = self->mem.size >> 12;
    if ((uint64_t)self->dirty_buf.len * 8 < frames) {
        nm_release_dirty(self);
        PyErr_Format(PyExc_ValueError, "NativeMmu.set_dirty_log: a bitmap of %zd bytes cannot cover %llu frames",
                     self->dirty_buf.len, (unsigned long long)frames);
        return NULL;
    }
    self->dirty = self->dirty_buf.buf;
    self->dirty_frames = frames;
    Py_RETURN_NONE;
}

static PyObject *NativeMmu_flush(NativeMmu *self, PyObject *Py_UNUSED(ignored))
{
    memset(self->xlat_tag, 0, sizeof(self->xlat_tag));
    Py_RETURN_NONE;
}

/* record(vpage, upa): a translation Python's fill made, so fetch() finds it too. */
static PyObject *NativeMmu_record(NativeMmu *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "record(vpage, upa)");
        return NULL;
    }
    uint64_t vpage = PyLong_AsUnsignedLongLongMask(args[0]);
    uint64_t upa = PyLong_AsUnsignedLongLongMask(args[1]);
    if (PyErr_Occurred())
        return NULL;
    xlat_record(self, vpage, upa);
    Py_RETURN_NONE;
}

/* fetch(va, n): the n bytes at guest-virtual `va` through the last fill of its page, or None
 * (no translation recorded, or the bytes cross the page). */
static PyObject *NativeMmu_fetch(NativeMmu *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "fetch(va, n)");
        return NULL;
    }
    uint64_t va = PyLong_AsUnsignedLongLongMask(args[0]);
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred())
        return NULL;
    uint64_t vpage = va >> 12, off = va & 0xFFF;
    unsigned i = (unsigned)(vpage & (XLAT_N - 1));
    if (!self->configured || self->xlat_tag[i] != vpage + 1 || n < 0 || off + (uint64_t)n > 4096)
        Py_RETURN_NONE;
    uint64_t upa = self->xlat_upa[i];
    const uint8_t *buf = self->mem.dram;
    if (upa >= self->alias_base && self->mem.priv != NULL) {
        buf = self->mem.priv;
        upa -= self->alias_base;
    }
    if (upa + off + (uint64_t)n > self->mem.size)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)buf + upa + off, n);
}

/* walk(cr3, va, access, user, wp, nxe): the walk over the configured memory, as the fill does
 * it; None where the fill would ask Python (an entry that needs transcoding). */
static PyObject *NativeMmu_walk(NativeMmu *self, PyObject *args)
{
    unsigned long long cr3, va;
    int access, user, wp, nxe;
    if (!PyArg_ParseTuple(args, "KKippp", &cr3, &va, &access, &user, &wp, &nxe))
        return NULL;
    if (!self->configured) {
        PyErr_SetString(PyExc_RuntimeError, "NativeMmu.walk before configure()");
        return NULL;
    }
    WalkOut o;
    walk_core(&self->mem, cr3, va, access, user, wp, nxe, &o);
    return walk_result(&o);
}

/* walk_now(va, access, user): walk() with the vCPU's CR3, CR0.WP and EFER.NXE read here in one
 * batch -- one call where Python would read three registers first; None without an engine,
 * when the read fails, or where the fill would ask Python. */
static PyObject *NativeMmu_walk_now(NativeMmu *self, PyObject *args)
{
    unsigned long long va;
    int access, user;
    if (!PyArg_ParseTuple(args, "Kip", &va, &access, &user))
        return NULL;
    if (!self->configured) {
        PyErr_SetString(PyExc_RuntimeError, "NativeMmu.walk_now before configure()");
        return NULL;
    }
    if (self->uc == NULL || self->read_batch(self->uc, self->reg_ids, self->reg_ptrs, NREGS + 1) != 0)
        Py_RETURN_NONE;
    WalkOut o;
    walk_core(&self->mem, self->regs[1], va, access, user, (self->regs[2] & CR0_WP) != 0,
              (self->efer.value & EFER_NXE) != 0, &o);
    return walk_result(&o);
}

/* fill(vaddr, access, cs, cr3, cr0[, efer]): the fill the hook would do with these registers
 * (EFER: NXE set unless given), without an engine: (upa, perms), or None where the hook hands the
 * fill to Python. */
static PyObject *NativeMmu_fill(NativeMmu *self, PyObject *args)
{
    unsigned long long vaddr, cs, cr3, cr0, efer = EFER_NXE;
    int access;
    if (!PyArg_ParseTuple(args, "KiKKK|K", &vaddr, &access, &cs, &cr3, &cr0, &efer))
        return NULL;
    if (!self->configured) {
        PyErr_SetString(PyExc_RuntimeError, "NativeMmu.fill before configure()");
        return NULL;
    }
    if (access < ACCESS_READ || access > ACCESS_FETCH) {
        PyErr_SetString(PyExc_ValueError, "fill: access must be one of ACCESS_*");
        return NULL;
    }
    TlbEntry entry;
    if (self->python_only || (uint64_t)(((int64_t)(vaddr << 16)) >> 16) != vaddr ||
        fill_with_regs(self, vaddr, access, cs, cr3, cr0, efer, &entry) != 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(KI)", (unsigned long long)entry.paddr, (unsigned int)entry.perms);
}

static PyObject *NativeMmu_get_fills(NativeMmu *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->fills);
}

static PyObject *NativeMmu_get_dirty_faults(NativeMmu *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->dirty_faults);
}

static int NativeMmu_traverse(NativeMmu *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fallback);
    return 0;
}

static int NativeMmu_clear(NativeMmu *self)
{
    Py_CLEAR(self->fallback);
    return 0;
}

static void NativeMmu_dealloc(NativeMmu *self)
{
    PyObject_GC_UnTrack(self);
    NativeMmu_clear(self);
    nm_release_buffers(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *NativeMmu_close(NativeMmu *self, PyObject *Py_UNUSED(ignored))
{
    /* After uc_close: forget the engine, the fallback and every buffer (so guest memory can be
     * released). */
    self->uc = NULL;
    Py_CLEAR(self->fallback);
    nm_release_buffers(self);
    Py_RETURN_NONE;
}

static PyMethodDef NativeMmu_methods[] = {
    {"configure", (PyCFunction)NativeMmu_configure, METH_VARARGS,
     "configure(dram, private, size, model, owner, attrs, validated, exec_bits, scanned_bits, phys_bits, enc_mask, "
     "enc_means_private, snp, stage2, alias_base): the memory and paging the fills walk."},
    {"set_python_only", (PyCFunction)NativeMmu_set_python_only, METH_O,
     "While true every fill is the Python fallback's (a pending fault, a quiesced vCPU)."},
    {"set_scan_vas", (PyCFunction)NativeMmu_set_scan_vas, METH_O,
     "set_scan_vas(buffer or None): a fetch through a page other than the one its frame was scanned at is "
     "Python's."},
    {"set_present", (PyCFunction)NativeMmu_set_present, METH_O,
     "set_present(bytes or None): guest_memfd fills whose backing page is not present are Python's."},
    {"set_dirty_log", (PyCFunction)NativeMmu_set_dirty_log, METH_O,
     "set_dirty_log(bitmap or None): while set, fills grant write only to pages whose bit is set; a store to a "
     "clean page sets it."},
    {"flush", (PyCFunction)NativeMmu_flush, METH_NOARGS, "Forget the recorded translations (a TLB flush)."},
    {"record", (PyCFunction)(void (*)(void))NativeMmu_record, METH_FASTCALL,
     "record(vpage, upa): remember a translation Python's fill made, for fetch()."},
    {"fetch", (PyCFunction)(void (*)(void))NativeMmu_fetch, METH_FASTCALL,
     "fetch(va, n): bytes at va through the recorded translation of its page, or None."},
    {"walk_now", (PyCFunction)NativeMmu_walk_now, METH_VARARGS,
     "walk_now(va, access, user): walk() with the vCPU's CR3 and CR0.WP, read here"},
    {"walk", (PyCFunction)NativeMmu_walk, METH_VARARGS,
     "walk(cr3, va, access, user, wp, nxe) over the configured memory; None where Python must walk."},
    {"fill", (PyCFunction)NativeMmu_fill, METH_VARARGS,
     "fill(vaddr, access, cs, cr3, cr0): the hook's fill with these registers: (upa, perms) or None (Python's)."},
    {"close", (PyCFunction)NativeMmu_close, METH_NOARGS, "Drop the engine, the fallback and the buffers."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef NativeMmu_getset[] = {
    {"fills", (getter)NativeMmu_get_fills, NULL, "TLB fills completed in C.", NULL},
    {"dirty_faults", (getter)NativeMmu_get_dirty_faults, NULL, "Dirty-logging write faults taken in C.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject NativeMmuType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "testbed.hw._nativemmu.NativeMmu",
    .tp_basicsize = sizeof(NativeMmu),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "UC_HOOK_TLB_FILL in C: the page walk and the common-case fill, Python for the rest.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)NativeMmu_init,
    .tp_dealloc = (destructor)NativeMmu_dealloc,
    .tp_traverse = (traverseproc)NativeMmu_traverse,
    .tp_clear = (inquiry)NativeMmu_clear,
    .tp_free = PyObject_GC_Del,
    .tp_methods = NativeMmu_methods,
    .tp_getset = NativeMmu_getset,
};

static PyMethodDef nativemmu_functions[] = {
    {"walk", (PyCFunction)nativemmu_walk, METH_VARARGS,
     "walk(memory, cr3, va, access, user, phys_bits, enc_mask, enc_means_private, wp, nxe) over a plain buffer: "
     "(0, gpa, writable, user, executable, encrypted) or (1, error_code, table_gpa | None)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef nativemmu_module = {
    PyModuleDef_HEAD_INIT, "_nativemmu", "The hardware model's page walk and TLB fill (see the file's comment).", -1,
    nativemmu_functions,
};

PyMODINIT_FUNC PyInit__nativemmu(void)
{
    if (PyType_Ready(&NativeMmuType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&nativemmu_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&NativeMmuType);
    if (PyModule_AddObject(m, "NativeMmu", (PyObject *)&NativeMmuType) < 0) {
        Py_DECREF(&NativeMmuType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
