"""Copy-on-write images of guest memory: what a machine snapshot keeps of its RAM.

A backing's image is a memfd holding the pages the backing had in memory when it was taken
(mincore: a lazily mapped guest leaves the pages it never touched as holes, which read as
zeros). Restoring maps the memfd MAP_PRIVATE|MAP_FIXED over the backing's own address range:
one mmap call, after which every page reads the image's bytes and a write copies just that
page (the kernel's copy-on-write), so the cost of a restore is the pages the last run touched
(unmapped by the kernel) and nothing is copied up front. The address does not move, so the
emulator's mem_map_ptr mappings and every memoryview over the backing stay valid.

Measured against the alternatives (README, "Snapshots"): copying the whole image back costs
the booted guest's resident size on every restore, and comparing page hashes reads it all;
tracking dirty frames through the TLB (write-protect until the first write) costs a Python
TLB fill per written frame per run. The remap costs neither.

A discard (MADV_DONTNEED) of a file-backed private page would bring the *image's* bytes back,
not zeros; `discard` zeroes the pages the image holds data for, so a discarded page reads as
zeros whichever mapping is underneath.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from testbed.x86 import PAGE_SHIFT, PAGE_SIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)

_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_FAILED = ctypes.c_void_p(-1).value
_ZERO_PAGE = bytes(PAGE_SIZE)
_BIT0 = bytes(i & 1 for i in range(256))  # mincore: only bit 0 of each byte is defined


class MemoryImageError(OSError):
    """The kernel refused a memfd, mincore or mmap the image needs."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise MemoryImageError(err, f"{what}: {os.strerror(err)}")


def resident_pages(address: int, size: int) -> bytearray:
    """mincore(): one byte per 4 KiB page of [address, address + size), bit 0 set where the
    page is in memory (a page never touched is not)."""
    vec = bytearray((size + PAGE_SIZE - 1) >> PAGE_SHIFT)
    buf = (ctypes.c_ubyte * len(vec)).from_buffer(vec)
    _check(_libc.mincore(address, size, buf), "mincore")
    del buf
    return vec


class BackingImage:
    """The pages of one backing at one moment, in a memfd; `has_data[page]` is 1 where the
    image holds bytes (elsewhere it is a hole: zeros). Close it to free the memfd."""

    def __init__(self, view: memoryview, address: int, what: str) -> None:
        size = len(view)
        self.size = size
        self.fd = os.memfd_create(f"testbed-snapshot-{what}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            resident = resident_pages(address, size).translate(_BIT0)  # 1 = in memory
            self.has_data = bytearray(len(resident))
            npages = len(resident)
            page = resident.find(1)
            while page >= 0:  # runs of resident pages, found at C speed (a 64 GiB guest has 16 M pages)
                end = resident.find(0, page)
                end = npages if end < 0 else end
                for p in range(page, end):
                    off = p << PAGE_SHIFT
                    chunk = bytes(view[off : off + PAGE_SIZE])  # bytes: memcmp, 20x a memoryview's compare
                    if chunk != _ZERO_PAGE:  # a page read but never written stays a hole
                        os.pwrite(self.fd, chunk, off)
                        self.has_data[p] = 1
                page = resident.find(1, end)
        except BaseException:
            os.close(self.fd)
            raise
        self.pages = self.has_data.count(1)

    def map_over(self, address: int) -> None:
        """Map the image MAP_PRIVATE at `address` (the backing's own range), replacing what is
        there: the backing reads as the image, and writes copy pages privately."""
        if self.fd < 0:
            raise MemoryImageError(0, "memory image already closed")
        flags = mmap.MAP_PRIVATE | _MAP_FIXED | _MAP_NORESERVE
        got = _libc.mmap(address, self.size, mmap.PROT_READ | mmap.PROT_WRITE, flags, self.fd, 0)
        if got == _MAP_FAILED or got != address:
            err = ctypes.get_errno()
            raise MemoryImageError(err, f"mmap of the memory image: {os.strerror(err)}")

    def zero_discarded(self, view: memoryview, offset: int, length: int) -> None:
        """After MADV_DONTNEED of [offset, offset + length) over this image's mapping, the
        pages the image holds data for read as that data again: zero them (QEMU's discard
        leaves zeros)."""
        first = offset >> PAGE_SHIFT
        end = min((offset + length) >> PAGE_SHIFT, len(self.has_data))
        page = self.has_data.find(1, first, end)
        while page >= 0:
            off = page << PAGE_SHIFT
            view[off : off + PAGE_SIZE] = _ZERO_PAGE
            page = self.has_data.find(1, page + 1, end)

    def close(self) -> None:
        """Free the memfd (idempotent). Mappings made from it keep their pages."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FrameArrayImage:
    """The contents of a sparse per-frame byte array (hw/memory.py `frame_array`: an anonymous
    mapping whose pages appear where a byte is written) at one moment: its non-zero pages.
    Restoring drops every page (MADV_DONTNEED: zeros, at the same address, so a C extension's
    pointer into it stays valid) and writes the saved ones back."""

    def __init__(self, array: mmap.mmap) -> None:
        self.size = len(array)
        holder = ctypes.c_char.from_buffer(array)
        address = ctypes.addressof(holder)
        del holder  # release the export
        resident = resident_pages(address, self.size).translate(_BIT0)
        pages: list[tuple[int, bytes]] = []
        zeros: list[int] = []
        page = resident.find(1)
        while page >= 0:
            off = page << PAGE_SHIFT
            chunk = array[off : off + PAGE_SIZE]
            if chunk.count(0) != len(chunk):
                pages.append((off, chunk))
            else:
                zeros.append(off)
            page = resident.find(1, page + 1)
        self.pages = tuple(pages)
        #: resident pages of zeros: after MADV_DONTNEED a file-backed private mapping (the
        #: all-private memory attributes, kvm/memattr.py) reads its file again, not zeros
        self.zero_pages = tuple(zeros)

    def restore_into(self, array: mmap.mmap) -> None:
        """Make `array` (the same size) hold the saved bytes again, in place."""
        if len(array) != self.size:
            raise ValueError(f"frame array of {len(array)} bytes, the image holds {self.size}")
        tail = self.size - self.size % PAGE_SIZE
        if tail:
            array.madvise(mmap.MADV_DONTNEED, 0, tail)
        if tail < self.size:
            array[tail:] = bytes(self.size - tail)
        for off in self.zero_pages:
            chunk = array[off : off + PAGE_SIZE]  # reads the zero page on an anonymous mapping
            if chunk.count(0) != len(chunk):
                array[off : off + len(chunk)] = bytes(len(chunk))
        for off, chunk in self.pages:
            array[off : off + len(chunk)] = chunk
