# prelude.s - the guest API: macros and constants every guest can use.
#
# Assembled in front of every guest (testbed/guest.py). Layout values (UCALL_GPA, UCALL_PORT,
# GUEST_MEM_SIZE, ...) arrive from the host as defines, never by editing this file.
#
# Public API (later issues and external tests use these names exactly):
#   GUEST_SYNC a[, b, c, d, e, f]
#                             report a sync carrying one to six 64-bit values (the ucall's
#                             args, as KVM selftests' GUEST_SYNC_ARGS)
#   GUEST_DONE                the guest passed (returning from guest_main does the same)
#   GUEST_ASSERT cond         abort unless cond (a register or immediate) is non-zero
#   GUEST_ASSERT_EQ a, b      compare a and b; on mismatch report an abort with both values
#                             and the assert's file:line. With a register of 32, 16 or 8 bits
#                             the comparison is at that width (an immediate must fit it,
#                             signed or unsigned, or it never compares equal); two registers
#                             must have the same width.
#   GUEST_ASSERT_NE a, b      the same, asserting a != b (at the same width as _EQ)
#   GUEST_ASSERT_LT/LE/GT/GE a, b
#                             a < b, a <= b, a > b, a >= b as UNSIGNED 64-bit numbers (a
#                             narrow register zero-extended) - what a u64 compares as in C
#   GUEST_ASSERT_SLT/SLE/SGT/SGE a, b
#                             the same as SIGNED 64-bit numbers (s64 in C); 64-bit registers
#                             or immediates only (movsx a narrow value first)
#   GUEST_FAIL "message"      abort with this message. The message is never in guest memory:
#                             testbed/asm.py keeps it in the program's assert-site table and
#                             the guest sends only the site's id, so it reaches the host with
#                             memory encrypted too.
#   GUEST_HELPER_ENTER, GUEST_HELPER_RET
#                             the frame of a helper routine (push rbp; mov rbp, rsp ... leave;
#                             ret). An assert that fails inside a helper entered so (called
#                             with `call`, rbp left alone) also reports the caller's file:line:
#                             the runtime sends [rbp + 8], the return address, and the host
#                             maps it back. The innermost such frame is reported; the runtime
#                             enters guest_main with rbp = 0 (no caller).
#   guest_memset (rdi = dst, rsi = byte, rdx = n; rax = dst)
#   guest_memcpy (rdi = dst, rsi = src, rdx = n; rax = dst; the ranges must not overlap)
#   guest_memcmp (rdi = a, rsi = b, rdx = n; rax = 0 if equal, else a[i] - b[i] at the first
#                 differing byte, as a signed number)
#                             SysV-like string helpers (guests/lib/runtime.s): arguments in
#                             rdi, rsi, rdx; every register but rax (and flags) preserved
#   1:, 1b, 1f                numeric local labels, as in GNU as (testbed/asm.py renames them
#                             for Keystone). Not inside .macro/.rept/.irp bodies; the library
#                             itself uses none, so a guest's `1b` never binds to one of ours.
#   VMCALL, VMMCALL           the raw instructions
#   KVM_HYPERCALL             the CPU's native hypercall instruction, chosen once at boot
#                             (nr in RAX, args in RBX, RCX, RDX, RSI; result in RAX; nothing
#                             else clobbered)
#   GUEST_RUN_USER fn         call routine `fn` at CPL 3; its RAX comes back in RAX
#   GUEST_SET_HANDLER vec, fn install `fn` as the handler of exception `vec`; it is called
#                             with RDI = struct ex_regs * (EX_* offsets below) and may change
#                             the saved registers, e.g. add to EX_RIP to skip an instruction
#   set_memory_shared / set_memory_private   (rdi = gpa, rsi = npages; rax = 0 or -errno)
#   TDCALL, TDVMCALL [mask]   Intel TDX: the raw TDCALL (RAX = leaf) and a raw TDG.VP.VMCALL
#                             (R10-R15 in and out; registers below, at the macros)
#   tdx_panic                 TDX: end the TD with TDG.VP.VMCALL<ReportFatalError> carrying
#                             the 64-byte message at rdi (never returns)
#
# Operands. Where a macro takes a value (GUEST_SYNC, GUEST_ASSERT_EQ, GUEST_RUN_USER,
# GUEST_SET_HANDLER, GHCB_SET's value) it is a general-purpose register of any width (a
# narrow one zero-extended; rsp/esp/sp/spl as they were before the macro) or an immediate:
# any 64-bit value, a label, or an expression of constants. Memory operands are not
# accepted: load the value into a register first. Values are loaded with `movabs`, never
# `push imm` (Keystone 0.9.2 encodes `push 0x80000000` as a 16-bit push; docs/emulator-facts.md).
# A value that cannot be right is refused at assembly time at the line of the call where it
# is a plain constant (testbed/asm.py), and is a #UD at that line at run time otherwise.

# ucall commands, numbered as KVM selftests' lib/ucall_common.h (the host's UcallCmd in
# testbed/vmm/ucall.py; tests/test_constants.py checks they agree)
.equ UCALL_NONE, 0
.equ UCALL_SYNC, 1
.equ UCALL_ABORT, 2
.equ UCALL_PRINTF, 3
.equ UCALL_DONE, 4
.equ UCALL_UNHANDLED, 5
# struct ucall in the ucall page: cmd, nargs, args[UCALL_MAX_ARGS]
.equ UCALL_CMD, 0
.equ UCALL_NARGS, 8
.equ UCALL_ARGS, 16
.equ UCALL_MAX_ARGS, 6

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
.equ VE_VECTOR, 20
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
    movabs rax, \set
    cmp rax, 15
    .byte 0x76, 0x02                   # jbe over the ud2 (Keystone drops `jbe $ + 4`)
    ud2                                # reason set above 15: #UD at this line
    movabs rdx, \code
    cmp rdx, 255
    .byte 0x76, 0x02
    ud2                                # reason code above 255: #UD at this line
    shl rax, 12
    shl rdx, 16
    or rax, rdx
    or rax, GHCB_MSR_TERM_REQ
    mov ecx, MSR_AMD64_SEV_ES_GHCB
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

# ---------------------------------------------------------------------------------------------
# Intel TDX (arch/x86/include/asm/shared/tdx.h; the runtime's half is guests/lib/tdx.s).
# TDCALL: RAX = the leaf; the TDX module's status comes back in RAX (0 = success), other
# outputs as the leaf defines. Keystone 0.9.2 has no `tdcall`.
.macro TDCALL
    .byte 0x66, 0x0f, 0x01, 0xcc
.endm

# TDVMCALL: a raw TDG.VP.VMCALL, for guests that speak the protocol themselves (the runtime's
# #VE handler, KVM_HYPERCALL and set_memory_* do it for everything else). In: R10 = 0 for a
# GHCI-standard call (R11 = the sub-function: TDVMCALL_* or an EXIT_REASON_* instruction leaf,
# R12-R15 its arguments) or a KVM hypercall number (R11-R14 = its arguments); `mask` = the
# registers exposed to the VMM (RCX's bitmap, default Linux's TDVMCALL_EXPOSE_REGS_MASK).
# Out: RAX = TDCALL's own status (0 unless the call itself failed), R10 = the TDVMCALL status
# (TDVMCALL_STATUS_*, or a KVM hypercall's result), R11 = the return value (R12-R15 for CPUID).
# Clobbers RAX and RCX; any exposed register may come back changed.
.macro TDVMCALL mask=TDVMCALL_EXPOSE_REGS_MASK
    mov ecx, \mask
    xor eax, eax
    TDCALL
.endm

.equ TDG_VP_VMCALL, 0
.equ TDG_VP_INFO, 1
.equ TDG_VP_VEINFO_GET, 3
.equ TDG_MR_REPORT, 4
.equ TDG_MEM_PAGE_ACCEPT, 6
.equ TDG_VM_WR, 8
.equ TDX_PS_4K, 0
.equ TDX_PS_2M, 1
.equ TDX_PS_1G, 2
.equ TDX_CPUID_LEAF_ID, 0x21
.equ TDX_HYPERCALL_STANDARD, 0
.equ TDVMCALL_EXPOSE_REGS_MASK, 0xffcc  # RDX, RBX, RSI, RDI, R8-R15
.equ TDVMCALL_GET_TD_VM_CALL_INFO, 0x10000
.equ TDVMCALL_MAP_GPA, 0x10001
.equ TDVMCALL_GET_QUOTE, 0x10002
.equ TDVMCALL_REPORT_FATAL_ERROR, 0x10003
.equ TDVMCALL_STATUS_SUCCESS, 0
.equ TDVMCALL_STATUS_RETRY, 1
.equ TDVMCALL_STATUS_INVALID_OPERAND, 0x8000000000000000
.equ TDVMCALL_STATUS_ALIGN_ERROR, 0x8000000000000002
.equ TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED, 0x8000000000000003
# VMX exit reasons: the instruction leaves' numbers and VEINFO's exit reason
.equ EXIT_REASON_CPUID, 10
.equ EXIT_REASON_HLT, 12
.equ EXIT_REASON_VMCALL, 18
.equ EXIT_REASON_IO_INSTRUCTION, 30
.equ EXIT_REASON_MSR_READ, 31
.equ EXIT_REASON_MSR_WRITE, 32
.equ EXIT_REASON_EPT_VIOLATION, 48

# -- operand loading (internal) ---------------------------------------------------------------
# __guest_kind SYM, x: set SYM to the width of x if it is a general-purpose register (64, 32,
# 16 or 8), that width + 1 for the stack pointer (rsp, esp, sp, spl), 0 for anything else.
# Register names are matched in lower or upper case (testbed/asm.py lower-cases register
# operands of these macros where it sees them; mixed case reaches here only through another
# macro). Memory operands count as 0 and are then refused by `movabs` (testbed/asm.py says
# so where it sees them).
.macro __guest_kind sym, x
    .set \sym, 0
    .irp r, rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15
    .ifc \x, \r
    .set \sym, 64
    .endif
    .endr
    .irp r, RAX, RBX, RCX, RDX, RSI, RDI, RBP, R8, R9, R10, R11, R12, R13, R14, R15
    .ifc \x, \r
    .set \sym, 64
    .endif
    .endr
    .irp r, eax, ebx, ecx, edx, esi, edi, ebp, r8d, r9d, r10d, r11d, r12d, r13d, r14d, r15d
    .ifc \x, \r
    .set \sym, 32
    .endif
    .endr
    .irp r, EAX, EBX, ECX, EDX, ESI, EDI, EBP, R8D, R9D, R10D, R11D, R12D, R13D, R14D, R15D
    .ifc \x, \r
    .set \sym, 32
    .endif
    .endr
    .irp r, ax, bx, cx, dx, si, di, bp, r8w, r9w, r10w, r11w, r12w, r13w, r14w, r15w
    .ifc \x, \r
    .set \sym, 16
    .endif
    .endr
    .irp r, AX, BX, CX, DX, SI, DI, BP, R8W, R9W, R10W, R11W, R12W, R13W, R14W, R15W
    .ifc \x, \r
    .set \sym, 16
    .endif
    .endr
    .irp r, al, bl, cl, dl, sil, dil, bpl, r8b, r9b, r10b, r11b, r12b, r13b, r14b, r15b, ah, bh, ch, dh
    .ifc \x, \r
    .set \sym, 8
    .endif
    .endr
    .irp r, AL, BL, CL, DL, SIL, DIL, BPL, R8B, R9B, R10B, R11B, R12B, R13B, R14B, R15B, AH, BH, CH, DH
    .ifc \x, \r
    .set \sym, 8
    .endif
    .endr
    .irp r, rsp
    .ifc \x, \r
    .set \sym, 65
    .endif
    .endr
    .irp r, RSP
    .ifc \x, \r
    .set \sym, 65
    .endif
    .endr
    .irp r, esp
    .ifc \x, \r
    .set \sym, 33
    .endif
    .endr
    .irp r, ESP
    .ifc \x, \r
    .set \sym, 33
    .endif
    .endr
    .irp r, sp
    .ifc \x, \r
    .set \sym, 17
    .endif
    .endr
    .irp r, SP
    .ifc \x, \r
    .set \sym, 17
    .endif
    .endr
    .irp r, spl
    .ifc \x, \r
    .set \sym, 9
    .endif
    .endr
    .irp r, SPL
    .ifc \x, \r
    .set \sym, 9
    .endif
    .endr
.endm

# __guest_load d64, d32, x, kind, depth: d64 = x; `kind` is x's __guest_kind. A register is
# zero-extended from its width, an immediate loaded whole with movabs (64 bits, whatever the
# value; `mov` would sign-extend a 32-bit encoding of a symbol defined later). `depth` is how
# far rsp is below its value at the macro call. d64/d32 must be rdi/edi or rsi/esi (movzx
# from ah..dh cannot take a REX prefix).
#
# Hazard: Keystone 0.9.2 silently drops an .if whose expression it cannot evaluate yet (a
# label, a symbol defined later) and applies its .else/.endif to the enclosing block, so no
# .if here looks at a value: values are checked at run time (a ud2 at the caller's line) and,
# where they are plain constants, by testbed/asm.py at assembly time.
.macro __guest_load d64, d32, x, kind, depth
    .if (\kind) == 64
    mov \d64, \x
    .elseif (\kind) == 32
    mov \d32, \x
    .elseif ((\kind) == 16) || ((\kind) == 8)
    movzx \d32, \x
    .elseif (\kind) & 1
    lea \d64, [rsp + \depth]
    __guest_truncate \d64, \d32, (\kind) - 1
    .else
    movabs \d64, \x
    .endif
.endm

.macro __guest_truncate d64, d32, width
    .if (\width) == 32
    mov \d32, \d32
    .elseif (\width) == 16
    and \d64, 0xffff
    .elseif (\width) == 8
    and \d64, 0xff
    .endif
.endm

# The values go into six slots on the stack, then rt_ucall_sync(rdi = slots, rsi = count)
# copies them into the ucall page. Every register but flags is preserved.
.macro GUEST_SYNC a, b=, c=, d=, e=, f=
    push rdi
    push rsi
    sub rsp, 48
    __guest_sync_value 0, \a
    .ifnb \b
    __guest_sync_value 8, \b
    .endif
    .ifnb \c
    __guest_sync_value 16, \c
    .endif
    .ifnb \d
    __guest_sync_value 24, \d
    .endif
    .ifnb \e
    __guest_sync_value 32, \e
    .endif
    .ifnb \f
    __guest_sync_value 40, \f
    .endif
    mov esi, 1
    .ifnb \b
    mov esi, 2
    .endif
    .ifnb \c
    mov esi, 3
    .endif
    .ifnb \d
    mov esi, 4
    .endif
    .ifnb \e
    mov esi, 5
    .endif
    .ifnb \f
    mov esi, 6
    .endif
    mov rdi, rsp
    call rt_ucall_sync
    add rsp, 48
    pop rsi
    pop rdi
.endm

# one GUEST_SYNC value into its slot at [rsp + offset] (rsp is 64 below the caller's)
.macro __guest_sync_value offset, x
    mov rdi, qword ptr [rsp + 56]      # the caller's rdi and rsi again, in case \x names one
    mov rsi, qword ptr [rsp + 48]
    __guest_kind __guest_ka, \x
    __guest_load rdi, edi, \x, __guest_ka, 64
    mov qword ptr [rsp + \offset], rdi
.endm

.macro GUEST_DONE
    call rt_ucall_done
.endm

# The image's note for the control plane (testbed/asm records it in Program.features; no byte
# of it is assembled). GUEST_IMAGE_FEATURE NAME declares a feature the image uses: the runtime
# declares MAP_GPA_RANGE, since it tells the host of every conversion (KVM_HC_MAP_GPA_RANGE, or
# the GHCB Page State Change / TDX MapGPA that KVM turns into it). GUEST_IMAGE_LEGACY, written
# once at the top level of a guest, makes the image legacy: the note withdraws MAP_GPA_RANGE
# and the runtime's set_memory_shared/set_memory_private only change the guest's own PTEs
# (C-bit / shared bit; PVALIDATE on SNP) and never tell the host, as a pre-5.16 Linux SEV guest.
# `testbed run` refuses a legacy image on a guest_memfd VM type (--force runs it anyway).
.macro GUEST_IMAGE_FEATURE name
.endm

.macro GUEST_IMAGE_LEGACY
    .equ GUEST_IMAGE_IS_LEGACY, 1
.endm

# The last argument of every assert is the call-site id that testbed/asm.py appends to each
# GUEST_ASSERT*/GUEST_FAIL statement; the host maps it back to the file:line where the assert
# is written and to its text. A failed assert calls rt_guest_assert_fail (rdi, rsi = values,
# ecx = how many, rdx = site), which sends UCALL_ABORT and never returns. An assert that
# holds changes no register and no flag.

# __guest_assert2 a, b, site, jpass, narrow: compare a with b (cmp a, b) and jump over the
# failure with `jpass`. narrow = 1: with a register of 32, 16 or 8 bits the comparison is at
# that width (EQ, NE); narrow = 0: zero-extended 64-bit values.
.macro __guest_assert2 a, b, site, jpass, narrow
    __guest_kind __guest_ka, \a
    __guest_kind __guest_kb, \b
    .set __guest_w, 64
    .if \narrow
    # the width of the comparison: the register operands' (which must agree), else 64
    .set __guest_wa, (__guest_ka) - ((__guest_ka) & 1)
    .set __guest_wb, (__guest_kb) - ((__guest_kb) & 1)
    .if __guest_wa && __guest_wb && (__guest_wa != __guest_wb)
    .error "GUEST_ASSERT_EQ/NE: the two registers have different widths"
    .endif
    .if __guest_wa
    .set __guest_w, __guest_wa
    .elseif __guest_wb
    .set __guest_w, __guest_wb
    .endif
    .endif
    pushfq
    push rdi
    push rsi
    push rdx
    __guest_load rdi, edi, \a, __guest_ka, 32
    push rdi
    mov rdi, qword ptr [rsp + 24]      # the caller's rdi again, in case \b names it
    __guest_load rsi, esi, \b, __guest_kb, 40
    pop rdi
    .if __guest_w < 64
    # an immediate against a narrow register: reduced to that width if it fits it
    # (rt_narrow_imm); a value that does not fit is kept whole and so never compares equal
    .if __guest_w == 32
    mov edx, 32
    .elseif __guest_w == 16
    mov edx, 16
    .else
    mov edx, 8
    .endif
    .if __guest_kb == 0
    call rt_narrow_imm
    .endif
    .if __guest_ka == 0
    xchg rdi, rsi
    call rt_narrow_imm
    xchg rdi, rsi
    .endif
    .endif
    cmp rdi, rsi
    \jpass __guest_assert_ok_\site
    mov rdx, \site
    mov ecx, 2
    call rt_guest_assert_fail
__guest_assert_ok_\site:
    pop rdx
    pop rsi
    pop rdi
    popfq
.endm

.macro GUEST_ASSERT_EQ a, b, site
    __guest_assert2 \a, \b, \site, je, 1
.endm

.macro GUEST_ASSERT_NE a, b, site
    __guest_assert2 \a, \b, \site, jne, 1
.endm

.macro GUEST_ASSERT_LT a, b, site
    __guest_assert2 \a, \b, \site, jb, 0
.endm

.macro GUEST_ASSERT_LE a, b, site
    __guest_assert2 \a, \b, \site, jbe, 0
.endm

.macro GUEST_ASSERT_GT a, b, site
    __guest_assert2 \a, \b, \site, ja, 0
.endm

.macro GUEST_ASSERT_GE a, b, site
    __guest_assert2 \a, \b, \site, jae, 0
.endm

.macro GUEST_ASSERT_SLT a, b, site
    __guest_assert2 \a, \b, \site, jl, 0
.endm

.macro GUEST_ASSERT_SLE a, b, site
    __guest_assert2 \a, \b, \site, jle, 0
.endm

.macro GUEST_ASSERT_SGT a, b, site
    __guest_assert2 \a, \b, \site, jg, 0
.endm

.macro GUEST_ASSERT_SGE a, b, site
    __guest_assert2 \a, \b, \site, jge, 0
.endm

.macro GUEST_ASSERT cond, site
    pushfq
    push rdi
    push rsi
    push rdx
    __guest_kind __guest_ka, \cond
    __guest_load rdi, edi, \cond, __guest_ka, 32
    test rdi, rdi
    jnz __guest_assert_ok_\site
    xor esi, esi
    mov rdx, \site
    mov ecx, 1
    call rt_guest_assert_fail
__guest_assert_ok_\site:
    pop rdx
    pop rsi
    pop rdi
    popfq
.endm

# `msg` is what testbed/asm.py leaves of the message (0): the text is in the site table.
.macro GUEST_FAIL msg, site
    mov rdx, \site
    xor ecx, ecx
    call rt_guest_assert_fail
.endm

.macro GUEST_HELPER_ENTER
    push rbp
    mov rbp, rsp
.endm

.macro GUEST_HELPER_RET
    leave
    ret
.endm

.macro GUEST_RUN_USER fn
    push rdi
    __guest_kind __guest_ka, \fn
    __guest_load rdi, edi, \fn, __guest_ka, 8
    call rt_run_user
    pop rdi
.endm

# vec: 0 to 31 (the runtime dispatches exception vectors only); above that #UD at this line.
.macro GUEST_SET_HANDLER vec, fn
    __guest_kind __guest_ka, \vec
    __guest_kind __guest_kb, \fn
    push rdi
    push rsi
    __guest_load rdi, edi, \vec, __guest_ka, 16
    cmp rdi, 31
    .byte 0x76, 0x02                   # jbe over the ud2 (Keystone drops `jbe $ + 4`)
    ud2                                # vector above 31: #UD at this line
    push rdi
    mov rdi, qword ptr [rsp + 16]      # the caller's rdi again, in case \fn names it
    __guest_load rsi, esi, \fn, __guest_kb, 24
    pop rdi
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
.equ GHCB_XCR0, 0x3e8
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
.equ SVM_EXIT_WBINVD, 0x89
.equ SVM_VMGEXIT_PSC, 0x80000010

.equ SNP_PAGE_STATE_PRIVATE, 1
.equ SNP_PAGE_STATE_SHARED, 2
# sev-common.h: the entries a Linux guest builds at most, and the most one GHCB holds
.equ VMGEXIT_PSC_MAX_ENTRY, 64
.equ VMGEXIT_PSC_MAX_COUNT, 253

# Termination reason codes (set 1 = Linux's)
.equ SEV_TERM_SET_LINUX, 1
.equ GHCB_TERM_REGISTER, 0
.equ GHCB_TERM_PSC, 1
.equ GHCB_TERM_PVALIDATE, 2

# Store `value` (a register or an immediate, 8 bytes) into GHCB field `field` (an offset,
# 0 to 0xff8; beyond that #UD at this line) and mark it valid. Clobbers rax, rdi.
.macro GHCB_SET field, value
    __guest_kind __guest_ka, \value
    __guest_load rdi, edi, \value, __guest_ka, 0
    movabs rax, \field
    cmp rax, 0xff8
    .byte 0x76, 0x02                   # jbe over the ud2 (Keystone drops `jbe $ + 4`)
    ud2                                # field beyond the GHCB page: #UD at this line
    push rdi
    mov rdi, rax
    mov rax, RT_GHCB
    add rax, rdi
    pop qword ptr [rax]
    call rt_ghcb_valid
.endm
