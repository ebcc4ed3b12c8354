# tdx.s - the runtime's Intel TDX half: detection, TDCALL, the #VE handler, TDG.VP.VMCALL,
# MapGPA conversions and page acceptance.
#
# Included by runtime.s. Follows Linux's arch/x86/coco/tdx/tdx.c and tdx-shared.c (names as
# there where it makes sense). In a TD the hypervisor cannot read our registers or memory:
# CPUID leaves the TDX module does not answer, HLT, port I/O and MSRs the module does not
# virtualise raise #VE in the guest, and this handler turns them into TDG.VP.VMCALL (a TDCALL
# with leaf 0) that the TDX module forwards to KVM with the registers RCX's bitmap exposes.
# The shared bit is GPA bit (GPAW - 1): set in a PTE for a shared page (instead of clearing a
# C-bit). Private memory outside what the launch accepted starts pending and is accepted with
# TDG.MEM.PAGE.ACCEPT: [RT_VALIDATE_START, GUEST_ACCEPTED_END) at boot, page-table pages as the
# runtime takes them (rt_accept_page), the rest on demand by
# accept_memory (sev.s), as on SNP.

.equ RT_TDX_SHARED_MASK, RT_DATA + 0x900   # cc_mkdec(0): the shared bit, 0 when not a TD
.equ RT_TDX_ATTRS, RT_DATA + 0x908         # TD attributes (TDG.VP.INFO RDX)
.equ RT_TDX_GPAW, RT_DATA + 0x910          # GPA width (TDG.VP.INFO RCX[5:0])

.equ TDX_ATTR_DEBUG, 0                 # bit numbers (tdx.c ATTR_DEBUG, ATTR_SEPT_VE_DISABLE)
.equ TDX_ATTR_SEPT_VE_DISABLE, 28

# --- detection (tdx_early_init) ---------------------------------------------------------------
# CPUID 0x21 carries "IntelTDX    " in EBX, EDX, ECX; then TDG.VP.INFO gives the GPA width, whose
# top bit is the shared bit (tdx_parse_tdinfo). Leaf 0 and 0x21 are answered by the TDX module,
# so no #VE is involved. Linux also writes TDCS.NOTIFY_ENABLES with TDG.VM.WR; the module model
# raises no notification #VEs, so the runtime does not (a deliberate omission).
rt_detect_tdx:
    mov rdi, RT_TDX_SHARED_MASK
    mov qword ptr [rdi], 0
    xor eax, eax
    cpuid
    cmp eax, TDX_CPUID_LEAF_ID
    jb rt_detect_tdx_done
    mov eax, TDX_CPUID_LEAF_ID
    xor ecx, ecx
    cpuid
    cmp ebx, 0x65746e49                # "Inte"
    jne rt_detect_tdx_done
    cmp edx, 0x5844546c                # "lTDX"
    jne rt_detect_tdx_done
    cmp ecx, 0x20202020                # "    "
    jne rt_detect_tdx_done
    # tdx_parse_tdinfo
    mov eax, TDG_VP_INFO
    xor ecx, ecx
    xor edx, edx
    TDCALL
    test rax, rax
    jnz tdx_module_call_failed
    mov rdi, RT_DATA
    and ecx, 0x3f
    mov qword ptr [rdi + 0x910], rcx
    mov qword ptr [rdi + 0x908], rdx
    dec ecx
    mov rax, 1
    shl rax, cl
    mov qword ptr [rdi + 0x900], rax
    # Only VMM-shared memory may #VE: a non-debug TD must have SEPT_VE_DISABLE
    bt rdx, TDX_ATTR_SEPT_VE_DISABLE
    jc rt_detect_tdx_done
    bt rdx, TDX_ATTR_DEBUG
    jc rt_detect_tdx_done              # Linux only warns for a debug TD
    lea rdi, [rip + tdx_msg_sept_ve]
    call tdx_panic
rt_detect_tdx_done:
    ret

# rax = non-zero (ZF clear) when running as a TD. Preserves everything else but flags.
rt_is_tdx:
    mov rax, RT_TDX_SHARED_MASK
    mov rax, qword ptr [rax]
    test rax, rax
    ret

# --- TDCALL failures and ReportFatalError ----------------------------------------------------
# A TDCALL that itself fails (RAX != 0) means a buggy TDX module: Linux panics
# (tdx_module_call, __tdx_hypercall_failed).
tdx_module_call_failed:
    lea rdi, [rip + tdx_msg_tdcall]
    call tdx_panic
tdx_hypercall_failed:
    lea rdi, [rip + tdx_msg_tdvmcall]
    call tdx_panic

# tdx_panic: rdi = a message (its first 64 bytes, NUL-terminated if shorter). Sends
# TDG.VP.VMCALL<ReportFatalError> (R12 = 0, "panic") with the message in R14, R15, RBX, RDI,
# RSI, R8, R9, RDX (the GHCI's order; tdx_panic) and never returns: if the call returns it is
# made again. On TDX this is how a guest ends itself (the SEV GHCB's GUEST_TERMINATE).
tdx_panic:
    mov rbp, rdi
tdx_panic_again:
    mov r14, qword ptr [rbp]
    mov r15, qword ptr [rbp + 8]
    mov rbx, qword ptr [rbp + 16]
    mov rdi, qword ptr [rbp + 24]
    mov rsi, qword ptr [rbp + 32]
    mov r8, qword ptr [rbp + 40]
    mov r9, qword ptr [rbp + 48]
    mov rdx, qword ptr [rbp + 56]
    xor r10d, r10d                     # TDX_HYPERCALL_STANDARD
    mov r11, TDVMCALL_REPORT_FATAL_ERROR
    xor r12d, r12d                     # error code 0: panic
    xor r13d, r13d
    mov ecx, TDVMCALL_EXPOSE_REGS_MASK
    xor eax, eax                       # TDG.VP.VMCALL
    TDCALL
    jmp tdx_panic_again

.balign 64
tdx_msg_sept_ve:
    .asciz "TD misconfiguration: SEPT_VE_DISABLE attribute must be set."
.balign 64
tdx_msg_tdcall:
    .asciz "TDCALL failed (Buggy TDX module!)"
.balign 64
tdx_msg_tdvmcall:
    .asciz "TDVMCALL failed. TDX module bug?"
.balign 64
    .quad 0, 0, 0, 0, 0, 0, 0, 0       # the last message's 64 bytes stay inside the image

# --- TDG.VP.VMCALL (__tdx_hypercall) ---------------------------------------------------------
# In: R10 (0 = GHCI standard, else a KVM hypercall number), R11 (sub-function), R12-R15 (the
# caller zeroes those its call does not use). RCX = the exposure bitmap (TDVMCALL_EXPOSE_REGS_MASK,
# as Linux), RAX = 0. RDX, RBX, RSI, RDI, R8 and R9 go to the host as 0: Linux builds a struct
# tdx_module_args naming only the call's registers, so every other exposed one is 0 (no guest
# value leaks to the host). Out: rax = R10, the call's status; R11-R15 as the VMM left them.
# Every exposed register (RDX, RBX, RSI, RDI, R8-R15) may come back changed: callers keep what
# they need elsewhere. Clobbers RCX. A failing TDCALL panics (__tdx_hypercall_failed).
__tdx_hypercall:
    xor edx, edx
    xor ebx, ebx
    xor esi, esi
    xor edi, edi
    xor r8d, r8d
    xor r9d, r9d
    mov ecx, TDVMCALL_EXPOSE_REGS_MASK
    xor eax, eax
    TDCALL
    test rax, rax
    jnz tdx_hypercall_failed
    mov rax, r10
    ret

# KVM_HYPERCALL on TDX (tdx_kvm_hypercall, chosen by rt_setup_hypercall): nr in RAX, args in
# RBX, RCX, RDX, RSI -> R10 = nr, R11-R14 = a0-a3; the result (R10) in RAX. Nothing else changes,
# flags included. At CPL 3 the TDCALL itself faults (#GP): hypercalls need CPL 0 in a TD.
tdx_kvm_hypercall:
    pushfq
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov r10, rax
    mov r11, rbx
    mov r12, rcx
    mov r13, rdx
    mov r14, rsi
    xor r15d, r15d
    call __tdx_hypercall
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    popfq
    ret

# --- the #VE handler (exc_virtualization_exception -> tdx_handle_virt_exception) ---------------
# rdi = struct ex_regs * (vector 20). TDG.VP.VEINFO.GET comes first: a #VE while the info is
# still valid is a #DF (tdx_get_ve_info). RBP keeps the frame (TDVMCALL does not expose it); the
# VE info lives on the stack: [rsp] exit reason, [rsp + 8] exit qualification, [rsp + 16] GPA,
# [rsp + 24] instruction length. Handled as virt_exception_kernel (at CPL 3 only CPUID, as
# virt_exception_user): HLT, RDMSR, WRMSR, CPUID, port I/O. RIP advances by the length VEINFO
# gives. Anything else - an EPT violation (MMIO is not decoded), VMCALL (exit reason 18, which
# the TDX module turns into a #VE and KVM never sees), a string I/O, a failed TDVMCALL - is
# reported as an unhandled exception: vector 20, error code = the exit reason, RIP (Linux
# raises a fault, ve_raise_fault, for those).
rt_ve_handler:
    push rbp
    mov rbp, rdi
    mov eax, TDG_VP_VEINFO_GET
    xor ecx, ecx
    TDCALL
    test rax, rax
    jnz tdx_module_call_failed
    sub rsp, 32
    mov qword ptr [rsp], rcx
    mov qword ptr [rsp + 8], rdx
    mov qword ptr [rsp + 16], r9
    mov r10d, r10d                     # instruction length: R10[31:0]
    mov qword ptr [rsp + 24], r10
    mov rax, qword ptr [rbp + EX_CS]
    test eax, 3
    jnz rt_ve_user
    cmp rcx, EXIT_REASON_HLT
    je rt_ve_halt
    cmp rcx, EXIT_REASON_MSR_READ
    je rt_ve_read_msr
    cmp rcx, EXIT_REASON_MSR_WRITE
    je rt_ve_write_msr
    cmp rcx, EXIT_REASON_CPUID
    je rt_ve_cpuid
    cmp rcx, EXIT_REASON_IO_INSTRUCTION
    je rt_ve_io
    jmp rt_ve_unhandled
rt_ve_user:
    cmp rcx, EXIT_REASON_CPUID
    je rt_ve_cpuid
    jmp rt_ve_unhandled

# handle_halt: only with interrupts disabled (Linux since 6.15: "HLT emulation with IRQs enabled"
# is -EIO, a fault, and no TDVMCALL); R12 = 1, interrupts blocked.
rt_ve_halt:
    bt qword ptr [rbp + EX_RFLAGS], 9
    jc rt_ve_unhandled
    xor r10d, r10d
    mov r11, EXIT_REASON_HLT
    mov r12d, 1
    xor r13d, r13d
    xor r14d, r14d
    xor r15d, r15d
    call __tdx_hypercall
    test rax, rax
    jnz rt_ve_unhandled
    jmp rt_ve_done

# read_msr: R12 = the MSR; the value comes back in R11
rt_ve_read_msr:
    xor r10d, r10d
    mov r11, EXIT_REASON_MSR_READ
    mov r12d, dword ptr [rbp + EX_RCX]
    xor r13d, r13d
    xor r14d, r14d
    xor r15d, r15d
    call __tdx_hypercall
    test rax, rax
    jnz rt_ve_unhandled
    mov eax, r11d
    mov qword ptr [rbp + EX_RAX], rax
    shr r11, 32
    mov qword ptr [rbp + EX_RDX], r11
    jmp rt_ve_done

# write_msr: R12 = the MSR, R13 = EDX:EAX
rt_ve_write_msr:
    xor r10d, r10d
    mov r11, EXIT_REASON_MSR_WRITE
    mov r12d, dword ptr [rbp + EX_RCX]
    mov r13d, dword ptr [rbp + EX_RDX]
    shl r13, 32
    mov eax, dword ptr [rbp + EX_RAX]
    or r13, rax
    xor r14d, r14d
    xor r15d, r15d
    call __tdx_hypercall
    test rax, rax
    jnz rt_ve_unhandled
    jmp rt_ve_done

# handle_cpuid: only the hypervisor range 0x40000000-0x4FFFFFFF goes to the VMM; any other
# leaf the module did not answer reads as all zeros (a CPU's answer for an unsupported leaf).
rt_ve_cpuid:
    mov eax, dword ptr [rbp + EX_RAX]
    mov ecx, eax
    sub ecx, 0x40000000
    cmp ecx, 0x0fffffff
    ja rt_ve_cpuid_zero
    xor r10d, r10d
    mov r11, EXIT_REASON_CPUID
    mov r12, rax
    mov r13d, dword ptr [rbp + EX_RCX]
    xor r14d, r14d
    xor r15d, r15d
    call __tdx_hypercall
    test rax, rax
    jnz rt_ve_unhandled
    mov r12d, r12d                     # EAX-EDX come back in R12-R15
    mov qword ptr [rbp + EX_RAX], r12
    mov r13d, r13d
    mov qword ptr [rbp + EX_RBX], r13
    mov r14d, r14d
    mov qword ptr [rbp + EX_RCX], r14
    mov r15d, r15d
    mov qword ptr [rbp + EX_RDX], r15
    jmp rt_ve_done
rt_ve_cpuid_zero:
    xor eax, eax
    mov qword ptr [rbp + EX_RAX], rax
    mov qword ptr [rbp + EX_RBX], rax
    mov qword ptr [rbp + EX_RCX], rax
    mov qword ptr [rbp + EX_RDX], rax
    jmp rt_ve_done

# handle_io: from the exit qualification - size (bits 2:0) + 1, IN (bit 3), string (bit 4,
# refused), port (bits 31:16). OUT: R12 = size, R13 = 1, R14 = port, R15 = AL/AX/EAX. IN: the
# value in R11 replaces the low `size` bytes of RAX.
rt_ve_io:
    mov rdx, qword ptr [rsp + 8]
    test edx, 0x10
    jnz rt_ve_unhandled
    xor r10d, r10d
    mov r11, EXIT_REASON_IO_INSTRUCTION
    mov r12d, edx
    and r12d, 7
    inc r12d
    mov r14d, edx
    shr r14d, 16
    mov ecx, r12d
    shl ecx, 3
    mov rbx, 1
    shl rbx, cl
    dec rbx                            # the size's mask
    mov qword ptr [rsp + 16], rbx      # (the GPA slot is free for an I/O #VE)
    test edx, 8
    jnz rt_ve_io_in
    mov r13d, 1                        # PORT_WRITE
    mov r15, qword ptr [rbp + EX_RAX]
    and r15, rbx
    call __tdx_hypercall
    test rax, rax
    jnz rt_ve_unhandled
    jmp rt_ve_done
rt_ve_io_in:
    xor r13d, r13d                     # PORT_READ
    xor r15d, r15d
    call __tdx_hypercall
    mov rbx, qword ptr [rsp + 16]
    test rax, rax
    jnz rt_ve_unhandled
    and r11, rbx
    not rbx
    and qword ptr [rbp + EX_RAX], rbx
    or qword ptr [rbp + EX_RAX], r11
    jmp rt_ve_done

rt_ve_done:
    mov rax, qword ptr [rsp + 24]
    add qword ptr [rbp + EX_RIP], rax
    add rsp, 32
    pop rbp
    ret

# A #VE the runtime does not handle: UCALL_UNHANDLED with [20, exit reason, RIP] (no CR2: a
# #VE does not set it). The VE info has been read, so the ucall's own OUT may #VE again.
rt_ve_unhandled:
    mov rcx, qword ptr [rsp]
    push qword ptr [rbp + EX_RIP]      # args[2]
    push rcx                           # args[1]: the exit reason
    push VE_VECTOR                     # args[0]
    mov rdx, rsp
    mov rdi, UCALL_UNHANDLED
    mov rsi, 3
    call rt_ucall
    jmp rt_halt_forever

# --- memory acceptance (tdx-shared.c) --------------------------------------------------------
# try_accept_one: rdi = start, rsi = len, edx = level (0 4K, 1 2M, 2 1G) -> rax = the bytes
# accepted, 0 when start is not aligned to the level, len is shorter, or the module refuses
# (any non-zero status, e.g. a size mismatch with the page KVM mapped). Preserves the rest.
tdx_try_accept_one:
    push rcx
    push rdx
    push r8
    push r9
    push r10
    push r11
    lea ecx, [rdx + rdx * 8]
    add ecx, 12
    mov r8, 1
    shl r8, cl                         # page_level_size
    lea rax, [r8 - 1]
    test rdi, rax
    jnz tdx_try_accept_none
    cmp rsi, r8
    jb tdx_try_accept_none
    mov rcx, rdi
    or rcx, rdx                        # RCX = GPA | level
    mov eax, TDG_MEM_PAGE_ACCEPT
    TDCALL
    test rax, rax
    jnz tdx_try_accept_none
    mov rax, r8
    jmp tdx_try_accept_out
tdx_try_accept_none:
    xor eax, eax
tdx_try_accept_out:
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdx
    pop rcx
    ret

# tdx_accept_memory: rdi = start, rsi = end (4 KiB aligned). Larger accepts first (1G, 2M,
# 4K). rax = 0, or -EIO when a page cannot be accepted at any level. Preserves the rest.
tdx_accept_memory:
    push rdx
    push rdi
    push rsi
    push r8
    mov r8, rsi
tdx_accept_loop:
    cmp rdi, r8
    jae tdx_accept_ok
    mov rsi, r8
    sub rsi, rdi                       # len
    mov edx, TDX_PS_1G
tdx_accept_try:
    call tdx_try_accept_one
    test rax, rax
    jnz tdx_accept_next
    dec edx
    jns tdx_accept_try
    mov rax, -5                        # -EIO
    jmp tdx_accept_out
tdx_accept_next:
    add rdi, rax
    jmp tdx_accept_loop
tdx_accept_ok:
    xor eax, eax
tdx_accept_out:
    pop r8
    pop rsi
    pop rdi
    pop rdx
    ret

# Boot: mark the memory beyond GUEST_ACCEPTED_END unaccepted (one bit per ACCEPT_UNIT in
# RT_UNACCEPTED, as the firmware's EFI unaccepted-memory table) and accept
# [RT_VALIDATE_START, GUEST_ACCEPTED_END), the first unit of the guests' free memory: the launch
# added the image and the runtime's region already accepted, and each page-table page is
# accepted as the runtime takes it (rt_accept_page, sev.s).
rt_tdx_accept_boot_memory:
    call rt_is_tdx
    jz rt_tdx_accept_boot_done
    mov rdi, RT_UNACCEPTED
    xor eax, eax
    mov rcx, 512
    rep stosq
    mov rdi, RT_UNACCEPTED
    mov r8, RT_FIRST_UNACCEPTED
rt_tdx_unaccepted_loop:
    cmp r8, RT_NUNITS
    jae rt_tdx_unaccepted_done
    bts qword ptr [rdi], r8
    inc r8
    jmp rt_tdx_unaccepted_loop
rt_tdx_unaccepted_done:
    mov rdi, RT_VALIDATE_START
    mov rsi, GUEST_ACCEPTED_END
    call tdx_accept_memory
    test rax, rax
    jnz rt_tdx_accept_boot_fail
rt_tdx_accept_boot_done:
    ret
rt_tdx_accept_boot_fail:
    lea rdi, [rip + tdx_msg_accept]
    call tdx_panic

.balign 64
tdx_msg_accept:
    .asciz "Failed to accept memory"
.balign 64
    .quad 0, 0, 0, 0, 0, 0, 0, 0

# --- private <-> shared (tdx_enc_status_changed, tdx_map_gpa) --------------------------------
# tdx_map_gpa: rdi = start, rsi = end (private GPAs), rdx = enc (1 private, 0 shared). MapGPA
# (R11 = TDVMCALL_MAP_GPA, R12 = start, with the shared bit for shared, R13 = size). Retried only
# on RETRY: R11 from the untrusted VMM must lie in [start, end), the call resumes there, and at
# most 3 retries may make no progress. rax = 1 on success, 0 on failure (as Linux's bool).
# Preserves the rest.
tdx_map_gpa:
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    sub rsp, 24                        # [rsp] start, [rsp + 8] end, [rsp + 16] retry_count
    test rdx, rdx
    jnz tdx_map_gpa_enc
    mov rax, RT_TDX_SHARED_MASK
    mov rax, qword ptr [rax]
    or rdi, rax                        # cc_mkdec
    or rsi, rax
tdx_map_gpa_enc:
    mov qword ptr [rsp], rdi
    mov qword ptr [rsp + 8], rsi
    mov qword ptr [rsp + 16], 0
tdx_map_gpa_loop:
    cmp qword ptr [rsp + 16], 3        # max_retries_per_page
    jae tdx_map_gpa_fail
    xor r10d, r10d
    mov r11, TDVMCALL_MAP_GPA
    mov r12, qword ptr [rsp]
    mov r13, qword ptr [rsp + 8]
    sub r13, r12
    xor r14d, r14d
    xor r15d, r15d
    call __tdx_hypercall
    cmp rax, TDVMCALL_STATUS_RETRY
    je tdx_map_gpa_retry
    test rax, rax
    jnz tdx_map_gpa_fail
    mov eax, 1
    jmp tdx_map_gpa_out
tdx_map_gpa_retry:
    cmp r11, qword ptr [rsp]           # map_fail_paddr < start
    jb tdx_map_gpa_fail
    cmp r11, qword ptr [rsp + 8]       # map_fail_paddr >= end
    jae tdx_map_gpa_fail
    cmp r11, qword ptr [rsp]
    jne tdx_map_gpa_progress
    inc qword ptr [rsp + 16]           # a retry without forward progress
    jmp tdx_map_gpa_loop
tdx_map_gpa_progress:
    mov qword ptr [rsp], r11
    mov qword ptr [rsp + 16], 0
    jmp tdx_map_gpa_loop
tdx_map_gpa_fail:
    xor eax, eax
tdx_map_gpa_out:
    add rsp, 24
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    ret

# rdi = gpa, rsi = npages, r11 = enc; the page tables were split for the range already
# (rt_set_memory_enc). The order of __set_memory_enc_pgtable with TDX's callbacks:
#   to private: enc_status_change_prepare = MapGPA, then accept the pages (shared->private
#               needs TDG.MEM.PAGE.ACCEPT); then the PTEs lose the shared bit and are flushed
#               (the VMM flushes for shared->private: tdx_tlb_flush_required(true) is false);
#   to shared:  the TLB is flushed first (tdx_tlb_flush_required(false)), the PTEs get the
#               shared bit and are flushed, then enc_status_change_finish = MapGPA.
# Caches are not modelled, so the cache flush TDX always asks for is left out. A failure after
# the PTEs changed leaves them changed, as Linux does (vmm_fail). rax = 0, or -EIO.
tdx_set_memory_enc:
    push rbx
    push rdx
    push rsi
    push r8
    mov r8, rsi
    shl r8, 12
    add r8, rdi                        # end
    test r11, r11
    jz tdx_sme_shared
    mov rsi, r8
    mov edx, 1
    call tdx_map_gpa
    test rax, rax
    jz tdx_sme_fail
    call tdx_accept_memory
    test rax, rax
    jnz tdx_sme_fail
    mov rsi, qword ptr [rsp + 8]       # npages
    call rt_sme_flip_ptes
    xor eax, eax
    jmp tdx_sme_out
tdx_sme_shared:
    mov rax, cr3
    mov cr3, rax
    call rt_sme_flip_ptes
    mov rsi, r8
    xor edx, edx
    call tdx_map_gpa
    test rax, rax
    jz tdx_sme_fail
    xor eax, eax
    jmp tdx_sme_out
tdx_sme_fail:
    mov rax, -5                        # -EIO
tdx_sme_out:
    pop r8
    pop rsi
    pop rdx
    pop rbx
    ret
