# exceptions_handled.s - faults in a row, each caught by a handler that lets the guest resume.
#
# Scenario (host half: tests/test_exceptions.py):
#   1. one handler for #DE, #BP, #UD, #GP and #PF syncs the vector, the error code, the
#      saved RIP and (for #PF) CR2, then skips R15 bytes (the faulting instruction's length;
#      0 for the int3 trap, whose saved RIP already points past it);
#   2. the guest raises, in order: #DE, #DE, #GP, #UD, #PF (read of 0), #PF (write to 0x10),
#      #BP, #DE - each at a labelled site;
#   3. after each fault it syncs a marker (0x600d0 + index) to prove it resumed.
# Every fault must arrive with its own vector: a second #DE arriving as #DF would mean the
# emulator's "previous exception" record leaked (UNICORN.md, "Exceptions").

guest_main:
    push r15
    GUEST_SET_HANDLER DE_VECTOR, guest_exc_handler
    GUEST_SET_HANDLER 3, guest_exc_handler
    GUEST_SET_HANDLER UD_VECTOR, guest_exc_handler
    GUEST_SET_HANDLER GP_VECTOR, guest_exc_handler
    GUEST_SET_HANDLER PF_VECTOR, guest_exc_handler
    xor ecx, ecx
    mov r15, 2
site_de1:
    div ecx
    GUEST_SYNC 0x600d0
site_de2:
    div ecx
    GUEST_SYNC 0x600d1
    mov ax, 0x1230
    mov r15, 3
site_gp:
    mov ds, ax
    GUEST_SYNC 0x600d2
    mov r15, 2
site_ud:
    ud2
    GUEST_SYNC 0x600d3
    xor eax, eax
    mov r15, 3
site_pf_read:
    mov rbx, qword ptr [rax]
    GUEST_SYNC 0x600d4
    mov rax, 0x10
    mov r15, 3
site_pf_write:
    mov qword ptr [rax], rbx
    GUEST_SYNC 0x600d5
    mov r15, 0
site_bp:
    int3
site_bp_next:
    GUEST_SYNC 0x600d6
    xor ecx, ecx
    mov r15, 2
site_de3:
    div ecx
    GUEST_SYNC 0x600d7
    pop r15
    ret

# rdi = struct ex_regs *
guest_exc_handler:
    mov rax, qword ptr [rdi + EX_VECTOR]
    GUEST_SYNC rax
    mov rax, qword ptr [rdi + EX_ERROR_CODE]
    GUEST_SYNC rax
    mov rax, qword ptr [rdi + EX_RIP]
    GUEST_SYNC rax
    mov rax, qword ptr [rdi + EX_VECTOR]
    cmp rax, PF_VECTOR
    jne guest_exc_handler_skip
    mov rax, cr2
    GUEST_SYNC rax
guest_exc_handler_skip:
    mov rax, qword ptr [rdi + EX_R15]
    add qword ptr [rdi + EX_RIP], rax
    ret
