"""Memory hotplug: the VMM adds RAM to a running guest (the seed's "2 GB -> 64 GB" question).

QEMU plugs a DIMM into address space it reserved at start (`-m SIZE,maxmem=MAX`) and hands
KVM a new memslot (KVM_SET_USER_MEMORY_REGION). The testbed does the same: a VM built with
`VmOptions(max_memory=MAX)` reserves MAX bytes of lazily mapped backing (free until touched,
hw/memory.py) and maps it all into the emulator, but its RAM is `memory` bytes: a GPA above
is refused by the MMU as a GPA without a memslot (KVM_EXIT_INTERNAL_ERROR, as for any GPA
outside RAM). `hotplug(machine, size)` then

1. registers the new RAM for encryption on legacy SEV, as QEMU does when the DIMM's RAM block
   is added, before its memslot (sev_ram_block_added -> KVM_MEMORY_ENCRYPT_REG_REGION,
   pinned): KVM refuses a pin beyond the VMM's memlock limit or the host's RAM before
   anything else changed (KvmVm.memlock_limit_pages, totalram_pages);
2. adds the slot (KvmVm.set_user_memory_region: it must start at the end of RAM and end
   within the reservation);
3. grows the shared-page tracker (`SharedTracker.resize`): the bitmap reallocates, ranges and
   tree raise their bound, the donated tracker raises its bound and, if the guest's structure
   is now smaller than the host requires, asks the guest to donate more (the header's
   host_request; guests/lib/donate.s grows at its next conversion); the native trackers grow
   the same way in C. A slot or tracker refusal deletes the slot again (memory_size 0) and
   unregisters the RAM (sev_ram_block_removed -> KVM_MEMORY_ENCRYPT_UNREG_REGION): nothing
   has changed;
4. grows the hardware's RAM and raises the bound of the VMM's MAP_GPA_RANGE handler.

What is supported: growth only, contiguous from the end of RAM, up to `max_memory`, on the
default, sw-protected, sev and sev-es VM types (SEV-SNP and TDX would need RMP / Secure-EPT
state for the new RAM: refused). The guest runtime is assembled for `max_memory`
(GUEST_MEM_SIZE), so its identity map already covers the new RAM, as Linux reserves its
direct map; on sev its pages are private (C-bit set, attributes private) like the rest.
"""

from __future__ import annotations

from typing import Protocol

from testbed.errors import UsageError
from testbed.hw.memory import GuestMemory
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.vm import KvmVm
from testbed.layout import MAX_MEMORY
from testbed.tracker import TrackerResizeError
from testbed.vmm.map_gpa import MapGpaHandler
from testbed.vmm.pinning import PinAccounting
from testbed.x86 import PAGE_SHIFT


class SizedOptions(Protocol):
    """The VmOptions fields check_max_memory reads."""

    memory: int
    max_memory: int | None
    vm_type: str


class HotplugMachine(Protocol):
    """What hotplug() touches of a machine (testbed.machine.Machine provides it): the layers'
    objects the composition root wired together, named here without importing it."""

    memory: GuestMemory
    kvm_vm: KvmVm
    map_gpa: MapGpaHandler
    pinning: PinAccounting | None


HOTPLUG_VM_TYPES = ("default", "sw-protected", "sev", "sev-es")


class HotplugError(UsageError):
    """The RAM could not be added; nothing changed."""


def check_max_memory(options: SizedOptions) -> None:
    """UsageError unless `options.max_memory` can be reserved for this VM (VmOptions.validate)."""
    top = options.max_memory
    assert top is not None
    if top < options.memory or top % (2 << 20) or top > MAX_MEMORY:
        raise UsageError(f"max memory 0x{top:x}: must be a multiple of 2 MiB between the memory size "
                         f"0x{options.memory:x} and 64 GiB")
    if top != options.memory and options.vm_type not in HOTPLUG_VM_TYPES:
        raise UsageError(f"memory hotplug (max memory) is supported on {', '.join(HOTPLUG_VM_TYPES)}, "
                         f"not {options.vm_type}")


def hotplug(machine: HotplugMachine, size: int, slot: int | None = None) -> None:
    """Grow the guest's RAM to `size` bytes with a new memslot (module docstring); HotplugError
    (nothing changed) if KVM refuses to pin the RAM or the slot, or the tracker cannot grow."""
    memory = machine.memory
    old = memory.size
    if size <= old:
        raise HotplugError(f"hotplug to 0x{size:x} bytes: guest memory is 0x{old:x} already (it only grows)")
    slot = len(machine.kvm_vm.memslots) if slot is None else slot
    tracker = machine.map_gpa.tracker
    if size > memory.capacity:
        raise HotplugError(f"hotplug to 0x{size:x} bytes: above the 0x{memory.capacity:x} bytes reserved "
                           "(VmOptions.max_memory)")
    pages = size >> PAGE_SHIFT
    # KVM first: the RAM block's registration (legacy SEV), then the slot, each refused before
    # anything else changed; a later refusal undoes the earlier steps, so a refusal changes nothing.
    hva = memory.dram_address() + old
    pinning = machine.pinning
    try:
        if pinning is not None:
            pinning.register_ram(machine.kvm_vm.memory_encrypt_reg_region, hva, size - old)
    except KvmIoctlError as exc:
        raise HotplugError(f"hotplug to 0x{size:x} bytes refused: {exc}") from None
    try:
        machine.kvm_vm.set_user_memory_region(slot, old, size - old)
        try:
            tracker.resize(pages)
        except TrackerResizeError:
            machine.kvm_vm.set_user_memory_region(slot, old, 0)
            raise
    except (KvmIoctlError, TrackerResizeError) as exc:
        if pinning is not None:
            pinning.unregister_ram(machine.kvm_vm.memory_encrypt_unreg_region, hva, size - old)
        raise HotplugError(f"hotplug to 0x{size:x} bytes refused: {exc}") from None
    if pinning is not None:
        pinning.guest_pages = pages
    memory.plug(size)  # (the vCPU's native TLB fill is told the new size: GuestMemory.on_resize)
    machine.map_gpa.guest_pages = pages  # (and with it the per-call bound, unless the VMM set one)
