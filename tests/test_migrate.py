"""Live migration (`testbed migrate`, testbed/migrate/): pre-copy rounds with dirty logging and
an encryption-status resync, stop-and-copy, the guest's run finished on a target with its own
key, and the testbed's page-by-page check of what the guest sees on both sides.

Kernel sources modelled: virt/kvm/kvm_main.c kvm_get_dirty_log_protect (the dirty log the
rounds collect); arch/x86/kvm/svm/sev.c sev_send_update_data / sev_receive_update_data (the
firmware step, testbed/kvm/migration.py), sev_es_sync_vmsa (the x87/SSE state and XCR0 an
SEV-ES VMSA holds; QEMU moves them with KVM_GET_XSAVE / KVM_GET_XCRS elsewhere) and
KVM_SEV_SEND_CANCEL (Documentation/virt/kvm/x86/amd-memory-encryption.rst: a cancelled
migration "can restart with a new target later"); arch/x86/kernel/kvm.c kvm_init_platform (the
guest writes KVM_MIGRATION_READY to MSR_KVM_MIGRATION_CONTROL; Documentation/virt/kvm/x86/
hypercalls.rst makes userspace handle that MSR through a filter); x86.c
kvm_arch_vcpu_ioctl_run (immediate_exit completes a pending exit before the state is saved).
QEMU: the SEV migration series' sev_save_outgoing_page sends every page of the encrypted list
through SEND_UPDATE_DATA (no zero check on ciphertext).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from bitarray import bitarray
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import testbed
from testbed.cli import main
from testbed.hw.psp import TransportSession
from testbed.layout import Layout
from testbed.machine import VmOptions
from testbed.migrate import Migration, MigrationError, migrate, migration_options
from testbed.migrate.oracle import compare, compare_machines, guest_view
from testbed.migrate.status import bits_to_ranges, export_tracker, ranges_to_bits, xor_ranges
from testbed.tracker import make_tracker
from testbed.tracker.donated import DonatedTracker
from testbed.vmm.ucall import Ucall

GUESTS = Path(__file__).resolve().parent.parent / "guests"
VM_TYPES = ["sev", "sev-es", "sev-snp", "sw-protected"]
PAGE = 4096


def _check(report: Any) -> None:
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    assert (report.lost_pages, report.corrupted_pages) == (0, 0), report.mismatches
    # The host-side state of every page (KVM's status, the trackers, the RMP) and the vCPU
    # arrived as they were (oracle.py compare_host_state, compare_vcpus).
    assert (report.status_pages, report.tracker_pages, report.rmp_pages) == (0, 0, 0), report.mismatches
    assert report.vcpu_mismatches == [] and report.passed


def _private_mem_host(vm: testbed.Vm, uc: Ucall) -> None:
    """The host half of private_mem_conversions.s at a GUEST_SYNC (tests/test_private_mem_conversions.py):
    a shared range holds `current` and gets `new` from the host."""
    if uc.args[0] != 0:  # SYNC_PRIVATE: nothing for the host to do
        return
    _, gpa, size, current, new = uc.args[:5]
    for offset in range(0, size, PAGE):
        assert vm.read(gpa + offset, PAGE) == bytes([current]) * PAGE
        vm.write(gpa + offset, bytes([new]) * PAGE)


#: (guest, memory, defines, host half, rounds, slice, tracker): every bundled guest that converts
#: pages, each shape of conversions.s (SHAPE 0..3) on its own, in the smallest memory it fits
SCENARIOS: dict[str, tuple[str, str, dict[str, int], Any, int, int, str]] = {
    "migrate_churn": ("migrate_churn.s", "8M", {}, None, 3, 8, "ranges"),
    "private_mem_conversions": ("private_mem_conversions.s", "10M", {}, _private_mem_host, 2, 2, "ranges"),
    "conversions_boot": ("conversions.s", "16M", {"SHAPE": 0}, None, 1, 8, "ranges"),
    "conversions_dma_churn": ("conversions.s", "24M", {"SHAPE": 1, "CHURN": 8}, None, 2, 4, "ranges"),
    "conversions_discontiguous": ("conversions.s", "14M", {"SHAPE": 2}, None, 1, 8, "ranges"),
    "conversions_hostile": ("conversions.s", "8M", {"SHAPE": 3}, None, 1, 8, "ranges"),
    "donate_conversions": ("donate_conversions.s", "8M", {}, None, 1, 8, "donated"),
}


@functools.cache
def _scenario(vm_type: str, scenario: str) -> Any:
    """One migration per (VM type, scenario), shared by the tests that read its report."""
    guest, memory, defines, host, rounds, slice_exits, tracker = SCENARIOS[scenario]
    return migrate(GUESTS / guest, VmOptions(vm_type=vm_type, memory=memory, seed=1, defines=defines,
                                             tracker=tracker),
                   rounds=rounds, slice_exits=slice_exits, on_ucall=host)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_bundled_conversion_scenarios_migrate(vm_type: str, scenario: str) -> None:
    """Every bundled conversion guest (each shape of conversions.s, the donated tracker's guest
    with --tracker donated) migrates live under sev, sev-es, sev-snp and sw-protected: it
    finishes on the target, and no page the guest sees is lost or corrupted."""
    _guest, memory, _defines, _host, rounds, _slice, tracker = SCENARIOS[scenario]
    report = _scenario(vm_type, scenario)
    _check(report)
    assert report.compared_pages == int(memory[:-1]) << 8
    kinds = [r.kind for r in report.rounds]
    assert kinds == ["bulk", *["precopy"] * rounds, "stop"]
    bulk = report.rounds[0]
    assert bulk.pages_sent + bulk.deferred_pages + bulk.zero_pages == report.compared_pages
    if tracker == "donated":
        # The status came from the guest's structure, not from a fallback.
        assert report.resync["source"] == "donated" and "fallback" not in report.resync, report.resync
        assert report.rounds[-1].status_source == "donated" and report.resync["donated_reads"] >= 1
        assert report.to_json()["target_donation"]["accepted"] is True
        assert report.to_json()["target_tracker"]["state"] == "valid"


def test_rounds_resend_what_changed() -> None:
    """Each pre-copy round re-sends the pages the guest dirtied or converted: the churn guest
    converts a page and the flip page every iteration, so every round finds status changes
    (XOR with the last export), and the ranges tracker exports 16 bytes per shared range."""
    report = _scenario("sev-snp", "migrate_churn")
    _check(report)
    for r in report.rounds[1:]:
        assert r.status_changes > 0 and r.dirty_pages > 0 and r.pages_sent >= r.dirty_pages - r.deferred_pages
        assert r.status_bytes % 16 == 0 and r.status_source == "tracker"
    assert report.target_syncs and report.source_syncs
    assert report.source_syncs + report.target_syncs == list(range(48))


@pytest.mark.parametrize("vm_type", ["sev", "sev-es"])
def test_legacy_pages_never_written_are_not_sent(vm_type: str) -> None:
    """On legacy SEV a frame nothing was written to (the host sees zeros) is not sent, nor a
    shared page of zeros the target already holds (QEMU's zero pages): most of an 8 MiB guest,
    and still nothing is lost or corrupted. Every page the guest wrote is sent."""
    report = _scenario(vm_type, "migrate_churn")
    _check(report)
    bulk = report.rounds[0]
    assert bulk.zero_pages > 1500 and bulk.private_pages_sent >= 16 and bulk.shared_pages_sent >= 1


def test_snp_sends_every_private_page() -> None:
    """SEV-SNP sends every private page, allocated or not: its RMP state (validated) travels
    with the page through the firmware, so none is skipped; only shared zero pages are."""
    report = _scenario("sev-snp", "migrate_churn")
    bulk = report.rounds[0]
    assert bulk.private_pages_sent + bulk.deferred_pages >= 2040 and bulk.zero_pages <= 8


def test_bitmap_tracker_exports_the_bitmap() -> None:
    """With the bitmap tracker each round exports guest_pages / 8 bytes whatever the guest does."""
    report = migrate(GUESTS / "migrate_churn.s", VmOptions(vm_type="sev", memory="8M", seed=1, tracker="bitmap"),
                     rounds=1)
    _check(report)
    assert all(r.status_bytes == 2048 // 8 for r in report.rounds)


def test_page_enc_bitmap_path() -> None:
    """The seed-era KVM (page-enc-status protocol): the status comes from KVM_GET_PAGE_ENC_BITMAP."""
    report = migrate(GUESTS / "migrate_churn.s", VmOptions(vm_type="sev", memory="8M", seed=1,
                                                           hc_protocol="page-enc-status"), rounds=1)
    _check(report)
    assert {r.status_source for r in report.rounds} == {"page-enc-bitmap"}


def test_guest_that_did_not_enable_migration_is_refused() -> None:
    """The VMM refuses to migrate a guest that never wrote KVM_MIGRATION_READY to
    MSR_KVM_MIGRATION_CONTROL, and nothing is sent."""
    report = migrate(GUESTS / "migrate_churn.s", VmOptions(vm_type="sev-snp", memory="8M",
                                                           defines={"GUEST_MIGRATION_READY": 0}))
    assert report.outcome == "refused" and "KVM_MIGRATION_READY" in report.detail
    assert report.rounds == []


def test_a_vm_with_hotplug_memory_is_refused_with_a_usage_error() -> None:
    """A VM built with max_memory is refused up front (the target would need the source's slots
    plugged first): before, its reservation was taken for RAM and the migration crashed reading
    past the end of guest memory."""
    with pytest.raises(testbed.UsageError, match="hotplug memory"):
        migrate(GUESTS / "migrate_churn.s", VmOptions(vm_type="sev", memory="8M", max_memory="16M"))


def test_conversion_racing_the_final_round() -> None:
    """A conversion during the last pre-copy round goes out with a stale status (the page is
    deferred or sent the old way); the stop-and-copy's status XOR catches it and nothing is
    lost. Without that final resync (the bug the seed thread warns of), pages are lost."""
    options = migration_options(VmOptions(vm_type="sev", memory="8M", seed=1))
    with testbed.Vm(options) as vm:
        vcpu = vm.load(GUESTS / "migrate_churn.s")
        migration = Migration(vm, vcpu, rounds=1, slice_exits=8)
        try:
            migration.start()
            last = migration.precopy_round()
            # the guest converted pages during that round's slice: they reach the stop round
            stop = migration.stop_and_copy()
            report = migration.finish()
        finally:
            migration.close()
    _check(report)
    assert last.status_changes > 0 and stop.status_changes > 0
    stale = migrate(GUESTS / "migrate_churn.s", VmOptions(vm_type="sev", memory="8M", seed=1),
                    rounds=1, final_resync=False)
    assert stale.rounds[-1].status_source == "stale (no resync)"
    assert stale.lost_pages + stale.corrupted_pages > 0, stale.to_json()


def test_a_source_resumed_after_a_migration_no_longer_logs_its_vmm_writes() -> None:
    """The VMM's write logging the migration hooks onto the source is taken off when the source
    resumes (and on close): the guest finishes there, and nothing more is recorded."""
    options = migration_options(VmOptions(vm_type="sev", memory="8M", seed=1))
    with testbed.Vm(options) as vm:
        vcpu = vm.load(GUESTS / "migrate_churn.s")
        memory = vm.machine.memory
        before = memory.on_host_write
        migration = Migration(vm, vcpu, rounds=1, slice_exits=8)
        try:
            migration.start()
            assert memory.on_host_write is not before
            logged = set(migration._vmm_dirty)
            assert migration.resume_source()[0] == "done"
            assert memory.on_host_write is before and migration._vmm_dirty == logged
        finally:
            migration.close()


def test_poisoned_tracker_falls_back_to_memory_attributes() -> None:
    """A hostile guest overflows the ranges tracker (poisoned): the VMM falls back to a full
    status resync from KVM's memory attributes every round, says so, and loses nothing."""
    report = migrate(GUESTS / "conversions.s", VmOptions(vm_type="sev-snp", memory="8M", seed=1, max_ranges=8,
                                                         defines={"SHAPE": 3, "HOSTILE_PAGES": 64}),
                     rounds=2, slice_exits=8)
    _check(report)
    assert report.resync == {"source": "memory-attributes", "fallback": True, "reason": "tracker poisoned",
                             "tracker_poisoned": True}
    assert report.rounds[-1].status_source == "memory-attributes"
    assert report.rounds[-1].status_bytes == 2048 // 8


def test_poisoned_tracker_without_attributes_is_refused() -> None:
    """SEV-ES keeps no memory attributes: with the tracker poisoned the migration is refused."""
    report = migrate(GUESTS / "conversions.s", VmOptions(vm_type="sev-es", memory="8M", seed=1, max_ranges=8,
                                                         defines={"SHAPE": 3, "HOSTILE_PAGES": 64}),
                     rounds=2, slice_exits=8)
    assert report.outcome == "refused" and "poisoned" in report.detail
    assert report.to_json()["tracker_poisoned"] is True


def test_cbit_changed_behind_the_hosts_back_is_corruption() -> None:
    """A guest that makes a page shared in its PTEs without telling the host (sev-es: no memory
    attributes catch it) has that page sent through the firmware as private: the testbed
    reports it corrupted and the guest's own check on the target fails."""
    report = migrate(GUESTS / "migrate_cbit_liar.s", VmOptions(vm_type="sev-es", memory="8M", seed=1),
                     rounds=1, slice_exits=4)
    assert report.outcome == "guest_assert", report.detail
    assert report.lost_pages == 0 and report.corrupted_pages >= 1
    assert {"gfn": 0x600, "kind": "corrupted", "source": "shared", "target": "shared"} in report.mismatches


def test_target_refusing_a_page() -> None:
    """A packet corrupted in transit is refused by the target's firmware (RECEIVE_UPDATE_DATA
    fails, EIO with the firmware status): the migration fails and the source finishes the run."""

    def tamper(gpa: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
        if gpa == 0x620000:
            packet = bytes([packet[0] ^ 1]) + packet[1:]
        return header, packet

    report = migrate(GUESTS / "migrate_churn.s", VmOptions(vm_type="sev", memory="8M", seed=1), rounds=1,
                     tamper=tamper)
    assert report.outcome == "receive_refused" and "0x620000" in report.detail
    info = report.to_json()
    assert info["gpa"] == 0x620000 and info["errno"] == 5 and info["fw_error"]
    assert info["source_outcome"] == "done"


# ----------------------------------------------------------------- the donated tracker
def test_donated_status_before_the_donation_and_mid_update() -> None:
    """With the donated tracker the bulk round runs before the guest donated its structure: the
    VMM says so and resyncs from KVM's attributes for that round (not "poisoned"); a later read
    that lands mid-update (odd generation) reuses the last export, finds no change, and the
    next read catches up (the stop waits for an even generation; the structure is read there)."""
    report = _scenario("sev-snp", "donate_conversions")
    _check(report)
    rounds = report.rounds
    assert rounds[0].status_source == "memory-attributes (no encryption-status structure donated)"
    assert report.resync["before_donation"] == 1 and "tracker_poisoned" not in report.resync
    assert rounds[1].status_source.startswith("donated (update in progress")
    assert rounds[1].status_changes == 0 and rounds[1].status_bytes == 32  # only the header was read
    assert rounds[-1].status_source == "donated" and rounds[-1].status_changes > 0
    assert report.resync["retried_reads"] >= 1 and report.resync["quiesce_exits"] >= 1


def test_donated_status_on_sev_es_waits_for_the_donation() -> None:
    """SEV-ES keeps no memory attributes to resync from: the VMM lets the guest run until it has
    donated (a bounded wait), and even the bulk round's status comes from the structure."""
    report = _scenario("sev-es", "donate_conversions")
    _check(report)
    assert report.rounds[0].status_source == "donated" and "before_donation" not in report.resync
    assert report.resync["quiesce_exits"] >= 1


def test_target_takes_over_the_donation() -> None:
    """The target VMM gets the source's donation region (GPA, size) with the memory: the guest
    converts on there through its structure, which the target reads valid and equal to KVM's
    attributes at the end (sw-protected: the structure records the RAM that starts shared)."""
    options = migration_options(VmOptions(vm_type="sw-protected", memory="8M", seed=1, tracker="donated"))
    with testbed.Vm(options) as vm:
        vcpu = vm.load(GUESTS / "donate_conversions.s")
        migration = Migration(vm, vcpu, rounds=1, slice_exits=8)
        try:
            migration.start()
            migration.precopy_round()
            migration.stop_and_copy()
            report = migration.finish()
            assert migration.target is not None
            target = migration.target.machine
            source_region = vm.machine.map_gpa.tracker.region  # type: ignore[attr-defined]
            tracker = target.map_gpa.tracker
            assert isinstance(tracker, DonatedTracker)
            assert tracker.region == source_region and tracker.read_now() == "valid"
            attrs = target.kvm_vm.mem_attrs
            assert attrs is not None
            private = bitarray(endian="little")
            private.pack(bytes(attrs.private[:2048]))
            assert tracker.shared_ranges() == bits_to_ranges(~private)
            assert target.vmm.donate is not None
            assert target.vmm.donate.log[0][3] == "migrated from the source"
        finally:
            migration.close()
    _check(report)
    assert 3 in report.target_syncs  # the guest's last conversions ran on the target


@pytest.mark.parametrize("vm_type", ["sev-snp", "sev-es"])
def test_hostile_guest_corrupting_its_donated_structure(vm_type: str) -> None:
    """A guest that corrupts its donated structure mid-migration (a count above the capacity):
    the VMM finds it invalid, falls back to a full status resync from KVM's attributes every
    round from then on, says so, and loses nothing; SEV-ES, without attributes, is refused."""
    report = migrate(GUESTS / "migrate_donate_hostile.s",
                     VmOptions(vm_type=vm_type, memory="8M", seed=1, tracker="donated"), rounds=3, slice_exits=8)
    if vm_type == "sev-es":
        assert report.outcome == "refused" and "donated encryption-status structure is invalid" in report.detail
        assert report.to_json()["tracker_poisoned"] is True
        return
    _check(report)
    assert report.resync["fallback"] is True and report.resync["source"] == "memory-attributes"
    assert report.resync["reason"] == "donated structure invalid: count 2147483647 > capacity 1278"
    sources = [r.status_source for r in report.rounds]
    assert "donated" in sources[1:] and sources[-1] == "memory-attributes"
    info = report.to_json()
    assert info["target_donation"]["accepted"] is False and "count 2147483647" in info["target_donation"]["reason"]


def test_the_fallback_from_an_invalid_donated_structure_holds_after_a_new_donation() -> None:
    """Once the donated structure was found invalid the migration resyncs from KVM's attributes
    for every round left, even after the guest donates a valid structure again (the tracker is
    valid again, the guest is not trusted again)."""
    options = migration_options(VmOptions(vm_type="sev-snp", memory="8M", seed=1, tracker="donated"))
    with testbed.Vm(options) as vm:
        vcpu = vm.load(GUESTS / "donate_conversions.s")
        migration = Migration(vm, vcpu, rounds=4, slice_exits=8)
        try:
            migration.start()
            migration.precopy_round()
            tracker = vm.machine.map_gpa.tracker
            assert isinstance(tracker, DonatedTracker) and tracker.region is not None
            gpa, size = tracker.region.gpa, tracker.region.size
            header = vm.read(gpa, 32)
            magic, version, generation, _count, capacity, request = struct.unpack("<IIQIIQ", header)
            # a consistent (even) generation with a count above the capacity
            vm.write(gpa, struct.pack("<IIQIIQ", magic, version, generation & ~1, 0x7FFFFFFF, capacity, request))
            assert tracker.read_now() == "invalid"
            vm.write(gpa, header)  # (the guest's own code reads the count back)
            assert migration.precopy_round().status_source == "memory-attributes"
            assert vm.machine.vmm.donate is not None and vm.machine.vmm.donate.handle(gpa, size, 0) == 0
            assert tracker.read_now() == "valid"
            assert migration.precopy_round().status_source == "memory-attributes"
            assert migration.report.resync["reason"].startswith("donated structure invalid: count 2147483647")
            migration.stop_and_copy()
            report = migration.finish()
        finally:
            migration.close()
    _check(report)
    assert report.rounds[-1].status_source == "memory-attributes"


# ------------------------------------------------------------------------------ the oracle
def test_oracle_counts_a_page_written_on_one_side_only() -> None:
    """The page check: two legacy SEV VMs with different keys agree on every page nothing was
    written to (each decrypts zeros into its own garbage: the same never-written page), a page
    written through C=1 on one side only is corrupted, and on SNP the fast comparison counts
    exactly what the digests of every page count."""
    options = migration_options(VmOptions(vm_type="sev", memory="8M", seed=1))
    with testbed.Vm(options) as a, testbed.Vm(dataclasses.replace(options, seed=2)) as b:
        a.load(GUESTS / "migrate_churn.s")
        b.load(GUESTS / "migrate_churn.s")
        base = compare_machines(a.machine, b.machine)
        a.machine.memory.cpu_write(0x700000, b"\x5a" * PAGE, private=True)
        after = compare_machines(a.machine, b.machine)
        assert after.corrupted_pages == base.corrupted_pages + 1 and after.lost_pages == base.lost_pages
        assert {"gfn": 0x700, "kind": "corrupted", "source": "private", "target": "private"} in after.mismatches
        assert compare_machines(a.machine, a.machine).corrupted_pages == 0
    options = migration_options(VmOptions(vm_type="sev-snp", memory="8M", seed=1))
    with testbed.Vm(options) as a, testbed.Vm(dataclasses.replace(options, seed=2)) as b:
        va, vb = a.load(GUESTS / "migrate_churn.s"), b.load(GUESTS / "migrate_churn.s")
        for _ in range(3):
            va.run_to_ucall()
        for _ in range(5):
            vb.run_to_ucall()
        fast, digests = compare_machines(a.machine, b.machine), compare(guest_view(a.machine), guest_view(b.machine))
        assert (fast.lost_pages, fast.corrupted_pages, fast.mismatches) == (
            digests.lost_pages, digests.corrupted_pages, digests.mismatches)
        assert fast.lost_pages > 0 and fast.corrupted_pages > 0


def test_transport_keystream_is_aes_ctr() -> None:
    """The firmware's transport encryption (one CTR context re-seeded per packet) is AES-128-CTR
    from the packet's IV, byte for byte, whatever the length or counter (carries included)."""
    session = TransportSession.create(5)
    rng = random.Random(3)
    for length in (0, 5, 16, 17, PAGE, 2 * PAGE + 3):
        for low in (0, 77 << 12, (1 << 64) - 1, rng.getrandbits(64)):
            for high in (0, (1 << 64) - 1):
                iv = (high << 64 | low).to_bytes(16, "big")
                data = rng.randbytes(length)
                enc = Cipher(algorithms.AES(session.tek), modes.CTR(iv)).encryptor()
                assert session._crypt(iv, data) == enc.update(data) + enc.finalize()


# ------------------------------------------------------------------- status export and XOR
def test_xor_ranges_is_the_bitmap_xor() -> None:
    """The range sweep's XOR equals the XOR of the two bitmaps, on random range lists."""
    rng = random.Random(7)
    for _ in range(200):
        pages = rng.randrange(1, 300)
        a, b = (bitarray([rng.random() < 0.3 for _ in range(pages)], endian="little") for _ in range(2))
        assert xor_ranges(bits_to_ranges(a), bits_to_ranges(b)) == bits_to_ranges(a ^ b)
        assert ranges_to_bits(bits_to_ranges(a), pages) == a


@pytest.mark.parametrize("kind", ["bitmap", "ranges", "tree"])
def test_export_sizes(kind: str) -> None:
    """A bitmap tracker exports guest_pages / 8 bytes, a list or tree 16 bytes per range."""
    tracker = make_tracker(kind, guest_pages=4096)
    tracker.apply([(10, 2, True), (100, 1, True), (200, 50, True)])
    status = export_tracker(tracker, kind)
    assert status.shared_ranges() == [(10, 2), (100, 1), (200, 50)]
    assert status.nbytes == (512 if kind == "bitmap" else 48)


# -------------------------------------------------------------------------------- the CLI
def test_the_largest_seed_migrates_with_the_target_key_wrapped() -> None:
    """--seed takes any u64; the target's default key (seed + 1) wraps to 0 past the largest
    rather than being refused as a value the user never gave."""
    assert main(["migrate", str(GUESTS / "migrate_churn.s"), "--vm-type", "sw-protected", "--rounds", "1",
                 "--seed", str((1 << 64) - 1), "--memory", "16M"]) == 0


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`testbed migrate --json` prints outcome, lost/corrupted pages and per-round figures; exit 0."""
    assert main(["migrate", str(GUESTS / "migrate_churn.s"), "--vm-type", "sw-protected", "--rounds", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["outcome"] == "done" and out["lost_pages"] == 0 and out["corrupted_pages"] == 0
    assert out["vm_type"] == "sw-protected" and out["tracker"] == "ranges"
    assert set(out["rounds"][0]) >= {"pages_sent", "status_bytes", "status_changes", "time_s"}


@pytest.mark.parametrize("argv, message", [
    (["--vm-type", "tdx"], "testbed migrate takes"),
    (["--rounds", "x"], "--rounds"),
    (["--slice", "0"], "--slice"),
])
def test_cli_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad options are one line on stderr and status 2."""
    assert main(["migrate", str(GUESTS / "migrate_churn.s"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_guest_failing_on_the_source_is_reported_as_its_failure(capsys: pytest.CaptureFixture[str]) -> None:
    """A guest whose own check fails before the migration completes (conversions.s needs more
    than 8 MiB) ends as source_ended with its failure, and no advice about rounds."""
    status = main(["migrate", str(GUESTS / "conversions.s"), "--vm-type", "sev", "--memory", "8M", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert status == 1 and doc["outcome"] == "source_ended"
    assert "guest_assert: " in doc["detail"] and "conversions.s:" in doc["detail"]
    assert "--rounds" not in doc["detail"]


def test_a_boot_that_runs_out_of_time_is_a_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    """`--timeout` shorter than the boot: outcome timeout, exit status 3, as for any run."""
    status = main(["migrate", str(GUESTS / "migrate_churn.s"), "--timeout", "0.001", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert (status, doc["outcome"]) == (3, "timeout")
    assert doc["detail"].startswith("during the boot: ")


def test_a_source_that_runs_out_of_time_during_the_migration_is_a_timeout(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A guest that spins on the source past `--timeout` (the whole migration's time) ends the
    migration as a timeout, exit status 3 (README: "3 on timeout"), not as source_ended (1),
    and says so: time ran out with the guest still running, not "the guest's run ended"."""
    status = main(["migrate", str(GUESTS / "cli_spin.s"), "--vm-type", "sev", "--timeout", "0.2", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert (status, doc["outcome"]) == (3, "timeout"), doc["detail"]
    assert doc["detail"].startswith("the migration ran out of time in ") and "(0.2 s, --timeout)" in doc["detail"]
    assert "did not end" in doc["detail"] and "run ended" not in doc["detail"] and "1e-06" not in doc["detail"]


def test_donated_tracker_with_a_guest_that_never_donates_is_refused_naming_the_donation(
        capsys: pytest.CaptureFixture[str]) -> None:
    """--tracker donated on sev-es with a guest that never donates is refused naming the donation, not source_ended."""
    # The VMM's wait for the donation (at most 256 exits) ends with the guest's run; README promises a refusal.
    status = main(["migrate", str(GUESTS / "migrate_churn.s"), "--vm-type", "sev-es", "--tracker", "donated",
                   "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert (status, doc["outcome"]) == (1, "refused"), doc["detail"]
    assert "while the VMM waited for its donated encryption-status structure" in doc["detail"]
    assert "needs a guest that donates one" in doc["detail"] and "--rounds" not in doc["detail"]


# ------------------------------------------------------------------------ the vCPU state
@pytest.mark.parametrize("vm_type", ["sev", "sev-es", "sev-snp", "default"])
def test_x87_sse_state_and_xcr0_survive_the_migration(vm_type: str) -> None:
    """XMM0-15, MXCSR, FCW, the x87 stack and XCR0 set on the source are there on the target."""
    # guests/migrate_fpu.s checks them after the migration. QEMU moves them with KVM_GET_XSAVE/KVM_GET_XCRS;
    # an SEV-ES/SNP VMSA holds them (arch/x86/kvm/svm/sev.c sev_es_sync_vmsa: x87_*, mxcsr, fpreg_xmm, xcr0).
    report = migrate(GUESTS / "migrate_fpu.s", VmOptions(vm_type=vm_type, memory="8M", seed=1), rounds=1)
    _check(report)
    assert report.source_syncs and report.target_syncs  # set on the source, checked on the target


def test_a_vcpu_that_arrives_different_is_reported() -> None:
    """A register that arrives different on the target is a reported vCPU mismatch and the report does not pass."""
    options = migration_options(VmOptions(vm_type="sev", memory="8M", seed=1))
    with testbed.Vm(options) as vm:
        vcpu = vm.load(GUESTS / "migrate_fpu.s")
        migration = Migration(vm, vcpu, rounds=0, slice_exits=4)
        try:
            migration.start()
            assert migration.target is not None
            target = migration.target
            real_set = target.set_vcpu_state

            def lossy(state: Any) -> None:  # a VMM that drops XMM3 on the way
                regs = state.regs
                xmm = (*regs.xmm[:3], 0, *regs.xmm[4:])
                real_set(dataclasses.replace(state, regs=dataclasses.replace(regs, xmm=xmm)))

            target.set_vcpu_state = lossy  # type: ignore[method-assign]
            migration.stop_and_copy()
            report = migration.report
        finally:
            migration.close()
    assert report.vcpu_mismatches == [{"field": "xmm[3]", "source": "0x5ec0000000000003", "target": "0x0"}]
    assert not report.passed and (report.lost_pages, report.corrupted_pages) == (0, 0)


# ------------------------------------------------------------------------ SNP's RMP
def test_snp_validation_rescinded_without_a_write_reaches_the_target() -> None:
    """SNP: a validation rescinded without a write (no dirty bit, no conversion) is re-sent from the RMP change."""
    # guests/migrate_pvalidate.s re-validates the page on the target: PVALIDATE must update the RMP (CF = 0).
    report = migrate(GUESTS / "migrate_pvalidate.s", VmOptions(vm_type="sev-snp", memory="8M", seed=1), rounds=2)
    _check(report)
    assert report.rounds[-1].rmp_changes == 1  # the rescind in round 2's slice, re-sent at the stop
    assert report.source_syncs[-1] >= 18  # the rescind (iteration 18) ran on the source


def test_the_oracle_counts_an_rmp_entry_that_did_not_arrive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the RMP re-send the oracle counts the rescinded page's RMP entry (rmp_pages, a mismatch of kind rmp)."""
    monkeypatch.setattr(Migration, "_rmp_entries", lambda self: None)
    report = migrate(GUESTS / "migrate_pvalidate.s", VmOptions(vm_type="sev-snp", memory="8M", seed=1), rounds=2)
    assert report.rmp_pages == 1 and not report.passed
    page = (Layout(8 << 20).defines()["GUEST_FREE_GPA"] + 0x5000) >> 12
    assert {"gfn": page, "kind": "rmp", "source": "assigned", "target": "assigned, validated"} in report.mismatches
    assert report.outcome == "guest_assert"  # and the guest's own check on the target fails


# ------------------------------------------------------------------------ host-side state
def test_a_status_change_that_never_reached_the_target_is_counted() -> None:
    """Without the final resync the flip page's lost conversion is counted in KVM's status and the trackers' sets."""
    report = migrate(GUESTS / "migrate_churn.s", VmOptions(vm_type="sev", memory="8M", seed=1), rounds=1,
                     final_resync=False)
    assert report.status_pages >= 1 and report.tracker_pages >= 1 and not report.passed
    kinds = {(m["gfn"], m["kind"]) for m in report.mismatches}
    assert {(0x600, "status"), (0x600, "tracker")} <= kinds


def test_pages_still_deferred_at_the_stop_fail_the_migration() -> None:
    """SNP without the final resync: pages unsendable at the stop fail the migration (send_failed, SEND_CANCEL)."""
    report = migrate(GUESTS / "migrate_churn.s", VmOptions(vm_type="sev-snp", memory="8M", seed=1), rounds=1,
                     final_resync=False)
    assert report.outcome == "send_failed", report.detail
    assert "could not be sent at the stop" in report.detail and report.extra["unsent_gfns"]
    assert report.extra["send_cancel"] == "issued" and report.extra["source_outcome"] == "done"


# ------------------------------------------------------------------------ legacy zero pages
@pytest.mark.parametrize("vm_type", ["sev", "sev-es"])
def test_a_legacy_page_the_guest_only_read_is_sent(vm_type: str) -> None:
    """Legacy SEV: a frame the guest only read through C=1 is sent (no zero page) and reads the same on the target."""
    # QEMU's series sends every page of the encrypted list through SEND_UPDATE_DATA (sev_save_outgoing_page).
    report = migrate(GUESTS / "migrate_c1_read.s", VmOptions(vm_type=vm_type, memory="8M", seed=1), rounds=1)
    _check(report)


# ------------------------------------------------------------------------ failures and SEND_CANCEL
def test_a_failed_migration_is_cancelled_and_a_new_one_can_start() -> None:
    """A failed migration issues SEND_CANCEL: the source's firmware is RUNNING and a second migration completes."""
    # amd-memory-encryption.rst, KVM_SEV_SEND_CANCEL: "a cancelled migration can restart with a new target later".
    options = migration_options(VmOptions(vm_type="sev", memory="8M", seed=1))
    with testbed.Vm(options) as vm:
        vcpu = vm.load(GUESTS / "migrate_churn.s")

        def tamper(gpa: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
            return header, bytes([packet[0] ^ 1]) + packet[1:]

        first = Migration(vm, vcpu, rounds=1, slice_exits=8, tamper=tamper)
        try:
            with pytest.raises(MigrationError) as failed:
                first.start()
        finally:
            first.close()
        assert failed.value.outcome == "receive_refused"
        assert first.report.extra["send_cancel"] == "issued"
        assert vm.machine.cpu.sev_firmware().state == "RUNNING"
        second = Migration(vm, vcpu, rounds=1, slice_exits=8)
        try:
            second.start()
            while second.precopy_rounds_left:
                second.precopy_round()
            second.stop_and_copy()
            report = second.finish()
        finally:
            second.close()
    _check(report)


def test_a_guest_sent_already_cannot_start_another_migration() -> None:
    """SEND_START on a guest already SENT is a MigrationError (start_failed) saying why, not a raw SevCommandError."""
    options = migration_options(VmOptions(vm_type="sev", memory="8M", seed=1))
    with testbed.Vm(options) as vm:
        vcpu = vm.load(GUESTS / "migrate_churn.s")
        first = Migration(vm, vcpu, rounds=0, slice_exits=8)
        try:
            first.start()
            first.stop_and_copy()
        finally:
            first.close()
        again = Migration(vm, vcpu, rounds=0, slice_exits=8)
        try:
            with pytest.raises(MigrationError) as failed:
                again.start()
        finally:
            again.close()
    assert failed.value.outcome == "start_failed"
    assert "KVM_SEV_SEND_START" in failed.value.detail and "guest state SENT" in failed.value.detail
    assert "send_cancel" not in again.report.extra  # nothing was started: nothing to cancel
