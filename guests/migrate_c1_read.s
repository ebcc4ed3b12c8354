# migrate_c1_read.s - legacy SEV: a page the guest has only read through C=1 while it is
# live-migrated (`testbed migrate guests/migrate_c1_read.s --vm-type sev`; tests/test_migrate.py).
#
# The guest reads a frame nothing was ever written to through a C=1 mapping: it sees the
# decryption of zeros under its key (garbage), which it keeps. The host still sees zeros
# there, but the frame is the guest's now (hw/memory.py: the read moved it to the private
# alias). On the target the guest reads it again and must see the same bytes: the migration
# has to send it through SEND_UPDATE_DATA like any private page (it is not a zero page).

.ifndef ITERS
.equ ITERS, 24
.endif
.equ MR_PAGE, GUEST_FREE_GPA + 0x40000

guest_main:
    mov rsi, MR_PAGE
    mov rbx, qword ptr [rsi]           # C=1 read of a never-written frame
    xor r12, r12
mr_loop:
    GUEST_SYNC r12
    inc r12
    cmp r12, ITERS
    jb mr_loop
    mov rsi, MR_PAGE
    mov rax, qword ptr [rsi]
    GUEST_ASSERT_EQ rax, rbx
    GUEST_DONE
