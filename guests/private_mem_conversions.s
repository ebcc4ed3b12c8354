# private_mem_conversions.s - the guest half of a port of KVM's
# tools/testing/selftests/kvm/x86/private_mem_conversions_test.c (explicit conversions).
#
# Host half: tests/test_private_mem_conversions.py, which handles KVM_EXIT_HYPERCALL
# (KVM_HC_MAP_GPA_RANGE) itself as the selftest does and checks the patterns at each sync:
#   GUEST_SYNC SYNC_SHARED, gpa, size, current, new   host sees `current`, writes `new`
#   GUEST_SYNC SYNC_PRIVATE, gpa, size, pattern       the page is private: the host cannot
#                                                     see what the guest wrote
# Differences from the selftest: the data region follows the runtime (2M-aligned above
# GUEST_FREE_GPA) instead of a memslot at 4G; it is converted to shared first, since RAM of
# the SEV VM types starts private; conversions use the runtime's set_memory_* (C-bit, PSC
# and PVALIDATE as each VM type needs) rather than a bare KVM_HC_MAP_GPA_RANGE.

.equ SYNC_SHARED, 0
.equ SYNC_PRIVATE, 1
.equ DATA_SIZE, 0x201000        # PER_CPU_DATA_SIZE: SZ_2M + PAGE_SIZE
.equ DEF_P, 0xaa
.equ INIT_P, 0xcc
.equ P1, 0x11
.equ P2, 0x22
.equ P3, 0x33
.equ P4, 0x44

# GUEST_STAGE(offset, size) of the selftest's test_ranges[]
.macro TEST_RANGE offset, size
    mov r13, r15
    add r13, \offset
    mov r14, \size
    call test_one_range
.endm

guest_main:
    mov r15, GUEST_FREE_GPA + 0x1FFFFF
    mov rax, -0x200000
    and r15, rax                        # base_gpa: 2M-aligned

    mov rdi, r15
    mov rsi, DATA_SIZE / 4096
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0

    # "Memory should be shared by default."
    mov rdi, r15
    mov rsi, DEF_P
    mov rdx, DATA_SIZE
    call guest_memset
    mov rsi, DEF_P
    call check_pattern
    GUEST_SYNC SYNC_SHARED, r15, DATA_SIZE, DEF_P, INIT_P
    mov rdi, r15
    mov rsi, INIT_P
    mov rdx, DATA_SIZE
    call check_pattern

    TEST_RANGE 0, 0x1000
    TEST_RANGE 0, 0x200000
    TEST_RANGE 0x1000, 0x1000
    TEST_RANGE 0x1000, 0x200000
    TEST_RANGE 0x200000, 0x1000
    GUEST_DONE

# r13 = gpa, r14 = size, r15 = base_gpa
test_one_range:
    GUEST_HELPER_ENTER
    mov rdi, r13
    mov rsi, P1
    mov rdx, r14
    call guest_memset

    mov rdi, r13
    mov rsi, r14
    shr rsi, 12
    call set_memory_private
    GUEST_ASSERT_EQ rax, 0

    cmp r14, 0x1000
    jbe test_one_range_small
    mov rdi, r13
    mov rsi, P2
    mov rdx, 0x1000
    call guest_memset
    jmp test_one_range_skip

test_one_range_small:
    mov rdi, r13
    mov rsi, P2
    mov rdx, r14
    call guest_memset
    GUEST_SYNC SYNC_PRIVATE, r13, r14, P1
    mov rdi, r13
    mov rsi, P2
    mov rdx, r14
    call check_pattern
    # the rest of the region still holds the initial pattern
    mov rdi, r15
    mov rsi, INIT_P
    mov rdx, r13
    sub rdx, r15
    call check_pattern
    mov rdi, r13
    add rdi, r14
    mov rdx, r15
    add rdx, DATA_SIZE
    sub rdx, rdi
    call check_pattern
    # one page: frame 0 is even, so it stays private
    GUEST_SYNC SYNC_PRIVATE, r13, 0x1000, P1

test_one_range_skip:
    mov rdi, r13
    mov rsi, r14
    shr rsi, 12
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
    mov rdi, r13
    mov rsi, P3
    mov rdx, r14
    call guest_memset
    GUEST_SYNC SYNC_SHARED, r13, r14, P3, P4
    mov rdi, r13
    mov rsi, P4
    mov rdx, r14
    call check_pattern
    mov rdi, r13
    mov rsi, INIT_P
    mov rdx, r14
    call guest_memset
    GUEST_HELPER_RET

# check_pattern: rdi = gpa, rsi = byte, rdx = n (a multiple of 8): every byte is the pattern
# (the selftest's memcmp_g), eight at a time.
check_pattern:
    GUEST_HELPER_ENTER
    push rbx
    push rcx
    mov rbx, 0x0101010101010101
    imul rbx, rsi
    xor rcx, rcx
check_pattern_loop:
    cmp rcx, rdx
    jae check_pattern_done
    mov rax, qword ptr [rdi + rcx]
    GUEST_ASSERT_EQ rax, rbx
    add rcx, 8
    jmp check_pattern_loop
check_pattern_done:
    pop rcx
    pop rbx
    GUEST_HELPER_RET
