"""KVM's user-visible ABI: constants and the kvm_run exits, as the kernel headers define them.

Names follow include/uapi/linux/kvm.h, include/uapi/linux/kvm_para.h and
arch/x86/include/uapi/asm/kvm*.h so they can be grepped; values are from ../shared/ABI.md.
One exit type per KVM_EXIT_*; an exit that userspace answers carries its reply slot (the
hypercall exit holds `ret`, an IN exit holds `data`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

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
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_VM_TYPES = 235
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << KVM_HC_MAP_GPA_RANGE

# -- quirks (arch/x86/include/uapi/asm/kvm.h) ------------------------------------------------
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


class KvmVmType(IntEnum):
    """KVM_CREATE_VM machine types (arch/x86/include/uapi/asm/kvm.h)."""

    KVM_X86_DEFAULT_VM = 0
    KVM_X86_SW_PROTECTED_VM = 1
    KVM_X86_SEV_VM = 2
    KVM_X86_SEV_ES_VM = 3
    KVM_X86_SNP_VM = 4
    KVM_X86_TDX_VM = 5


@dataclass(slots=True)
class HypercallExit:
    """Corresponds to KVM_EXIT_HYPERCALL: `run->hypercall`; userspace writes `ret`."""

    nr: int
    args: tuple[int, int, int, int, int, int]
    ret: int = 0
    flags: int = 0
    reason: KvmExitReason = KvmExitReason.KVM_EXIT_HYPERCALL

    @property
    def longmode(self) -> bool:
        """The legacy `longmode` view of flags bit 0."""
        return bool(self.flags & KVM_EXIT_HYPERCALL_LONG_MODE)


@dataclass(slots=True)
class IoExit:
    """Corresponds to KVM_EXIT_IO: `run->io` plus the data area; an IN exit is answered in `data`."""

    direction: int
    size: int
    port: int
    count: int
    data: bytearray = field(default_factory=bytearray)
    reason: KvmExitReason = KvmExitReason.KVM_EXIT_IO


@dataclass(frozen=True, slots=True)
class HltExit:
    """Corresponds to KVM_EXIT_HLT (no in-kernel local APIC to wait on)."""

    reason: KvmExitReason = KvmExitReason.KVM_EXIT_HLT


@dataclass(frozen=True, slots=True)
class ApResetHoldExit:
    """Corresponds to KVM_EXIT_AP_RESET_HOLD: an SEV-ES AP parked until a SIPI, with no in-kernel
    local APIC to wait on (x86.c kvm_emulate_ap_reset_hold -> __kvm_emulate_halt)."""

    reason: KvmExitReason = KvmExitReason.KVM_EXIT_AP_RESET_HOLD


@dataclass(frozen=True, slots=True)
class ShutdownExit:
    """Corresponds to KVM_EXIT_SHUTDOWN (triple fault)."""

    reason: KvmExitReason = KvmExitReason.KVM_EXIT_SHUTDOWN


@dataclass(frozen=True, slots=True)
class SystemEventExit:
    """Corresponds to KVM_EXIT_SYSTEM_EVENT: `run->system_event` (type, data[])."""

    type: int
    data: tuple[int, ...] = ()
    reason: KvmExitReason = KvmExitReason.KVM_EXIT_SYSTEM_EVENT


@dataclass(frozen=True, slots=True)
class MemoryFaultExit:
    """Corresponds to KVM_EXIT_MEMORY_FAULT: `run->memory_fault` (flags, gpa, size)."""

    flags: int
    gpa: int
    size: int
    reason: KvmExitReason = KvmExitReason.KVM_EXIT_MEMORY_FAULT


@dataclass(frozen=True, slots=True)
class InternalErrorExit:
    """Corresponds to KVM_EXIT_INTERNAL_ERROR: KVM could not handle what the guest did."""

    suberror: int
    detail: str
    data: tuple[int, ...] = ()  # run->internal.data[ndata]
    reason: KvmExitReason = KvmExitReason.KVM_EXIT_INTERNAL_ERROR


@dataclass(slots=True)
class MsrExit:
    """Corresponds to KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR: `run->msr`.

    Userspace answers in `data` (a read) and `error` (non-zero: KVM injects #GP)."""

    reason: KvmExitReason
    index: int
    msr_reason: int
    data: int = 0
    error: int = 0


KVM_INTERNAL_ERROR_EMULATION = 1
#: the exit happened while the CPU was delivering an event that KVM cannot emulate
#: (x86.c kvm_prepare_event_vectoring_exit)
KVM_INTERNAL_ERROR_DELIVERY_EV = 3

KvmExit = (HypercallExit | IoExit | HltExit | ShutdownExit | SystemEventExit | MemoryFaultExit | InternalErrorExit
           | MsrExit | ApResetHoldExit)


_EXIT_NAMES = {int(r): r.name.removeprefix("KVM_EXIT_").lower() for r in KvmExitReason}


def exit_name(reason: int) -> str:
    """'hypercall' for KVM_EXIT_HYPERCALL etc.: the short names used in reports."""
    name = _EXIT_NAMES.get(reason)
    return name if name is not None else f"exit_{reason}"
