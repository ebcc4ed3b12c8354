"""Pin accounting (testbed/vmm/pinning.py): legacy SEV pins all RAM at launch, guest_memfd
types pin on the first private fault and release on conversion/discard; the report and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import testbed
from testbed.cli import main
from testbed.hw.exits import Vendor
from testbed.hw.memory import BytesMemory
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.uapi import KvmVmType
from testbed.kvm.vm import KvmVm

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
    (svm/sev.c sev_mem_enc_register_region): pinned is the whole guest from the start."""
    with testbed.Vm(vm_type=vm_type, memory=MEM) as vm:
        vcpu = vm.load("touch.s", text=TOUCH, defines={"TOUCH_GPA": TOUCH_GPA})
        first = _memory(vm)
        assert first["samples"][0][1] == PAGES  # type: ignore[index]
        assert vm.machine.kvm_vm.enc_regions == [(vm.machine.memory.dram_address(), MEM)]
        while vcpu.run_to_ucall().cmd != "done":
            pass
        report = _memory(vm)
    assert report["model"] == "legacy"
    assert report["pinned_peak_pages"] == report["pinned_final_pages"] == PAGES
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


def test_reg_region_is_checked_as_kvm_checks_it() -> None:
    """KVM_MEMORY_ENCRYPT_REG_REGION: ENOTTY outside SEV, EINVAL for an empty or wrapping
    range (svm/sev.c sev_mem_enc_register_region, sev_pin_memory)."""
    plain = KvmVm(KvmVmType.KVM_X86_DEFAULT_VM, Vendor.AMD, BytesMemory(1 << 20))
    with pytest.raises(KvmIoctlError, match="ENOTTY"):
        plain.memory_encrypt_reg_region(0x1000, 0x1000)
    sev = KvmVm(KvmVmType.KVM_X86_SEV_VM, Vendor.AMD, BytesMemory(1 << 20))
    with pytest.raises(KvmIoctlError, match="EINVAL"):
        sev.memory_encrypt_reg_region(0x1000, 0)
    with pytest.raises(KvmIoctlError, match="EINVAL"):
        sev.memory_encrypt_reg_region((1 << 64) - 0x1000, 0x2000)
    assert sev.memory_encrypt_reg_region(0x1800, 0x1000) == 2


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
