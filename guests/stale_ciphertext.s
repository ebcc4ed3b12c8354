# stale_ciphertext.s - a page converted private->shared without being rewritten.
#
# 1. write MAGIC through the private (C=1) mapping; 2. set_memory_shared; 3. read it back.
# On SEV the read goes through C=0 and returns the ciphertext the memory controller left in
# DRAM, not MAGIC; on a plain VM it returns MAGIC. The value read is reported with GUEST_SYNC.
.equ PAGE, GUEST_FREE_GPA
.equ MAGIC, 0x5a5a1234

guest_main:
    mov rdi, PAGE
    mov qword ptr [rdi], MAGIC
    mov rsi, 1
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
    mov rdi, PAGE
    mov rax, qword ptr [rdi]
    GUEST_SYNC rax
    ret
