"""End to end: set_memory_shared/private in the guest -> KVM_HC_MAP_GPA_RANGE -> the VMM's tracker.

Issue scenarios: the seed threads' workload shapes produced by guests/conversions.s, checked
on default, sw-protected and sev VMs: the tracker equals what the guest converted, and under
sev the host reads plaintext of exactly the shared pages and ciphertext elsewhere.
"""

from __future__ import annotations

import struct

import pytest

import testbed
from testbed.hw.exits import Vendor
from testbed.kvm.uapi import KVM_MEMORY_EXIT_FLAG_PRIVATE, MemoryFaultExit
from testbed.layout import RT_GHCB, UCALL_GPA, Layout
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program

MEM = 32 << 20
FREE = Layout(MEM).free_gpa
CONVERSIONS = GUESTS_DIR / "conversions.s"


def expected_pages(shape: int, churn: int = 64, hostile_pages: int = 256) -> set[int]:
    """The shared GFNs guests/conversions.s leaves behind (a set-of-pages reference model)."""
    shared: set[int] = set()

    def share(gpa: int, n: int) -> None:
        shared.update(range(gpa >> 12, (gpa >> 12) + n))

    def private(gpa: int, n: int) -> None:
        shared.difference_update(range(gpa >> 12, (gpa >> 12) + n))

    if shape in (0, 1):
        for i in range(20):
            share(FREE + (i << 18), 1 + 3 * (i % 5))
        share(FREE + 0x800000, 64)
    if shape == 1:
        base = FREE + 0x1000000
        for r in range(churn):
            share(base + ((r & 7) << 13), 1)
            private(base + ((r & 7) << 13), 1)
            if r % 16 == 0:
                share(base + 0x100000, 100)
                private(base + 0x100000, 100)
    if shape == 2:
        for i in range(60):
            share(FREE + (i << 17), 2)
    if shape == 3:
        for i in range(hostile_pages // 2):
            share(FREE + (i << 13), 1)
    return shared


def to_ranges(pages: set[int]) -> list[list[int]]:
    """Sorted, merged [gfn, npages] ranges of a page set."""
    out: list[list[int]] = []
    for gfn in sorted(pages):
        if out and out[-1][0] + out[-1][1] == gfn:
            out[-1][1] += 1
        else:
            out.append([gfn, 1])
    return out


def run(shape: int, vm_type: str, **kw: object) -> tuple[Machine, object]:
    options = VmOptions(vm_type=vm_type, memory=MEM, defines={"SHAPE": shape}, seed=7, **kw)  # type: ignore[arg-type]
    machine = Machine(build_program(CONVERSIONS, options), options)
    return machine, machine.run()


@pytest.mark.parametrize("vm_type", ["default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx"])
@pytest.mark.parametrize("shape", [0, 1, 2, 3])
def test_tracker_equals_what_the_guest_converted(vm_type: str, shape: int) -> None:
    """The VMM's shared ranges are exactly the guest's conversions (plus the runtime's shared pages).
    A TD (Intel) converts with MapGPA (guests/lib/tdx.s; kvm/vmx/tdx.c tdx_map_gpa)."""
    _, report = run(shape, vm_type, **({"vendor": Vendor.INTEL} if vm_type == "tdx" else {}))
    assert report.outcome == "done", report.detail  # type: ignore[attr-defined]
    pages = expected_pages(shape)
    if vm_type.startswith("sev") or vm_type == "tdx":
        pages.add(UCALL_GPA >> 12)  # the runtime shares its ucall page, as Linux would
    if vm_type == "sev-snp":
        pages.add(RT_GHCB >> 12)  # and on SNP its GHCB, by PSC
    assert report.shared_ranges == to_ranges(pages)  # type: ignore[attr-defined]


@pytest.mark.parametrize("shape", [0, 2])
def test_sev_host_reads_plaintext_exactly_where_shared(shape: int) -> None:
    """Under sev the host reads each shared page's stamp (its GFN) and ciphertext elsewhere."""
    machine, report = run(shape, "sev")
    assert report.outcome == "done"  # type: ignore[attr-defined]
    shared = expected_pages(shape)
    for gfn in sorted(shared):
        (value,) = struct.unpack("<Q", machine.memory.host_read(gfn << 12, 8))
        assert value == gfn, f"shared gfn 0x{gfn:x}: host read 0x{value:x}"
    # Private pages the runtime wrote (its page tables, its code) read as ciphertext.
    code = machine.memory.host_read(machine.program.base, 64)
    assert code != machine.program.code[:64]
    assert machine.memory.cpu_read(machine.program.base, 64, private=True) == machine.program.code[:64]


def test_stale_ciphertext_after_private_to_shared() -> None:
    """A page converted private->shared without a rewrite reads as ciphertext to the guest on SEV."""
    magic = 0x5A5A1234
    results = {}
    for vm_type in ("default", "sev"):
        options = VmOptions(vm_type=vm_type, memory=MEM, seed=3)
        report = Machine(build_program(GUESTS_DIR / "stale_ciphertext.s", options), options).run()
        assert report.outcome == "done", report.detail
        results[vm_type] = report.syncs()[0]
    assert results["default"] == magic
    assert results["sev"] != magic


def test_legacy_page_enc_status_protocol_gives_the_same_ranges() -> None:
    """The seed-era KVM_HC_PAGE_ENC_STATUS (in-kernel bitmap) ends with the same shared ranges."""
    _, new = run(1, "sev")
    machine, old = run(1, "sev", hc_protocol="page-enc-status")
    assert old.outcome == "done", old.detail  # type: ignore[attr-defined]
    assert old.shared_ranges == new.shared_ranges  # type: ignore[attr-defined]
    # The old protocol never leaves the kernel: no hypercall user exits at all.
    assert "hypercall" not in old.exit_counts  # type: ignore[attr-defined]
    # The report is built from KVM's bitmap (KVM_GET_PAGE_ENC_BITMAP, bit set = encrypted).
    bits = machine.kvm_vm.get_page_enc_bitmap(0, MEM >> 12)  # type: ignore[attr-defined]
    shared = [gfn for gfn in range(MEM >> 12) if not bits[gfn // 8] >> (gfn % 8) & 1]
    assert shared == [gfn for first, n in old.shared_ranges for gfn in range(first, first + n)]  # type: ignore[attr-defined]


def test_implicit_conversion_converts_and_retries() -> None:
    """A C=0 access to a page the host holds private exits KVM_EXIT_MEMORY_FAULT; the VMM converts."""
    options = VmOptions(vm_type="sev", memory=MEM, map_gpa_exit=False, seed=1)
    report = Machine(build_program(GUESTS_DIR / "hypercall_insn.s", options), options).run()
    assert report.outcome == "done", report.detail
    faults = [e for e in report.user_exits if e["reason"] == "memory_fault"]
    assert faults == [{"reason": "memory_fault", "flags": 0, "gpa": UCALL_GPA, "size": 4096}]
    assert report.shared_ranges == [[UCALL_GPA >> 12, 1]]


def test_implicit_conversion_refused_ends_the_run() -> None:
    """With the refuse policy a mismatched access ends the run with outcome memory_fault."""
    options = VmOptions(vm_type="sev", memory=MEM, map_gpa_exit=False, seed=1, implicit_conversion="refuse")
    report = Machine(build_program(GUESTS_DIR / "hypercall_insn.s", options), options).run()
    assert report.outcome == "memory_fault", report.detail
    assert report.detail == (f"guest made a shared access to gpa {UCALL_GPA:#x}, which the host holds as private; "
                             "implicit conversions are refused")
    assert report.user_exits[-1] == {"reason": "memory_fault", "flags": 0, "gpa": UCALL_GPA, "size": 4096}
    assert report.shared_ranges == []


def test_a_memory_fault_with_an_unknown_flag_stops_the_vm() -> None:
    """QEMU's kvm_cpu_exec(): KVM_EXIT_MEMORY_FAULT with a flag other than PRIVATE is "Unknown
    flag" and stops the VM (internal error) - no conversion happens."""
    with testbed.Vm(vm_type="sev-snp", memory=MEM, timeout=20) as vm:
        vm.load("syncs.s", text="guest_main:\n    GUEST_DONE\n")
        gpa = Layout(MEM).free_gpa
        assert vm.is_private(gpa)
        with pytest.raises(testbed.VmExitError) as end:
            vm.handle(MemoryFaultExit(flags=KVM_MEMORY_EXIT_FLAG_PRIVATE | 1, gpa=gpa, size=4096))
        assert vm.is_private(gpa)
    assert end.value.outcome == "internal_error"
    assert end.value.detail == "KVM_EXIT_MEMORY_FAULT: unknown flag 0x9"


def test_hostile_guest_poisons_a_bounded_tracker_without_crashing() -> None:
    """Past the tracker's bound the run still completes and the report says the list is incomplete."""
    _, report = run(3, "default", max_ranges=16, tracker="ranges")
    assert report.outcome == "done", report.detail  # type: ignore[attr-defined]
    assert report.extra.get("tracker_poisoned") is True  # type: ignore[attr-defined]
    # The bounded list keeps the first 16 ranges the guest shared, every one of them true.
    assert report.shared_ranges == to_ranges(expected_pages(3))[:16]  # type: ignore[attr-defined]
    assert len(to_ranges(expected_pages(3))) > 16  # the guest did overflow it


def test_no_hypercall_when_the_feature_is_not_advertised() -> None:
    """Without the exit the VMM does not advertise KVM_FEATURE_HC_MAP_GPA_RANGE, and the guest
    (checking CPUID 0x40000001 bit 16 as Linux does) converts without telling the host."""
    _, report = run(0, "default", map_gpa_exit=False)
    assert report.outcome == "done", report.detail  # type: ignore[attr-defined]
    assert "hypercall" not in report.exit_counts  # type: ignore[attr-defined]
    assert report.shared_ranges == []  # type: ignore[attr-defined]


def test_advertised_feature_without_the_exit_gives_enosys() -> None:
    """A VMM that advertises the feature but never enabled the exit: KVM answers -KVM_ENOSYS."""
    from testbed.kvm.uapi import KVM_FEATURE_HC_MAP_GPA_RANGE

    _, report = run(0, "default", map_gpa_exit=False, pv_features=1 << KVM_FEATURE_HC_MAP_GPA_RANGE)
    assert report.outcome == "guest_assert"  # type: ignore[attr-defined]
    abort = report.ucalls[-1]  # type: ignore[attr-defined]
    assert abort["args"][0] == (-1000) & (2**64 - 1)
