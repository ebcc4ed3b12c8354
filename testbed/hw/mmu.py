"""The MMU: address translation as the CPU does it, and the TLB fills Unicorn asks for.

Every TLB fill goes through `_tlb_fill`, which walks the guest's own page tables
(testbed.x86.paging), strips the encryption bit, sends the access to the private or DRAM alias
of the frame (legacy SEV) or to the guest_memfd or shared backing its memory attribute selects
(guest_memfd VM types; GuestMemory), checks the stage-2 view KVM built from the memory
attributes (a mismatch is a nested page fault) and, on SNP, the RMP's validated bit; walk
failures become #PF with CR2 and the architectural error code. Code frames are W^X at the TLB
so self-modifying code is rescanned for intercepted instruction sites (testbed/hw/intercepts.py)
before it runs. Segmentation as far as the model needs it (CS.L, CS.base) is here too.

When the optional C extension is built (testbed/hw/_nativemmu.c), the binding's fill hook is C
and does the whole fill for the common case: the same walk (testbed.x86.paging.walk is its
reference model, tests/test_mmu_native.py proves them equal), reading entries from the same
backings, the same stage-2/RMP checks, W^X and alias selection. It hands every other fill to
`_tlb_fill` below: any fault, an ownership move (legacy SEV transcoding), a code frame not yet
scanned, a non-canonical address, a pending fault or a quiesced vCPU (`_sync_native_fill`).
The frame sets it shares with this module are byte arrays (`_FrameSet`).
"""

from __future__ import annotations

import mmap
import struct
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from testbed.decode import effective_addresses
from testbed.errors import GuestMemoryError, TestbedError
from testbed.hw import vcpu_state
from testbed.hw.exits import NPF_FETCH, NPF_GUEST_ENC, NPF_GUEST_FINAL, NPF_GUEST_PAGE, NPF_WRITE
from testbed.hw.memory import (
    PRESENT_PRIVATE,
    PRESENT_SHARED,
    GuestMemory,
    HostMemory,
    StagePrivacy,
    release_mapping,
)
from testbed.hw.psp import GuestFirmware
from testbed.hw.rmp import Rmp
from testbed.hw.tdx_module import TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION, TdxModule
from testbed.hw.unicorn_binding import (
    HF_CS64,
    PRIVATE_ALIAS_BASE,
    PROT_ALL,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    UnicornBinding,
)
from testbed.hw.vcpu_state import VcpuState
from testbed.x86 import CR0_WP, EFER_NXE, MSR_EFER, PAGE_SHIFT, PAGE_SIZE, PFERR_FETCH, Reg, Vector, vector_name
from testbed.x86.addr import Gfn, Gpa, Gva
from testbed.x86.paging import ACCESS_FETCH, ACCESS_READ, ACCESS_WRITE, PageFault, PagingMode, Translation, walk

_U64S = struct.Struct("<Q")

#: #VC error code for a private access to an unvalidated page (AMD APM 15.36.10).
SVM_EXIT_PAGE_NOT_VALIDATED = 0x404


def _npf_error(access: int, private: bool) -> int:
    err = NPF_WRITE if access == ACCESS_WRITE else NPF_FETCH if access == ACCESS_FETCH else 0
    return err | (NPF_GUEST_ENC if private else 0)


class _DeliveryFault(Exception):  # noqa: N818 - a control-flow signal, not an error report
    """A fault raised while delivering an exception (becomes #DF)."""

    def __init__(self, vector: int, error_code: int, cr2: int | None = None) -> None:
        super().__init__(vector_name(vector))
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


class _NestedFault(_DeliveryFault):
    """An access that reached a GPA outside guest memory: a nested page fault (NPF/EPT
    violation) on `gpa`, not a #PF. `npf_error` carries NPF_GUEST_PAGE when the GPA is a
    paging-structure entry of the walk for `va` and NPF_GUEST_FINAL when it is the final
    access. Callers that only need "did the access work" treat it as any delivery fault."""

    def __init__(self, va: int, gpa: int, npf_error: int) -> None:
        super().__init__(Vector.PF, npf_error & 0x1F, va)
        self.gpa = gpa
        self.npf_error = npf_error


class _FrameSet:
    """A set of frame numbers stored as one byte per frame in a lazily zero-filled private
    mapping (a large guest costs what its code touches), shared with the C fill, which reads
    and writes the same bytes."""

    def __init__(self, nframes: int) -> None:
        self.nframes = nframes
        self.bits = mmap.mmap(-1, max(nframes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def __contains__(self, frame: int) -> bool:
        return 0 <= frame < self.nframes and self.bits[frame] != 0

    def add(self, frame: int) -> None:
        """Add `frame` (inside guest memory)."""
        self.bits[frame] = 1

    def discard(self, frame: int) -> None:
        """Remove `frame` if present."""
        if 0 <= frame < self.nframes:
            self.bits[frame] = 0

    def clear(self) -> None:
        """Empty the set (the pages go back to the kernel and read as zeros)."""
        self.bits.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Unmap the set (the vCPU is closed)."""
        release_mapping(self.bits)


class _FrameVas:
    """Per frame, the guest-virtual page its intercepted sites were last hooked at (| 1; 0:
    none): one little-endian u64 per frame in a lazily zero-filled private mapping, shared with
    the C fill, which sends a fetch through any other page to Python (`Mmu._tlb_fill`)."""

    def __init__(self, nframes: int) -> None:
        self.bits = mmap.mmap(-1, max(nframes, 1) * 8, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def get(self, frame: int) -> int:
        """The page `frame` was scanned at, or -1 when none."""
        return int.from_bytes(self.bits[frame * 8 : frame * 8 + 8], "little") - 1

    def set(self, frame: int, va_page: int) -> None:
        self.bits[frame * 8 : frame * 8 + 8] = (va_page | 1).to_bytes(8, "little")

    def clear(self) -> None:
        """Forget every page (the pages go back to the kernel and read as zeros)."""
        self.bits.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Unmap the table (the vCPU is closed)."""
        release_mapping(self.bits)


@dataclass
class _PendingFault:
    vector: int
    error_code: int | None
    cr2: int | None = None


class Mmu(UnicornBinding):
    """Translation, the TLB-fill handler, and guest-virtual memory access as the CPU sees it."""

    def _init_mmu(self, memory: GuestMemory, paging: PagingMode, snp: bool,
                  stage2: StagePrivacy | None, tdx_gpaw: int | None = None) -> None:
        self._mem = memory
        #: the TDX module (a TD: `tdx` VM type), keeping the Secure EPT's accepted state
        self._tdx: TdxModule | None = (TdxModule(self, memory.nframes, tdx_gpaw)  # type: ignore[arg-type]
                                       if tdx_gpaw is not None else None)
        self._paging = paging
        self._snp = snp
        #: KVM's answer to "is this GFN mapped private in stage 2?" (None: no private memory)
        self._stage2 = stage2
        self.rmp: Rmp | None = Rmp(memory.nframes) if snp else None
        dram = memory.dram
        size = memory.size

        def plain_pte(pa: int) -> int:
            if pa + 8 > size:
                raise GuestMemoryError("page-table read outside guest memory", pa)
            return int(_U64S.unpack_from(dram, pa)[0])

        # guest_memfd: a table entry is read from the backing stage 2 maps its GFN to.
        self._pte_reader_plain: Callable[[int], int] = memory.gmem_read_u64 if memory.guest_memfd else plain_pte
        self._pte_reader_private: Callable[[int], int] = lambda pa: memory.cpu_read_u64(pa, True)
        self._pending_fault_state: _PendingFault | None = None
        self._pending_npf_state: tuple[int, int] | None = None
        #: TDX: the MMIO #VE a TLB fill left pending (linear address, GPA with the shared bit, access)
        self._pending_ve: tuple[int, int, int] | None = None
        self._quiesced_state = False
        #: the guest linear address of the access behind the last NPF (see npf_linear_address)
        self._npf_linear = 0
        self._cs_bases: dict[int, int] = {}  # CS selector -> CS.base (0 for 64-bit code)
        self._cs64_cache: dict[int, bool] = {}
        self._xlat: dict[int, int] = {}  # guest-virtual page -> unicorn-physical page (last Python fill)
        self._exec_frames = _FrameSet(memory.nframes)  # frames code has been fetched from
        self._scanned_frames = _FrameSet(memory.nframes)  # exec frames whose intercepted sites are hooked
        #: frames written after code was fetched from them, whose translated blocks may survive
        #: until the next flush_code (legacy SEV: an ownership move must drop them)
        self._translated_frames: set[int] = set()
        self._scan_vas = _FrameVas(memory.nframes)  # ... and the guest-virtual page they are hooked at
        self._py_tlb_fills = 0
        #: KVM's dirty bitmap while dirty logging is on (kvm/dirty_log.py), read where the
        #: hardware reads its NPT: a page whose bit is clear is write-protected in stage 2
        self._dirty_bits: mmap.mmap | None = None
        self._py_dirty_faults = 0  # write-protection faults taken (the page's bit set) in Python
        self._psp: GuestFirmware | None = None  # the SEV firmware's context for this guest (sev_firmware)
        self._configure_native_fill()
        memory.on_ownership_change = self._on_ownership_change
        if snp:
            memory.host_write_guard = self._rmp_host_write_check
        memory.on_host_write = self._on_host_write
        memory.on_resize = self._configure_native_fill

    @abstractmethod
    def _scan_sites(self, frame: int, va_page: int, private: bool) -> None:
        """Hook the intercepted instruction sites of a code frame (testbed/hw/intercepts.py)."""

    @abstractmethod
    def _request_tlb_flush(self) -> None:
        """Flush the TLB before the next block runs (testbed/hw/intercepts.py)."""

    # --------------------------------------------------------- the C fill's inputs
    def _configure_native_fill(self) -> None:
        """Give the C fill (if built) the memory, the paging mode and the frame sets it walks
        and updates. KVM's attribute array is read where the hardware reads its stage-2
        tables: kvm/memattr.py's `private` bytes (mutated in place, never rebound); a stage 2
        without such an array is asked through is_private, i.e. every fill is Python's."""
        native = self._native_mmu
        if native is None:
            return
        mem = self._mem
        stage2 = self._stage2
        attrs = getattr(stage2, "private", None) if stage2 is not None else None
        if not isinstance(attrs, bytearray | mmap.mmap) or len(attrs) < mem.nframes:
            attrs = None
        model = 2 if mem.guest_memfd else 1 if mem.encrypted else 0
        paging = self._paging
        native.configure(
            mem.dram_address(), mem.private_address() if mem.private is not None else 0, mem.size, model,
            mem.owner if mem.encrypted else None, attrs, self.rmp.validated if self.rmp is not None else None,
            self._exec_frames.bits, self._scanned_frames.bits, paging.phys_bits, paging.enc_mask,
            paging.enc_means_private, self._snp, stage2 is not None, PRIVATE_ALIAS_BASE,
        )
        # guest_memfd: a fill whose backing page does not exist yet is Python's (the first
        # private fault allocates it: `_tlb_fill`); an extension without set_present is older
        # than that rule and gets every guest_memfd fill sent here instead.
        set_present = getattr(native, "set_present", None)
        if set_present is not None:
            set_present(mem.present)
        self._native_without_present = set_present is None and mem.present is not None
        # A code frame reached through a second guest-virtual page needs its sites hooked there
        # too: an extension without set_scan_vas would map it unhooked, so every fill is Python's.
        set_scan_vas = getattr(native, "set_scan_vas", None)
        if set_scan_vas is not None:
            set_scan_vas(self._scan_vas.bits)
        self._native_without_scan_vas = set_scan_vas is None
        self._sync_native_dirty_log()
        self._sync_native_fill()

    def _sync_native_dirty_log(self) -> None:
        """Hand the C fill the dirty bitmap (or None: logging off). An extension without
        set_dirty_log is older than dirty logging: while logging is on every fill is Python's."""
        native = self._native_mmu
        if native is None:
            return
        set_dirty_log = getattr(native, "set_dirty_log", None)
        if set_dirty_log is not None:
            set_dirty_log(self._dirty_bits)
        self._native_without_dirty_log = set_dirty_log is None and self._dirty_bits is not None

    def _sync_native_fill(self) -> None:
        """A pending fault or a quiesced vCPU makes every fill Python's (see `_tlb_fill`)."""
        native = self._native_mmu
        if native is not None:
            # A TD's fills are Python's: the C fill has no TDX stage-2/Secure-EPT rules yet.
            native.set_python_only(self._quiesced_state or self._pending_fault_state is not None
                                   or getattr(self, "_native_without_present", False)
                                   or getattr(self, "_native_without_scan_vas", False)
                                   or getattr(self, "_native_without_dirty_log", False)
                                   or self._pending_npf_state is not None or self._tdx is not None)

    @property
    def _pending_fault(self) -> _PendingFault | None:
        return self._pending_fault_state

    @_pending_fault.setter
    def _pending_fault(self, value: _PendingFault | None) -> None:
        self._pending_fault_state = value
        self._sync_native_fill()

    @property
    def _pending_npf(self) -> tuple[int, int] | None:
        return self._pending_npf_state

    @_pending_npf.setter
    def _pending_npf(self, value: tuple[int, int] | None) -> None:
        self._pending_npf_state = value
        self._sync_native_fill()

    @property
    def _quiesced(self) -> bool:
        """Deleting hooks between runs: TLB fills must not scan."""
        return self._quiesced_state

    @_quiesced.setter
    def _quiesced(self, value: bool) -> None:
        self._quiesced_state = value
        self._sync_native_fill()

    def _hooked_at(self, frame: int, vaddr: int) -> bool:
        """The frame's intercepted sites are hooked, and at `vaddr`'s page (hooks are per
        guest-virtual address): what a fetch needs first, and execute permission needs."""
        return frame in self._scanned_frames and self._scan_vas.get(frame) == vaddr & ~0xFFF

    def _del_hook_quiesced(self, handle: int) -> None:
        """Delete a hook between runs: uc_hook_del re-translates the blocks it instrumented
        through TLB fills, answered blindly meanwhile (the caller flushes the TLB after)."""
        self._quiesced = True
        try:
            self._del_hook(handle)
        finally:
            self._quiesced = False

    @property
    def tlb_fills(self) -> int:
        """TLB fills this vCPU completed or failed (in C and in Python)."""
        native = self._native_mmu
        return self._py_tlb_fills + (native.fills if native is not None else self._native_fills)

    @property
    def dirty_faults(self) -> int:
        """Write-protection faults taken for dirty logging (in C and in Python): first writes
        to a page after the log was enabled or collected."""
        native = self._native_mmu
        native_faults = getattr(native, "dirty_faults", 0) if native is not None else 0
        return self._py_dirty_faults + int(native_faults)

    def set_dirty_log(self, bitmap: mmap.mmap | None) -> None:
        """KVM switched dirty logging on (its bitmap: one bit per GFN, LSB first) or off
        (None). While on, a fill grants write only for a page whose bit is set; the first
        write to a clean page is KVM's write-protection fault, folded into its fill (the bit
        is set, the fill grants write: mmu.c fast_page_fault -> mark_page_dirty). KVM flushes
        the TLBs after changing it (kvm/dirty_log.py)."""
        if bitmap is not None and len(bitmap) * 8 < self._mem.nframes:
            raise TestbedError(f"dirty bitmap of {len(bitmap)} bytes is too small for {self._mem.nframes} pages")
        self._dirty_bits = bitmap
        self._sync_native_dirty_log()
        self._sync_native_fill()

    def _mark_dirty(self, gpa: int, length: int) -> None:
        """A CPU write the hardware model makes itself (exception delivery): its pages are
        dirtied as the guest's own stores are."""
        bits = self._dirty_bits
        if bits is None or length <= 0:
            return
        for frame in range(gpa >> PAGE_SHIFT, ((gpa + length - 1) >> PAGE_SHIFT) + 1):
            if frame < self._mem.nframes:
                bits[frame >> 3] |= 1 << (frame & 7)

    @property
    def memory(self) -> HostMemory:
        """The host's view of guest memory."""
        return self._mem.host_view()

    @property
    def guest_memory(self) -> GuestMemory:
        """The memory controller (hardware-internal; not for the kvm or vmm layers)."""
        return self._mem

    # ------------------------------------------------------------------ segmentation
    def mode_of(self, cs_selector: int) -> bool:
        """is_64bit_mode() for a CS selector already read."""
        cached = self._cs64_cache.get(cs_selector)
        return cached if cached is not None else self.is_64bit_mode()

    def is_64bit_mode(self) -> bool:
        """CS.L with EFER.LMA: whether the guest runs 64-bit code (is_64_bit_mode()).

        Unicorn exposes only the CS selector, so the descriptor is read from the GDT and cached
        per selector until the next TLB flush (a guest that rewrites the descriptor of the CS
        it is running on without reloading CS is not modelled).
        """
        sel = self.read_reg(Reg.CS)
        cached = self._cs64_cache.get(sel)
        if cached is not None:
            return cached
        base, _limit = self.descriptor_table("gdt")
        try:
            desc = self.read_virtual(Gva(base + (sel & ~7)), 8, supervisor=True)
            value = bool(_U64S.unpack(desc)[0] & (1 << 53))
        except _DeliveryFault:
            # The GDT is no longer readable (a hostile guest moved it): the CPU still runs on
            # the descriptor cached in CS, which QEMU keeps as HF_CS64 in hflags.
            value = bool(self._hflags() & HF_CS64)
        self._cs64_cache[sel] = value
        return value

    def linear_rip(self, rip: int) -> int:
        """The linear address of `rip` in the current code segment: CS.base + RIP (RIP itself
        in 64-bit code)."""
        return self._code_base(self.read_reg(Reg.CS)) + rip

    def _code_base(self, cs: int) -> int:
        """CS.base of the code segment `cs` (the current one): an instruction's linear address
        is CS.base + RIP. 0 in 64-bit mode, where the base is ignored; otherwise read from the
        descriptor in the GDT (0 if the GDT is unreadable) and cached like CS.L."""
        cs &= 0xFFFF
        base = self._cs_bases.get(cs)
        if base is None:
            base = 0
            if not self.mode_of(cs):
                gdt, _limit = self.descriptor_table("gdt")
                try:
                    lo = _U64S.unpack(self.read_virtual(Gva(gdt + (cs & ~7)), 8, supervisor=True))[0]
                    base = ((lo >> 16) & 0xFFFFFF) | (((lo >> 56) & 0xFF) << 24)
                except _DeliveryFault:
                    base = 0
            self._cs_bases[cs] = base
        return base

    def _enter_64bit_code(self) -> None:
        """Load HF_CS64 and CS.base = 0 for a 64-bit handler (the binding patches QEMU's state)."""
        self._load_64bit_code_state()
        self._cs_bases.clear()

    def npf_linear_address(self) -> int:
        """The guest linear address whose access caused the current NPF/EPT violation (VMX
        reports it as GUEST_LINEAR_ADDRESS; KVM on SVM re-derives it by decoding the
        instruction, which the testbed's kvm layer is spared)."""
        return self._npf_linear

    # ------------------------------------------------------------------------- MMU
    def _paging_walk(self, va: int, access: int, user: bool, cr3: int | None = None,
                     cr0: int | None = None, efer: int | None = None) -> Translation | PageFault:
        if cr3 is None or cr0 is None or efer is None:
            cr3 = self.read_reg(Reg.CR3)
            cr0 = self.read_reg(Reg.CR0)
            efer = self.get_msr(MSR_EFER)
        mem = self._mem
        # SEV: the CPU always walks page tables as private. Unencrypted memory: read the
        # entries straight from the buffer (the walk's hot loop). With EFER.NXE clear, bit 63
        # is reserved and I/D is not reported (SDM vol. 3 4.5, 4.7).
        reader = self._pte_reader_plain if not mem.encrypted else self._pte_reader_private
        rmp = self.rmp
        if rmp is not None:
            # SNP: the walk's own accesses are private (APM 15.36.10: "page table access ... the
            # effective C-bit is always 1"), so each table is RMP-checked: a page not assigned to
            # the guest (shared in stage 2) fails the check with a nested page fault on the
            # table's GPA (KVM: a private access to a shared GFN, KVM_EXIT_MEMORY_FAULT); an
            # assigned page the guest has not validated is #VC PAGE_NOT_VALIDATED.
            validated, read_table, stage2 = rmp.validated, reader, self._stage2
            npf_error = _npf_error(ACCESS_READ, True) | NPF_GUEST_PAGE

            def reader(pa: int) -> int:
                if stage2 is not None and not stage2.is_private(Gfn(pa >> PAGE_SHIFT)):
                    raise _NestedFault(va, pa, npf_error)
                if not validated[pa >> PAGE_SHIFT]:
                    raise _DeliveryFault(Vector.VC, SVM_EXIT_PAGE_NOT_VALIDATED, va)
                return read_table(pa)

        return walk(reader, cr3, va, access, user, self._paging, wp=bool(cr0 & CR0_WP), nxe=bool(efer & EFER_NXE),
                    mem_size=mem.size)

    def translate(self, va: Gva, access: int = ACCESS_READ, supervisor: bool = True) -> Translation:
        """Walk the guest page tables as the CPU would; raises _DeliveryFault(#PF) on failure,
        _NestedFault when the walk or the access reaches a GPA outside guest memory."""
        try:
            result = self._paging_walk(va, access, user=not supervisor)
        except TestbedError:
            raise _DeliveryFault(Vector.PF, 0, va) from None
        if isinstance(result, PageFault):
            if result.table_gpa is not None:
                raise _NestedFault(va, result.table_gpa,
                                   _npf_error(access, self._mem.encrypted) | NPF_GUEST_PAGE)
            raise _DeliveryFault(Vector.PF, result.error_code, va)
        if result.gpa >= self._mem.size:
            raise _NestedFault(va, result.gpa | (va & 0xFFF),
                               _npf_error(access, result.encrypted) | NPF_GUEST_FINAL)
        return result

    def read_virtual(self, va: Gva, length: int, supervisor: bool = True) -> bytes:
        """Read guest-virtual memory as the CPU sees it (plaintext)."""
        out = bytearray()
        while length:
            n = min(length, PAGE_SIZE - (va & 0xFFF))
            tr = self.translate(va, ACCESS_READ, supervisor)
            out += self._mem.cpu_read(tr.gpa | (va & 0xFFF), n, tr.encrypted)
            va = Gva(va + n)
            length -= n
        return bytes(out)

    def write_virtual(self, va: Gva, data: bytes, supervisor: bool = True) -> None:
        """Write guest-virtual memory as the CPU does."""
        pos = 0
        while pos < len(data):
            cur = Gva(va + pos)
            n = min(len(data) - pos, PAGE_SIZE - (cur & 0xFFF))
            tr = self.translate(cur, ACCESS_WRITE, supervisor)
            self._mem.cpu_write(tr.gpa | (cur & 0xFFF), data[pos : pos + n], tr.encrypted)
            self._mark_dirty(tr.gpa | (cur & 0xFFF), n)
            pos += n

    def fetch_bytes(self, va: Gva, length: int) -> bytes:
        """Instruction bytes at `va` as the CPU fetches them (always decrypted on SEV)."""
        out = bytearray()
        while length:
            n = min(length, PAGE_SIZE - (va & 0xFFF))
            tr = self.translate(va, ACCESS_READ, supervisor=True)
            out += self._mem.cpu_read(tr.gpa | (va & 0xFFF), n, private=self._mem.encrypted)
            va = Gva(va + n)
            length -= n
        return bytes(out)

    def gva_to_gpa(self, va: Gva) -> Gpa:
        """The guest-physical address the CPU uses for `va` (raises on a failed walk)."""
        return Gpa(self.translate(va).gpa | (va & 0xFFF))

    def _tlb_fill(self, vaddr: int, access: int) -> tuple[int, int] | None:
        if self._quiesced:
            # Deleting hooks between runs (_reset_site_hooks): a host-side lookup, flushed
            # right after; a failed fill here would leave Unicorn's error pending.
            return 0, PROT_ALL
        if self._pending_fault is not None or self._pending_npf is not None:
            # After a failed fill QEMU still probes (a fetch at 0xfffffffffffff000 was seen)
            # before the run stops: only the first failure of a run is the guest's fault.
            return None
        self._py_tlb_fills += 1
        if not -(1 << 47) <= (vaddr if vaddr < (1 << 63) else vaddr - (1 << 64)) < (1 << 47):
            # A non-canonical address is #GP(0), not a page fault (SDM vol. 1 3.3.7.1).
            self._pending_fault = _PendingFault(Vector.GP, 0, None)
            return None
        # CS (for the CPL), CR3 and CR0 in one batched read.
        cs, cr3, cr0, efer = self._read_fill_regs()
        user = (cs & 3) == 3
        try:
            result = self._paging_walk(vaddr, access, user, cr3, cr0, efer)
        except _NestedFault as nested:  # SNP: a page table in a frame not assigned (shared)
            self._pending_npf = (nested.gpa, nested.npf_error)
            self._npf_linear = vaddr
            return None
        except _DeliveryFault as fault:  # SNP: a page table in a frame not validated
            self._pending_fault = _PendingFault(fault.vector, fault.error_code, vaddr)
            return None
        if isinstance(result, PageFault):
            if result.table_gpa is not None:
                # The walk itself reads a GPA outside guest memory: on hardware with nested
                # paging that access takes the NPF (a guest page-table access), not a #PF.
                self._pending_npf = (result.table_gpa, _npf_error(access, self._mem.encrypted) | NPF_GUEST_PAGE)
                self._npf_linear = vaddr
                return None
            self._pending_fault = _PendingFault(Vector.PF, result.error_code, vaddr)
            return None
        mem = self._mem
        gpa = result.gpa
        tdx = self._tdx
        if gpa >= mem.size:
            if tdx is not None and not result.encrypted:
                # TDX: a shared GPA with no memory is MMIO; KVM's MMIO SPTE (suppress-#VE
                # clear) makes the access an EPT-violation #VE in the guest.
                self._pending_ve = (vaddr, gpa | tdx.shared_mask, access)
                self._pending_fault = _PendingFault(Vector.VE, None, None)
                return None
            self._pending_npf = (gpa | (vaddr & 0xFFF), _npf_error(access, False) | NPF_GUEST_FINAL)
            self._npf_linear = vaddr
            return None
        frame = gpa >> PAGE_SHIFT
        stage2 = self._stage2
        if stage2 is not None and (mem.encrypted or self._snp or tdx is not None):
            # The stage-2 tables KVM built from the memory attributes map each GFN either
            # private or shared; an access with the other C-bit value is a nested page fault
            # (fetches count as private on SEV; a TD's fetch is private or shared by its bit).
            access_private = result.encrypted or (access == ACCESS_FETCH and tdx is None)
            if stage2.is_private(Gfn(frame)) != access_private:
                shared_bit = 0 if tdx is None or access_private else tdx.shared_mask
                self._pending_npf = (gpa | shared_bit | (vaddr & 0xFFF), _npf_error(access, access_private))
                return None
            if tdx is not None and access_private and not tdx.accepted[frame]:
                # A private access to a PENDING page: an EPT violation TD exit whose extended
                # exit qualification says so (SEPT_VE_DISABLE: no #VE); KVM decides.
                tdx.ext_exit_qual = TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION
                self._pending_npf = (gpa | (vaddr & 0xFFF), _npf_error(access, True))
                return None
            rmp = self.rmp
            if rmp is not None and access_private and not rmp.validated[frame]:
                # SNP: a private access to an assigned page the guest has not validated.
                self._pending_fault = _PendingFault(Vector.VC, SVM_EXIT_PAGE_NOT_VALIDATED, vaddr)
                return None
        # W^X at the TLB for code frames: EXEC is granted only by fetch fills (which scan the
        # frame for intercepted instructions first) and WRITE only while the frame is not known
        # code, so guest self-modifying code is rescanned before it runs (the canary tests pin it).
        if access == ACCESS_FETCH:
            # Scanned through another page (an alias of the frame), its sites are hooked there
            # only: hook them at this page too (a hook is per guest-virtual address).
            if not self._hooked_at(frame, vaddr):
                self._scan_sites(frame, vaddr & ~0xFFF, result.encrypted or mem.encrypted)
            if frame not in self._exec_frames:
                # It becomes code here: an entry that lets another address write it, from
                # before, would not trap (W^X): flush them before the next block.
                self._exec_frames.add(frame)
                self._request_tlb_flush()
        elif access == ACCESS_WRITE and frame in self._exec_frames:
            self._exec_frames.discard(frame)
            self._scanned_frames.discard(frame)
            # Translated blocks of the frame may outlive this (an executable TLB entry elsewhere
            # runs them): an ownership move must still find it (_on_ownership_change).
            self._translated_frames.add(frame)
            # This fill takes execute away at `vaddr` only; another address mapping the frame
            # may keep an executable TLB entry and run the new code unscanned.
            self._request_tlb_flush()
        code_frame = frame in self._exec_frames
        perms = PROT_READ
        if result.writable and not code_frame:
            perms |= PROT_WRITE
        # Execute only where the frame's sites are hooked (a fetch has just scanned it here): a
        # read fill through an alias of a code frame scanned elsewhere, or of a watched or
        # rewritten frame (`_watch_next_page`, W^X), must not give an executable entry, which
        # a later fetch would use without a fill, and so without a scan there.
        exec_ok = result.executable and code_frame and (access == ACCESS_FETCH or self._hooked_at(frame, vaddr))
        if mem.guest_memfd:
            # KVM's fault path maps a private GFN to its guest_memfd page and a shared one to
            # the memslot's userspace page (mmu.c __kvm_mmu_faultin_pfn): two host pages.
            if exec_ok:
                perms |= PROT_EXEC
            fill_private = stage2 is not None and stage2.is_private(Gfn(frame))
            upa = PRIVATE_ALIAS_BASE + gpa if fill_private else gpa
            present = mem.present
            if present is not None and not present[frame] & (PRESENT_PRIVATE if fill_private else PRESENT_SHARED):
                # The first fault on this GFN's page: guest_memfd allocates the private page
                # (kvm_mmu_faultin_pfn_gmem -> kvm_gmem_get_pfn), or the VMM's page is touched.
                mem.materialise(frame, 1, fill_private)
        elif not mem.encrypted:
            if exec_ok:
                perms |= PROT_EXEC
            upa = gpa
        elif access == ACCESS_FETCH or result.encrypted:
            # Instruction fetches are always private on SEV (APM 15.34.5), whatever the C-bit.
            mem.make_private(frame)
            upa = PRIVATE_ALIAS_BASE + gpa
            if result.encrypted:
                if exec_ok:
                    perms |= PROT_EXEC
            else:
                perms = PROT_EXEC  # data accesses through this C=0 mapping use DRAM
        else:
            mem.make_dram(frame)
            upa = gpa
            # no EXEC: a fetch through this C=0 mapping must refill towards the private alias
        dirty = self._dirty_bits
        if dirty is not None and perms & PROT_WRITE:
            # Dirty logging: a page whose bit is clear is write-protected in stage 2. A read
            # maps it read-only (a later store refills); a store takes KVM's write fault,
            # which marks the page dirty and makes it writable (kvm/dirty_log.py).
            bit = 1 << (frame & 7)
            if not dirty[frame >> 3] & bit:
                if access == ACCESS_WRITE:
                    dirty[frame >> 3] |= bit
                    self._py_dirty_faults += 1
                else:
                    perms &= ~PROT_WRITE
        self._xlat[vaddr >> PAGE_SHIFT] = upa
        if self._native_mmu is not None:
            self._native_mmu.record(vaddr >> PAGE_SHIFT, upa)  # the exit path's fetch reads it in C
        return upa, perms

    def _fault_address(self, page: int, error_code: int) -> int:
        """The faulting linear address within `page` (Unicorn's fill hook sees only the page).

        A fetch faults at RIP when RIP is on the page (else the instruction crossed into it);
        a data access at the effective address of the faulting instruction's memory operand,
        computed from its decode and the registers (implicit stack and string operands too).
        """
        rip = self.linear_rip(self.read_reg(Reg.RIP))
        page &= ~0xFFF
        if error_code & PFERR_FETCH:
            return rip if rip & ~0xFFF == page else page
        try:
            code = self.fetch_bytes(Gva(rip), 15)
        except _DeliveryFault:
            return page
        for address in effective_addresses(code, rip, self._reg_by_name):
            if address & ~0xFFF == page:
                return address
            if (address + 7) & ~0xFFF == page:  # an access that crosses into the page
                return page
        return page

    def _on_ownership_change(self, frame: int) -> None:
        # A translation to the alias that lost the frame must not survive (DESIGN.md). Code
        # translated from the frame is stale too: a move to the private alias decrypts the DRAM
        # bytes into it, which a C=0 write may have changed, and an instruction fetch reads
        # through C=1 what a data read does (APM 15.34.5): the frame is rescanned and retranslated.
        if frame in self._exec_frames or frame in self._scanned_frames or frame in self._translated_frames:
            self._exec_frames.discard(frame)
            self._scanned_frames.discard(frame)
            self.flush_code()  # (and the TLB)
        else:
            self.flush_tlb()

    def stage2_changed(self, first: Gfn, end: Gfn, private: bool) -> None:
        """KVM changed the attributes of GFNs [first, end): it zaps their stage-2 mappings (a
        TLB flush here; mmu.c kvm_arch_pre_set_memory_attributes -> kvm_unmap_gfn_range). On
        SNP that changes no RMP entry: a private page guest_memfd still holds stays assigned
        and validated while the GFN is shared, and is mapped again as it was when the GFN turns
        private again; only freeing it (gmem_invalidated: sev_gmem_invalidate) makes it shared
        and unvalidated, and the page faulted in after that is assigned, not validated
        (sev_gmem_prepare) - so a GFN turning private is assigned here, Validated kept. In a TD
        the zap removes a private page (TDH.MEM.PAGE.REMOVE): converted back, it is pending."""
        if self.rmp is not None and private:
            self.rmp.keep_assigned(first, end)
        if self._tdx is not None and not private:
            self._tdx.page_remove(first, end)  # TDH.MEM.PAGE.REMOVE: converted back, it is pending
        self.flush_tlb()

    def gmem_invalidated(self, gfns: list[Gfn]) -> None:
        """guest_memfd freed the private pages of `gfns` (fallocate PUNCH_HOLE): KVM zaps their
        stage-2 mappings (kvm_gmem_punch_hole -> kvm_gmem_invalidate_start ->
        kvm_mmu_unmap_gfn_range, a TLB flush here). On SNP the freed page goes back to shared in
        the RMP, Validated cleared (sev_gmem_invalidate), whatever the GFN's attribute; where it
        is private the next private access faults a new page in, assigned but not validated
        (sev_gmem_prepare). In a TD a private page was removed (tdx_sept_remove_private_spte:
        TDH.MEM.PAGE.REMOVE) and comes back pending (AUG)."""
        stage2 = self._stage2
        for gfn in gfns:
            private = stage2 is not None and stage2.is_private(gfn)
            if self.rmp is not None:
                # sev_gmem_invalidate: the freed page is shared and unvalidated; while the GFN
                # is private the next private fault brings a new page, assigned (the testbed
                # assigns it now), never validated.
                self.rmp.assign(gfn, Gfn(gfn + 1), private)
            if private and self._tdx is not None:
                self._tdx.page_remove(gfn, Gfn(gfn + 1))
        self.flush_tlb()

    # ------------------------------------------------------------- the TDX module's side
    @property
    def tdx_module(self) -> TdxModule | None:
        """The TDX module of a TD's vCPU (None on other VM types)."""
        return self._tdx

    def is_private_gfn(self, gfn: int) -> bool:
        """Whether stage 2 (KVM's attributes) maps `gfn` private."""
        return self._stage2 is not None and self._stage2.is_private(Gfn(gfn))

    def zero_private_page(self, gfn: int) -> None:
        """TDG.MEM.PAGE.ACCEPT's initialisation of a private page (zeroed with the TD's key)."""
        if not self._mem.materialise(gfn, 1, True):  # a page guest_memfd has just created is zero
            self._mem.cpu_write(gfn << PAGE_SHIFT, bytes(PAGE_SIZE), True)
        self._on_host_write(gfn << PAGE_SHIFT, PAGE_SIZE)

    def tdx_mem_page_add(self, gpa: Gpa, length: int) -> None:
        """TDH.MEM.PAGE.ADD (KVM_TDX_INIT_MEM_REGION): the VMM's pages are copied into
        guest_memfd and enter the TD accepted."""
        if self._tdx is None:
            raise TestbedError("TDH.MEM.PAGE.ADD on a vCPU that is not a TD")
        self._mem.populate_private(gpa, length)
        self._tdx.page_add(gpa >> PAGE_SHIFT, (gpa + length + PAGE_SIZE - 1) >> PAGE_SHIFT)

    def tdx_init_vm(self, cpuid: dict[tuple[int, int], tuple[int, int, int, int]]) -> None:
        """TDH.MNG.INIT: the TD's CPUID configuration, which the module answers from."""
        if self._tdx is None:
            raise TestbedError("TDH.MNG.INIT on a vCPU that is not a TD")
        self._tdx.configure_cpuid(cpuid)

    def ext_exit_qualification(self) -> int:
        """TDX: the extended exit qualification of the current EPT-violation TD exit (its
        type in bits 3:0: TDX_EXT_EXIT_QUAL_TYPE_*); 0 outside a TD."""
        return self._tdx.ext_exit_qual if self._tdx is not None else 0

    # ------------------------------------------------------- the launch (SEV firmware)
    def launch_update_data(self, gpa: Gpa, length: int) -> None:
        """SEV LAUNCH_UPDATE_DATA: encrypt [gpa, gpa + length) in place."""
        self._mem.launch_encrypt(gpa, length)

    def snp_launch_update(self, gpa: Gpa, length: int) -> None:
        """SNP_LAUNCH_UPDATE: the pages move into guest_memfd (or are encrypted in place
        without it) and enter the guest assigned and validated in the RMP."""
        if self._mem.guest_memfd:
            self._mem.populate_private(gpa, length)
        else:
            self._mem.launch_encrypt(gpa, length)
        if self.rmp is not None:
            self.rmp.launch_validate(gpa >> PAGE_SHIFT, (gpa + length + PAGE_SIZE - 1) >> PAGE_SHIFT)

    def sev_firmware(self) -> GuestFirmware:
        """The SEV firmware's context for this guest: the migration commands (hw/psp.py), which
        read and write guest pages with this guest's key and the vCPU's state as the VMSA."""
        if self._psp is None:
            self._psp = GuestFirmware(self._mem, self.rmp, lambda: self.save_state().to_bytes(),
                                      lambda data: self.load_state(VcpuState.from_bytes(data)))
        return self._psp

    def save_state(self) -> VcpuState:
        """The vCPU's architectural state (hw/vcpu_state.py), between runs."""
        return vcpu_state.save(self)

    def load_state(self, state: VcpuState) -> None:
        """Load a VcpuState (hw/vcpu_state.py) into this vCPU, between runs."""
        if not isinstance(state, VcpuState):
            raise TestbedError(f"load_state: expected a VcpuState, not {type(state).__name__}")
        vcpu_state.load(self, state)

    def flush_tlb(self) -> None:
        """Drop every cached translation (UC_CTL_TLB_FLUSH)."""
        self._flush_engine_tlb()
        self._xlat.clear()
        if self._native_mmu is not None:
            self._native_mmu.flush()
        self._cs64_cache.clear()
        self._cs_bases.clear()

    def flush_code(self) -> None:
        """Drop translated code, and with it what the TLB and the frame sets know about code
        frames: every frame is rescanned when next fetched (idempotent: a site already hooked
        stays hooked). The frame sets are mappings a snapshot does not copy (snapshot.py
        restores the site hooks, then flushes code), so this also keeps a restore consistent."""
        super().flush_code()
        self._exec_frames.clear()
        self._scanned_frames.clear()
        self._translated_frames.clear()
        self._scan_vas.clear()
        self._sync_native_dirty_log()  # a snapshot restore may have changed the bitmap reference
        self._sync_native_fill()
        self.flush_tlb()

    def _on_host_write(self, gpa: int, length: int) -> None:
        first = gpa >> PAGE_SHIFT
        last = (gpa + max(length, 1) - 1) >> PAGE_SHIFT
        if first == last and first not in self._exec_frames:
            return  # the common case (a page accepted or written by KVM): no code there
        hit = [f for f in range(first, last + 1) if f in self._exec_frames]
        if hit:
            for f in hit:
                self._exec_frames.discard(f)
                self._scanned_frames.discard(f)
            self.flush_tlb()
            self.flush_code()

    def _rmp_host_write_check(self, gpa: int, length: int) -> None:
        """SNP: the RMP refuses host writes to frames assigned to the guest (an RMP #PF on the
        host side); nothing is written, so nothing of the guest's is corrupted."""
        assert self.rmp is not None
        for frame in range(gpa >> PAGE_SHIFT, ((gpa + max(length, 1) - 1) >> PAGE_SHIFT) + 1):
            if self.rmp.is_assigned(frame):
                raise GuestMemoryError("RMP violation: host write to a page assigned to the SNP guest",
                                       frame << PAGE_SHIFT)

    def _fetch_at_rip(self, rip: int, n: int) -> bytes:
        native = self._native_mmu
        if native is not None:
            got: bytes | None = native.fetch(rip, n)
            if got is not None:
                return got
        upa = self._xlat.get(rip >> PAGE_SHIFT)
        off = rip & 0xFFF
        if upa is not None and off + n <= PAGE_SIZE:
            mem = self._mem
            if upa >= PRIVATE_ALIAS_BASE:
                buf = mem.private
                base = upa - PRIVATE_ALIAS_BASE
            else:
                buf = mem.dram
                base = upa
            assert buf is not None
            return bytes(buf[base + off : base + off + n])
        try:
            return self.fetch_bytes(Gva(rip), n)
        except _DeliveryFault:
            pass
        try:  # the instruction's bytes up to the end of its first page
            return self.fetch_bytes(Gva(rip), min(n, PAGE_SIZE - off))
        except _DeliveryFault:
            return b""  # unreadable from here: decoded as no known instruction (#UD)
