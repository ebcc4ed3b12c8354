"""Memory hotplug (testbed/vmm/hotplug.py): RAM added at run time as a new memslot, and each
shared-page tracker growing with it or saying it cannot.

KVM side: KVM_SET_USER_MEMORY_REGION (virt/kvm/kvm_main.c kvm_set_memory_region: EINVAL for
bad alignment, EEXIST for an overlap) and a GPA with no memslot (mmu.c kvm_handle_noslot_fault).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.api import Vm
from testbed.errors import UsageError
from testbed.hw.exits import Vendor
from testbed.hw.memory import GuestMemory
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.uapi import (
    KVM_CAP_VM_TYPES,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    InternalErrorExit,
    KvmVmType,
    MemoryFaultExit,
)
from testbed.kvm.vm import KvmVm
from testbed.machine import Machine, VmOptions, build_program, run_guest
from testbed.tracker import (
    NATIVE_TRACKER_KINDS,
    TRACKER_KINDS,
    RangesTracker,
    SharedTracker,
    TrackerResizeError,
    make_tracker,
)
from testbed.tracker.donated import DonatedTracker, bytes_for
from testbed.vmm.hotplug import HotplugError, hotplug

SCENARIO = Path(__file__).resolve().parent.parent / "guests" / "donate_hotplug.s"
BOOT = 8 << 20
TOP = 64 << 20
HIGH = BOOT + 0x200000


def _machine(vm_type: str, tracker: str) -> Machine:
    options = VmOptions(vm_type=vm_type, memory=BOOT, max_memory=TOP, tracker=tracker,
                        defines={"BOOT_MEM": BOOT, "DONATED": int(tracker == "donated")})
    return Machine(build_program(SCENARIO, options), options)


@pytest.mark.parametrize("vm_type", ["default", "sev", "sev-es", "sw-protected"])
@pytest.mark.parametrize("tracker", [*TRACKER_KINDS, "donated"])
def test_guest_converts_above_the_old_top_after_hotplug(vm_type: str, tracker: str) -> None:
    """Before the hotplug a to-shared conversion above the old top is answered 0 and recorded
    nowhere (QEMU's kvm_convert_memory: no memory region there); after it the guest converts
    pages up to the new top, the tracker records them, and the host reads the shared page's
    plaintext there."""
    with _machine(vm_type, tracker) as machine:
        _vm, vcpu = Vm.attach(machine)
        assert list(vcpu.run_to_ucall().args) == [1]
        hotplug(machine, TOP)
        assert machine.memory.size == TOP and machine.kvm_vm.memslots[1] == (BOOT, TOP - BOOT)
        report = machine.run()
        assert report.outcome == "done", report.detail
        assert report.syncs() == [1, 2]
        shared = [tuple(r) for r in report.shared_ranges]
        assert ((HIGH >> 12) + 1, 2) in shared and ((TOP >> 12) - 1, 1) in shared
        if tracker != "donated":  # (the donated structure is the guest's: it records what it was told)
            assert not any(first <= BOOT >> 12 < first + n for first, n in shared)  # the ignored one
        assert "tracker_poisoned" not in report.extra
        assert machine.memory.host_view().read(HIGH + 0x1000, 8) == (0x5EED0F0F).to_bytes(8, "little")


def test_donated_structure_too_small_after_hotplug_is_grown_on_request() -> None:
    """After the hotplug the host needs a larger structure (min(max_ranges, pages / 2) records):
    it writes its request into the header and the guest library grows its donation at its next
    conversion and donates again."""
    with _machine("sev", "donated") as machine:
        _vm, vcpu = Vm.attach(machine)
        vcpu.run_to_ucall()
        tracker = machine.map_gpa.tracker
        assert isinstance(tracker, DonatedTracker) and tracker.region is not None
        assert tracker.region.size == bytes_for(1024)
        hotplug(machine, TOP)
        assert tracker.donation_requested == bytes_for(4096)
        assert not tracker.poisoned  # the smaller structure stays valid meanwhile
        report = machine.run()
        assert report.outcome == "done", report.detail
        sizes = [(size, ret) for _gpa, size, ret, _why in machine.vmm.donate.log]  # type: ignore[union-attr]
        assert sizes == [(4096, 28), (bytes_for(1024), 0), (bytes_for(4096), 0)]
        assert tracker.donation_requested == 0 and tracker.region.size == bytes_for(4096)


@pytest.mark.skipif(not NATIVE_TRACKER_KINDS, reason="the native tracker extension is not built")
@pytest.mark.parametrize("kind", NATIVE_TRACKER_KINDS)
def test_native_trackers_grow_with_the_hotplug(kind: str) -> None:
    """The C trackers grow too (the bitmap reallocates, new pages private; the list and the tree
    raise their bound): the guest's conversions above the old top are recorded."""
    options = VmOptions(memory=BOOT, max_memory=TOP, defines={"BOOT_MEM": BOOT, "DONATED": 0})
    with Machine(build_program(SCENARIO, options), options) as machine:
        machine.map_gpa.tracker = make_tracker(kind, guest_pages=BOOT >> 12)
        _vm, vcpu = Vm.attach(machine)
        assert list(vcpu.run_to_ucall().args) == [1]
        hotplug(machine, TOP)
        assert machine.map_gpa.tracker.guest_pages == TOP >> 12
        assert not machine.map_gpa.tracker.is_shared((TOP >> 12) - 1)  # new memory starts private
        report = machine.run()
        assert report.outcome == "done", report.detail
        shared = machine.map_gpa.tracker.shared_ranges()
        assert ((HIGH >> 12) + 1, 2) in shared and ((TOP >> 12) - 1, 1) in shared


class _FixedSizeTracker(RangesTracker):
    """A tracker that keeps SharedTracker's default _grow: it cannot grow with guest memory."""

    name = "fixed"

    def _grow(self, guest_pages: int) -> None:
        SharedTracker._grow(self, guest_pages)


def test_a_tracker_that_cannot_grow_refuses_the_hotplug() -> None:
    """A tracker that cannot resize makes the hotplug refuse, and nothing changed."""
    options = VmOptions(memory=BOOT, max_memory=TOP, defines={"BOOT_MEM": BOOT})
    with Machine(build_program(SCENARIO, options), options) as machine:
        machine.map_gpa.tracker = _FixedSizeTracker(BOOT >> 12, 4096)
        with pytest.raises(HotplugError, match="cannot grow"):
            hotplug(machine, TOP)
        assert machine.memory.size == BOOT and list(machine.kvm_vm.memslots) == [0]


def test_a_slot_kvm_refuses_leaves_the_tracker_as_it_was() -> None:
    """KVM is asked first: an unaligned size (EINVAL) or a slot id in use refuses the hotplug
    before the tracker grows (kvm_set_memory_region's checks); a deleted slot (memory_size 0)
    takes the new RAM back."""
    options = VmOptions(memory=BOOT, max_memory=TOP, defines={"BOOT_MEM": BOOT})
    with Machine(build_program(SCENARIO, options), options) as machine:
        before = machine.map_gpa.tracker.guest_pages
        with pytest.raises(HotplugError, match="EINVAL"):
            hotplug(machine, TOP - 0x800)
        with pytest.raises(HotplugError, match="exists"):
            hotplug(machine, TOP, slot=0)
        assert machine.map_gpa.tracker.guest_pages == before and list(machine.kvm_vm.memslots) == [0]
        machine.kvm_vm.set_user_memory_region(1, BOOT, TOP - BOOT)
        machine.kvm_vm.set_user_memory_region(1, BOOT, 0)
        assert list(machine.kvm_vm.memslots) == [0]


UNPLUGGED = """
guest_main:
    mov rax, BOOT_MEM + 0x1000
    mov qword ptr [rax], 1
    ret
"""


def test_touching_memory_not_yet_plugged_has_no_memslot() -> None:
    """The reservation above RAM is no memory until plugged: an access there is a GPA without a
    memslot (KVM_EXIT_INTERNAL_ERROR, emulation)."""
    report = run_guest("unplugged.s", VmOptions(memory=BOOT, max_memory=TOP, defines={"BOOT_MEM": BOOT}),
                       text=UNPLUGGED)
    assert report.outcome == "internal_error" and "outside guest memory" in report.detail


def test_a_private_access_without_a_memslot_is_a_memory_fault_exit() -> None:
    """KVM accepts attributes for any GFN; a private access to one no memslot covers is not MMIO:
    kvm_mmu_faultin_pfn()/kvm_handle_noslot_fault() prepare KVM_EXIT_MEMORY_FAULT (flag PRIVATE,
    the page) instead (on sw-protected the attribute makes the access private:
    kvm_mmu_page_fault's PFERR_PRIVATE_ACCESS)."""
    with Vm(vm_type="sw-protected", memory=BOOT, max_memory=TOP, defines={"BOOT_MEM": BOOT}, timeout=20) as vm:
        vcpu = vm.load("unplugged.s", text=UNPLUGGED)
        vm.set_memory_attributes(BOOT + 0x1000, 0x1000, private=True)
        end = vcpu.run()
    assert isinstance(end, MemoryFaultExit), end
    assert (end.flags, end.gpa, end.size) == (KVM_MEMORY_EXIT_FLAG_PRIVATE, BOOT + 0x1000, 0x1000)


def test_hotplug_limits() -> None:
    """Growth beyond the reservation, or not growth at all, is refused; KVM refuses an overlapping
    or unaligned slot (EEXIST / EINVAL); SNP and TDX VMs cannot reserve hotplug memory."""
    options = VmOptions(memory=BOOT, max_memory=TOP, defines={"BOOT_MEM": BOOT})
    with Machine(build_program(SCENARIO, options), options) as machine:
        with pytest.raises(HotplugError, match="above"):
            hotplug(machine, 2 * TOP)
        with pytest.raises(HotplugError, match="only grows"):
            hotplug(machine, BOOT)
        with pytest.raises(KvmIoctlError) as info:
            machine.kvm_vm.set_user_memory_region(1, BOOT - 0x1000, 0x2000)
        assert info.value.errno == errno.EEXIST
        with pytest.raises(KvmIoctlError) as info:
            machine.kvm_vm.set_user_memory_region(1, BOOT, 0x1800)
        assert info.value.errno == errno.EINVAL
        assert machine.memory.size == BOOT
    with pytest.raises(UsageError, match="supported on"):
        VmOptions(vm_type="sev-snp", memory=BOOT, max_memory=TOP).validate()
    with pytest.raises(UsageError, match="between"):
        VmOptions(memory=BOOT, max_memory=BOOT // 2).validate()


@pytest.mark.parametrize("kind", TRACKER_KINDS)
def test_trackers_resize_keeping_their_records(kind: str) -> None:
    """bitmap, ranges and tree grow to the new size keeping every record, take pages above the old
    bound after it, and refuse to shrink."""
    tracker = make_tracker(kind, guest_pages=1024)
    tracker.set_shared(1000, 24)
    tracker.set_shared(10, 2)
    tracker.resize(1 << 20)
    assert tracker.guest_pages == 1 << 20
    tracker.set_shared(1024, 8)
    tracker.set_shared((1 << 20) - 1, 1)
    assert tracker.shared_ranges() == [(10, 2), (1000, 32), ((1 << 20) - 1, 1)]
    with pytest.raises(TrackerResizeError):
        tracker.resize(512)


def test_the_native_fill_takes_the_plugged_memory() -> None:
    """Plugging tells the vCPU's C TLB fill the new size (GuestMemory.on_resize): the run after
    the hotplug, which touches pages above the old top, needs no fill in Python."""
    with _machine("default", "ranges") as machine:
        _vm, vcpu = Vm.attach(machine)
        assert list(vcpu.run_to_ucall().args) == [1]
        hotplug(machine, TOP)
        assert machine.cpu._native_mmu is not None  # the C extension is part of the install
        before = machine.cpu._py_tlb_fills
        assert machine.run().outcome == "done"
        assert machine.cpu._py_tlb_fills == before


def _kvm_vm(vm_type: KvmVmType) -> KvmVm:
    memory = GuestMemory(BOOT, capacity=TOP, guest_memfd=vm_type != KvmVmType.KVM_X86_DEFAULT_VM)
    return KvmVm(vm_type, Vendor.AMD, memory)


def _errno(call: Callable[[], None]) -> int:
    try:
        call()
    except KvmIoctlError as exc:
        return exc.errno
    return 0


def test_set_user_memory_region_answers_as_kvm_set_memory_region() -> None:
    """kvm_set_memory_region()/kvm_vm_ioctl_set_memory_region(): a slot id from KVM_USER_MEM_SLOTS
    (32764 on x86) up is EINVAL; an existing slot is looked at before any overlap - a new size is
    EINVAL (not EEXIST), the same region is "nothing to change" (0), a guest_memfd slot is
    immutable (EINVAL); deleting a slot that does not exist is EINVAL; a new slot overlapping one
    is EEXIST."""
    vm = _kvm_vm(KvmVmType.KVM_X86_DEFAULT_VM)
    assert _errno(lambda: vm.set_user_memory_region(32764, BOOT, 0x1000)) == errno.EINVAL
    assert _errno(lambda: vm.set_user_memory_region(32763, BOOT, 0x1000)) == 0
    assert _errno(lambda: vm.set_user_memory_region(32763, 0, 0)) == 0  # deleted again
    vm.set_user_memory_region(1, BOOT, 0x100000)
    assert _errno(lambda: vm.set_user_memory_region(1, 0, 0x2000)) == errno.EINVAL  # resize, over slot 0
    assert _errno(lambda: vm.set_user_memory_region(1, BOOT, 0x100000)) == 0  # the same region again
    assert _errno(lambda: vm.set_user_memory_region(1, 0, 0x100000)) == errno.EEXIST  # a move onto slot 0
    assert _errno(lambda: vm.set_user_memory_region(2, BOOT + 0x80000, 0x100000)) == errno.EEXIST
    assert _errno(lambda: vm.set_user_memory_region(5, 0, 0)) == errno.EINVAL
    assert vm.memslots == {0: (0, BOOT), 1: (BOOT, 0x100000)}
    gmem = _kvm_vm(KvmVmType.KVM_X86_SW_PROTECTED_VM)
    assert _errno(lambda: gmem.set_user_memory_region(0, 0, BOOT)) == errno.EINVAL  # guest_memfd: immutable


def test_vm_types_follow_the_vendor() -> None:
    """KVM_CAP_VM_TYPES: DEFAULT and SW_PROTECTED everywhere, the SEV types on AMD
    (sev_hardware_setup), TDX on Intel (vmx/main.c vt_init)."""
    amd = KvmVm(KvmVmType.KVM_X86_DEFAULT_VM, Vendor.AMD, GuestMemory(BOOT)).check_extension(KVM_CAP_VM_TYPES)
    intel = KvmVm(KvmVmType.KVM_X86_DEFAULT_VM, Vendor.INTEL, GuestMemory(BOOT)).check_extension(KVM_CAP_VM_TYPES)
    both = 1 << KvmVmType.KVM_X86_DEFAULT_VM | 1 << KvmVmType.KVM_X86_SW_PROTECTED_VM
    sev = 1 << KvmVmType.KVM_X86_SEV_VM | 1 << KvmVmType.KVM_X86_SEV_ES_VM | 1 << KvmVmType.KVM_X86_SNP_VM
    assert (amd, intel) == (both | sev, both | 1 << KvmVmType.KVM_X86_TDX_VM)


PLUGGED = """
guest_main:
    GUEST_SYNC 0
    mov rax, BOOT_MEM + 0x1000
    mov qword ptr [rax], 0x1234
    GUEST_SYNC 1
    mov rax, BOOT_MEM + 0x1000
    mov rax, qword ptr [rax]
    GUEST_SYNC 2, rax
    ret
"""


def test_deleting_the_hotplugged_slot_takes_its_ram_away() -> None:
    """KVM_MR_DELETE of the topmost slot: its GPAs have no memslot any more, so the guest's next
    access there is a no-slot fault (kvm_handle_noslot_fault: emulated MMIO, which the testbed
    ends as an internal error), not a read of the old page."""
    with Vm(memory=BOOT, max_memory=TOP, defines={"BOOT_MEM": BOOT}, timeout=20) as vm:
        vcpu = vm.load("plugged.s", text=PLUGGED)
        assert list(vcpu.run_to_ucall().args) == [0]
        hotplug(vm.machine, TOP)
        assert list(vcpu.run_to_ucall().args) == [1]
        vm.machine.kvm_vm.set_user_memory_region(1, BOOT, 0)
        assert vm.machine.memory.size == BOOT and list(vm.machine.kvm_vm.memslots) == [0]
        end = vcpu.run()
    assert isinstance(end, InternalErrorExit) and "outside guest memory" in end.detail, end
