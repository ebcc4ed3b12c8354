"""The run loop: one hardware run (KVM's VMRUN/VMLAUNCH until the hypervisor asks to stop).

`run` starts Unicorn, then sorts out why it returned: a fault a TLB fill left pending (a #PF
or #GP delivered into the guest, or an NPF exit), a triple fault (a shutdown exit), HLT (an
exit with RIP past it), an event the hypervisor injected while the guest was not at an
instruction boundary, a breakpoint set to boot a guest partway, or the timeout (the
process's watchdog, hw/watchdog.py, stops the engine at the run's deadline).
"""

from __future__ import annotations

import time

from testbed.hw.exits import RunStop, StopReason, SvmExitCode, Vendor, VmxExitReason
from testbed.hw.intercepts import Intercepts
from testbed.hw.mmu import _DeliveryFault
from testbed.hw.watchdog import WATCHDOG, Alarm
from testbed.x86 import PFERR_FETCH, U64, Reg, Vector
from testbed.x86.addr import Gva
from testbed.x86.paging import ACCESS_FETCH, ACCESS_WRITE

_REQUESTED = RunStop(StopReason.REQUESTED)
_TIMEOUT = RunStop(StopReason.TIMEOUT)


class RunLoop(Intercepts):
    """Runs of the guest, and the breakpoint that ends one at an address."""

    def _init_runloop(self) -> None:
        self._breakpoint = U64  # see the `breakpoint` property
        self._bp_hook: int | None = None
        self._at_breakpoint = False

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
            self._del_hook_quiesced(self._bp_hook)
            self._bp_hook = None
            self.flush_tlb()
        self._breakpoint = va & U64
        if self._breakpoint != U64:
            self._bp_hook = self._add_code_hook(self._on_breakpoint, va, va)
            self.flush_code()  # a block translated before the hook existed would not call it

    def _on_breakpoint(self, _address: int) -> None:
        # From a code hook, RIP stays at the instruction, not executed. After the stop Unicorn
        # probes a fetch at 0xfffffffffffff000 (see _on_stop_block): quiesced, so the probe
        # maps anything instead of raising a spurious #PF; run() flushes it.
        self._at_breakpoint = True
        self._quiesced = True
        self._emu_stop()

    def run(self, timeout_s: float) -> RunStop:
        """Run the guest until the hypervisor asks to stop, a timeout, or an emulator error.

        The timeout is the process's watchdog (hw/watchdog.py), armed once for the whole run:
        it stops the engine at the deadline and records the arming (generation) it stopped,
        which is how a timeout is told apart from a stop the hypervisor requested."""
        deadline = time.monotonic() + timeout_s
        alarm = self._alarm
        WATCHDOG.arm(alarm, deadline)
        try:
            return self._run(deadline, alarm)
        finally:
            WATCHDOG.disarm(alarm)

    def _run(self, deadline: float, alarm: Alarm) -> RunStop:
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
                    return _REQUESTED
                return RunStop(StopReason.EMULATOR_ERROR, "vCPU resumed after a triple fault")
            if self._stop_requested:
                self._stop_requested = False
                return _REQUESTED
            if alarm.timed_out or deadline <= time.monotonic():
                return _TIMEOUT
            if self._site_reset_pending:
                self._reset_site_hooks()
            rip = self.read_reg(Reg.RIP)
            self._pending_fault = None
            self._pending_npf = None
            self._stop_block_hit = False
            error = self._emu_start(rip)  # Unicorn's status, 0 for none
            stopped_by_hook = self._stop_block_hit
            # A W^X flush (`_request_tlb_flush`) is done as soon as the emulator returns, for
            # whatever reason it did: none is left pending when the run ends.
            stopped_for_flush = self._tlb_flush_pending
            if stopped_for_flush and not self._site_reset_pending:
                self.flush_pending_tlb()
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
                if self._unmodelled is not None:
                    detail, self._unmodelled = self._unmodelled, None
                    return RunStop(StopReason.EMULATOR_ERROR, detail)
                return _REQUESTED
            if not error and stopped_by_hook and not self._shutdown:
                # stopped before the block ran for a reset or a TLB flush: resume. Only then: a
                # flush asked for during the translation of the block that ran last (a fetch fill
                # of its second page) leaves the run ended as the guest ended it (a HLT).
                continue
            if error:
                if self._pending_fault is not None:
                    pf = self._pending_fault
                    self._pending_fault = None
                    if pf.vector == Vector.VE and self._tdx is not None and self._pending_ve is not None:
                        page, gpa, access = self._pending_ve
                        self._pending_ve = None
                        gla = self._fault_address(page, PFERR_FETCH if access == ACCESS_FETCH else 0)
                        self._cur_rip = self.read_reg(Reg.RIP)
                        self._tdx.mmio_ve(gla, gpa | (gla & 0xFFF), access == ACCESS_WRITE, access == ACCESS_FETCH)
                        continue
                    cr2 = None if pf.cr2 is None else self._fault_address(pf.cr2, pf.error_code or 0)
                    self._tracer.emit("hw", "fault", vector=pf.vector, cr2=cr2, error_code=pf.error_code,
                                      rip=self.read_reg(Reg.RIP))
                    self._deliver_now(pf.vector, pf.error_code, cr2=cr2)
                    continue
                if self._pending_npf is not None:
                    gpa, npf_error = self._pending_npf
                    self._pending_npf = None
                    code = (SvmExitCode.SVM_EXIT_NPF if self.vendor is Vendor.AMD
                            else VmxExitReason.EXIT_REASON_EPT_VIOLATION)
                    self._cur_rip = self.read_reg(Reg.RIP)
                    self._npf_linear = self._fault_address(self._npf_linear, npf_error & PFERR_FETCH)
                    self._exit(code, npf_error, gpa)
                    if self._tdx is not None:
                        self._tdx.ext_exit_qual = 0
                    continue
                if self._shutdown:
                    continue
                return RunStop(StopReason.EMULATOR_ERROR,
                               f"{self._engine_error(error)} at rip 0x{self.read_reg(Reg.RIP):x}")
            if self._shutdown:
                continue
            if alarm.timed_out:
                return _TIMEOUT  # the watchdog stopped the engine
            if self.read_reg(Reg.RIP) == self.breakpoint:
                return RunStop(StopReason.REQUESTED, "breakpoint")
            # emu_start returned on its own: Unicorn ends a run at HLT with RIP after it. RIP is
            # CS-relative: outside 64-bit mode the byte before it is at CS.base + RIP - 1.
            rip = self.read_reg(Reg.RIP)
            try:
                prev = self.fetch_bytes(Gva(self.linear_rip(rip) - 1), 1)
            except _DeliveryFault:
                prev = b""
            if prev == b"\xf4" and self._tdx is not None:
                # In a TD, HLT is a #VE (td_generic_ve_exit), at the instruction.
                self._cur_rip = rip - 1
                self.write_reg(Reg.RIP, rip - 1)
                self._tdx.instruction_ve(VmxExitReason.EXIT_REASON_HLT, 1)
                continue
            if prev == b"\xf4":
                self._cur_rip = rip - 1
                self._cur_len = 1
                code = SvmExitCode.SVM_EXIT_HLT if self.vendor is Vendor.AMD else VmxExitReason.EXIT_REASON_HLT
                # RIP already points after HLT, as after KVM's kvm_emulate_halt().
                self._exit(code, 0, 0)
                continue
            return RunStop(StopReason.EMULATOR_ERROR, f"emulation ended unexpectedly at rip 0x{rip:x}")
