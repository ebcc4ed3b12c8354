# sev_terminate.s - an SEV-ES/SNP guest that ends by asking the hypervisor to terminate it.
#
# The pattern of tools/testing/selftests/kvm/x86/sev_smoke_test.c: write GHCB_MSR_TERM_REQ
# (reason set SET, reason code CODE) to the GHCB MSR and VMGEXIT. KVM answers with
# KVM_EXIT_SYSTEM_EVENT / KVM_SYSTEM_EVENT_SEV_TERM carrying the raw MSR value.
.ifndef SET
.equ SET, 0
.endif
.ifndef CODE
.equ CODE, 0
.endif

guest_main:
    GUEST_TERMINATE SET, CODE
    GUEST_SYNC 0xbad                   # never reached: the VM is gone
    ret
