# A lying image: its note declares MAP_GPA_RANGE (the runtime's, not withdrawn: no
# GUEST_IMAGE_LEGACY), but it converts pages the legacy way - the runtime's legacy path flips
# the C-bit / shared bit in its PTEs (PVALIDATE on SNP) and never tells the host. On a
# guest_memfd VM type its first access through a flipped PTE is a KVM_EXIT_MEMORY_FAULT; the
# report's control_plane says `lying` with that exit as evidence (testbed/control_plane.py).
.equ GUEST_IMAGE_IS_LEGACY, 1          # the runtime's switch, set without the note

guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rsi, 1
    call set_memory_shared             # PTEs only: the host is not told
    GUEST_ASSERT_EQ rax, 0
    mov rax, GUEST_FREE_GPA
    mov qword ptr [rax], 0x5a          # a shared access to a page the host holds private
    GUEST_SYNC GUEST_FREE_GPA
    ret
