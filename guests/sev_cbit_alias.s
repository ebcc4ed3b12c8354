# sev_cbit_alias.s - one frame through a C=1 and a C=0 mapping: plaintext vs ciphertext.
#
# Scenario (host half: tests/test_sev.py):
#   1. write SECRET through the runtime's identity mapping of DATA_GPA (C=1: private);
#   2. sync the C-bit mask the runtime detected (RT_DATA + 0x800) and the value read back
#      through the C=1 mapping (SECRET);
#   3. map the same frame a second time at ALIAS_GVA with a PTE copied from DATA_GPA's but with
#      the C-bit cleared (runtime page tables: 4 KiB PTEs, rt_pte_address), and invlpg;
#   4. sync the 8 bytes read through the C=0 alias (ciphertext: not SECRET);
#   5. sync the value read again through the C=1 mapping (still SECRET).
# Then the host reads the frame itself (Machine.memory.host_read) and compares with step 4:
# the guest's C=0 view and the host's view are the same ciphertext (APM vol. 2 15.34.5).
# host_write_site marks where the host may overwrite the private frame (HOST_WRITE=1 runs):
# the C=1 read after it decrypts the host's bytes into garbage.

.ifndef SECRET
.equ SECRET, 0x5EC12E7
.endif
.equ DATA_GPA, GUEST_FREE_GPA
.equ ALIAS_GVA, GUEST_FREE_GPA + 0x1000

guest_main:
    push rbx
    mov rbx, DATA_GPA
    mov rax, SECRET
    mov qword ptr [rbx], rax
    mov rax, RT_DATA
    mov rax, qword ptr [rax + 0x800]
    GUEST_SYNC rax
host_write_site:
    mov rax, qword ptr [rbx]
    GUEST_SYNC rax
    # PTE of the alias = PTE of DATA_GPA without the C-bit
    mov rdi, DATA_GPA
    call rt_pte_address
    mov rcx, qword ptr [rax]
    mov rdx, RT_DATA
    mov rdx, qword ptr [rdx + 0x800]
    not rdx
    and rcx, rdx
    mov rdi, ALIAS_GVA
    call rt_pte_address
    mov qword ptr [rax], rcx
    mov rdi, ALIAS_GVA
    invlpg [rdi]
    mov rax, qword ptr [rdi]
    GUEST_SYNC rax
    mov rax, qword ptr [rbx]
    GUEST_SYNC rax
    pop rbx
    ret
