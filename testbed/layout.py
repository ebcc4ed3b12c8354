"""Guest physical memory layout shared by the VMM's boot code and the guest runtime.

The host passes these values to the guest runtime as assembler defines (never by editing
guests/lib/), so one table decides where everything lives.

    0x000000  not mapped by the runtime (null-pointer guard)
    0x001000  ucall page (shared with the host)
    0x002000  boot GDT (firmware)
    0x010000  boot page tables (firmware; 1 GiB pages)
    0x100000  guest image (runtime + guest), at most 1 MiB
    0x200000  runtime GDT, IDT, TSS, data page, GHCB, unaccepted-memory bitmap (SNP)
    0x210000  kernel stack (top 0x220000), trap stack, IST stack, user stack
    0x400000  runtime page tables: PML4, PDPT, then a pool the runtime takes PDs and PTs from
              as it splits large pages (2 MiB; 1 GiB where CPUID offers them)
    0x600000  FREE: free for guests (GUEST_FREE_GPA, whatever the guest's size)
    ACCEPTED  SNP, TDX: [FREE, GUEST_ACCEPTED_END) is accepted at boot, page-table pages as the
              runtime takes them; the rest on demand (accept_memory), as Linux's
              unaccepted-memory support does

The runtime's identity map uses large pages, so its page tables do not grow with the guest: a
64 GiB SEV guest needs the PML4, the PDPT (1 GiB pages) and the few tables splits add (frame
0's guard and the shared ucall and GHCB pages: a PD and two PTs), 5 pages; without 1 GiB
pages one PD per GiB more (68 pages at 64 GiB; `Layout.boot_page_table_pages`). A conversion
of a 4 KiB page inside a large page takes a table from the pool; an exhausted pool makes
set_memory_shared/private return -ENOMEM.
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
RT_UNACCEPTED = 0x206000  # SNP: one bit per 2 MiB unit of memory not yet accepted (a page: 64 GiB)
RT_REGION_END = 0x240000  # runtime tables, data, GHCB and stacks end here
RT_STACKS_START = 0x210000  # the runtime's stacks: kernel, trap, IST, user (to RT_REGION_END)
KSTACK_TOP = 0x220000
TRAPSTACK_TOP = 0x228000
ISTSTACK_TOP = 0x230000
USTACK_TOP = 0x240000
RT_PT_BASE = 0x400000
RT_PT_END = 0x600000  # the page-table pool ends here; guests' free memory starts here
#: Linux's unaccepted-memory unit (the EFI table's unit_size, PMD_SIZE on x86): accept_memory
#: validates whole units and the runtime's bitmap has one bit per unit.
ACCEPT_UNIT = 2 << 20
#: SNP and TDX: the end of the memory accepted at boot. The launch adds the image and the
#: runtime's region (below RT_REGION_END) accepted (SNP_LAUNCH_UPDATE, TDH.MEM.PAGE.ADD); the
#: runtime accepts the first ACCEPT_UNIT of the guests' free memory, [RT_PT_END, ACCEPT_AT_BOOT)
#: (RT_VALIDATE_START), at boot, and each page-table page as it takes it from the pool, as
#: Linux's allocator accepts the pages it hands out; the rest of the pool's unit and the
#: runtime's stay unaccepted (the runtime's own: the bitmap marks neither), and all memory
#: above waits for accept_memory, as Linux leaves unaccepted memory to its allocator. Each
#: 4 KiB page is one PVALIDATE or TDG.MEM.PAGE.ACCEPT exit (KVM maps guest_memfd pages at
#: 4 KiB, so a 2 MiB one would fail with a size mismatch), so this is most of what a boot
#: costs: 512 exits and one per page-table page (5 for most guests).
ACCEPT_AT_BOOT = RT_PT_END + ACCEPT_UNIT

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
        """Bytes reserved for the runtime's page tables (PML4, PDPT and the pool of PDs and
        PTs), whatever the guest's size: large pages keep the map small (module docstring)."""
        return RT_PT_END - RT_PT_BASE

    def boot_page_table_pages(self, *, sev: bool, gbpages: bool = True) -> int:
        """Pages of runtime page tables right after boot: the PML4, the PDPT, one PD per GiB
        not mapped by a 1 GiB page, and what splitting for frame 0's guard takes (a PT, and
        the first GiB's PD when a 1 GiB page maps it) and, with a C-bit, for the GHCB's
        shared PTE (a PT; the ucall page shares frame 0's)."""
        full_gib = self.mem_size >> 30
        partial = 1 if self.mem_size & ((1 << 30) - 1) else 0
        npd = partial + (0 if gbpages else full_gib)
        first_pd = 1 if gbpages and full_gib else 0
        return 2 + npd + first_pd + 1 + (1 if sev else 0)

    @property
    def free_gpa(self) -> int:
        """First GPA guests may use freely."""
        return RT_PT_END

    @property
    def accepted_end(self) -> int:
        """SNP, TDX: end of the memory accepted at boot (a multiple of ACCEPT_UNIT)."""
        return min(self.mem_size, ACCEPT_AT_BOOT)

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
            "RT_UNACCEPTED": RT_UNACCEPTED,
            "GUEST_ACCEPTED_END": self.accepted_end,
            "ACCEPT_UNIT": ACCEPT_UNIT,
            "RT_PT_END": RT_PT_END,
            "RT_VALIDATE_START": RT_PT_END,
            "RT_PT_BASE": RT_PT_BASE,
            "KSTACK_TOP": KSTACK_TOP,
            "TRAPSTACK_TOP": TRAPSTACK_TOP,
            "ISTSTACK_TOP": ISTSTACK_TOP,
            "USTACK_TOP": USTACK_TOP,
            "RT_STACKS_START": RT_STACKS_START,
            "RT_STACKS_END": RT_REGION_END,
        }
