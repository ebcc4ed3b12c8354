"""The vCPU: Unicorn as the silicon, plus what real hardware adds that Unicorn lacks.

`UnicornVcpu` is assembled from one module per concern, each a layer of the class:

* hw/unicorn_binding.py - the engine, raw ctypes hooks, register access, the calibration of
  QEMU context offsets (the only module that imports Unicorn);
* hw/mmu.py - translation, the TLB-fill handler (C-bit, aliases, stage 2, RMP), W^X for code
  frames, segmentation;
* hw/events.py - exception delivery through the IDT, #DF and the triple fault, and `_exit`,
  every VM exit's one way out;
* hw/intercepts.py - intercepted instructions: site scanning, hypercall/VMGEXIT/PVALIDATE/#UD,
  CPUID, IN/OUT, the MSRs the hardware implements;
* hw/runloop.py - one hardware run, and the breakpoint that boots a guest partway.

The hardware decides nothing that KVM decides: it reports every exit through
`Hypervisor.vmexit` and lets the hypervisor read and write state through the `VcpuHardware`
methods (hw/exits.py). It asks KVM one thing, through `StagePrivacy`: whether a GFN is mapped
private in stage 2.
"""

from __future__ import annotations

from collections.abc import Callable

from testbed.hw.exits import Vendor
from testbed.hw.intercepts import MAX_SITE_HOOKS
from testbed.hw.memory import GuestMemory, StagePrivacy
from testbed.hw.mmu import SVM_EXIT_PAGE_NOT_VALIDATED
from testbed.hw.runloop import RunLoop
from testbed.hw.unicorn_binding import (
    _CAL_GDT,
    PRIVATE_ALIAS_BASE,
    HardwareError,
    _fastexit,
    cs_base_offset,
    error_code_offset,
    hflags_offset,
    old_exception_offset,
)
from testbed.trace import Tracer
from testbed.x86 import MSR_AMD64_SEV
from testbed.x86.paging import PagingMode

__all__ = [
    "MAX_SITE_HOOKS",
    "PRIVATE_ALIAS_BASE",
    "SVM_EXIT_PAGE_NOT_VALIDATED",
    "_CAL_GDT",
    "HardwareError",
    "UnicornVcpu",
    "_fastexit",
    "cs_base_offset",
    "error_code_offset",
    "hflags_offset",
    "old_exception_offset",
]


class UnicornVcpu(RunLoop):
    """One x86-64 vCPU of vendor `vendor` running over `memory`, reporting to a hypervisor
    (attached by KVM: `attach_hypervisor`) and asking `stage2` (KVM's memory attributes)
    whether a GFN is private."""

    def __init__(
        self,
        memory: GuestMemory,
        vendor: Vendor,
        paging: PagingMode,
        tracer: Tracer | None = None,
        *,
        sev_es: bool = False,
        snp: bool = False,
        stage2: StagePrivacy | None = None,
        sev_status: int | None = None,
        on_guest_ud: Callable[[int, int, bytes], None] | None = None,
        tdx_gpaw: int | None = None,
    ) -> None:
        self._init_binding(memory)
        # tdx_gpaw: a TD (the `tdx` VM type) with this GPA width; the TDX module is part of it.
        self._init_mmu(memory, paging, snp, stage2, tdx_gpaw)
        self._init_events(vendor, tracer if tracer is not None else Tracer.disabled())
        self._init_intercepts(sev_es or snp)
        self._init_runloop()
        self.on_guest_ud = on_guest_ud
        if stage2 is not None and memory.guest_memfd:
            memory.attach_attributes(stage2)  # the memory controller asks the same question
        if sev_status is not None:
            # SEV_STATUS (MSR 0xC0010131) is the hardware's, read-only in the guest.
            self.hw_msrs[MSR_AMD64_SEV] = (lambda: sev_status, None)

    def close(self) -> None:
        """Release the emulator (idempotent): uc_close frees the engine with its hooks and its
        mappings of guest memory, then the references that tie the vCPU to the rest of the
        machine (hypervisor, memory callbacks, the C exit object) are dropped. Close the
        vCPU before the guest memory it maps. Every later use raises MachineClosedError."""
        if self._closed:
            return
        if self._running:
            raise HardwareError("close() called from inside a run (a hook): the emulator is still executing")
        self._release_engine()
        released = self._uc  # the stand-in that refuses every use
        self._pte_reader_plain = self._pte_reader_private = released
        self._site_hooks.clear()
        self._stop_hook = None
        self._bp_hook = None
        self.hypervisor = None
        self._hypercall_fastpath = None
        self.on_guest_ud = None
        self.hw_msrs.clear()
        self._pending_events.clear()
        # The per-frame tables (shared with the C fill, released with the engine above) and
        # the RMP: unmapped now, not when the closed vCPU is collected.
        for table in (self._exec_frames, self._scanned_frames, self._scan_vas):
            table.close()
        if self.rmp is not None:
            self.rmp.close()
        mem = self._mem
        mem.on_ownership_change = None
        mem.on_host_write = None
        mem.host_write_guard = None
