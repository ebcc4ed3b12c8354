# migrate_donate_hostile.s - a guest that keeps its encryption status in a donated structure
# (guests/lib/donate.s, `--tracker donated`) and corrupts it while it is live-migrated: the
# host must find the structure invalid, fall back to a full status resync and lose nothing.
#
# ITERS iterations, each ending with GUEST_SYNC i; iteration i converts data page k = i % NPAGES
# (shared on even passes over the pages, private on odd ones) and fills it with pattern(k, i).
# After iteration CORRUPT_AT the guest writes a count far above the capacity into its
# structure's header (the host then finds it invalid) and converts with set_memory_shared /
# set_memory_private from then on (the library would trust its corrupted count). At the end
# (on the target) every data page must hold the pattern of the last iteration that wrote it.
#
# pattern(k, i) = 0xC0DE000000000000 | k << 24 | i, in every qword of the page.

.ifndef ITERS
.equ ITERS, 24
.endif
.ifndef NPAGES
.equ NPAGES, 4
.endif
.ifndef CORRUPT_AT
.equ CORRUPT_AT, 6
.endif
.equ MH_DONATE, GUEST_FREE_GPA
.equ MH_DATA, GUEST_FREE_GPA + 0x20000
.equ MH_TAG, 0xC0DE000000000000

# rdi = gpa, rdx = 1 shared / 0 private, r15 = 1 once the structure is corrupted
mh_convert:
    mov rsi, 1
    test r15, r15
    jnz mh_plain
    test rdx, rdx
    jz mh_donate_private
    call donate_set_shared
    jmp mh_converted
mh_donate_private:
    call donate_set_private
    jmp mh_converted
mh_plain:
    test rdx, rdx
    jz mh_plain_private
    call set_memory_shared
    jmp mh_converted
mh_plain_private:
    call set_memory_private
mh_converted:
    GUEST_ASSERT_EQ rax, 0
    ret

# rdi = page, rax = pattern: every qword
mh_fill:
    mov rcx, 512
mh_fill_loop:
    mov qword ptr [rdi + rcx * 8 - 8], rax
    loop mh_fill_loop
    ret

guest_main:
    xor r15d, r15d
    mov rdi, MH_DONATE
    mov rsi, 0x1000
    mov rdx, MH_DONATE + 0x20000
    call donate_init
    GUEST_ASSERT_EQ rax, 0
    xor r12d, r12d                     # i
mh_loop:
    mov rax, r12
    xor edx, edx
    mov rcx, NPAGES
    div rcx                            # rax = pass, rdx = k
    mov r13, rdx
    mov rdi, r13
    shl rdi, 12
    add rdi, MH_DATA
    xor rax, 1
    and rax, 1
    mov rdx, rax                       # even pass: shared
    push rdi
    call mh_convert
    pop rdi
    mov rax, r13
    shl rax, 24
    or rax, r12
    mov rcx, MH_TAG
    or rax, rcx
    call mh_fill
    GUEST_SYNC r12
    cmp r12, CORRUPT_AT
    jne mh_next
    mov rax, MH_DONATE
    mov dword ptr [rax + 0x10], 0x7fffffff     # count far above the capacity
    mov r15d, 1
mh_next:
    inc r12
    cmp r12, ITERS
    jb mh_loop
    # every data page holds the pattern of the last iteration that wrote it
    xor r13d, r13d
mh_check:
    mov rax, ITERS - NPAGES
    add rax, r13
    mov rbx, r13
    shl rbx, 24
    or rax, rbx
    mov rbx, MH_TAG
    or rax, rbx
    mov rdi, r13
    shl rdi, 12
    add rdi, MH_DATA
    mov rcx, 512
mh_check_loop:
    mov rbx, qword ptr [rdi + rcx * 8 - 8]
    GUEST_ASSERT_EQ rbx, rax
    loop mh_check_loop
    inc r13
    cmp r13, NPAGES
    jb mh_check
    ret

.include "donate.s"
