# exceptions_unhandled.s - one fault with no handler installed; the runtime reports it.
#
#   FAULT=0  #DE  div by zero
#   FAULT=1  #UD  ud2
#   FAULT=2  #GP  load of GDT selector 0x1230, beyond the GDT limit (error code = the selector)
#   FAULT=3  #PF  read of frame 0 (not mapped by the runtime)
#   FAULT=4  #PF  write to frame 0
#   FAULT=5  #BP  int3 (a trap: the saved RIP is the next instruction)
#   FAULT=6  #GP  read through a non-canonical address (error code 0)
#
# Scenario (host half: tests/test_exceptions.py): the faulting instruction is at fault_site
# (for #BP, fault_site_next follows it); the runtime's unhandled-exception path sends
# UCALL_UNHANDLED with the vector, error code and saved RIP of the IDT frame. Nothing after
# the fault may run.

.ifndef FAULT
.equ FAULT, 0
.endif

guest_main:
.if FAULT == 0
    xor ecx, ecx
fault_site:
    div ecx
.endif
.if FAULT == 1
fault_site:
    ud2
.endif
.if FAULT == 2
    mov ax, 0x1230
fault_site:
    mov ds, ax
.endif
.if FAULT == 3
    xor eax, eax
fault_site:
    mov rbx, qword ptr [rax]
.endif
.if FAULT == 4
    xor eax, eax
fault_site:
    mov qword ptr [rax], rbx
.endif
.if FAULT == 5
fault_site:
    int3
fault_site_next:
.endif
.if FAULT == 6
    movabs rax, 0x8000000000000000
fault_site:
    mov rbx, qword ptr [rax]
.endif
    GUEST_SYNC 0xbad
    ret
