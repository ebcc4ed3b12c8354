# runtime.s - the guest runtime: boot, descriptor tables, page tables, exceptions, ucall.
#
# Assembled after every guest. Entered at _start in 64-bit mode on the firmware's boot page
# tables (an identity map built by the VMM, testbed/vmm/boot.py). It:
#   1. detects the memory-encryption technology at run time, as Linux's sme_enable() and
#      tdx_early_init() do: CPUID 0x8000001F (SEV bit, C-bit position) and the SEV_STATUS MSR,
#      or CPUID 0x21 "IntelTDX    " and TDG.VP.INFO (the shared bit; tdx.s) - never hard-coded;
#   2. builds its own GDT (kernel + user segments, TSS), IDT (handlers for vectors 0-31 and a
#      CPL-3 return gate) and page tables identity-mapping all guest memory with large pages
#      (split where a 4 KiB page needs its own mapping), private (C-bit set) except the ucall
#      page, which stays shared so the host can read it; on SNP and TDX it accepts the first
#      unit of free memory at boot (up to GUEST_ACCEPTED_END), each page-table page as it takes
#      it from the pool, and the rest of memory on demand (accept_memory);
#   3. picks the native hypercall instruction from the CPU vendor (Linux's alternatives);
#   4. calls guest_main and reports GUEST_DONE when it returns.
#
# Host-provided defines: GUEST_MEM_SIZE UCALL_GPA UCALL_PORT RT_GDT RT_IDT RT_TSS RT_DATA
# RT_PT_BASE RT_PT_END RT_UNACCEPTED GUEST_ACCEPTED_END KSTACK_TOP TRAPSTACK_TOP ISTSTACK_TOP
# USTACK_TOP RT_STACKS_START RT_STACKS_END.
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
    call rt_detect_tdx                 # TDX (tdx.s): before anything that can #VE
    call rt_detect_sev
    call rt_snp_validate_memory        # SNP: PVALIDATE before the first private write
    call rt_tdx_accept_boot_memory     # TDX: TDG.MEM.PAGE.ACCEPT, likewise
    call rt_setup_paging
    call rt_setup_ghcb                 # SEV-ES/SNP: the shared GHCB page
    call rt_setup_hypercall
    call rt_share_ucall_page
    call rt_migration_ready            # GUEST_MIGRATION_READY: MSR_KVM_MIGRATION_CONTROL
    xor ebp, ebp                       # the end of the frame chain (GUEST_HELPER_ENTER)
    call guest_main
    call rt_ucall_done

# On SEV the ucall page is mapped without the C-bit, on TDX with the shared bit; tell the
# host it is shared, as Linux does for every page it decrypts (set_memory_decrypted).
rt_share_ucall_page:
    mov rdi, RT_DATA
    mov rax, qword ptr [rdi + 0x800]
    or rax, qword ptr [rdi + 0x900]    # TDX's shared bit (tdx.s)
    test rax, rax
    jz rt_share_ucall_done
    mov rdi, UCALL_GPA
    mov rsi, 1
    call set_memory_shared
rt_share_ucall_done:
    ret

# Live migration (testbed migrate): with GUEST_MIGRATION_READY defined non-zero, tell the host
# the guest is ready to be migrated once its shared pages are all reported, as Linux's
# kvm_init_platform() does on a non-EFI boot (arch/x86/kernel/kvm.c): if CPUID advertises
# KVM_FEATURE_MIGRATION_CONTROL, write KVM_MIGRATION_READY to MSR_KVM_MIGRATION_CONTROL (the
# VMM handles it through its MSR filter). Linux does it only when memory encryption is active;
# the runtime does it on every VM type but TDX (whose MSRs would #VE), so sw-protected guests
# migrate too. Off by default: a guest that never declares itself ready is refused migration.
.ifndef GUEST_MIGRATION_READY
.equ GUEST_MIGRATION_READY, 0
.endif
.equ RT_MSR_KVM_MIGRATION_CONTROL, 0x4b564d08
.equ RT_KVM_FEATURE_MIGRATION_CONTROL, 17
rt_migration_ready:
.if GUEST_MIGRATION_READY
    mov rdi, RT_DATA
    cmp qword ptr [rdi + 0x900], 0     # TDX: not modelled
    jne rt_migration_ready_done
    mov eax, KVM_CPUID_FEATURES
    xor ecx, ecx
    cpuid
    bt eax, RT_KVM_FEATURE_MIGRATION_CONTROL
    jnc rt_migration_ready_done
    # As Linux marks its .bss..decrypted section (the early GHCB) decrypted in the host's list
    # first (early_set_mem_enc_dec_hypercall): SEV and SEV-ES map the GHCB page shared without
    # a conversion, so tell the host now (SNP converted it with a Page State Change).
    mov rdi, RT_DATA
    cmp qword ptr [rdi + 0x800], 0     # not SEV: no C-bit, nothing mapped shared
    je rt_migration_ready_msr
    test qword ptr [rdi + 0x808], 4    # SNP
    jnz rt_migration_ready_msr
    bt eax, KVM_FEATURE_HC_MAP_GPA_RANGE
    jnc rt_migration_ready_msr
    mov rax, KVM_HC_MAP_GPA_RANGE
    mov rbx, RT_GHCB
    mov rcx, 1
    xor edx, edx                       # decrypted, 4K
    vmmcall
rt_migration_ready_msr:
    mov ecx, RT_MSR_KVM_MIGRATION_CONTROL
    mov eax, 1                         # KVM_MIGRATION_READY
    xor edx, edx
    wrmsr
rt_migration_ready_done:
.endif
    ret

# --- technology detection -------------------------------------------------------------------
rt_detect_sev:
    mov rdi, RT_DATA
    mov qword ptr [rdi + 0x800], 0
    mov qword ptr [rdi + 0x808], 0
    cmp qword ptr [rdi + 0x900], 0     # a TD is not an SEV guest (its MSRs would #VE)
    jne rt_detect_sev_done
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
    # TSS: zeroed (memory never written reads as garbage on SEV), RSP0 (CPL 3 -> 0 transitions),
    # IST1 (#DF, #VC), and the I/O permission bit map's base past the limit, as Linux sets it
    # (IO_BITMAP_OFFSET_INVALID): port I/O at CPL 3 is #GP (SDM vol. 1 19.5).
    mov rsi, RT_TSS
    xor eax, eax
    mov ecx, 13
rt_tss_zero:
    mov qword ptr [rsi + rcx * 8 - 8], rax
    loop rt_tss_zero
    mov word ptr [rsi + 0x66], 0x68
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
    # #VE likewise (only TDX guests see vector 20): tdx.s
    lea rax, [rip + rt_ve_handler]
    mov qword ptr [rdi + 20 * 8], rax
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
# An identity map of [0, GUEST_MEM_SIZE) with large pages, as Linux's direct map
# (arch/x86/mm/init_64.c, phys_pud_init / phys_pmd_init): 1 GiB pages where CPUID 0x80000001
# EDX[26] (Page1GB) offers them and the whole GiB is memory, 2 MiB pages elsewhere. So boot
# work and table memory follow what the guest uses, not its size. A large page is split where
# one 4 KiB page of it needs its own mapping - frame 0 (left unmapped: the null-pointer
# guard), the shared ucall and GHCB pages, a conversion (the C-bit is per PTE) - as
# split_large_page() does for set_memory_decrypted() (arch/x86/mm/pat/set_memory.c). The
# PML4 and PDPT sit at RT_PT_BASE; every other table comes from the pool after them, up to
# RT_PT_END (rt_pt_alloc); split tables are never merged back.
.equ RT_PML4, RT_PT_BASE
.equ RT_PDPT, RT_PT_BASE + 0x1000
.equ RT_PT_POOL, RT_PT_BASE + 0x2000
.equ RT_PT_NEXT, RT_DATA + 0x840       # the pool's next free page
.equ PTE_PS, 0x80                      # a large page (2 MiB in a PDE, 1 GiB in a PDPTE)
.equ PTE_LARGE, PTE_FLAGS | PTE_PS
.equ RT_NFRAMES, GUEST_MEM_SIZE / 4096
.equ RT_NGIB, (GUEST_MEM_SIZE + 0x3fffffff) / 0x40000000

rt_setup_paging:
    mov rdi, RT_DATA
    mov r10, qword ptr [rdi + 0x800]   # C-bit mask
    mov rax, RT_PT_POOL
    mov qword ptr [rdi + 0x840], rax
    # 1 GiB pages? (Linux: X86_FEATURE_GBPAGES)
    xor r11d, r11d
    mov eax, 0x80000000
    cpuid
    cmp eax, 0x80000001
    jb rt_pg_gb_known
    mov eax, 0x80000001
    cpuid
    bt edx, 26
    jnc rt_pg_gb_known
    mov r11d, 1
rt_pg_gb_known:
    mov rdi, RT_PML4                   # SNP, TDX: accept the PML4 and the PDPT (sev.s)
    call rt_accept_page
    mov rdi, RT_PDPT
    call rt_accept_page
    mov rdi, RT_PML4                   # zero them
    xor eax, eax
    mov rcx, 1024
    rep stosq
    mov rdi, RT_PML4
    mov rax, RT_PDPT
    or rax, PTE_FLAGS
    or rax, r10
    mov qword ptr [rdi], rax
    xor r8, r8                         # GiB index
rt_pg_gib:
    mov r9, r8
    shl r9, 30                         # the GiB's base
    test r11, r11
    jz rt_pg_gib_pd
    mov rax, r9
    add rax, 0x40000000
    mov rcx, GUEST_MEM_SIZE
    cmp rax, rcx
    ja rt_pg_gib_pd                    # memory ends inside it: 2 MiB pages
    mov rax, r9
    or rax, PTE_LARGE
    or rax, r10
    mov rdi, RT_PDPT
    mov qword ptr [rdi + r8 * 8], rax
    jmp rt_pg_gib_next
rt_pg_gib_pd:
    call rt_pt_alloc                   # a zeroed PD (at boot the pool is nearly empty)
    mov rbx, rax
    or rax, PTE_FLAGS
    or rax, r10
    mov rdi, RT_PDPT
    mov qword ptr [rdi + r8 * 8], rax
    xor ecx, ecx
rt_pg_pde:
    mov rax, rcx
    shl rax, 21
    add rax, r9
    mov rdx, GUEST_MEM_SIZE
    cmp rax, rdx
    jae rt_pg_gib_next                 # beyond memory: not present
    or rax, PTE_LARGE
    or rax, r10
    mov qword ptr [rbx + rcx * 8], rax
    inc rcx
    cmp rcx, 512
    jb rt_pg_pde
rt_pg_gib_next:
    inc r8
    cmp r8, RT_NGIB
    jb rt_pg_gib
    # frame 0: not present (splits the first 2 MiB page)
    xor edi, edi
    call rt_pte_address
    mov qword ptr [rax], 0
    # TDX: the ucall page is shared, mapped with the shared bit (tdx.s)
    mov rdi, RT_DATA
    mov rcx, qword ptr [rdi + 0x900]
    test rcx, rcx
    jz rt_pg_not_tdx
    mov rdi, UCALL_GPA
    call rt_pte_address
    or qword ptr [rax], rcx
rt_pg_not_tdx:
    test r10, r10
    jz rt_pg_load
    # the ucall page and the GHCB are shared with the host: no C-bit
    mov rcx, r10
    not rcx
    mov rdi, UCALL_GPA
    call rt_pte_address
    and qword ptr [rax], rcx
    mov rdi, RT_GHCB
    call rt_pte_address
    and qword ptr [rax], rcx
rt_pg_load:
    mov rax, RT_PML4
    or rax, r10
    mov cr3, rax
    ret

# rax = a zeroed page-table page from the pool, or 0 when the pool is used up. On SNP and TDX
# the page is accepted as it is taken (rt_accept_page), as Linux's page allocator accepts the
# memory it hands out: the pool's pages the runtime never takes are never accepted.
rt_pt_alloc:
    push rcx
    push rdi
    mov rdi, RT_PT_NEXT
    mov rax, qword ptr [rdi]
    mov rcx, RT_PT_END
    cmp rax, rcx
    jae rt_pt_alloc_none
    lea rcx, [rax + 0x1000]
    mov qword ptr [rdi], rcx
    mov rdi, rax
    call rt_accept_page
    push rax
    xor eax, eax
    mov rcx, 512
    rep stosq
    pop rax
    jmp rt_pt_alloc_out
rt_pt_alloc_none:
    xor eax, eax
rt_pt_alloc_out:
    pop rdi
    pop rcx
    ret

# rdi = gpa (inside memory) -> rax = the address of the entry mapping it, rdx = its level:
# 1 a 4 KiB PTE, 2 a 2 MiB PDE, 3 a 1 GiB PDPTE. Preserves everything else.
rt_pte_lookup:
    push rcx
    mov rax, rdi
    shr rax, 30
    and eax, 511
    mov rcx, RT_PDPT
    lea rax, [rcx + rax * 8]
    mov edx, 3
    mov rcx, qword ptr [rax]
    test rcx, PTE_PS
    jnz rt_pte_lookup_done
    and ecx, 0xfffff000                # the PD: pool pages lie below 4 GiB (drops the C-bit)
    mov rax, rdi
    shr rax, 21
    and eax, 511
    lea rax, [rcx + rax * 8]
    mov edx, 2
    mov rcx, qword ptr [rax]
    test rcx, PTE_PS
    jnz rt_pte_lookup_done
    and ecx, 0xfffff000                # the PT
    mov rax, rdi
    shr rax, 12
    and eax, 511
    lea rax, [rcx + rax * 8]
    mov edx, 1
rt_pte_lookup_done:
    pop rcx
    ret

# rax = a large entry, rdx = its level (2 or 3): split it into a table of 512 entries that map
# the same memory with the same attributes (C-bit, NX, flags) one size down; the mapping does
# not change, so no flush is needed (split_large_page). rax = non-zero, or 0 when the pool is
# used up (the entry is left as it was). Preserves everything else.
rt_split_large:
    push rbx
    push rcx
    push rdx
    push rdi
    push r8
    push r9
    push r10
    push r11
    mov rdi, rax                       # the entry
    call rt_pt_alloc
    test rax, rax
    jz rt_split_out
    mov r8, qword ptr [rdi]
    mov rbx, RT_DATA
    mov rbx, qword ptr [rbx + 0x800]   # C-bit mask
    movabs rcx, 0x8000000000000000     # NX
    or rcx, rbx
    mov r11, RT_DATA
    or rcx, qword ptr [r11 + 0x900]    # TDX's shared bit
    and rcx, r8                        # NX, C-bit and shared bit as the large entry has them
    mov r9, r8
    and r9, 0xfff
    or r9, rcx                         # the new entries' attributes
    mov r10, 0x200000                  # a 1 GiB page becomes 2 MiB pages (PS kept)
    cmp rdx, 3
    je rt_split_sized
    mov r10, 0x1000                    # a 2 MiB page becomes 4 KiB pages
    btr r9, 7                          # bit 7 of a PTE is PAT, not PS
rt_split_sized:
    not rcx
    and rcx, r8                        # the entry without NX, C-bit and shared bit
    mov r11, r10
    shl r11, 9
    neg r11                            # ~(large page size - 1)
    and rcx, r11                       # its base address (no flags, no PAT bit)
    xor edx, edx
rt_split_fill:
    mov r11, rcx
    or r11, r9
    mov qword ptr [rax + rdx * 8], r11
    add rcx, r10
    inc rdx
    cmp rdx, 512
    jb rt_split_fill
    mov r11, rax                       # the entry now points to the table (private)
    or r11, PTE_FLAGS
    or r11, rbx
    mov qword ptr [rdi], r11
rt_split_out:
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rdx
    pop rcx
    pop rbx
    ret

# rdi = gpa -> rax = the address of the 4 KiB PTE mapping it, after splitting the large pages
# above it; 0 when gpa is outside memory or the pool has no table left for the split.
# Preserves everything else. (Public in practice: tests edit PTEs through it.)
rt_pte_address:
    push rdx
    mov rax, GUEST_MEM_SIZE
    cmp rdi, rax
    jae rt_pte_address_none
rt_pte_address_again:
    call rt_pte_lookup
    cmp rdx, 1
    je rt_pte_address_out
    call rt_split_large
    test rax, rax
    jnz rt_pte_address_again
rt_pte_address_none:
    xor eax, eax
rt_pte_address_out:
    pop rdx
    ret

# rdi = gpa, rsi = npages (inside memory), r11 = enc, rdx = 0 to split only what the range
# needs, 1 to also make the entries that map it private (enc: C-bit set, TDX's shared bit
# clear) or shared (C-bit clear, shared bit set; Linux's cc_mkenc / cc_mkdec). A large page the
# range covers whole keeps its size and gets the change itself (try_preserve_large_page); one
# it covers in part is split. rax = 0, or -ENOMEM when the pool has no table left (the split
# pass runs first, so a conversion fails before it changed anything). No-op without a C-bit
# or a shared bit.
rt_sme_ptes:
    push rbx
    push rcx
    push rdx
    push r8
    push r9
    push r10
    push r12
    push r13
    mov r12, rdx
    mov r8, RT_DATA
    mov r10, qword ptr [r8 + 0x800]    # C-bit mask
    mov r13, qword ptr [r8 + 0x900]    # TDX's shared bit
    mov rax, r10
    or rax, r13
    jz rt_sme_ptes_out
    mov r8, rdi                        # gpa
    mov r9, rsi                        # pages left
rt_sme_ptes_loop:
    push rdi
    mov rdi, r8
    call rt_pte_lookup                 # rax = the entry, rdx = its level
    pop rdi
    mov ecx, 1                         # pages the entry maps
    cmp rdx, 1
    je rt_sme_ptes_entry
    mov ecx, 512
    cmp rdx, 2
    je rt_sme_ptes_large
    mov ecx, 0x40000
rt_sme_ptes_large:
    mov rbx, rcx
    shl rbx, 12
    dec rbx
    test r8, rbx
    jnz rt_sme_ptes_split              # the range starts inside the large page
    cmp r9, rcx
    jae rt_sme_ptes_entry              # ... or ends inside it
rt_sme_ptes_split:
    call rt_split_large
    test rax, rax
    jnz rt_sme_ptes_loop
    mov rax, -12                       # -ENOMEM
    jmp rt_sme_ptes_out
rt_sme_ptes_entry:
    test r12, r12
    jz rt_sme_ptes_next
    mov rbx, qword ptr [rax]
    or rbx, r10
    or rbx, r13
    test r11, r11
    jnz rt_sme_ptes_private
    xor rbx, r10                       # shared: C-bit off
    jmp rt_sme_ptes_store
rt_sme_ptes_private:
    xor rbx, r13                       # private: shared bit off
rt_sme_ptes_store:
    mov qword ptr [rax], rbx
    invlpg [r8]
    cmp rcx, 1
    je rt_sme_ptes_next
    mov rbx, cr3                       # a large page: flush everything (the model's TLB holds
    mov cr3, rbx                       # 4 KiB translations, which INVLPG drops one at a time)
rt_sme_ptes_next:
    mov rbx, rcx
    shl rbx, 12
    add r8, rbx
    sub r9, rcx
    jnz rt_sme_ptes_loop
    xor eax, eax
rt_sme_ptes_out:
    pop r13
    pop r12
    pop r10
    pop r9
    pop r8
    pop rdx
    pop rcx
    pop rbx
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
# The control plane's note: this runtime tells the host of every conversion. A guest that
# wrote GUEST_IMAGE_LEGACY (prelude.s) withdraws it, and the conversions below skip the host.
GUEST_IMAGE_FEATURE MAP_GPA_RANGE
.ifndef GUEST_IMAGE_IS_LEGACY
.equ GUEST_IMAGE_IS_LEGACY, 0
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
    # SNP: accept what the conversion touches first (accept_memory; a no-op elsewhere)
    call accept_memory
    test rax, rax
    jnz rt_sme_out
    # split the large pages the range needs first: running out of tables fails here, before
    # anything changed
    push rdx
    xor edx, edx
    call rt_sme_ptes
    pop rdx
    test rax, rax
    jnz rt_sme_out
.if GUEST_IMAGE_IS_LEGACY
    jmp rt_sme_legacy
.endif
    # TDX: MapGPA and TDG.MEM.PAGE.ACCEPT (tdx.s)
    call rt_is_tdx
    jz rt_sme_not_tdx
    call tdx_set_memory_enc
    jmp rt_sme_out
rt_sme_not_tdx:
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

# GUEST_IMAGE_LEGACY: the guest's own side only - PVALIDATE on SNP (rescind before shared,
# validate after private) and the PTEs - and no word to the host: no KVM_HC_MAP_GPA_RANGE, no
# Page State Change, no MapGPA. On a guest_memfd VM type the first access through the new PTE
# is then a KVM_EXIT_MEMORY_FAULT, which the VMM's implicit-conversion policy answers.
rt_sme_legacy:
    mov r8, RT_DATA
    mov r8, qword ptr [r8 + 0x808]
    test r8, 4
    jz rt_sme_legacy_flip
    test r11, r11
    jnz rt_sme_legacy_private
    xor edx, edx
    call rt_snp_pvalidate_range
    test rax, rax
    jnz rt_sme_out
rt_sme_legacy_flip:
    call rt_sme_flip_ptes
    xor eax, eax
    jmp rt_sme_out
rt_sme_legacy_private:
    call rt_sme_flip_ptes
    mov edx, 1
    call rt_snp_pvalidate_range
    jmp rt_sme_out

# rdi = gpa, rsi = npages, r11 = enc: C-bit on (private) or off (shared) in our PTEs (SEV);
# the splits were made by rt_set_memory_enc's first pass, so this cannot fail.
rt_sme_flip_ptes:
    push rax
    push rdx
    mov edx, 1
    call rt_sme_ptes
    pop rdx
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
    cmp qword ptr [rdi + 0x900], 0
    jne rt_setup_hypercall_tdx
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
# TDX: VMCALL would be a #VE (exit reason 18) KVM never sees; hypercalls go through
# TDG.VP.VMCALL (kvm_hypercallN -> tdx_kvm_hypercall when X86_FEATURE_TDX_GUEST).
rt_setup_hypercall_tdx:
    lea rax, [rip + rt_kvm_hypercall]
    mov word ptr [rax], 0x02eb         # jmp +2: over the rest of vmcall and the ret
    ret

# KVM_HYPERCALL lands here. The default is VMCALL, as in Linux before alternatives run.
rt_kvm_hypercall:
    vmcall
    ret
    jmp tdx_kvm_hypercall              # TDX (rt_setup_hypercall_tdx)

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
# The string helpers work in chunks that end where a page of any of their pointers ends, and
# move or compare qwords inside a chunk, then its last bytes: Unicorn runs each iteration of a
# rep string instruction on its own, so qwords are 8x fewer (Linux's memset and memcpy are
# rep stosq/movsq and their byte forms too). No access crosses a page, so every page is first
# touched at a chunk's start, in the order the byte instructions touch it: a fault is the one
# rep stosb, rep movsb or repe cmpsb would take, with every byte before it done (memcmp reads a
# qword past the first difference only inside pages it has read).

# r8 = the bytes from rdi to the end of its page (1..4096), at most rdx.
rt_chunk_rdi:
    mov r8, rdi
    and r8, 0xfff
    neg r8
    add r8, 0x1000
    cmp r8, rdx
    jbe rt_chunk_rdi_out
    mov r8, rdx
rt_chunk_rdi_out:
    ret

# r8 = the bytes to the first end of rdi's or rsi's page (1..4096), at most rdx. Clobbers r9.
rt_chunk_rdi_rsi:
    call rt_chunk_rdi
    mov r9, rsi
    and r9, 0xfff
    neg r9
    add r9, 0x1000
    cmp r8, r9
    jbe rt_chunk_rdi_rsi_out
    mov r8, r9
rt_chunk_rdi_rsi_out:
    ret

# guest_memset: rdi = dst, rsi = the byte, rdx = n; rax = dst.
guest_memset:
    push rsi
    mov rsi, rdx
    call rt_accept_bytes               # SNP: accept what it touches (accept_memory)
    pop rsi
    push rdi
    push rcx
    push rdx
    push r8
    cld
    movzx eax, sil
    mov rcx, 0x0101010101010101
    imul rax, rcx                      # the byte in each of rax's 8
guest_memset_chunk:
    test rdx, rdx
    jz guest_memset_done
    call rt_chunk_rdi
    sub rdx, r8
    mov rcx, r8
    shr rcx, 3
    rep stosq
    mov rcx, r8
    and rcx, 7
    rep stosb
    jmp guest_memset_chunk
guest_memset_done:
    pop r8
    pop rdx
    pop rcx
    pop rdi
    mov rax, rdi
    ret

# guest_memcpy: rdi = dst, rsi = src, rdx = n; rax = dst. Forward, as rep movsb; byte by byte
# where dst is 1..7 bytes above src (a qword would read bytes this copy has not written yet,
# where rep movsb reads the ones it wrote).
guest_memcpy:
    push rdi
    push rsi
    push rcx
    push rdx
    push r8
    push r9
    call rt_accept_bytes_2             # SNP: accept what it touches (accept_memory)
    cld
    mov rcx, rdi
    sub rcx, rsi
    dec rcx
    cmp rcx, 7
    jb guest_memcpy_bytes              # dst - src in 1..7
guest_memcpy_chunk:
    test rdx, rdx
    jz guest_memcpy_done
    call rt_chunk_rdi_rsi
    sub rdx, r8
    mov rcx, r8
    shr rcx, 3
    rep movsq
    mov rcx, r8
    and rcx, 7
    rep movsb
    jmp guest_memcpy_chunk
guest_memcpy_bytes:
    mov rcx, rdx
    rep movsb
guest_memcpy_done:
    pop r9
    pop r8
    pop rdx
    pop rcx
    pop rsi
    pop rdi
    mov rax, rdi
    ret

# guest_memcmp: rdi = a, rsi = b, rdx = n; rax = 0 if the n bytes are equal, else
# a[i] - b[i] at the first i where they differ (negative, as a signed number, if a[i] < b[i]).
# A qword that differs is compared again byte by byte.
guest_memcmp:
    push rdi
    push rsi
    push rcx
    push rdx
    push r8
    push r9
    call rt_accept_bytes_2
    xor eax, eax
    cld
guest_memcmp_chunk:
    test rdx, rdx
    jz guest_memcmp_done
    call rt_chunk_rdi_rsi
    sub rdx, r8
    mov rcx, r8
    shr rcx, 3                         # ZF when no qword: then repe leaves it set
    repe cmpsq
    jne guest_memcmp_qword
    mov rcx, r8
    and rcx, 7
    jz guest_memcmp_chunk
    repe cmpsb
    je guest_memcmp_chunk
    jmp guest_memcmp_differ
guest_memcmp_qword:
    sub rdi, 8                         # the qword that differs: its bytes
    sub rsi, 8
    mov rcx, 8
    repe cmpsb
guest_memcmp_differ:
    movzx eax, byte ptr [rdi - 1]
    movzx ecx, byte ptr [rsi - 1]
    sub rax, rcx
guest_memcmp_done:
    pop r9
    pop r8
    pop rdx
    pop rcx
    pop rsi
    pop rdi
    ret

# rdi, rsi = two addresses, rdx = n: accept both ranges (rt_accept_bytes). Preserves everything.
rt_accept_bytes_2:
    push rsi
    mov rsi, rdx
    call rt_accept_bytes
    pop rsi
    push rdi
    mov rdi, rsi
    mov rsi, rdx
    call rt_accept_bytes
    mov rsi, rdi
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
.include "tdx.s"
