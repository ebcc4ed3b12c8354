"""What the VMM prepares before the first KVM_RUN: the image, boot page tables and a GDT.

Like KVM selftests' kvm_util (and a firmware, for a real guest) the VMM starts the vCPU
directly in 64-bit mode: it writes a boot GDT and boot page tables that identity-map all of
guest memory with 1 GiB pages, loads the guest image, and sets the registers. For an SEV
guest the boot tables carry the C-bit and the whole prepared region is encrypted in place by
the launch flow (KVM_SEV_LAUNCH_UPDATE_DATA), as OVMF's would be.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from testbed.errors import UsageError
from testbed.hw.memory import HostMemory
from testbed.layout import BOOT_GDT_GPA, BOOT_PT_GPA, IMAGE_GPA, IMAGE_MAX, KSTACK_TOP

BOOT_GDT = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)  # null, 64-bit code (0x08), data (0x10)
BOOT_PTE = 0x7  # present | writable | user
PS = 1 << 7


@dataclass(frozen=True)
class BootState:
    """Initial register state (KVM_SET_SREGS/KVM_SET_REGS)."""

    rip: int
    rsp: int
    cr3: int
    gdt_base: int
    gdt_limit: int


def write_boot_tables(memory: HostMemory, c_bit_mask: int) -> int:
    """Write the boot page tables (1 GiB identity pages over all memory); returns CR3."""
    pml4 = BOOT_PT_GPA
    pdpt = BOOT_PT_GPA + 0x1000
    ngb = max(1, (memory.size + (1 << 30) - 1) >> 30)
    if ngb > 512:
        raise UsageError("guest memory above 512 GiB is not supported by the boot page tables")
    memory.write(pml4, struct.pack("<Q", pdpt | BOOT_PTE | c_bit_mask) + bytes(4088))
    entries = [(i << 30) | BOOT_PTE | PS | c_bit_mask for i in range(ngb)]
    memory.write(pdpt, struct.pack(f"<{ngb}Q", *entries) + bytes(8 * (512 - ngb)))
    return pml4 | c_bit_mask


def prepare(memory: HostMemory, image: bytes, c_bit_mask: int) -> BootState:
    """Load `image` at IMAGE_GPA and write the boot GDT and tables; returns the entry state."""
    if len(image) > IMAGE_MAX:
        raise UsageError(f"guest image is {len(image)} bytes; at most {IMAGE_MAX} fit at 0x{IMAGE_GPA:x}")
    memory.write(BOOT_GDT_GPA, struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT))
    cr3 = write_boot_tables(memory, c_bit_mask)
    memory.write(IMAGE_GPA, image)
    return BootState(rip=IMAGE_GPA, rsp=KSTACK_TOP, cr3=cr3, gdt_base=BOOT_GDT_GPA, gdt_limit=8 * len(BOOT_GDT) - 1)


#: Regions the launch flow encrypts for an SEV guest: boot GDT, boot tables, image.
def launch_regions(image_len: int) -> list[tuple[int, int]]:
    """(gpa, length) of everything the VMM prepared, in whole pages as QEMU launches its memory
    regions (the firmware takes 16-byte multiples; the image's last page is launched whole)."""
    return [(BOOT_GDT_GPA, 0x1000), (BOOT_PT_GPA, 0x2000), (IMAGE_GPA, (max(image_len, 1) + 0xFFF) & ~0xFFF)]
