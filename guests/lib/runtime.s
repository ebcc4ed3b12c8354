# runtime.s - the guest runtime: boot, descriptor tables, page tables, exceptions, ucall.
#
# Assembled after every guest. Entered at _start in 64-bit mode on the firmware's boot page
# tables (an identity map built by the VMM, testbed/vmm/boot.py). It:
#   1. detects the memory-encryption technology at run time, as Linux's sme_enable() does:
#      CPUID 0x8000001F (SEV bit, C-bit position) and the SEV_STATUS MSR - never hard-coded;
#   2. builds its own GDT (kernel + user segments, TSS), IDT (handlers for vectors 0-31 and a
#      CPL-3 return gate) and 4 KiB page tables identity-mapping all guest memory, private
#      (C-bit set) except the ucall page, which stays shared so the host can read it;
#   3. picks the native hypercall instruction from the CPU vendor (Linux's alternatives);
#   4. calls guest_main and reports GUEST_DONE when it returns.
#
# Host-provided defines: GUEST_MEM_SIZE UCALL_GPA UCALL_PORT RT_GDT RT_IDT RT_TSS RT_DATA
# RT_PT_BASE KSTACK_TOP TRAPSTACK_TOP ISTSTACK_TOP USTACK_TOP RT_STACKS_START RT_STACKS_END.
#
# Keystone notes: comments use '#', ';' separates statements, and an absolute memory operand
# is encoded RIP-relative, so addresses go through a register. The library uses no numeric
# local labels (testbed/asm.py supports them), so a guest's `1b`/`1f` never binds to one here.

.equ RT_HANDLERS, RT_DATA              # 256 qwords: per-vector exception handlers
.equ RT_CBIT_MASK, RT_DATA + 0x800     # C-bit mask for PTEs (0 when not SEV)
.equ RT_SEV_STATUS, RT_DATA + 0x808    # SEV_STATUS MSR as read at boot
.equ RT_SAVED_KSP, RT_DATA + 0x810     # kernel RSP saved across GUEST_RUN_USER
.equ RT_VENDOR_AMD, RT_DATA + 0x818    # 1 on AMD/Hygon, 0 on Intel
.equ RT_USER_RET_VECTOR, 0x81

.equ SEL_KCODE, 0x08
.equ SEL_KDATA, 0x10
.equ SEL_UDATA, 0x1b
.equ SEL_UCODE, 0x23
.equ SEL_TSS, 0x28

.equ PTE_FLAGS, 0x7                    # present | writable | user
.equ MSR_AMD64_SEV, 0xC0010131

_start:
    mov rsp, KSTACK_TOP
    # Zero the runtime's data page first: on SEV, memory nobody wrote reads as garbage.
    mov rdi, RT_DATA
    xor eax, eax
    mov rcx, 512
    rep stosq
    call rt_setup_gdt
    call rt_setup_idt                  # first: on SEV-ES even CPUID raises #VC
    call rt_detect_sev
    call rt_snp_validate_memory        # SNP: PVALIDATE before the first private write
    call rt_setup_paging
    call rt_setup_ghcb                 # SEV-ES/SNP: the shared GHCB page
    call rt_setup_hypercall
    call rt_share_ucall_page
    xor ebp, ebp                       # the end of the frame chain (GUEST_HELPER_ENTER)
    call guest_main
    call rt_ucall_done

# On SEV the ucall page is mapped without the C-bit; tell the host it is shared, as Linux
# does for every page it decrypts (set_memory_decrypted).
rt_share_ucall_page:
    mov rdi, RT_DATA
    mov rax, qword ptr [rdi + 0x800]
    test rax, rax
    jz rt_share_ucall_done
    mov rdi, UCALL_GPA
    mov rsi, 1
    call set_memory_shared
rt_share_ucall_done:
    ret

# --- technology detection -------------------------------------------------------------------
rt_detect_sev:
    mov rdi, RT_DATA
    mov qword ptr [rdi + 0x800], 0
    mov qword ptr [rdi + 0x808], 0
    mov eax, 0x80000000
    cpuid
    cmp eax, 0x8000001f
    jb rt_detect_sev_done
    mov eax, 0x8000001f
    cpuid
    bt eax, 1                          # SEV supported by the CPU?
    jnc rt_detect_sev_done
    mov r8d, ebx
    mov ecx, MSR_AMD64_SEV
    rdmsr
    mov rdi, RT_DATA
    mov dword ptr [rdi + 0x808], eax
    bt eax, 0                          # SEV enabled for this guest?
    jnc rt_detect_sev_done

    mov ecx, r8d
    and ecx, 0x3f                      # C-bit position from CPUID 0x8000001F EBX[5:0]
    mov rax, 1
    shl rax, cl
    mov qword ptr [rdi + 0x800], rax
rt_detect_sev_done:
    ret

# --- GDT and TSS ---------------------------------------------------------------------------
rt_setup_gdt:
    mov rdi, RT_GDT
    mov qword ptr [rdi + 0x00], 0
    movabs rax, 0x00af9b000000ffff     # 0x08 kernel code, 64-bit
    mov qword ptr [rdi + 0x08], rax
    movabs rax, 0x00cf93000000ffff     # 0x10 kernel data
    mov qword ptr [rdi + 0x10], rax
    movabs rax, 0x00cff3000000ffff     # 0x18 user data (DPL 3)
    mov qword ptr [rdi + 0x18], rax
    movabs rax, 0x00affb000000ffff     # 0x20 user code, 64-bit (DPL 3)
    mov qword ptr [rdi + 0x20], rax
    # 0x28: 64-bit available TSS, base RT_TSS, limit 0x67
    mov rax, RT_TSS
    mov rbx, rax
    and rbx, 0xffffff
    shl rbx, 16
    or rbx, 0x67
    mov rcx, 0x89
    shl rcx, 40
    or rbx, rcx
    mov rcx, rax
    shr rcx, 24
    and rcx, 0xff
    shl rcx, 56
    or rbx, rcx
    mov qword ptr [rdi + 0x28], rbx
    mov rcx, rax
    shr rcx, 32
    mov qword ptr [rdi + 0x30], rcx
    # TSS: RSP0 (CPL 3 -> 0 transitions) and IST1 (#DF, #VC)
    mov rsi, RT_TSS
    mov rax, TRAPSTACK_TOP
    mov qword ptr [rsi + 4], rax
    mov rax, ISTSTACK_TOP
    mov qword ptr [rsi + 0x24], rax
    # lgdt with a descriptor built on the stack
    sub rsp, 16
    mov word ptr [rsp], 0x37
    mov qword ptr [rsp + 2], rdi
    lgdt [rsp]
    add rsp, 16
    mov ax, SEL_KDATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    # reload CS with a far return
    pop rdx                            # our return address
    push SEL_KCODE
    lea rax, [rip + rt_setup_gdt_cs]
    push rax
    retfq
rt_setup_gdt_cs:
    push rdx
    mov ax, SEL_TSS
    ltr ax
    ret

# --- IDT -------------------------------------------------------------------------------------
# rdi = vector, rsi = handler address, rdx = type/attributes byte, rcx = IST index
rt_set_gate:
    push rax
    push rbx
    mov rax, RT_IDT
    mov rbx, rdi
    shl rbx, 4
    add rax, rbx
    mov rbx, rsi
    and rbx, 0xffff
    push rcx
    mov rcx, SEL_KCODE
    shl rcx, 16
    or rbx, rcx
    pop rcx
    push rcx
    and rcx, 7
    shl rcx, 32
    or rbx, rcx
    mov rcx, rdx
    and rcx, 0xff
    shl rcx, 40
    or rbx, rcx
    mov rcx, rsi
    shr rcx, 16
    and rcx, 0xffff
    shl rcx, 48
    or rbx, rcx
    pop rcx
    mov qword ptr [rax], rbx
    mov rbx, rsi
    shr rbx, 32
    mov qword ptr [rax + 8], rbx
    pop rbx
    pop rax
    ret

rt_setup_idt:
    # clear the handler table
    mov rdi, RT_HANDLERS
    xor eax, eax
    mov rcx, 256
    rep stosq
    # vectors 0-31 from the stub table; #DF (8) and #VC (29) on IST1
    xor r8, r8
rt_setup_idt_loop:
    lea r9, [rip + rt_exc_stub_table]
    mov rsi, qword ptr [r9 + r8 * 8]
    mov rdi, r8
    mov rdx, 0x8e
    xor ecx, ecx
    cmp r8, 8
    jne rt_setup_idt_not_df
    mov ecx, 1
rt_setup_idt_not_df:
    cmp r8, 29
    jne rt_setup_idt_not_vc
    mov ecx, 1
rt_setup_idt_not_vc:
    call rt_set_gate
    inc r8
    cmp r8, 32
    jb rt_setup_idt_loop
    # #VC is handled by the runtime from the start: on SEV-ES the very first CPUID raises it
    # (only SEV-ES/SNP guests ever see vector 29)
    mov rdi, RT_HANDLERS
    lea rax, [rip + rt_vc_handler]
    mov qword ptr [rdi + 29 * 8], rax
    # the CPL-3 return gate: DPL 3 interrupt gate
    mov rdi, RT_USER_RET_VECTOR
    lea rsi, [rip + rt_user_return]
    mov rdx, 0xee
    xor ecx, ecx
    call rt_set_gate
    sub rsp, 16
    mov word ptr [rsp], 0xfff
    mov rax, RT_IDT
    mov qword ptr [rsp + 2], rax
    lidt [rsp]
    add rsp, 16
    ret

# --- page tables -----------------------------------------------------------------------------
# 4 KiB pages identity-mapping [0, GUEST_MEM_SIZE): PML4 at RT_PT_BASE, PDPT next, then the
# page directories, then the page tables. Frame 0 stays unmapped (null-pointer guard).
.equ RT_NFRAMES, GUEST_MEM_SIZE / 4096
.equ RT_NPT, (RT_NFRAMES + 511) / 512
.equ RT_NPD, (RT_NPT + 511) / 512
.equ RT_PML4, RT_PT_BASE
.equ RT_PDPT, RT_PT_BASE + 0x1000
.equ RT_PD, RT_PT_BASE + 0x2000
.equ RT_PT, RT_PD + RT_NPD * 0x1000
# Keystone reads an operand that starts with '(' as a memory reference: keep such
# expressions in .equ lines.
.equ RT_PT_ZERO_QWORDS, (2 + RT_NPD) * 512

rt_setup_paging:
    mov rdi, RT_DATA
    mov r10, qword ptr [rdi + 0x800]   # C-bit mask
    # zero PML4, PDPT and the PDs
    mov rdi, RT_PML4
    xor eax, eax
    mov rcx, RT_PT_ZERO_QWORDS
    rep stosq
    # PTEs
    mov rdi, RT_PT
    xor r8, r8                         # frame
rt_pt_loop:
    mov rax, r8
    shl rax, 12
    or rax, PTE_FLAGS
    or rax, r10
    test r8, r8
    jnz rt_pt_store
    xor eax, eax                       # frame 0: not present
rt_pt_store:
    mov qword ptr [rdi + r8 * 8], rax
    inc r8
    cmp r8, RT_NFRAMES
    jb rt_pt_loop
    # pad the last page table with not-present entries
rt_pt_pad:
    test r8, 511
    jz rt_pt_padded
    mov qword ptr [rdi + r8 * 8], 0
    inc r8
    jmp rt_pt_pad
rt_pt_padded:
    # the ucall page and the GHCB are shared with the host: no C-bit
    mov rax, UCALL_GPA
    shr rax, 12
    mov rcx, UCALL_GPA
    or rcx, PTE_FLAGS
    mov qword ptr [rdi + rax * 8], rcx
    mov rax, RT_GHCB
    shr rax, 12
    mov rcx, RT_GHCB
    or rcx, PTE_FLAGS
    mov qword ptr [rdi + rax * 8], rcx
    # PDEs
    mov rdi, RT_PD
    xor r8, r8
rt_pd_loop:
    mov rax, r8
    shl rax, 12
    add rax, RT_PT
    or rax, PTE_FLAGS
    or rax, r10
    mov qword ptr [rdi + r8 * 8], rax
    inc r8
    cmp r8, RT_NPT
    jb rt_pd_loop
    # PDPTEs
    mov rdi, RT_PDPT
    xor r8, r8
rt_pdpt_loop:
    mov rax, r8
    shl rax, 12
    add rax, RT_PD
    or rax, PTE_FLAGS
    or rax, r10
    mov qword ptr [rdi + r8 * 8], rax
    inc r8
    cmp r8, RT_NPD
    jb rt_pdpt_loop
    # PML4E
    mov rdi, RT_PML4
    mov rax, RT_PDPT
    or rax, PTE_FLAGS
    or rax, r10
    mov qword ptr [rdi], rax
    mov rax, RT_PML4
    or rax, r10
    mov cr3, rax
    ret

# rdi = gpa -> rax = address of the PTE mapping it (4 KiB pages, identity map)
rt_pte_address:
    mov rax, rdi
    shr rax, 12
    shl rax, 3
    push rcx
    mov rcx, RT_PT
    add rax, rcx
    pop rcx
    ret

# --- private <-> shared conversions ----------------------------------------------------------
# set_memory_shared / set_memory_private: rdi = gpa (identity-mapped), rsi = npages (4 KiB).
# rax = 0 on success, the negative error otherwise. As Linux's __set_memory_enc_pgtable() with
# kvm_sev_hc_page_enc_status(): on SEV flip the C-bit in our own PTEs and flush them, then
# tell the host with KVM_HC_MAP_GPA_RANGE (ENC_STAT(enc) | PAGE_SZ_4K) - through VMMCALL on
# SEV (kvm_sev_hypercall3), through the native instruction elsewhere. The host is told only if
# it advertises KVM_FEATURE_HC_MAP_GPA_RANGE (CPUID 0x40000001 bit 16), as Linux checks; with
# HC_PROTOCOL_PAGE_ENC_STATUS defined, the seed-era KVM_HC_PAGE_ENC_STATUS (same number 12,
# a2 = enc as 0/1) is used instead.
.ifndef HC_PROTOCOL_PAGE_ENC_STATUS
.equ HC_PROTOCOL_PAGE_ENC_STATUS, 0
.endif

set_memory_shared:
    push rdx
    xor edx, edx
    call rt_set_memory_enc
    pop rdx
    ret

set_memory_private:
    push rdx
    mov edx, 1
    call rt_set_memory_enc
    pop rdx
    ret

# rdi = gpa, rsi = npages, rdx = enc (1 private, 0 shared)
rt_set_memory_enc:
    push rbx
    push rcx
    push r8
    push r9
    push r10
    push r11
    mov r11, rdx
    mov rax, -22                       # -EINVAL for a misaligned or empty request
    test rdi, 0xfff
    jnz rt_sme_out
    test rsi, rsi
    jz rt_sme_out
    mov rax, GUEST_MEM_SIZE
    shr rax, 12
    mov rcx, rdi
    shr rcx, 12
    add rcx, rsi
    cmp rcx, rax
    mov rax, -22
    ja rt_sme_out
    # SNP: page-state changes and validation instead of the hypercall
    mov r8, RT_DATA
    mov r8, qword ptr [r8 + 0x808]
    test r8, 4
    jz rt_sme_pte
    test r11, r11
    jnz rt_sme_snp_private
    xor edx, edx                       # shared: rescind, PSC, then the PTEs
    call rt_snp_pvalidate_range
    test rax, rax
    jnz rt_sme_out
    mov rdx, 2
    call rt_snp_psc
    test rax, rax
    jnz rt_sme_out
    call rt_sme_flip_ptes
    xor eax, eax
    jmp rt_sme_out
rt_sme_snp_private:                    # private: the PTEs, PSC, then validate
    call rt_sme_flip_ptes
    mov rdx, 1
    call rt_snp_psc
    test rax, rax
    jnz rt_sme_out
    mov edx, 1
    call rt_snp_pvalidate_range
    jmp rt_sme_out
rt_sme_pte:
    call rt_sme_flip_ptes
    jmp rt_sme_notify

# rdi = gpa, rsi = npages, r11 = enc: C-bit on (private) or off (shared) in our PTEs (SEV).
rt_sme_flip_ptes:
    push rax
    push rbx
    push rcx
    push r8
    push r9
    push r10
    mov r8, RT_DATA
    mov r10, qword ptr [r8 + 0x800]    # C-bit mask
    test r10, r10
    jz rt_sme_flip_done
    mov r8, rdi
    mov r9, rsi
rt_sme_pte_loop:
    push rdi
    mov rdi, r8
    call rt_pte_address
    pop rdi
    mov rcx, qword ptr [rax]
    test r11, r11
    jz rt_sme_clear
    or rcx, r10
    jmp rt_sme_store
rt_sme_clear:
    mov rbx, r10
    not rbx
    and rcx, rbx
rt_sme_store:
    mov qword ptr [rax], rcx
    invlpg [r8]
    add r8, 4096
    dec r9
    jnz rt_sme_pte_loop
rt_sme_flip_done:
    pop r10
    pop r9
    pop r8
    pop rcx
    pop rbx
    pop rax
    ret

rt_sme_notify:
    # 2. tell the host, if it offers the hypercall
    mov r8, rdi
    mov r9, rsi
    push rdx
    mov eax, KVM_CPUID_FEATURES
    xor ecx, ecx
    cpuid
    pop rdx
    bt eax, KVM_FEATURE_HC_MAP_GPA_RANGE
    mov rax, 0
    jnc rt_sme_out
    mov rax, KVM_HC_MAP_GPA_RANGE
    mov rbx, r8
    mov rcx, r9
.if HC_PROTOCOL_PAGE_ENC_STATUS
    mov rdx, r11                       # seed-era ABI: a2 = enc (1 encrypted, 0 decrypted)
.else
    mov rdx, r11
    shl rdx, 4                         # KVM_MAP_GPA_RANGE_ENC_STAT(enc) | PAGE_SZ_4K
.endif
    mov r10, RT_DATA
    mov r10, qword ptr [r10 + 0x800]
    test r10, r10
    jz rt_sme_native
    vmmcall                            # kvm_sev_hypercall3: never VMCALL on SEV
    jmp rt_sme_out
rt_sme_native:
    call rt_kvm_hypercall
rt_sme_out:
    pop r11
    pop r10
    pop r9
    pop r8
    pop rcx
    pop rbx
    ret

# --- hypercall instruction (Linux's alternatives: patched once at boot) -----------------------
rt_setup_hypercall:
    xor eax, eax
    cpuid
    mov rdi, RT_DATA
    mov qword ptr [rdi + 0x818], 0
    cmp ebx, 0x68747541                # "Auth"enticAMD
    je rt_setup_hypercall_amd
    cmp ebx, 0x6f677948                # "Hygo"nGenuine
    je rt_setup_hypercall_amd
    ret
rt_setup_hypercall_amd:
    mov qword ptr [rdi + 0x818], 1
    lea rax, [rip + rt_kvm_hypercall]
    mov byte ptr [rax + 2], 0xd9       # 0f 01 c1 (vmcall) -> 0f 01 d9 (vmmcall)
    ret

# KVM_HYPERCALL lands here. The default is VMCALL, as in Linux before alternatives run.
rt_kvm_hypercall:
    vmcall
    ret

# --- ucall -----------------------------------------------------------------------------------
# The message goes into the shared ucall page (struct ucall: UCALL_CMD, UCALL_NARGS, UCALL_ARGS);
# OUT to UCALL_PORT with its address signals it.
# rdi = cmd, rsi = nargs (0 to UCALL_MAX_ARGS), rdx = the args (nargs qwords). Preserves all
# registers but flags.
rt_ucall:
    push rax
    push rcx
    push rdx
    push r9
    push r10
    mov r9, UCALL_GPA
    mov qword ptr [r9 + UCALL_CMD], rdi
    mov qword ptr [r9 + UCALL_NARGS], rsi
    xor ecx, ecx
rt_ucall_copy:
    cmp rcx, rsi
    jae rt_ucall_copied
    mov r10, qword ptr [rdx + rcx * 8]
    mov qword ptr [r9 + rcx * 8 + UCALL_ARGS], r10
    inc rcx
    jmp rt_ucall_copy
rt_ucall_copied:
    mov r9, RT_DATA
    cmp qword ptr [r9 + 0x820], 0      # GHCB ready: the IOIO exit directly, no #VC
    je rt_ucall_out
    call rt_ucall_ghcb
    jmp rt_ucall_sent
rt_ucall_out:
    mov dx, UCALL_PORT
    mov eax, UCALL_GPA
    out dx, eax
rt_ucall_sent:
    pop r10
    pop r9
    pop rdx
    pop rcx
    pop rax
    ret

# rdi = the values, rsi = how many (GUEST_SYNC)
rt_ucall_sync:
    push rdi
    push rdx
    mov rdx, rdi
    mov rdi, UCALL_SYNC
    call rt_ucall
    pop rdx
    pop rdi
    ret

rt_ucall_done:
    mov rdi, UCALL_DONE
    xor esi, esi
    mov rdx, rsp
    call rt_ucall
    jmp rt_halt_forever

# A failed assert: rdi, rsi = its values, rcx = how many (0 to 2), rdx = the call-site id.
# Sends UCALL_ABORT with args [site, assert address, caller, values...] and never returns.
# The assert address is our return address; the caller is [rbp + 8] when rbp points into the
# runtime's stacks (a GUEST_HELPER_ENTER frame), else 0. The host checks the caller against
# the program before it names it (testbed/vmm/ucall.py, resolve_failure).
.equ RT_STACKS_LAST_FRAME, RT_STACKS_END - 16
rt_guest_assert_fail:
    mov rax, qword ptr [rsp]
    push rsi
    push rdi
    xor r8d, r8d
    test rbp, 7
    jnz rt_guest_assert_no_frame
    mov r9, RT_STACKS_START
    cmp rbp, r9
    jb rt_guest_assert_no_frame
    mov r9, RT_STACKS_LAST_FRAME
    cmp rbp, r9
    ja rt_guest_assert_no_frame
    mov r8, qword ptr [rbp + 8]
rt_guest_assert_no_frame:
    push r8
    push rax
    push rdx
    mov rdx, rsp
    lea rsi, [rcx + 3]
    mov rdi, UCALL_ABORT
    call rt_ucall
    jmp rt_halt_forever

# --- string helpers (public: guests call them; prelude.s documents them) --------------------
# guest_memset: rdi = dst, rsi = the byte, rdx = n; rax = dst.
guest_memset:
    push rdi
    push rcx
    mov rax, rsi
    mov rcx, rdx
    cld
    rep stosb
    pop rcx
    pop rdi
    mov rax, rdi
    ret

# guest_memcpy: rdi = dst, rsi = src, rdx = n; rax = dst.
guest_memcpy:
    push rdi
    push rsi
    push rcx
    mov rcx, rdx
    cld
    rep movsb
    pop rcx
    pop rsi
    pop rdi
    mov rax, rdi
    ret

# guest_memcmp: rdi = a, rsi = b, rdx = n; rax = 0 if the n bytes are equal, else
# a[i] - b[i] at the first i where they differ (negative, as a signed number, if a[i] < b[i]).
guest_memcmp:
    push rdi
    push rsi
    push rcx
    xor eax, eax
    mov rcx, rdx
    test rcx, rcx
    jz guest_memcmp_done
    cld
    repe cmpsb
    je guest_memcmp_done
    movzx eax, byte ptr [rdi - 1]
    movzx ecx, byte ptr [rsi - 1]
    sub rax, rcx
guest_memcmp_done:
    pop rcx
    pop rsi
    pop rdi
    ret

# GUEST_ASSERT_EQ of an immediate against a narrow register: rsi = the immediate, rdx = the
# width (8, 16 or 32). rsi is reduced to that width if it fits it as a signed or an unsigned
# number (-1 and 0xffffffff both match eax = 0xffffffff), and kept whole if it does not, so
# that it equals no zero-extended register of that width. Preserves everything but flags.
rt_narrow_imm:
    push rax
    push rcx
    mov rcx, rdx
    mov rax, rsi
    shr rax, cl                        # unsigned fit: no bit at or above the width
    jz rt_narrow_imm_fits
    mov rax, rsi
    dec cl
    sar rax, cl                        # signed fit: bits width-1..63 all ones
    cmp rax, -1
    jne rt_narrow_imm_done
rt_narrow_imm_fits:
    mov rcx, rdx
    mov eax, 1
    shl rax, cl
    dec rax
    and rsi, rax
rt_narrow_imm_done:
    pop rcx
    pop rax
    ret

rt_halt_forever:
    cli
    hlt
    jmp rt_halt_forever

# --- CPL 3 -----------------------------------------------------------------------------------
# rdi = routine; runs it at CPL 3 on the user stack; returns its RAX.
rt_run_user:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov rax, RT_DATA
    mov qword ptr [rax + 0x810], rsp
    mov rax, USTACK_TOP
    lea rcx, [rip + rt_user_trampoline]
    sub rax, 8
    push SEL_UDATA                     # ss
    push rax                           # rsp
    pushfq                             # rflags
    push SEL_UCODE                     # cs
    push rcx                           # rip
    mov rax, rdi
    iretq

rt_user_trampoline:
    call rax                           # the routine runs at CPL 3
    int RT_USER_RET_VECTOR             # back to CPL 0 through the DPL-3 gate

rt_user_return:
    mov rcx, RT_DATA
    mov rsp, qword ptr [rcx + 0x810]
    mov cx, SEL_KDATA
    mov ds, cx
    mov es, cx
    mov ss, cx
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

# --- exceptions ------------------------------------------------------------------------------
# rdi = vector (0-31: GUEST_SET_HANDLER checks), rsi = handler (0 removes it)
rt_set_handler:
    push rax
    mov rax, RT_HANDLERS
    mov qword ptr [rax + rdi * 8], rsi
    pop rax
    ret

.macro EXC_NOERR n
rt_exc_\n:
    push 0
    push \n
    jmp rt_exc_common
.endm

.macro EXC_ERR n
rt_exc_\n:
    push \n
    jmp rt_exc_common
.endm

EXC_NOERR 0
EXC_NOERR 1
EXC_NOERR 2
EXC_NOERR 3
EXC_NOERR 4
EXC_NOERR 5
EXC_NOERR 6
EXC_NOERR 7
EXC_ERR 8
EXC_NOERR 9
EXC_ERR 10
EXC_ERR 11
EXC_ERR 12
EXC_ERR 13
EXC_ERR 14
EXC_NOERR 15
EXC_NOERR 16
EXC_ERR 17
EXC_NOERR 18
EXC_NOERR 19
EXC_NOERR 20
EXC_ERR 21
EXC_NOERR 22
EXC_NOERR 23
EXC_NOERR 24
EXC_NOERR 25
EXC_NOERR 26
EXC_NOERR 27
EXC_NOERR 28
EXC_ERR 29
EXC_ERR 30
EXC_NOERR 31

rt_exc_common:
    push r15
    push r14
    push r13
    push r12
    push r11
    push r10
    push r9
    push r8
    push rbp
    push rdi
    push rsi
    push rdx
    push rcx
    push rbx
    push rax
    mov rbx, qword ptr [rsp + 120]     # vector
    mov rax, RT_HANDLERS
    mov rax, qword ptr [rax + rbx * 8]
    test rax, rax
    jz rt_exc_unhandled
    mov rdi, rsp                       # struct ex_regs *
    call rax
    pop rax
    pop rbx
    pop rcx
    pop rdx
    pop rsi
    pop rdi
    pop rbp
    pop r8
    pop r9
    pop r10
    pop r11
    pop r12
    pop r13
    pop r14
    pop r15
    add rsp, 16                        # vector, error code
    iretq

rt_exc_unhandled:
    mov rax, cr2
    push rax                           # args[3]: cr2
    push qword ptr [rsp + 144]         # args[2]: rip
    push qword ptr [rsp + 144]         # args[1]: the error code
    push rbx                           # args[0]: the vector
    mov rdx, rsp
    mov rdi, UCALL_UNHANDLED
    mov rsi, 4
    call rt_ucall
    jmp rt_halt_forever

rt_exc_stub_table:
    .quad rt_exc_0, rt_exc_1, rt_exc_2, rt_exc_3, rt_exc_4, rt_exc_5, rt_exc_6, rt_exc_7
    .quad rt_exc_8, rt_exc_9, rt_exc_10, rt_exc_11, rt_exc_12, rt_exc_13, rt_exc_14, rt_exc_15
    .quad rt_exc_16, rt_exc_17, rt_exc_18, rt_exc_19, rt_exc_20, rt_exc_21, rt_exc_22, rt_exc_23
    .quad rt_exc_24, rt_exc_25, rt_exc_26, rt_exc_27, rt_exc_28, rt_exc_29, rt_exc_30, rt_exc_31

.include "sev.s"
