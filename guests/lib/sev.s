# sev.s - the runtime's SEV-ES / SEV-SNP half: the GHCB, the #VC handler, PVALIDATE, PSC.
#
# Included by runtime.s. With SEV-ES the hypervisor cannot read our registers, so every
# intercepted instruction (CPUID, IN/OUT, RDMSR/WRMSR, VMMCALL) raises #VC in the guest and
# this handler forwards it through the GHCB, a page shared with the host (the GHCB page
# protocol: fill the fields, set their valid bits, write the GHCB's GPA to the GHCB MSR and
# VMGEXIT). Before the GHCB is set up, CPUID goes through the GHCB MSR protocol. On SNP the
# runtime also validates its memory (PVALIDATE) and converts pages with Page State Change
# requests, as Linux's arch/x86/coco/sev does.

.equ RT_GHCB_READY, RT_DATA + 0x820
.equ RT_GHCB_PROTOCOL, RT_DATA + 0x828  # the negotiated GHCB protocol version (1 or 2)

# rdi = GHCB MSR value to send; returns the GHCB MSR value the hypervisor left in rax
rt_ghcb_msr_call:
    push rcx
    push rdx
    mov ecx, MSR_AMD64_SEV_ES_GHCB
    mov rax, rdi
    mov rdx, rdi
    shr rdx, 32
    wrmsr
    rep vmmcall
    rdmsr
    shl rdx, 32
    or rax, rdx
    pop rdx
    pop rcx
    ret

rt_sev_terminate:
    GUEST_TERMINATE 1, 0
    jmp rt_sev_terminate

# VMGEXIT with the GHCB page: the GHCB MSR gets the GHCB's GPA first (Linux re-writes it
# before every exit, since the MSR protocol may have left another value in it).
rt_ghcb_vmgexit:
    push rax
    push rcx
    push rdx
    mov ecx, MSR_AMD64_SEV_ES_GHCB
    mov eax, RT_GHCB
    xor edx, edx
    wrmsr
    rep vmmcall
    pop rdx
    pop rcx
    pop rax
    ret

# Clear the valid bitmap and set the usage/version fields.
rt_ghcb_clear:
    push rax
    push rbx
    mov rax, RT_GHCB
    mov qword ptr [rax + GHCB_VALID], 0
    mov qword ptr [rax + GHCB_VALID + 8], 0
    mov rbx, RT_GHCB_PROTOCOL
    mov rbx, qword ptr [rbx]
    mov word ptr [rax + GHCB_VERSION], bx  # sev_es_ghcb_hv_call(): ghcb_version
    mov dword ptr [rax + GHCB_USAGE], 0
    pop rbx
    pop rax
    ret

# rdi = field offset: set its valid bit (bit offset/8 of the 128-bit bitmap)
rt_ghcb_valid:
    push rax
    push rcx
    mov rcx, rdi
    shr rcx, 3
    mov rax, RT_GHCB
    bts qword ptr [rax + GHCB_VALID], rcx
    pop rcx
    pop rax
    ret


# Fill SW_EXITCODE/INFO1/INFO2 (valid), VMGEXIT, return EXITINFO1's low 32 bits in rax.
# rdi = exit code, rsi = info1, rdx = info2
rt_ghcb_exit:
    push rbx
    mov rbx, rdi
    GHCB_SET GHCB_SW_EXITCODE, rbx
    GHCB_SET GHCB_SW_EXITINFO1, rsi
    GHCB_SET GHCB_SW_EXITINFO2, rdx
    call rt_ghcb_vmgexit
    mov rax, RT_GHCB
    mov eax, dword ptr [rax + GHCB_SW_EXITINFO1]
    pop rbx
    ret

# #VC handler helpers (r15 = struct ex_regs *).
# Copy a saved register into a GHCB field and mark it valid. Clobbers rax, rbx, rdi.
.macro VC_TO_GHCB ex_field, ghcb_field
    mov rbx, qword ptr [r15 + \ex_field]
    GHCB_SET \ghcb_field, rbx
.endm

# Copy a GHCB field back into the saved registers. Clobbers rax, rbx.
.macro VC_FROM_GHCB ghcb_field, ex_field
    mov rax, RT_GHCB
    mov rbx, qword ptr [rax + \ghcb_field]
    mov qword ptr [r15 + \ex_field], rbx
.endm

# VMGEXIT with exit code `code` and EXITINFO1 `info1` (a register or an immediate); any
# answer other than success is reported by rt_vc_unhandled.
.macro VC_EXIT code, info1
    mov rdi, \code
    mov rsi, \info1
    xor edx, edx
    call rt_ghcb_exit
    test eax, eax
    jnz rt_vc_unhandled
.endm

# ---------------------------------------------------------------------------------------------
# The #VC handler: rdi = struct ex_regs * (error code = the SVM exit code)
rt_vc_handler:
    mov r15, rdi
    mov r14, qword ptr [r15 + EX_ERROR_CODE]
    mov rax, RT_GHCB_READY
    cmp qword ptr [rax], 0
    je rt_vc_early
    call rt_ghcb_clear
    cmp r14, SVM_EXIT_CPUID
    je rt_vc_cpuid
    cmp r14, SVM_EXIT_VMMCALL
    je rt_vc_vmmcall
    cmp r14, SVM_EXIT_IOIO
    je rt_vc_ioio
    cmp r14, SVM_EXIT_MSR
    je rt_vc_msr
    cmp r14, SVM_EXIT_WBINVD
    je rt_vc_wbinvd
    jmp rt_vc_unhandled                # INVD among them: Linux's ES_UNSUPPORTED

# WBINVD: the hypervisor flushes (vc_handle_wbinvd: SVM_EXIT_WBINVD, no registers).
rt_vc_wbinvd:
    VC_EXIT SVM_EXIT_WBINVD, 0
    jmp rt_vc_skip_0f

rt_vc_cpuid:
    VC_TO_GHCB EX_RAX, GHCB_RAX
    VC_TO_GHCB EX_RCX, GHCB_RCX
    # vc_handle_cpuid(): XCR0 too (KVM needs it for leaf 0xD): XGETBV(0) with CR4.OSXSAVE, else 1
    mov rbx, 1
    mov rax, cr4
    bt rax, 18
    jnc rt_vc_cpuid_xcr0
    xor ecx, ecx
    xgetbv
    shl rdx, 32
    mov ebx, eax
    or rbx, rdx
rt_vc_cpuid_xcr0:
    GHCB_SET GHCB_XCR0, rbx
    VC_EXIT SVM_EXIT_CPUID, 0
    VC_FROM_GHCB GHCB_RAX, EX_RAX
    VC_FROM_GHCB GHCB_RBX, EX_RBX
    VC_FROM_GHCB GHCB_RCX, EX_RCX
    VC_FROM_GHCB GHCB_RDX, EX_RDX
    jmp rt_vc_skip_0f

# RIP past the two-byte 0F instruction (CPUID, RDMSR, WRMSR) at it and the prefixes before it.
rt_vc_skip_0f:
    call rt_vc_insn
    call rt_vc_prefixes
    add rax, 2
    add qword ptr [r15 + EX_RIP], rax
    ret

# The instruction that raised #VC: r13 = its linear address (CS.base + RIP, the base 0 in
# 64-bit code), r12 = 1 in 64-bit code, where 40-4F are REX prefixes, 0 in compatibility mode,
# where they are INC/DEC - from CS's descriptor in the GDT, as Linux's insn_get_effective_ip()
# and user_64bit_mode(). An LDT selector counts as 64-bit code (the runtime has no LDT).
# Clobbers rax and rcx.
rt_vc_insn:
    mov r13, qword ptr [r15 + EX_RIP]
    mov r12d, 1
    movzx ecx, word ptr [r15 + EX_CS]
    test ecx, 4
    jnz rt_vc_insn_done
    and ecx, 0xfff8
    sub rsp, 16
    sgdt [rsp]
    mov rax, qword ptr [rsp + 2]       # the GDT's base
    add rsp, 16
    mov rax, qword ptr [rax + rcx]     # CS's descriptor
    bt rax, 53                         # L: 64-bit code
    jc rt_vc_insn_done
    xor r12d, r12d
    mov rcx, rax
    shr rcx, 16
    and ecx, 0xffffff                  # base 23:0
    shr rax, 56
    shl eax, 24                        # base 31:24
    or eax, ecx
    add r13d, eax                      # EIP + base, within 4 GiB (zero-extended)
rt_vc_insn_done:
    ret

# r13, r12 as rt_vc_insn leaves them: rax = the prefixes before the opcode (legacy ones, and REX
# in 64-bit code; at most 14, before a one-byte IN/OUT DX: 15 bytes in all), so that the handler
# finds the opcode and the length, as Linux's #VC handler decodes the instruction
# (vc_decode_insn). Clobbers rcx.
rt_vc_prefixes:
    xor eax, eax
rt_vc_prefixes_loop:
    cmp eax, 14
    jae rt_vc_prefixes_done
    movzx ecx, byte ptr [r13 + rax]
    and ecx, 0xf0
    cmp ecx, 0x40                      # REX, in 64-bit code
    jne rt_vc_prefixes_legacy
    test r12d, r12d
    jnz rt_vc_prefixes_next
    jmp rt_vc_prefixes_done
rt_vc_prefixes_legacy:
    movzx ecx, byte ptr [r13 + rax]
    cmp ecx, 0x66                      # operand size
    je rt_vc_prefixes_next
    cmp ecx, 0x67                      # address size
    je rt_vc_prefixes_next
    cmp ecx, 0xf2                      # REPNE
    je rt_vc_prefixes_next
    cmp ecx, 0xf3                      # REP
    je rt_vc_prefixes_next
    cmp ecx, 0x64                      # FS, GS
    je rt_vc_prefixes_next
    cmp ecx, 0x65
    je rt_vc_prefixes_next
    and ecx, 0xe7                      # ES 26, CS 2E, SS 36, DS 3E: 001xx110
    cmp ecx, 0x26
    jne rt_vc_prefixes_done
rt_vc_prefixes_next:
    inc eax
    jmp rt_vc_prefixes_loop
rt_vc_prefixes_done:
    ret

rt_vc_vmmcall:
    VC_TO_GHCB EX_RAX, GHCB_RAX
    VC_TO_GHCB EX_RBX, GHCB_RBX
    VC_TO_GHCB EX_RCX, GHCB_RCX
    VC_TO_GHCB EX_RDX, GHCB_RDX
    VC_TO_GHCB EX_RSI, GHCB_RSI
    # CPL: KVM takes it from the GHCB (sev_es_validate_vmgexit requires it valid)
    mov rbx, qword ptr [r15 + EX_CS]
    and rbx, 3
    mov rax, RT_GHCB
    mov byte ptr [rax + GHCB_CPL], bl
    mov rdi, GHCB_CPL
    call rt_ghcb_valid
    VC_EXIT SVM_EXIT_VMMCALL, 0
    VC_FROM_GHCB GHCB_RAX, EX_RAX          # the hypercall ABI returns RAX only
    add qword ptr [r15 + EX_RIP], 3
    ret

# IN/OUT: decode the instruction at CS.base + RIP, its prefixes too, as vc_ioio_exitinfo()
# does; INS/OUTS go on at rt_vc_ioio_string.
rt_vc_ioio:
    call rt_vc_insn                    # r13: where its bytes are, r12: 64-bit code
    call rt_vc_prefixes                # rax: the prefixes before the opcode
    mov r10, rax                       # instruction length so far
    mov r11, 4                         # operand size
    xor ebx, ebx                       # 67 seen: the address size halved (INS/OUTS)
    xor r14d, r14d                     # F2/F3 seen: REP (INS/OUTS)
    xor ecx, ecx
rt_vc_ioio_prefix:
    cmp rcx, rax
    jae rt_vc_ioio_opcode
    movzx edx, byte ptr [r13 + rcx]
    cmp edx, 0x66
    jne rt_vc_ioio_not_66
    mov r11, 2                         # operand size prefix: 16 bits (REX.W changes nothing)
rt_vc_ioio_not_66:
    cmp edx, 0x67
    jne rt_vc_ioio_not_67
    mov ebx, 1
rt_vc_ioio_not_67:
    or edx, 1
    cmp edx, 0xf3                      # F2 or F3
    jne rt_vc_ioio_next_prefix
    mov r14d, 1
rt_vc_ioio_next_prefix:
    inc rcx
    jmp rt_vc_ioio_prefix
rt_vc_ioio_opcode:
    movzx r9d, byte ptr [r13 + r10]
    and r9d, 0xfc
    cmp r9d, 0x6c
    je rt_vc_ioio_string               # 6C-6F (r12 is still rt_vc_insn's 64-bit code flag)
    movzx r12, byte ptr [r13 + r10]
    inc r10
    mov r9, r12                        # low bit: 0 = byte size
    test r9, 1
    jnz rt_vc_ioio_wide
    mov r11, 1
rt_vc_ioio_wide:
    # port: imm8 for E4-E7, DX for EC-EF
    cmp r12, 0xec
    jae rt_vc_ioio_dx
    movzx r8, byte ptr [r13 + r10]
    inc r10
    jmp rt_vc_ioio_port
rt_vc_ioio_dx:
    mov r8, qword ptr [r15 + EX_RDX]
    and r8, 0xffff
rt_vc_ioio_port:
    # exitinfo1 = port << 16 | size (SZ8 1<<4, SZ16 1<<5, SZ32 1<<6) | IN
    mov rsi, r8
    shl rsi, 16
    mov rax, r11
    shl rax, 4
    or rsi, rax
    mov rax, r12
    and rax, 2                         # E6/E7/EE/EF have bit 1 set: OUT
    jnz rt_vc_ioio_out
    or rsi, 1
    jmp rt_vc_ioio_go
rt_vc_ioio_out:
    VC_TO_GHCB EX_RAX, GHCB_RAX
rt_vc_ioio_go:
    mov rdi, SVM_EXIT_IOIO
    xor edx, edx
    push rsi
    call rt_ghcb_exit
    pop rsi
    test eax, eax
    jnz rt_vc_unhandled
    test rsi, 1
    jz rt_vc_ioio_done
    # IN: merge the low `size` bytes of the GHCB's RAX into the saved RAX, as the CPU writes AL
    # or AX; a 32-bit IN writes EAX, which zero-extends into RAX
    mov rcx, r11
    shl rcx, 3
    mov rax, 1
    shl rax, cl
    dec rax                            # mask
    mov rbx, RT_GHCB
    mov rbx, qword ptr [rbx + GHCB_RAX]
    and rbx, rax
    cmp r11, 4
    jne rt_vc_ioio_merge
    mov qword ptr [r15 + EX_RAX], rbx
    jmp rt_vc_ioio_done
rt_vc_ioio_merge:
    not rax
    and qword ptr [r15 + EX_RAX], rax
    or qword ptr [r15 + EX_RAX], rbx
rt_vc_ioio_done:
    add qword ptr [r15 + EX_RIP], r10
    ret

# INS/OUTS (6C-6F), as the string branch of Linux's vc_handle_ioio(): up to the GHCB shared
# buffer's 2,032 bytes of elements per #VC (count RCX with REP, else 1), copied from [RSI]
# into the buffer for OUTS before the VMGEXIT (SW_SCRATCH = the buffer, EXITINFO2 = the
# count) and from the buffer to [RDI] for INS after it, element i at RSI/RDI - i * size with
# DF; RSI/RDI move by the bytes moved and REP counts RCX down; the instruction runs again
# (RIP unchanged) while RCX is not 0. EXITINFO1 has STR, REP, the address size (A64 in 64-bit
# code, A32 outside, halved by 67) and the segment (ES for INS, DS for OUTS, as Linux sets it
# whatever the override); the addresses are RSI and RDI themselves (Linux adds ES's base: 0 in
# 64-bit code). Deviations from Linux: REP with RCX = 0 only skips the instruction (no
# VMGEXIT of count 0), and without REP the instruction is done after one element (Linux
# retries while RCX is not 0, whatever the prefix: a plain INS/OUTS with RCX != 0 would loop).
# In: r13 = the instruction, r10 = its prefixes, r11 = 2 with 66 else 4, r12 = 64-bit code,
# rbx = 1 with 67, r14 = 1 with REP (rt_vc_ioio's prefix loop).
rt_vc_ioio_string:
    movzx r9d, byte ptr [r13 + r10]    # the opcode: bit 0 = not a byte, bit 1 = OUTS
    inc r10                            # the instruction's length
    test r9d, 1
    jnz rt_vc_ios_wide
    mov r11, 1
rt_vc_ios_wide:
    mov r8, 4                          # address size
    test r12, r12
    jz rt_vc_ios_asize
    mov r8, 8
rt_vc_ios_asize:
    mov ecx, ebx
    shr r8, cl
    mov rsi, qword ptr [r15 + EX_RDX]
    and esi, 0xffff
    shl rsi, 16                        # port
    mov rax, r11
    shl rax, 4
    or rsi, rax                        # SZ8 / SZ16 / SZ32
    mov rax, r8
    shl rax, 6                         # A16 1 << 7, A32 2 << 7, A64 4 << 7
    or rsi, rax
    or rsi, 4                          # STR
    test r9d, 2
    jnz rt_vc_ios_outs
    or rsi, 1                          # IN, segment ES (0)
    jmp rt_vc_ios_rep
rt_vc_ios_outs:
    or rsi, 3 << 10                    # segment DS
rt_vc_ios_rep:
    mov r12, 1                         # the count
    test r14d, r14d
    jz rt_vc_ios_count
    or rsi, 8                          # REP
    mov r12, qword ptr [r15 + EX_RCX]
    test r12, r12
    jz rt_vc_ioio_done                 # REP with RCX = 0: nothing to move
rt_vc_ios_count:
    mov eax, 2032                      # sizeof(ghcb->shared_buffer)
    xor edx, edx
    div r11
    cmp r12, rax
    jbe rt_vc_ios_counted
    mov r12, rax
rt_vc_ios_counted:
    mov rbx, r11                       # rbx = the step: -size with DF
    test qword ptr [r15 + EX_RFLAGS], 0x400
    jz rt_vc_ios_step
    neg rbx
rt_vc_ios_step:
    test r9d, 2
    jz rt_vc_ios_exit
    push rsi
    mov rdi, qword ptr [r15 + EX_RSI]  # OUTS: elements from [RSI] into the buffer
    mov rsi, rbx
    mov rdx, RT_GHCB + GHCB_SHARED_BUF
    mov r8, r11
    call rt_vc_ios_copy
    pop rsi
rt_vc_ios_exit:
    push rsi
    mov rax, RT_GHCB + GHCB_SHARED_BUF
    GHCB_SET GHCB_SW_SCRATCH, rax
    pop rsi
    mov rdi, SVM_EXIT_IOIO
    mov rdx, r12
    push rsi
    call rt_ghcb_exit
    pop rsi
    test eax, eax
    jnz rt_vc_unhandled
    mov rax, r12
    imul rax, rbx                      # the bytes moved, signed by DF
    test r9d, 2
    jnz rt_vc_ios_outs_done
    mov rdi, RT_GHCB + GHCB_SHARED_BUF # INS: elements from the buffer to [RDI]
    mov rsi, r11
    mov rdx, qword ptr [r15 + EX_RDI]
    mov r8, rbx
    push rax
    call rt_vc_ios_copy
    pop rax
    add qword ptr [r15 + EX_RDI], rax
    jmp rt_vc_ios_counted_down
rt_vc_ios_outs_done:
    add qword ptr [r15 + EX_RSI], rax
rt_vc_ios_counted_down:
    test r14d, r14d
    jz rt_vc_ioio_done
    sub qword ptr [r15 + EX_RCX], r12
    jz rt_vc_ioio_done
    ret                                # RCX left: the instruction runs again

# r12 elements of r11 bytes: element i from rdi + i * rsi to rdx + i * r8. Clobbers rax, rcx,
# rdx, rdi, r13.
rt_vc_ios_copy:
    xor r13d, r13d
rt_vc_ios_copy_element:
    cmp r13, r12
    jae rt_vc_ios_copied
    xor ecx, ecx
rt_vc_ios_copy_byte:
    mov al, byte ptr [rdi + rcx]
    mov byte ptr [rdx + rcx], al
    inc rcx
    cmp rcx, r11
    jb rt_vc_ios_copy_byte
    add rdi, rsi
    add rdx, r8
    inc r13
    jmp rt_vc_ios_copy_element
rt_vc_ios_copied:
    ret

rt_vc_msr:
    call rt_vc_insn
    call rt_vc_prefixes
    movzx r12, byte ptr [r13 + rax + 1]    # 0x30 WRMSR, 0x32 RDMSR
    VC_TO_GHCB EX_RCX, GHCB_RCX
    xor r11, r11                           # EXITINFO1: 0 read, 1 write
    cmp r12, 0x30
    jne rt_vc_msr_go
    VC_TO_GHCB EX_RAX, GHCB_RAX
    VC_TO_GHCB EX_RDX, GHCB_RDX
    mov r11, 1
rt_vc_msr_go:
    VC_EXIT SVM_EXIT_MSR, r11
    cmp r12, 0x30
    je rt_vc_msr_done
    mov rax, RT_GHCB
    mov ebx, dword ptr [rax + GHCB_RAX]
    mov qword ptr [r15 + EX_RAX], rbx
    mov ebx, dword ptr [rax + GHCB_RDX]
    mov qword ptr [r15 + EX_RDX], rbx
rt_vc_msr_done:
    jmp rt_vc_skip_0f

# Before the GHCB exists only CPUID is possible, through the MSR protocol.
rt_vc_early:
    cmp r14, SVM_EXIT_CPUID
    jne rt_vc_unhandled
    mov r13d, dword ptr [r15 + EX_RAX] # zero-extends
    shl r13, 32                        # CPUID function in bits 63:32
    xor r12, r12                       # register index: 0 EAX, 1 EBX, 2 ECX, 3 EDX
rt_vc_early_loop:
    mov rdi, r12
    shl rdi, 30
    or rdi, r13
    or rdi, GHCB_MSR_CPUID_REQ
    call rt_ghcb_msr_call
    mov rbx, rax
    and rbx, 0xfff
    cmp rbx, GHCB_MSR_CPUID_RESP
    jne rt_sev_terminate
    shr rax, 32
    lea rbx, [rip + rt_vc_early_slots]
    mov rbx, qword ptr [rbx + r12 * 8]
    mov qword ptr [r15 + rbx], rax
    inc r12
    cmp r12, 4
    jb rt_vc_early_loop
    jmp rt_vc_skip_0f
rt_vc_early_slots:
    .quad EX_RAX, EX_RBX, EX_RCX, EX_RDX

# Anything else is reported like an unexpected exception: vector 29, error code, RIP.
rt_vc_unhandled:
    mov rax, RT_GHCB_READY
    cmp qword ptr [rax], 0
    je rt_sev_terminate
    mov rdx, 29
    mov rcx, r14
    # KVM asked us to raise an exception (SW_EXITINFO1 = 1, SW_EXITINFO2 = the event, e.g.
    # #GP for an MSR it refused): report that exception, as Linux's vc_forward_exception would
    # deliver it.
    mov rax, RT_GHCB
    cmp dword ptr [rax + GHCB_SW_EXITINFO1], 1
    jne rt_vc_unhandled_report
    mov rdx, qword ptr [rax + GHCB_SW_EXITINFO2]
    and rdx, 0xff
    xor ecx, ecx
rt_vc_unhandled_report:
    push qword ptr [r15 + EX_RIP]      # args[2]: rip
    push rcx                           # args[1]: the error code
    push rdx                           # args[0]: the vector
    mov rdx, rsp
    mov rdi, UCALL_UNHANDLED
    mov rsi, 3
    call rt_ucall
    jmp rt_halt_forever

# ---------------------------------------------------------------------------------------------
# ucall without OUT: the GHCB IOIO exit an OUT to UCALL_PORT would have become (no nested #VC).
rt_ucall_ghcb:
    push rax
    push rbx
    push rsi
    push rdi
    push rdx
    call rt_ghcb_clear
    mov rbx, UCALL_GPA
    GHCB_SET GHCB_RAX, rbx
    mov rsi, UCALL_PORT
    shl rsi, 16
    or rsi, 0x40                       # 32-bit OUT
    mov rdi, SVM_EXIT_IOIO
    xor edx, edx
    call rt_ghcb_exit
    pop rdx
    pop rdi
    pop rsi
    pop rbx
    pop rax
    ret

# ---------------------------------------------------------------------------------------------
# Boot: the GHCB page (shared), and on SNP its registration and the validation of memory.
rt_setup_ghcb:
    mov rdi, RT_DATA
    mov rax, qword ptr [rdi + 0x808]   # SEV_STATUS
    test rax, 2                        # SEV-ES?
    jz rt_setup_ghcb_done
    mov qword ptr [rdi + 0x820], 0
    # Negotiate the GHCB protocol as sev_es_negotiate_protocol(): SEV information request;
    # the answer carries [63:48] max and [47:32] min version. We speak versions 1 and 2
    # (GHCB_PROTOCOL_MIN/MAX) and use min(max, 2).
    mov rdi, 0x002
    call rt_ghcb_msr_call
    mov rbx, rax
    and rbx, 0xfff
    cmp rbx, 0x001
    jne rt_setup_ghcb_badproto
    mov rbx, rax
    shr rbx, 48                        # max
    cmp rbx, 1
    jb rt_setup_ghcb_badproto
    mov rcx, rax
    shr rcx, 32
    and rcx, 0xffff                    # min
    cmp rcx, 2
    ja rt_setup_ghcb_badproto
    cmp rbx, 2
    jbe rt_setup_ghcb_version
    mov rbx, 2
rt_setup_ghcb_version:
    mov rdi, RT_GHCB_PROTOCOL
    mov qword ptr [rdi], rbx
    mov rdi, RT_DATA
    mov rax, qword ptr [rdi + 0x808]
    test rax, 4                        # SNP?
    jz rt_setup_ghcb_es
    # SNP needs version 2: get_hv_features() answers 0 below it, so Linux ends with
    # GHCB_SNP_UNSUPPORTED
    cmp rbx, 2
    jb rt_setup_ghcb_nosnp
    # SNP: the hypervisor must offer SNP (GHCB_MSR_HV_FT_REQ, bit 0), as Linux checks
    mov rdi, 0x080
    call rt_ghcb_msr_call
    mov rbx, rax
    and rbx, 0xfff
    cmp rbx, 0x081
    jne rt_sev_terminate
    bt rax, 12                         # feature bit 0 is bit 12 of the MSR value
    jnc rt_setup_ghcb_nosnp
    # SNP: register the GHCB GPA (GHCB_MSR_REG_GPA_REQ), then make its page shared: rescind
    # our validation and change its state with an MSR-protocol PSC (Linux does the same in
    # snp_register_ghcb_early / early_set_pages_state).
    mov rdi, RT_GHCB | GHCB_MSR_REG_GPA_REQ
    call rt_ghcb_msr_call
    mov rbx, RT_GHCB | GHCB_MSR_REG_GPA_RESP
    cmp rax, rbx
    jne rt_sev_terminate
    mov rax, RT_GHCB
    xor ecx, ecx
    xor edx, edx                       # rescind
    .byte 0xf2, 0x0f, 0x01, 0xff       # pvalidate
    jc rt_sev_terminate                # CF: nothing changed (PVALIDATE_FAIL_NOUPDATE): Linux terminates
    test eax, eax
    jnz rt_sev_terminate
    mov rdi, RT_GHCB                   # gfn << 12 is the GPA itself
    mov rax, SNP_PAGE_STATE_SHARED
    shl rax, 52
    or rdi, rax
    or rdi, GHCB_MSR_PSC_REQ
    call rt_ghcb_msr_call
    cmp rax, GHCB_MSR_PSC_RESP
    jne rt_sev_terminate
rt_setup_ghcb_es:
    mov rdi, RT_GHCB
    xor eax, eax
    mov rcx, 512
    rep stosq
    mov rdi, RT_DATA
    mov qword ptr [rdi + 0x820], 1
rt_setup_ghcb_done:
    ret
rt_setup_ghcb_badproto:
    GUEST_TERMINATE 0, 1               # GHCB_SEV_ES_PROT_UNSUPPORTED
    jmp rt_setup_ghcb_badproto
rt_setup_ghcb_nosnp:
    GUEST_TERMINATE 0, 2               # GHCB_SNP_UNSUPPORTED
    jmp rt_setup_ghcb_nosnp

# SNP: PVALIDATE the memory accepted at boot, from RT_VALIDATE_START (RT_PT_END) to
# GUEST_ACCEPTED_END - the first unit of the guests' free memory - 4 KiB at a time (the launch
# validated the image and the runtime's region; the page-table pages are validated as the
# runtime takes them, rt_accept_page; the ucall page is made shared later), and mark the rest
# unaccepted: one bit per ACCEPT_UNIT in RT_UNACCEPTED, as the
# firmware hands Linux its unaccepted-memory bitmap (EFI_UNACCEPTED_MEMORY table). The rest is
# accepted on demand by accept_memory; touching it before then raises #VC 0x404.
.equ RT_FIRST_UNACCEPTED, GUEST_ACCEPTED_END / 0x200000
.equ RT_NUNITS, GUEST_MEM_SIZE / 0x200000
rt_snp_validate_memory:
    mov rdi, RT_DATA
    mov rax, qword ptr [rdi + 0x808]
    test rax, 4
    jz rt_snp_validate_done
    mov rdi, RT_UNACCEPTED
    xor eax, eax
    mov rcx, 512
    rep stosq
    mov rdi, RT_UNACCEPTED
    mov r8, RT_FIRST_UNACCEPTED
rt_snp_unaccepted_loop:
    cmp r8, RT_NUNITS
    jae rt_snp_unaccepted_done
    bts qword ptr [rdi], r8
    inc r8
    jmp rt_snp_unaccepted_loop
rt_snp_unaccepted_done:
    mov r8, RT_VALIDATE_START
rt_snp_validate_loop:
    mov rax, r8
    call rt_pvalidate_page
    test eax, eax
    jnz rt_snp_validate_fail
    add r8, 4096
    mov rax, GUEST_ACCEPTED_END
    cmp r8, rax
    jb rt_snp_validate_loop
rt_snp_validate_done:
    ret
rt_snp_validate_fail:
    GUEST_TERMINATE 1, 2
    jmp rt_snp_validate_fail

# accept_memory: rdi = gpa, rsi = npages (4 KiB). Makes [gpa, gpa + npages * 4 KiB) usable as
# private memory, as Linux's accept_memory() (drivers/firmware/efi/unaccepted_memory.c): every
# ACCEPT_UNIT (2 MiB) the range touches that the bitmap still marks unaccepted is accepted
# whole - on SNP by PVALIDATE of each 4 KiB page (arch_accept_memory -> snp_accept_memory) -
# and its bit cleared, so no page is validated twice. A PVALIDATE that fails, or that finds a
# page already validated (CF: PVALIDATE_FAIL_NOUPDATE, which Linux's pvalidate_pages treats
# as fatal), fails the call. rax = 0, or -EINVAL for a range outside memory, a range touching
# the runtime's own memory between its region and the guests' free memory
# [RT_STACKS_END, GUEST_FREE_GPA) (its page-table pool: accepted page by page as the runtime
# takes it, rt_accept_page; the bitmap does not mark it), or a failed PVALIDATE. On TDX each
# unit is accepted with TDG.MEM.PAGE.ACCEPT (tdx_accept_memory, as
# arch_accept_memory -> tdx_accept_memory). A no-op (rax = 0) on every other VM type.
# Preserves everything else.
accept_memory:
    push rbx
    push rcx
    push r8
    push r9
    xor eax, eax
    mov r8, RT_DATA
    cmp qword ptr [r8 + 0x900], 0      # TDX (tdx.s): TDG.MEM.PAGE.ACCEPT
    jne accept_memory_lazy
    mov r8, qword ptr [r8 + 0x808]
    test r8, 4
    jz accept_memory_out
accept_memory_lazy:
    test rsi, rsi
    jz accept_memory_out
    mov rax, -22
    test rdi, 0xfff
    jnz accept_memory_out
    mov rcx, RT_NFRAMES
    cmp rsi, rcx
    ja accept_memory_out
    mov r9, rdi
    shr r9, 12
    add r9, rsi                        # end frame
    cmp r9, rcx
    ja accept_memory_out
    mov rcx, GUEST_FREE_GPA
    cmp rdi, rcx
    jae accept_memory_free             # starts in the free memory
    cmp r9, RT_STACKS_END / 4096
    ja accept_memory_out               # ends above the runtime's region: its pool
accept_memory_free:
    dec r9
    shr r9, 9                          # the last unit (512 frames each)
    mov r8, rdi
    shr r8, 21                         # the first unit
    mov rbx, RT_UNACCEPTED
accept_memory_unit:
    bt qword ptr [rbx], r8
    jnc accept_memory_next
    call rt_accept_unit
    test rax, rax
    jnz accept_memory_out
    btr qword ptr [rbx], r8
accept_memory_next:
    inc r8
    cmp r8, r9
    jbe accept_memory_unit
    xor eax, eax
accept_memory_out:
    pop r9
    pop r8
    pop rcx
    pop rbx
    ret

# r8 = an unaccepted unit: PVALIDATE its 512 pages (SNP) or accept it with
# tdx_accept_memory (TDX). rax = 0 or -EINVAL.
rt_accept_unit:
    push rcx
    push rdx
    push r10
    push r11
    mov r10, r8
    shl r10, 21
    call rt_is_tdx
    jz rt_accept_unit_snp
    push rdi
    push rsi
    mov rdi, r10
    lea rsi, [r10 + 0x200000]
    call tdx_accept_memory
    pop rsi
    pop rdi
    test rax, rax
    jnz rt_accept_unit_fail
    jmp rt_accept_unit_out
rt_accept_unit_snp:
    mov r11, 512
rt_accept_unit_loop:
    mov rax, r10
    call rt_pvalidate_page
    test eax, eax
    jnz rt_accept_unit_fail
    add r10, 4096
    dec r11
    jnz rt_accept_unit_loop
    xor eax, eax
    jmp rt_accept_unit_out
rt_accept_unit_fail:
    mov rax, -22
rt_accept_unit_out:
    pop r11
    pop r10
    pop rdx
    pop rcx
    ret

# rax = a 4 KiB page (its identity-mapped address): PVALIDATE it valid. eax = PVALIDATE's status,
# or 1 when it found the page validated already (CF, PVALIDATE_FAIL_NOUPDATE: not by us, which
# Linux's pvalidate_pages treats as fatal). Clobbers rcx and rdx.
rt_pvalidate_page:
    xor ecx, ecx
    mov edx, 1
    .byte 0xf2, 0x0f, 0x01, 0xff       # pvalidate
    jnc rt_pvalidate_page_out
    mov eax, 1
rt_pvalidate_page_out:
    ret

# rdi = a 4 KiB page the runtime is about to use for itself (a page table): on SNP PVALIDATE it,
# on TDX accept it (TDG.MEM.PAGE.ACCEPT, tdx_accept_memory), as Linux's page allocator accepts
# a page of unaccepted memory when it hands it out; nothing on other VM types. A page already
# validated (CF) or a failure ends the guest, as a failed boot validation does. Preserves
# every register.
rt_accept_page:
    push rax
    push rcx
    push rdx
    push rsi
    call rt_is_tdx
    jz rt_accept_page_snp
    lea rsi, [rdi + 0x1000]
    call tdx_accept_memory
    test rax, rax
    jnz rt_accept_page_tdx_fail
    jmp rt_accept_page_out
rt_accept_page_snp:
    mov rax, RT_DATA
    mov rax, qword ptr [rax + 0x808]
    test rax, 4
    jz rt_accept_page_out
    mov rax, rdi
    call rt_pvalidate_page
    test eax, eax
    jnz rt_snp_validate_fail
rt_accept_page_out:
    pop rsi
    pop rdx
    pop rcx
    pop rax
    ret
rt_accept_page_tdx_fail:
    lea rdi, [rip + tdx_msg_accept]
    call tdx_panic

# rdi = address, rsi = length in bytes: accept the identity-mapped memory [rdi, rdi + rsi)
# holds (the part inside guest memory) for the string helpers. Preserves every register;
# a failure is left to show as the #VC 0x404 of the access itself.
rt_accept_bytes:
    push rax
    push rcx
    push rdi
    push rsi
    mov rax, RT_DATA
    cmp qword ptr [rax + 0x900], 0     # TDX: accept lazily too
    jne rt_accept_bytes_lazy
    mov rax, qword ptr [rax + 0x808]
    test rax, 4
    jz rt_accept_bytes_out
rt_accept_bytes_lazy:
    test rsi, rsi
    jz rt_accept_bytes_out
    mov rcx, GUEST_MEM_SIZE
    cmp rdi, rcx
    jae rt_accept_bytes_out
    lea rax, [rdi + rsi]               # the end, clamped to memory (and against wrapping)
    cmp rax, rdi
    jb rt_accept_bytes_clamp
    cmp rax, rcx
    jbe rt_accept_bytes_end
rt_accept_bytes_clamp:
    mov rax, rcx
rt_accept_bytes_end:
    add rax, 0xfff
    shr rax, 12
    shr rdi, 12
    sub rax, rdi
    mov rsi, rax
    shl rdi, 12
    call accept_memory
rt_accept_bytes_out:
    pop rsi
    pop rdi
    pop rcx
    pop rax
    ret

# ---------------------------------------------------------------------------------------------
# SNP page-state changes. rdi = gpa, rsi = npages, rdx = op (1 private, 2 shared).
# One GHCB PSC request per 253 pages, as vmgexit_psc(): retried while cur_entry <= end_entry;
# any non-zero SW_EXITINFO2 fails; rax = 0 or -EINVAL.
rt_snp_psc:
    push rdi
    push rsi
    push rdx
    push rbx
    push rcx
    push r8
    push r9
    push r10
    push r11
    push r12
    mov r8, rdi
    mov r9, rsi
    mov r12, rdx
rt_snp_psc_chunk:
    mov r10, r9
    cmp r10, VMGEXIT_PSC_MAX_COUNT
    jbe rt_snp_psc_fill
    mov r10, VMGEXIT_PSC_MAX_COUNT
rt_snp_psc_fill:
    call rt_ghcb_clear
    mov rbx, RT_GHCB + GHCB_SHARED_BUF
    mov word ptr [rbx], 0              # cur_entry
    mov rax, r10
    dec rax
    mov word ptr [rbx + 2], ax         # end_entry (inclusive)
    mov dword ptr [rbx + 4], 0         # reserved
    xor r11, r11
rt_snp_psc_entry:
    mov rax, r11
    shl rax, 12
    add rax, r8                        # gpa of this page: gfn << 12 is the GFN field
    mov rcx, r12
    shl rcx, 52
    or rax, rcx
    mov qword ptr [rbx + 8 + r11 * 8], rax
    inc r11
    cmp r11, r10
    jb rt_snp_psc_entry
rt_snp_psc_again:
    call rt_ghcb_clear
    mov rbx, RT_GHCB + GHCB_SHARED_BUF
    GHCB_SET GHCB_SW_SCRATCH, rbx
    mov rdi, SVM_VMGEXIT_PSC
    xor esi, esi
    xor edx, edx
    call rt_ghcb_exit
    mov rax, RT_GHCB
    mov rax, qword ptr [rax + GHCB_SW_EXITINFO2]
    test rax, rax
    jnz rt_snp_psc_fail
    mov rbx, RT_GHCB + GHCB_SHARED_BUF
    cmp dword ptr [rbx + 4], 0         # the hypervisor must not touch reserved
    jne rt_snp_psc_fail
    movzx rax, word ptr [rbx]
    movzx rcx, word ptr [rbx + 2]
    cmp rax, rcx
    jbe rt_snp_psc_again               # not all entries processed yet
    mov rax, r10
    shl rax, 12
    add r8, rax
    sub r9, r10
    jnz rt_snp_psc_chunk
    xor eax, eax
    jmp rt_snp_psc_out
rt_snp_psc_fail:
    mov rax, -22
rt_snp_psc_out:
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rcx
    pop rbx
    pop rdx
    pop rsi
    pop rdi
    ret

# rdi = gpa, rsi = npages, rdx = 1 validate / 0 rescind. rax = 0 or -EINVAL.
rt_snp_pvalidate_range:
    push rcx
    push rdx
    push r8
    push r9
    push r10
    mov r8, rdi
    mov r9, rsi
    mov r10, rdx
rt_snp_pv_loop:
    mov rax, r8
    xor ecx, ecx
    mov rdx, r10
    .byte 0xf2, 0x0f, 0x01, 0xff       # pvalidate
    test eax, eax
    jnz rt_snp_pv_fail
    add r8, 4096
    dec r9
    jnz rt_snp_pv_loop
    xor eax, eax
    jmp rt_snp_pv_out
rt_snp_pv_fail:
    mov rax, -22
rt_snp_pv_out:
    pop r10
    pop r9
    pop r8
    pop rdx
    pop rcx
    ret
