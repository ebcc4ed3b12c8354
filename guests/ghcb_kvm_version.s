# ghcb_kvm_version.s - GHCB requests whose answer depends on the KVM modelled (--kvm-version), and
# the VMGEXITs that make KVM_RUN itself fail. arch/x86/kvm/svm/sev.c, sev_handle_vmgexit():
#
#   SCENARIO 0  SNP: VMGEXIT with the GHCB MSR at a shared page that is not the registered GHCB.
#               kvm-x86: answered in that page, 2 / 1 (GHCB_ERR_NOT_REGISTERED), the guest runs on
#               and reports both values; 7.1: KVM_RUN fails with EINVAL (outcome kvm_run_error).
#   SCENARIO 1  SEV-ES: the SNP-only exit code CODE (default PSC) -> kvm-x86 2 / 6 (INVALID_EVENT),
#               7.1 2 / 4 (MISSING_INPUT).
#   SCENARIO 2  SNP: GUEST_REQUEST with a misaligned request GPA -> kvm-x86 2 / 5 (INVALID_INPUT),
#               7.1 2 / 4 (MISSING_INPUT).
#   SCENARIO 3  SNP: AP_CREATION with SW_EXITINFO1 = INFO1 (default: APIC ID 5, which the one-vCPU
#               VM does not have) -> 2 / 5 (INVALID_INPUT) in both; the guest runs on.
#   SCENARIO 4  AP reset hold through the GHCB MSR protocol -> user exit KVM_EXIT_AP_RESET_HOLD.
#   SCENARIO 5  AP reset hold as the AP_HLT_LOOP NAE event -> KVM_EXIT_AP_RESET_HOLD.
#   SCENARIO 6  UNSUPPORTED_EVENT -> the handler returns -EINVAL: KVM_RUN fails (kvm_run_error, 22).
#   SCENARIO 7  string I/O with a count above INT_MAX -> sev_es_string_io() returns -EINVAL.
.ifndef SCENARIO
.equ SCENARIO, 0
.endif
.ifndef CODE
.equ CODE, SVM_VMGEXIT_PSC
.endif
.ifndef INFO1
.equ INFO1, (5 << 32) | 1
.endif

.equ SVM_VMGEXIT_GUEST_REQUEST, 0x80000011
.equ SVM_VMGEXIT_AP_CREATION, 0x80000013
.equ SVM_VMGEXIT_AP_HLT_LOOP, 0x80000004
.equ SVM_VMGEXIT_UNSUPPORTED_EVENT, 0x8000ffff
.equ GHCB_MSR_AP_RESET_HOLD_REQ, 0x006

# Report SW_EXITINFO1/2 of the GHCB at rax; both are read before the first GUEST_SYNC, whose
# ucall reuses the runtime's GHCB.
report:
    mov r12, qword ptr [rax + GHCB_SW_EXITINFO1]
    mov r13, qword ptr [rax + GHCB_SW_EXITINFO2]
    GUEST_SYNC r12
    GUEST_SYNC r13
    ret

guest_main:
    call rt_ghcb_clear
.if SCENARIO == 0
    mov rax, UCALL_GPA                     # shared, but not the GHCB the guest registered
    mov qword ptr [rax + GHCB_SW_EXITINFO1], 0x600d
    mov qword ptr [rax + GHCB_SW_EXITINFO2], 0x600d
    mov ecx, MSR_AMD64_SEV_ES_GHCB
    mov eax, UCALL_GPA
    xor edx, edx
    wrmsr
    rep vmmcall
    mov rax, UCALL_GPA
    call report
    ret
.endif
.if SCENARIO == 1
    mov rsi, RT_GHCB + GHCB_SHARED_BUF
    GHCB_SET GHCB_SW_SCRATCH, rsi
    GHCB_SET GHCB_RAX, 1
    mov rdi, CODE
    mov esi, 2
    xor edx, edx
    call rt_ghcb_exit
.endif
.if SCENARIO == 2
    mov rdi, SVM_VMGEXIT_GUEST_REQUEST
    mov rsi, GUEST_FREE_GPA + 8
    mov rdx, GUEST_FREE_GPA + 0x1000
    call rt_ghcb_exit
.endif
.if SCENARIO == 3
    GHCB_SET GHCB_RAX, 1                   # SVM_SEV_FEAT_SNP_ACTIVE, as KVM wants it
    mov rdi, SVM_VMGEXIT_AP_CREATION
    mov rsi, INFO1
    mov rdx, GUEST_FREE_GPA + 0x1000       # a 4K-aligned, not 2M-aligned VMSA page
    call rt_ghcb_exit
.endif
.if SCENARIO == 4
    mov rdi, GHCB_MSR_AP_RESET_HOLD_REQ
    call rt_ghcb_msr_call
    GUEST_SYNC 0xbad                       # not reached: nothing sends the SIPI
    ret
.endif
.if SCENARIO == 5
    mov rdi, SVM_VMGEXIT_AP_HLT_LOOP
    xor esi, esi
    xor edx, edx
    call rt_ghcb_exit
    GUEST_SYNC 0xbad
    ret
.endif
.if SCENARIO == 6
    mov rdi, SVM_VMGEXIT_UNSUPPORTED_EVENT
    mov esi, 0x41
    xor edx, edx
    call rt_ghcb_exit
    GUEST_SYNC 0xbad
    ret
.endif
.if SCENARIO == 7
    mov rsi, RT_GHCB + GHCB_SHARED_BUF
    GHCB_SET GHCB_SW_SCRATCH, rsi
    mov rdi, SVM_EXIT_IOIO
    mov esi, (0x80 << 16) | (1 << 4) | (1 << 2)   # port 0x80, 8-bit, string, OUT
    mov rdx, 0x80000000                    # count > INT_MAX
    call rt_ghcb_exit
    GUEST_SYNC 0xbad
    ret
.endif
    mov rax, RT_GHCB
    call report
    ret
