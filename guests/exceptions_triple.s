# exceptions_triple.s - a fault with an unusable IDT ends the VM (triple fault).
#
# Scenario (host half: tests/test_exceptions.py):
#   1. load an IDT with limit 0 (lidt), so no gate can be read;
#   2. raise FAULT_KIND: 0 = ud2 (#UD), 1 = div by zero (#DE);
#   3. delivery of the fault raises #GP, delivery of that raises #DF, and delivery of #DF
#      fails too: a triple fault, which KVM reports as KVM_EXIT_SHUTDOWN (SDM vol. 3 6.15,
#      "Interrupt 8 - Double Fault Exception").

.ifndef FAULT_KIND
.equ FAULT_KIND, 0
.endif

guest_main:
    sub rsp, 16
    mov word ptr [rsp], 0
    mov qword ptr [rsp + 2], 0
    lidt [rsp]
    add rsp, 16
.if FAULT_KIND == 0
fault_site:
    ud2
.else
    xor ecx, ecx
fault_site:
    div ecx
.endif
    GUEST_SYNC 0xbad
    ret
