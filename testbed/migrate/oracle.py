"""The testbed's check of a migration: the guest's view of every page, source against target.

This is not the VMM (which sees only ciphertext and exports): it is the test oracle, reading
each page as the guest's own CPU would. For every GFN the vCPU walks the guest's page tables
at the identity address (the runtime maps all memory 1:1) and reads the page through the
mapping it finds: `status` is the guest's encryption status of the page - the C-bit of its
PTE on the SEV types, KVM's memory attribute on sw-protected (whose guest has no C-bit) - and
`digest` a hash of the bytes the guest reads there (plaintext of a private page, under that
VM's own key; the raw bytes of a shared one).

Taken at the stop on the source and again on the target after receive, before it runs:

* lost: the target holds the page in the other encryption state (a status change that never
  reached it, so the guest reads the other side of the page);
* corrupted: the same state but different bytes (contents that never arrived, or that
  arrived through the wrong path: a page the guest made shared behind the host's back went
  through the firmware, so the guest reads ciphertext).

One page is the same on both sides whatever its bytes: a legacy SEV frame nothing was ever
written to (DRAM-owned, all zero) that the guest maps with C=1 on both sides. Each VM's CPU
decrypts those zeros under its own key into garbage no guest wrote, so the two differ; the
migration does not send such a page (a zero page, migration.py `_send_pages`) and
`compare_machines` counts it equal. A page touched through C=1 on only one side (a read moves
the frame to the guest) is compared byte for byte like any other. `guest_view` / `compare`
(digests of the bytes as read) keep the garbage.

Beyond the guest's view (`compare_host_state`, `compare_vcpus`): KVM's status of each page
(memory attributes, or the seed-era page-encryption bitmap), the VMM trackers' shared sets,
SNP's RMP entries, and the vCPU's registers (x87/SSE and XCR0 included) with KVM's per-vCPU
state - a status change, a PVALIDATE or a register that never reached the target, which the
guest would only notice later or never.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from testbed.errors import TestbedError
from testbed.hw.memory import OWNER_PRIVATE
from testbed.x86 import PAGE_SHIFT, PAGE_SIZE, Reg
from testbed.x86.addr import Gva
from testbed.x86.paging import PTE_P, PTE_PS

if TYPE_CHECKING:
    from testbed.machine import Machine

#: Mismatches listed in the report (the counts cover all of them).
MAX_LISTED = 16


@dataclass(frozen=True)
class PageView:
    """What the guest sees of one page: its encryption status (None: not mapped) and a digest."""

    private: bool | None
    digest: bytes


def guest_view(machine: Machine) -> list[PageView]:
    """The guest's view of every page of `machine` (between runs): its status and a digest of
    its bytes. `compare_machines` is the same check without the digests."""
    statuses = page_statuses(machine)
    return [PageView(None if st == UNMAPPED else st == PRIVATE,
                     hashlib.blake2b(_page_bytes(machine, gfn, access), digest_size=16).digest())
            for gfn, (st, access) in enumerate(zip(statuses, _accesses(machine, statuses), strict=True))]


#: page_statuses: the guest does not map the page / maps it shared / maps it private
UNMAPPED, SHARED, PRIVATE = 0, 1, 2


def page_statuses(machine: Machine) -> bytearray:
    """Each page's encryption status as the guest sees it (UNMAPPED, SHARED, PRIVATE): the
    C-bit of the leaf mapping the page at its identity address on the SEV types, KVM's
    attribute elsewhere (the page must be mapped either way). The vCPU walks the tables once
    per leaf (a 1 GiB or 2 MiB leaf maps all its pages alike), not once per page; a large leaf
    whose frames run past the end of RAM is walked page by page, as is a span whose tables
    cannot be read (every page of a span shares the walk's entries, so one walk decides it)."""
    cpu = machine.cpu
    memory = machine.memory
    nframes = memory.nframes
    attrs = machine.kvm_vm.mem_attrs
    sev = bool(machine.c_bit_mask)
    out = bytearray(nframes)
    mask = machine.paging.address_mask
    if memory.guest_memfd:
        read_u64: Any = memory.gmem_read_u64
    else:
        encrypted = memory.encrypted
        read_u64 = lambda pa: memory.cpu_read_u64(pa, encrypted)  # noqa: E731 - the walk's reader
    cr3 = cpu.read_reg(Reg.CR3)
    size_pages = memory.size >> PAGE_SHIFT

    def one(gfn: int) -> int:
        try:
            tr = cpu.translate(Gva(gfn << PAGE_SHIFT))
        except Exception:  # not mapped by the guest (or the walk left RAM)
            return UNMAPPED
        if sev:
            return PRIVATE if tr.encrypted else SHARED
        return PRIVATE if attrs is not None and attrs.is_private(gfn) else SHARED

    paging = machine.paging
    reserved = paging.reserved_mask
    enc_mask = paging.enc_mask
    gfn = 0
    while gfn < nframes:
        span, pt_gpa = _leaf_span(read_u64, cr3, gfn, mask, memory.size) if gfn < size_pages else (1, None)
        end = min(nframes, gfn + span)
        if pt_gpa is not None:
            _page_table(out, gfn, end, pt_gpa, read_u64, cpu, memory.size, mask, reserved, enc_mask,
                        paging.enc_means_private, sev, attrs)
            gfn = end
            continue
        try:
            tr = cpu.translate(Gva(gfn << PAGE_SHIFT))
        except Exception:  # the walk faults at an entry every page of the span shares
            out[gfn:end] = bytes([UNMAPPED]) * (end - gfn)
        else:
            if span > 1 and tr.gpa + (span << PAGE_SHIFT) > memory.size:
                for g in range(gfn, end):  # the leaf's frames run past RAM: page by page
                    out[g] = one(g)
            elif sev:
                out[gfn:end] = bytes([PRIVATE if tr.encrypted else SHARED]) * (end - gfn)
            else:
                out[gfn:end] = _by_attribute(attrs, gfn, end)
        gfn = end
    return out


def _by_attribute(attrs: Any, gfn: int, end: int) -> bytes:
    """Mapped pages without a C-bit: KVM's attribute decides, page by page."""
    private = attrs.private[gfn:min(end, attrs.guest_pages)] if attrs is not None else b""
    return bytes(PRIVATE if b == 1 else SHARED for b in private).ljust(end - gfn, bytes([SHARED]))


def _page_table(out: bytearray, gfn: int, end: int, pt_gpa: int, read_u64: Any, cpu: Any, mem_size: int,
                mask: int, reserved: int, enc_mask: int, enc_means_private: bool, sev: bool, attrs: Any) -> None:
    """The pages [gfn, end) mapped by the 4 KiB page table at `pt_gpa`: each PTE decides its
    page as walk() would at level 1 (not present or a reserved bit: #PF; a frame outside RAM:
    a nested fault; for a supervisor read nothing else can fault there), and one translate()
    through a good PTE decides the levels above, which every page of the table shares."""
    upper_ok: bool | None = None
    for g in range(gfn, end):
        entry_gpa = pt_gpa + (g & 0x1FF) * 8
        status = UNMAPPED
        if entry_gpa + 8 <= mem_size:
            try:
                entry = read_u64(entry_gpa)
            except TestbedError:
                entry = 0
            if entry & PTE_P and not entry & reserved and (entry & mask) < mem_size:
                if upper_ok is None:
                    try:
                        cpu.translate(Gva(g << PAGE_SHIFT))
                    except Exception:
                        upper_ok = False
                    else:
                        upper_ok = True
                if upper_ok:
                    if sev:
                        enc_bit = bool(entry & enc_mask) if enc_mask else False
                        encrypted = enc_bit if enc_means_private else (not enc_bit and enc_mask != 0)
                        status = PRIVATE if encrypted else SHARED
                    else:
                        status = PRIVATE if attrs is not None and attrs.is_private(g) else SHARED
        out[g] = status


def _leaf_span(read_u64: Any, cr3: int, gfn: int, mask: int, mem_size: int) -> tuple[int, int | None]:
    """(pages, None): the naturally aligned span from `gfn` whose walk reads the same entries -
    up to the end of the leaf, or of the entry where the walk stops (not present, unreadable);
    (pages, table): `gfn` is mapped by the 4 KiB page table at `table`, to the table's end."""
    va = gfn << PAGE_SHIFT
    table = cr3 & mask
    for level in (4, 3, 2, 1):
        shift = 12 + 9 * (level - 1)
        span = 1 << (shift - PAGE_SHIFT)
        rest = span - (gfn & (span - 1))
        if level == 1:
            return 512 - (gfn & 511), table  # the whole table: _page_table decides each PTE
        entry_gpa = table + ((va >> shift) & 0x1FF) * 8
        if entry_gpa + 8 > mem_size:
            return rest, None
        try:
            entry = read_u64(entry_gpa)
        except TestbedError:
            return rest, None
        if not entry & PTE_P or (level in (2, 3) and entry & PTE_PS):
            return rest, None
        table = entry & mask
    return 1, None  # pragma: no cover - level 1 always returns


def _accesses(machine: Machine, statuses: bytearray) -> list[bool]:
    """The C-bit each page is read with: its status on the SEV types, else KVM's attribute (an
    unmapped page is read by the attribute too)."""
    attrs = machine.kvm_vm.mem_attrs
    sev = bool(machine.c_bit_mask)
    out: list[bool] = []
    for gfn, st in enumerate(statuses):
        if sev and st != UNMAPPED:
            out.append(st == PRIVATE)
        else:
            out.append(attrs is not None and attrs.is_private(gfn))
    return out


def _page_bytes(machine: Machine, gfn: int, private: bool) -> bytes:
    try:
        return machine.memory.cpu_read(gfn << PAGE_SHIFT, PAGE_SIZE, private)
    except TestbedError as exc:
        return f"unreadable: {exc}".encode()


def _page_source(machine: Machine, gfn: int, private: bool) -> tuple[int, Any]:
    """Where the guest's bytes of a page come from, for cheap comparison: (DIRECT, buffer) when
    they are stored as the guest reads them (guest_memfd backings, a plain VM, a legacy frame
    read through the alias that owns it), else (CRYPT, None): a legacy frame read through the
    other alias, transcoded with the VM's key (cpu_read)."""
    memory = machine.memory
    if gfn >= memory.size >> PAGE_SHIFT:
        return CRYPT, None  # beyond RAM (hotplug capacity): cpu_read says why
    if memory.guest_memfd:
        attrs = machine.kvm_vm.mem_attrs
        if attrs is not None and attrs.is_private(gfn):
            return DIRECT, memory.private
        return DIRECT, memory.dram
    if memory.cipher is None:
        return DIRECT, memory.dram
    owned_private = memory.owner[gfn] == OWNER_PRIVATE
    if owned_private == private:
        return DIRECT, memory.private if private else memory.dram
    if not owned_private and memory.dram[gfn << PAGE_SHIFT:(gfn + 1) << PAGE_SHIFT].tobytes() == ZERO_PAGE:
        return NEVER_WRITTEN, None
    return CRYPT, None


#: _page_source: bytes stored as the guest reads them; bytes to transcode; a legacy frame
#: nothing was ever written to (DRAM-owned, all zero) read through C=1
DIRECT, CRYPT, NEVER_WRITTEN = 0, 1, 2
ZERO_PAGE = bytes(PAGE_SIZE)


def compare_machines(source: Machine, target: Machine) -> Comparison:
    """`compare(guest_view(source), guest_view(target))` without digests: the same pages lost
    and corrupted, in the same order, but for the legacy frames never written on either side
    (module docstring), which are equal here. Statuses come from one walk per leaf (page_statuses);
    pages stored as the guest reads them on both sides are compared as bytes, whole runs at
    a time, and only a run that differs is compared page by page."""
    s_status, t_status = page_statuses(source), page_statuses(target)
    if len(s_status) != len(t_status):
        raise TestbedError(f"the source has {len(s_status)} pages and the target {len(t_status)}")
    s_access, t_access = _accesses(source, s_status), _accesses(target, t_status)
    lost = corrupted = 0
    listed: list[dict[str, Any]] = []

    def mismatch(gfn: int, kind: str) -> None:
        if len(listed) < MAX_LISTED:
            listed.append({"gfn": gfn, "kind": kind, "source": _status(_private(s_status[gfn])),
                           "target": _status(_private(t_status[gfn]))})

    def differs(gfn: int) -> bool:
        return _page_bytes(source, gfn, s_access[gfn]) != _page_bytes(target, gfn, t_access[gfn])

    n = len(s_status)
    gfn = 0
    while gfn < n:
        ss, ts = s_status[gfn], t_status[gfn]
        if ss == UNMAPPED and ts == UNMAPPED:
            gfn += 1
            continue
        if ss != ts:
            lost += 1
            mismatch(gfn, "lost")
            gfn += 1
            continue
        s_kind, s_buf = _page_source(source, gfn, s_access[gfn])
        t_kind, t_buf = _page_source(target, gfn, t_access[gfn])
        if s_kind == NEVER_WRITTEN and t_kind == NEVER_WRITTEN:
            gfn += 1  # the same page: nothing was ever written to it on either side (module docstring)
            continue
        if s_kind != DIRECT or t_kind != DIRECT:
            if differs(gfn):
                corrupted += 1
                mismatch(gfn, "corrupted")
            gfn += 1
            continue
        # A run of pages with the same statuses read straight from the same two buffers.
        end = gfn + 1
        while (end < n and s_status[end] == ss and t_status[end] == ts
               and _page_source(source, end, s_access[end]) == (DIRECT, s_buf)
               and _page_source(target, end, t_access[end]) == (DIRECT, t_buf)):
            end += 1
        a, b = gfn << PAGE_SHIFT, end << PAGE_SHIFT
        if s_buf[a:b].tobytes() != t_buf[a:b].tobytes():
            for g in range(gfn, end):
                o = g << PAGE_SHIFT
                if s_buf[o:o + PAGE_SIZE].tobytes() != t_buf[o:o + PAGE_SIZE].tobytes():
                    corrupted += 1
                    mismatch(g, "corrupted")
        gfn = end
    return Comparison(n, lost, corrupted, listed)


def _private(status: int) -> bool | None:
    return None if status == UNMAPPED else status == PRIVATE


@dataclass
class Comparison:
    """The source's view at the stop against the target's after receive."""

    compared_pages: int
    lost_pages: int
    corrupted_pages: int
    #: the first MAX_LISTED mismatches: gfn, kind, source and target status
    mismatches: list[dict[str, Any]]


def _status(private: bool | None) -> str:
    return "unmapped" if private is None else ("private" if private else "shared")


def compare(source: list[PageView], target: list[PageView]) -> Comparison:
    """Count the pages lost and corrupted (module docstring)."""
    lost = corrupted = 0
    listed: list[dict[str, Any]] = []
    for gfn, (s, t) in enumerate(zip(source, target, strict=True)):
        if s == t or (s.private is None and t.private is None):
            continue  # the same, or a page the guest does not map on either side (no view)
        if s.private != t.private:
            lost += 1
            kind = "lost"
        else:
            corrupted += 1
            kind = "corrupted"
        if len(listed) < MAX_LISTED:
            listed.append({"gfn": gfn, "kind": kind, "source": _status(s.private), "target": _status(t.private)})
    return Comparison(len(source), lost, corrupted, listed)


# ------------------------------------------------------------ beyond the guest's page view
def compare_vcpus(source: Machine, target: Machine) -> list[dict[str, str]]:
    """The vCPU of each side as the hardware holds it (hw/vcpu_state.py: registers, x87/SSE,
    XCR0 - read directly, as the oracle reads pages, whatever the VMM may read) and KVM's own
    per-vCPU state (the PV MSRs, SEV-ES's GHCB-set XCR0/XSS, ...): one entry per field that
    differs, {"field", "source", "target"} (register values in hex)."""
    from testbed.kvm.migration import get_vcpu_state

    out = [{"field": name, "source": f"0x{a:x}", "target": f"0x{b:x}"}
           for name, a, b in source.cpu.save_state().differences(target.cpu.save_state())]
    s_kvm, t_kvm = get_vcpu_state(source.kvm_vcpu).kvm, get_vcpu_state(target.kvm_vcpu).kvm
    for key in sorted(set(s_kvm) | set(t_kvm)):
        if s_kvm.get(key) != t_kvm.get(key):
            out.append({"field": f"kvm.{key}", "source": repr(s_kvm.get(key)), "target": repr(t_kvm.get(key))})
    return out


@dataclass
class HostStateComparison:
    """The host-side state of each page, source at the stop against target after receive: what
    the guest's own view (`compare_machines`) cannot show until the guest acts on it."""

    #: pages whose encryption status in KVM differs: the memory attributes, or the seed-era
    #: page-encryption bitmap (a status change that never reached the target: its next
    #: access faults, or a later migration from the target exports the old status)
    status_pages: int = 0
    #: pages the VMM's tracker (its shared set: what the next export says) holds differently
    tracker_pages: int = 0
    #: SNP: pages whose RMP entry differs - Validated on any page, Assigned on a page private
    #: on both sides (a shared GFN's Assigned bit is a guest_memfd page's the guest cannot
    #: reach: converted back, it is assigned again, Validated as it was)
    rmp_pages: int = 0
    #: the first MAX_LISTED differences: gfn, kind ("status", "tracker", "rmp"), source, target
    mismatches: list[dict[str, Any]] | None = None
    #: what could not be compared, and why
    not_compared: dict[str, str] | None = None

    @property
    def total(self) -> int:
        """Pages counted in any of the three."""
        return self.status_pages + self.tracker_pages + self.rmp_pages


def compare_host_state(source: Machine, target: Machine, guest_pages: int) -> HostStateComparison:
    """KVM's status, the VMM tracker's shared set and (SNP) the RMP of every page of the first
    `guest_pages`, source against target (HostStateComparison says what each count is)."""
    result = HostStateComparison(mismatches=[], not_compared={})
    assert result.mismatches is not None and result.not_compared is not None
    listed = result.mismatches

    def note(gfn: int, kind: str, s: str, t: str) -> None:
        if len(listed) < MAX_LISTED:
            listed.append({"gfn": gfn, "kind": kind, "source": s, "target": t})

    # KVM's status: the memory attributes, or the seed-era page-encryption bitmap.
    s_attrs, t_attrs = source.kvm_vm.mem_attrs, target.kvm_vm.mem_attrs
    s_bits = t_bits = b""
    if s_attrs is not None and t_attrs is not None:
        s_bits, t_bits = bytes(s_attrs.private[:guest_pages]), bytes(t_attrs.private[:guest_pages])
        for gfn in differing_bytes(s_bits, t_bits):
            result.status_pages += 1
            note(gfn, "status", _status(s_bits[gfn] == 1), _status(t_bits[gfn] == 1))
    elif source.kvm_vm.page_enc_status_protocol:
        s_enc = _bits(source.kvm_vm.page_enc_bitmap.get(0, guest_pages), guest_pages)
        t_enc = _bits(target.kvm_vm.page_enc_bitmap.get(0, guest_pages), guest_pages)
        for gfn in differing_bytes(s_enc, t_enc):
            result.status_pages += 1
            note(gfn, "status", _status(s_enc[gfn] == 1), _status(t_enc[gfn] == 1))
    # The VMM's tracker: the shared set its next export would give.
    s_shared, why = _tracker_shared(source, guest_pages)
    t_shared, t_why = _tracker_shared(target, guest_pages)
    if s_shared is None or t_shared is None:
        result.not_compared["tracker"] = (f"the source's {why}" if s_shared is None else f"the target's {t_why}")
    else:
        for gfn in differing_bytes(s_shared, t_shared):
            result.tracker_pages += 1
            note(gfn, "tracker", _status(not s_shared[gfn]), _status(not t_shared[gfn]))
    # SNP: the RMP entries.
    s_rmp, t_rmp = source.cpu.rmp, target.cpu.rmp
    if s_rmp is not None and t_rmp is not None:
        s_ent, t_ent = s_rmp.entries(guest_pages), t_rmp.entries(guest_pages)
        for gfn in differing_bytes(s_ent, t_ent):
            s_e, t_e = s_ent[gfn], t_ent[gfn]
            both_private = bool(s_bits) and s_bits[gfn] == 1 and t_bits[gfn] == 1
            if (s_e ^ t_e) & 2 or both_private:
                result.rmp_pages += 1
                note(gfn, "rmp", _rmp_entry(s_e), _rmp_entry(t_e))
    return result


def differing_bytes(a: bytes, b: bytes) -> list[int]:
    """The indices where two equal-length byte strings differ: one comparison when they are
    equal, else an XOR of the two as integers scanned for non-zero bytes (no Python loop over
    every page of a large guest)."""
    if a == b:
        return []
    if len(a) != len(b):
        raise TestbedError(f"comparing {len(a)} bytes with {len(b)}")
    xor = (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")
    return [m.start() for m in _NONZERO.finditer(xor)]


_NONZERO = re.compile(b"[^\x00]")


def _bits(raw: bytes, n: int) -> bytes:
    """A little-endian bitmap as one byte (0/1) per bit, the first `n`."""
    from bitarray import bitarray

    bits = bitarray(endian="little")
    bits.frombytes(raw)
    return bits[:n].unpack()


def _tracker_shared(machine: Machine, guest_pages: int) -> tuple[bytes | None, str]:
    """The VMM's shared set (vmm.shared_source: its tracker, or KVM's bitmap read into one) as
    one byte per page, 1 = shared; (None, why) when it is not the guest's set (poisoned)."""
    from bitarray import bitarray

    from testbed.tracker.donated import DonatedTracker

    shared_source = machine.vmm.shared_source
    if isinstance(shared_source, DonatedTracker):
        shared_source.read_now()
    ranges = shared_source.shared_ranges()
    if shared_source.poisoned:
        reason = getattr(shared_source, "reason", None)
        return None, "tracker is poisoned" + (f" ({reason})" if reason else "") + ": its shared set is not the guest's"
    bits = bitarray(guest_pages, endian="little")
    bits.setall(0)
    for gfn, n in ranges:
        bits[gfn:min(gfn + n, guest_pages)] = 1
    return bits.unpack(), ""


def _rmp_entry(entry: int) -> str:
    return ("assigned" if entry & 1 else "unassigned") + (", validated" if entry & 2 else "")
