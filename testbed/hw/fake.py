"""A fake of the hardware interface (`VcpuHardware`), for unit tests of kvm/ and vmm/ over
plain bytes, without Unicorn.

`FakeVcpu` keeps registers in a dict and guest memory in a `BytesMemory`; it raises the
exits a test scripts (`exits`) through the same single entry the real hardware uses
(`Hypervisor.vmexit`), and records what KVM did to it: injected events, stage-2 changes,
launch commands. The GHCB MSR is a `GhcbMsrRegister`, as on the real vCPU, so a test can see
that KVM keeps no copy of it. This module must not import Unicorn (tests/test_layering.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from testbed.errors import TestbedError
from testbed.hw.exits import GhcbMsrRegister, Hypervisor, RunStop, StopReason, Vendor
from testbed.hw.memory import BytesMemory, HostMemory
from testbed.hw.psp import GuestFirmware
from testbed.hw.vcpu_state import VcpuState
from testbed.x86 import U64, Reg
from testbed.x86.addr import Gfn, Gpa


class FakeHardwareError(TestbedError):
    """The fake was used in a way the real hardware would not allow (a test's mistake)."""


@dataclass
class FakeExit:
    """One scripted VM exit: the vendor's exit code and information words, and the length of
    the intercepted instruction (what skip_instruction / complete_hypercall advance RIP by)."""

    code: int
    info1: int = 0
    info2: int = 0
    length: int = 3
    #: registers loaded just before the exit (the guest's state at the intercepted instruction)
    regs: dict[Reg, int] = field(default_factory=dict)


class FakeVcpu:
    """`VcpuHardware` over a register dict and plain memory; exits come from a script."""

    def __init__(self, vendor: Vendor = Vendor.AMD, memory_size: int = 1 << 20, *, cs: int = 0x08,
                 long_mode: bool = True) -> None:
        self.vendor = vendor
        self._memory = BytesMemory(memory_size)
        self.regs: dict[Reg, int] = dict.fromkeys(Reg, 0)
        self.regs[Reg.CS] = cs
        self.long_mode = long_mode
        self.cs_base = 0
        self.hypervisor: Hypervisor | None = None
        self.exits: list[FakeExit] = []
        self.delivered: list[FakeExit] = []
        self.injected: list[tuple[int, int | None]] = []
        self.stage2_changes: list[tuple[int, int, bool]] = []
        #: the GFN lists of KVM's gmem_invalidated notices (a punched hole)
        self.gmem_invalidations: list[list[int]] = []
        self.launched: list[tuple[str, int, int]] = []
        self.ghcb = GhcbMsrRegister()
        self.intercept_ud = False
        self.msr_passthrough: frozenset[int] = frozenset()
        self.io_in_result: int | None = None
        self.code_flushes = 0
        self.tlb_flushes = 0
        self.dirty_log: Any = None
        #: TDX: the extended exit qualification of the next EPT-violation exit (a test sets it)
        self.ext_exit_qual = 0
        self.tdcalls = 0
        self._stop = False
        self._cur_len = 0

    # -- wiring ------------------------------------------------------------------------
    def attach_hypervisor(self, hypervisor: Hypervisor) -> None:
        """The hypervisor that takes this vCPU's exits."""
        self.hypervisor = hypervisor

    def exit(self, code: int, info1: int = 0, info2: int = 0, length: int = 3) -> None:
        """Raise one VM exit now, through the one entry (`Hypervisor.vmexit`)."""
        if self.hypervisor is None:
            raise FakeHardwareError("VM exit with no hypervisor attached")
        self._cur_len = length
        self.delivered.append(FakeExit(code, info1, info2, length))
        self.hypervisor.vmexit(code, info1, info2)

    def run(self, timeout_s: float) -> RunStop:
        """Deliver the scripted exits in order until the hypervisor asks to stop; a script
        that runs out is the timeout (the guest would have spun on)."""
        while self.exits:
            step = self.exits.pop(0)
            self.regs.update(step.regs)
            self.exit(step.code, step.info1, step.info2, step.length)
            if self._stop:
                self._stop = False
                return RunStop(StopReason.REQUESTED)
        return RunStop(StopReason.TIMEOUT)

    def request_stop(self) -> None:
        """End the current run after this exit."""
        self._stop = True

    # -- the VMCB/VMCS -----------------------------------------------------------------
    def read_reg(self, reg: Reg) -> int:
        """A register's value."""
        return self.regs[reg]

    def write_reg(self, reg: Reg, value: int) -> None:
        """Set a register (64 bits)."""
        self.regs[reg] = value & U64

    def cpl(self) -> int:
        """CS.RPL."""
        return self.regs[Reg.CS] & 3

    def is_64bit_mode(self) -> bool:
        """Whether the guest runs 64-bit code (`long_mode`)."""
        return self.long_mode

    def mode_of(self, cs_selector: int) -> bool:
        """is_64bit_mode() for a selector: the fake has one mode."""
        return self.long_mode

    def linear_rip(self, rip: int) -> int:
        """CS.base + RIP: the fake's code segment has base `cs_base` (0 unless a test sets it)."""
        return self.cs_base + rip

    def hypercall_regs(self) -> tuple[int, int, bool]:
        """(RAX, CS, 64-bit mode)."""
        return self.regs[Reg.RAX], self.regs[Reg.CS], self.long_mode

    def hypercall_args(self) -> tuple[int, int, int, int]:
        """RBX, RCX, RDX, RSI."""
        r = self.regs
        return r[Reg.RBX], r[Reg.RCX], r[Reg.RDX], r[Reg.RSI]

    def complete_hypercall(self, rax: int) -> None:
        """RAX = result, RIP past the instruction."""
        self.regs[Reg.RAX] = rax & U64
        self.skip_instruction()

    def complete_tdcall(self) -> None:
        """The TDX module resumes the TD: TDCALL's status RAX = 0, RIP past the 4-byte TDCALL
        (tdcalls counts them)."""
        self.regs[Reg.RAX] = 0
        self.regs[Reg.RIP] = (self.regs[Reg.RIP] + 4) & U64
        self.tdcalls += 1

    def skip_instruction(self) -> bool:
        """RIP past the intercepted instruction (the fake retires nothing itself: False)."""
        self.regs[Reg.RIP] = (self.regs[Reg.RIP] + self._cur_len) & U64
        return False

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Record the event KVM injects."""
        self.injected.append((vector, error_code))

    def set_io_in_result(self, value: int) -> None:
        """The value the intercepted IN returns."""
        self.io_in_result = value

    def set_intercept_ud(self, enabled: bool) -> None:
        """The #UD intercept."""
        self.intercept_ud = enabled

    def set_msr_passthrough(self, indices: frozenset[int]) -> None:
        """The MSR permission bitmap."""
        self.msr_passthrough = frozenset(indices)

    def flush_code(self) -> None:
        """Count the code flushes KVM asks for."""
        self.code_flushes += 1

    def exit_int_info(self) -> int:
        """No event is ever being delivered in the fake."""
        return 0

    def npf_linear_address(self) -> int:
        """The fake scripts no NPF with a linear address."""
        return 0

    def ghcb_msr_value(self) -> int:
        """The GHCB MSR."""
        return self.ghcb.ghcb_msr_value()

    def set_ghcb_msr(self, value: int) -> None:
        """KVM's write of the GHCB MSR."""
        self.ghcb.set_ghcb_msr(value)

    def stage2_changed(self, first: Gfn, end: Gfn, private: bool) -> None:
        """Record KVM's notice that GFNs [first, end) changed attributes."""
        self.stage2_changes.append((first, end, private))

    def gmem_invalidated(self, gfns: list[Gfn]) -> None:
        """Record KVM's notice that guest_memfd freed the private pages of `gfns`."""
        self.gmem_invalidations.append(list(gfns))

    def set_dirty_log(self, bitmap: Any) -> None:
        """Record KVM's dirty bitmap (None: logging off)."""
        self.dirty_log = bitmap

    def flush_tlb(self) -> None:
        """Count the TLB flushes KVM asks for."""
        self.tlb_flushes += 1

    def sev_firmware(self) -> GuestFirmware:
        """The fake has no SEV firmware."""
        raise FakeHardwareError("the fake vCPU has no SEV firmware")

    def save_state(self) -> VcpuState:
        """The fake keeps no architectural state record."""
        raise FakeHardwareError("the fake vCPU has no state record")

    def load_state(self, state: VcpuState) -> None:
        """The fake keeps no architectural state record."""
        raise FakeHardwareError("the fake vCPU has no state record")

    def launch_update_data(self, gpa: Gpa, length: int) -> None:
        """Record SEV LAUNCH_UPDATE_DATA."""
        self.launched.append(("launch_update_data", gpa, length))

    def snp_launch_update(self, gpa: Gpa, length: int) -> None:
        """Record SNP_LAUNCH_UPDATE."""
        self.launched.append(("snp_launch_update", gpa, length))

    def tdx_mem_page_add(self, gpa: Gpa, length: int) -> None:
        """Record TDH.MEM.PAGE.ADD (KVM_TDX_INIT_MEM_REGION)."""
        self.launched.append(("tdx_mem_page_add", gpa, length))

    def ext_exit_qualification(self) -> int:
        """The extended exit qualification a test scripted (`ext_exit_qual`)."""
        return self.ext_exit_qual

    @property
    def memory(self) -> HostMemory:
        """The host's view of guest memory: the same plain bytes."""
        return self._memory

    @property
    def data(self) -> bytearray:
        """The guest memory's bytes (for a test to fill in)."""
        return self._memory.data
