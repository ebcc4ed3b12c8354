# hypercall_abi_call.s - one KVM hypercall with arguments from defines; the result is synced.
#
# Scenario (host half: tests/test_hypercall_abi.py):
#   1. RAX = HC_NR, RBX/RCX/RDX/RSI = HC_A0..HC_A3 (Documentation/virt/kvm/x86/hypercalls.rst);
#   2. the hypercall goes through the runtime's native instruction (KVM_HYPERCALL), at CPL 0,
#      or at CPL 3 through GUEST_RUN_USER when USER=1;
#   3. the value KVM (or the VMM, for a user exit) put in RAX is reported with GUEST_SYNC.
# The host compares the synced value with what arch/x86/kvm/x86.c returns.

.ifndef HC_NR
.equ HC_NR, KVM_HC_VAPIC_POLL_IRQ
.endif
.ifndef HC_A0
.equ HC_A0, 0
.endif
.ifndef HC_A1
.equ HC_A1, 0
.endif
.ifndef HC_A2
.equ HC_A2, 0
.endif
.ifndef HC_A3
.equ HC_A3, 0
.endif
.ifndef USER
.equ USER, 0
.endif

guest_main:
.if USER == 0
    call guest_hypercall
.else
    GUEST_RUN_USER guest_hypercall
.endif
    GUEST_SYNC rax
    ret

# Runs at CPL 0 or CPL 3; returns the hypercall's result in RAX.
guest_hypercall:
    push rbx
    push rcx
    push rdx
    push rsi
    movabs rax, HC_NR
    movabs rbx, HC_A0
    movabs rcx, HC_A1
    movabs rdx, HC_A2
    movabs rsi, HC_A3
    KVM_HYPERCALL
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    ret
