"""The VMM's MSRs: what userspace answers for the MSRs it asked KVM to exit on.

The VMM installs an MSR filter (KVM_X86_SET_MSR_FILTER) and enables KVM_CAP_X86_USER_SPACE_MSR
for KVM_MSR_EXIT_REASON_FILTER, so KVM hands it every access to a filtered MSR as
KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR; it answers in `data` and sets `error` for #GP.
The one MSR it handles is MSR_KVM_MIGRATION_CONTROL, which KVM never emulates:
Documentation/virt/kvm/x86/hypercalls.rst requires userspace that advertises
KVM_FEATURE_MIGRATION_CONTROL to handle it through a filter. Only KVM_MIGRATION_READY (bit 0)
is defined; a write of any other bit fails (#GP), as does any other MSR that reaches it.
"""

from __future__ import annotations

from testbed.kvm.msr import KVM_MIGRATION_READY, MSR_KVM_MIGRATION_CONTROL, MsrFilter
from testbed.kvm.uapi import MsrExit, RdmsrExit


class MsrHandler:
    """Userspace's MSR state: the migration-control register the guest writes when ready."""

    def __init__(self, encrypted_memory: bool = True) -> None:
        #: Documentation/virt/kvm/x86/msr.rst: "When a guest is started, bit 0 will be 0 if the
        #: guest has encrypted memory and 1 if the guest does not have encrypted memory" (the
        #: testbed counts every VM type whose private memory the host cannot read)
        self.migration_control = 0 if encrypted_memory else KVM_MIGRATION_READY

    @staticmethod
    def msr_filter() -> MsrFilter:
        """The filter the VMM installs: every access to MSR_KVM_MIGRATION_CONTROL exits."""
        return MsrFilter.deny(MSR_KVM_MIGRATION_CONTROL)

    def handle(self, run: MsrExit) -> None:
        """Answer one MSR exit in place (run.data for a read, run.error for #GP)."""
        if run.index != MSR_KVM_MIGRATION_CONTROL:
            run.error = 1
            return
        if isinstance(run, RdmsrExit):
            run.data = self.migration_control
        elif run.data & ~KVM_MIGRATION_READY:
            run.error = 1
        else:
            self.migration_control = run.data

    @property
    def migration_ready(self) -> bool:
        """The guest declared itself ready for live migration (KVM_MIGRATION_READY)."""
        return bool(self.migration_control & KVM_MIGRATION_READY)
