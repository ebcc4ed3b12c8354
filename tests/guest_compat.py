"""Guest code for tests that run 32-bit (compatibility-mode) code: a 32-bit code segment in the
runtime's GDT, and far returns into it and back to 64-bit code."""

from __future__ import annotations

#: The selector of the 32-bit code segment (the slot after the runtime's seven descriptors)
COMPAT_SELECTOR = 0x38


def load_compat_segment(base: int = 0) -> str:
    """Put a 32-bit code segment based at `base` at COMPAT_SELECTOR in the runtime's GDT and
    reload the GDT with a limit that covers it. Clobbers rax and rdi."""
    descriptor = 0x00CF9B000000FFFF | ((base & 0xFFFFFF) << 16) | ((base >> 24) << 56)
    return f"""
    mov rdi, RT_GDT
    movabs rax, {descriptor:#x}
    mov qword ptr [rdi + {COMPAT_SELECTOR:#x}], rax
    sub rsp, 16
    mov word ptr [rsp], {COMPAT_SELECTOR + 7:#x}
    mov qword ptr [rsp + 2], rdi
    lgdt [rsp]
    add rsp, 16
"""


def far_return_to_compat(label: str, base: int = 0) -> str:
    """Far-return to `label` in the 32-bit segment (its RIP: the label's address less `base`).
    Clobbers rdi."""
    return f"""
    lea rdi, [rip + {label}]
    sub rdi, {base:#x}
    push {COMPAT_SELECTOR:#x}
    push rdi
    retfq
"""


def far_return_to_64(label: str) -> str:
    """In 32-bit code: far-return to `label` in the runtime's 64-bit code segment (0x08)."""
    return f"""
    .byte 0x6a, 0x08                   # push 0x08
    .byte 0x68                         # push {label}
    .long {label}
    .byte 0xcb                         # retf
"""
