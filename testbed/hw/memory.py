"""Guest physical memory: the host buffers behind it, and the three memory models.

Guest RAM lives in anonymous private mappings (mmap) that the vCPU maps into Unicorn with
mem_map_ptr, so the host side reads and writes them without copies. The kernel fills them
with zeros lazily, so a large guest costs what it touches, and `close()` returns them.

Which model a VM gets follows KVM (DESIGN.md, "Memory, encryption, MMU"):

* plain (the default VM type): one buffer; every view reads the same bytes.
* legacy encrypted (`sev`, `sev-es`): one frame per guest page, seen through two physical
  aliases - the DRAM alias holds the raw bytes that C=0 accesses and the host see, the
  private alias the plaintext the CPU sees through C=1 mappings. Each 4 KiB frame is owned by
  one alias; an access through the other one transcodes the frame with the VM's key (tweak =
  the frame's physical address) and moves ownership, and the vCPU flushes its TLB. So the
  host reads ciphertext of private frames, a guest that reads a private frame through a C=0
  mapping reads ciphertext, and a host write into a private frame makes the guest decrypt
  garbage.
* guest_memfd (`sw-protected`, `sev-snp`; later `tdx`): two *different* host pages per GFN.
  The shared backing is the VMM's own memory (the memslot's userspace_addr); the private
  backing is the guest_memfd, which the host cannot map. KVM's fault path picks the backing
  from the GFN's memory attribute: kvm_mmu_faultin_pfn_gmem() for a private GFN, the
  userspace page otherwise (arch/x86/kvm/mmu/mmu.c, __kvm_mmu_faultin_pfn; for sw-protected
  VMs kvm_mmu_page_fault() takes PFERR_PRIVATE_ACCESS from the attribute itself). The private
  backing holds what the guest sees (on SNP the hardware keeps it encrypted; nothing outside
  the guest can read it in any form, so the testbed keeps no ciphertext of it). A conversion
  does not carry contents across: the VMM discards the side the page leaves, as QEMU's
  kvm_convert_memory() does (accel/kvm/kvm-all.c: ram_block_discard_range() of the shared
  side on to-private, ram_block_discard_guest_memfd_range() - a guest_memfd punch-hole - on
  to-shared), so the guest finds zeros on the new side.

Two host-side views (this module never imports Unicorn; the kvm and vmm layers get views):

* `userspace_view()`: the memslot's userspace mapping, which is what KVM itself reads and
  writes - kvm_read_guest(), kvm_write_guest() and kvm_vcpu_map() all go through
  gfn_to_hva() and copy_{from,to}_user() / hva_to_pfn() (virt/kvm/kvm_main.c,
  __kvm_read_guest_page, __kvm_write_guest_page, __kvm_vcpu_map), never through guest_memfd,
  whatever the GFN's attribute. On a guest_memfd VM it is the shared backing for every GFN
  (for a private GFN: the VMM's discarded page, zeros - never the guest's data).
* `host_view()`: the VMM's and the user's view of guest memory. On a guest_memfd VM a
  private GFN is refused (`UnmappableMemoryError`), never shown as bytes. Elsewhere it equals
  the userspace view.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import struct
from collections.abc import Callable
from typing import Literal, Protocol

from testbed.errors import GuestMemoryError, MachineClosedError
from testbed.hw.cipher import FrameCipher
from testbed.hw.memimage import BackingImage, FrameArrayImage
from testbed.x86 import PAGE_SHIFT, PAGE_SIZE
from testbed.x86.addr import Gfn

OWNER_DRAM = 0
OWNER_PRIVATE = 1

#: What the host sees at a guest-physical address (`GuestMemory.host_view_kind`).
HostViewKind = Literal["plaintext", "ciphertext", "unmappable"]

UNMAPPABLE_MESSAGE = "private memory of a guest_memfd VM is not mappable by the host"

_U64 = struct.Struct("<Q")
#: Linux's MAP_NORESERVE (include/uapi/asm-generic/mman.h; the mmap module names it from 3.13).
MAP_NORESERVE: int = getattr(mmap, "MAP_NORESERVE", 0x4000)

#: guest_memfd: the bits of `GuestMemory.present` (one byte per GFN): the VMM's (shared) page
#: of the GFN has been touched; the guest_memfd (private) page has been allocated.
PRESENT_SHARED = 1
PRESENT_PRIVATE = 2
_KEEP_SHARED = bytes(b & PRESENT_SHARED for b in range(256))
_KEEP_PRIVATE = bytes((b & PRESENT_PRIVATE) >> 1 for b in range(256))
_CLEAR_SHARED = bytes(b & ~PRESENT_SHARED & 0xFF for b in range(256))
_CLEAR_PRIVATE = bytes(b & ~PRESENT_PRIVATE & 0xFF for b in range(256))
_SET_SHARED = bytes(b | PRESENT_SHARED for b in range(256))
_SET_PRIVATE = bytes(b | PRESENT_PRIVATE for b in range(256))


class UnmappableMemoryError(GuestMemoryError):
    """A host access to a private GFN of a guest_memfd VM: the page lives in guest_memfd,
    which the host cannot map, so there are no bytes to give."""


class HostMemory(Protocol):
    """What KVM and the VMM may do with guest memory: read and write it *as the host*."""

    @property
    def size(self) -> int: ...

    @property
    def capacity(self) -> int:
        """The bytes the memory may grow to (memory hotplug); its size when it cannot grow."""
        ...

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


class _Backing:
    """One lazily zero-filled anonymous private mapping, closeable."""

    def __init__(self, size: int, what: str) -> None:
        try:
            # MAP_NORESERVE: no commit charge for the whole size up front (mm/mmap.c do_mmap:
            # honoured unless vm.overcommit_memory = 2), so a sparse 64 GiB guest maps on a
            # smaller host; pages are charged as the guest touches them.
            self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise MemoryError(f"cannot reserve {size} bytes for the {what}: {exc.strerror}") from None
        holder = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(holder)
        del holder  # releases the export; the mapping does not move while it is open
        self.view = memoryview(self.map)
        self.size = size
        self.what = what
        #: the snapshot image mapped copy-on-write over this range since the last restore
        #: (hw/memimage.py), None while the mapping is the anonymous one
        self.image: BackingImage | None = None

    def discard(self, offset: int, length: int) -> None:
        """madvise(MADV_DONTNEED): the pages go back to the kernel and read as zeros (over a
        restored image, the pages the image holds are zeroed: DONTNEED would bring its bytes back)."""
        self.map.madvise(mmap.MADV_DONTNEED, offset, length)
        if self.image is not None:
            self.image.zero_discarded(self.view, offset, length)

    def save_image(self) -> BackingImage:
        """The backing's pages now, as a copy-on-write image (hw/memimage.py)."""
        return BackingImage(self.view, self.address, self.what.split(" ")[0])

    def restore_image(self, image: BackingImage) -> None:
        """Map `image` over this backing's range: it reads as the image from now on."""
        image.map_over(self.address)
        self.image = image

    def close(self) -> bool:
        """Release the mapping; False if a view of it is still alive elsewhere (then the
        garbage collector unmaps it when that view dies)."""
        try:
            self.view.release()
            self.map.close()
        except BufferError:  # an export of the view or a slice of it is still alive
            return False
        return True


def frame_array(nframes: int) -> mmap.mmap:
    """One zero byte per frame, indexable and sliceable like a bytearray, whose host pages
    appear only where a byte is written (an anonymous MAP_NORESERVE mapping)."""
    return mmap.mmap(-1, max(nframes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)


def release_mapping(mapping: mmap.mmap | None) -> None:
    """Unmap one of the sparse per-frame arrays (and close its fd, if it maps a file) when its
    owner is closed. A mapping still exported (a live memoryview of it) is left to the garbage
    collector: closing it would fail, and nothing may read it through the closed owner."""
    if mapping is None:
        return
    with contextlib.suppress(BufferError):
        mapping.close()


class StagePrivacy(Protocol):
    """The one question the hardware asks KVM about memory: is `gfn` mapped private in the
    stage-2 tables (the NPT/EPT KVM builds from its memory attributes, kvm_mem_is_private())?
    KVM owns the attributes (kvm/memattr.py); the hardware never holds a copy."""

    def is_private(self, gfn: Gfn) -> bool: ...


class _AllShared:
    def is_private(self, gfn: Gfn) -> bool:
        return False


_ALL_SHARED = _AllShared()


class GuestMemory:
    """The physical memory of one VM: plain, legacy encrypted (`cipher`) or guest_memfd."""

    def __init__(self, size: int, cipher: FrameCipher | None = None, *, guest_memfd: bool = False,
                 capacity: int | None = None) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise GuestMemoryError(f"guest memory size must be a positive multiple of 4 KiB, not {size}")
        if guest_memfd and cipher is not None:
            raise ValueError("a guest_memfd VM has no memory-controller cipher the host could observe")
        capacity = size if capacity is None else capacity
        if capacity < size or capacity % PAGE_SIZE:
            raise GuestMemoryError(f"guest memory capacity 0x{capacity:x} is below the size 0x{size:x} or not "
                                   "a multiple of 4 KiB")
        #: guest RAM now, in bytes: every bounds check (host and CPU) uses it; it grows with
        #: memory hotplug (plug(), vmm/hotplug.py) up to `capacity`
        self.size = size
        #: the bytes reserved for RAM (QEMU's maxmem): the backings, the per-frame arrays and
        #: the emulator's mapping cover it from the start (lazily: untouched pages cost nothing)
        self.capacity = capacity
        #: frames of the per-frame arrays (owner, present; the RMP and the MMU's frame sets):
        #: capacity >> 12, which is size >> 12 unless the VM can hotplug memory
        self.nframes = capacity >> PAGE_SHIFT
        self.cipher = cipher
        self.guest_memfd = guest_memfd
        self._backings: list[_Backing] = []
        self._shared = self._new_backing("guest memory" if not guest_memfd else "shared (VMM) memory")
        #: The DRAM alias (legacy) or the shared backing (guest_memfd): mapped at Unicorn 0.
        self.dram = self._shared.view
        self._priv: _Backing | None = None
        #: The private alias (legacy) or the guest_memfd backing: mapped at PRIVATE_ALIAS_BASE.
        self.private: memoryview | None = None
        if cipher is not None or guest_memfd:
            self._priv = self._new_backing("private (guest_memfd) memory" if guest_memfd else "private alias")
            self.private = self._priv.view
        #: legacy: OWNER_* per frame, all DRAM at power-on. A lazily zero-filled mapping, not a
        #: bytearray: a large guest pays for the frames whose owner changed, not for all of them.
        self.owner = frame_array(self.nframes)
        #: guest_memfd: KVM's answer to "is this GFN private?" (attach_attributes); KVM owns
        #: the attributes, the memory controller only asks
        self._stage2: StagePrivacy = _ALL_SHARED
        self.closed = False
        #: Called with the frame number after ownership moved (the vCPU flushes its TLB).
        self.on_ownership_change: Callable[[int], None] | None = None
        #: Called with (gpa, length) after the host changed memory under the guest (a write or
        #: a discard): the vCPU drops translated code.
        self.on_host_write: Callable[[int, int], None] | None = None
        #: Called with (gpa, length) before a host write; raises to refuse it (the SNP RMP).
        self.host_write_guard: Callable[[int, int], None] | None = None
        #: Called after the memory grew (plug): the vCPU's native fill copied the size.
        self.on_resize: Callable[[], None] | None = None
        #: guest_memfd: which backing pages of each GFN exist (PRESENT_* bits; shared with the
        #: C fill, which hands a fill to Python while the page it maps is not present yet).
        #: A private page is allocated on the first private fault (kvm_gmem_get_pfn ->
        #: kvm_gmem_get_folio, virt/kvm/guest_memfd.c) or by a populate, and freed by a punch
        #: hole; a shared page exists once touched and until discarded.
        self.present: mmap.mmap | None = frame_array(self.nframes) if guest_memfd else None
        #: guest_memfd: pages allocated in guest_memfd / touched in the VMM's backing now
        self.private_pages = 0
        self.shared_pages = 0
        #: Called with (private_delta, shared_delta) whenever those counts change (the pin
        #: accounting of vmm/pinning.py listens; the hardware knows nothing of it).
        self.on_backing_pages: Callable[[int, int], None] | None = None

    def _new_backing(self, what: str) -> _Backing:
        backing = _Backing(self.capacity, what)
        self._backings.append(backing)
        return backing

    def plug(self, size: int) -> None:
        """Memory hotplug: guest RAM grows to `size` bytes (<= capacity; it never shrinks);
        `on_resize` tells whatever copied the size (the vCPU's native fill)."""
        if size % PAGE_SIZE or not self.size <= size <= self.capacity:
            raise GuestMemoryError(f"cannot grow guest memory from 0x{self.size:x} to 0x{size:x}: the reserved "
                                   f"capacity is 0x{self.capacity:x} (page-aligned growth only)")
        self.size = size
        if self.on_resize is not None:
            self.on_resize()

    def unplug(self, size: int) -> None:
        """The topmost memslot deleted (KVM_MR_DELETE): guest RAM ends at `size` again, the GPAs
        above have no memslot (the backing keeps its bytes: the VMM's memory, as after KVM's
        deletion). The caller flushes the vCPUs' TLBs."""
        if size % PAGE_SIZE or not 0 < size <= self.size:
            raise GuestMemoryError(f"cannot shrink guest memory from 0x{self.size:x} to 0x{size:x}")
        self.size = size
        if self.on_resize is not None:
            self.on_resize()

    def close(self) -> None:
        """Release every backing and the per-frame arrays (idempotent). Close the vCPU that maps
        them first."""
        if self.closed:
            return
        self.closed = True
        for backing in self._backings:
            backing.close()
        self._backings.clear()
        release_mapping(self.owner)
        release_mapping(self.present)

    # -- addresses ------------------------------------------------------------------------
    @property
    def encrypted(self) -> bool:
        """Legacy SEV: the memory controller encrypts C=1 accesses and the host sees ciphertext."""
        return self.cipher is not None

    @property
    def model(self) -> str:
        """"plain", "legacy" (one frame per page, ciphertext to the host) or "guest_memfd"."""
        if self.guest_memfd:
            return "guest_memfd"
        return "legacy" if self.cipher is not None else "plain"

    def dram_address(self) -> int:
        """Host address of the DRAM alias / shared backing (for mem_map_ptr)."""
        self.check_range(0, 0, "mapping")  # never hand out the address of a released mapping
        return self._shared.address

    def private_address(self) -> int:
        """Host address of the private alias / guest_memfd backing (for mem_map_ptr)."""
        self.check_range(0, 0, "mapping")
        if self._priv is None:
            raise GuestMemoryError("this VM has no private memory (neither encrypted nor guest_memfd)")
        return self._priv.address

    def attach_attributes(self, stage2: StagePrivacy) -> None:
        """guest_memfd: follow KVM's memory attributes (the table the stage-2 mappings are
        built from) through `stage2.is_private(gfn)`. Until then every GFN is shared."""
        self._stage2 = stage2

    def check_range(self, gpa: int, length: int, what: str = "access") -> None:
        """Raise GuestMemoryError unless [gpa, gpa+length) lies inside guest memory (and
        MachineClosedError once close() released it)."""
        if self.closed:
            raise MachineClosedError(f"{what} of guest memory after close(): the machine released it")
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(f"{what} of {length} bytes outside guest memory (size 0x{self.size:x})", gpa)

    # -- ownership (legacy) ---------------------------------------------------------------
    def make_private(self, frame: int, decrypt: bool = True) -> bool:
        """Legacy: move `frame` to the private alias, decrypting DRAM into it (`decrypt=False`:
        a write of the whole frame follows, nothing to keep); True if ownership moved."""
        if self.cipher is None or self.owner[frame] == OWNER_PRIVATE:
            return False
        if decrypt:
            assert self.private is not None
            off = frame << PAGE_SHIFT
            self.private[off : off + PAGE_SIZE] = self.cipher.decrypt(off, self.dram[off : off + PAGE_SIZE])
        self.owner[frame] = OWNER_PRIVATE
        if self.on_ownership_change is not None:
            self.on_ownership_change(frame)
        return True

    def make_dram(self, frame: int) -> bool:
        """Legacy: move `frame` to the DRAM alias (encrypting the plaintext); True if ownership moved."""
        if self.cipher is None or self.owner[frame] == OWNER_DRAM:
            return False
        assert self.private is not None
        off = frame << PAGE_SHIFT
        self.dram[off : off + PAGE_SIZE] = self.cipher.encrypt(off, self.private[off : off + PAGE_SIZE])
        self.owner[frame] = OWNER_DRAM
        if self.on_ownership_change is not None:
            self.on_ownership_change(frame)
        return True

    # -- guest_memfd pages: allocation and release --------------------------------------
    def materialise(self, first_gfn: int, npages: int, private: bool) -> int:
        """guest_memfd: the pages of GFNs [first_gfn, first_gfn + npages) in the private
        (guest_memfd) or shared (VMM) backing come into existence, if they are not yet: a
        private fault's kvm_gmem_get_pfn(), a populate, or a touch of the VMM's page. Returns
        how many were new; a no-op outside guest_memfd VMs."""
        present = self.present
        end = min(first_gfn + npages, self.nframes)
        if present is None or first_gfn < 0 or first_gfn >= end:
            return 0
        bit = PRESENT_PRIVATE if private else PRESENT_SHARED
        if end - first_gfn == 1:
            old = present[first_gfn]
            if old & bit:
                return 0
            present[first_gfn] = old | bit
            new = 1
        else:
            seg = present[first_gfn:end]
            new = (end - first_gfn) - seg.translate(_KEEP_PRIVATE if private else _KEEP_SHARED).count(1)
            if not new:
                return 0
            present[first_gfn:end] = seg.translate(_SET_PRIVATE if private else _SET_SHARED)
        self._count(new if private else 0, 0 if private else new)
        return new

    def private_allocated(self, gfn: int) -> bool:
        """guest_memfd: whether GFN `gfn`'s private page exists (SEEK_DATA finds it); False
        without guest_memfd."""
        return self.present is not None and bool(self.present[gfn] & PRESENT_PRIVATE)

    def _release(self, first_gfn: int, end: int, private: bool) -> None:
        present = self.present
        if present is None or first_gfn >= end:
            return
        seg = present[first_gfn:end]
        gone = seg.translate(_KEEP_PRIVATE if private else _KEEP_SHARED).count(1)
        if gone:
            present[first_gfn:end] = seg.translate(_CLEAR_PRIVATE if private else _CLEAR_SHARED)
            self._count(-gone if private else 0, 0 if private else -gone)

    def _count(self, private_delta: int, shared_delta: int) -> None:
        self.private_pages += private_delta
        self.shared_pages += shared_delta
        if self.on_backing_pages is not None:
            self.on_backing_pages(private_delta, shared_delta)

    def _recount(self) -> None:
        """After a restore: the counts from the present bytes (the listener gets the change)."""
        if self.present is None:
            return
        data = self.present[:]
        private = data.translate(_KEEP_PRIVATE).count(1)
        shared = data.translate(_KEEP_SHARED).count(1)
        self._count(private - self.private_pages, shared - self.shared_pages)

    # -- the CPU's view ------------------------------------------------------------------
    def _gmem_buf(self, frame: int) -> memoryview:
        """guest_memfd: the backing stage 2 maps `frame` to (the attribute decides)."""
        if self._stage2.is_private(Gfn(frame)):
            assert self.private is not None
            return self.private
        return self.dram

    def cpu_read(self, gpa: int, length: int, private: bool) -> bytes:
        """Bytes the CPU reads at `gpa` with C=`private`, without moving ownership.

        Used for page-table walks and instruction decoding. On a guest_memfd VM the GFN's
        attribute picks the backing (a C-bit mismatch is an NPF the TLB fill reports)."""
        self.check_range(gpa, length, "CPU read")
        out = bytearray()
        while length:
            frame = gpa >> PAGE_SHIFT
            off = gpa & (PAGE_SIZE - 1)
            n = min(length, PAGE_SIZE - off)
            out += self._frame_view(frame, private)[off : off + n]
            gpa += n
            length -= n
        return bytes(out)

    def cpu_read_u64(self, gpa: int, private: bool) -> int:
        """One little-endian u64 as the CPU reads it (page-table walks)."""
        if gpa + 8 > self.size or gpa < 0:
            raise GuestMemoryError("page-table read outside guest memory", gpa)
        if self.guest_memfd:
            if (gpa & (PAGE_SIZE - 1)) <= PAGE_SIZE - 8:
                return int(_U64.unpack_from(self._gmem_buf(gpa >> PAGE_SHIFT), gpa)[0])
        elif self.cipher is None or (self.owner[gpa >> PAGE_SHIFT] == OWNER_PRIVATE) == private:
            buf = self.private if (private and self.cipher is not None) else self.dram
            assert buf is not None
            return int(_U64.unpack_from(buf, gpa)[0])
        return int(_U64.unpack(self.cpu_read(gpa, 8, private))[0])

    def gmem_read_u64(self, gpa: int) -> int:
        """guest_memfd: a page-table entry read through stage 2 (the walk's hot path)."""
        if gpa + 8 > self.size or gpa < 0:
            raise GuestMemoryError("page-table read outside guest memory", gpa)
        buf = self.private if self._stage2.is_private(Gfn(gpa >> PAGE_SHIFT)) else self.dram
        assert buf is not None
        return int(_U64.unpack_from(buf, gpa)[0])

    def cpu_write(self, gpa: int, data: bytes, private: bool) -> None:
        """Write as the CPU does through a mapping with C=`private` (legacy: moves ownership)."""
        self.check_range(gpa, len(data), "CPU write")
        pos = 0
        while pos < len(data):
            frame = (gpa + pos) >> PAGE_SHIFT
            off = (gpa + pos) & (PAGE_SIZE - 1)
            n = min(len(data) - pos, PAGE_SIZE - off)
            buf: memoryview | None
            if self.guest_memfd:
                buf = self._gmem_buf(frame)
                self.materialise(frame, 1, buf is not self.dram)
            elif private:
                self.make_private(frame, decrypt=n < PAGE_SIZE)  # a whole frame overwritten: nothing to decrypt
                buf = self.private if self.cipher is not None else self.dram
            else:
                self.make_dram(frame)
                buf = self.dram
            assert buf is not None
            base = frame << PAGE_SHIFT
            buf[base + off : base + off + n] = data[pos : pos + n]
            pos += n

    def _frame_view(self, frame: int, private: bool) -> bytes | memoryview:
        off = frame << PAGE_SHIFT
        if self.guest_memfd:
            return self._gmem_buf(frame)[off : off + PAGE_SIZE]
        if self.cipher is None:
            return self.dram[off : off + PAGE_SIZE]
        assert self.private is not None
        owned_private = self.owner[frame] == OWNER_PRIVATE
        if private:
            if owned_private:
                return self.private[off : off + PAGE_SIZE]
            return self.cipher.decrypt(off, self.dram[off : off + PAGE_SIZE])
        if owned_private:
            return self.cipher.encrypt(off, self.private[off : off + PAGE_SIZE])
        return self.dram[off : off + PAGE_SIZE]

    # -- the host's views -------------------------------------------------------------------
    def host_view_kind(self, gpa: int) -> HostViewKind:
        """What the host sees of the page at `gpa`: its plaintext, its ciphertext (legacy SEV,
        a private frame) or nothing ("unmappable": a private GFN of a guest_memfd VM)."""
        self.check_range(gpa, 1, "host view")
        frame = gpa >> PAGE_SHIFT
        if self.guest_memfd:
            return "unmappable" if self._stage2.is_private(Gfn(frame)) else "plaintext"
        if self.cipher is not None and self.owner[frame] == OWNER_PRIVATE:
            return "ciphertext"
        return "plaintext"

    def _refuse_private(self, gpa: int, length: int) -> None:
        """guest_memfd: a host access touching a private GFN is refused, whole."""
        if not self.guest_memfd:
            return
        for frame in range(gpa >> PAGE_SHIFT, ((gpa + max(length, 1) - 1) >> PAGE_SHIFT) + 1):
            if self._stage2.is_private(Gfn(frame)):
                raise UnmappableMemoryError(UNMAPPABLE_MESSAGE, max(gpa, frame << PAGE_SHIFT))

    def host_read(self, gpa: int, length: int) -> bytes:
        """The host's view: ciphertext where a legacy frame is private; on a guest_memfd VM
        a private GFN is refused (UnmappableMemoryError)."""
        self.check_range(gpa, length, "host read")
        self._refuse_private(gpa, length)
        return self.userspace_read(gpa, length)

    def host_write(self, gpa: int, data: bytes) -> None:
        """A host write. Legacy: lands in DRAM, a private frame first moved there (so the
        guest's next C=1 read decrypts the host's bytes into garbage). guest_memfd: refused
        on a private GFN, nothing written."""
        self.check_range(gpa, len(data), "host write")
        self._refuse_private(gpa, len(data))
        self.userspace_write(gpa, data)

    def userspace_read(self, gpa: int, length: int) -> bytes:
        """What KVM reads through the memslot's userspace mapping (kvm_read_guest): on a
        guest_memfd VM the shared backing, whatever the GFN's attribute."""
        self.check_range(gpa, length, "host read")
        if self.guest_memfd:
            return bytes(self.dram[gpa : gpa + length])
        return self.cpu_read(gpa, length, private=False)

    def userspace_write(self, gpa: int, data: bytes) -> None:
        """What KVM writes through the memslot's userspace mapping (kvm_write_guest); on a
        guest_memfd VM the shared backing (never an RMP-assigned page)."""
        self.check_range(gpa, len(data), "host write")
        if self.guest_memfd:
            self.dram[gpa : gpa + len(data)] = data
            if data:
                first = gpa >> PAGE_SHIFT
                self.materialise(first, ((gpa + len(data) - 1) >> PAGE_SHIFT) - first + 1, False)
        else:
            if self.host_write_guard is not None:
                self.host_write_guard(gpa, len(data))
            self.cpu_write(gpa, data, private=False)
        if self.on_host_write is not None:
            self.on_host_write(gpa, len(data))

    def host_view(self) -> HostView:
        """The VMM's and the user's view (refuses private GFNs of a guest_memfd VM)."""
        return HostView(self, userspace=False)

    def userspace_view(self) -> HostView:
        """The memslot's userspace mapping: the view KVM's guest accessors use."""
        return HostView(self, userspace=True)

    # -- conversions (guest_memfd) ------------------------------------------------------------
    def _discard(self, backing: _Backing | None, first_gfn: int, npages: int) -> None:
        end = min(first_gfn + npages, self.nframes)
        if not self.guest_memfd or backing is None or first_gfn >= end or first_gfn < 0:
            return
        backing.discard(first_gfn << PAGE_SHIFT, (end - first_gfn) << PAGE_SHIFT)
        self._release(first_gfn, end, backing is self._priv)
        if self.on_host_write is not None:
            self.on_host_write(first_gfn << PAGE_SHIFT, (end - first_gfn) << PAGE_SHIFT)

    def discard_shared(self, first_gfn: int, npages: int) -> None:
        """QEMU's ram_block_discard_range() on a to-private conversion: the VMM's pages of
        these GFNs are freed and read as zeros. A no-op outside guest_memfd VMs."""
        self._discard(self._shared, first_gfn, npages)

    def discard_private(self, first_gfn: int, npages: int) -> None:
        """QEMU's ram_block_discard_guest_memfd_range() on a to-shared conversion
        (fallocate(PUNCH_HOLE) on the guest_memfd): the private pages are freed; a later
        private fault gets a fresh zeroed page. A no-op outside guest_memfd VMs."""
        self._discard(self._priv, first_gfn, npages)

    # -- launch -----------------------------------------------------------------------------
    def launch_encrypt(self, gpa: int, length: int) -> None:
        """SEV LAUNCH_UPDATE_DATA: encrypt [gpa, gpa + length) in place, exactly (the firmware takes
        a 16-byte aligned address and length: GuestMemoryError otherwise); its frames become
        private. The rest of a frame the range covers in part keeps its DRAM bytes, which the
        guest's C=1 view decrypts (garbage) and the host still reads as they were."""
        self.check_range(gpa, length, "launch update")
        if gpa % 16 or length % 16:
            raise GuestMemoryError(f"LAUNCH_UPDATE_DATA of 0x{length:x} bytes: the SEV firmware needs a 16-byte "
                                   "aligned address and length", gpa)
        first = gpa >> PAGE_SHIFT
        last = (gpa + length - 1) >> PAGE_SHIFT
        if self.cipher is None or self.private is None:
            return
        end = gpa + length
        for frame in range(first, last + 1):
            off = frame << PAGE_SHIFT
            if self.owner[frame] != OWNER_DRAM:
                continue
            lo, hi = max(gpa, off) - off, min(end, off + PAGE_SIZE) - off
            if lo == 0 and hi == PAGE_SIZE:
                # The image was written as plaintext into DRAM: it *is* the plaintext.
                plain = bytearray(self.dram[off : off + PAGE_SIZE])
            else:
                # Only [lo, hi) is encrypted; the other bytes stay in DRAM as they were, and a C=1
                # read decrypts them (XTS blocks are independent: re-encrypting gives them back).
                plain = bytearray(self.cipher.decrypt(off, self.dram[off : off + PAGE_SIZE]))
                plain[lo:hi] = self.dram[off + lo : off + hi]
            self.private[off : off + PAGE_SIZE] = plain
            self.dram[off : off + PAGE_SIZE] = self.cipher.encrypt(off, bytes(plain))
            self.owner[frame] = OWNER_PRIVATE

    def populate_private(self, gpa: int, length: int) -> None:
        """guest_memfd population from the VMM's copy (KVM_SEV_SNP_LAUNCH_UPDATE: kvm_gmem_populate()
        -> sev_gmem_post_populate() copies each source page into the guest_memfd page, which
        the firmware then encrypts in place). The VMM's source pages stay as they are."""
        self.check_range(gpa, length, "launch update")
        if not self.guest_memfd or self.private is None or length <= 0:
            return
        first = gpa & ~(PAGE_SIZE - 1)
        end = (gpa + length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        self.private[first:end] = self.dram[first:end]
        self.materialise(first >> PAGE_SHIFT, (end - first) >> PAGE_SHIFT, True)

    # -- snapshots (testbed/snapshot.py) -----------------------------------------------------
    def save_image(self) -> MemoryImage:
        """Every backing's pages and the frames' ownership now (a machine snapshot's RAM)."""
        self.check_range(0, 0, "snapshot")
        images = []
        try:
            for backing in self._backings:
                images.append(backing.save_image())
        except BaseException:
            for image in images:
                image.close()
            raise
        owner = self.owner
        return MemoryImage(tuple(images), FrameArrayImage(owner) if isinstance(owner, mmap.mmap) else bytes(owner),
                           FrameArrayImage(self.present) if self.present is not None else None, self.size)

    def restore_image(self, image: MemoryImage) -> None:
        """Put memory back as `image` saw it: each backing maps its image copy-on-write at its
        own address (the emulator's mappings stay valid), ownership bytes are copied back.
        The caller flushes the vCPU's TLB and translated code."""
        self.check_range(0, 0, "restore")
        if len(image.backings) != len(self._backings) or image.backings[0].size != self.capacity:
            raise GuestMemoryError("memory image of a different memory model or size")
        for backing, saved in zip(self._backings, image.backings, strict=True):
            backing.restore_image(saved)
        if isinstance(image.owner, FrameArrayImage):
            image.owner.restore_into(self.owner)  # sparse: a large guest's array stays unfaulted
        else:
            self.owner[:] = image.owner
        if self.present is not None and image.present is not None:
            image.present.restore_into(self.present)
            self._recount()


class MemoryImage:
    """A GuestMemory's RAM at one moment: one copy-on-write image per backing and the legacy
    frames' ownership. close() frees the images' memfds."""

    def __init__(self, backings: tuple[BackingImage, ...], owner: FrameArrayImage | bytes,
                 present: FrameArrayImage | None = None, size: int = 0) -> None:
        self.backings = backings
        self.owner = owner
        #: the guest memory's size then (memory hotplug grows it: such an image is not restored)
        self.size = size
        #: guest_memfd: GuestMemory.present (which backing pages exist) at that moment
        self.present = present

    @property
    def pages(self) -> int:
        """4 KiB pages holding data across the backings (the rest are zeros)."""
        return sum(b.pages for b in self.backings)

    def close(self) -> None:
        """Free the memfds (idempotent)."""
        for backing in self.backings:
            backing.close()


class HostView:
    """`HostMemory` over a GuestMemory: the host's reads and writes, bounds-checked.

    `userspace=True` is KVM's view (the memslot's userspace mapping); False is the VMM's and
    the user's, which refuses private GFNs of guest_memfd VMs."""

    def __init__(self, memory: GuestMemory, userspace: bool = False) -> None:
        self._memory = memory
        self._userspace = userspace

    @property
    def size(self) -> int:
        """Guest memory size in bytes."""
        return self._memory.size

    @property
    def capacity(self) -> int:
        """The bytes reserved for guest RAM (GuestMemory.capacity): what memory can grow to."""
        return self._memory.capacity

    def read(self, gpa: int, length: int) -> bytes:
        """Read as the host: ciphertext of legacy private frames; never guest_memfd memory."""
        if self._userspace:
            return self._memory.userspace_read(gpa, length)
        return self._memory.host_read(gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        """Write as the host (DRAM / the shared backing)."""
        if self._userspace:
            self._memory.userspace_write(gpa, data)
        else:
            self._memory.host_write(gpa, data)

    def read_u64(self, gpa: int) -> int:
        """One little-endian u64 as the host reads it."""
        return int(_U64.unpack(self.read(gpa, 8))[0])

    def kind(self, gpa: int) -> HostViewKind:
        """`GuestMemory.host_view_kind`: "plaintext", "ciphertext" or "unmappable"."""
        return self._memory.host_view_kind(gpa)


class BytesMemory:
    """`HostMemory` over a plain bytearray: lets the kvm layer be unit-tested without a CPU."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    @property
    def size(self) -> int:
        """Memory size in bytes."""
        return len(self.data)

    @property
    def capacity(self) -> int:
        """It cannot grow: its size."""
        return len(self.data)

    def read(self, gpa: int, length: int) -> bytes:
        """Read bytes, bounds-checked."""
        if gpa < 0 or gpa + length > len(self.data):
            raise GuestMemoryError("read outside memory", gpa)
        return bytes(self.data[gpa : gpa + length])

    def write(self, gpa: int, data: bytes) -> None:
        """Write bytes, bounds-checked."""
        if gpa < 0 or gpa + len(data) > len(self.data):
            raise GuestMemoryError("write outside memory", gpa)
        self.data[gpa : gpa + len(data)] = data
