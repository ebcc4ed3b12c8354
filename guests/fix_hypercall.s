# fix_hypercall.s - the wrong vendor's hypercall instruction, as KVM's fix_hypercall_test.c.
#
#   INSN=0  VMCALL  at hypercall_site (Intel's instruction)
#   INSN=1  VMMCALL at hypercall_site (AMD's instruction)
#
# Scenario (host half: tests/test_fix_hypercall.py; the selftest is
# tools/testing/selftests/kvm/x86/fix_hypercall_test.c):
#   1. install a #UD handler that counts its runs, sets RAX = -EFAULT and skips the 3-byte
#      instruction (the selftest's guest_ud_handler);
#   2. KVM_HC_SCHED_YIELD (a0 = APIC ID 0) through the instruction at hypercall_site;
#   3. sync, in order: RAX after the hypercall, the number of #UDs, and the 3 bytes now at
#      hypercall_site (little-endian: 0xc1010f = VMCALL, 0xd9010f = VMMCALL).
# With KVM_X86_QUIRK_FIX_HYPERCALL_INSN on, KVM patches a foreign instruction to the native
# one and the guest re-executes it (RAX = 0, no #UD, bytes native); with the quirk off the
# guest takes #UD (RAX = -EFAULT, one #UD, bytes unchanged). The native one is never patched.

.ifndef INSN
.equ INSN, 0
.endif

.equ EFAULT_RET, -14                   # -EFAULT, what the selftest's #UD handler returns
.equ UD_COUNT_GPA, GUEST_FREE_GPA      # the #UD handler's run counter

guest_main:
    mov rax, UD_COUNT_GPA
    mov qword ptr [rax], 0
    GUEST_SET_HANDLER UD_VECTOR, guest_ud_handler
    mov rax, KVM_HC_SCHED_YIELD
    xor ebx, ebx
.if INSN == 0
hypercall_site:
    VMCALL
.else
hypercall_site:
    VMMCALL
.endif
    GUEST_SYNC rax
    mov rax, UD_COUNT_GPA
    mov rax, qword ptr [rax]
    GUEST_SYNC rax
    lea rbx, [rip + hypercall_site]
    mov eax, dword ptr [rbx]
    and eax, 0xffffff
    GUEST_SYNC rax
    ret

# rdi = struct ex_regs *
guest_ud_handler:
    mov rax, UD_COUNT_GPA
    inc qword ptr [rax]
    mov qword ptr [rdi + EX_RAX], EFAULT_RET
    add qword ptr [rdi + EX_RIP], 3
    ret
