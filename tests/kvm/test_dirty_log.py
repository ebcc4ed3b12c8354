"""Dirty logging (testbed/kvm/dirty_log.py, the MMU's write protection in testbed/hw/mmu.py and
testbed/hw/_nativemmu.c): KVM_MEM_LOG_DIRTY_PAGES, KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG.

Modelled on virt/kvm/kvm_main.c (kvm_get_dirty_log_protect, kvm_clear_dirty_log_protect,
mark_page_dirty_in_slot, __kvm_write_guest_page, kvm_vm_ioctl_enable_cap_generic for
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) and arch/x86/kvm/mmu/mmu.c (the write-protection fault).
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

import testbed
from testbed.hw.exits import Vendor
from testbed.hw.fake import FakeVcpu
from testbed.hw.memory import GuestMemory
from testbed.kvm.dirty_log import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    bitmap_bytes,
    dirty_pages,
)
from testbed.kvm.ghcb import Ghcb, GhcbSave, SwExitCode
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.uapi import KvmVmType
from testbed.kvm.vcpu import KvmVcpu
from testbed.kvm.vm import KvmVm
from testbed.layout import Layout

MEM = 1 << 20  # 256 pages
PAGES = MEM >> 12


def make(vm_type: KvmVmType = KvmVmType.KVM_X86_DEFAULT_VM) -> tuple[FakeVcpu, KvmVm, KvmVcpu]:
    hw = FakeVcpu(Vendor.AMD, MEM)
    vm = KvmVm(vm_type, Vendor.AMD, hw.memory)
    return hw, vm, KvmVcpu(vm, hw)


# ------------------------------------------------------------------ the ioctls' shapes
def test_get_dirty_log_without_logging_is_enoent() -> None:
    """KVM_GET_DIRTY_LOG on a slot without a dirty bitmap (logging never enabled, or disabled
    again) fails with ENOENT (kvm_get_dirty_log_protect: !memslot->dirty_bitmap)."""
    _, vm, _ = make()
    with pytest.raises(KvmIoctlError) as exc:
        vm.get_dirty_log()
    assert exc.value.errno == errno.ENOENT
    vm.set_dirty_logging(True)
    vm.set_dirty_logging(False)
    with pytest.raises(KvmIoctlError) as exc:
        vm.get_dirty_log()
    assert exc.value.errno == errno.ENOENT


@pytest.mark.parametrize(("vm_type", "slot", "err"), [
    (KvmVmType.KVM_X86_DEFAULT_VM, 1, errno.ENOENT), (KvmVmType.KVM_X86_DEFAULT_VM, 32764, errno.EINVAL),
    # SMM's address space 1 exists unless the VM has private memory (kvm_arch_nr_memslot_as_ids):
    # no slot there (ENOENT) on default/SEV/SEV-ES; out of range (EINVAL) on sw-protected/SNP/TDX
    (KvmVmType.KVM_X86_DEFAULT_VM, 1 << 16, errno.ENOENT), (KvmVmType.KVM_X86_SEV_ES_VM, 1 << 16, errno.ENOENT),
    (KvmVmType.KVM_X86_SW_PROTECTED_VM, 1 << 16, errno.EINVAL), (KvmVmType.KVM_X86_SNP_VM, 1 << 16, errno.EINVAL),
    (KvmVmType.KVM_X86_DEFAULT_VM, 2 << 16, errno.EINVAL),
])
def test_get_dirty_log_slot_checks(vm_type: KvmVmType, slot: int, err: int) -> None:
    """An address space or slot id out of range is EINVAL, a slot that does not exist ENOENT
    (kvm_get_dirty_log_protect: as_id >= kvm_arch_nr_memslot_as_ids() / KVM_USER_MEM_SLOTS,
    then id_to_memslot)."""
    _, vm, _ = make(vm_type)
    vm.set_dirty_logging(True)
    with pytest.raises(KvmIoctlError) as exc:
        vm.get_dirty_log(slot)
    assert exc.value.errno == err


def test_kvm_writes_are_logged_userspace_writes_are_not() -> None:
    """A write KVM makes to guest memory marks the page (kvm_write_guest ->
    mark_page_dirty_in_slot); a write by userspace through its own mapping does not; the log
    is one bit per page, LSB first, padded to whole longs (kvm_dirty_bitmap_bytes)."""
    hw, vm, _ = make()
    vm.set_dirty_logging(True)
    vm.memory.write(0x5000 + 0xFF8, b"\x01" * 16)  # crosses into page 6
    hw.memory.write(0x9000, b"\x02")  # userspace's mapping: not KVM's accessor
    log = vm.get_dirty_log()
    assert len(log) == bitmap_bytes(PAGES) == 32
    assert dirty_pages(log) == [5, 6]
    assert log[0] == 0b0110_0000


def test_collection_clears_reprotects_and_flushes() -> None:
    """Without manual protection KVM_GET_DIRTY_LOG returns the bits and clears them, and
    flushes the TLBs when any was set (kvm_flush_remote_tlbs_memslot); a second collection is
    empty and flushes nothing."""
    hw, vm, _ = make()
    vm.set_dirty_logging(True)
    assert hw.dirty_log is vm.dirty_log.bitmap  # the hardware reads KVM's bitmap
    vm.memory.write(0x3000, b"x")
    flushes = hw.tlb_flushes
    assert dirty_pages(vm.get_dirty_log()) == [3]
    assert hw.tlb_flushes == flushes + 1
    assert dirty_pages(vm.get_dirty_log()) == []
    assert hw.tlb_flushes == flushes + 1
    vm.set_dirty_logging(False)
    assert hw.dirty_log is None


def test_manual_protect_get_keeps_bits_clear_removes_them() -> None:
    """With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 GET returns the bitmap without clearing it and
    KVM_CLEAR_DIRTY_LOG clears exactly the bits userspace passes (kvm_clear_dirty_log_protect:
    atomic_long_fetch_andnot), then flushes."""
    hw, vm, _ = make()
    assert vm.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == 3
    vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    vm.set_dirty_logging(True)
    vm.memory.write(0x1000, b"a")
    vm.memory.write(0x41000, b"b")  # page 65
    assert dirty_pages(vm.get_dirty_log()) == [1, 65]
    assert dirty_pages(vm.get_dirty_log()) == [1, 65]
    flushes = hw.tlb_flushes
    vm.clear_dirty_log(64, 64, (1 << 1).to_bytes(8, "little"))  # page 65
    assert dirty_pages(vm.get_dirty_log()) == [1]
    assert hw.tlb_flushes == flushes + 1


def test_initially_set_marks_every_page_of_the_slot() -> None:
    """KVM_DIRTY_LOG_INITIALLY_SET: logging starts with every page of the slot dirty (bitmap_set
    over npages; no bit beyond the slot)."""
    _, vm, _ = make()
    vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                  KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET)
    vm.set_dirty_logging(True)
    assert dirty_pages(vm.get_dirty_log()) == list(range(PAGES))


@pytest.mark.parametrize("flags", [KVM_DIRTY_LOG_INITIALLY_SET, 4, 1 | 4])
def test_manual_protect_cap_flag_checks(flags: int) -> None:
    """KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2): INITIALLY_SET without MANUAL_PROTECT_ENABLE, or
    an unknown bit, is EINVAL (kvm_vm_ioctl_enable_cap_generic)."""
    _, vm, _ = make()
    with pytest.raises(KvmIoctlError) as exc:
        vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize(("first", "num", "err"), [
    (1, 64, errno.EINVAL),  # first_page & 63
    (0, 63, errno.EINVAL),  # not whole longs, does not reach the end
    (192, 65, errno.EINVAL),  # beyond the slot
    (320, 0, errno.EINVAL),  # first_page > npages
])
def test_clear_dirty_log_range_checks(first: int, num: int, err: int) -> None:
    """KVM_CLEAR_DIRTY_LOG rejects a first page that is not a multiple of 64, a range past the
    slot, and a length that is not a multiple of 64 unless it ends at the slot's end."""
    _, vm, _ = make()
    vm.set_dirty_logging(True)
    with pytest.raises(KvmIoctlError) as exc:
        vm.clear_dirty_log(first, num, bytes(64))
    assert exc.value.errno == err
    vm.clear_dirty_log(192, 64, bytes(8))  # the slot's tail: accepted


def test_kvm_ghcb_write_dirties_the_ghcb_page() -> None:
    """KVM's answer to a VMGEXIT written into the GHCB page (sev_es_sync_to_ghcb through
    kvm_vcpu_map/unmap, which marks the page dirty) dirties the GHCB page: the only writer here
    is KVM (the test writes the request through the userspace mapping, which is not logged)."""
    hw, vm, vcpu = make(KvmVmType.KVM_X86_SEV_ES_VM)
    ghcb_gpa = 0x7000
    ghcb = Ghcb(hw.memory, ghcb_gpa)
    ghcb.set(GhcbSave.sw_exit_code, int(SwExitCode.SVM_EXIT_CPUID))
    ghcb.set(GhcbSave.sw_exit_info_1, 0)
    ghcb.set(GhcbSave.sw_exit_info_2, 0)
    ghcb.set(GhcbSave.rax, 0)
    ghcb.set(GhcbSave.rcx, 0)
    hw.set_ghcb_msr(ghcb_gpa)
    vm.set_dirty_logging(True)
    assert dirty_pages(vm.get_dirty_log()) == []
    vcpu.handle_vmgexit()
    assert dirty_pages(vm.get_dirty_log()) == [ghcb_gpa >> 12]


# ------------------------------------------------------------------ guests, every VM type
GUEST = """
guest_main:
    GUEST_SYNC 1
    mov rdi, GUEST_FREE_GPA
    mov rcx, NPAGES
write_loop:
    mov qword ptr [rdi], rcx
    add rdi, 0x3000
    dec rcx
    jnz write_loop
    GUEST_SYNC 2
    mov rdi, GUEST_FREE_GPA
    mov rax, [rdi + 0x40000]
    mov rax, [rdi + 0x41000]
    mov rax, [rdi]
    GUEST_SYNC 3
    mov rdi, GUEST_FREE_GPA
    mov qword ptr [rdi + 0x3000], 7
    GUEST_SYNC 4
    GUEST_DONE
"""
NPAGES = 6


def _free_pages(log: bytes, layout: dict[str, Any]) -> list[int]:
    """Dirty pages from GUEST_FREE_GPA on (the runtime's own pages - ucall buffer, stacks, GHCB
    - are below it and dirty on every ucall)."""
    free = layout["GUEST_FREE_GPA"] >> 12
    return [p for p in dirty_pages(log) if p >= free]


def _run_logged(vm_type: str) -> tuple[tuple[list[list[int]], list[int], int], int]:
    with testbed.Vm(vm_type=vm_type, memory=8 << 20, seed=3) as vm:
        vcpu = vm.load("<dirty>", text=GUEST, defines={"NPAGES": NPAGES})
        defines = dict(Layout(8 << 20).defines())
        assert vcpu.run_to_ucall().args[0] == 1
        vm.enable_dirty_logging()
        logs = []
        for sync in (2, 3, 4):
            assert vcpu.run_to_ucall().args[0] == sync
            logs.append(_free_pages(vm.get_dirty_log(), defines))
        runtime = dirty_pages(vm.get_dirty_log())  # collected again at once: empty
        cpu = vm.machine.cpu
        native_faults = cpu._native_mmu.dirty_faults if cpu._native_mmu is not None else 0
        return (logs, runtime, cpu.dirty_faults), native_faults


@pytest.mark.parametrize("vm_type", ["default", "sev", "sev-es", "sev-snp", "sw-protected"])
def test_guest_writes_are_logged_exactly(vm_type: str) -> None:
    """A guest writing N known pages dirties exactly those pages; reads dirty nothing; a write
    after the log was collected is caught again (collection re-protected the page and flushed
    the TLB); collecting twice in a row gives an empty second log. On every VM type (guest_memfd
    types included: a deliberate deviation, KVM refuses logging on guest_memfd slots)."""
    (logs, second, faults), _ = _run_logged(vm_type)
    free = Layout(8 << 20).defines()["GUEST_FREE_GPA"] >> 12
    assert logs[0] == [free + 3 * i for i in range(NPAGES)]
    assert logs[1] == []
    assert logs[2] == [free + 3]
    assert second == []
    assert faults >= NPAGES + 1


def test_native_and_python_fills_log_the_same_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C fill (testbed/hw/_nativemmu.c) and its reference model, the Python fill
    (TESTBED_NO_NATIVE_MMU=1), give the same dirty logs and take the same number of
    write-protection faults."""
    pytest.importorskip("testbed.hw._nativemmu", reason="the optional C extension is not built")
    monkeypatch.delenv("TESTBED_NO_NATIVE_MMU", raising=False)
    native, in_c = _run_logged("sev")
    monkeypatch.setenv("TESTBED_NO_NATIVE_MMU", "1")
    python, none = _run_logged("sev")
    assert native == python
    assert in_c > 0 and none == 0  # the C fill took write faults itself


def test_each_memslot_has_its_own_bitmap() -> None:
    """kvm_get_dirty_log_protect() copies the slot's own bitmap (kvm_dirty_bitmap_bytes of its
    npages) and kvm_clear_dirty_log_protect() checks ranges against the slot's npages - the boot
    RAM's slot 0, not the capacity reserved for hotplug; a hotplugged slot's pages are in its
    own bitmap, bit 0 at its first page; KVM_DIRTY_LOG_INITIALLY_SET sets the slots' pages only."""
    hw = FakeVcpu(Vendor.AMD, MEM)
    memory = GuestMemory(MEM, capacity=4 * MEM)
    vm = KvmVm(KvmVmType.KVM_X86_DEFAULT_VM, Vendor.AMD, memory.userspace_view())
    KvmVcpu(vm, hw)
    vm.set_dirty_logging(True)
    assert len(vm.get_dirty_log(0)) == bitmap_bytes(PAGES)
    with pytest.raises(KvmIoctlError) as exc:
        vm.clear_dirty_log(PAGES, 64, bytes(8))
    assert exc.value.errno == errno.EINVAL  # first_page beyond slot 0's pages
    with pytest.raises(KvmIoctlError) as exc:
        vm.get_dirty_log(1)
    assert exc.value.errno == errno.ENOENT  # not plugged yet
    vm.set_user_memory_region(1, MEM, MEM)
    memory.plug(2 * MEM)
    vm.memory.write(MEM + 3 * 4096, b"x")  # KVM's write into the new slot's page 3
    vm.memory.write(5 * 4096, b"y")  # and into slot 0's page 5
    assert dirty_pages(vm.get_dirty_log(1)) == [3]
    assert dirty_pages(vm.get_dirty_log(0)) == [5]
    assert dirty_pages(vm.get_dirty_log(1)) == []  # collected: cleared
    vm.set_dirty_logging(False)
    vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET)
    vm.set_dirty_logging(True)
    assert dirty_pages(vm.get_dirty_log(1)) == list(range(PAGES))
    assert not vm.dirty_log.is_dirty(2 * PAGES)  # the unplugged reservation has no bits
    vm.clear_dirty_log(0, 64, (0b101).to_bytes(8, "little"), slot=1)  # pages 0 and 2
    assert dirty_pages(vm.get_dirty_log(1))[:3] == [1, 3, 4]
