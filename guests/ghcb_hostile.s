# ghcb_hostile.s - malformed GHCB requests from an SEV-ES/SNP guest, answered as KVM answers.
#
# SCENARIO selects the request; the guest then reports SW_EXITINFO1 and SW_EXITINFO2 with two
# GUEST_SYNCs (arch/x86/kvm/svm/sev.c: sev_es_validate_vmgexit, setup_vmgexit_scratch,
# snp_begin_psc):
#   0  GHCB usage field != 0                     -> 2 (malformed input), 2 (INVALID_USAGE)
#   1  CPUID exit without RAX/RCX valid          -> 2, 4 (MISSING_INPUT)
#   2  unknown exit code 0x7777                  -> 2, 6 (INVALID_EVENT)
#   3  PSC with end_entry >= 253 (SNP)           -> 0, 0x100000001 (INVALID_HDR)
#   4  PSC 2M entry with a misaligned GFN (SNP)  -> 0, 0x100000002 (INVALID_ENTRY)
#   5  PSC with cur_entry > end_entry (SNP)      -> 0, 0 (nothing left to do)
#   6  PSC scratch outside the shared buffer     -> 2, 3 (INVALID_SCRATCH_AREA)
#   7  GHCB MSR pointing outside guest memory    -> KVM cannot map it and resumes the guest;
#                                                   the guest reports 0x600d, 0x600d
#   8  GHCB MSR pointing at a private page       -> SNP: not the registered GHCB: answered
#                                                   NOT_REGISTERED in the page KVM maps, the guest
#                                                   runs on (7.1: KVM_RUN fails, -EINVAL);
#                                                   SEV-ES: KVM reads ciphertext, answers into
#                                                   it; the guest survives and reports 0x8888
#   9  SNP: a shared page that is not the        -> answered 2/1 (GHCB_ERR_NOT_REGISTERED) in
#      registered GHCB used as GHCB                 that page, the guest runs on and reports
#                                                   0xbad (7.1: KVM_RUN fails with -EINVAL)
#  10  PSC to private of a GFN beyond guest RAM  -> forwarded by KVM, refused by the VMM:
#                                                   0, 0x10000000000 (VMGEXIT_PSC_ERROR_GENERIC)
.ifndef SCENARIO
.equ SCENARIO, 0
.endif

# Both values are read before the first GUEST_SYNC, whose ucall reuses the GHCB.
report:
    mov rax, RT_GHCB
    mov r12, qword ptr [rax + GHCB_SW_EXITINFO1]
    mov r13, qword ptr [rax + GHCB_SW_EXITINFO2]
    GUEST_SYNC r12
    GUEST_SYNC r13
    ret

# rbx = end_entry, rcx = entry, rdx = cur_entry: a one-entry PSC request in the shared buffer
psc_request:
    mov rsi, RT_GHCB + GHCB_SHARED_BUF
    mov word ptr [rsi], dx
    mov word ptr [rsi + 2], bx
    mov dword ptr [rsi + 4], 0
    mov qword ptr [rsi + 8], rcx
    GHCB_SET GHCB_SW_SCRATCH, rsi
    mov rdi, SVM_VMGEXIT_PSC
    xor esi, esi
    xor edx, edx
    call rt_ghcb_exit
    ret

guest_main:
    call rt_ghcb_clear
.if SCENARIO == 0
    mov rax, RT_GHCB
    mov dword ptr [rax + GHCB_USAGE], 1
    mov rdi, SVM_EXIT_CPUID
    xor esi, esi
    xor edx, edx
    call rt_ghcb_exit
.endif
.if SCENARIO == 1
    mov rdi, SVM_EXIT_CPUID
    xor esi, esi
    xor edx, edx
    call rt_ghcb_exit
.endif
.if SCENARIO == 2
    mov rdi, 0x7777
    xor esi, esi
    xor edx, edx
    call rt_ghcb_exit
.endif
.if SCENARIO == 3
    mov rbx, 253
    mov rcx, GUEST_FREE_GPA | (2 << 52)
    xor edx, edx
    call psc_request
.endif
.if SCENARIO == 4
    mov rbx, 0
    mov rcx, GUEST_FREE_GPA + 0x1000
    mov rax, 2 << 52
    or rcx, rax
    mov rax, 1 << 56
    or rcx, rax
    xor edx, edx
    call psc_request
.endif
.if SCENARIO == 5
    mov rbx, 0
    mov rcx, GUEST_FREE_GPA | (2 << 52)
    mov rdx, 1
    call psc_request
.endif
.if SCENARIO == 6
    mov rsi, RT_GHCB + 0x100
    GHCB_SET GHCB_SW_SCRATCH, rsi
    mov rdi, SVM_VMGEXIT_PSC
    xor esi, esi
    xor edx, edx
    call rt_ghcb_exit
.endif
.if SCENARIO == 7
    mov rax, RT_GHCB
    mov qword ptr [rax + GHCB_SW_EXITINFO1], 0x600d
    mov qword ptr [rax + GHCB_SW_EXITINFO2], 0x600d
    mov ecx, MSR_AMD64_SEV_ES_GHCB
    mov rax, GUEST_MEM_SIZE
    add rax, 0x10000
    mov rdx, rax
    shr rdx, 32
    wrmsr
    rep vmmcall
.endif
.if SCENARIO == 9
    mov ecx, MSR_AMD64_SEV_ES_GHCB
    mov eax, UCALL_GPA                     # shared, but not the GHCB the guest registered
    xor edx, edx
    wrmsr
    rep vmmcall
    GUEST_SYNC 0xbad
    ret
.endif
.if SCENARIO == 10
    mov rbx, 0
    mov rcx, GUEST_MEM_SIZE + 0x100000
    mov rax, 1 << 52                       # SNP_PAGE_STATE_PRIVATE (to shared, no RAM: QEMU says yes)
    or rcx, rax
    xor edx, edx
    call psc_request
.endif
.if SCENARIO == 8
    mov rdi, GUEST_FREE_GPA
    mov qword ptr [rdi], 0                 # the private page exists and holds our data
    mov ecx, MSR_AMD64_SEV_ES_GHCB
    mov eax, GUEST_FREE_GPA
    xor edx, edx
    wrmsr
    rep vmmcall
    GUEST_SYNC 0x8888
    ret
.endif
    call report
    ret
