"""Pin accounting (testbed/vmm/pinning.py): legacy SEV pins all RAM at launch, guest_memfd
types pin on the first private fault and release on conversion/discard; the report and plot.

KVM's side of the legacy pins is svm/sev.c (kvm-x86/linux @1a27afa0511e): sev_pin_memory ->
sev_check_pin_count / sev_pin_user_pages count every pin in sev->pages_locked;
sev_mem_enc_register_region / sev_mem_enc_unregister_region / sev_vm_destroy register, unregister
and release regions; sev_launch_update_data pins its range while it runs.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

import testbed
from testbed.cli import main
from testbed.hw.exits import Vendor
from testbed.hw.fake import FakeVcpu
from testbed.hw.memory import BytesMemory
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.uapi import KvmVmType
from testbed.kvm.vm import KvmVm, host_totalram_pages
from testbed.machine import Machine, VmOptions, build_program
from testbed.vmm import boot
from testbed.vmm.hotplug import HotplugError, hotplug
from testbed.x86.addr import Gpa

MEM = 8 << 20
PAGES = MEM >> 12
#: in the free area of an 8 MiB guest
TOUCH_GPA = 0x700000
#: SNP: past GUEST_ACCEPTED_END (8 MiB) of a 32 MiB guest, so the boot has not validated it
SNP_MEM, SNP_TOUCH_GPA = 32 << 20, 0x1800000

TOUCH = """
guest_main:
    mov rdi, TOUCH_GPA
    mov rsi, 0x5a
    mov rdx, 0x4000
    call guest_memset          # four private pages, first touch
    GUEST_SYNC 1
    mov rdi, TOUCH_GPA
    mov rsi, 4
    call set_memory_shared     # converted to shared: the private pages are punched out
    GUEST_ASSERT_EQ rax, 0
    GUEST_SYNC 2
    ret
"""


def _memory(vm: testbed.Vm) -> dict[str, object]:
    report = vm.memory_report()
    assert report is not None
    return report


@pytest.mark.parametrize("vm_type", ["sev", "sev-es"])
def test_legacy_pins_all_guest_memory_at_launch(vm_type: str) -> None:
    """Legacy SEV registers all RAM with KVM_MEMORY_ENCRYPT_REG_REGION before the launch
    (svm/sev.c sev_mem_enc_register_region): pinned is the whole guest from the start. The
    peak is KVM's pages_locked during the launch: each LAUNCH_UPDATE_DATA pins its range a
    second time while it runs (sev_launch_update_data -> sev_pin_memory, sev_unpin_memory)."""
    with testbed.Vm(vm_type=vm_type, memory=MEM) as vm:
        vcpu = vm.load("touch.s", text=TOUCH, defines={"TOUCH_GPA": TOUCH_GPA})
        first = _memory(vm)
        assert first["samples"][0][1] == PAGES  # type: ignore[index]
        assert vm.machine.kvm_vm.enc_regions == [(vm.machine.memory.dram_address(), MEM)]
        launch = max(length >> 12 for _gpa, length in boot.launch_regions(len(vm.machine.program.code)))
        while vcpu.run_to_ucall().cmd != "done":
            pass
        report = _memory(vm)
    assert report["model"] == "legacy"
    assert report["pinned_final_pages"] == PAGES
    assert report["pinned_peak_pages"] == PAGES + launch
    assert report["registered_regions"] == [{"size": MEM, "pages": PAGES}]
    assert all(sample[1] == PAGES for sample in report["samples"])  # type: ignore[attr-defined]


@pytest.mark.parametrize("vm_type", ["sw-protected", "sev-snp"])
def test_upm_pins_on_first_private_touch_and_unpins_on_conversion(vm_type: str) -> None:
    """guest_memfd allocates a private page on the first private fault (kvm_gmem_get_pfn,
    virt/kvm/guest_memfd.c) and frees it on the to-shared punch hole (kvm_gmem_punch_hole)."""
    mem, gpa = (SNP_MEM, SNP_TOUCH_GPA) if vm_type == "sev-snp" else (MEM, TOUCH_GPA)
    with testbed.Vm(vm_type=vm_type, memory=mem) as vm:
        vcpu = vm.load("touch.s", text=TOUCH, defines={"TOUCH_GPA": gpa})
        if vm_type == "sw-protected":
            # RAM starts shared on sw-protected: make the range private from the host first.
            vm.set_memory_attributes(gpa, 0x4000, private=True)
        before = _memory(vm)["pinned_final_pages"]
        assert before < (mem >> 12) // 2
        uc = vcpu.run_to_ucall()
        assert uc.args[0] == 1
        touched = _memory(vm)["pinned_final_pages"]
        assert touched >= before + 4  # type: ignore[operator]
        assert all(vm.machine.memory.present[(gpa >> 12) + i] & 2 for i in range(4))  # type: ignore[index]
        uc = vcpu.run_to_ucall()
        assert uc.args[0] == 2
        after = _memory(vm)
        # SNP: the conversion splits a 2 MiB page, and the page table it takes from the
        # runtime's pool is accepted - allocated in guest_memfd - as it is taken (sw-protected
        # accepts nothing: its RAM starts shared)
        table = 1 if vm_type == "sev-snp" else 0
        assert after["pinned_final_pages"] == touched - 4 + table  # type: ignore[operator]
        assert after["pinned_peak_pages"] >= touched  # type: ignore[operator]
        assert after["shared_final_pages"] >= 1  # type: ignore[operator]


def test_discard_releases_private_pages() -> None:
    """A host punch hole (vm_guest_mem_fallocate, PUNCH_HOLE) releases the pinned pages."""
    with testbed.Vm(vm_type="sev-snp", memory=MEM) as vm:
        vm.load("touch.s", text=TOUCH, defines={"TOUCH_GPA": TOUCH_GPA})
        pinned = _memory(vm)["pinned_final_pages"]
        assert pinned > 0
        vm.guest_mem_fallocate(0, MEM, punch_hole=True)
        assert _memory(vm)["pinned_final_pages"] == 0
        assert _memory(vm)["pinned_peak_pages"] >= pinned


def test_guest_mem_allocated_follows_the_guest_memfd_pages() -> None:
    """vm.guest_mem_allocated (lseek SEEK_DATA on guest_memfd): a private page the guest touched
    is allocated, one it never touched is not, and a punch hole frees it; never on legacy SEV."""
    big = 32 << 20  # above GUEST_ACCEPTED_END (8 MiB) the boot has validated nothing
    with testbed.Vm(vm_type="sev-snp", memory=big) as vm:
        vm.load("touch.s", text=TOUCH, defines={"TOUCH_GPA": TOUCH_GPA})
        assert vm.guest_mem_allocated(TOUCH_GPA) and not vm.guest_mem_allocated(big - 0x1000)
        vm.guest_mem_fallocate(TOUCH_GPA, 0x1000, punch_hole=True)
        assert not vm.guest_mem_allocated(TOUCH_GPA)
    with testbed.Vm(vm_type="sev", memory=MEM) as vm:
        vm.load("touch.s", text=TOUCH, defines={"TOUCH_GPA": TOUCH_GPA})
        assert not vm.guest_mem_allocated(TOUCH_GPA)


PVALIDATE_2M = """
guest_main:
    mov rax, TOUCH_GPA
    mov ecx, 1                  # 2 MiB
    mov edx, 1                  # validate
    .byte 0xf2, 0x0f, 0x01, 0xff    # pvalidate
    GUEST_SYNC rax
    ret
"""


def test_a_2m_pvalidate_faults_in_one_guest_memfd_page() -> None:
    """A 2 MiB PVALIDATE fails FAIL_SIZEMISMATCH (6) against 4 KiB RMP entries, and its private
    fault allocates one 4 KiB guest_memfd page, not 512 (guest_memfd.c kvm_gmem_get_folio: order-0
    folios only, "TODO: Support huge pages")."""
    with testbed.Vm(vm_type="sev-snp", memory=SNP_MEM) as vm:
        vcpu = vm.load("pv2m.s", text=PVALIDATE_2M, defines={"TOUCH_GPA": SNP_TOUCH_GPA})
        before = _memory(vm)["pinned_final_pages"]
        assert vcpu.run_to_ucall().args == [6]
        assert vm.guest_mem_allocated(SNP_TOUCH_GPA) and not vm.guest_mem_allocated(SNP_TOUCH_GPA + 0x1000)
        assert _memory(vm)["pinned_final_pages"] == before + 1


#: where a bare KvmVm's VMM mapped guest RAM (KvmVm(ram_hva=...)); a Machine passes its backing's
HVA = 0x7F00_0000_0000


def _sev_vm(pages: int = 256, **limits: int | None) -> tuple[KvmVm, FakeVcpu]:
    hw = FakeVcpu(Vendor.AMD, pages << 12)
    vm = KvmVm(KvmVmType.KVM_X86_SEV_VM, Vendor.AMD, hw.memory, ram_hva=HVA, **limits)
    vm.add_vcpu(hw)
    return vm, hw


def test_reg_region_is_checked_as_kvm_checks_it() -> None:
    """KVM_MEMORY_ENCRYPT_REG_REGION: ENOTTY outside SEV, EINVAL for an empty or wrapping
    range (svm/sev.c sev_mem_enc_register_region, sev_pin_memory); an unaligned range pins
    every page it covers."""
    plain = KvmVm(KvmVmType.KVM_X86_DEFAULT_VM, Vendor.AMD, BytesMemory(1 << 20), ram_hva=HVA)
    with pytest.raises(KvmIoctlError, match="ENOTTY"):
        plain.memory_encrypt_reg_region(HVA, 0x1000)
    sev, _hw = _sev_vm()
    with pytest.raises(KvmIoctlError, match="EINVAL"):
        sev.memory_encrypt_reg_region(HVA, 0)
    with pytest.raises(KvmIoctlError, match="EINVAL"):
        sev.memory_encrypt_reg_region((1 << 64) - 0x1000, 0x2000)
    assert sev.memory_encrypt_reg_region(HVA + 0x1800, 0x1000) == 2
    assert sev.pages_locked == 2


def test_reg_region_past_the_hosts_ram_is_einval() -> None:
    """sev_check_pin_count: pages_locked plus the new pages above totalram_pages() is EINVAL, and nothing is pinned."""
    # sev.c: "if (total_npages > totalram_pages()) return -EINVAL;"
    vm, _hw = _sev_vm(256, totalram_pages=300)
    assert vm.memory_encrypt_reg_region(HVA, 256 << 12) == 256
    with pytest.raises(KvmIoctlError, match="EINVAL") as exc:
        vm.memory_encrypt_reg_region(HVA, 256 << 12)  # the same RAM again: 512 pages locked
    assert exc.value.errno == errno.EINVAL and "totalram_pages" in str(exc.value)
    assert vm.pages_locked == 256 and vm.enc_regions == [(HVA, 256 << 12)]
    assert vm.memory_encrypt_reg_region(HVA, 44 << 12) == 44  # 300: at the limit, not above
    assert host_totalram_pages() == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4096


def test_reg_region_past_the_memlock_limit_is_enomem_unless_unlimited() -> None:
    """sev_check_pin_count: above RLIMIT_MEMLOCK without CAP_IPC_LOCK is ENOMEM; the default (None) is CAP_IPC_LOCK."""
    # sev.c: "if (total_npages > lock_limit && !capable(CAP_IPC_LOCK)) { ... return -ENOMEM; }"
    vm, _hw = _sev_vm(256, memlock_limit_pages=300)
    vm.memory_encrypt_reg_region(HVA, 256 << 12)
    with pytest.raises(KvmIoctlError, match="ENOMEM") as exc:
        vm.memory_encrypt_reg_region(HVA, 45 << 12)
    assert exc.value.errno == errno.ENOMEM and "lock limit of 300" in str(exc.value)
    assert vm.pages_locked == 256 and len(vm.enc_regions) == 1
    unlimited, _hw = _sev_vm(256)
    assert unlimited.memlock_limit_pages is None and unlimited.totalram_pages is None
    for _ in range(4):
        unlimited.memory_encrypt_reg_region(HVA, 256 << 12)
    assert unlimited.pages_locked == 1024


def test_reg_region_outside_the_vmm_mapping_is_enomem() -> None:
    """A range the VMM has not mapped (not its guest RAM) fails to pin: ENOMEM, nothing pinned."""
    # sev.c sev_pin_user_pages: "if (npinned != npages) { ... return -ENOMEM; }"
    with testbed.Vm(vm_type="sev", memory=MEM) as vm:
        vm.load("touch.s", text=TOUCH, defines={"TOUCH_GPA": TOUCH_GPA})
        kvm_vm, dram = vm.machine.kvm_vm, vm.machine.memory.dram_address()
        for addr, size in ((0x1000, 0x1000), (dram - 0x1000, 0x2000), (dram + MEM - 0x1000, 0x2000)):
            with pytest.raises(KvmIoctlError, match="ENOMEM"):
                kvm_vm.memory_encrypt_reg_region(addr, size)
        assert kvm_vm.pages_locked == PAGES and _memory(vm)["pinned_final_pages"] == PAGES
    bare = KvmVm(KvmVmType.KVM_X86_SEV_VM, Vendor.AMD, BytesMemory(1 << 20))
    with pytest.raises(KvmIoctlError, match="ENOMEM"):
        bare.memory_encrypt_reg_region(0x1000, 0x1000)  # no ram_hva: nothing is mapped


def test_the_report_counts_what_kvm_has_locked() -> None:
    """The legacy report's pinned figure is KVM's pages_locked: RAM registered twice counts twice."""
    with testbed.Vm(vm_type="sev", memory=MEM) as vm:
        vm.load("touch.s", text=TOUCH, defines={"TOUCH_GPA": TOUCH_GPA})
        kvm_vm, dram = vm.machine.kvm_vm, vm.machine.memory.dram_address()
        assert kvm_vm.memory_encrypt_reg_region(dram, MEM) == PAGES
        assert kvm_vm.pages_locked == 2 * PAGES and _memory(vm)["pinned_final_pages"] == 2 * PAGES
        kvm_vm.memory_encrypt_unreg_region(dram, MEM)
        report = _memory(vm)
    assert report["pinned_final_pages"] == PAGES and report["pinned_peak_pages"] == 2 * PAGES


def test_unreg_region_unpins_only_an_exact_registered_region() -> None:
    """KVM_MEMORY_ENCRYPT_UNREG_REGION: ENOTTY outside SEV; EINVAL unless address and size match a region exactly."""
    # sev.c sev_mem_enc_unregister_region: "if (!sev_guest(kvm)) return -ENOTTY;", then
    # find_enc_region ("if (i->uaddr == range->addr && i->size == range->size)"), "if (!region) return -EINVAL;"
    plain = KvmVm(KvmVmType.KVM_X86_DEFAULT_VM, Vendor.AMD, BytesMemory(1 << 20), ram_hva=HVA)
    with pytest.raises(KvmIoctlError, match="ENOTTY"):
        plain.memory_encrypt_unreg_region(HVA, 0x1000)
    vm, _hw = _sev_vm()
    vm.memory_encrypt_reg_region(HVA, 0x3000)
    vm.memory_encrypt_reg_region(HVA + 0x800, 0x1000)
    for addr, size in ((HVA, 0x2000), (HVA + 0x1000, 0x2000), (HVA, 0x4000), (HVA + 0x800, 0x800)):
        with pytest.raises(KvmIoctlError, match="EINVAL"):
            vm.memory_encrypt_unreg_region(addr, size)
    assert vm.pages_locked == 5
    vm.memory_encrypt_unreg_region(HVA + 0x800, 0x1000)  # an unaligned region: its 2 pages
    vm.memory_encrypt_unreg_region(HVA, 0x3000)
    assert vm.pages_locked == 0 and vm.enc_regions == []
    with pytest.raises(KvmIoctlError, match="EINVAL"):
        vm.memory_encrypt_unreg_region(HVA, 0x3000)


def test_closing_the_vm_unpins_the_regions_still_registered() -> None:
    """Tearing the VM down releases every region still registered, as sev_vm_destroy does."""
    # sev.c sev_vm_destroy: "if userspace was terminated before unregistering the memory regions
    # then lets unpin all the registered memory." (__unregister_enc_region_locked on each)
    with testbed.Vm(vm_type="sev", memory=MEM) as vm:
        vm.load("touch.s", text=TOUCH, defines={"TOUCH_GPA": TOUCH_GPA})
        kvm_vm = vm.machine.kvm_vm
        assert kvm_vm.pages_locked == PAGES
    assert kvm_vm.pages_locked == 0 and kvm_vm.enc_regions == []


def test_launch_update_data_pins_its_range_while_it_runs() -> None:
    """LAUNCH_UPDATE_DATA pins its range on top of the registered RAM until it returns; ENOMEM past the limit."""
    # sev.c sev_launch_update_data: "inpages = sev_pin_memory(kvm, vaddr, size, &npages, FOLL_WRITE);"
    # ... "sev_unpin_memory(kvm, inpages, npages);"
    vm, hw = _sev_vm(256, memlock_limit_pages=256 + 2)
    deltas: list[int] = []
    vm.on_pages_locked = deltas.append
    vm.memory_encrypt_reg_region(HVA, 256 << 12)
    vm.sev_launch_update_data(Gpa(0x1800), 0x1000)  # unaligned: 2 pages
    assert deltas == [256, 2, -2] and vm.pages_locked == 256
    with pytest.raises(KvmIoctlError, match="ENOMEM"):
        vm.sev_launch_update_data(Gpa(0x1000), 0x3000)  # 259 pages locked: above the limit
    with pytest.raises(KvmIoctlError, match="ENOMEM"):
        vm.sev_launch_update_data(Gpa((256 << 12) - 0x1000), 0x2000)  # past the RAM the VMM mapped
    assert hw.launched == [("launch_update_data", 0x1800, 0x1000)] and vm.pages_locked == 256


def test_a_hotplug_kvm_cannot_pin_is_refused_and_changes_nothing() -> None:
    """Hotplugged RAM is registered before its memslot (QEMU's ram_block_added): a refused pin changes nothing."""
    options = VmOptions(vm_type="sev", memory=MEM, max_memory=4 * MEM)
    with Machine(build_program("<hotplug>", options, text="guest_main:\n    ret\n"), options) as machine:
        kvm_vm = machine.kvm_vm
        kvm_vm.memlock_limit_pages = kvm_vm.pages_locked + PAGES  # room for 8 MiB more, not 24
        with pytest.raises(HotplugError, match="ENOMEM"):
            hotplug(machine, 4 * MEM)
        assert machine.memory.size == MEM and list(kvm_vm.memslots) == [0] and kvm_vm.pages_locked == PAGES
        with pytest.raises(HotplugError, match="EINVAL"):
            hotplug(machine, 2 * MEM, slot=0)  # the slot is refused after the pin: unregistered again
        assert kvm_vm.enc_regions == [(machine.memory.dram_address(), MEM)] and kvm_vm.pages_locked == PAGES
        hotplug(machine, 2 * MEM)
        assert kvm_vm.pages_locked == 2 * PAGES
        assert machine.pinning is not None and machine.pinning.to_json()["pinned_final_pages"] == 2 * PAGES


def test_report_memory_keys(tmp_path: Path) -> None:
    """`testbed run --json` carries `memory` with the pinned and shared peaks and finals."""
    guest = tmp_path / "touch.s"
    guest.write_text(TOUCH)
    opts = {"memory": MEM, "defines": {"TOUCH_GPA": TOUCH_GPA}}
    report = testbed.run_guest(guest, testbed.VmOptions(vm_type="sev-snp", **opts)).to_json()
    memory = report["memory"]
    for key in ("pinned_peak_pages", "pinned_final_pages", "shared_peak_pages", "shared_final_pages",
                "total_peak_pages", "total_final_pages", "samples", "samples_dropped"):
        assert key in memory
    assert len(memory["samples"]) == report["user_exits"].__len__() + 1
    assert "memory" not in testbed.run_guest(guest, testbed.VmOptions(**opts)).to_json()


def test_plot_memory_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`testbed run --plot-memory FILE.png` runs the counterpart type and writes a PNG."""
    guest = tmp_path / "touch.s"
    guest.write_text(TOUCH)
    png = tmp_path / "mem.png"
    status = main(["run", str(guest), "--vm-type", "sev", "--memory", "8M", "-D", f"TOUCH_GPA={TOUCH_GPA}",
                   "--plot-memory", str(png), "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert json.loads(out)["memory"]["model"] == "legacy"
    data = png.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
