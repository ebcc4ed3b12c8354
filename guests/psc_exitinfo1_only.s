# psc_exitinfo1_only.s - a buggy SNP guest: it checks SW_EXITINFO1 after a Page State Change
# but not SW_EXITINFO2, where KVM reports a failed request (snp_complete_psc: EXITINFO1 stays
# 0 and EXITINFO2 = VMGEXIT_PSC_ERROR_GENERIC). A bug pattern found in a real paravisor's
# GHCB code. Run with the VMM refusing the conversion of PAGE (--refuse-conversion).
#
#   OP=2 (shared):  PSC to shared "succeeds", the guest drops the C-bit and touches the page
#                   with C=0 -> the host still holds it private -> KVM_EXIT_MEMORY_FAULT
#   OP=1 (private): the page is first made shared properly, then a PSC back to private
#                   "succeeds" and the guest PVALIDATEs it -> the page is not assigned ->
#                   KVM_EXIT_MEMORY_FAULT
# The correct runtime routine (set_memory_shared) reports the same refusal as -EINVAL.
.ifndef OP
.equ OP, 2
.endif
.equ PAGE, GUEST_FREE_GPA

# rdi = gpa, rsi = op: one-entry PSC; returns EXITINFO1 in rax, EXITINFO2 in rdx
buggy_psc:
    push rbx
    push rdi
    push rsi
    call rt_ghcb_clear
    mov rbx, RT_GHCB + GHCB_SHARED_BUF
    mov word ptr [rbx], 0
    mov word ptr [rbx + 2], 0
    mov dword ptr [rbx + 4], 0
    shl rsi, 52
    or rdi, rsi
    mov qword ptr [rbx + 8], rdi
    GHCB_SET GHCB_SW_SCRATCH, rbx
    mov rdi, SVM_VMGEXIT_PSC
    xor esi, esi
    xor edx, edx
    call rt_ghcb_exit
    mov rdx, RT_GHCB
    mov rdx, qword ptr [rdx + GHCB_SW_EXITINFO2]
    pop rsi
    pop rdi
    pop rbx
    ret

guest_main:
.if OP == 2
    # rescind, then the buggy PSC to shared
    mov rax, PAGE
    xor ecx, ecx
    xor edx, edx
    .byte 0xf2, 0x0f, 0x01, 0xff       # pvalidate (rescind)
    mov rdi, PAGE
    mov rsi, 2
    call buggy_psc
    GUEST_SYNC rdx                     # what the guest should have looked at
    GUEST_ASSERT_EQ rax, 0             # EXITINFO1 says "no error": the bug proceeds
    # drop the C-bit in our PTE and touch the page through C=0
    mov rdi, PAGE
    call rt_pte_address
    mov rcx, RT_DATA
    mov rcx, qword ptr [rcx + 0x800]
    not rcx
    and qword ptr [rax], rcx
    mov rdi, PAGE
    invlpg [rdi]
    mov qword ptr [rdi], 0x1234        # caught here
.else
    mov rdi, PAGE
    mov rsi, 1
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
    mov rdi, PAGE
    mov rsi, 1
    call buggy_psc
    GUEST_SYNC rdx
    GUEST_ASSERT_EQ rax, 0
    mov rax, PAGE
    xor ecx, ecx
    mov edx, 1
    .byte 0xf2, 0x0f, 0x01, 0xff       # pvalidate: caught here
.endif
    GUEST_SYNC 0xbad                   # never reached
    ret
