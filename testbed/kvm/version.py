"""Which KVM the kvm layer models: the reference tree, and older releases kept selectable.

The kvm layer models the newest kvm-x86 tree that could be read (REFERENCE). Where a modelled
behaviour differs between that tree and the newest released kernel, the released behaviour
stays selectable with `--kvm-version` / `VmOptions(kvm_version=...)`; each difference is listed
in `DIFFERENCES` with the commit that made it (and in the README's deviation list).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class KvmVersion(str, Enum):
    """A modelled KVM: the reference tree or an older release (named after the release)."""

    #: kvm-x86/linux as read in 2026 (sev.c @1a27afa0, x86.c/emulate.c @042007c2, svm.c @0149b498,
    #: lapic.c @16182708): holds the May-2026 SEV fix series.
    KVM_X86 = "kvm-x86"
    #: the newest released kernel read (gregkh/linux @00b9744a), before that series.
    RELEASED = "6.18"

    @classmethod
    def parse(cls, text: str | KvmVersion) -> KvmVersion:
        """The CLI's spelling (or the enum) -> the enum; anything else is a ValueError naming it."""
        if isinstance(text, KvmVersion):
            return text
        for member in cls:
            if text == member.value:
                return member
        raise ValueError(f"unknown KVM version {text!r}: expected one of {', '.join(m.value for m in cls)}")


REFERENCE = KvmVersion.KVM_X86


@dataclass(frozen=True)
class Difference:
    """One behaviour that differs between the reference tree and an older release."""

    behaviour: str
    reference: str
    older: str
    commit: str
    source: str


#: Every modelled difference (filled as each behaviour is made selectable).
DIFFERENCES: tuple[Difference, ...] = ()
