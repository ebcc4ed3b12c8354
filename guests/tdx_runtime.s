# tdx_runtime.s - the runtime's TDX half seen from a guest (host half: tests/test_tdx_guest.py).
#
# OP selects the scenario (all of them also run, unchanged, on the other VM types):
#   0  sync what the runtime detected: the shared bit (RT_DATA + 0x900: 0 unless a TD), the GPA
#      width, whether the ucall page's PTE carries the shared bit, CPUID 0x21's EBX
#   1  a raw VMCALL with an unknown hypercall number: in a TD a #VE (exit reason 18) the
#      runtime reports as unhandled; elsewhere KVM answers -KVM_ENOSYS (synced)
#   2  raw TDVMCALL GetTdVmCallInfo (R12 = 0): sync R10 (status) and R11 (TD only)
#   3  raw TDVMCALL MapGPA with a misaligned GPA: sync R10 (status) and R11 (TD only)
#   4  set_memory_shared then set_memory_private of PAGES pages at GUEST_FREE_GPA: sync each rax
#   5  tdx_panic("testbed: fatal") (TD only)
#   6  write and read back a pattern beyond what boot accepted (lazy accept_memory): sync it

.ifndef OP
.equ OP, 0
.endif
.ifndef PAGES
.equ PAGES, 1
.endif
.equ LATE_GPA, GUEST_ACCEPTED_END + 0x201000

guest_main:
    push rbx
.if OP == 0
    mov rax, RT_DATA
    mov rbx, qword ptr [rax + 0x900]
    mov rcx, qword ptr [rax + 0x910]
    mov rdi, UCALL_GPA
    call rt_pte_address
    mov rdx, qword ptr [rax]
    and rdx, rbx
    setnz dl
    movzx edx, dl
    push rbx
    push rdx
    push rcx
    xor eax, eax
    cpuid
    xor esi, esi
    cmp eax, 0x21
    jb no_leaf
    mov eax, 0x21
    xor ecx, ecx
    cpuid
    mov esi, ebx
no_leaf:
    pop rcx
    pop rdx
    pop rbx
    GUEST_SYNC rbx, rcx, rdx, rsi
.elseif OP == 1
    mov rax, 0x999
    VMCALL
    GUEST_SYNC rax
.elseif OP == 2
    push r12
    xor r10d, r10d
    mov r11, TDVMCALL_GET_TD_VM_CALL_INFO
    xor r12d, r12d
    TDVMCALL
    GUEST_SYNC rax, r10, r11
    pop r12
.elseif OP == 3
    push r12
    push r13
    xor r10d, r10d
    mov r11, TDVMCALL_MAP_GPA
    mov r12, GUEST_FREE_GPA + 0x800
    mov r13, 0x1000
    TDVMCALL
    GUEST_SYNC rax, r10, r11
    pop r13
    pop r12
.elseif OP == 4
    mov rdi, GUEST_FREE_GPA
    mov rsi, PAGES
    call set_memory_shared
    mov rbx, rax
    mov rdi, GUEST_FREE_GPA
    mov rsi, PAGES
    call set_memory_private
    GUEST_SYNC rbx, rax
.elseif OP == 5
    lea rdi, [rip + fatal_msg]
    call tdx_panic
.elseif OP == 6
    mov rdi, LATE_GPA
    mov rsi, 0x5a
    mov rdx, 0x2000
    call guest_memset
    mov rax, LATE_GPA + 0x1ff8
    mov rax, qword ptr [rax]
    GUEST_SYNC rax
.endif
    pop rbx
    ret

fatal_msg:
    .asciz "testbed: fatal"
    .quad 0, 0, 0, 0, 0, 0, 0, 0
