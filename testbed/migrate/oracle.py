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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from testbed.errors import TestbedError
from testbed.x86 import PAGE_SIZE
from testbed.x86.addr import Gva

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
    """The guest's view of every page of `machine` (between runs)."""
    cpu = machine.cpu
    memory = machine.memory
    attrs = machine.kvm_vm.mem_attrs
    sev = bool(machine.c_bit_mask)
    views: list[PageView] = []
    for gfn in range(memory.nframes):
        gpa = gfn * PAGE_SIZE
        attr_private = attrs is not None and attrs.is_private(gfn)
        private: bool | None
        try:
            tr = cpu.translate(Gva(gpa))
        except Exception:  # not mapped by the guest (or the walk left RAM): read by the attribute
            private, access = None, attr_private
        else:
            private = tr.encrypted if sev else attr_private
            access = tr.encrypted if sev else attr_private
        try:
            data = memory.cpu_read(gpa, PAGE_SIZE, access)
        except TestbedError as exc:
            data = f"unreadable: {exc}".encode()
        views.append(PageView(private, hashlib.blake2b(data, digest_size=16).digest()))
    return views


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
