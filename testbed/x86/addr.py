"""Guest address kinds that cannot be mixed: physical, virtual, and frame numbers.

`typing.NewType`s cost nothing at run time (each is the int it wraps) but mypy rejects a
`Gva` where a `Gpa` is expected, or a byte address where a frame number is, which is the
mix-up that turns into a silent wrong-page access. Convert explicitly: `gpa_to_gfn`,
`gfn_to_gpa`; a guest-virtual address becomes physical only through a page walk.
"""

from __future__ import annotations

from typing import NewType

from testbed.x86 import PAGE_SHIFT

#: A guest-physical address (what stage 2 / the NPT maps, what KVM's gpa_t is).
Gpa = NewType("Gpa", int)
#: A guest-virtual (linear) address (what the guest's own page tables map; KVM's gva_t).
Gva = NewType("Gva", int)
#: A guest frame number: a Gpa shifted right by PAGE_SHIFT (KVM's gfn_t).
Gfn = NewType("Gfn", int)


def gpa_to_gfn(gpa: Gpa) -> Gfn:
    """The frame holding `gpa` (gpa_to_gfn() in KVM)."""
    return Gfn(gpa >> PAGE_SHIFT)


def gfn_to_gpa(gfn: Gfn) -> Gpa:
    """The first byte of frame `gfn` (gfn_to_gpa() in KVM)."""
    return Gpa(gfn << PAGE_SHIFT)
