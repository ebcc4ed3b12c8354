"""Which KVM the kvm layer models: the reference tree, and the older release kept selectable.

The kvm layer models the newest kvm-x86 tree that could be read (REFERENCE): kvm-x86/linux with
arch/x86/kvm/svm/sev.c @1a27afa0511e, x86.c/emulate.c @042007c2, svm.c @0149b498 and lapic.c
@16182708 (../shared/ABI.md section 10). It holds the May-2026 SEV fix series that went into
mainline for 7.2 (posted by Paolo Bonzini as "[PATCH nn/24] KVM: SEV: ...", applied to kvm.git
sev-for-7.2 / kvm-ghcb-for-7.2) and "KVM: SEV: Restrict userspace return codes for
KVM_HC_MAP_GPA_RANGE" with its TDX twin 3e2dec1ede0a "KVM: TDX: Allow userspace to return
errors to guest for MAPGPA" (one series, v4 of 2026-03-05; both in kvm.git's 7.2 batch, neither
in 7.1); arch/x86/kvm/vmx/tdx.c was read at kvm-x86/linux @09c6f74e, whose
tdx_complete_vmcall_map_gpa() has it.

The older behaviour is that of Linux 7.1, the newest release. The older copy of sev.c that was
read, gregkh/linux @00b9744a3688, is the commit "KVM: SEV: Add an anonymous "psc" struct to track
current PSC metadata", which reached mainline with v7.1-rc7 (kernel.org push logs of 2026-06-04
linux-next and 2026-06-11 netdev/net, the latter creating the v7.1-rc7 tag); the 7.2 merge
window (torvalds/linux master, 2026-06-19) brought the series above, so 7.1 has none of it. Two
commits that followed 00b9744a in the same v7.1-rc7 batch are in 7.1 and so are not
differences: ce6ea7b33e00 "KVM: SEV: Read start/end indices of PSC requests exactly once per
#VMGEXIT" (modelled for both versions) and the GHCB unmap fixes, which change nothing a
single-vCPU guest can observe.

Where a modelled behaviour differs between the tree and 7.1, the 7.1 behaviour is selectable with
`testbed run --kvm-version 7.1` / `VmOptions(kvm_version="7.1")`; `DIFFERENCES` lists each with
the commit that made it (commit IDs as in mainline/linux-next), and the README repeats the list.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from testbed.errors import UsageError


class KvmVersion(StrEnum):
    """A modelled KVM: the reference tree or an older release (named after the release)."""

    #: kvm-x86/linux as read in 2026 (sev.c @1a27afa0, x86.c/emulate.c @042007c2, svm.c @0149b498,
    #: lapic.c @16182708): holds the May-2026 SEV fix series.
    KVM_X86 = "kvm-x86"
    #: Linux 7.1, the newest release: sev.c as in gregkh/linux @00b9744a plus ce6ea7b33e00 (both
    #: in v7.1-rc7), i.e. before the 7.2 SEV fix series.
    RELEASED = "7.1"

    @classmethod
    def parse(cls, text: str | KvmVersion) -> KvmVersion:
        """The CLI's spelling (or the enum) -> the enum; anything else is a UsageError naming it."""
        if isinstance(text, KvmVersion):
            return text
        for member in cls:
            if text == member.value:
                return member
        raise UsageError(f"unknown KVM version {text!r}: expected one of {', '.join(m.value for m in cls)}")

    @property
    def is_reference(self) -> bool:
        """The newest tree (every fix in DIFFERENCES applied)."""
        return self is KvmVersion.KVM_X86


REFERENCE = KvmVersion.KVM_X86


@dataclass(frozen=True)
class Difference:
    """One behaviour that differs between the reference tree and an older release."""

    behaviour: str
    reference: str
    older: str
    commit: str
    source: str


#: Every modelled difference between the reference tree and 7.1.
DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        behaviour="SNP: full-GHCB #VMGEXIT from a GPA that is not the registered GHCB",
        reference="answered as bad input: SW_EXITINFO1 = 2, SW_EXITINFO2 = 1 (GHCB_ERR_NOT_REGISTERED); "
                  "the guest runs on",
        older="the handler returns -EINVAL: KVM_RUN fails (outcome kvm_run_error, errno 22)",
        commit="1797e00bf802 KVM: SEV: Don't terminate SNP VMs on #VMGEXIT without a registered GHCB",
        source="arch/x86/kvm/svm/sev.c sev_handle_vmgexit (ghcb_gpa_is_registered)",
    ),
    Difference(
        behaviour="SNP-only exit codes (PSC, AP_CREATION, GUEST_REQUEST, EXT_GUEST_REQUEST) from an SEV-ES guest",
        reference="INVALID_EVENT (2, 6), checked before the required-field check",
        older="MISSING_INPUT (2, 4) from sev_es_validate_vmgexit()",
        commit="95d8c59cdf6d KVM: SEV: Return INVALID_EVENT for SNP-only #VMGEXIT from non-SNP guest",
        source="arch/x86/kvm/svm/sev.c is_snp_only_vmgexit, sev_handle_vmgexit",
    ),
    Difference(
        behaviour="SNP (EXT_)GUEST_REQUEST whose request/response GPAs are misaligned or equal",
        reference="INVALID_INPUT (2, 5)",
        older="MISSING_INPUT (2, 4)",
        commit="5eb5d5d123a8 KVM: SEV: Return INVALID_INPUT, not MISSING_INPUT, for bad GUEST_REQUEST input(s)",
        source="arch/x86/kvm/svm/sev.c sev_handle_vmgexit (SVM_VMGEXIT_GUEST_REQUEST case)",
    ),
    Difference(
        behaviour="PSC completion (GHCB and MSR protocol): the value userspace leaves in hypercall.ret",
        reference="only 0, EINVAL or EAGAIN (positive) are accepted; anything else makes KVM_RUN fail "
                  "with -EINVAL (kvm_is_valid_map_gpa_range_ret)",
        older="any non-zero value is an error answered to the guest (VMGEXIT_PSC_ERROR_GENERIC, "
              "GHCB_MSR_PSC_RESP_ERROR)",
        commit="5d40e5b49442 KVM: SEV: Restrict userspace return codes for KVM_HC_MAP_GPA_RANGE",
        source="arch/x86/kvm/svm/sev.c snp_complete_one_psc, snp_complete_psc_msr; x86.h",
    ),
    Difference(
        behaviour="TDX MapGPA completion: the value userspace leaves in hypercall.ret",
        reference="0 goes on; EAGAIN is RETRY and EINVAL INVALID_OPERAND, R11 = the chunk's GPA; anything "
                  "else makes KVM_RUN fail with -EINVAL (kvm_is_valid_map_gpa_range_ret)",
        older="any non-zero value is INVALID_OPERAND, R11 = the chunk's GPA",
        commit="3e2dec1ede0a KVM: TDX: Allow userspace to return errors to guest for MAPGPA",
        source="arch/x86/kvm/vmx/tdx.c tdx_complete_vmcall_map_gpa; x86.h",
    ),
)
