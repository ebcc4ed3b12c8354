# A legacy image (GUEST_IMAGE_LEGACY): it converts pages by its PTEs alone, never with
# KVM_HC_MAP_GPA_RANGE, so the control plane refuses it on the guest_memfd VM types.
GUEST_IMAGE_LEGACY
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rsi, 4
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
    mov rax, GUEST_FREE_GPA
    mov qword ptr [rax], 1
    mov rdi, GUEST_FREE_GPA
    mov rsi, 4
    call set_memory_private
    GUEST_ASSERT_EQ rax, 0
    mov rax, GUEST_FREE_GPA
    mov qword ptr [rax], 2
    GUEST_DONE
