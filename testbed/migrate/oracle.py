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
`compare_machines` counts it equal. A page written on only one side is compared byte for byte
like any other. `guest_view` / `compare` (digests of the bytes as read) keep the garbage.
"""

from __future__ import annotations

import hashlib
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
