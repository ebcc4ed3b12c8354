# donate_conversions.s - the guest keeps its encryption status in memory it donates to the host
# (guests/lib/donate.s, the donated tracker: testbed/tracker/donated.py) while it converts:
# ranges shared, split by private holes, merged by a larger share, single pages churned.
# Run it with `--tracker donated`; under any other tracker the donation hypercall is unknown
# (-KVM_ENOSYS) and the guest converts without a structure (the same conversions reach the host).
# EXPECT_DONATED=1 / 0 asserts which; by default either answer is accepted.
#
# DONATE_SIZE: the first donation in bytes (default one page: too small for the host, which
# answers -ENOSPC with its request, and the library grows to it); DONATE_LIMIT how far it may
# grow. CHURN: single-page flips. The structure sits at GUEST_FREE_GPA, the work after it.

.ifndef DONATE_SIZE
.equ DONATE_SIZE, 0x1000
.endif
.ifndef DONATE_LIMIT
.equ DONATE_LIMIT, 0x20000
.endif
.ifndef CHURN
.equ CHURN, 16
.endif
.ifndef EXPECT_DONATED
.equ EXPECT_DONATED, 2
.endif
.equ DONATE_GPA, GUEST_FREE_GPA
.equ WORK, GUEST_FREE_GPA + 0x20000

# rdi = gpa, rsi = npages
dc_share:
    call donate_set_shared
    GUEST_ASSERT_EQ rax, 0
    ret

dc_private:
    call donate_set_private
    GUEST_ASSERT_EQ rax, 0
    ret

guest_main:
    mov rdi, DONATE_GPA
    mov rsi, DONATE_SIZE
    mov rdx, DONATE_GPA + DONATE_LIMIT
    call donate_init
.if EXPECT_DONATED == 1
    GUEST_ASSERT_EQ rax, 0
.endif
.if EXPECT_DONATED == 0
    GUEST_ASSERT_EQ rax, -KVM_ENOSYS
.endif
.if EXPECT_DONATED == 2
    test rax, rax
    jz dc_donated
    GUEST_ASSERT_EQ rax, -KVM_ENOSYS
dc_donated:
.endif
    GUEST_SYNC 1
    # ten ranges of 1-3 pages, 8 pages apart
    xor r12d, r12d
dc_ranges:
    mov rdi, r12
    shl rdi, 15
    add rdi, WORK
    mov rax, r12
    xor edx, edx
    mov rcx, 3
    div rcx
    lea rsi, [rdx + 1]
    call dc_share
    inc r12
    cmp r12, 10
    jb dc_ranges
    # a 6-page range, then a private hole in its middle (a split) and its first page private
    mov rdi, WORK + 0x60000
    mov rsi, 6
    call dc_share
    mov rdi, WORK + 0x62000
    mov rsi, 2
    call dc_private
    mov rdi, WORK + 0x60000
    mov rsi, 1
    call dc_private
    # the gaps between the first four ranges shared: the four merge into one record (only
    # private pages are shared: on SNP sharing a shared page again would rescind its validation)
    mov rdi, WORK + 0x1000
    mov rsi, 7
    call dc_share
    mov rdi, WORK + 0xa000
    mov rsi, 6
    call dc_share
    mov rdi, WORK + 0x13000
    mov rsi, 5
    call dc_share
    # a page inside a 3-page record (a split) and a whole 1-page record made private (only
    # shared pages: a TD cannot accept a page it already holds private)
    mov rdi, WORK + 0x41000
    mov rsi, 1
    call dc_private
    mov rdi, WORK + 0x48000
    mov rsi, 1
    call dc_private
    GUEST_SYNC 2
    # single pages churned: shared and back; then four left shared, every other page
    xor r12d, r12d
dc_churn:
    mov rdi, r12
    and rdi, 7
    shl rdi, 13
    add rdi, WORK + 0x80000
    mov rsi, 1
    call dc_share
    call dc_private
    inc r12
    cmp r12, CHURN
    jb dc_churn
    xor r12d, r12d
dc_left:
    mov rdi, r12
    shl rdi, 13
    add rdi, WORK + 0x90000
    mov rsi, 1
    call dc_share
    inc r12
    cmp r12, 4
    jb dc_left
    GUEST_SYNC 3
    ret

.include "donate.s"
