# sev_detect.s - run-time detection of SEV, as Linux's sme_enable() does it.
#
# Scenario (host half: tests/test_sev.py):
#   1. CPUID 0x80000000: if the highest extended leaf is below 0x8000001F, sync 0 (no leaf) and
#      stop;
#   2. CPUID 0x8000001F: sync EAX (bit 1 = SEV) and EBX (bits 5:0 = C-bit position);
#   3. only if EAX bit 1 is set, read SEV_STATUS (MSR 0xC0010131; bit 0 = SEV enabled) and sync
#      EDX:EAX - a guest must not touch the MSR on a CPU without SEV.
# The host compares with the CPUID the VMM built and the VM type (ABI.md section 6).

.equ MSR_AMD64_SEV_STATUS, 0xC0010131

guest_main:
    push rbx
    mov eax, 0x80000000
    cpuid
    cmp eax, 0x8000001f
    jb guest_no_leaf
    mov eax, 0x8000001f
    xor ecx, ecx
    cpuid
    mov r8d, eax
    GUEST_SYNC r8
    mov r9d, ebx
    GUEST_SYNC r9
    bt r8d, 1
    jnc guest_detect_done
    mov ecx, MSR_AMD64_SEV_STATUS
    rdmsr
    shl rdx, 32
    mov eax, eax
    or rax, rdx
    GUEST_SYNC rax
    jmp guest_detect_done
guest_no_leaf:
    GUEST_SYNC 0
guest_detect_done:
    pop rbx
    ret
