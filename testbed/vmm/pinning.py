"""The VMM's pin accounting: how much host memory a confidential guest holds pinned, over time.

Two regimes, as the seed thread on deferring page pinning settles them:

* legacy `sev` / `sev-es`: the VMM registers all guest RAM with KVM_MEMORY_ENCRYPT_REG_REGION
  at launch (QEMU's sev_ram_block_added(), target/i386/sev.c; KVM's
  sev_mem_enc_register_region() pins every page with FOLL_LONGTERM, svm/sev.c). The pinned
  count is KVM's own, sev->pages_locked (KvmVm.pages_locked, told through
  `KvmVm.on_pages_locked`): the whole guest from the start, plus the range a
  KVM_SEV_LAUNCH_UPDATE_DATA pins while it runs, a region registered twice counted twice;
  it drops only when a region is unregistered (KVM_MEMORY_ENCRYPT_UNREG_REGION) or the VM
  is destroyed (sev_vm_destroy).
* guest_memfd (`sw-protected`, `sev-snp`, `tdx`): nothing is registered. A private page is
  allocated - and, being guest_memfd memory, unmovable and unswappable: pinned - on the first
  private fault (kvm_mmu_faultin_pfn_gmem -> kvm_gmem_get_pfn, virt/kvm/guest_memfd.c) or by
  a populate (SNP_LAUNCH_UPDATE, TDX_INIT_MEM_REGION), and freed when the VMM punches it out
  of the guest_memfd on a conversion to shared or a discard (fallocate(PUNCH_HOLE):
  kvm_gmem_punch_hole). Shared memory is the VMM's ordinary memory: counted apart, as the
  shared pages the guest or the host touched and the VMM has not discarded.

The hardware's backing (hw/memory.py) counts the pages that exist and tells this module
through one callback (`GuestMemory.on_backing_pages`); the hardware imports nothing of the
VMM. The VMM samples the counts at every user exit it handles (`sample`), into a window
bounded like the report's `user_exits`; the peaks are exact (kept at every change, not
only at the samples). The samples' clock is the user exit's number (0: the launch), not
wall time, so a report stays reproducible (a snapshot-restored run reports as a fresh one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from testbed.x86 import PAGE_SIZE

#: Samples the report keeps at each end of `memory.samples` (as `user_exits` does).
SAMPLE_WINDOW = 1000

PinModel = Literal["legacy", "guest_memfd"]


class _Window(list[list[int]]):
    """The first and last `keep` samples; `dropped` counts the ones between them."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = keep
        self.dropped = 0

    def add(self, entry: list[int]) -> None:
        if len(self) >= 2 * self.keep:
            del self[self.keep]
            self.dropped += 1
        self.append(entry)


class PinAccounting:
    """Pinned (private) and shared host pages of one VM, their peaks, and samples over time.

    `model` is "legacy" (KVM's pages_locked, reported through `locked_changed`) or
    "guest_memfd" (pages pinned and released as the backing reports them through
    `backing_changed`)."""

    def __init__(self, model: PinModel, guest_pages: int, *, keep: int = SAMPLE_WINDOW) -> None:
        self.model: PinModel = model
        self.guest_pages = guest_pages
        self.pinned = 0
        self.shared = 0
        self.pinned_peak = 0
        self.shared_peak = 0
        self.total_peak = 0
        #: the VMM's KVM_MEMORY_ENCRYPT_REG_REGION calls that succeeded and were not undone:
        #: (userspace address, size in bytes, pages pinned); what is pinned is KVM's count
        #: (`locked_changed`), not their sum
        self.regions: list[tuple[int, int, int]] = []
        self._exits = 0
        self.samples = _Window(keep)

    # -- what changes the counts -------------------------------------------------------------
    def register_ram(self, reg_region: Callable[[int, int], int], hva: int, size: int) -> None:
        """Legacy: KVM_MEMORY_ENCRYPT_REG_REGION over the RAM block [hva, hva + size), as QEMU's
        sev_ram_block_added() does for every block (at launch, on an incoming VM, on a
        hotplug), recorded with the pages KVM pinned (a refusal, KvmIoctlError, records
        nothing); guest_memfd pins nothing this way."""
        if self.model == "legacy":
            self.regions.append((hva, size, reg_region(hva, size)))

    def unregister_ram(self, unreg_region: Callable[[int, int], None], hva: int, size: int) -> None:
        """Legacy: KVM_MEMORY_ENCRYPT_UNREG_REGION over the RAM block [hva, hva + size), as QEMU's
        sev_ram_block_removed() does when a block goes (a hotplug undone), and its record
        dropped; KvmIoctlError (EINVAL) if KVM has no such region."""
        if self.model == "legacy":
            unreg_region(hva, size)
            for index, region in enumerate(self.regions):
                if region[:2] == (hva, size):  # the first, as KVM's find_enc_region takes
                    del self.regions[index]
                    break

    def locked_changed(self, delta: int) -> None:
        """Legacy: KVM's sev->pages_locked moved by `delta` pages (KvmVm.on_pages_locked): a
        region registered or unregistered, a LAUNCH_UPDATE_DATA range pinned and unpinned, the
        regions left unpinned when the VM is destroyed."""
        if self.model == "legacy":
            self._change(delta, 0)

    def backing_changed(self, private_delta: int, shared_delta: int) -> None:
        """guest_memfd: the backing allocated or freed pages (GuestMemory.on_backing_pages)."""
        if self.model == "guest_memfd":
            self._change(private_delta, shared_delta)

    def _change(self, pinned_delta: int, shared_delta: int) -> None:
        pinned = self.pinned = self.pinned + pinned_delta
        shared = self.shared = self.shared + shared_delta
        self.pinned_peak = max(self.pinned_peak, pinned)
        self.shared_peak = max(self.shared_peak, shared)
        self.total_peak = max(self.total_peak, pinned + shared)

    # -- samples -----------------------------------------------------------------------------
    def sample(self) -> None:
        """Record the counts now (the VMM calls it at each user exit it handles)."""
        self._exits += 1
        self.samples.add([self._exits, self.pinned, self.shared])

    def launched(self) -> None:
        """The launch is over: exit 0 of the samples, and the first sample."""
        self._exits = 0
        self.samples.clear()
        self.samples.dropped = 0
        self.samples.add([0, self.pinned, self.shared])

    def to_json(self) -> dict[str, Any]:
        """The report's `memory` object."""
        return {
            "model": self.model,
            "page_size": PAGE_SIZE,
            "guest_pages": self.guest_pages,
            "pinned_peak_pages": self.pinned_peak,
            "pinned_final_pages": self.pinned,
            "shared_peak_pages": self.shared_peak,
            "shared_final_pages": self.shared,
            "total_peak_pages": self.total_peak,
            "total_final_pages": self.pinned + self.shared,
            "registered_regions": [{"size": size, "pages": pages} for _hva, size, pages in self.regions],
            "samples_columns": ["exit", "pinned_pages", "shared_pages"],
            "samples": [list(s) for s in self.samples],
            "samples_dropped": self.samples.dropped,
        }
