# hypercall_abi_gprs.s - a hypercall clobbers RAX only.
#
# Scenario (host half: tests/test_hypercall_abi.py):
#   1. load every GPR but RAX and RSP with a distinct pattern (upper halves included);
#   2. make hypercall HC_NR with the native instruction;
#   3. GUEST_ASSERT_EQ each register against its pattern: hypercalls.rst says the return value
#      is in RAX and no other register is clobbered; then sync RAX for the host.
# The patterns fit a sign-extended imm32, so GUEST_ASSERT_EQ can compare against immediates.

.ifndef HC_NR
.equ HC_NR, KVM_HC_VAPIC_POLL_IRQ
.endif

guest_main:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov rbx, 0x11111111
    mov rcx, 0xFFFFFFFFA2222222
    mov rdx, 0x33333333
    mov rsi, 0xFFFFFFFFC4444444
    mov rdi, 0x55555555
    mov rbp, 0xFFFFFFFFE6666666
    mov r8, 0x08080808
    mov r9, 0xFFFFFFFF89898989
    mov r10, 0x10101010
    mov r11, 0xFFFFFFFF91111111
    mov r12, 0x12121212
    mov r13, 0xFFFFFFFF93131313
    mov r14, 0x14141414
    mov r15, 0xFFFFFFFF95151515
    mov rax, HC_NR
    KVM_HYPERCALL
    GUEST_ASSERT_EQ rbx, 0x11111111
    GUEST_ASSERT_EQ rcx, -0x5DDDDDDE
    GUEST_ASSERT_EQ rdx, 0x33333333
    GUEST_ASSERT_EQ rsi, -0x3BBBBBBC
    GUEST_ASSERT_EQ rdi, 0x55555555
    GUEST_ASSERT_EQ rbp, -0x1999999A
    GUEST_ASSERT_EQ r8, 0x08080808
    GUEST_ASSERT_EQ r9, -0x76767677
    GUEST_ASSERT_EQ r10, 0x10101010
    GUEST_ASSERT_EQ r11, -0x6EEEEEEF
    GUEST_ASSERT_EQ r12, 0x12121212
    GUEST_ASSERT_EQ r13, -0x6CECECED
    GUEST_ASSERT_EQ r14, 0x14141414
    GUEST_ASSERT_EQ r15, -0x6AEAEAEB
    GUEST_SYNC rax
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
