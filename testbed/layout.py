"""Guest physical memory layout shared by the VMM's boot code and the guest runtime.

The host passes these values to the guest runtime as assembler defines (never by editing
guests/lib/), so one table decides where everything lives.

    0x000000  not mapped by the runtime (null-pointer guard)
    0x001000  ucall page (shared with the host)
    0x002000  boot GDT (firmware)
    0x010000  boot page tables (firmware; 1 GiB pages)
    0x100000  guest image (runtime + guest), at most 1 MiB
    0x200000  runtime GDT, IDT, TSS, data page
    0x210000  kernel stack (top 0x220000), trap stack, IST stack, user stack
    0x400000  runtime page tables (size depends on guest memory)
    FREE      first 2 MiB boundary after the page tables: free for guests
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.errors import UsageError
from testbed.x86 import PAGE_SIZE

UCALL_GPA = 0x1000
UCALL_PORT = 0x1000  # as KVM selftests' UCALL_PIO_PORT
BOOT_GDT_GPA = 0x2000
BOOT_PT_GPA = 0x10000
IMAGE_GPA = 0x100000
IMAGE_MAX = 0x100000
RT_GDT = 0x200000
RT_IDT = 0x201000
RT_TSS = 0x202000
RT_DATA = 0x203000
RT_GHCB = 0x205000
RT_REGION_END = 0x240000  # runtime tables, data, GHCB and stacks end here
RT_STACKS_START = 0x210000  # the runtime's stacks: kernel, trap, IST, user (to RT_REGION_END)
KSTACK_TOP = 0x220000
TRAPSTACK_TOP = 0x228000
ISTSTACK_TOP = 0x230000
USTACK_TOP = 0x240000
RT_PT_BASE = 0x400000

MIN_MEMORY = 8 << 20
MAX_MEMORY = 64 << 30


@dataclass(frozen=True)
class Layout:
    """Where things live for a guest of `mem_size` bytes."""

    mem_size: int

    def __post_init__(self) -> None:
        if self.mem_size % (2 << 20):
            raise UsageError(f"guest memory must be a multiple of 2 MiB, not {self.mem_size:#x}")
        if not MIN_MEMORY <= self.mem_size <= MAX_MEMORY:
            raise UsageError(f"guest memory must be between 8 MiB and 64 GiB, not {self.mem_size:#x}")

    @property
    def nframes(self) -> int:
        """4 KiB frames of guest memory."""
        return self.mem_size // PAGE_SIZE

    @property
    def page_table_bytes(self) -> int:
        """Bytes of runtime page tables (PML4, PDPT, PDs, PTs)."""
        npt = (self.nframes + 511) // 512
        npd = (npt + 511) // 512
        return (2 + npd + npt) * PAGE_SIZE

    @property
    def free_gpa(self) -> int:
        """First GPA guests may use freely."""
        end = RT_PT_BASE + self.page_table_bytes
        return (end + (2 << 20) - 1) & ~((2 << 20) - 1)

    def defines(self) -> dict[str, int]:
        """The values the guest runtime is assembled with."""
        return {
            "GUEST_MEM_SIZE": self.mem_size,
            "GUEST_FREE_GPA": self.free_gpa,
            "UCALL_GPA": UCALL_GPA,
            "UCALL_PORT": UCALL_PORT,
            "RT_GDT": RT_GDT,
            "RT_IDT": RT_IDT,
            "RT_TSS": RT_TSS,
            "RT_DATA": RT_DATA,
            "RT_GHCB": RT_GHCB,
            "RT_VALIDATE_START": RT_REGION_END,
            "RT_PT_BASE": RT_PT_BASE,
            "KSTACK_TOP": KSTACK_TOP,
            "TRAPSTACK_TOP": TRAPSTACK_TOP,
            "ISTSTACK_TOP": ISTSTACK_TOP,
            "USTACK_TOP": USTACK_TOP,
            "RT_STACKS_START": RT_STACKS_START,
            "RT_STACKS_END": RT_REGION_END,
        }
