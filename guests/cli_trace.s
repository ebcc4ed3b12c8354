# cli_trace.s - a guest that touches every layer, for `testbed run --trace`.
#
# Scenario (host half: tests/test_cli.py):
#   1. a handled ud2: the hardware delivers #UD through the IDT (hw events);
#   2. a hypercall, KVM_HC_VAPIC_POLL_IRQ (kvm events);
#   3. GUEST_SYNC of its result: a port-I/O user exit (vmm event) carrying a ucall.

guest_main:
    GUEST_SET_HANDLER UD_VECTOR, guest_ud_skip
    ud2
    mov rax, KVM_HC_VAPIC_POLL_IRQ
    KVM_HYPERCALL
    GUEST_SYNC rax
    ret

guest_ud_skip:
    add qword ptr [rdi + EX_RIP], 2
    ret
