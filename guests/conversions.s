# conversions.s - private<->shared conversion workloads through set_memory_shared/private.
#
# SHAPE selects the workload the seed threads describe (testbed/workloads.py has the same
# shapes for the tracker benchmarks):
#   0 boot           20 static firmware/MMIO-like ranges plus a 64-page atomic DMA pool
#   1 dma_churn      boot, then single pages flipped shared and back (CHURN rounds) and a
#                    100-page range every 16th round
#   2 discontiguous  60 discontiguous 2-page regions
#   3 hostile        every other page shared over HOSTILE_PAGES pages
# Every page the guest makes shared gets its GFN written into its first qword afterwards, so
# the host can check it reads plaintext there; every conversion's result is asserted 0.

.ifndef SHAPE
.equ SHAPE, 0
.endif
.ifndef CHURN
.equ CHURN, 64
.endif
.ifndef HOSTILE_PAGES
.equ HOSTILE_PAGES, 256
.endif
.equ CONV_BASE, GUEST_FREE_GPA
.equ CHURN_BASE, GUEST_FREE_GPA + 0x1000000

# rdi = gpa, rsi = npages: make shared, assert success, stamp each page with its gfn
conv_share_stamped:
    push rdi
    push rsi
    push rcx
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
conv_stamp_loop:
    mov rcx, rdi
    shr rcx, 12
    mov qword ptr [rdi], rcx
    add rdi, 4096
    dec rsi
    jnz conv_stamp_loop
    pop rcx
    pop rsi
    pop rdi
    ret

conv_make_private:
    call set_memory_private
    GUEST_ASSERT_EQ rax, 0
    ret

conv_boot:
    mov r12, 0
conv_boot_loop:
    mov rdi, r12
    shl rdi, 18                        # 256 KiB apart
    add rdi, CONV_BASE
    mov rax, r12
    xor edx, edx
    mov rcx, 5
    div rcx
    lea rsi, [rdx + rdx * 2 + 1]       # 1 + 3 * (i % 5) pages
    call conv_share_stamped
    inc r12
    cmp r12, 20
    jb conv_boot_loop
    mov rdi, CONV_BASE + 0x800000      # the atomic DMA pool
    mov rsi, 64
    call conv_share_stamped
    ret

conv_churn:
    mov r12, 0
conv_churn_loop:
    mov rdi, r12
    and rdi, 7
    shl rdi, 13
    add rdi, CHURN_BASE
    mov rsi, 1
    call conv_share_stamped
    call conv_make_private
    test r12, 15
    jnz conv_churn_next
    mov rdi, CHURN_BASE + 0x100000
    mov rsi, 100
    call conv_share_stamped
    call conv_make_private
conv_churn_next:
    inc r12
    cmp r12, CHURN
    jb conv_churn_loop
    ret

conv_discontiguous:
    mov r12, 0
conv_disc_loop:
    mov rdi, r12
    shl rdi, 17                        # 128 KiB apart
    add rdi, CONV_BASE
    mov rsi, 2
    call conv_share_stamped
    inc r12
    cmp r12, 60
    jb conv_disc_loop
    ret

conv_hostile:
    mov r12, 0
conv_hostile_loop:
    mov rdi, r12
    shl rdi, 13                        # every other page
    add rdi, CONV_BASE
    mov rsi, 1
    call conv_share_stamped
    inc r12
    cmp r12, HOSTILE_PAGES / 2
    jb conv_hostile_loop
    ret

guest_main:
.if SHAPE == 0
    call conv_boot
.endif
.if SHAPE == 1
    call conv_boot
    call conv_churn
.endif
.if SHAPE == 2
    call conv_discontiguous
.endif
.if SHAPE == 3
    call conv_hostile
.endif
    ret
