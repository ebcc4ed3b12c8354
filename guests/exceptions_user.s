# exceptions_user.s - a routine at CPL 3 and the return to CPL 0 through an IDT gate.
#
# Scenario (host half: tests/test_exceptions.py):
#   1. GUEST_RUN_USER runs guest_user_fn at CPL 3 (iretq to the DPL-3 user segments);
#   2. guest_user_fn syncs nothing (OUT at CPL 3 would #GP), reads CS into RAX and returns;
#      the runtime's trampoline executes `int 0x81` through a DPL-3 interrupt gate whose target
#      is a CPL-0 code segment (SDM vol. 3 6.12.1: the CPU switches to the TSS's RSP0 stack and
#      runs the handler at CPL 0);
#   3. back at CPL 0 the guest syncs the CS the routine saw (0x23) and its own CS (0x08).

guest_main:
    GUEST_RUN_USER guest_user_fn
    GUEST_SYNC rax
    mov ax, cs
    movzx eax, ax
    GUEST_SYNC rax
    ret

guest_user_fn:
    mov ax, cs
    movzx eax, ax
    ret
