# migrate_cbit_liar.s - a guest that makes a page shared in its own page tables without telling
# the host (GUEST_IMAGE_LEGACY: set_memory_shared changes only the PTE, no KVM_HC_MAP_GPA_RANGE),
# writes a pattern there and keeps running while it is migrated. The host still holds the page
# as private, so the migration sends it through the firmware, which reads it through the C-bit:
# the target's guest then reads the wrong bytes through its shared mapping, as a real VM would.
# The testbed reports the page corrupted, and the guest's own check on the target fails.
# (On sev-es: no memory attributes catch the mismatch; on sev the testbed's attributes turn the
# guest's first shared access into an implicit conversion, so the host learns of it.)
GUEST_IMAGE_LEGACY
.ifndef ITERS
.equ ITERS, 32
.endif
.equ LIAR_PAGE, GUEST_FREE_GPA
.equ LIAR_PATTERN, 0x5EC12E75EC12E75E

guest_main:
    mov rdi, LIAR_PAGE
    mov rsi, 1
    call set_memory_shared             # the PTE only: the host is not told
    GUEST_ASSERT_EQ rax, 0
    mov rdi, LIAR_PAGE
    mov rax, LIAR_PATTERN
    mov rcx, 512
    rep stosq
    xor r12, r12
liar_loop:
    GUEST_SYNC r12
    inc r12
    cmp r12, ITERS
    jb liar_loop
    mov rdi, LIAR_PAGE
    mov rbx, LIAR_PATTERN
    xor rcx, rcx
liar_check:
    mov rax, qword ptr [rdi + rcx * 8]
    GUEST_ASSERT_EQ rax, rbx
    inc rcx
    cmp rcx, 512
    jb liar_check
    GUEST_DONE
