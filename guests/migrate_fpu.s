# migrate_fpu.s - x87/SSE state and XCR0 that must survive a live migration
# (`testbed migrate guests/migrate_fpu.s`; tests/test_migrate.py).
#
# The guest enables SSE and XSAVE (CR0.EM clear, CR0.MP, CR4.OSFXSR/OSXMMEXCPT/OSXSAVE), sets
# XCR0 to x87 only (XSETBV 1), leaves a value in every XMM register, a non-default MXCSR and
# FCW, and two values on the x87 stack (TOP moves to 6); then it runs ITERS iterations of
# GUEST_SYNC (the host migrates it meanwhile) and checks on the target that all of it is still
# there. QEMU moves this state with KVM_GET/SET_XSAVE and KVM_GET/SET_XCRS; an SEV-ES/SNP guest's
# is in its VMSA (arch/x86/kvm/svm/sev.c sev_es_sync_vmsa).

.ifndef ITERS
.equ ITERS, 24
.endif
.equ XMM_TAG, 0x5EC0000000000000
.equ MXCSR_SET, 0x7F80                 # the default 0x1F80 with FTZ and RC = round down
.equ FCW_SET, 0x027F                   # precision 53 bits (the default 0x037F: 64)

.macro XMM_SET n
    mov rax, XMM_TAG + \n
    movq xmm\n, rax
.endm
.macro XMM_CHECK n                     # r13 |= xmm\n ^ (XMM_TAG + \n)
    movq rax, xmm\n
    mov rbx, XMM_TAG + \n
    xor rax, rbx
    or r13, rax
.endm

guest_main:
    mov rax, cr0
    and rax, ~4                        # EM
    or rax, 2                          # MP
    mov cr0, rax
    mov rax, cr4
    or rax, 0x40600                    # OSFXSR, OSXMMEXCPT, OSXSAVE
    mov cr4, rax
    xor ecx, ecx
    xor edx, edx
    mov eax, 1                         # XCR0 = x87 only
    xsetbv
    XMM_SET 0
    XMM_SET 1
    XMM_SET 2
    XMM_SET 3
    XMM_SET 4
    XMM_SET 5
    XMM_SET 6
    XMM_SET 7
    XMM_SET 8
    XMM_SET 9
    XMM_SET 10
    XMM_SET 11
    XMM_SET 12
    XMM_SET 13
    XMM_SET 14
    XMM_SET 15
    sub rsp, 16
    mov dword ptr [rsp], MXCSR_SET
    ldmxcsr [rsp]
    mov word ptr [rsp], FCW_SET
    fldcw [rsp]
    fld1                               # ST(1) = 1.0
    fldpi                              # ST(0) = pi, TOP = 6
    add rsp, 16
    xor r12, r12
mf_loop:
    GUEST_SYNC r12
    inc r12
    cmp r12, ITERS
    jb mf_loop
    # on the target
    xor r13, r13
    XMM_CHECK 0
    XMM_CHECK 1
    XMM_CHECK 2
    XMM_CHECK 3
    XMM_CHECK 4
    XMM_CHECK 5
    XMM_CHECK 6
    XMM_CHECK 7
    XMM_CHECK 8
    XMM_CHECK 9
    XMM_CHECK 10
    XMM_CHECK 11
    XMM_CHECK 12
    XMM_CHECK 13
    XMM_CHECK 14
    XMM_CHECK 15
    GUEST_ASSERT_EQ r13, 0             # every XMM register as it was set
    xor ecx, ecx
    xgetbv
    GUEST_ASSERT_EQ rax, 1
    sub rsp, 16
    stmxcsr [rsp]
    mov eax, dword ptr [rsp]
    GUEST_ASSERT_EQ rax, MXCSR_SET
    fnstcw [rsp]
    movzx eax, word ptr [rsp]
    GUEST_ASSERT_EQ rax, FCW_SET
    fnstsw ax
    shr eax, 11
    and eax, 7
    GUEST_ASSERT_EQ rax, 6             # TOP: two values pushed
    fstp qword ptr [rsp]               # pi
    mov rax, qword ptr [rsp]
    mov rbx, 0x400921FB54442D18        # pi as a double, rounded down (RC = down, 53 bits)
    GUEST_ASSERT_EQ rax, rbx
    fstp qword ptr [rsp]               # 1.0
    mov rax, qword ptr [rsp]
    mov rbx, 0x3FF0000000000000
    GUEST_ASSERT_EQ rax, rbx
    add rsp, 16
    GUEST_DONE
