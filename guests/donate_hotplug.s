# donate_hotplug.s - memory hotplug (testbed/vmm/hotplug.py): the guest boots with BOOT_MEM bytes
# of RAM in a VM that reserved GUEST_MEM_SIZE (VmOptions.max_memory; the runtime is built for
# it), converts below the old top, finds a to-shared conversion above it ignored (no RAM there yet),
# syncs 1 - the host adds RAM up to GUEST_MEM_SIZE - then converts pages above the old top,
# writes a stamp into the shared one, and syncs 2 with the stamp's address.
# DONATED=1 converts through guests/lib/donate.s (the donated tracker): after the hotplug its
# structure is too small for the host, which asks for more; the library grows at the next
# conversion. Without BOOT_MEM (no hotplug) it stops after sync 1.

.ifndef DONATED
.equ DONATED, 0
.endif
.ifndef BOOT_MEM
.equ BOOT_MEM, GUEST_MEM_SIZE
.endif
.equ HIGH, BOOT_MEM + 0x200000
.equ STAMP, 0x5EED0F0F

# rdi = gpa, rsi = npages
hp_share:
.if DONATED
    call donate_set_shared
.else
    call set_memory_shared
.endif
    ret

hp_private:
.if DONATED
    call donate_set_private
.else
    call set_memory_private
.endif
    ret

guest_main:
.if DONATED
    mov rdi, GUEST_FREE_GPA
    mov rsi, 0x1000
    mov rdx, GUEST_FREE_GPA + 0x20000
    call donate_init
    GUEST_ASSERT_EQ rax, 0
.endif
    mov rdi, GUEST_FREE_GPA + 0x20000
    mov rsi, 2
    call hp_share
    GUEST_ASSERT_EQ rax, 0
    mov rdi, BOOT_MEM
    mov rsi, 1
    call hp_share                      # above the old top: no RAM there, so QEMU's kvm_convert_memory
    GUEST_ASSERT_EQ rax, 0             # ignores a to-shared conversion (0, nothing recorded)
    GUEST_SYNC 1
.if BOOT_MEM < GUEST_MEM_SIZE
    mov rdi, HIGH
    mov rsi, 3
    call hp_share
    GUEST_ASSERT_EQ rax, 0
    mov rax, HIGH + 0x1000
    mov qword ptr [rax], STAMP
    mov rdi, HIGH
    mov rsi, 1
    call hp_private
    GUEST_ASSERT_EQ rax, 0
    mov rdi, GUEST_MEM_SIZE - 0x1000   # the new top page
    mov rsi, 1
    call hp_share
    GUEST_ASSERT_EQ rax, 0
    GUEST_SYNC 2, HIGH + 0x1000
.endif
    ret

.if DONATED
.include "donate.s"
.endif
