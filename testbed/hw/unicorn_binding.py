"""The Unicorn binding: the only module that imports Unicorn (tests/test_layering.py).

It owns the engine and everything that speaks libunicorn's language: the engine and its
mappings of guest memory, the raw ctypes hooks (each calls one plain Python method of the
vCPU model above it: `_tlb_fill`, `_on_exception`, `_on_out`, `_on_in`, `_on_cpuid`,
`_on_invalid_exit`, code-site callbacks), register access through prepared ctypes calls, and
the calibration of the QEMU CPU-state fields Unicorn does not expose (their offsets inside a
saved context are measured once per process: `old_exception_offset` and friends).

Hot-path notes (UNICORN.md, "Speed"): the Python binding's reg_read costs ~1.6 us while a
direct ctypes call into libunicorn costs ~0.44 us, and a hook registered straight through
uc_hook_add skips the binding's wrapper, so hooks and register access here use ctypes. The
optional C extension (testbed/hw/_fastexit.c) replaces the INSN_INVALID hook's trampoline and
snapshot read; it delivers to the same `_on_invalid_exit`. The optional testbed/hw/_nativemmu.c
registers the TLB-fill hook in C and completes common-case fills without Python, handing the
rest to the same `_tlb_fill` (testbed/hw/mmu.py); TESTBED_NO_NATIVE_MMU=1 forces the Python fill.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NoReturn, cast

import unicorn
from unicorn import unicorn_const as ucc
from unicorn import x86_const as ux
from unicorn.unicorn_py3 import unicorn as ucpy

from testbed.errors import MachineClosedError, TestbedError
from testbed.hw.memory import GuestMemory
from testbed.hw.watchdog import WATCHDOG, Alarm
from testbed.x86 import MSR_EFER, U64, Reg
from testbed.x86.paging import ACCESS_FETCH, ACCESS_READ, ACCESS_WRITE

_fastexit: Any
try:  # the optional C fast path for exits (testbed/hw/_fastexit.c, built by setup.py)
    from testbed.hw import _fastexit
except ImportError:  # pragma: no cover - depends on the build
    _fastexit = None
_nativemmu: Any
try:  # the optional page walk and TLB fill in C (testbed/hw/_nativemmu.c, built by setup.py)
    from testbed.hw import _nativemmu
except ImportError:  # pragma: no cover - depends on the build
    _nativemmu = None

#: Unicorn-physical base of the private (plaintext) alias; the DRAM alias sits at 0.
PRIVATE_ALIAS_BASE = 1 << 39  # clear of guest-physical addresses; RAM maps up to 2^52 at one speed (emulator-facts)

#: CR4.OSXSAVE: XSETBV/XGETBV are allowed (the XCR0 calibration sets it)
CR4_OSXSAVE = 1 << 18

#: Page permissions of a TLB entry (Unicorn's UC_PROT_*), for the MMU.
PROT_READ = ucc.UC_PROT_READ
PROT_WRITE = ucc.UC_PROT_WRITE
PROT_EXEC = ucc.UC_PROT_EXEC
PROT_ALL = ucc.UC_PROT_ALL

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
    Reg.DR6: ux.UC_X86_REG_DR6,
}

#: capstone register names -> Unicorn ids, for effective-address computation.
_REG_NAMES = {r.name.lower(): uc for r, uc in _UC_REG.items()}
_REG_NAMES.update({
    name: getattr(ux, f"UC_X86_REG_{name.upper()}")
    for name in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "r8d", "r9d", "r10d", "r11d", "r12d",
                 "r13d", "r14d", "r15d", "fs_base", "gs_base")
})

#: Reg -> Unicorn register id, indexable by the IntEnum (list indexing avoids Enum hashing).
_UC_REG_BY_INDEX = tuple(_UC_REG[Reg(i)] for i in range(len(Reg)))

#: x87/SSE registers of the vCPU state record (fpu_state): FCW, FSW, FTW, FOP, FIP, FDP, MXCSR
_FPU_SCALARS = (ux.UC_X86_REG_FPCW, ux.UC_X86_REG_FPSW, ux.UC_X86_REG_FPTAG, ux.UC_X86_REG_FOP,
                ux.UC_X86_REG_FIP, ux.UC_X86_REG_FDP, ux.UC_X86_REG_MXCSR)
#: the physical x87 registers R0-R7 (FP0-7; ST(i) is R((TOP + i) % 8))
_FPU_STACK = tuple(getattr(ux, f"UC_X86_REG_FP{i}") for i in range(8))
_XMM = tuple(getattr(ux, f"UC_X86_REG_XMM{i}") for i in range(16))
_CS = ux.UC_X86_REG_CS
_SEGMENTS = frozenset({Reg.CS, Reg.SS, Reg.DS, Reg.ES, Reg.FS, Reg.GS})
_TABLE_REGS = {"gdt": ux.UC_X86_REG_GDTR, "idt": ux.UC_X86_REG_IDTR, "tr": ux.UC_X86_REG_TR,
               "ldt": ux.UC_X86_REG_LDTR}
_ACCESS_FROM_UC = {ucc.UC_MEM_READ: ACCESS_READ, ucc.UC_MEM_WRITE: ACCESS_WRITE, ucc.UC_MEM_FETCH: ACCESS_FETCH}

_INVALID_CFUNC = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p)
_TLB_CFUNC = ctypes.CFUNCTYPE(
    ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(ucpy.uc_tlb_entry), ctypes.c_void_p
)
_INTR_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)
_OUT_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p)
_IN_CFUNC = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p)
_CPUID_CFUNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_CODE_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)

#: QEMU's hflags bit HF_CS64: the CPU runs 64-bit code (CS.L with EFER.LMA), from the hidden
#: part of CS that a GDT rewrite does not change (measured: set at CPL 0 in 64-bit code, clear
#: after a far transfer to a 32-bit code segment).
HF_CS64 = 1 << 15


@functools.cache
def _unicorn_library() -> ctypes.CDLL:
    """libunicorn through a handle of our own (the binding's keeps its prototypes), opened once
    per process: a CDLL costs a dlopen and a new class, and a machine took nine of them."""
    return ctypes.CDLL(ucpy.uclib._name)


def entry_address(name: str) -> int:
    """The address of libunicorn's entry point `name`, for the C extensions' hooks."""
    return ctypes.cast(getattr(_unicorn_library(), name), ctypes.c_void_p).value or 0


def _raw_function(name: str) -> Any:
    """A libunicorn entry point without argtypes: ctypes then passes the prepared pointers and
    ints as they are, which halves the cost of a register access on the hot path (the binding's
    prototypes convert every argument on every call). A new function object per call (item
    access, not the library's cached attribute): each machine sets its own prototypes."""
    fn: Any = _unicorn_library()[name]
    fn.argtypes = None
    fn.restype = ctypes.c_int
    return fn


class _UcMsr(ctypes.Structure):
    """Unicorn's uc_x86_msr: what UC_X86_REG_MSR reads (rid in, value out)."""

    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]


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


class HardwareError(TestbedError):
    """The emulator did something the model cannot continue from (a testbed bug)."""


# ------------------------------------------------------------------ calibration
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


def xcr0_offset() -> int:
    """Offset of QEMU's `env->xcr0` (XCR0, what XSETBV writes and XGETBV reads).

    Unicorn has no register id for XCR0 and the testbed does not intercept XSETBV, so the
    vCPU state record (hw/vcpu_state.py: what KVM_GET_XCRS / the VMSA's XCR0 carry) reads and
    writes it here. Measured by XSETBV of 1 and of 3 (x87; x87|SSE) from fresh engines: the
    one u64 that holds the value written in both runs, and changed when 1 was written.
    """
    if "xcr0" in _CALIBRATION:
        return _CALIBRATION["xcr0"]
    candidates: set[int] | None = None
    for value in (1, 3):
        uc = unicorn.Uc(ucc.UC_ARCH_X86, ucc.UC_MODE_64)
        uc.mem_map(0, 0x10000)
        uc.reg_write(ux.UC_X86_REG_CR4, uc.reg_read(ux.UC_X86_REG_CR4) | CR4_OSXSAVE)
        # xor ecx, ecx; xor edx, edx; mov eax, value; xsetbv; xor eax, eax (RAX keeps no copy)
        code = b"\x31\xc9\x31\xd2\xb8" + value.to_bytes(4, "little") + b"\x0f\x01\xd1\x31\xc0"
        uc.mem_write(0x2000, code)
        before = bytes(uc.context_save())
        uc.emu_start(0x2000, 0x2000 + len(code))
        after = bytes(uc.context_save())
        # (Unicorn's engine starts with XCR0 = 3, so only the write of 1 changes the field.)
        found = {off for off in range(0, min(len(before), len(after)) - 8, 4)
                 if struct.unpack_from("<Q", after, off)[0] == value
                 and (value != 1 or struct.unpack_from("<Q", before, off)[0] != value)}
        candidates = found if candidates is None else candidates & found
    return _unique("xcr0", candidates or set())


class UnicornBinding(ABC):
    """The engine under one vCPU, with the hooks that call the model's handlers.

    Subclasses (the MMU, event delivery, intercepts, the run loop: testbed/hw/cpu.py lists
    them) implement the handler methods below; none of them touches Unicorn directly.
    """

    def _init_binding(self, memory: GuestMemory) -> None:
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
        # The whole reserved capacity is mapped (it equals the size unless memory can be
        # hotplugged): what lies above the RAM's current size is refused by the TLB fill, as
        # a GPA without a memslot.
        self._uc.mem_map_ptr(0, memory.capacity, ucc.UC_PROT_ALL, memory.dram_address())
        if memory.private is not None:
            # The private alias (legacy SEV) or the guest_memfd backing (hw/memory.py).
            self._uc.mem_map_ptr(PRIVATE_ALIAS_BASE, memory.capacity, ucc.UC_PROT_ALL, memory.private_address())
        self._h = ctypes.c_void_p(self._uc._uch.value)  # a plain pointer: no argtypes conversion
        self._lib = ucpy.uclib
        self._val = ctypes.c_uint64()
        self._ref = ctypes.byref(self._val)
        self._reg_read_batch = _raw_function("uc_reg_read_batch")
        self._reg_write_batch = _raw_function("uc_reg_write_batch")
        self._arg_vals = (ctypes.c_uint64 * 4)()
        self._arg_ids = (ctypes.c_int * 4)(ux.UC_X86_REG_RBX, ux.UC_X86_REG_RCX, ux.UC_X86_REG_RDX, ux.UC_X86_REG_RSI)
        self._arg_ptrs = (ctypes.c_void_p * 4)(*(ctypes.addressof(self._arg_vals) + 8 * i for i in range(4)))
        # CS, CR3, CR0 and EFER (a uc_x86_msr) in one batch: what a TLB fill reads
        self._fill_regs = (ctypes.c_uint64 * 3)()
        self._fill_efer = _UcMsr(MSR_EFER, 0)
        self._fill_ids = (ctypes.c_int * 4)(ux.UC_X86_REG_CS, ux.UC_X86_REG_CR3, ux.UC_X86_REG_CR0,
                                            ux.UC_X86_REG_MSR)
        self._fill_ptrs = (ctypes.c_void_p * 4)(*(ctypes.addressof(self._fill_regs) + 8 * i for i in range(3)),
                                                ctypes.addressof(self._fill_efer))
        self._snap = (ctypes.c_uint64 * 8)()
        self._snap_ids = (ctypes.c_int * 8)(
            ux.UC_X86_REG_RIP, ux.UC_X86_REG_RAX, ux.UC_X86_REG_CS, ux.UC_X86_REG_RBX, ux.UC_X86_REG_RCX,
            ux.UC_X86_REG_RDX, ux.UC_X86_REG_RSI, ux.UC_X86_REG_RFLAGS,
        )
        self._snap_ptrs = (ctypes.c_void_p * 8)(*(ctypes.addressof(self._snap) + 8 * i for i in range(8)))
        #: RAX, CS, RBX, RCX, RDX, RSI saved at the current exit (the VMCB save area), or None
        self._snapshot: tuple[int, int, int, int, int, int, bool] | None = None
        # One buffer for the batched reads (RAX, CS) and writes (RAX, RIP[, RFLAGS]) of an exit.
        self._hc_vals = (ctypes.c_uint64 * 3)()
        self._hc_ids = (ctypes.c_int * 2)(ux.UC_X86_REG_RAX, ux.UC_X86_REG_CS)
        self._hc_wids = (ctypes.c_int * 3)(ux.UC_X86_REG_RAX, ux.UC_X86_REG_RIP, ux.UC_X86_REG_RFLAGS)
        self._hc_ptrs = (ctypes.c_void_p * 3)(*(ctypes.addressof(self._hc_vals) + 8 * i for i in range(3)))
        self._reg_read = _raw_function("uc_reg_read")
        self._emu_start_fn = _raw_function("uc_emu_start")
        self._emu_stop_fn = _raw_function("uc_emu_stop")
        #: the run timeout: the process's watchdog stops the engine through this alarm
        #: (hw/watchdog.py; armed by the run loop, released by close)
        self._alarm = Alarm(functools.partial(self._emu_stop_fn, self._h))
        self._emu_start_fn.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64,
                                       ctypes.c_size_t)
        self._reg_write = _raw_function("uc_reg_write")
        self._hook_error: BaseException | None = None
        self._closed = False
        self._running = False
        self._old_exc_off = old_exception_offset()
        self._error_code_off = error_code_offset()
        self._hflags_off = hflags_offset()
        self._cs_base_off = cs_base_offset()
        self._uc_ctx = self._uc.context_save()
        self._callbacks: list[Any] = []
        self._code_cbs: dict[Callable[[int], None], Any] = {}
        self._hook_cell = ucpy.uc_hook_h()  # uc_hook_add's out parameter (_add_range_hook)
        self._install_hooks()

    # ------------------------------------------------ handlers the model implements
    @abstractmethod
    def mode_of(self, cs_selector: int) -> bool:
        """Whether code segment `cs_selector` runs 64-bit code (the MMU reads its descriptor)."""

    @abstractmethod
    def _tlb_fill(self, vaddr: int, access: int) -> tuple[int, int] | None:
        """(Unicorn-physical page, PROT_* permissions) for a TLB miss, None for a fault."""
        ...

    @abstractmethod
    def _on_exception(self, vector: int, error_code: int) -> None:
        """An exception Unicorn raised (UC_HOOK_INTR), with QEMU's pending error code."""
        ...

    @abstractmethod
    def _on_out(self, port: int, size: int, value: int) -> None:
        """An OUT Unicorn executed (UC_HOOK_INSN)."""

    @abstractmethod
    def _on_in(self, port: int, size: int) -> int:
        """An IN Unicorn executed (UC_HOOK_INSN): the value read."""

    @abstractmethod
    def _on_cpuid(self) -> int:
        """1 to skip the CPUID instruction, 0 to let it run natively."""
        ...

    @abstractmethod
    def _on_invalid_exit(self, rip: int, rax: int, cs: int, rbx: int, rcx: int, rdx: int, rsi: int,
                         rflags: int) -> bool:
        """An instruction Unicorn cannot execute, with the exit's register snapshot; True resumes."""
        ...

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
        #: the TLB fill in C (testbed/hw/_nativemmu.c), configured by the MMU; None: Python's
        self._native_mmu: Any = None
        self._native_fills = 0  # fills the C hook completed, kept when it is released
        if _nativemmu is not None and not os.environ.get("TESTBED_NO_NATIVE_MMU"):
            self._native_mmu = _nativemmu.NativeMmu(
                self._h.value, entry_address("uc_hook_add"), entry_address("uc_reg_read_batch"),
                [ux.UC_X86_REG_CS, ux.UC_X86_REG_CR3, ux.UC_X86_REG_CR0, ux.UC_X86_REG_MSR],
                self._guard(self._tlb_fill, None),
            )
        else:
            self._add_hook(ucc.UC_HOOK_TLB_FILL, _TLB_CFUNC, self._guard(self._on_tlb_fill_raw, False))
        self._fastexit: Any = None
        if _fastexit is not None and not os.environ.get("TESTBED_NO_FASTEXIT"):
            self._fastexit = _fastexit.FastExit(
                self._h.value, entry_address("uc_hook_add"), entry_address("uc_reg_read_batch"),
                entry_address("uc_reg_write_batch"), list(self._snap_ids), 2, list(self._hc_wids),
                self._on_invalid_exit,
            )
        else:
            self._add_hook(ucc.UC_HOOK_INSN_INVALID, _INVALID_CFUNC, self._on_invalid_ctypes)
        self._bind_writers()
        self._add_hook(ucc.UC_HOOK_INTR, _INTR_CFUNC, self._guard(self._on_intr_raw, None))
        self._add_hook(ucc.UC_HOOK_INSN, _OUT_CFUNC, self._guard(self._on_out_raw, None), ux.UC_X86_INS_OUT)
        self._add_hook(ucc.UC_HOOK_INSN, _IN_CFUNC, self._guard(self._on_in_raw, 0), ux.UC_X86_INS_IN)
        self._add_hook(ucc.UC_HOOK_INSN, _CPUID_CFUNC, self._guard(self._on_cpuid_raw, 0), ux.UC_X86_INS_CPUID)

    def _on_tlb_fill_raw(self, _h: Any, vaddr: int, uc_access: int, entry: Any, _ud: Any) -> bool:
        result = self._tlb_fill(vaddr, _ACCESS_FROM_UC.get(uc_access, ACCESS_READ))
        if result is None:
            return False
        e = entry.contents
        e.paddr, e.perms = result
        return True

    def _on_intr_raw(self, _h: Any, intno: int, _ud: Any) -> None:
        self._on_exception(intno, self._reset_old_exception())

    def _on_out_raw(self, _h: Any, port: int, size: int, value: int, _ud: Any) -> None:
        self._on_out(port, size, value)

    def _on_in_raw(self, _h: Any, port: int, size: int, _ud: Any) -> int:
        return self._on_in(port, size)

    def _on_cpuid_raw(self, _h: Any, _ud: Any) -> int:
        return self._on_cpuid()

    def _on_invalid_ctypes(self, _h: Any, _ud: Any) -> bool:
        """The INSN_INVALID hook through ctypes (when the C fast path is not built)."""
        try:
            # One batched read of what a hypercall exit needs (RIP, RAX, CS, RBX, RCX, RDX,
            # RSI, RFLAGS): the state the hardware saves into the VMCB/VMCS at the exit, which
            # KVM then reads from there (hypercall_regs / hypercall_args, the trap flag).
            s = self._snap
            s[2] = 0  # CS fills only the low bytes of its slot
            self._reg_read_batch(self._h, self._snap_ids, self._snap_ptrs, 8)
        except BaseException as exc:  # re-raised from run(); must not unwind through C
            return self._hook_failed(exc)
        return self._on_invalid_exit(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])

    def _hook_failed(self, exc: BaseException) -> bool:
        # Re-raised from run(); an exception must not unwind through Unicorn's C frames.
        if self._hook_error is None:
            self._hook_error = exc
        self._uc.emu_stop()
        return False

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

    def _add_code_hook(self, fn: Callable[[int], None], begin: int, end: int) -> int:
        """A UC_HOOK_CODE on [begin, end] calling fn(address); returns its handle."""
        cb = self._code_cbs.get(fn)
        if cb is None:
            cb = self._code_cb(fn)
        return self._add_range_hook(ucc.UC_HOOK_CODE, cb, begin, end)

    def _add_block_hook(self, fn: Callable[[int], None]) -> int:
        """A UC_HOOK_BLOCK on every block (begin 1 > end 0) calling fn(address); returns its handle."""
        cb = self._code_cbs.get(fn)
        if cb is None:
            cb = self._code_cb(fn)
        return self._add_range_hook(ucc.UC_HOOK_BLOCK, cb, 1, 0)

    def _code_cb(self, fn: Callable[[int], None]) -> Any:
        """fn's trampoline for code and block hooks, as the pointer uc_hook_add takes (the
        trampoline kept alive beside it); one per callback, shared by all its hooks."""
        trampoline = _CODE_CFUNC(self._guard(lambda _h, address, _size, _ud: fn(address), None))
        self._callbacks.append(trampoline)
        cb = self._code_cbs[fn] = ctypes.cast(trampoline, ctypes.c_void_p)
        return cb

    def _add_range_hook(self, htype: int, cb: Any, begin: int, end: int) -> int:
        # A site scan adds ~25 of these per page: the pointer is cast once (_code_cb), one handle
        # cell serves every call, and uc_hook_add's argtypes convert begin and end.
        hh = self._hook_cell
        status = self._lib.uc_hook_add(self._h, ctypes.byref(hh), htype, cb, None, begin, end)
        if status != ucc.UC_ERR_OK:
            raise HardwareError(f"uc_hook_add({htype} @0x{begin:x}) failed: {unicorn.UcError(status)}")
        return int(hh.value)

    def _del_hook(self, handle: int) -> None:
        self._lib.uc_hook_del(self._h, ucpy.uc_hook_h(handle))

    # --------------------------------------------------------------------------- release
    @property
    def closed(self) -> bool:
        """Whether close() released the emulator."""
        return self._closed

    def _release_engine(self) -> None:
        """uc_close, then every entry point refuses (MachineClosedError)."""
        self._closed = True
        # No run is armed (close() refuses inside a run); the watchdog drops the engine's stop
        # before uc_close frees the engine.
        WATCHDOG.release(self._alarm)
        # The binding closes the engine in a weakref.finalize; calling it runs uc_close once and
        # disarms it (a second uc_close would free the engine twice). Canary:
        # tests/test_resources.py pins that the binding still has it.
        release = getattr(self._uc, "_Uc__finalizer", None)
        if release is not None:
            release()
        fastexit, self._fastexit = self._fastexit, None
        self._bind_writers()
        if fastexit is not None and hasattr(fastexit, "close"):  # (an extension built before close())
            fastexit.close()  # its hook died with the engine; drop its handler (the vCPU)
        native_mmu, self._native_mmu = self._native_mmu, None
        if native_mmu is not None:
            self._native_fills = native_mmu.fills
            native_mmu.close()  # its hook died with the engine; drop its fallback and buffers
        released = cast(Any, _RELEASED)
        self._uc = released
        self._lib = released
        self._reg_read = self._reg_write = released
        self._emu_start_fn = self._emu_stop_fn = released
        self._reg_read_batch = self._reg_write_batch = released
        self._callbacks.clear()
        self._code_cbs.clear()
        self._hook_error = None

    # ------------------------------------------------------------ registers (VMCB/VMCS)
    def read_reg(self, reg: Reg) -> int:
        """Read a register (fast path for GPRs, RIP, CRs and selectors)."""
        self._val.value = 0  # a segment register fills only the low bytes of the scratch
        self._reg_read(self._h, _UC_REG_BY_INDEX[reg], self._ref)
        return int(self._val.value)

    def write_reg(self, reg: Reg, value: int) -> None:
        """Write a register; RIP writes made inside the CPUID/IO hooks are not honoured."""
        if reg in _SEGMENTS:
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

    def hypercall_regs(self) -> tuple[int, int, bool]:
        """(RAX, CS selector, 64-bit mode): what KVM needs first on a hypercall."""
        snap = self._snapshot
        if snap is not None:
            return snap[0], snap[1], snap[6]
        values = self._hc_vals
        values[1] = 0  # Unicorn writes only the selector's low bytes into this slot
        self._reg_read_batch(self._h, self._hc_ids, self._hc_ptrs, 2)
        cs = int(values[1]) & 0xFFFF
        return int(values[0]), cs, self.mode_of(cs)

    def _write_batch(self, *values: int) -> None:
        """RAX, RIP (and RFLAGS), as many as given, in one ctypes batched write."""
        buffer = self._hc_vals
        for i, value in enumerate(values):
            buffer[i] = value
        self._reg_write_batch(self._h, self._hc_wids, self._hc_ptrs, len(values))

    def _bind_writers(self) -> None:
        """The exit's batched writes, chosen once: the C extension's when built (it masks RAX to
        64 bits itself), else one ctypes batch each. `_write_rax_rip(rax, rip)` and
        `_write_rax_rip_rflags(rax, rip, rflags)` are then called directly on the hot paths."""
        fastexit = self._fastexit
        self._write_rax_rip: Callable[[int, int], None] = (
            fastexit.write2 if fastexit is not None else self._batch_rax_rip)
        self._write_rax_rip_rflags: Callable[[int, int, int], None] = (
            fastexit.write3 if fastexit is not None else self._batch_rax_rip_rflags)

    def _batch_rax_rip(self, rax: int, rip: int) -> None:
        self._write_batch(rax & U64, rip)

    def _batch_rax_rip_rflags(self, rax: int, rip: int, rflags: int) -> None:
        self._write_batch(rax & U64, rip, rflags)

    def _read_rflags(self) -> int:
        """RFLAGS (through the C extension when built: one call, no ctypes round trip)."""
        if self._fastexit is not None:
            return int(self._fastexit.read3())
        return self.read_reg(Reg.RFLAGS)

    def _read_fill_regs(self) -> tuple[int, int, int, int]:
        """CS, CR3, CR0 and EFER in one batched read (what a TLB fill needs)."""
        s = self._fill_regs
        s[0] = 0  # CS fills only the low bytes of its slot
        self._reg_read_batch(self._h, self._fill_ids, self._fill_ptrs, 4)
        return int(s[0]), int(s[1]), int(s[2]), int(self._fill_efer.value)

    def _reg_by_name(self, name: str) -> int:
        """A register by its capstone name (0 for one not modelled: segment bases and others)."""
        reg = _REG_NAMES.get(name)
        if reg is None:
            return 0
        self._val.value = 0
        self._reg_read(self._h, reg, self._ref)
        return int(self._val.value)

    def cpl(self) -> int:
        """Current privilege level (CS.RPL, which equals CS.DPL for code the CPU runs)."""
        return self.read_reg(Reg.CS) & 3

    def descriptor_table(self, which: str) -> tuple[int, int]:
        """(base, limit) of GDTR ("gdt"), IDTR ("idt"), TR ("tr") or LDTR ("ldt")."""
        _, base, limit, _ = self._uc.reg_read(_TABLE_REGS[which])
        return int(base), int(limit)

    def set_msr(self, msr: int, value: int) -> None:
        """Set an MSR the emulator models (EFER at reset)."""
        self._uc.msr_write(msr, value)

    def get_msr(self, msr: int) -> int:
        """Read an MSR the emulator models (the firmware's copy of the VMSA; KVM_GET_MSRS)."""
        return int(self._uc.msr_read(msr))

    def task_register(self) -> tuple[int, int, int, int]:
        """TR as (selector, base, limit, flags) (KVM_GET_SREGS)."""
        sel, base, limit, flags = self._uc.reg_read(ux.UC_X86_REG_TR)
        return int(sel), int(base), int(limit), int(flags)

    def set_descriptor_table(self, which: str, base: int, limit: int) -> None:
        """Load GDTR or IDTR (KVM_SET_SREGS)."""
        self._uc.reg_write(_TABLE_REGS[which], (0, base, limit, 0))

    def set_tr(self, selector: int, base: int, limit: int, flags: int = 0x8B) -> None:
        """Load the task register (KVM_SET_SREGS); `flags` as `task_register` reads them."""
        self._uc.reg_write(ux.UC_X86_REG_TR, (selector, base, limit, flags))

    # ------------------------------------------------------- x87/SSE state (KVM_GET_XSAVE)
    def fpu_state(self) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[int, ...]]:
        """The x87/SSE state Unicorn exposes, as the FXSAVE area holds it (KVM_GET_XSAVE's
        legacy region; the VMSA's x87/XMM fields, sev.c sev_es_sync_vmsa): (FCW, FSW with TOP,
        FTW as 2-bit tags, FOP, FIP, FDP, MXCSR), the physical registers R0-R7 as (mantissa,
        sign|exponent), and XMM0-15. No YMM: Unicorn's CPU model has no AVX (a VEX
        instruction is #UD), so the upper halves are state no guest can reach."""
        uc = self._uc
        scalars = tuple(int(uc.reg_read(r)) for r in _FPU_SCALARS)
        st = tuple((int(m), int(e)) for m, e in (uc.reg_read(r) for r in _FPU_STACK))
        xmm = tuple(int(uc.reg_read(r)) for r in _XMM)
        return scalars, st, xmm

    def set_fpu_state(self, scalars: tuple[int, ...], st: tuple[tuple[int, int], ...],
                      xmm: tuple[int, ...]) -> None:
        """Load what `fpu_state` returned (KVM_SET_XSAVE): the registers first, then FSW (which
        sets TOP) and the tags."""
        uc = self._uc
        for reg, value in zip(_FPU_STACK, st, strict=True):
            uc.reg_write(reg, value)
        for reg, v in zip(_XMM, xmm, strict=True):
            uc.reg_write(reg, v)
        for reg, v in zip(_FPU_SCALARS, scalars, strict=True):
            uc.reg_write(reg, v)

    def xcr0(self) -> int:
        """XCR0 (KVM_GET_XCRS), from QEMU's state (see xcr0_offset)."""
        _, field = self._context_field(self._xcr0_off(), ctypes.c_uint64)
        return int(field.value)

    def set_xcr0(self, value: int) -> None:
        """Set XCR0 (KVM_SET_XCRS) in QEMU's state, as XSETBV would (no validity checks)."""
        ctx, field = self._context_field(self._xcr0_off(), ctypes.c_uint64)
        field.value = value & U64
        self._uc.context_restore(ctx)

    def _xcr0_off(self) -> int:
        return xcr0_offset()  # measured once per process

    # ------------------------------------------- QEMU state Unicorn does not expose
    def _context_address(self) -> tuple[Any, int]:
        """The saved context, refreshed, and the address of its QEMU CPU state."""
        ctx = self._uc_ctx
        self._uc.context_update(ctx)
        addr = ctypes.cast(ctx._context, ctypes.c_void_p).value
        assert addr is not None
        return ctx, addr

    def _context_field(self, offset: int, ctype: Any) -> tuple[Any, Any]:
        ctx, addr = self._context_address()
        return ctx, ctype.from_address(addr + offset)

    def _hflags(self) -> int:
        _, field = self._context_field(self._hflags_off, ctypes.c_uint32)
        return int(field.value)

    def _reset_old_exception(self) -> int:
        """Reset QEMU's old_exception (see old_exception_offset); returns env->error_code."""
        ctx, addr = self._context_address()
        ctypes.c_int32.from_address(addr + self._old_exc_off).value = -1
        error_code = ctypes.c_uint32.from_address(addr + self._error_code_off).value
        self._uc.context_restore(ctx)
        return int(error_code)

    def _set_cpl(self, cpl: int) -> None:
        """Set the CPL bits of QEMU's hflags (see hflags_offset): a CS load does not."""
        ctx, field = self._context_field(self._hflags_off, ctypes.c_uint32)
        field.value = (field.value & ~3) | (cpl & 3)
        self._uc.context_restore(ctx)

    def _load_64bit_code_state(self) -> None:
        """Set QEMU's HF_CS64 and CS.base = 0 (see cs_base_offset) for a 64-bit handler."""
        ctx, addr = self._context_address()
        ctypes.c_uint32.from_address(addr + self._hflags_off).value |= HF_CS64
        ctypes.c_uint64.from_address(addr + self._cs_base_off).value = 0
        self._uc.context_restore(ctx)

    # ------------------------------------------------------------------ the engine
    def _emu_stop(self) -> None:
        self._emu_stop_fn(self._h)  # uc_emu_stop, without the binding's wrapper (once per exit)

    def _emu_start(self, rip: int) -> int:
        """Run from `rip` until a stop, an error or HLT; returns Unicorn's status (0, or an
        error: `_engine_error` names it). No Unicorn timeout: it starts a thread per call
        (~0.3 ms); the run's deadline is the watchdog's (`_arm_watchdog`, hw/watchdog.py)."""
        self._running = True
        try:
            # uc_emu_start itself: the binding's method raises a UcError for every run a hook
            # ended by refusing an instruction (each exit from the INSN_INVALID hook).
            status: int = self._emu_start_fn(self._h, rip, U64, 0, 0)
        finally:
            self._running = False
        return status

    @staticmethod
    def _engine_error(status: int) -> str:
        """The text of a Unicorn error status."""
        return str(unicorn.UcError(status))

    def _flush_engine_tlb(self) -> None:
        self._uc.ctl(ucc.UC_CTL_TLB_FLUSH, ucc.UC_CTL_IO_WRITE)

    def flush_code(self) -> None:
        """Drop translated code: needed after the host rewrites guest instructions."""
        self._uc.ctl_flush_tb()

    def _save_context(self) -> Any:
        """uc_context_save: the whole QEMU CPU state (registers, MSRs the emulator models,
        descriptor tables and the fields patched above: hflags/CPL, old_exception, CS.base)."""
        return self._uc.context_save()

    def _restore_context(self, context: Any) -> None:
        """uc_context_restore of a context `_save_context` returned."""
        self._uc.context_restore(context)
