"""The vCPU: Unicorn as the silicon, plus what real hardware adds that Unicorn lacks.

This is the only module that imports Unicorn. It provides:

* the MMU: every TLB fill goes through `_on_tlb_fill`, which walks the guest's own page
  tables (testbed.x86.paging), strips the encryption bit, sends the access to the private or
  DRAM alias of the frame (legacy SEV) or to the guest_memfd or shared backing its memory
  attribute selects (guest_memfd VM types; GuestMemory), and turns walk failures into #PF with CR2 and the
  architectural error code;
* exception delivery through the guest's IDT (Unicorn never delivers exceptions itself);
* instruction interception: VMCALL/VMMCALL/VMGEXIT/PVALIDATE/TDCALL raise Unicorn's
  invalid-instruction hook, and the vendor's rules decide between a VM exit to the hypervisor
  and an exception into the guest; CPUID, IN/OUT and HLT exit to the hypervisor.

The hardware decides nothing that KVM decides: it reports exits through `Hypervisor.vmexit`
and lets the hypervisor read and write state through the `VcpuHardware` methods.

Hot-path notes (UNICORN.md, "Speed"): the Python binding's reg_read costs ~1.6 us while a
direct ctypes call into libunicorn costs ~0.44 us, and a hook registered straight through
uc_hook_add skips the binding's wrapper, so hooks and register access here use ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import unicorn
from unicorn import unicorn_const as ucc
from unicorn import x86_const as ux
from unicorn.unicorn_py3 import unicorn as ucpy

from testbed.decode import effective_addresses
from testbed.errors import GuestMemoryError, MachineClosedError, TestbedError
from testbed.hw.exits import (
    EXITINTINFO_ERROR_VALID,
    EXITINTINFO_TYPE_EXCEPTION,
    EXITINTINFO_TYPE_SOFT_INT,
    EXITINTINFO_VALID,
    NPF_FETCH,
    NPF_GUEST_ENC,
    NPF_GUEST_FINAL,
    NPF_GUEST_PAGE,
    NPF_WRITE,
    SVM_IOIO_PORT_SHIFT,
    SVM_IOIO_SIZE_SHIFT,
    SVM_IOIO_TYPE_IN,
    VMX_INTR_INFO_VALID,
    VMX_INTR_TYPE_HARD_EXCEPTION,
    VMX_IO_IN,
    VMX_IO_PORT_SHIFT,
    Hypervisor,
    RunStop,
    StopReason,
    SvmExitCode,
    Vendor,
    VmxExitReason,
)
from testbed.hw.memory import GuestMemory, HostMemory
from testbed.hw.rmp import PVALIDATE_FAIL_INPUT, PvalidateResult, Rmp
from testbed.trace import Tracer
from testbed.x86 import (
    CONTRIBUTORY_VECTORS,
    CR0_WP,
    ERROR_CODE_VECTORS,
    MSR_AMD64_SEV_ES_GHCB,
    PAGE_SHIFT,
    PAGE_SIZE,
    PFERR_FETCH,
    PVALIDATE_BYTES,
    RFLAGS_CF,
    RFLAGS_IF,
    RFLAGS_RF,
    RFLAGS_TF,
    RFLAGS_VM,
    TDCALL_BYTES,
    U64,
    VMCALL_BYTES,
    VMGEXIT_BYTES,
    VMMCALL_BYTES,
    Reg,
    Vector,
    vector_name,
)
from testbed.x86.paging import ACCESS_FETCH, ACCESS_READ, ACCESS_WRITE, PageFault, PagingMode, Translation, walk

_fastexit: Any
try:  # the optional C fast path for exits (testbed/hw/_fastexit.c, built by setup.py)
    from testbed.hw import _fastexit
except ImportError:  # pragma: no cover - depends on the build
    _fastexit = None

#: Unicorn-physical base of the private (plaintext) alias; the DRAM alias sits at 0.
PRIVATE_ALIAS_BASE = 1 << 39  # below 2^40: Unicorn treats RAM above its 40-bit physical space as slow I/O

_UC_REG = {
    Reg.RAX: ux.UC_X86_REG_RAX,
    Reg.RBX: ux.UC_X86_REG_RBX,
    Reg.RCX: ux.UC_X86_REG_RCX,
    Reg.RDX: ux.UC_X86_REG_RDX,
    Reg.RSI: ux.UC_X86_REG_RSI,
    Reg.RDI: ux.UC_X86_REG_RDI,
    Reg.RBP: ux.UC_X86_REG_RBP,
    Reg.RSP: ux.UC_X86_REG_RSP,
    Reg.R8: ux.UC_X86_REG_R8,
    Reg.R9: ux.UC_X86_REG_R9,
    Reg.R10: ux.UC_X86_REG_R10,
    Reg.R11: ux.UC_X86_REG_R11,
    Reg.R12: ux.UC_X86_REG_R12,
    Reg.R13: ux.UC_X86_REG_R13,
    Reg.R14: ux.UC_X86_REG_R14,
    Reg.R15: ux.UC_X86_REG_R15,
    Reg.RIP: ux.UC_X86_REG_RIP,
    Reg.RFLAGS: ux.UC_X86_REG_RFLAGS,
    Reg.CS: ux.UC_X86_REG_CS,
    Reg.SS: ux.UC_X86_REG_SS,
    Reg.DS: ux.UC_X86_REG_DS,
    Reg.ES: ux.UC_X86_REG_ES,
    Reg.FS: ux.UC_X86_REG_FS,
    Reg.GS: ux.UC_X86_REG_GS,
    Reg.CR0: ux.UC_X86_REG_CR0,
    Reg.CR2: ux.UC_X86_REG_CR2,
    Reg.CR3: ux.UC_X86_REG_CR3,
    Reg.CR4: ux.UC_X86_REG_CR4,
}

#: capstone register names -> Unicorn ids, for effective-address computation.
_REG_NAMES = {r.name.lower(): uc for r, uc in _UC_REG.items()}
_REG_NAMES.update({
    name: getattr(ux, f"UC_X86_REG_{name.upper()}")
    for name in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "r8d", "r9d", "r10d", "r11d", "r12d",
                 "r13d", "r14d", "r15d")
})

#: Reg -> Unicorn register id, indexable by the IntEnum (list indexing avoids Enum hashing).
_UC_REG_BY_INDEX = tuple(_UC_REG[Reg(i)] for i in range(len(Reg)))

_RIP = ux.UC_X86_REG_RIP
_CS = ux.UC_X86_REG_CS
_CR0 = ux.UC_X86_REG_CR0
_CR3 = ux.UC_X86_REG_CR3
_PROT_RW = ucc.UC_PROT_READ | ucc.UC_PROT_WRITE
_ACCESS_FROM_UC = {ucc.UC_MEM_READ: ACCESS_READ, ucc.UC_MEM_WRITE: ACCESS_WRITE, ucc.UC_MEM_FETCH: ACCESS_FETCH}
_U64S = struct.Struct("<Q")

# Opcode byte patterns of the instruction sites the hardware intercepts by code hooks.
_SITE_PATTERNS = (b"\x0f\x30", b"\x0f\x32")  # WRMSR, RDMSR
_IO_OPCODES = frozenset({0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF})
_ES_SITE_PATTERNS = (
    *_SITE_PATTERNS,
    b"\x0f\xa2",  # CPUID
    *(bytes([op]) for op in sorted(_IO_OPCODES)),  # IN/OUT
    *(bytes([0x66, op]) for op in (0xE5, 0xE7, 0xED, 0xEF)),  # 16-bit IN/OUT
)

# Contexts in which the hypervisor runs (they decide how RIP and injections take effect).
_CTX_NONE = 0
_CTX_INVALID = 1  # UC_HOOK_INSN_INVALID: RIP writes take effect, returning True resumes
_CTX_CPUID = 2  # UC_HOOK_INSN(CPUID): RIP writes ignored; returning 1 skips the instruction
_CTX_IO = 3  # UC_HOOK_INSN(IN/OUT): RIP writes ignored; the instruction completes natively

_INVALID_CFUNC = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p)
_TLB_CFUNC = ctypes.CFUNCTYPE(
    ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(ucpy.uc_tlb_entry), ctypes.c_void_p
)
_INTR_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)
_OUT_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p)
_IN_CFUNC = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p)
_CPUID_CFUNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_CODE_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)


#: #VC error code for a private access to an unvalidated page (AMD APM 15.36.10).
SVM_EXIT_PAGE_NOT_VALIDATED = 0x404



def _npf_error(access: int, private: bool) -> int:
    err = NPF_WRITE if access == ACCESS_WRITE else NPF_FETCH if access == ACCESS_FETCH else 0
    return err | (NPF_GUEST_ENC if private else 0)


def _raw_function(name: str) -> Any:
    """A libunicorn entry point without argtypes: ctypes then passes the prepared pointers and
    ints as they are, which halves the cost of a register access on the hot path (the binding's
    prototypes convert every argument on every call)."""
    fn = getattr(ctypes.CDLL(ucpy.uclib._name), name)
    fn.argtypes = None
    fn.restype = ctypes.c_int
    return fn


class _ReleasedEngine:
    """Stands in for the Unicorn engine and its entry points after `UnicornVcpu.close()`:
    uc_close freed the engine, so every later use raises a clear error instead of passing a
    dangling handle to libunicorn (which would crash the process)."""

    def _refuse(self) -> NoReturn:
        raise MachineClosedError("the vCPU is closed: Machine.close() released its emulator and guest memory")

    def __getattr__(self, name: str) -> Any:
        self._refuse()

    def __call__(self, *args: Any) -> NoReturn:
        self._refuse()


_RELEASED = _ReleasedEngine()

#: Bound on the per-address code hooks of intercepted-instruction sites (see _scan_msr_sites).
#: Every UC_HOOK_CODE is visited at each translated instruction and for each translated block
#: (Unicorn's HOOK_EXISTS_BOUNDED, hooked_regions_check), so their number must stay small.
MAX_SITE_HOOKS = 4096


class HardwareError(TestbedError):
    """The emulator did something the model cannot continue from (a testbed bug)."""


class _DeliveryFault(Exception):  # noqa: N818 - a control-flow signal, not an error report
    """A fault raised while delivering an exception (becomes #DF)."""

    def __init__(self, vector: int, error_code: int, cr2: int | None = None) -> None:
        super().__init__(vector_name(vector))
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


class _NestedFault(_DeliveryFault):
    """An access that reached a GPA outside guest memory: a nested page fault (NPF/EPT
    violation) on `gpa`, not a #PF. `npf_error` carries NPF_GUEST_PAGE when the GPA is a
    paging-structure entry of the walk for `va` and NPF_GUEST_FINAL when it is the final
    access. Callers that only need "did the access work" treat it as any delivery fault."""

    def __init__(self, va: int, gpa: int, npf_error: int) -> None:
        super().__init__(Vector.PF, npf_error & 0x1F, va)
        self.gpa = gpa
        self.npf_error = npf_error


#: QEMU's hflags bit HF_CS64: the CPU runs 64-bit code (CS.L with EFER.LMA), from the hidden
#: part of CS that a GDT rewrite does not change (measured: set at CPL 0 in 64-bit code, clear
#: after a far transfer to a 32-bit code segment).
_HF_CS64 = 1 << 15


@dataclass
class _PendingFault:
    vector: int
    error_code: int | None
    cr2: int | None = None


_CALIBRATION: dict[str, int] = {}

# Flat 64-bit test machine for the calibrations: GDT with kernel and user segments at 0x1000.
_CAL_GDT = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CFF3000000FFFF, 0x00AFFB000000FFFF)


def _context_fields(before: bytes, after: bytes, match: Callable[[int, int], bool]) -> set[int]:
    return {
        off
        for off in range(0, min(len(before), len(after)) - 4, 4)
        if match(struct.unpack_from("<i", before, off)[0], struct.unpack_from("<i", after, off)[0])
    }


def _run_to_exception(code: bytes, setup: Callable[[Any], None] | None = None) -> tuple[bytes, bytes]:
    """(context before, context in the UC_HOOK_INTR callback) for `code` at 0x2000."""
    uc = unicorn.Uc(ucc.UC_ARCH_X86, ucc.UC_MODE_64)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, struct.pack("<5Q", *_CAL_GDT))
    uc.reg_write(ux.UC_X86_REG_GDTR, (0, 0x1000, 8 * len(_CAL_GDT) - 1, 0))
    if setup is not None:
        setup(uc)
    uc.mem_write(0x2000, code + b"\xf4")
    before = bytes(uc.context_save())
    seen: list[bytes] = []

    def hook(u: Any, intno: int, _ud: Any) -> None:
        seen.append(bytes(u.context_save()))
        u.emu_stop()

    uc.hook_add(ucc.UC_HOOK_INTR, hook)
    with contextlib.suppress(unicorn.UcError):
        uc.emu_start(0x2000, 0x2000 + len(code))
    if not seen:
        raise HardwareError("calibration of Unicorn's saved context failed: no exception seen")
    return before, seen[0]


def _equals_after(old: int, new: int) -> Callable[[int, int], bool]:
    return lambda a, b: a == old and b == new


def _changes_to(new: int) -> Callable[[int, int], bool]:
    return lambda a, b: b == new and a != new


def _unique(name: str, candidates: set[int]) -> int:
    if len(candidates) != 1:
        raise HardwareError(f"cannot locate Unicorn's {name} field in a saved context (candidates: {candidates})")
    _CALIBRATION[name] = candidates.pop()
    return _CALIBRATION[name]


def old_exception_offset() -> int:
    """Offset of QEMU's `env->old_exception` inside a saved Unicorn context.

    Unicorn never resets this field after a UC_HOOK_INTR callback, so the second #DE/#GP/#PF
    would arrive as #DF and the third as a silent triple fault (UNICORN.md, "Exceptions").
    The offset is build-specific, so it is measured once per process: the field reads -1 in a
    fresh context and the vector after an exception. Canary: tests/test_unicorn_canary.py.
    """
    if "old_exception" in _CALIBRATION:
        return _CALIBRATION["old_exception"]
    # (#DE) xor ecx, ecx; div ecx   and   (#GP) mov ax, 0x1234; mov ds, ax (no such selector).
    candidates: set[int] | None = None
    for vector, code in ((0, b"\x31\xc9\xf7\xf1"), (13, b"\x66\xb8\x34\x12\x8e\xd8")):
        before, after = _run_to_exception(code)
        found = _context_fields(before, after, _equals_after(-1, vector))
        candidates = found if candidates is None else candidates & found
    return _unique("old_exception", candidates or set())


def error_code_offset() -> int:
    """Offset of QEMU's `env->error_code`: the error code of the exception being raised.

    Unicorn's UC_HOOK_INTR gets only the vector; the error code (e.g. the selector of a #GP)
    is read from the saved context instead. Measured with two #GPs on different selectors.
    """
    if "error_code" in _CALIBRATION:
        return _CALIBRATION["error_code"]
    candidates: set[int] | None = None
    # mov ax, 0x1230; mov ds, ax   and   mov cx, 0x2340; mov ds, cx (two registers, so the
    # register slots that also hold the selector drop out of the intersection)
    for selector, mov, load in ((0x1230, b"\x66\xb8", b"\x8e\xd8"), (0x2340, b"\x66\xb9", b"\x8e\xd9")):
        code = mov + selector.to_bytes(2, "little") + load
        before, after = _run_to_exception(code)
        found = _context_fields(before, after, _changes_to(selector))
        candidates = found if candidates is None else candidates & found
    return _unique("error_code", candidates or set())


def cs_base_offset() -> int:
    """Offset of QEMU's `env->segs[R_CS].base` inside a saved Unicorn context.

    A CS write through uc_reg_write in 64-bit mode changes only the selector (neither the base
    nor HF_CS64: canary in tests/test_hostile_guests.py), so delivering an exception from
    32-bit code with a non-zero CS base to a 64-bit handler patches the base here. Measured by
    a far return to a 32-bit code segment whose base is 0x12345000.
    """
    if "cs_base" in _CALIBRATION:
        return _CALIBRATION["cs_base"]
    base = 0x12345000
    desc = 0x00CF9B000000FFFF | ((base & 0xFFFFFF) << 16) | ((base >> 24) << 56)
    uc = unicorn.Uc(ucc.UC_ARCH_X86, ucc.UC_MODE_64)
    uc.mem_map(0, 0x10000)
    gdt = (*_CAL_GDT, desc)
    uc.mem_write(0x1000, struct.pack(f"<{len(gdt)}Q", *gdt))
    uc.reg_write(ux.UC_X86_REG_GDTR, (0, 0x1000, 8 * len(gdt) - 1, 0))
    uc.reg_write(ux.UC_X86_REG_CS, 0x08)
    uc.mem_map(base, 0x1000)
    uc.mem_write(base + 0x10, b"\x90\xf4")
    uc.mem_write(0x8000 - 16, struct.pack("<2Q", 0x10, 8 * (len(gdt) - 1)))
    uc.reg_write(ux.UC_X86_REG_RSP, 0x8000 - 16)
    uc.mem_write(0x2000, b"\x48\xcb")  # retfq to the 32-bit segment at offset 0x10
    before = bytes(uc.context_save())
    uc.emu_start(0x2000, 0x11)
    after = bytes(uc.context_save())
    candidates = {
        off for off in range(0, min(len(before), len(after)) - 8, 4)
        if struct.unpack_from("<Q", before, off)[0] == 0 and struct.unpack_from("<Q", after, off)[0] == base
    }
    return _unique("cs_base", candidates)


def hflags_offset() -> int:
    """Offset of QEMU's `env->hflags`, whose bits 1:0 are the CPL.

    Unicorn's segment-register writes do not change the CPL (canary in
    tests/test_unicorn_canary.py), so delivering an exception from CPL 3 to a CPL-0 handler
    sets the CPL bits in the saved context. Measured by an IRETQ from CPL 0 to CPL 3.
    """
    if "hflags" in _CALIBRATION:
        return _CALIBRATION["hflags"]

    uc = unicorn.Uc(ucc.UC_ARCH_X86, ucc.UC_MODE_64)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, struct.pack("<5Q", *_CAL_GDT))
    uc.reg_write(ux.UC_X86_REG_GDTR, (0, 0x1000, 8 * len(_CAL_GDT) - 1, 0))
    uc.reg_write(ux.UC_X86_REG_CS, 0x08)
    uc.reg_write(ux.UC_X86_REG_SS, 0x10)
    frame = struct.pack("<5Q", 0x2002, 0x23, 0x2, 0x7000, 0x1B)  # rip cs rflags rsp ss
    uc.mem_write(0x8000 - len(frame), frame)
    uc.reg_write(ux.UC_X86_REG_RSP, 0x8000 - len(frame))
    uc.mem_write(0x2000, b"\x48\xcf\xf4")  # iretq to CPL 3 at 0x2002, where the run stops
    before = bytes(uc.context_save())
    uc.emu_start(0x2000, 0x2002)
    if uc.reg_read(ux.UC_X86_REG_CS) != 0x23:
        raise HardwareError("calibration of Unicorn's hflags failed: IRETQ did not reach CPL 3")
    after = bytes(uc.context_save())
    candidates = _context_fields(before, after, lambda a, b: a & 3 == 0 and b & 3 == 3 and (a ^ b) == 3)
    return _unique("hflags", candidates)


class UnicornVcpu:
    """One x86-64 vCPU of vendor `vendor` running over `memory`, reporting to `hypervisor`."""

    def __init__(
        self,
        memory: GuestMemory,
        vendor: Vendor,
        paging: PagingMode,
        tracer: Tracer | None = None,
        *,
        sev_es: bool = False,
        snp: bool = False,
    ) -> None:
        self.vendor = vendor
        self._mem = memory
        self._paging = paging
        self._tracer = tracer if tracer is not None else Tracer.disabled()
        self._sev_es = sev_es or snp
        self._snp = snp
        self.hypervisor: Hypervisor | None = None
        self._intercept_ud = False
        self._uc = unicorn.Uc(ucc.UC_ARCH_X86, ucc.UC_MODE_64)
        self._uc.ctl_set_tlb_mode(ucc.UC_TLB_VIRTUAL)
        # Exits enabled and none set: emu_start's `until` is ignored, so a run ends only by a
        # stop, an error or HLT. Otherwise Unicorn invalidates the code at `until` - 1 after
        # every run (cpus.c resume_all_vcpus) through a fetch fill of page 0xfffffffffffff000;
        # that fill fails, so every clean end of a run - HLT, the timeout, a hook's stop - came
        # back as UC_ERR_EXCEPTION with a spurious #PF (CR2 0xfffffffffffff000) pending, and a
        # guest's HLT was reported as that #PF. Canary: tests/test_resources.py
        # (test_clean_end_of_a_run_raises_no_spurious_fault).
        self._uc.ctl_exits_enabled(True)
        self._uc.mem_map_ptr(0, memory.size, ucc.UC_PROT_ALL, memory.dram_address())
        if memory.private is not None:
            # The private alias (legacy SEV) or the guest_memfd backing (hw/memory.py).
            self._uc.mem_map_ptr(PRIVATE_ALIAS_BASE, memory.size, ucc.UC_PROT_ALL, memory.private_address())
        memory.on_ownership_change = self._on_ownership_change
        if snp:
            memory.host_write_guard = self._rmp_host_write_check
        memory.on_host_write = self._on_host_write
        self._h = ctypes.c_void_p(self._uc._uch.value)  # a plain pointer: no argtypes conversion
        self._lib = ucpy.uclib
        self._val = ctypes.c_uint64()
        self._ref = ctypes.byref(self._val)
        self._reg_read_batch = _raw_function("uc_reg_read_batch")
        self._reg_write_batch = _raw_function("uc_reg_write_batch")
        self._arg_vals = (ctypes.c_uint64 * 4)()
        self._arg_ids = (ctypes.c_int * 4)(ux.UC_X86_REG_RBX, ux.UC_X86_REG_RCX, ux.UC_X86_REG_RDX, ux.UC_X86_REG_RSI)
        self._arg_ptrs = (ctypes.c_void_p * 4)(*(ctypes.addressof(self._arg_vals) + 8 * i for i in range(4)))
        self._fill_regs = (ctypes.c_uint64 * 3)()
        self._fill_ids = (ctypes.c_int * 3)(ux.UC_X86_REG_CS, ux.UC_X86_REG_CR3, ux.UC_X86_REG_CR0)
        self._fill_ptrs = (ctypes.c_void_p * 3)(*(ctypes.addressof(self._fill_regs) + 8 * i for i in range(3)))
        dram = memory.dram
        size = memory.size

        def plain_pte(pa: int) -> int:
            if pa + 8 > size:
                raise GuestMemoryError("page-table read outside guest memory", pa)
            return int(_U64S.unpack_from(dram, pa)[0])

        # guest_memfd: a table entry is read from the backing stage 2 maps its GFN to.
        self._pte_reader_plain = memory.gmem_read_u64 if memory.guest_memfd else plain_pte
        self._pte_reader_private: Callable[[int], int] = lambda pa: memory.cpu_read_u64(pa, True)
        self._snap = (ctypes.c_uint64 * 7)()
        self._snap_ids = (ctypes.c_int * 7)(
            ux.UC_X86_REG_RIP, ux.UC_X86_REG_RAX, ux.UC_X86_REG_CS, ux.UC_X86_REG_RBX, ux.UC_X86_REG_RCX,
            ux.UC_X86_REG_RDX, ux.UC_X86_REG_RSI,
        )
        self._snap_ptrs = (ctypes.c_void_p * 7)(*(ctypes.addressof(self._snap) + 8 * i for i in range(7)))
        self._snapshot: tuple[int, int, int, int, int, int] | None = None
        self._hc_vals = (ctypes.c_uint64 * 2)()
        self._hc_ids = (ctypes.c_int * 2)(ux.UC_X86_REG_RAX, ux.UC_X86_REG_CS)
        self._hc_wids = (ctypes.c_int * 2)(ux.UC_X86_REG_RAX, ux.UC_X86_REG_RIP)
        self._hc_ptrs = (ctypes.c_void_p * 2)(ctypes.addressof(self._hc_vals), ctypes.addressof(self._hc_vals) + 8)
        #: The hypervisor's handler for the native hypercall instruction's VM exit (set by KVM
        #: for plain VMs: it is vmexit(SVM_EXIT_VMMCALL / EXIT_REASON_VMCALL) without dispatch).
        self._fast_hypercall: Callable[[], None] | None = None
        self._native_hypercall = VMMCALL_BYTES if vendor is Vendor.AMD else VMCALL_BYTES
        self._reg_read = _raw_function("uc_reg_read")
        self._reg_write = _raw_function("uc_reg_write")
        self._ctx = _CTX_NONE
        self._cur_rip = 0
        self._cur_len = 0
        self._cpuid_skip = False
        self._io_in_value = 0
        self._stop_requested = False
        self._pending_fault: _PendingFault | None = None
        self._pending_npf: tuple[int, int] | None = None
        #: the guest linear address of the access behind the last NPF (see npf_linear_address)
        self._npf_linear = 0
        #: EXITINTINFO of the exit being taken: the event being delivered, 0 if none
        self._exit_int_info = 0
        self._cs_bases: dict[int, int] = {}  # CS selector -> CS.base (0 for 64-bit code)
        self._pending_events: list[_PendingFault] = []
        self._hook_error: BaseException | None = None
        self._shutdown = False
        self._xlat: dict[int, int] = {}  # guest-virtual page -> unicorn-physical page (last fill)
        self._exec_frames: set[int] = set()  # frames code has been fetched from
        self._scanned_frames: set[int] = set()  # exec frames whose MSR sites are hooked
        #: MSRs the hardware itself implements (SEV_STATUS, the GHCB MSR): index -> (read, write)
        self.hw_msrs: dict[int, tuple[Callable[[], int], Callable[[int], bool] | None]] = {}
        #: the GHCB MSR (MSR_AMD64_SEV_ES_GHCB): hardware state the hypervisor reads at VMGEXIT
        self.ghcb_msr = 0
        self.rmp: Rmp | None = Rmp(memory.nframes) if snp else None
        if self._sev_es:
            self.hw_msrs[MSR_AMD64_SEV_ES_GHCB] = (lambda: self.ghcb_msr, self._write_ghcb_msr)
        #: intercepted-instruction sites: guest-virtual address -> its UC_HOOK_CODE handle
        #: (one hook per address, all sharing one callback; bounded, see _scan_msr_sites)
        self._site_hooks: dict[int, int] = {}
        self._site_cb: Any = None
        self._stop_cb: Any = None
        self._stop_hook: int | None = None  # one-shot UC_HOOK_BLOCK that ends the run for a reset
        self._site_reset_pending = False
        self._quiesced = False  # deleting hooks between runs: TLB fills must not scan
        self.site_hooks_peak = 0
        self.site_hook_resets = 0
        self._closed = False
        #: MSRs the hypervisor does not intercept (its MSR permission bitmap); all others exit
        self._msr_passthrough: frozenset[int] = frozenset()
        self._cs64_cache: dict[int, bool] = {}
        self._old_exc_off = old_exception_offset()
        self._error_code_off = error_code_offset()
        self._hflags_off = hflags_offset()
        self._cs_base_off = cs_base_offset()
        self._uc_ctx = self._uc.context_save()
        self._running = False
        #: Per-GFN "mapped private" bytes of the stage-2 tables (None: no private memory).
        self.stage2_private: bytearray | None = None
        self._breakpoint = U64  # see the `breakpoint` property
        self._bp_hook: int | None = None
        self._bp_cb: Any = None
        self._at_breakpoint = False
        #: Diagnostic callback (rip, plaintext bytes) when a #UD goes straight to the guest.
        self.on_guest_ud: Callable[[int, bytes], None] | None = None
        self.exceptions_delivered = 0
        self.tlb_fills = 0
        self._callbacks: list[Any] = []
        self._install_hooks()

    # ---------------------------------------------------------------- hooks (ctypes, raw)
    def _add_hook(self, htype: int, cfunc: Any, fn: Callable[..., Any], *extra: int) -> None:
        cb = cfunc(fn)
        self._callbacks.append(cb)  # keep the trampoline alive as long as the vCPU
        hh = ucpy.uc_hook_h()
        args: list[Any] = [ctypes.c_uint64(1), ctypes.c_uint64(0)]
        args += [ctypes.c_int(x) for x in extra]
        status = self._lib.uc_hook_add(self._h, ctypes.byref(hh), htype, ctypes.cast(cb, ctypes.c_void_p), None, *args)
        if status != ucc.UC_ERR_OK:
            raise HardwareError(f"uc_hook_add({htype}) failed: {unicorn.UcError(status)}")

    def _install_hooks(self) -> None:
        self._add_hook(ucc.UC_HOOK_TLB_FILL, _TLB_CFUNC, self._guard(self._on_tlb_fill, False))
        self._fastexit: Any = None
        if _fastexit is not None and not os.environ.get("TESTBED_NO_FASTEXIT"):
            lib = ctypes.CDLL(ucpy.uclib._name)

            def address(name: str) -> int:
                return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0

            self._fastexit = _fastexit.FastExit(
                self._h.value, address("uc_hook_add"), address("uc_reg_read_batch"),
                address("uc_reg_write_batch"), list(self._snap_ids), 2,
                [ux.UC_X86_REG_RAX, ux.UC_X86_REG_RIP], self._on_invalid_exit,
            )
        else:
            self._add_hook(ucc.UC_HOOK_INSN_INVALID, _INVALID_CFUNC, self._on_invalid_ctypes)
        self._add_hook(ucc.UC_HOOK_INTR, _INTR_CFUNC, self._guard(self._on_intr, None))
        self._add_hook(ucc.UC_HOOK_INSN, _OUT_CFUNC, self._guard(self._on_out, None), ux.UC_X86_INS_OUT)
        self._add_hook(ucc.UC_HOOK_INSN, _IN_CFUNC, self._guard(self._on_in, 0), ux.UC_X86_INS_IN)
        self._add_hook(ucc.UC_HOOK_INSN, _CPUID_CFUNC, self._guard(self._on_cpuid, 0), ux.UC_X86_INS_CPUID)

    def _guard(self, fn: Callable[..., Any], on_error: Any) -> Callable[..., Any]:
        """Wrap a hook so a Python exception stops emulation and is re-raised by run()."""

        def wrapper(*args: Any) -> Any:
            try:
                return fn(*args)
            except BaseException as exc:  # re-raised from run(); must not unwind through C
                if self._hook_error is None:
                    self._hook_error = exc
                self._uc.emu_stop()
                return on_error

        return wrapper

    # --------------------------------------------------------------------------- release
    @property
    def closed(self) -> bool:
        """Whether close() released the emulator."""
        return self._closed

    def close(self) -> None:
        """Release the emulator (idempotent): uc_close frees the engine with its hooks and its
        mappings of guest memory, then the references that tie the vCPU to the rest of the
        machine (hypervisor, memory callbacks, the C exit object) are dropped. Close the
        vCPU before the guest memory it maps. Every later use raises MachineClosedError."""
        if self._closed:
            return
        if self._running:
            raise HardwareError("close() called from inside a run (a hook): the emulator is still executing")
        self._closed = True
        # The binding closes the engine in a weakref.finalize; calling it runs uc_close once and
        # disarms it (a second uc_close would free the engine twice). Canary:
        # tests/test_resources.py pins that the binding still has it.
        release = getattr(self._uc, "_Uc__finalizer", None)
        if release is not None:
            release()
        fastexit, self._fastexit = self._fastexit, None
        if fastexit is not None and hasattr(fastexit, "close"):  # (an extension built before close())
            fastexit.close()  # its hook died with the engine; drop its handler (the vCPU)
        released = cast(Any, _RELEASED)
        self._uc = released
        self._lib = released
        self._reg_read = self._reg_write = released
        self._reg_read_batch = self._reg_write_batch = released
        self._pte_reader_plain = self._pte_reader_private = released
        self._callbacks.clear()
        self._site_hooks.clear()
        self._site_cb = self._stop_cb = None
        self._stop_hook = None
        self._bp_cb = self._bp_hook = None
        self.hypervisor = None
        self._fast_hypercall = None
        self.on_guest_ud = None
        self.hw_msrs.clear()
        self._pending_events.clear()
        self._hook_error = None
        mem = self._mem
        mem.on_ownership_change = None
        mem.on_host_write = None
        mem.host_write_guard = None

    # ------------------------------------------------------------ registers (VMCB/VMCS)
    def read_reg(self, reg: Reg) -> int:
        """Read a register (fast path for GPRs, RIP, CRs and selectors)."""
        self._val.value = 0  # a segment register fills only the low bytes of the scratch
        self._reg_read(self._h, _UC_REG_BY_INDEX[reg], self._ref)
        return int(self._val.value)

    def write_reg(self, reg: Reg, value: int) -> None:
        """Write a register; RIP writes made inside the CPUID/IO hooks are not honoured."""
        if reg in (Reg.CS, Reg.SS, Reg.DS, Reg.ES, Reg.FS, Reg.GS):
            # Segment loads go through the binding so the descriptor is loaded from the GDT.
            self._uc.reg_write(_UC_REG[reg], value)
            return
        self._val.value = value & U64
        self._reg_write(self._h, _UC_REG_BY_INDEX[reg], self._ref)

    def hypercall_args(self) -> tuple[int, int, int, int]:
        """RBX, RCX, RDX, RSI (a0..a3 of the KVM hypercall ABI) in one batched read."""
        snap = self._snapshot
        if snap is not None:
            return snap[2], snap[3], snap[4], snap[5]
        self._reg_read_batch(self._h, self._arg_ids, self._arg_ptrs, 4)
        v = self._arg_vals
        return v[0], v[1], v[2], v[3]

    def _rd(self, ucreg: int) -> int:
        self._val.value = 0  # a segment register fills only the low bytes of the scratch
        self._reg_read(self._h, ucreg, self._ref)
        return int(self._val.value)

    def _wr(self, ucreg: int, value: int) -> None:
        self._val.value = value & U64
        self._reg_write(self._h, ucreg, self._ref)

    def cpl(self) -> int:
        """Current privilege level (CS.RPL, which equals CS.DPL for code the CPU runs)."""
        return self._rd(_CS) & 3

    def set_hypercall_handler(self, handler: Callable[[], None] | None) -> None:
        """Let the hypervisor take the native hypercall's VM exit on the short path."""
        self._fast_hypercall = None if self._sev_es else handler

    def mode_of(self, cs_selector: int) -> bool:
        """is_64bit_mode() for a CS selector already read."""
        cached = self._cs64_cache.get(cs_selector)
        return cached if cached is not None else self.is_64bit_mode()

    def is_64bit_mode(self) -> bool:
        """CS.L with EFER.LMA: whether the guest runs 64-bit code (is_64_bit_mode()).

        Unicorn exposes only the CS selector, so the descriptor is read from the GDT and cached
        per selector until the next TLB flush (a guest that rewrites the descriptor of the CS
        it is running on without reloading CS is not modelled).
        """
        sel = self._rd(_CS)
        cached = self._cs64_cache.get(sel)
        if cached is not None:
            return cached
        _, base, _limit, _ = self._uc.reg_read(ux.UC_X86_REG_GDTR)
        try:
            desc = self.read_virtual(base + (sel & ~7), 8, supervisor=True)
            value = bool(_U64S.unpack(desc)[0] & (1 << 53))
        except _DeliveryFault:
            # The GDT is no longer readable (a hostile guest moved it): the CPU still runs on
            # the descriptor cached in CS, which QEMU keeps as HF_CS64 in hflags.
            value = bool(self._hflags() & _HF_CS64)
        self._cs64_cache[sel] = value
        return value

    def _hflags(self) -> int:
        ctx = self._uc_ctx
        self._uc.context_update(ctx)
        addr = ctypes.cast(ctx._context, ctypes.c_void_p).value
        assert addr is not None
        return int(ctypes.c_uint32.from_address(addr + self._hflags_off).value)

    def _code_base(self, cs: int) -> int:
        """CS.base of the code segment `cs` (the current one): an instruction's linear address
        is CS.base + RIP. 0 in 64-bit mode, where the base is ignored; otherwise read from the
        descriptor in the GDT (0 if the GDT is unreadable) and cached like CS.L."""
        cs &= 0xFFFF
        base = self._cs_bases.get(cs)
        if base is None:
            base = 0
            if not self.mode_of(cs):
                _, gdt, _limit, _ = self._uc.reg_read(ux.UC_X86_REG_GDTR)
                try:
                    lo = _U64S.unpack(self.read_virtual(gdt + (cs & ~7), 8, supervisor=True))[0]
                    base = ((lo >> 16) & 0xFFFFFF) | (((lo >> 56) & 0xFF) << 24)
                except _DeliveryFault:
                    base = 0
            self._cs_bases[cs] = base
        return base

    def exit_int_info(self) -> int:
        """EXITINTINFO (SVM) / IDT-vectoring information (VMX) of the current exit: the event
        the CPU was delivering when it exited (EXITINTINFO_*), 0 when it was not delivering."""
        return self._exit_int_info

    def npf_linear_address(self) -> int:
        """The guest linear address whose access caused the current NPF/EPT violation (VMX
        reports it as GUEST_LINEAR_ADDRESS; KVM on SVM re-derives it by decoding the
        instruction, which the testbed's kvm layer is spared)."""
        return self._npf_linear

    def set_msr(self, msr: int, value: int) -> None:
        """Set an MSR the emulator models (EFER at reset)."""
        self._uc.msr_write(msr, value)

    def set_descriptor_table(self, which: str, base: int, limit: int) -> None:
        """Load GDTR or IDTR (KVM_SET_SREGS)."""
        reg = ux.UC_X86_REG_GDTR if which == "gdt" else ux.UC_X86_REG_IDTR
        self._uc.reg_write(reg, (0, base, limit, 0))

    def set_tr(self, selector: int, base: int, limit: int) -> None:
        """Load the task register (KVM_SET_SREGS)."""
        self._uc.reg_write(ux.UC_X86_REG_TR, (selector, base, limit, 0x8B))

    def skip_instruction(self) -> None:
        """Advance past the intercepted instruction (kvm_skip_emulated_instruction)."""
        if self._ctx == _CTX_CPUID:
            self._cpuid_skip = True
        elif self._ctx == _CTX_IO:
            pass  # IN/OUT complete natively after the hook
        else:
            self._wr(_RIP, self._cur_rip + self._cur_len)

    def set_io_in_result(self, value: int) -> None:
        """The value an intercepted IN instruction returns."""
        self._io_in_value = value

    def set_intercept_ud(self, enabled: bool) -> None:
        """Whether #UD exits to the hypervisor (the VMCB/VMCS exception intercept)."""
        self._intercept_ud = enabled

    def request_stop(self) -> None:
        """End the current run as soon as the current instruction completes."""
        self._stop_requested = True
        self._uc.emu_stop()

    @property
    def memory(self) -> HostMemory:
        """The host's view of guest memory."""
        return self._mem.host_view()

    @property
    def guest_memory(self) -> GuestMemory:
        """The memory controller (hardware-internal; not for the kvm or vmm layers)."""
        return self._mem

    # ------------------------------------------------------------------------- MMU
    def _paging_walk(self, va: int, access: int, user: bool, cr3: int | None = None,
                     cr0: int | None = None) -> Translation | PageFault:
        if cr3 is None or cr0 is None:
            cr3 = self._rd(_CR3)
            cr0 = self._rd(_CR0)
        mem = self._mem
        # SEV: the CPU always walks page tables as private. Unencrypted memory: read the
        # entries straight from the buffer (the walk's hot loop).
        reader = self._pte_reader_plain if not mem.encrypted else self._pte_reader_private
        return walk(reader, cr3, va, access, user, self._paging, wp=bool(cr0 & CR0_WP), mem_size=mem.size)

    def translate(self, va: int, access: int = ACCESS_READ, supervisor: bool = True) -> Translation:
        """Walk the guest page tables as the CPU would; raises _DeliveryFault(#PF) on failure,
        _NestedFault when the walk or the access reaches a GPA outside guest memory."""
        try:
            result = self._paging_walk(va, access, user=not supervisor)
        except TestbedError:
            raise _DeliveryFault(Vector.PF, 0, va) from None
        if isinstance(result, PageFault):
            if result.table_gpa is not None:
                raise _NestedFault(va, result.table_gpa,
                                   _npf_error(access, self._mem.encrypted) | NPF_GUEST_PAGE)
            raise _DeliveryFault(Vector.PF, result.error_code, va)
        if result.gpa >= self._mem.size:
            raise _NestedFault(va, result.gpa | (va & 0xFFF),
                               _npf_error(access, result.encrypted) | NPF_GUEST_FINAL)
        return result

    def read_virtual(self, va: int, length: int, supervisor: bool = True) -> bytes:
        """Read guest-virtual memory as the CPU sees it (plaintext)."""
        out = bytearray()
        while length:
            n = min(length, PAGE_SIZE - (va & 0xFFF))
            tr = self.translate(va, ACCESS_READ, supervisor)
            out += self._mem.cpu_read(tr.gpa | (va & 0xFFF), n, tr.encrypted)
            va += n
            length -= n
        return bytes(out)

    def write_virtual(self, va: int, data: bytes, supervisor: bool = True) -> None:
        """Write guest-virtual memory as the CPU does."""
        pos = 0
        while pos < len(data):
            cur = va + pos
            n = min(len(data) - pos, PAGE_SIZE - (cur & 0xFFF))
            tr = self.translate(cur, ACCESS_WRITE, supervisor)
            self._mem.cpu_write(tr.gpa | (cur & 0xFFF), data[pos : pos + n], tr.encrypted)
            pos += n

    def fetch_bytes(self, va: int, length: int) -> bytes:
        """Instruction bytes at `va` as the CPU fetches them (always decrypted on SEV)."""
        out = bytearray()
        while length:
            n = min(length, PAGE_SIZE - (va & 0xFFF))
            tr = self.translate(va, ACCESS_READ, supervisor=True)
            out += self._mem.cpu_read(tr.gpa | (va & 0xFFF), n, private=self._mem.encrypted)
            va += n
            length -= n
        return bytes(out)

    def gva_to_gpa(self, va: int) -> int:
        """The guest-physical address the CPU uses for `va` (raises on a failed walk)."""
        return self.translate(va).gpa | (va & 0xFFF)

    def _on_tlb_fill(self, _h: Any, vaddr: int, uc_access: int, entry: Any, _ud: Any) -> bool:
        if self._quiesced:
            # Deleting hooks between runs (_reset_site_hooks): a host-side lookup, flushed
            # right after; a failed fill here would leave Unicorn's error pending.
            e = entry.contents
            e.paddr = 0
            e.perms = ucc.UC_PROT_ALL
            return True
        if self._pending_fault is not None or self._pending_npf is not None:
            # After a failed fill QEMU still probes (a fetch at 0xfffffffffffff000 was seen)
            # before the run stops: only the first failure of a run is the guest's fault.
            return False
        self.tlb_fills += 1
        access = _ACCESS_FROM_UC.get(uc_access, ACCESS_READ)
        if not -(1 << 47) <= (vaddr if vaddr < (1 << 63) else vaddr - (1 << 64)) < (1 << 47):
            # A non-canonical address is #GP(0), not a page fault (SDM vol. 1 3.3.7.1).
            self._pending_fault = _PendingFault(Vector.GP, 0, None)
            return False
        # CS (for the CPL), CR3 and CR0 in one batched read.
        s = self._fill_regs
        s[0] = 0  # CS fills only the low bytes of its slot
        self._reg_read_batch(self._h, self._fill_ids, self._fill_ptrs, 3)
        user = (s[0] & 3) == 3
        result = self._paging_walk(vaddr, access, user, s[1], s[2])
        if isinstance(result, PageFault):
            if result.table_gpa is not None:
                # The walk itself reads a GPA outside guest memory: on hardware with nested
                # paging that access takes the NPF (a guest page-table access), not a #PF.
                self._pending_npf = (result.table_gpa, _npf_error(access, self._mem.encrypted) | NPF_GUEST_PAGE)
                self._npf_linear = vaddr
                return False
            self._pending_fault = _PendingFault(Vector.PF, result.error_code, vaddr)
            return False
        mem = self._mem
        gpa = result.gpa
        if gpa >= mem.size:
            self._pending_npf = (gpa | (vaddr & 0xFFF), _npf_error(access, False) | NPF_GUEST_FINAL)
            self._npf_linear = vaddr
            return False
        frame = gpa >> PAGE_SHIFT
        expect = self.stage2_private
        if expect is not None and (mem.encrypted or self._snp):
            # The stage-2 tables KVM built from the memory attributes map each GFN either
            # private or shared; an access with the other C-bit value is a nested page fault
            # (fetches count as private on SEV).
            access_private = result.encrypted or access == ACCESS_FETCH
            if bool(expect[frame]) != access_private:
                self._pending_npf = (gpa | (vaddr & 0xFFF), _npf_error(access, access_private))
                return False
            rmp = self.rmp
            if rmp is not None and access_private and not rmp.validated[frame]:
                # SNP: a private access to an assigned page the guest has not validated.
                self._pending_fault = _PendingFault(Vector.VC, SVM_EXIT_PAGE_NOT_VALIDATED, vaddr)
                return False
        # W^X at the TLB for code frames: EXEC is granted only by fetch fills (which scan the
        # frame for MSR instructions first) and WRITE only while the frame is not known code,
        # so guest self-modifying code is rescanned before it runs (the canary tests pin it).
        if access == ACCESS_FETCH:
            if frame not in self._scanned_frames:
                self._scan_msr_sites(frame, vaddr & ~0xFFF, result.encrypted or mem.encrypted)
            self._exec_frames.add(frame)
        elif access == ACCESS_WRITE and frame in self._exec_frames:
            self._exec_frames.discard(frame)
            self._scanned_frames.discard(frame)
        code_frame = frame in self._exec_frames
        perms = ucc.UC_PROT_READ
        if result.writable and not code_frame:
            perms |= ucc.UC_PROT_WRITE
        exec_ok = result.executable and code_frame
        if mem.guest_memfd:
            # KVM's fault path maps a private GFN to its guest_memfd page and a shared one to
            # the memslot's userspace page (mmu.c __kvm_mmu_faultin_pfn): two host pages.
            if exec_ok:
                perms |= ucc.UC_PROT_EXEC
            upa = PRIVATE_ALIAS_BASE + gpa if mem.private_gfns[frame] else gpa
        elif not mem.encrypted:
            if exec_ok:
                perms |= ucc.UC_PROT_EXEC
            upa = gpa
        elif access == ACCESS_FETCH or result.encrypted:
            # Instruction fetches are always private on SEV (APM 15.34.5), whatever the C-bit.
            mem.make_private(frame)
            upa = PRIVATE_ALIAS_BASE + gpa
            if result.encrypted:
                if exec_ok:
                    perms |= ucc.UC_PROT_EXEC
            else:
                perms = ucc.UC_PROT_EXEC  # data accesses through this C=0 mapping use DRAM
        else:
            mem.make_dram(frame)
            upa = gpa
            # no EXEC: a fetch through this C=0 mapping must refill towards the private alias
        self._xlat[vaddr >> PAGE_SHIFT] = upa
        e = entry.contents
        e.paddr = upa
        e.perms = perms
        return True

    def _fault_address(self, page: int, error_code: int) -> int:
        """The faulting linear address within `page` (Unicorn's fill hook sees only the page).

        A fetch faults at RIP when RIP is on the page (else the instruction crossed into it);
        a data access at the effective address of the faulting instruction's memory operand,
        computed from its decode and the registers (implicit stack and string operands too).
        """
        rip = self._rd(_RIP)
        rip += self._code_base(self._rd(_CS))
        page &= ~0xFFF
        if error_code & PFERR_FETCH:
            return rip if rip & ~0xFFF == page else page
        try:
            code = self.fetch_bytes(rip, 15)
        except _DeliveryFault:
            return page
        for address in effective_addresses(code, rip, self._reg_by_name):
            if address & ~0xFFF == page:
                return address
            if (address + 7) & ~0xFFF == page:  # an access that crosses into the page
                return page
        return page

    def _reg_by_name(self, name: str) -> int:
        reg = _REG_NAMES.get(name)
        if reg is None:
            return 0  # segment bases and other registers not modelled: contribute 0
        return self._rd(reg)

    def _on_ownership_change(self, frame: int) -> None:
        # A translation to the alias that lost the frame must not survive (DESIGN.md).
        self.flush_tlb()

    def flush_tlb(self) -> None:
        """Drop every cached translation (UC_CTL_TLB_FLUSH)."""
        self._uc.ctl(ucc.UC_CTL_TLB_FLUSH, ucc.UC_CTL_IO_WRITE)
        self._xlat.clear()
        self._cs64_cache.clear()
        self._cs_bases.clear()

    def _on_host_write(self, gpa: int, length: int) -> None:
        first = gpa >> PAGE_SHIFT
        last = (gpa + max(length, 1) - 1) >> PAGE_SHIFT
        hit = [f for f in range(first, last + 1) if f in self._exec_frames]
        if hit:
            for f in hit:
                self._exec_frames.discard(f)
                self._scanned_frames.discard(f)
            self.flush_tlb()
            self.flush_code()

    def flush_code(self) -> None:
        """Drop translated code: needed after the host rewrites guest instructions."""
        self._uc.ctl_flush_tb()

    # ------------------------------------------------------------- MSR instruction sites
    def _scan_msr_sites(self, frame: int, va_page: int, private: bool) -> None:
        """Hook every instruction site the hardware must intercept before Unicorn translates it.

        Unicorn offers no RDMSR/WRMSR hook and silently drops MSRs QEMU does not model
        (UNICORN.md), so MSRs the hardware owns (SEV_STATUS, the GHCB MSR) need a per-address
        code hook at each instruction; on SEV-ES/SNP so do CPUID and IN/OUT, which must raise
        #VC *before* they execute (Unicorn's CPUID/IN/OUT hooks cannot redirect RIP). A hook on
        bytes that are not an instruction start never fires, so matching the opcode bytes over
        the whole page is exact.

        One hook per address, shared by every frame mapped there, all with one callback. Hooks
        are bounded: once more than MAX_SITE_HOOKS exist (a guest that keeps generating code,
        or whose rewritten pages left stale sites behind), the run stops before the block being
        translated executes and `_reset_site_hooks` drops them all; the code the guest runs
        next is rescanned as it is fetched. Unicorn visits every code hook at each translated
        instruction, and a 30 s hostile run used to reach 1.3 M hooks and 2.4 GiB.
        """
        self._scanned_frames.add(frame)
        page = self._mem.cpu_read(frame << PAGE_SHIFT, PAGE_SIZE, private)
        patterns = _ES_SITE_PATTERNS if self._sev_es else _SITE_PATTERNS
        hooks = self._site_hooks
        before = len(hooks)
        for pattern in patterns:
            start = 0
            while (off := page.find(pattern, start)) >= 0:
                start = off + 1
                va = va_page + off
                if va not in hooks:
                    hooks[va] = self._add_code_hook(va)
        self.site_hooks_peak = max(self.site_hooks_peak, len(hooks))
        if len(hooks) > MAX_SITE_HOOKS and before > 0 and self._stop_hook is None:
            # Not from here: uc_hook_del re-translates through get_page_addr_code, which would
            # re-enter this TLB fill. A one-shot block hook stops the run at the start of the
            # next block; until then every hook stays, so no site runs unhooked. run() then
            # resets. `before > 0`: a page that alone exceeds the bound still gets to run.
            self._site_reset_pending = True
            self._stop_hook = self._add_range_hook(ucc.UC_HOOK_BLOCK, self._stop_cb, 1, 0)

    def _on_stop_block(self, _h: Any, _address: int, _size: int, _ud: Any) -> None:
        self._uc.emu_stop()

    @property
    def breakpoint(self) -> int:
        """Runs stop when RIP reaches this address, before the instruction there executes
        (used to boot a guest partway); U64 for none."""
        return self._breakpoint

    @breakpoint.setter
    def breakpoint(self, va: int) -> None:
        # A code hook on the one address, not emu_start's `until`: Unicorn ends a run at
        # `until` with an empty translation block, and for a page-aligned `until` (guest_main,
        # the image's first byte) QEMU's tb_gen_code takes that block's last byte as
        # `until` - 1 and fetch-fills the page before it. On SNP that page is not validated,
        # so the probe raised #VC 0x404 into the guest and `disasm --vm-type sev-snp` never
        # booted. Canary: tests/test_disasm.py::test_unicorn_until_at_a_page_start_fills_the_page_before.
        if self._bp_hook is not None:
            # uc_hook_del re-translates the hooked block through a TLB fill: map anything, flush.
            self._quiesced = True
            try:
                self._lib.uc_hook_del(self._h, ucpy.uc_hook_h(self._bp_hook))
            finally:
                self._quiesced = False
            self._bp_hook = None
            self.flush_tlb()
        self._breakpoint = va & U64
        if self._breakpoint != U64:
            if self._bp_cb is None:
                self._bp_cb = _CODE_CFUNC(self._guard(self._on_breakpoint, None))
            self._bp_hook = self._add_range_hook(ucc.UC_HOOK_CODE, self._bp_cb, va, va)
            self.flush_code()  # a block translated before the hook existed would not call it

    def _on_breakpoint(self, _h: Any, _address: int, _size: int, _ud: Any) -> None:
        # From a code hook, RIP stays at the instruction, not executed. After the stop Unicorn
        # probes a fetch at 0xfffffffffffff000 (see _on_stop_block): quiesced, so the probe
        # maps anything instead of raising a spurious #PF; run() flushes it.
        self._at_breakpoint = True
        self._quiesced = True
        self._uc.emu_stop()

    def _add_code_hook(self, va: int) -> int:
        if self._site_cb is None:
            self._site_cb = _CODE_CFUNC(self._guard(self._on_msr_site, None))
            self._stop_cb = _CODE_CFUNC(self._guard(self._on_stop_block, None))
        return self._add_range_hook(ucc.UC_HOOK_CODE, self._site_cb, va, va)

    def _add_range_hook(self, htype: int, cb: Any, begin: int, end: int) -> int:
        hh = ucpy.uc_hook_h()
        status = self._lib.uc_hook_add(
            self._h, ctypes.byref(hh), htype, ctypes.cast(cb, ctypes.c_void_p), None,
            ctypes.c_uint64(begin), ctypes.c_uint64(end),
        )
        if status != ucc.UC_ERR_OK:
            raise HardwareError(f"uc_hook_add({htype} @0x{begin:x}) failed: {unicorn.UcError(status)}")
        return int(hh.value)

    @property
    def site_hook_count(self) -> int:
        """Code hooks currently installed at intercepted-instruction sites."""
        return len(self._site_hooks)

    def _reset_site_hooks(self) -> None:
        """Delete every site hook, forget which frames were scanned, and drop the TLB and the
        translated code, so whatever the guest runs next is fetched, rescanned and hooked
        again before it executes. Only between runs (see _scan_msr_sites)."""
        self._site_reset_pending = False
        self.site_hook_resets += 1
        # uc_hook_del invalidates the blocks each hook instrumented, translating their
        # addresses through a TLB fill: let those fills map anything (the TLB and all
        # translated code are flushed right after) and scan nothing.
        self._quiesced = True
        try:
            for handle in self._site_hooks.values():
                self._lib.uc_hook_del(self._h, ucpy.uc_hook_h(handle))
            if self._stop_hook is not None:
                self._lib.uc_hook_del(self._h, ucpy.uc_hook_h(self._stop_hook))
                self._stop_hook = None
        finally:
            self._quiesced = False
        self._site_hooks.clear()
        self._scanned_frames.clear()
        self._exec_frames.clear()
        self.flush_tlb()
        self.flush_code()

    def _on_msr_site(self, _h: Any, address: int, _size: int, _ud: Any) -> None:
        insn = self._fetch_at_rip(address, 2)
        if insn in (b"\x0f\x30", b"\x0f\x32"):
            self._msr_instruction(address, insn == b"\x0f\x32")
        elif not self._sev_es:
            return
        elif insn == b"\x0f\xa2":
            self._vc_at(address, SvmExitCode.SVM_EXIT_CPUID)
        elif insn[0] in _IO_OPCODES or (insn[0] == 0x66 and insn[1] in _IO_OPCODES):
            self._vc_at(address, SvmExitCode.SVM_EXIT_IOIO)
        # else: the page changed since the scan; the rescan hooks the new sites

    def _vc_at(self, address: int, exit_code: int) -> None:
        """#VC for an intercepted instruction of an SEV-ES guest, before it executes."""
        self._cur_rip = address
        self._ctx = _CTX_INVALID
        try:
            self._tracer.emit("hw", "vc", error_code=exit_code, rip=address)
            self._deliver_now(Vector.VC, exit_code)
        finally:
            self._ctx = _CTX_NONE

    def set_msr_passthrough(self, indices: frozenset[int]) -> None:
        """The MSRs the hypervisor lets the guest access without an exit (the VMCB's MSRPM /
        the VMCS MSR bitmaps); they run on the emulator's own MSR implementation."""
        self._msr_passthrough = frozenset(indices)

    def _msr_instruction(self, address: int, is_read: bool) -> None:
        index = self._rd(_UC_REG[Reg.RCX]) & 0xFFFFFFFF
        handler = self.hw_msrs.get(index)
        if handler is None:
            if index in self._msr_passthrough:
                return  # not intercepted: Unicorn's own MSR emulation runs
            if self._sev_es:
                self._vc_at(address, SvmExitCode.SVM_EXIT_MSR)
                return
            self._msr_exit(address, is_read)
            return
        read, write = handler
        self._cur_rip = address
        self._cur_len = 2
        if is_read:
            value = read()
            self._wr(_UC_REG[Reg.RAX], value & 0xFFFFFFFF)
            self._wr(_UC_REG[Reg.RDX], (value >> 32) & 0xFFFFFFFF)
        else:
            value = (self._rd(_UC_REG[Reg.RAX]) & 0xFFFFFFFF) | ((self._rd(_UC_REG[Reg.RDX]) & 0xFFFFFFFF) << 32)
            if write is None or not write(value):
                self._ctx = _CTX_INVALID
                try:
                    self._deliver_now(Vector.GP, 0)
                finally:
                    self._ctx = _CTX_NONE
                return
        self._wr(_RIP, address + 2)

    def _msr_exit(self, address: int, is_read: bool) -> None:
        """An intercepted RDMSR/WRMSR: SVM_EXIT_MSR (EXITINFO1 0 read, 1 write) or
        EXIT_REASON_MSR_READ/WRITE. The hypervisor skips it, injects #GP, or leaves it pending
        (a user exit the VMM has not answered): then RIP is rewritten to the instruction so
        that it does not run natively, and the run stops there."""
        self._cur_rip = address
        self._cur_len = 2
        self._ctx = _CTX_INVALID
        try:
            if self.vendor is Vendor.AMD:
                self._exit(SvmExitCode.SVM_EXIT_MSR, 0 if is_read else 1, 0)
            else:
                self._exit(VmxExitReason.EXIT_REASON_MSR_READ if is_read else VmxExitReason.EXIT_REASON_MSR_WRITE,
                           0, 0)
        finally:
            self._ctx = _CTX_NONE
        if self._rd(_RIP) == address:
            # Neither completed nor faulted: a single RIP write in a code hook stops the
            # instruction (UNICORN.md); it re-runs, and exits again, only if not completed.
            self._wr(_RIP, address)

    def _rmp_host_write_check(self, gpa: int, length: int) -> None:
        """SNP: the RMP refuses host writes to frames assigned to the guest (an RMP #PF on the
        host side); nothing is written, so nothing of the guest's is corrupted."""
        assert self.rmp is not None
        for frame in range(gpa >> PAGE_SHIFT, ((gpa + max(length, 1) - 1) >> PAGE_SHIFT) + 1):
            if self.rmp.assigned[frame]:
                raise GuestMemoryError("RMP violation: host write to a page assigned to the SNP guest",
                                       frame << PAGE_SHIFT)

    def ghcb_msr_value(self) -> int:
        """The GHCB MSR as the guest last wrote it (the VMCB's GHCB GPA field)."""
        return self.ghcb_msr

    def set_ghcb_msr(self, value: int) -> None:
        """The hypervisor's reply through the GHCB MSR."""
        self.ghcb_msr = value & U64

    def _write_ghcb_msr(self, value: int) -> bool:
        self.ghcb_msr = value & U64
        return True

    # ----------------------------------------------------------- instruction intercepts
    def _fetch_at_rip(self, rip: int, n: int) -> bytes:
        upa = self._xlat.get(rip >> PAGE_SHIFT)
        off = rip & 0xFFF
        if upa is not None and off + n <= PAGE_SIZE:
            mem = self._mem
            if upa >= PRIVATE_ALIAS_BASE:
                buf = mem.private
                base = upa - PRIVATE_ALIAS_BASE
            else:
                buf = mem.dram
                base = upa
            assert buf is not None
            return bytes(buf[base + off : base + off + n])
        try:
            return self.fetch_bytes(rip, n)
        except _DeliveryFault:
            pass
        try:  # the instruction's bytes up to the end of its first page
            return self.fetch_bytes(rip, min(n, PAGE_SIZE - off))
        except _DeliveryFault:
            return b""  # unreadable from here: decoded as no known instruction (#UD)

    def _on_invalid_ctypes(self, _h: Any, _ud: Any) -> bool:
        """The INSN_INVALID hook through ctypes (when the C fast path is not built)."""
        try:
            # One batched read of what a hypercall exit needs (RIP, RAX, CS, RBX, RCX, RDX,
            # RSI): the state the hardware saves into the VMCB/VMCS at the exit, which KVM
            # then reads from there (hypercall_regs / hypercall_args).
            s = self._snap
            s[2] = 0  # CS fills only the low bytes of its slot
            self._reg_read_batch(self._h, self._snap_ids, self._snap_ptrs, 7)
        except BaseException as exc:  # re-raised from run(); must not unwind through C
            return self._hook_failed(exc)
        return self._on_invalid_exit(s[0], s[1], s[2], s[3], s[4], s[5], s[6])

    def _on_invalid_exit(self, rip: int, rax: int, cs: int, rbx: int, rcx: int, rdx: int, rsi: int) -> bool:
        """An instruction Unicorn cannot execute, with the exit's register snapshot.

        The native hypercall of a plain VM, by far the most frequent exit, takes a short path
        (no guard frame, no generic dispatch); everything else goes through `_on_invalid`.
        Exceptions are caught here as `_guard` would catch them."""
        try:
            if (self._fast_hypercall is not None
                    and self._fetch_at_rip(rip + self._code_base(cs), 3) == self._native_hypercall):
                self._cur_rip = rip
                self._cur_len = 3
                self._ctx = _CTX_INVALID
                self._snapshot = (rax, cs & 0xFFFF, rbx, rcx, rdx, rsi)
                try:
                    self._fast_hypercall()
                finally:
                    self._ctx = _CTX_NONE
                    self._snapshot = None
                return not self._stop_requested
            return self._on_invalid(rip)
        except BaseException as exc:
            return self._hook_failed(exc)

    def _hook_failed(self, exc: BaseException) -> bool:
        # Re-raised from run(); an exception must not unwind through Unicorn's C frames.
        if self._hook_error is None:
            self._hook_error = exc
        self._uc.emu_stop()
        return False

    def hypercall_regs(self) -> tuple[int, int]:
        """(RAX, CS selector): what KVM needs first on a hypercall."""
        snap = self._snapshot
        if snap is not None:
            return snap[0], snap[1]
        values = self._hc_vals
        values[1] = 0  # Unicorn writes only the selector's low bytes into this slot
        self._reg_read_batch(self._h, self._hc_ids, self._hc_ptrs, 2)
        return int(values[0]), int(values[1]) & 0xFFFF

    def complete_hypercall(self, rax: int) -> None:
        """RAX = the result and RIP past the instruction, in one batched write."""
        if self._fastexit is not None:
            self._fastexit.write2(rax & U64, self._cur_rip + self._cur_len)
            return
        values = self._hc_vals
        values[0] = rax & U64
        values[1] = self._cur_rip + self._cur_len
        self._reg_write_batch(self._h, self._hc_wids, self._hc_ptrs, 2)

    def _on_invalid(self, rip: int) -> bool:
        # RIP is CS-relative: outside 64-bit mode the bytes are at CS.base + RIP.
        insn = self._fetch_at_rip(rip + self._code_base(self._rd(_CS)), 4)
        self._cur_rip = rip
        self._ctx = _CTX_INVALID
        try:
            head = insn[:3]
            if self.vendor is Vendor.AMD:
                if head == VMMCALL_BYTES:
                    self._cur_len = 3
                    if self._sev_es:
                        self._deliver_now(Vector.VC, SvmExitCode.SVM_EXIT_VMMCALL)
                    else:
                        self._exit(SvmExitCode.SVM_EXIT_VMMCALL, 0, 0)
                    return self._resume()
                if insn == VMGEXIT_BYTES:
                    self._cur_len = 4
                    if not self._sev_es:
                        # Outside an SEV-ES guest the REP prefix is ignored: it is VMMCALL.
                        self._exit(SvmExitCode.SVM_EXIT_VMMCALL, 0, 0)
                        return self._resume()
                    self._exit(SvmExitCode.SVM_EXIT_VMGEXIT, 0, 0)
                    if not self._stop_requested:
                        # The hardware resumes an SEV-ES guest after VMGEXIT; KVM cannot (and
                        # need not) move the encrypted RIP.
                        self._wr(_RIP, rip + 4)
                    return self._resume()
                if insn == PVALIDATE_BYTES and self._snp:
                    self._cur_len = 4
                    self._pvalidate(rip)
                    return self._resume()
            elif head == VMCALL_BYTES:
                self._cur_len = 3
                self._exit(VmxExitReason.EXIT_REASON_VMCALL, 0, 0)
                return self._resume()
            # Everything else Unicorn cannot execute is #UD on this CPU (VMCALL on AMD,
            # VMMCALL on Intel, UD2, TDCALL outside a TD, ...).
            self._cur_len = 3 if head in (VMCALL_BYTES, VMMCALL_BYTES) else 0
            if insn == TDCALL_BYTES:
                self._cur_len = 4
            self._raise_ud(rip, insn)
            return self._resume()
        finally:
            self._ctx = _CTX_NONE

    def _pvalidate(self, rip: int) -> None:
        """PVALIDATE (F2 0F 01 FF): RAX = VA, ECX = size, EDX = validate (APM vol. 3)."""
        assert self.rmp is not None
        va = self._rd(_UC_REG[Reg.RAX])
        size = self._rd(_UC_REG[Reg.RCX]) & 0xFFFFFFFF
        validate = bool(self._rd(_UC_REG[Reg.RDX]) & 1)
        try:
            tr = self.translate(va & ~0xFFF, ACCESS_READ, supervisor=True)
        except _DeliveryFault as fault:
            self._deliver_now(fault.vector, fault.error_code, cr2=fault.cr2)
            return
        frame = tr.gpa >> PAGE_SHIFT
        if va & 0xFFF or (size == 1 and va & 0x1FFFFF):
            result = PvalidateResult(PVALIDATE_FAIL_INPUT, False)
        elif self.stage2_private is not None and not self.stage2_private[frame]:
            # PVALIDATE is a private access: against a shared (unassigned) GFN the stage-2
            # walk faults, and KVM sees KVM_EXIT_MEMORY_FAULT (sev.c, sev_handle_rmp_fault).
            self._exit(SvmExitCode.SVM_EXIT_NPF, NPF_GUEST_ENC, tr.gpa)
            return  # RIP unchanged: retried if the VMM converted the page
        else:
            result = self.rmp.pvalidate(frame, size, validate)
        self._tracer.emit("hw", "pvalidate", gpa=tr.gpa, size=size, validate=validate, eax=result.eax, cf=result.cf)
        self._wr(_UC_REG[Reg.RAX], result.eax)
        flags = self._rd(_UC_REG[Reg.RFLAGS]) & ~RFLAGS_CF
        self._wr(_UC_REG[Reg.RFLAGS], flags | (RFLAGS_CF if result.cf else 0))
        self._wr(_RIP, rip + 4)

    def _raise_ud(self, rip: int, insn: bytes) -> None:
        if self._intercept_ud:
            if self.vendor is Vendor.AMD:
                self._exit(SvmExitCode.SVM_EXIT_UD, 0, 0)
            else:
                info = VMX_INTR_INFO_VALID | VMX_INTR_TYPE_HARD_EXCEPTION | Vector.UD
                self._exit(VmxExitReason.EXIT_REASON_EXCEPTION_NMI, info, 0)
            return
        self._tracer.emit("hw", "exception", vector=int(Vector.UD), rip=rip, bytes=insn.hex(), intercepted=False)
        if self.on_guest_ud is not None:
            self.on_guest_ud(rip, insn)
        self._deliver_now(Vector.UD, None)

    def _resume(self) -> bool:
        # True resumes at the RIP we left. After a stop request, False ends the run right here
        # (Unicorn stops with UC_ERR_INSN_INVALID, RIP unchanged), so an instruction whose
        # completion is still pending (a user exit the VMM has not answered) is not re-run.
        return not self._stop_requested

    def _exit(self, code: int, info1: int, info2: int) -> None:
        if self.hypervisor is None:
            raise HardwareError("VM exit with no hypervisor attached")
        if self._tracer.enabled:
            self._tracer.emit("hw", "vmexit", code=code, info1=info1, info2=info2, rip=self._cur_rip)
        self.hypervisor.vmexit(code, info1, info2)

    def _on_cpuid(self, _h: Any, _ud: Any) -> int:
        self._cur_rip = self._rd(_RIP)
        self._cur_len = 2
        self._ctx = _CTX_CPUID
        self._cpuid_skip = False
        try:
            if self.vendor is Vendor.AMD:
                self._exit(SvmExitCode.SVM_EXIT_CPUID, 0, 0)
            else:
                self._exit(VmxExitReason.EXIT_REASON_CPUID, 0, 0)
        finally:
            self._ctx = _CTX_NONE
        return 1 if self._cpuid_skip else 0

    def _io_exit(self, port: int, size: int, is_in: bool) -> None:
        self._cur_rip = self._rd(_RIP)
        self._cur_len = 1  # not used: IN/OUT complete natively
        self._ctx = _CTX_IO
        try:
            if self.vendor is Vendor.AMD:
                info1 = (port << SVM_IOIO_PORT_SHIFT) | ((size & 7) << SVM_IOIO_SIZE_SHIFT)
                if is_in:
                    info1 |= SVM_IOIO_TYPE_IN
                self._exit(SvmExitCode.SVM_EXIT_IOIO, info1, 0)
            else:
                qual = (port << VMX_IO_PORT_SHIFT) | (size - 1)
                if is_in:
                    qual |= VMX_IO_IN
                self._exit(VmxExitReason.EXIT_REASON_IO_INSTRUCTION, qual, 0)
        finally:
            self._ctx = _CTX_NONE

    def _on_out(self, _h: Any, port: int, size: int, value: int, _ud: Any) -> None:
        self._io_exit(port, size, False)

    def _on_in(self, _h: Any, port: int, size: int, _ud: Any) -> int:
        self._io_in_value = 0xFFFFFFFF
        self._io_exit(port, size, True)
        return self._io_in_value & ((1 << (8 * size)) - 1)

    # ---------------------------------------------------------------- exceptions
    def _on_intr(self, _h: Any, intno: int, _ud: Any) -> None:
        error_code = self._reset_old_exception()
        rip = self._rd(_RIP)
        software = intno >= 32 or intno in (Vector.BP, Vector.OF)
        error = error_code if intno in ERROR_CODE_VECTORS and not software else None
        self._tracer.emit("hw", "exception", vector=intno, rip=rip, software=software)
        self._deliver_now(intno, error, software=software)

    def _reset_old_exception(self) -> int:
        """Reset QEMU's old_exception (see old_exception_offset); returns env->error_code."""
        ctx = self._uc_ctx
        self._uc.context_update(ctx)
        addr = ctypes.cast(ctx._context, ctypes.c_void_p).value
        assert addr is not None
        ctypes.c_int32.from_address(addr + self._old_exc_off).value = -1
        error_code = ctypes.c_uint32.from_address(addr + self._error_code_off).value
        self._uc.context_restore(ctx)
        return int(error_code)

    def _set_cpl(self, cpl: int) -> None:
        """Set the CPL bits of QEMU's hflags (see hflags_offset): a CS load does not."""
        ctx = self._uc_ctx
        self._uc.context_update(ctx)
        addr = ctypes.cast(ctx._context, ctypes.c_void_p).value
        assert addr is not None
        field = ctypes.c_uint32.from_address(addr + self._hflags_off)
        field.value = (field.value & ~3) | (cpl & 3)
        self._uc.context_restore(ctx)

    def _enter_64bit_code(self) -> None:
        """Set QEMU's HF_CS64 and CS.base = 0 (see cs_base_offset) for a 64-bit handler."""
        ctx = self._uc_ctx
        self._uc.context_update(ctx)
        addr = ctypes.cast(ctx._context, ctypes.c_void_p).value
        assert addr is not None
        field = ctypes.c_uint32.from_address(addr + self._hflags_off)
        field.value |= _HF_CS64
        ctypes.c_uint64.from_address(addr + self._cs_base_off).value = 0
        self._uc.context_restore(ctx)
        self._cs_bases.clear()

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Inject an exception (the VMCB EVENTINJ / VMCS entry-interruption field)."""
        if self._ctx == _CTX_INVALID or (self._ctx == _CTX_NONE and not self._running):
            self._deliver_now(vector, error_code)
        else:
            self._pending_events.append(_PendingFault(vector, error_code))
            self.request_stop()


    def _deliver_now(self, vector: int, error_code: int | None, software: bool = False, cr2: int | None = None) -> None:
        if cr2 is not None:
            self._wr(_UC_REG[Reg.CR2], cr2)
        try:
            self._deliver(vector, error_code, software)
        except _NestedFault as nested:
            self._vectoring_npf(vector, error_code, software, nested)
        except _DeliveryFault as fault:
            if fault.cr2 is not None:
                self._wr(_UC_REG[Reg.CR2], fault.cr2)
            # SDM table 6-5, simplified: a fault while delivering becomes #DF when either is
            # contributory or a #PF; a fault while delivering #DF is a triple fault.
            if vector == Vector.DF:
                self._triple_fault()
                return
            benign = vector not in CONTRIBUTORY_VECTORS and vector != Vector.PF
            if benign and fault.vector != Vector.PF and fault.vector not in CONTRIBUTORY_VECTORS:
                self._deliver_now(fault.vector, fault.error_code)
                return
            try:
                self._deliver(Vector.DF, 0, False)
            except _NestedFault as nested:
                self._vectoring_npf(Vector.DF, 0, False, nested)
            except _DeliveryFault:
                self._triple_fault()

    def _vectoring_npf(self, vector: int, error_code: int | None, software: bool, nested: _NestedFault) -> None:
        """Delivering `vector` touched a GPA outside guest memory (the IDT, the TSS or the stack,
        or a page table on the way to one): the NPF exit carries the event in EXITINTINFO."""
        info = EXITINTINFO_VALID | vector | (EXITINTINFO_TYPE_SOFT_INT if software else EXITINTINFO_TYPE_EXCEPTION)
        if error_code is not None:
            info |= EXITINTINFO_ERROR_VALID | ((error_code & 0xFFFFFFFF) << 32)
        self._tracer.emit("hw", "npf_vectoring", vector=vector, gpa=nested.gpa, error=nested.npf_error)
        self._exit_int_info = info
        self._npf_linear = nested.cr2 if nested.cr2 is not None else 0
        self._cur_rip = self._rd(_RIP)
        code = SvmExitCode.SVM_EXIT_NPF if self.vendor is Vendor.AMD else VmxExitReason.EXIT_REASON_EPT_VIOLATION
        try:
            self._exit(code, nested.npf_error, nested.gpa)
        finally:
            self._exit_int_info = 0

    def _triple_fault(self) -> None:
        self._tracer.emit("hw", "triple_fault", rip=self._rd(_RIP))
        self._shutdown = True
        self._stop_requested = True
        self._uc.emu_stop()

    def _deliver(self, vector: int, error_code: int | None, software: bool) -> None:
        """Deliver through the 64-bit IDT (SDM vol. 3 6.14): push the frame, load the gate."""
        _, idt_base, idt_limit, _ = self._uc.reg_read(ux.UC_X86_REG_IDTR)
        ext = 0 if software else 1
        if vector * 16 + 15 > idt_limit:
            raise _DeliveryFault(Vector.GP, vector * 8 + 2 + ext)
        gate = self.read_virtual(idt_base + vector * 16, 16)
        lo, hi = struct.unpack("<QQ", gate)
        attrs = (lo >> 40) & 0xFF
        if not attrs & 0x80 or (attrs & 0xF) not in (0xE, 0xF):
            raise _DeliveryFault(Vector.NP if not attrs & 0x80 else Vector.GP, vector * 8 + 2 + ext)
        cpl = self.cpl()
        if software and ((attrs >> 5) & 3) < cpl:
            raise _DeliveryFault(Vector.GP, vector * 8 + 2)
        selector = (lo >> 16) & 0xFFFF
        target = (lo & 0xFFFF) | (((lo >> 48) & 0xFFFF) << 16) | ((hi & 0xFFFFFFFF) << 32)
        ist = (lo >> 32) & 7
        new_cpl = selector & 3
        rsp = self._rd(_UC_REG[Reg.RSP])
        ss = self._rd(_UC_REG[Reg.SS])
        rflags = self._rd(_UC_REG[Reg.RFLAGS])
        cs = self._rd(_CS)
        rip = self._rd(_RIP)
        if ist or new_cpl < cpl:
            _, tss_base, _, _ = self._uc.reg_read(ux.UC_X86_REG_TR)
            off = 0x24 + (ist - 1) * 8 if ist else 4 + new_cpl * 8
            new_rsp = _U64S.unpack(self.read_virtual(tss_base + off, 8))[0]
        else:
            new_rsp = rsp
        new_rsp &= ~0xF
        frame = [ss, rsp, rflags, cs, rip]
        if error_code is not None:
            frame.append(error_code)
        data = b"".join(_U64S.pack(v & U64) for v in reversed(frame))
        new_rsp -= len(data)
        self.write_virtual(new_rsp, data)
        if new_cpl < cpl:
            self._set_cpl(new_cpl)
            self._uc.reg_write(ux.UC_X86_REG_SS, new_cpl)  # NULL selector with RPL = new CPL
        from_compat = not self.mode_of(cs & 0xFFFF)
        self._uc.reg_write(ux.UC_X86_REG_CS, selector)
        if from_compat:
            # Unicorn's CS write changes only the selector: QEMU's HF_CS64 and CS.base stay
            # those of the 32-bit code, so the 64-bit handler would run as 32-bit code at
            # base + RIP (canary in tests/test_hostile_guests.py). Load both as the gate does.
            self._enter_64bit_code()
        self._wr(_UC_REG[Reg.RSP], new_rsp)
        new_flags = rflags & ~(RFLAGS_TF | RFLAGS_RF | RFLAGS_VM | (1 << 14))
        if (attrs & 0xF) == 0xE:
            new_flags &= ~RFLAGS_IF
        self._wr(_UC_REG[Reg.RFLAGS], new_flags)
        self._wr(_RIP, target)
        self.exceptions_delivered += 1
        self._tracer.emit(
            "hw", "deliver", vector=vector, error_code=error_code, rip=rip, handler=target, name=vector_name(vector)
        )

    # ------------------------------------------------------------------------ run
    def run(self, timeout_s: float) -> RunStop:
        """Run the guest until the hypervisor asks to stop, a timeout, or an emulator error."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._pending_events:
                ev = self._pending_events.pop(0)
                self._deliver_now(ev.vector, ev.error_code)
            if self._shutdown:
                self._shutdown = False
                code = (SvmExitCode.SVM_EXIT_SHUTDOWN if self.vendor is Vendor.AMD
                        else VmxExitReason.EXIT_REASON_TRIPLE_FAULT)
                self._stop_requested = False
                self._exit(code, 0, 0)
                if self._stop_requested:
                    return RunStop(StopReason.REQUESTED)
                return RunStop(StopReason.EMULATOR_ERROR, "vCPU resumed after a triple fault")
            if self._stop_requested:
                self._stop_requested = False
                return RunStop(StopReason.REQUESTED)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return RunStop(StopReason.TIMEOUT)
            if self._site_reset_pending:
                self._reset_site_hooks()
            rip = self._rd(_RIP)
            self._pending_fault = None
            self._pending_npf = None
            error: unicorn.UcError | None = None
            self._running = True
            try:
                self._uc.emu_start(rip, U64, timeout=max(1, int(remaining * 1e6)))
            except unicorn.UcError as exc:
                error = exc
            finally:
                self._running = False
            if self._at_breakpoint:
                self._at_breakpoint = False
                self._quiesced = False  # see _on_breakpoint
                self.flush_tlb()
                if self._hook_error is None and not self._stop_requested:
                    return RunStop(StopReason.REQUESTED, "breakpoint")
            if self._hook_error is not None:
                exc2, self._hook_error = self._hook_error, None
                raise exc2
            if self._stop_requested and not self._shutdown:
                self._stop_requested = False
                return RunStop(StopReason.REQUESTED)
            if error is None and self._site_reset_pending and not self._shutdown:
                continue  # _scan_msr_sites stopped the run before the block ran: reset, resume
            if error is not None:
                if self._pending_fault is not None:
                    pf = self._pending_fault
                    self._pending_fault = None
                    cr2 = None if pf.cr2 is None else self._fault_address(pf.cr2, pf.error_code)
                    self._tracer.emit("hw", "fault", vector=pf.vector, cr2=cr2, error_code=pf.error_code,
                                      rip=self._rd(_RIP))
                    self._deliver_now(pf.vector, pf.error_code, cr2=cr2)
                    continue
                if self._pending_npf is not None:
                    gpa, npf_error = self._pending_npf
                    self._pending_npf = None
                    code = (SvmExitCode.SVM_EXIT_NPF if self.vendor is Vendor.AMD
                            else VmxExitReason.EXIT_REASON_EPT_VIOLATION)
                    self._cur_rip = self._rd(_RIP)
                    self._npf_linear = self._fault_address(self._npf_linear, npf_error & PFERR_FETCH)
                    self._exit(code, npf_error, gpa)
                    continue
                if self._shutdown:
                    continue
                return RunStop(StopReason.EMULATOR_ERROR, f"{error} at rip 0x{self._rd(_RIP):x}")
            if self._shutdown:
                continue
            if self._uc.query(ucc.UC_QUERY_TIMEOUT):
                return RunStop(StopReason.TIMEOUT)
            if self._rd(_RIP) == self.breakpoint:
                return RunStop(StopReason.REQUESTED, "breakpoint")
            # emu_start returned on its own: Unicorn ends a run at HLT with RIP after it.
            rip = self._rd(_RIP)
            try:
                prev = self.fetch_bytes(rip - 1, 1)
            except _DeliveryFault:
                prev = b""
            if prev == b"\xf4":
                self._cur_rip = rip - 1
                self._cur_len = 1
                code = SvmExitCode.SVM_EXIT_HLT if self.vendor is Vendor.AMD else VmxExitReason.EXIT_REASON_HLT
                # RIP already points after HLT, as after KVM's kvm_emulate_halt().
                self._exit(code, 0, 0)
                continue
            return RunStop(StopReason.EMULATOR_ERROR, f"emulation ended unexpectedly at rip 0x{rip:x}")
