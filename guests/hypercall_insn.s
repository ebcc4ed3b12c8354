# hypercall_insn.s - one hypercall through the instruction chosen by the INSN define.
#
#   INSN=0  VMCALL         (Intel's instruction)
#   INSN=1  VMMCALL        (AMD's instruction; what Linux's kvm_sev_hypercall3 always uses)
#   INSN=2  KVM_HYPERCALL  (the runtime's native instruction, picked at boot from CPUID)
#
# The hypercall is KVM_HC_VAPIC_POLL_IRQ, which KVM answers with 0. On the wrong vendor the
# instruction raises #UD: a plain VM's KVM patches it to the native one and re-executes it
# (KVM_X86_QUIRK_FIX_HYPERCALL_INSN); an SEV guest takes the #UD itself, because KVM cannot
# read (and does not even intercept) its encrypted instruction bytes. The demo runs this guest
# in every cell of its table.

.ifndef INSN
.equ INSN, 2
.endif

guest_main:
    mov rax, KVM_HC_VAPIC_POLL_IRQ
.if INSN == 0
hypercall_site:
    VMCALL
.endif
.if INSN == 1
hypercall_site:
    VMMCALL
.endif
.if INSN == 2
hypercall_site:
    KVM_HYPERCALL
.endif
    GUEST_SYNC rax
    GUEST_ASSERT_EQ rax, 0
    ret
