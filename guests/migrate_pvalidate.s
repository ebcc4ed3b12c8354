# migrate_pvalidate.s - SEV-SNP: a page whose validation the guest rescinds, without writing
# it, while it is live-migrated (`testbed migrate guests/migrate_pvalidate.s --vm-type sev-snp`;
# tests/test_migrate.py).
#
# The page is filled at the start (round 0's slice; the next round sends it, dirty, validated);
# at iteration RESCIND_AT, after that send (pre-copy round 2 with --rounds 2 --slice 8), the
# guest rescinds its validation (PVALIDATE, EDX = 0) and never writes it again: no dirty bit,
# no conversion - only its RMP entry changed. At the end (on the target) it validates the page
# again: PVALIDATE must update the RMP (CF = 0), as it does on the source, and the page must
# hold what the guest wrote. A migration that left the target's entry validated answers
# CF = 1 (no update) and the guest's check fails. On the other VM types (no RMP) the guest only
# fills the page, syncs and checks it (the matrix runs every bundled guest everywhere).

.ifndef ITERS
.equ ITERS, 32
.endif
.ifndef RESCIND_AT
.equ RESCIND_AT, 18                    # inside pre-copy round 2 with --rounds 2 --slice 8
.endif
.equ MP_PAGE, GUEST_FREE_GPA + 0x5000
.equ MP_FILL, 0x1111111111111111

guest_main:
    mov rdi, MP_PAGE
    mov rax, MP_FILL
    mov rcx, 512
    rep stosq
    xor r12, r12
mp_loop:
    cmp r12, RESCIND_AT
    jne mp_sync
    mov rax, RT_SEV_STATUS
    test qword ptr [rax], 4            # SEV_STATUS.SNP (the runtime read it at boot)
    jz mp_sync
    mov rax, MP_PAGE
    xor ecx, ecx                       # 4 KiB
    xor edx, edx                       # rescind
    .byte 0xf2, 0x0f, 0x01, 0xff       # pvalidate
    GUEST_ASSERT_EQ rax, 0
mp_sync:
    GUEST_SYNC r12
    inc r12
    cmp r12, ITERS
    jb mp_loop
    # on the target: validate it again - an RMP update (CF = 0), since it was rescinded
    mov rax, RT_SEV_STATUS
    test qword ptr [rax], 4
    jz mp_check
    mov rax, MP_PAGE
    xor ecx, ecx
    mov edx, 1
    .byte 0xf2, 0x0f, 0x01, 0xff       # pvalidate
    setc bl
    movzx rbx, bl
    GUEST_ASSERT_EQ rax, 0
    GUEST_ASSERT_EQ rbx, 0
mp_check:
    mov rax, qword ptr [MP_PAGE + 0xff8]
    mov rbx, MP_FILL
    GUEST_ASSERT_EQ rax, rbx
    GUEST_DONE
