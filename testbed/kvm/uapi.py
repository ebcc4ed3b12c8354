"""KVM's user-visible ABI: constants and the kvm_run exits, as the kernel headers define them.

Names follow include/uapi/linux/kvm.h, include/uapi/linux/kvm_para.h and
arch/x86/include/uapi/asm/kvm*.h so they can be grepped; values are from ../shared/ABI.md.
One exit type per KVM_EXIT_* (KVM_EXIT_IO split into an IN and an OUT type), each a dataclass
that is read-only but for the reply slots userspace fills as in kvm_run (the hypercall's `ret`,
an IN's `data`, an MSR read's `data`/`error`, an MSR write's `error`); `reason` is the short name
the report's user_exits use ("hypercall", "io", ...), `exit_reason` the KVM_EXIT_* value, and
`to_json()` the one serialisation the report and --trace share.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, TypeVar, dataclass_transform

from testbed.errors import UsageError

# -- hypercall numbers (include/uapi/linux/kvm_para.h) ------------------------------------
KVM_HC_VAPIC_POLL_IRQ = 1
KVM_HC_MMU_OP = 2
KVM_HC_FEATURES = 3
KVM_HC_PPC_MAP_MAGIC_PAGE = 4
KVM_HC_KICK_CPU = 5
KVM_HC_CLOCK_PAIRING = 9
KVM_HC_SEND_IPI = 10
KVM_HC_SCHED_YIELD = 11
KVM_HC_MAP_GPA_RANGE = 12
#: Testbed extension, not in KVM (README "Deliberate deviations"): the guest donates shared memory
#: holding its encryption-status structure (testbed/tracker/donated.py). a0 = GPA, a1 = size in
#: bytes, a2 = flags (0). KVM does nothing with it but forward it to userspace as
#: KVM_EXIT_HYPERCALL when the VMM enabled its bit of KVM_CAP_EXIT_HYPERCALL, as it forwards
#: KVM_HC_MAP_GPA_RANGE. 32 is far from KVM's numbers (1..12) and still a bit of the cap's u64 mask.
KVM_HC_TESTBED_DONATE_ENC_STATUS = 32

KVM_CLOCK_PAIRING_WALLCLOCK = 0

# -- hypercall error codes, returned negated in RAX (kvm_para.h) ------------------------------
KVM_ENOSYS = 1000
KVM_EFAULT = 14
KVM_EINVAL = 22
KVM_E2BIG = 7
KVM_EPERM = 1
KVM_EOPNOTSUPP = 95

# -- KVM_HC_MAP_GPA_RANGE attributes (arch/x86/include/uapi/asm/kvm_para.h) ------------------
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1 << 0
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 1 << 1
KVM_MAP_GPA_RANGE_DECRYPTED = 0 << 4
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_PAGE_SZ_MASK = 0xF
KVM_MAP_GPA_RANGE_ENC_STAT_MASK = 1 << 4

# -- PV CPUID (arch/x86/include/uapi/asm/kvm_para.h) --------------------------------------
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_FEATURE_PV_UNHALT = 7
KVM_FEATURE_PV_SEND_IPI = 11
KVM_FEATURE_PV_SCHED_YIELD = 13
KVM_FEATURE_HC_MAP_GPA_RANGE = 16
KVM_FEATURE_MIGRATION_CONTROL = 17

# -- capabilities (include/uapi/linux/kvm.h) ------------------------------------------------
KVM_CAP_ENFORCE_PV_FEATURE_CPUID = 190
KVM_CAP_EXIT_HYPERCALL = 201
KVM_CAP_DISABLE_QUIRKS2 = 213
KVM_CAP_USER_MEMORY = 3
KVM_CAP_DISABLE_QUIRKS = 116
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_VM_TYPES = 235
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << KVM_HC_MAP_GPA_RANGE
#: The mask the testbed's KVM accepts: KVM's, plus its own donation hypercall (testbed extension).
TESTBED_EXIT_HYPERCALL_VALID_MASK = KVM_EXIT_HYPERCALL_VALID_MASK | (1 << KVM_HC_TESTBED_DONATE_ENC_STATUS)

# -- quirks (arch/x86/include/uapi/asm/kvm.h) ------------------------------------------------
KVM_X86_QUIRK_OUT_7E_INC_RIP = 1 << 3
KVM_X86_QUIRK_FIX_HYPERCALL_INSN = 1 << 5

# -- kvm_run.hypercall.flags ----------------------------------------------------------------
KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0

# -- KVM_EXIT_IO directions -----------------------------------------------------------------
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# -- KVM_SYSTEM_EVENT types -------------------------------------------------------------------
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_SEV_TERM = 6
KVM_SYSTEM_EVENT_TDX_FATAL = 7

# -- memory attributes -------------------------------------------------------------------------
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3


class KvmExitReason(IntEnum):
    """kvm_run.exit_reason values (include/uapi/linux/kvm.h)."""

    KVM_EXIT_UNKNOWN = 0
    KVM_EXIT_EXCEPTION = 1
    KVM_EXIT_IO = 2
    KVM_EXIT_HYPERCALL = 3
    KVM_EXIT_DEBUG = 4
    KVM_EXIT_HLT = 5
    KVM_EXIT_MMIO = 6
    KVM_EXIT_SHUTDOWN = 8
    KVM_EXIT_FAIL_ENTRY = 9
    KVM_EXIT_INTERNAL_ERROR = 17
    KVM_EXIT_X86_RDMSR = 29
    KVM_EXIT_X86_WRMSR = 30
    KVM_EXIT_SYSTEM_EVENT = 24
    KVM_EXIT_AP_RESET_HOLD = 32
    KVM_EXIT_MEMORY_FAULT = 39
    KVM_EXIT_TDX = 40


class KvmVmType(IntEnum):
    """KVM_CREATE_VM machine types (arch/x86/include/uapi/asm/kvm.h)."""

    KVM_X86_DEFAULT_VM = 0
    KVM_X86_SW_PROTECTED_VM = 1
    KVM_X86_SEV_VM = 2
    KVM_X86_SEV_ES_VM = 3
    KVM_X86_SNP_VM = 4
    KVM_X86_TDX_VM = 5


class _Replies:
    """Base of the exits userspace answers: every field is read-only once constructed except
    the reply slots named in `_REPLY` (kvm_run's fields KVM reads back on the next KVM_RUN),
    as a frozen dataclass would be. Assigning another field, or deleting any, raises
    FrozenInstanceError. Made by `_reply_exit`."""

    __slots__ = ()
    _REPLY: ClassVar[frozenset[str]] = frozenset()
    #: `data` takes bytes too (IN's data area)
    _BYTES_REPLY: ClassVar[bool] = False

    def __setattr__(self, name: str, value: object) -> None:
        if name not in self._REPLY:
            replies = ", ".join(sorted(self._REPLY))
            raise FrozenInstanceError(f"cannot assign to field {name!r} of {type(self).__name__}: "
                                      f"only the reply slot ({replies}) is writable")
        # kvm_run's reply fields are integers (__u64 and the like; negative values are taken
        # as their two's complement, as C would store -22) - and IN's data area bytes: anything
        # else could not be written into kvm_run, and would only fail inside the next KVM_RUN.
        if isinstance(value, bytes | bytearray | memoryview) and name == "data" and self._BYTES_REPLY:
            pass
        elif isinstance(value, bool) or not isinstance(value, int) or not -(1 << 63) <= value < 1 << 64:
            want = "bytes or an int" if name == "data" and self._BYTES_REPLY else "an int (a __u64)"
            shown = f"{value!r}" if isinstance(value, int) else type(value).__name__
            raise UsageError(f"{type(self).__name__}.{name} = {shown}: the reply slot takes {want}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r} of {type(self).__name__}")


_R = TypeVar("_R", bound=_Replies)


@dataclass_transform(field_specifiers=(field,))
def _reply_exit(cls: type[_R]) -> type[_R]:
    """A frozen slots dataclass whose reply slots stay writable: the frozen dataclass's own
    __init__ (and its copy, pickle and replace() paths) assign every field through
    object.__setattr__ - no Python call per field, where a KVM_HC_MAP_GPA_RANGE exit builds one
    exit per conversion - and _Replies' __setattr__, put back over the one the frozen dataclass
    generates, lets userspace write the reply slots only. Unhashable, like any exit with a
    slot userspace writes."""
    made = dataclass(slots=True, frozen=True)(cls)
    for name in ("__setattr__", "__delattr__"):
        setattr(made, name, getattr(_Replies, name))
    made.__hash__ = None  # type: ignore[assignment]
    return made


@_reply_exit
class HypercallExit(_Replies):
    """KVM_EXIT_HYPERCALL: `run->hypercall`; userspace writes `ret`, which KVM copies into the
    guest's RAX unchecked (x86.c complete_hypercall_exit)."""

    _REPLY: ClassVar[frozenset[str]] = frozenset({"ret"})
    reason: ClassVar[str] = "hypercall"
    exit_reason: ClassVar[KvmExitReason] = KvmExitReason.KVM_EXIT_HYPERCALL

    nr: int
    args: tuple[int, int, int, int, int, int]
    ret: int = field(default=0, hash=False)
    flags: int = 0

    @property
    def longmode(self) -> bool:
        """The legacy `longmode` view of flags bit 0."""
        return bool(self.flags & KVM_EXIT_HYPERCALL_LONG_MODE)

    def to_json(self) -> dict[str, Any]:
        """The exit as the report's user_exits and --trace show it."""
        return {"reason": "hypercall", "nr": self.nr, "args": list(self.args), "ret": self.ret, "flags": self.flags}


@_reply_exit
class IoInExit(_Replies):
    """KVM_EXIT_IO, direction KVM_EXIT_IO_IN: `run->io` plus the data area, which userspace
    fills with `count` * `size` bytes (assign `data`, or write into it); KVM copies them into
    the guest on the next KVM_RUN (x86.c complete_fast_pio_in / complete_emulator_pio_in)."""

    _REPLY: ClassVar[frozenset[str]] = frozenset({"data"})
    _BYTES_REPLY: ClassVar[bool] = True
    reason: ClassVar[str] = "io"
    exit_reason: ClassVar[KvmExitReason] = KvmExitReason.KVM_EXIT_IO
    direction: ClassVar[int] = KVM_EXIT_IO_IN

    size: int
    port: int
    count: int = 1
    data: bytearray | bytes | int = field(default_factory=bytearray, hash=False)

    @property
    def value(self) -> int:
        """The first element of `data`, little-endian (what the guest's IN gets)."""
        return int.from_bytes(self.reply(self.size), "little")

    def reply(self, length: int) -> bytes:
        """`data` as KVM reads it back: `length` bytes, zero-padded or cut (an int is taken
        as the little-endian value of the first element)."""
        data = self.data
        if isinstance(data, int):
            raw = (data & ((1 << 64) - 1)).to_bytes(8, "little")
        elif isinstance(data, bytes | bytearray | memoryview):
            raw = bytes(data[:length])
        else:
            raise TypeError(f"IoInExit.data must be bytes or an int, not {type(data).__name__}")
        return raw[:length].ljust(length, b"\0")

    def to_json(self) -> dict[str, Any]:
        """The exit as the report's user_exits and --trace show it (`value`: the answer so far)."""
        return {"reason": "io", "direction": "in", "port": self.port, "size": self.size, "count": self.count,
                "value": self.value}


@dataclass(frozen=True, slots=True)
class IoOutExit:
    """KVM_EXIT_IO, direction KVM_EXIT_IO_OUT: `run->io` plus the `count` * `size` bytes written."""

    reason: ClassVar[str] = "io"
    exit_reason: ClassVar[KvmExitReason] = KvmExitReason.KVM_EXIT_IO
    direction: ClassVar[int] = KVM_EXIT_IO_OUT

    size: int
    port: int
    count: int = 1
    data: bytes = b""

    @property
    def value(self) -> int:
        """The first element written, little-endian."""
        return int.from_bytes(self.data[: self.size], "little")

    def to_json(self) -> dict[str, Any]:
        """The exit as the report's user_exits and --trace show it."""
        return {"reason": "io", "direction": "out", "port": self.port, "size": self.size, "count": self.count,
                "value": self.value}


@dataclass(frozen=True, slots=True)
class HltExit:
    """KVM_EXIT_HLT (no in-kernel local APIC to wait on)."""

    reason: ClassVar[str] = "hlt"
    exit_reason: ClassVar[KvmExitReason] = KvmExitReason.KVM_EXIT_HLT

    def to_json(self) -> dict[str, Any]:
        """The exit as the report's user_exits and --trace show it."""
        return {"reason": "hlt"}


@dataclass(frozen=True, slots=True)
class ApResetHoldExit:
    """KVM_EXIT_AP_RESET_HOLD: an SEV-ES AP parked until a SIPI, with no in-kernel local APIC to
    wait on (x86.c kvm_emulate_ap_reset_hold -> __kvm_emulate_halt)."""

    reason: ClassVar[str] = "ap_reset_hold"
    exit_reason: ClassVar[KvmExitReason] = KvmExitReason.KVM_EXIT_AP_RESET_HOLD

    def to_json(self) -> dict[str, Any]:
        """The exit as the report's user_exits and --trace show it."""
        return {"reason": "ap_reset_hold"}


@dataclass(frozen=True, slots=True)
class ShutdownExit:
    """KVM_EXIT_SHUTDOWN (triple fault)."""

    reason: ClassVar[str] = "shutdown"
    exit_reason: ClassVar[KvmExitReason] = KvmExitReason.KVM_EXIT_SHUTDOWN

    def to_json(self) -> dict[str, Any]:
        """The exit as the report's user_exits and --trace show it."""
        return {"reason": "shutdown"}


@dataclass(frozen=True, slots=True)
class SystemEventExit:
    """KVM_EXIT_SYSTEM_EVENT: `run->system_event` (type, data[])."""

    reason: ClassVar[str] = "system_event"
    exit_reason: ClassVar[KvmExitReason] = KvmExitReason.KVM_EXIT_SYSTEM_EVENT

    type: int
    data: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The exit as the report's user_exits and --trace show it."""
        return {"reason": "system_event", "type": self.type, "data": list(self.data)}


@dataclass(frozen=True, slots=True)
class MemoryFaultExit:
    """KVM_EXIT_MEMORY_FAULT: `run->memory_fault` (flags, gpa, size)."""

    reason: ClassVar[str] = "memory_fault"
    exit_reason: ClassVar[KvmExitReason] = KvmExitReason.KVM_EXIT_MEMORY_FAULT

    flags: int
    gpa: int
    size: int

    @property
    def private(self) -> bool:
        """The faulting access was private (KVM_MEMORY_EXIT_FLAG_PRIVATE)."""
        return bool(self.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE)

    def to_json(self) -> dict[str, Any]:
        """The exit as the report's user_exits and --trace show it."""
        return {"reason": "memory_fault", "flags": self.flags, "gpa": self.gpa, "size": self.size}


@dataclass(frozen=True, slots=True)
class InternalErrorExit:
    """KVM_EXIT_INTERNAL_ERROR: KVM could not handle what the guest did."""

    reason: ClassVar[str] = "internal_error"
    exit_reason: ClassVar[KvmExitReason] = KvmExitReason.KVM_EXIT_INTERNAL_ERROR

    suberror: int
    detail: str
    data: tuple[int, ...] = ()  # run->internal.data[ndata]

    def to_json(self) -> dict[str, Any]:
        """The exit as the report's user_exits and --trace show it."""
        return {"reason": "internal_error", "suberror": self.suberror, "detail": self.detail, "data": list(self.data)}


@_reply_exit
class RdmsrExit(_Replies):
    """KVM_EXIT_X86_RDMSR: `run->msr`; userspace answers in `data`, or sets `error` (non-zero:
    KVM injects #GP; x86.c complete_fast_rdmsr)."""

    _REPLY: ClassVar[frozenset[str]] = frozenset({"data", "error"})
    reason: ClassVar[str] = "x86_rdmsr"
    exit_reason: ClassVar[KvmExitReason] = KvmExitReason.KVM_EXIT_X86_RDMSR

    index: int
    msr_reason: int
    data: int = field(default=0, hash=False)
    error: int = field(default=0, hash=False)

    def to_json(self) -> dict[str, Any]:
        """The exit as the report's user_exits and --trace show it."""
        return {"reason": "x86_rdmsr", "index": self.index, "msr_reason": self.msr_reason, "data": self.data,
                "error": self.error}


@_reply_exit
class WrmsrExit(_Replies):
    """KVM_EXIT_X86_WRMSR: `run->msr` with the value written; userspace sets `error` (non-zero:
    KVM injects #GP; x86.c complete_fast_msr_access)."""

    _REPLY: ClassVar[frozenset[str]] = frozenset({"error"})
    reason: ClassVar[str] = "x86_wrmsr"
    exit_reason: ClassVar[KvmExitReason] = KvmExitReason.KVM_EXIT_X86_WRMSR

    index: int
    msr_reason: int
    data: int = 0
    error: int = field(default=0, hash=False)

    def to_json(self) -> dict[str, Any]:
        """The exit as the report's user_exits and --trace show it."""
        return {"reason": "x86_wrmsr", "index": self.index, "msr_reason": self.msr_reason, "data": self.data,
                "error": self.error}


@_reply_exit
class TdxExit(_Replies):
    """KVM_EXIT_TDX: `run->tdx` for a TDG.VP.VMCALL KVM leaves to userspace (arch/x86/kvm/vmx/tdx.c):
    `nr` is the GHCI leaf - GetQuote 0x10002 (`gpa` with the shared bit stripped, `size`),
    GetTdVmCallInfo 0x10000 (`leaf` 1; userspace may also set `r11`..`r14`),
    SetupEventNotifyInterrupt 0x10004 (`vector`). KVM presets `ret` (the TDVMCALL status the
    guest gets in R10: SUBFUNC_UNSUPPORTED, SUCCESS for GetTdVmCallInfo) and copies the reply
    slots back on the next KVM_RUN (tdx_complete_simple, tdx_complete_get_td_vm_call_info)."""

    _REPLY: ClassVar[frozenset[str]] = frozenset({"ret", "r11", "r12", "r13", "r14"})
    reason: ClassVar[str] = "tdx"
    exit_reason: ClassVar[KvmExitReason] = KvmExitReason.KVM_EXIT_TDX

    nr: int
    flags: int = 0
    gpa: int = 0
    size: int = 0
    leaf: int = 0
    vector: int = 0
    ret: int = field(default=0, hash=False)
    r11: int = field(default=0, hash=False)
    r12: int = field(default=0, hash=False)
    r13: int = field(default=0, hash=False)
    r14: int = field(default=0, hash=False)

    def to_json(self) -> dict[str, Any]:
        """The exit as the report's user_exits and --trace show it."""
        return {"reason": "tdx", "nr": self.nr, "flags": self.flags, "gpa": self.gpa, "size": self.size,
                "leaf": self.leaf, "vector": self.vector, "ret": self.ret}


KVM_INTERNAL_ERROR_EMULATION = 1
#: the exit happened while the CPU was delivering an event that KVM cannot emulate
#: (x86.c kvm_prepare_event_vectoring_exit)
KVM_INTERNAL_ERROR_DELIVERY_EV = 3

#: KVM_EXIT_IO in either direction (isinstance works with it)
IoExit = IoInExit | IoOutExit
#: KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR
MsrExit = RdmsrExit | WrmsrExit
#: every exit KVM_RUN returns to userspace: one type per KVM_EXIT_* (an IN and an OUT apart)
KvmExit = (HypercallExit | IoInExit | IoOutExit | HltExit | ShutdownExit | SystemEventExit | MemoryFaultExit
           | InternalErrorExit | RdmsrExit | WrmsrExit | ApResetHoldExit | TdxExit)
#: the exit types, in KVM_EXIT_* order
EXIT_TYPES: tuple[type[KvmExit], ...] = (
    IoInExit, IoOutExit, HypercallExit, HltExit, ShutdownExit, InternalErrorExit, SystemEventExit, RdmsrExit,
    WrmsrExit, ApResetHoldExit, MemoryFaultExit, TdxExit)


_EXIT_NAMES = {int(r): r.name.removeprefix("KVM_EXIT_").lower() for r in KvmExitReason}


def exit_name(reason: int) -> str:
    """'hypercall' for KVM_EXIT_HYPERCALL etc.: the short names used in reports."""
    name = _EXIT_NAMES.get(reason)
    return name if name is not None else f"exit_{reason}"
