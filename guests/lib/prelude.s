# prelude.s - the guest API: macros and constants every guest can use.
#
# Assembled in front of every guest (testbed/guest.py). Layout values (UCALL_GPA, UCALL_PORT,
# GUEST_MEM_SIZE, ...) arrive from the host as defines, never by editing this file.
#
# Public API (later issues and external tests use these names exactly):
#   GUEST_SYNC value          report a sync carrying one 64-bit value (register or imm32)
#   GUEST_DONE                the guest passed (returning from guest_main does the same)
#   GUEST_ASSERT_EQ a, b      a and b: registers or imm32 (sign-extended); on mismatch report
#                             an abort with both values and the assert's file:line
#   VMCALL, VMMCALL           the raw instructions
#   KVM_HYPERCALL             the CPU's native hypercall instruction, chosen once at boot
#                             (nr in RAX, args in RBX, RCX, RDX, RSI; result in RAX; nothing
#                             else clobbered)
#   GUEST_RUN_USER fn         call routine `fn` at CPL 3; its RAX comes back in RAX
#   GUEST_SET_HANDLER vec, fn install `fn` as the handler of exception `vec`; it is called
#                             with RDI = struct ex_regs * (EX_* offsets below) and may change
#                             the saved registers, e.g. add to EX_RIP to skip an instruction
#   set_memory_shared / set_memory_private   (rdi = gpa, rsi = npages; rax = 0 or -errno)

# ucall commands (the host's testbed/vmm/ucall.py uses the same numbers)
.equ UCALL_SYNC, 1
.equ UCALL_DONE, 2
.equ UCALL_ABORT, 3
.equ UCALL_UNHANDLED, 4

# KVM hypercall ABI (include/uapi/linux/kvm_para.h)
.equ KVM_HC_VAPIC_POLL_IRQ, 1
.equ KVM_HC_KICK_CPU, 5
.equ KVM_HC_CLOCK_PAIRING, 9
.equ KVM_HC_SEND_IPI, 10
.equ KVM_HC_SCHED_YIELD, 11
.equ KVM_HC_MAP_GPA_RANGE, 12
.equ KVM_ENOSYS, 1000
.equ KVM_EINVAL, 22
.equ KVM_EPERM, 1
.equ KVM_EOPNOTSUPP, 95
.equ KVM_MAP_GPA_RANGE_PAGE_SZ_4K, 0
.equ KVM_MAP_GPA_RANGE_PAGE_SZ_2M, 1
.equ KVM_MAP_GPA_RANGE_PAGE_SZ_1G, 2
.equ KVM_MAP_GPA_RANGE_DECRYPTED, 0
.equ KVM_MAP_GPA_RANGE_ENCRYPTED, 16
.equ KVM_CPUID_FEATURES, 0x40000001
.equ KVM_FEATURE_HC_MAP_GPA_RANGE, 16

# exception vectors
.equ DE_VECTOR, 0
.equ UD_VECTOR, 6
.equ GP_VECTOR, 13
.equ PF_VECTOR, 14
.equ VC_VECTOR, 29

# struct ex_regs: what an exception handler gets in RDI
.equ EX_RAX, 0
.equ EX_RBX, 8
.equ EX_RCX, 16
.equ EX_RDX, 24
.equ EX_RSI, 32
.equ EX_RDI, 40
.equ EX_RBP, 48
.equ EX_R8, 56
.equ EX_R15, 112
.equ EX_VECTOR, 120
.equ EX_ERROR_CODE, 128
.equ EX_RIP, 136
.equ EX_CS, 144
.equ EX_RFLAGS, 152
.equ EX_RSP, 160
.equ EX_SS, 168

# SEV-ES/SNP: ask the hypervisor to terminate the guest (GHCB MSR protocol, request 0x100,
# reason set and code) - how an SEV-ES guest signals its end without any port I/O
# (tools/testing/selftests/kvm/x86/sev_smoke_test.c).
.equ MSR_AMD64_SEV_ES_GHCB, 0xC0010130
.equ GHCB_MSR_TERM_REQ, 0x100
.macro GUEST_TERMINATE set, code
    mov ecx, MSR_AMD64_SEV_ES_GHCB
    mov eax, GHCB_MSR_TERM_REQ | (\set << 12) | (\code << 16)
    xor edx, edx
    wrmsr
    rep vmmcall
.endm

.macro VMCALL
    vmcall
.endm

.macro VMMCALL
    vmmcall
.endm

.macro KVM_HYPERCALL
    call rt_kvm_hypercall
.endm

.macro GUEST_SYNC val
    push rax
    push rdi
    mov rdi, \val
    call rt_ucall_sync
    pop rdi
    pop rax
.endm

.macro GUEST_DONE
    call rt_ucall_done
.endm

# The third argument is the call-site id that testbed/asm.py appends to every GUEST_ASSERT*
# statement; the host maps it back to the file:line where the assert is written.
.macro GUEST_ASSERT_EQ a, b, site
    pushfq
    push rdi
    push rsi
    push rdx
    push \a
    push \b
    pop rsi
    pop rdi
    cmp rdi, rsi
    je __guest_assert_ok_\site
    mov rdx, \site
    call rt_guest_assert_fail
__guest_assert_ok_\site:
    pop rdx
    pop rsi
    pop rdi
    popfq
.endm

.macro GUEST_RUN_USER fn
    push rdi
    mov rdi, \fn
    call rt_run_user
    pop rdi
.endm

.macro GUEST_SET_HANDLER vec, fn
    push rdi
    push rsi
    mov rdi, \vec
    mov rsi, \fn
    call rt_set_handler
    pop rsi
    pop rdi
.endm

# ---------------------------------------------------------------------------------------------
# The GHCB, for guests that speak the protocol themselves (the runtime's #VC handler does it
# for everything else). The runtime's GHCB page is RT_GHCB; rt_ghcb_clear, rt_ghcb_valid,
# rt_ghcb_exit and rt_ghcb_vmgexit are its helpers (guests/lib/sev.s).

# GHCB layout (arch/x86/include/asm/svm.h, struct ghcb; valid bit = offset / 8)
.equ GHCB_CPL, 0x0cb
.equ GHCB_RAX, 0x1f8
.equ GHCB_RCX, 0x308
.equ GHCB_RDX, 0x310
.equ GHCB_RBX, 0x318
.equ GHCB_RSI, 0x330
.equ GHCB_SW_EXITCODE, 0x390
.equ GHCB_SW_EXITINFO1, 0x398
.equ GHCB_SW_EXITINFO2, 0x3a0
.equ GHCB_SW_SCRATCH, 0x3a8
.equ GHCB_VALID, 0x3f0
.equ GHCB_SHARED_BUF, 0x800
.equ GHCB_VERSION, 0xffa
.equ GHCB_USAGE, 0xffc

# GHCB MSR protocol (arch/x86/include/asm/sev-common.h)
.equ GHCB_MSR_CPUID_REQ, 0x004
.equ GHCB_MSR_CPUID_RESP, 0x005
.equ GHCB_MSR_REG_GPA_REQ, 0x012
.equ GHCB_MSR_REG_GPA_RESP, 0x013
.equ GHCB_MSR_PSC_REQ, 0x014
.equ GHCB_MSR_PSC_RESP, 0x015

.equ SVM_EXIT_CPUID, 0x72
.equ SVM_EXIT_IOIO, 0x7b
.equ SVM_EXIT_MSR, 0x7c
.equ SVM_EXIT_VMMCALL, 0x81
.equ SVM_VMGEXIT_PSC, 0x80000010

.equ SNP_PAGE_STATE_PRIVATE, 1
.equ SNP_PAGE_STATE_SHARED, 2
.equ VMGEXIT_PSC_MAX_ENTRY, 253

# Termination reason codes (set 1 = Linux's)
.equ SEV_TERM_SET_LINUX, 1
.equ GHCB_TERM_REGISTER, 0
.equ GHCB_TERM_PSC, 1
.equ GHCB_TERM_PVALIDATE, 2

# Store `value` (a register) into GHCB field `field` and mark it valid. Clobbers rax, rdi.
.macro GHCB_SET field, value
    mov rax, RT_GHCB
    mov qword ptr [rax + \field], \value
    mov rdi, \field
    call rt_ghcb_valid
.endm
