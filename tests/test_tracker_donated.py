"""The donated tracker: the guest's own encryption-status structure, read and validated by the host.

Unit tests drive DonatedTracker over a bytearray standing in for guest memory (every read is
recorded, so the bound is checked, not assumed); the scenario tests run guests/donate_conversions.s
and hostile guests on the VM types. The donation hypercall is the testbed's own
(KVM_HC_TESTBED_DONATE_ENC_STATUS, README "Deliberate deviations"); its exit path is KVM's
user_exit_on_hypercall() / complete_hypercall_exit() (arch/x86/kvm/x86.c), as for MAP_GPA_RANGE.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.errors import GuestMemoryError
from testbed.kvm.hypercall import emulate_hypercall, neg
from testbed.kvm.uapi import KVM_ENOSYS, KVM_HC_TESTBED_DONATE_ENC_STATUS
from testbed.machine import Machine, VmOptions, build_program, run_guest
from testbed.tracker import RangesTracker, make_tracker
from testbed.tracker.donated import (
    ENC_STATUS_MAGIC,
    ENC_STATUS_VERSION,
    ENCS_HOST_REQUEST,
    ENCS_RECORDS,
    DonatedTracker,
    DonationRefusedError,
    bytes_for,
)

GUESTS = Path(__file__).resolve().parent.parent / "guests"
SCENARIO = GUESTS / "donate_conversions.s"
PAGES = 2048  # an 8 MiB guest
GPA = 0x10000
SIZE = bytes_for(1024)  # what the host requires of an 8 MiB guest (min(max_ranges, pages / 2) records)


class FakeGuest:
    """Guest memory as a bytearray; records every host read, and which pages are private."""

    def __init__(self, pages: int = PAGES) -> None:
        self.mem = bytearray(pages << 12)
        self.reads: list[tuple[int, int]] = []
        self.private: set[int] = set()

    def read(self, gpa: int, length: int) -> bytes:
        self.reads.append((gpa, length))
        if gpa < 0 or gpa + length > len(self.mem):
            raise GuestMemoryError("read outside memory", gpa)
        return bytes(self.mem[gpa : gpa + length])

    def write(self, gpa: int, data: bytes) -> None:
        self.mem[gpa : gpa + len(data)] = data

    def is_private(self, gfn: int) -> bool:
        return gfn in self.private

    def put(self, records: list[tuple[int, int]], *, gpa: int = GPA, size: int = SIZE, count: int | None = None,
            capacity: int | None = None, generation: int = 0, magic: int = ENC_STATUS_MAGIC) -> None:
        cap = (size - ENCS_RECORDS) // 16 if capacity is None else capacity
        n = len(records) if count is None else count
        header = struct.pack("<IIQIIQ", magic, ENC_STATUS_VERSION, generation, n, cap, 0)
        body = b"".join(struct.pack("<QQ", g, p) for g, p in records)
        self.mem[gpa : gpa + len(header) + len(body)] = header + body


def donated(guest: FakeGuest, records: list[tuple[int, int]], **kw: int) -> DonatedTracker:
    guest.put(records, **kw)
    tracker = DonatedTracker(PAGES)
    tracker.donate(GPA, SIZE, guest.read, guest.write, guest.is_private)
    return tracker


def test_valid_structure_is_the_shared_set() -> None:
    """A valid structure is read as the shared ranges, adjacent records merged; the export is complete."""
    guest = FakeGuest()
    tracker = donated(guest, [(16, 17), (40, 2), (42, 3), (100, 1)])
    assert tracker.shared_ranges() == [(16, 17), (40, 5), (100, 1)]
    assert not tracker.poisoned and tracker.reason is None
    assert tracker.is_shared(44) and not tracker.is_shared(45)
    buf = bytearray(64)
    result = tracker.export(buf)
    assert result.complete and result.records_written == 3


def test_conversions_record_nothing_but_are_validated() -> None:
    """set_shared/set_private change nothing on the host (the structure is the guest's) but still
    refuse a range outside guest memory."""
    guest = FakeGuest()
    tracker = donated(guest, [(16, 1)])
    tracker.set_shared(500, 3)
    tracker.set_private(16, 1)
    assert tracker.shared_ranges() == [(16, 1)]
    with pytest.raises(Exception, match="gfn\\+npages"):
        tracker.set_shared(PAGES - 1, 2)


def test_before_a_donation_the_tracker_is_poisoned() -> None:
    """Without a donated structure the tracker cannot vouch for anything: poisoned, with the reason."""
    tracker = make_tracker("donated", guest_pages=PAGES)
    assert tracker.poisoned and tracker.shared_ranges() == []
    assert isinstance(tracker, DonatedTracker) and tracker.reason == "no encryption-status structure donated"


HOSTILE = {
    "unsorted": ([(16, 17), (40, 2), (30, 1)], {}, "unsorted"),
    "overlapping": ([(16, 17), (30, 4)], {}, "overlaps"),
    "out of memory": ([(16, 1), (PAGES - 1, 2)], {}, "outside guest memory"),
    "empty record": ([(16, 0)], {}, "npages 0"),
    "count > capacity": ([(16, 1)], {"count": 11, "capacity": 10}, "count 11 > capacity 10"),
    "capacity past the donation": ([(16, 1)], {"capacity": 100_000}, "does not fit the donated"),
    "bad magic": ([(16, 1)], {"magic": 0x1234}, "bad magic"),
}


def test_a_count_above_the_hosts_bound_is_invalid() -> None:
    """The page-rounded donation has room for more records than the host's bound (max_ranges):
    a count inside the capacity but above the bound is invalid, so the snapshot never holds more
    than max_ranges records (memory_bound_bytes); at the bound it is read."""
    guest = FakeGuest()
    tracker = DonatedTracker(PAGES, max_ranges=1000)
    size = tracker.max_donation_bytes  # 0x4000: room for 1022 records
    capacity = (size - ENCS_RECORDS) // 16
    assert capacity == 1022
    guest.put([(16 + i, 1) for i in range(1000)], size=size)
    tracker.donate(GPA, size, guest.read, guest.write, guest.is_private)
    assert tracker.read_now() == "valid" and tracker.shared_ranges() == [(16, 1000)]
    guest.put([(16 + i, 1) for i in range(1001)], size=size, generation=2)
    assert tracker.read_now() == "invalid"
    assert tracker.reason == "count 1001 > the host's bound of 1000 records"


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_corruption_poisons_with_the_reason(case: str) -> None:
    """A structure corrupted after the donation poisons the tracker with the reason; the ranges
    stay the last valid snapshot, the export says poisoned and incomplete, and the poison is
    sticky until clear() (then a valid structure is read again)."""
    records, header, reason = HOSTILE[case]
    guest = FakeGuest()
    tracker = donated(guest, [(16, 2)])
    guest.put(records, generation=2, **header)
    assert tracker.poisoned
    assert tracker.reason is not None and reason in tracker.reason
    assert tracker.shared_ranges() == [(16, 2)]
    result = tracker.export(bytearray(64))
    assert result.poisoned and not result.complete
    guest.put([(20, 1)], generation=4)
    assert tracker.poisoned  # sticky
    tracker.clear()
    assert not tracker.poisoned and tracker.shared_ranges() == [(20, 1)]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_structure_is_refused_at_donation(case: str) -> None:
    """A structure that is invalid when donated is refused with EINVAL and nothing is taken."""
    records, header, reason = HOSTILE[case]
    guest = FakeGuest()
    guest.put(records, **header)
    tracker = DonatedTracker(PAGES)
    with pytest.raises(DonationRefusedError) as info:
        tracker.donate(GPA, SIZE, guest.read, guest.write, guest.is_private)
    assert info.value.errno == 22 and reason in info.value.reason
    assert tracker.region is None


@pytest.mark.parametrize(("gpa", "size", "errno", "reason"), [
    (GPA + 8, SIZE, 22, "not page aligned"),
    (GPA, SIZE + 100, 22, "not page aligned"),
    (GPA, 0, 22, "empty"),
    ((PAGES - 2) << 12, SIZE, 22, "outside guest memory"),
    (GPA, bytes_for(4096) + 4096, 7, "above the host's bound"),
    (GPA, 4096, 28, "the host needs"),
])
def test_bad_donations_are_refused(gpa: int, size: int, errno: int, reason: str) -> None:
    """Alignment, an empty or out-of-memory region, a size above the host's bound (E2BIG) or below
    its requirement (ENOSPC) are refused with the errno the guest gets back."""
    guest = FakeGuest()
    guest.put([(16, 1)])
    tracker = DonatedTracker(PAGES)
    with pytest.raises(DonationRefusedError) as info:
        tracker.donate(gpa, size, guest.read, guest.write, guest.is_private)
    assert info.value.errno == errno and reason in info.value.reason
    assert guest.reads == []  # refused before anything was read


def test_too_small_a_donation_tells_the_guest_how_much() -> None:
    """ENOSPC writes the host's requirement into the header's host_request, for the guest to grow to."""
    guest = FakeGuest()
    guest.put([(16, 1)], size=4096)
    with pytest.raises(DonationRefusedError):
        DonatedTracker(PAGES).donate(GPA, 4096, guest.read, guest.write, guest.is_private)
    assert struct.unpack_from("<Q", guest.mem, GPA + ENCS_HOST_REQUEST)[0] == SIZE


def test_private_memory_cannot_be_donated_and_a_donation_made_private_poisons() -> None:
    """The donated pages must be shared when donated (EINVAL otherwise) and stay shared: one made
    private later poisons the tracker."""
    guest = FakeGuest()
    guest.put([(16, 1)])
    guest.private.add((GPA >> 12) + 1)
    with pytest.raises(DonationRefusedError, match="is private"):
        DonatedTracker(PAGES).donate(GPA, SIZE, guest.read, guest.write, guest.is_private)
    guest.private.clear()
    tracker = donated(guest, [(16, 1)])
    guest.private.add(GPA >> 12)
    assert tracker.poisoned and "no longer shared" in (tracker.reason or "")


def test_unreadable_structure_poisons() -> None:
    """A structure the host can no longer read (a guest_memfd page gone private) poisons, never raises."""
    guest = FakeGuest()
    tracker = donated(guest, [(16, 1)])

    def refuse(gpa: int, length: int) -> bytes:
        raise GuestMemoryError("private memory of a guest_memfd VM is not mappable by the host", gpa)

    tracker._read = refuse
    assert tracker.poisoned and "not readable" in (tracker.reason or "")


def test_odd_generation_is_an_update_in_progress_not_poison() -> None:
    """An odd generation makes that read incomplete (poisoned, the snapshot kept); it is not
    sticky: the next read of an even generation is complete again."""
    guest = FakeGuest()
    tracker = donated(guest, [(16, 1)])
    guest.put([(16, 1), (30, 1)], generation=1)
    assert tracker.poisoned and "in progress" in (tracker.reason or "")
    assert not tracker.export(bytearray(64)).complete
    assert tracker.shared_ranges() == [(16, 1)]
    guest.put([(16, 1), (30, 1)], generation=2)
    assert not tracker.poisoned and tracker.shared_ranges() == [(16, 1), (30, 1)]


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.binary(min_size=ENCS_RECORDS, max_size=ENCS_RECORDS), body=st.binary(max_size=512),
       count=st.integers(0, 1 << 32 - 1), capacity=st.integers(0, 1 << 32 - 1))
def test_host_never_reads_past_the_donation(header: bytes, body: bytes, count: int, capacity: int) -> None:
    """Whatever the guest writes (garbage headers, huge count or capacity), every host read lies
    inside the donated region and a read never raises."""
    guest = FakeGuest()
    tracker = donated(guest, [(16, 1)])
    raw = bytearray(header + body)
    struct.pack_into("<IIII", raw, 0, ENC_STATUS_MAGIC, ENC_STATUS_VERSION, 0, 0)
    struct.pack_into("<II", raw, 0x10, count, capacity)
    guest.mem[GPA : GPA + len(raw)] = raw
    guest.reads.clear()
    tracker.clear()
    tracker.shared_ranges()
    _ = tracker.poisoned
    assert guest.reads
    assert all(gpa >= GPA and gpa + n <= GPA + SIZE for gpa, n in guest.reads)


def test_library_constants_match_the_host() -> None:
    """guests/lib/donate.s and tracker/donated.py agree on the structure's layout and numbers."""
    from testbed.tracker import donated as host

    text = (GUESTS / "lib" / "donate.s").read_text(encoding="utf-8")
    equs = {m[0]: int(m[1], 0) for m in re.findall(r"^\.equ (\w+), (0x[0-9A-Fa-f]+|\d+)", text, re.M)}
    assert equs.pop("KVM_HC_TESTBED_DONATE_ENC_STATUS") == KVM_HC_TESTBED_DONATE_ENC_STATUS
    assert equs.pop("DONATE_ENOSPC") == 28
    assert equs == {name: getattr(host, name) for name in equs}
    assert len(equs) == 10


def test_kvm_forwards_the_donation_only_when_enabled() -> None:
    """KVM knows no such hypercall: without its exit bit it is -KVM_ENOSYS (x86.c
    ____kvm_emulate_hypercall's default); with it, a KVM_EXIT_HYPERCALL carrying a0..a2."""
    from testbed.kvm.hypercall import PvCpuid

    off = emulate_hypercall(KVM_HC_TESTBED_DONATE_ENC_STATUS, 0x1000, 0x2000, 0, 0, cpl=0, op_64_bit=True,
                            pv=PvCpuid(), exit_mask=1 << 12)
    assert off.ret == neg(KVM_ENOSYS) and off.user_exit is None
    on = emulate_hypercall(KVM_HC_TESTBED_DONATE_ENC_STATUS, 0x1000, 0x2000, 0, 0, cpl=0, op_64_bit=True,
                           pv=PvCpuid(), exit_mask=1 << KVM_HC_TESTBED_DONATE_ENC_STATUS)
    assert on.user_exit is not None and on.user_exit.args[:3] == (0x1000, 0x2000, 0)


# ------------------------------------------------------------------------------ guests

VM_TYPES = ["default", "sev", "sev-es", "sev-snp", "sw-protected", "tdx"]


def _options(vm_type: str, **kw: object) -> VmOptions:
    return VmOptions(vm_type=vm_type, vendor="intel" if vm_type == "tdx" else "amd", memory=8 << 20,
                     tracker="donated", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_guest_structure_equals_the_ranges_tracker(vm_type: str) -> None:
    """The guest's donated structure, read by the host at the end, equals a ranges tracker fed the
    same conversions (every MAP_GPA_RANGE/PSC/MapGPA the VMM applied). On SEV-ES the structure
    also lists the GHCB, which the runtime shares without telling the host (only SNP registers it)."""
    options = _options(vm_type)
    program = build_program(SCENARIO, options)
    with Machine(program, options) as machine:
        shadow = RangesTracker(PAGES)
        convert = machine.map_gpa.convert

        def both(gfn: int, npages: int, private: bool) -> int:
            err = convert(gfn, npages, private)
            if not err:
                shadow.convert(gfn, npages, not private)
            return err

        machine.map_gpa.convert = both  # type: ignore[method-assign]
        report = machine.run()
        assert report.outcome == "done", report.detail
        assert report.syncs() == [1, 2, 3]
        tracker = machine.map_gpa.tracker
        assert isinstance(tracker, DonatedTracker) and not tracker.poisoned
        expected = shadow.shared_ranges()
        if vm_type == "sev-es":
            ghcb = 0x205000 >> 12
            assert not shadow.is_shared(ghcb)
            shadow.set_shared(ghcb, 1)
            expected = shadow.shared_ranges()
        assert [tuple(r) for r in report.shared_ranges] == expected
        assert "tracker_poisoned" not in report.extra
        # The first donation (one page) was too small; the library grew to the host's request.
        log = machine.vmm.donate.log  # type: ignore[union-attr]
        assert [(size, ret) for _gpa, size, ret, _why in log] == [(4096, 28), (SIZE, 0)]
        assert tracker.region is not None and tracker.region.size == SIZE


def test_without_the_donated_tracker_the_hypercall_is_unknown() -> None:
    """Under another tracker the VMM does not enable the exit: the guest gets -KVM_ENOSYS and
    converts without a structure."""
    report = run_guest(SCENARIO, VmOptions(memory=8 << 20, tracker="ranges", defines={"EXPECT_DONATED": 0}))
    assert report.outcome == "done", report.detail


HOSTILE_GUEST = """
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rsi, 0x5000
    mov rdx, GUEST_FREE_GPA + 0x5000
    call donate_init
    GUEST_ASSERT_EQ rax, 0
    mov rdi, GUEST_FREE_GPA + 0x10000
    mov rsi, 2
    call donate_set_shared
    GUEST_ASSERT_EQ rax, 0
    GUEST_SYNC 1
    mov rax, GUEST_FREE_GPA
    CORRUPT
    ret

.include "donate.s"
"""

CORRUPTIONS = {
    "count > capacity": ("mov dword ptr [rax + 0x10], 0x7fffffff", "count 2147483647 > capacity"),
    "unsorted": ("mov qword ptr [rax + 0x40], 2", "unsorted"),
    "outside memory": ("mov qword ptr [rax + 0x38], 0x10000000", "outside guest memory"),
}


@pytest.mark.parametrize("vm_type", ["sev", "sev-snp"])
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_hostile_guest_poisons_the_tracker(vm_type: str, case: str) -> None:
    """A guest that corrupts its donated structure finishes normally, and the host reports the
    tracker poisoned (the migration's cue to resync fully) without crashing."""
    insn, reason = CORRUPTIONS[case]
    options = _options(vm_type)
    program = build_program(GUESTS / "hostile_donate.s", options, text=HOSTILE_GUEST.replace("CORRUPT", insn))
    with Machine(program, options) as machine:
        report = machine.run()
        assert report.outcome == "done", report.detail
        assert report.extra.get("tracker_poisoned") is True
        tracker = machine.map_gpa.tracker
        assert isinstance(tracker, DonatedTracker) and reason in (tracker.reason or "")


PRIVATE_DONATION = """
guest_main:
    mov rax, KVM_HC_TESTBED_DONATE_ENC_STATUS
    mov rbx, GUEST_FREE_GPA
    mov rcx, 0x5000
    xor edx, edx
    KVM_HYPERCALL
    GUEST_SYNC rax
    ret

.include "donate.s"
"""


@pytest.mark.parametrize("vm_type", ["sev", "sev-es", "sev-snp"])
def test_donating_private_memory_is_refused(vm_type: str) -> None:
    """Memory the guest has not made shared is refused (-EINVAL): the host reads only shared pages."""
    options = _options(vm_type)
    program = build_program(GUESTS / "private_donate.s", options, text=PRIVATE_DONATION)
    with Machine(program, options) as machine:
        # SEV-ES has no memory attributes: a page the guest wrote through C=1 is ciphertext to the host.
        machine.memory.cpu_write(0x600000, b"\1" * 8, private=True)
        report = machine.run()
    assert report.outcome == "done", report.detail
    assert report.syncs() == [neg(22)]


def test_a_host_request_no_larger_than_the_donation_fails_the_guests_donation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that answers -ENOSPC but requests 0 bytes (nothing to grow to) leaves the guest's
    donate_init failing with -ENOSPC, not reporting a donation the host never took."""
    from testbed.tracker import donated as host

    monkeypatch.setattr(host, "_write_request", lambda write, gpa, _nbytes: write(gpa + ENCS_HOST_REQUEST,
                                                                                  struct.pack("<Q", 0)))
    report = run_guest(SCENARIO, VmOptions(memory=8 << 20, tracker="donated", defines={"EXPECT_DONATED": 1}))
    assert report.outcome == "guest_assert", report.detail
    assert f"0x{(-28) & (2**64 - 1):x} != 0x0" in report.detail  # rax = -ENOSPC


def test_growing_asks_for_more_only_through_a_header_still_shared() -> None:
    """After a hotplug the host asks for a larger structure by writing host_request into the
    header, but not into a header page the guest made private since (the next read poisons)."""
    guest = FakeGuest()
    tracker = donated(guest, [(16, 1)])
    tracker.resize(PAGES * 4)
    request = struct.unpack_from("<Q", guest.mem, GPA + ENCS_HOST_REQUEST)[0]
    assert request == tracker.required_bytes > SIZE
    guest = FakeGuest()
    tracker = donated(guest, [(16, 1)])
    guest.private.add(GPA >> 12)
    tracker.resize(PAGES * 4)
    assert struct.unpack_from("<Q", guest.mem, GPA + ENCS_HOST_REQUEST)[0] == 0
    assert tracker.poisoned and "no longer shared" in (tracker.reason or "")
