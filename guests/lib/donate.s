# donate.s - the guest side of the donated tracker (testbed/tracker/donated.py): the guest keeps
# its encryption status - the sorted list of its shared ranges - in memory it shares with the
# host, and tells the host where with KVM_HC_TESTBED_DONATE_ENC_STATUS (a testbed hypercall).
# A guest includes this file (`.include "donate.s"`) and converts through donate_set_shared /
# donate_set_private instead of set_memory_shared / set_memory_private.
#
#   donate_init         rdi = gpa (page aligned), rsi = size in bytes (whole pages), rdx = the end
#                       of the memory the donation may grow into (rdi + rsi: never grows).
#                       Makes the pages shared, writes the header, records the runtime's shared
#                       pages (ucall page, GHCB) and its own, and donates. If the host answers
#                       -ENOSPC (too small for it) it grows to the host's request once and
#                       donates again. rax = 0 or -errno.
#   donate_set_shared   rdi = gpa, rsi = npages: set_memory_shared, and the records follow it.
#   donate_set_private  the same for set_memory_private. rax = 0 or -errno (-ENOSPC when the
#                       structure is full and cannot grow: nothing was converted).
#
# Each conversion is bracketed by the header's generation (odd while it runs: the host then
# knows its read is incomplete): before the conversion the library makes room (a record more
# than now) and honours a host request (header host_request > the donated size, written when
# guest memory grew: it grows the donation in place, up to the limit, and donates again).
# Every register but rax is preserved.

.equ ENC_STATUS_MAGIC, 0x53434E45
.equ ENC_STATUS_VERSION, 1
.equ ENCS_MAGIC, 0x00
.equ ENCS_VERSION, 0x04
.equ ENCS_GENERATION, 0x08
.equ ENCS_COUNT, 0x10
.equ ENCS_CAPACITY, 0x14
.equ ENCS_HOST_REQUEST, 0x18
.equ ENCS_RECORDS, 0x20
.equ ENCS_RECORD_SIZE, 16
.equ KVM_HC_TESTBED_DONATE_ENC_STATUS, 32
.equ DONATE_ENOSPC, 28

donate_init:
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    mov qword ptr [rip + dn_area], 0
    mov qword ptr [rip + dn_limit], rdx
    push rsi
    shr rsi, 12
    call set_memory_shared
    pop rsi
    test rax, rax
    jnz dn_init_out
    mov r8, rdi
    mov dword ptr [r8 + ENCS_MAGIC], ENC_STATUS_MAGIC
    mov dword ptr [r8 + ENCS_VERSION], ENC_STATUS_VERSION
    mov qword ptr [r8 + ENCS_GENERATION], 0
    mov dword ptr [r8 + ENCS_COUNT], 0
    mov rax, rsi
    sub rax, ENCS_RECORDS
    shr rax, 4
    mov dword ptr [r8 + ENCS_CAPACITY], eax
    mov qword ptr [r8 + ENCS_HOST_REQUEST], 0
    mov qword ptr [rip + dn_area], rdi
    mov qword ptr [rip + dn_size], rsi
    call dn_record_runtime
    push rsi
    shr rsi, 12
    mov edx, 1
    call donate_update                 # the structure's own pages are shared
    pop rsi
    call dn_hypercall
    cmp rax, -DONATE_ENOSPC
    jne dn_init_done
    mov rdi, qword ptr [r8 + ENCS_HOST_REQUEST]
    call dn_grow                       # the host's request, once
dn_init_done:
    test rax, rax
    jz dn_init_out
    mov qword ptr [rip + dn_area], 0   # not donated: conversions are plain ones
dn_init_out:
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    ret

# The pages the runtime shared before the structure existed: the ucall page (SEV, TDX) and the
# GHCB (SEV-ES, SNP). A guest that declares itself ready for live migration
# (GUEST_MIGRATION_READY, runtime.s) must have every shared page reported: on a VM whose RAM
# starts shared (neither SEV nor TDX: sw-protected) that is all of RAM, recorded as one range
# the guest's private conversions then cut (call donate_init before converting anything).
dn_record_runtime:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    mov ecx, GUEST_MIGRATION_READY     # (the runtime's default, or the host's define)
    mov rax, RT_DATA
    mov rdx, qword ptr [rax + 0x800]
    or rdx, qword ptr [rax + 0x900]
    jnz dn_rr_ucall
    test ecx, ecx                      # neither SEV nor TDX: the ucall page is not shared
    jz dn_rr_ghcb
    xor edi, edi                       # migratable and RAM starts shared: all of it
    mov rsi, GUEST_MEM_SIZE / 4096
    mov edx, 1
    call donate_update
    jmp dn_rr_out
dn_rr_ucall:
    mov rdi, UCALL_GPA
    mov rsi, 1
    mov edx, 1
    call donate_update
dn_rr_ghcb:
    mov rax, RT_DATA
    test ecx, ecx
    jz dn_rr_es
    cmp qword ptr [rax + 0x800], 0     # migratable: SEV maps the GHCB page shared too, and the
    je dn_rr_out                       # runtime reported it to the host (rt_migration_ready)
    jmp dn_rr_record_ghcb
dn_rr_es:
    test qword ptr [rax + 0x808], 2
    jz dn_rr_out
dn_rr_record_ghcb:
    mov rdi, RT_GHCB
    mov rsi, 1
    mov edx, 1
    call donate_update
dn_rr_out:
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    ret

# rdi = gpa, rsi = size: the donation hypercall; rax = its answer
dn_hypercall:
    push rbx
    push rcx
    push rdx
    mov rax, KVM_HC_TESTBED_DONATE_ENC_STATUS
    mov rbx, rdi
    mov rcx, rsi
    xor edx, edx
    KVM_HYPERCALL
    pop rdx
    pop rcx
    pop rbx
    ret

donate_set_shared:
    push rdx
    mov edx, 1
    call dn_convert
    pop rdx
    ret

donate_set_private:
    push rdx
    xor edx, edx
    call dn_convert
    pop rdx
    ret

# rdi = gpa, rsi = npages, rdx = 1 shared / 0 private
dn_convert:
    push r8
    mov r8, qword ptr [rip + dn_area]
    test r8, r8
    jz dn_cv_plain
    call dn_reserve
    test rax, rax
    jnz dn_cv_out
    inc qword ptr [r8 + ENCS_GENERATION]   # odd: the conversion and its record are under way
    call dn_plain_convert
    test rax, rax
    jnz dn_cv_end                      # refused: the records stay as they are
    call donate_update                 # cannot fail: dn_reserve made room
dn_cv_end:
    inc qword ptr [r8 + ENCS_GENERATION]   # even again
    jmp dn_cv_out
dn_cv_plain:
    call dn_plain_convert
dn_cv_out:
    pop r8
    ret

dn_plain_convert:
    test rdx, rdx
    jz dn_pc_private
    jmp set_memory_shared
dn_pc_private:
    jmp set_memory_private

# r8 = the structure: the host's request honoured if the limit allows, and room for one more
# record; rax = 0 or -errno (the growth's, when there is no room)
dn_reserve:
    push rcx
    push rdi
    mov rdi, qword ptr [r8 + ENCS_HOST_REQUEST]
    cmp rdi, qword ptr [rip + dn_size]
    jbe dn_rs_room
    call dn_grow                       # the host asks for more: best effort (the structure
dn_rs_room:                            # stays valid at its size if the limit forbids it)
    mov eax, dword ptr [r8 + ENCS_COUNT]
    inc rax
    mov ecx, dword ptr [r8 + ENCS_CAPACITY]
    cmp rax, rcx
    jbe dn_rs_ok
    mov rdi, qword ptr [rip + dn_size] # full: twice the size, if the limit and the host allow
    shl rdi, 1
    call dn_grow
    jmp dn_rs_out
dn_rs_ok:
    xor eax, eax
dn_rs_out:
    pop rdi
    pop rcx
    ret

# rdi = the new size in bytes (rounded up to pages): the pages after the donation become shared
# and recorded, the capacity grows, and the whole is donated again; rax = 0 or -errno. Beyond
# the limit, or not larger than the donation now (a host_request of 0, or one that wraps when
# rounded up): -ENOSPC, nothing changed. Refused by the host: the capacity goes back.
dn_grow:
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    mov rax, -DONATE_ENOSPC
    add rdi, 0xfff
    and rdi, -4096
    mov r8, qword ptr [rip + dn_area]
    mov rsi, qword ptr [rip + dn_size]
    cmp rdi, rsi
    jbe dn_gr_out
    lea rax, [r8 + rdi]
    cmp rax, qword ptr [rip + dn_limit]
    mov rax, -DONATE_ENOSPC
    ja dn_gr_out
    mov rbx, rdi                       # the new size
    inc qword ptr [r8 + ENCS_GENERATION]
    lea rdi, [r8 + rsi]
    mov rcx, rbx
    sub rcx, rsi
    shr rcx, 12
    push rsi
    mov rsi, rcx
    call set_memory_shared
    test rax, rax
    jnz dn_gr_undo
    mov rax, rbx
    sub rax, ENCS_RECORDS
    shr rax, 4
    mov dword ptr [r8 + ENCS_CAPACITY], eax
    mov edx, 1
    call donate_update                 # the new pages touch the donation: no new record
    mov rdi, r8
    mov rsi, rbx
    call dn_hypercall
    test rax, rax
    jz dn_gr_taken
    mov rcx, qword ptr [rsp]           # refused: the capacity the host holds
    sub rcx, ENCS_RECORDS
    shr rcx, 4
    mov dword ptr [r8 + ENCS_CAPACITY], ecx
    jmp dn_gr_undo
dn_gr_taken:
    mov qword ptr [rip + dn_size], rbx
dn_gr_undo:
    pop rsi
    inc qword ptr [r8 + ENCS_GENERATION]
dn_gr_out:
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    ret

# rdi = gpa, rsi = npages, rdx = 1 shared / 0 private: the records follow (sorted, disjoint,
# adjacent ones merged); rax = 0, or -ENOSPC above the capacity (nothing changed). A no-op
# before donate_init.
donate_update:
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    xor eax, eax
    mov r8, qword ptr [rip + dn_area]
    test r8, r8
    jz dn_up_out
    mov r9, rdi
    shr r9, 12                         # s
    lea r10, [r9 + rsi]                # e (exclusive)
    mov r11, rdx
    mov ebx, dword ptr [r8 + ENCS_COUNT]
    lea r15, [r8 + ENCS_RECORDS]
    xor r12d, r12d                     # i: the first record ending after s (at s too, if shared)
dn_up_find_i:
    cmp r12, rbx
    jae dn_up_found_i
    mov rax, r12
    shl rax, 4
    mov rcx, qword ptr [r15 + rax]
    add rcx, qword ptr [r15 + rax + 8]
    cmp rcx, r9
    ja dn_up_found_i
    jb dn_up_next_i
    test r11, r11
    jnz dn_up_found_i
dn_up_next_i:
    inc r12
    jmp dn_up_find_i
dn_up_found_i:
    mov r13, r12                       # j: the first record from i starting after e (at e, if private)
dn_up_find_j:
    cmp r13, rbx
    jae dn_up_found_j
    mov rax, r13
    shl rax, 4
    mov rcx, qword ptr [r15 + rax]
    cmp rcx, r10
    jb dn_up_next_j
    ja dn_up_found_j
    test r11, r11
    jz dn_up_found_j
dn_up_next_j:
    inc r13
    jmp dn_up_find_j
dn_up_found_j:
    # records i..j-1 are replaced by k new ones, kept on the stack: [rsp], [rsp + 16]
    sub rsp, 32
    xor r14d, r14d
    test r11, r11
    jz dn_up_private
    mov rsi, r9                        # shared: one record, merged with i..j-1
    mov rdi, r10
    cmp r12, r13
    je dn_up_shared_put
    mov rax, r12
    shl rax, 4
    mov rcx, qword ptr [r15 + rax]
    cmp rcx, rsi
    jae dn_up_shared_end
    mov rsi, rcx
dn_up_shared_end:
    mov rax, r13
    dec rax
    shl rax, 4
    mov rcx, qword ptr [r15 + rax]
    add rcx, qword ptr [r15 + rax + 8]
    cmp rcx, rdi
    jbe dn_up_shared_put
    mov rdi, rcx
dn_up_shared_put:
    mov qword ptr [rsp], rsi
    sub rdi, rsi
    mov qword ptr [rsp + 8], rdi
    mov r14d, 1
    jmp dn_up_place
dn_up_private:
    cmp r12, r13
    je dn_up_nothing                   # no record overlaps
    mov rax, r12
    shl rax, 4
    mov rcx, qword ptr [r15 + rax]     # the head of record i survives
    cmp rcx, r9
    jae dn_up_no_head
    mov qword ptr [rsp], rcx
    mov rdx, r9
    sub rdx, rcx
    mov qword ptr [rsp + 8], rdx
    mov r14d, 1
dn_up_no_head:
    mov rax, r13                       # the tail of record j-1 survives
    dec rax
    shl rax, 4
    mov rcx, qword ptr [r15 + rax]
    add rcx, qword ptr [r15 + rax + 8]
    cmp rcx, r10
    jbe dn_up_place
    mov rax, r14
    shl rax, 4
    mov qword ptr [rsp + rax], r10
    sub rcx, r10
    mov qword ptr [rsp + rax + 8], rcx
    inc r14
dn_up_place:
    mov rax, rbx                       # the new count: count + k - (j - i)
    add rax, r14
    add rax, r12
    sub rax, r13
    mov ecx, dword ptr [r8 + ENCS_CAPACITY]
    cmp rax, rcx
    jbe dn_up_fits
    add rsp, 32
    mov rax, -DONATE_ENOSPC
    jmp dn_up_out
dn_up_fits:
    mov r9, rax
    mov rcx, rbx                       # records j..count-1 move to i + k
    sub rcx, r13
    shl rcx, 1
    mov rsi, r13
    shl rsi, 4
    add rsi, r15
    lea rdi, [r12 + r14]
    shl rdi, 4
    add rdi, r15
    cmp rdi, rsi
    jbe dn_up_forward
    lea rsi, [rsi + rcx * 8 - 8]       # to the right: copy backwards
    lea rdi, [rdi + rcx * 8 - 8]
    std
    rep movsq
    cld
    jmp dn_up_write
dn_up_forward:
    cld
    rep movsq
dn_up_write:
    mov rdi, r12
    shl rdi, 4
    add rdi, r15
    test r14, r14
    jz dn_up_count
    mov rax, qword ptr [rsp]
    mov qword ptr [rdi], rax
    mov rax, qword ptr [rsp + 8]
    mov qword ptr [rdi + 8], rax
    cmp r14, 2
    jb dn_up_count
    mov rax, qword ptr [rsp + 16]
    mov qword ptr [rdi + 16], rax
    mov rax, qword ptr [rsp + 24]
    mov qword ptr [rdi + 24], rax
dn_up_count:
    mov dword ptr [r8 + ENCS_COUNT], r9d
dn_up_nothing:
    add rsp, 32
    xor eax, eax
dn_up_out:
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    ret

# The library's state, in the guest's own (private) image.
.align 8
dn_area:
    .quad 0                            # the donated structure's gpa; 0 = nothing donated
dn_size:
    .quad 0                            # its size in bytes
dn_limit:
    .quad 0                            # how far it may grow
