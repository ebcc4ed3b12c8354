# A modern image: guests/legacy_image.s without GUEST_IMAGE_LEGACY (tests/test_control_plane.py).
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
