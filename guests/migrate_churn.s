# migrate_churn.s - a guest that keeps converting and writing pages while it is live-migrated
# (`testbed migrate guests/migrate_churn.s`), and checks on the target that nothing was lost.
#
# The runtime declares the guest ready for migration at boot (GUEST_MIGRATION_READY, which
# `testbed migrate` defines: MSR_KVM_MIGRATION_CONTROL = KVM_MIGRATION_READY). Then ITERS
# iterations, each ending with GUEST_SYNC i (the host's slicing point); iteration i:
#   * DMA churn: data page k = i % NPAGES is converted - to shared on even passes over the
#     pages, to private on odd ones (pass = i / NPAGES) - and filled with pattern(k, i);
#   * the flip page is converted the other way each iteration and never written (a change of
#     encryption status only: the dirty log does not see it, the status resync must);
#   * private page i % NPRIV of a region that stays private, and shared page i % NSHARED of a
#     region made shared once at the start, are filled with pattern(k, i).
# At the end (on the target, after the migration) every data, private and shared page must
# hold the pattern of the last iteration that wrote it: GUEST_ASSERT on each qword.
#
# pattern(k, i) = 0xC0DE000000000000 | region << 40 | k << 24 | i, in every qword of the page.

.ifndef ITERS
.equ ITERS, 48
.endif
.ifndef NPAGES
.equ NPAGES, 8
.endif
.ifndef NPRIV
.equ NPRIV, 4
.endif
.ifndef NSHARED
.equ NSHARED, 4
.endif
.equ MC_FLIP, GUEST_FREE_GPA
.equ MC_DATA, GUEST_FREE_GPA + 0x1000
.equ MC_PRIV, GUEST_FREE_GPA + 0x20000
.equ MC_SHARED, GUEST_FREE_GPA + 0x30000
.equ MC_TAG, 0xC0DE000000000000

guest_main:
    mov rdi, MC_SHARED
    mov rsi, NSHARED
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
    xor r12, r12                       # i
mc_loop:
    # data page k = i % NPAGES: shared on even passes, private on odd ones, then filled
    mov rax, r12
    xor edx, edx
    mov rcx, NPAGES
    div rcx                            # rax = pass, rdx = k
    mov r13, rdx
    mov rdi, r13
    shl rdi, 12
    add rdi, MC_DATA
    mov rsi, 1
    test rax, 1
    jnz mc_data_private
    call set_memory_shared
    jmp mc_data_converted
mc_data_private:
    call set_memory_private
mc_data_converted:
    GUEST_ASSERT_EQ rax, 0
    mov rsi, 1                         # region 1: data
    mov rdx, r13
    call mc_fill

    # the flip page: status only, never written
    mov rdi, MC_FLIP
    mov rsi, 1
    test r12, 1
    jnz mc_flip_private
    call set_memory_shared
    jmp mc_flip_done
mc_flip_private:
    call set_memory_private
mc_flip_done:
    GUEST_ASSERT_EQ rax, 0

    # the private region (region 2) and the shared region (region 3)
    mov rax, r12
    xor edx, edx
    mov rcx, NPRIV
    div rcx
    mov rdi, rdx
    shl rdi, 12
    add rdi, MC_PRIV
    mov rsi, 2
    call mc_fill
    mov rax, r12
    xor edx, edx
    mov rcx, NSHARED
    div rcx
    mov rdi, rdx
    shl rdi, 12
    add rdi, MC_SHARED
    mov rsi, 3
    call mc_fill

    GUEST_SYNC r12
    inc r12
    cmp r12, ITERS
    jb mc_loop

    # verify: every page holds the pattern of the last iteration that wrote it
    mov rdi, MC_DATA
    mov rsi, 1
    mov rdx, NPAGES
    call mc_verify_region
    mov rdi, MC_PRIV
    mov rsi, 2
    mov rdx, NPRIV
    call mc_verify_region
    mov rdi, MC_SHARED
    mov rsi, 3
    mov rdx, NSHARED
    call mc_verify_region
    GUEST_DONE

# mc_fill: rdi = page, rsi = region, rdx = k, r12 = i: fill the page with pattern(k, i)
mc_fill:
    push rcx
    push rdi
    mov rax, rsi
    shl rax, 40
    shl rdx, 24
    or rax, rdx
    or rax, r12
    mov rdx, MC_TAG
    or rax, rdx
    mov rcx, 512
    rep stosq
    pop rdi
    pop rcx
    ret

# mc_verify_region: rdi = first page, rsi = region, rdx = pages n; page k must hold
# pattern(k, last) with last = the last i < ITERS with i % n == k
mc_verify_region:
    GUEST_HELPER_ENTER
    push rbx
    mov r8, rdx                        # n
    xor r9, r9                         # k
mc_verify_page:
    cmp r9, r8
    jae mc_verify_out
    cmp r9, ITERS
    jae mc_verify_out                  # never written
    # last = k + n * ((ITERS - 1 - k) / n)
    mov rax, ITERS - 1
    sub rax, r9
    xor edx, edx
    div r8
    imul rax, r8
    add rax, r9
    mov rbx, rsi
    shl rbx, 40
    mov rdx, r9
    shl rdx, 24
    or rbx, rdx
    or rbx, rax
    mov rdx, MC_TAG
    or rbx, rdx                        # the expected qword
    mov r10, r9
    shl r10, 12
    add r10, rdi                       # the page
    xor r11, r11
mc_verify_qword:
    mov rax, qword ptr [r10 + r11 * 8]
    GUEST_ASSERT_EQ rax, rbx
    inc r11
    cmp r11, 512
    jb mc_verify_qword
    inc r9
    jmp mc_verify_page
mc_verify_out:
    pop rbx
    GUEST_HELPER_RET
