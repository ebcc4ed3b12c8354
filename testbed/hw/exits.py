"""What the hardware model hands the hypervisor: VM-exit codes and the seams between layers.

The hardware model emits the vendor's own exit code (an SVM exit code on AMD, a VMX basic exit
reason on Intel) with the vendor's exit information words, exactly as the VMCB/VMCS would
carry them; the kvm layer's svm/vmx front ends decode them, as KVM's svm.c and vmx.c do.
Member names are the kernel's (arch/x86/include/uapi/asm/svm.h, vmx.h) so they can be grepped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, Protocol

from testbed.hw.memory import HostMemory
from testbed.hw.psp import GuestFirmware
from testbed.hw.vcpu_state import VcpuState
from testbed.x86 import U64, Reg
from testbed.x86.addr import Gfn, Gpa


class Vendor(StrEnum):
    """CPU vendor: decides the native hypercall instruction and the exit-code flavour."""

    AMD = "amd"
    INTEL = "intel"


class SvmExitCode(IntEnum):
    """SVM exit codes (arch/x86/include/uapi/asm/svm.h)."""

    SVM_EXIT_EXCP_BASE = 0x040
    SVM_EXIT_UD = 0x046  # SVM_EXIT_EXCP_BASE + UD_VECTOR
    SVM_EXIT_CPUID = 0x072
    SVM_EXIT_INVD = 0x076
    SVM_EXIT_HLT = 0x078
    SVM_EXIT_IOIO = 0x07B
    SVM_EXIT_MSR = 0x07C
    SVM_EXIT_SHUTDOWN = 0x07F
    SVM_EXIT_VMMCALL = 0x081
    SVM_EXIT_WBINVD = 0x089
    SVM_EXIT_NPF = 0x400
    SVM_EXIT_VMGEXIT = 0x403


class VmxExitReason(IntEnum):
    """VMX basic exit reasons (arch/x86/include/uapi/asm/vmx.h)."""

    EXIT_REASON_EXCEPTION_NMI = 0
    EXIT_REASON_TRIPLE_FAULT = 2
    EXIT_REASON_CPUID = 10
    EXIT_REASON_HLT = 12
    EXIT_REASON_INVD = 13
    EXIT_REASON_VMCALL = 18
    EXIT_REASON_IO_INSTRUCTION = 30
    EXIT_REASON_MSR_READ = 31
    EXIT_REASON_MSR_WRITE = 32
    EXIT_REASON_EPT_VIOLATION = 48
    EXIT_REASON_WBINVD = 54
    EXIT_REASON_TDCALL = 77


# SVM IOIO exit-info-1 encoding (APM vol. 2, 15.10.2).
SVM_IOIO_TYPE_IN = 1 << 0
SVM_IOIO_STR = 1 << 2
SVM_IOIO_REP = 1 << 3
SVM_IOIO_SIZE_SHIFT = 4  # bits 4..6: SZ8, SZ16, SZ32 one-hot
SVM_IOIO_ADDR_SHIFT = 7  # bits 7..9: A16, A32, A64 one-hot (string forms)
SVM_IOIO_SEG_SHIFT = 10  # bits 10..12: the segment of a string OUT's source (ES 0 ... GS 5)
SVM_IOIO_PORT_SHIFT = 16

# VMX I/O exit qualification (SDM vol. 3 table 28-5).
VMX_IO_SIZE_MASK = 0x7  # size - 1
VMX_IO_IN = 1 << 3
VMX_IO_STRING = 1 << 4
VMX_IO_REP = 1 << 5
VMX_IO_PORT_SHIFT = 16

# Nested-page-fault error-code bits the hardware reports with an NPF exit (PFERR_* in KVM's
# mmu.h), on both vendors in the testbed.
NPF_WRITE = 1 << 1
NPF_FETCH = 1 << 4
NPF_GUEST_ENC = 1 << 34  # PFERR_GUEST_ENC_MASK: the access had the C-bit set
NPF_GUEST_FINAL = 1 << 32  # PFERR_GUEST_FINAL_MASK: the access to the final guest-physical address
NPF_GUEST_PAGE = 1 << 33  # PFERR_GUEST_PAGE_MASK: an access to a guest paging-structure entry

# VMX EPT-violation exit qualification (SDM vol. 3C 28.2.1, table 28-7).
EPT_QUAL_READ = 1 << 0
EPT_QUAL_WRITE = 1 << 1
EPT_QUAL_FETCH = 1 << 2
EPT_QUAL_GLA_VALID = 1 << 7
EPT_QUAL_GLA_TRANSLATED = 1 << 8


def ept_violation_qualification(error: int) -> int:
    """The EPT-violation exit qualification of the access an NPF error code (the PFERR_* bits
    the testbed carries on both vendors) describes, as VMX reports it: the access (read, write or
    fetch: bits 0-2), no EPT permission for the GPA (bits 3-5: the testbed's EPT violations are
    of GPAs without a mapping), and for an access during a linear-address translation bit 7, with
    bit 8 set when it was to the final address rather than a paging-structure entry (KVM's
    __vmx_handle_ept_violation() maps them back to PFERR_GUEST_FINAL/PAGE). The advanced-exit
    bits 9-11 and NMI unblocking (bit 12) are 0."""
    qual = EPT_QUAL_WRITE if error & NPF_WRITE else EPT_QUAL_FETCH if error & NPF_FETCH else EPT_QUAL_READ
    if error & (NPF_GUEST_FINAL | NPF_GUEST_PAGE):
        qual |= EPT_QUAL_GLA_VALID | (EPT_QUAL_GLA_TRANSLATED if error & NPF_GUEST_FINAL else 0)
    return qual

# SVM EXITINTINFO (APM vol. 2 15.7.2) / VMX IDT-vectoring information (SDM vol. 3 24.9.3): the
# event the CPU was delivering when the exit happened. Same layout on both vendors.
EXITINTINFO_VALID = 1 << 31
EXITINTINFO_TYPE_EXCEPTION = 3 << 8
EXITINTINFO_TYPE_SOFT_INT = 4 << 8
EXITINTINFO_ERROR_VALID = 1 << 11

# VMX VM-exit interruption information (SDM vol. 3 24.9.2).
VMX_INTR_INFO_VALID = 1 << 31
VMX_INTR_TYPE_HARD_EXCEPTION = 3 << 8


class StopReason(StrEnum):
    """Why the vCPU's run ended without a VM exit the hypervisor asked to leave on."""

    REQUESTED = "requested"  # the hypervisor (or VMM through it) asked to stop
    TIMEOUT = "timeout"
    EMULATOR_ERROR = "emulator_error"


@dataclass(frozen=True)
class RunStop:
    """The end of one hardware run."""

    reason: StopReason
    detail: str = ""


class Hypervisor(Protocol):
    """What the hardware calls on a VM exit (the kvm layer implements it).

    `vmexit` is called synchronously from inside the emulator hooks: the hypervisor reads and
    writes guest state through `VcpuHardware`, may inject an event, and returns; the guest
    then resumes. Returning to userspace is likewise synchronous (see kvm/vcpu.py).
    """

    def vmexit(self, code: int, info1: int, info2: int) -> None: ...


class HypercallFastpath(Protocol):
    """A hypervisor's fastpath for the hottest exit, the native VMCALL/VMMCALL (as KVM's
    svm_exit_handlers_fastpath / handle_fastpath_* take a few exits before the handler table):
    the hardware hands over the registers the exit saved instead of KVM reading them back
    through `hypercall_regs`/`hypercall_args`. Optional: the hardware calls it, when the
    attached hypervisor has it and nothing traces, instead of `vmexit(<hypercall exit code>)`;
    the decisions are the same (kvm/vcpu.py). It returns the value to complete the instruction
    with (RAX, and RIP moved past it, written by the hardware in the same hook), or None when
    it completed the instruction itself or left it to userspace."""

    def native_hypercall(self, nr: int, cs: int, long_mode: bool, a0: int, a1: int, a2: int,
                         a3: int) -> int | None: ...


class GhcbMsr(Protocol):
    """The GHCB MSR (MSR_AMD64_SEV_ES_GHCB) as KVM reaches it: the VMCB's GHCB GPA field,
    hardware state that KVM reads and writes through the hardware (VcpuHardware has both)."""

    def ghcb_msr_value(self) -> int: ...

    def set_ghcb_msr(self, value: int) -> None: ...


class GhcbMsrRegister:
    """The GHCB MSR's storage: the hardware keeps one per vCPU; a unit test of KVM's GHCB code
    without a vCPU can hand KVM one of its own."""

    def __init__(self, value: int = 0) -> None:
        self._value = value & U64

    def ghcb_msr_value(self) -> int:
        """The MSR's value."""
        return self._value

    def set_ghcb_msr(self, value: int) -> None:
        """Set the MSR (64 bits)."""
        self._value = value & U64


class VcpuHardware(Protocol):
    """The part of the hardware the kvm layer may use: the VMCB/VMCS, not the emulator."""

    vendor: Vendor

    def read_reg(self, reg: Reg) -> int: ...

    def write_reg(self, reg: Reg, value: int) -> None: ...

    def cpl(self) -> int: ...

    def is_64bit_mode(self) -> bool: ...

    def hypercall_regs(self) -> tuple[int, int, bool]: ...

    def hypercall_args(self) -> tuple[int, int, int, int]: ...

    def complete_hypercall(self, rax: int) -> None: ...

    def complete_tdcall(self) -> None: ...

    def mode_of(self, cs_selector: int) -> bool: ...

    def linear_rip(self, rip: int) -> int: ...

    def skip_instruction(self) -> bool: ...

    def inject_exception(self, vector: int, error_code: int | None = None) -> None: ...

    def set_io_in_result(self, value: int) -> None: ...

    def set_intercept_ud(self, enabled: bool) -> None: ...

    def set_msr_passthrough(self, indices: frozenset[int]) -> None: ...

    def request_stop(self) -> None: ...

    def attach_hypervisor(self, hypervisor: Hypervisor) -> None: ...

    def stage2_changed(self, first: Gfn, end: Gfn, private: bool) -> None: ...

    def gmem_invalidated(self, gfns: list[Gfn]) -> None: ...

    def set_dirty_log(self, bitmap: Any) -> None: ...

    def flush_tlb(self) -> None: ...

    def sev_firmware(self) -> GuestFirmware: ...

    def save_state(self) -> VcpuState: ...

    def load_state(self, state: VcpuState) -> None: ...

    def launch_update_data(self, gpa: Gpa, length: int) -> None: ...

    def snp_launch_update(self, gpa: Gpa, length: int) -> None: ...

    def tdx_mem_page_add(self, gpa: Gpa, length: int) -> None: ...

    def ext_exit_qualification(self) -> int: ...

    def flush_code(self) -> None: ...

    def run(self, timeout_s: float) -> RunStop: ...

    def exit_int_info(self) -> int: ...

    def npf_linear_address(self) -> int: ...

    def ghcb_msr_value(self) -> int: ...

    def set_ghcb_msr(self, value: int) -> None: ...

    @property
    def memory(self) -> HostMemory: ...
