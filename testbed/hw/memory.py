"""Guest physical memory: host buffers, the two physical aliases, and frame ownership.

Guest RAM lives in ctypes buffers that the vCPU maps into Unicorn with mem_map_ptr, so the host
side reads and writes them without copies. With memory encryption there are two aliases:

* the DRAM alias holds the raw bytes that C=0 accesses and the host see;
* the private alias holds the plaintext the CPU sees through C=1 mappings.

Each 4 KiB frame is owned by exactly one alias. An access through the other alias transcodes
the frame with the VM's key (tweak = the frame's physical address) and moves ownership; the
vCPU then flushes its TLB so no stale translation to the old alias survives (DESIGN.md,
"Memory, encryption, MMU"). So the host reads ciphertext of private frames, a guest that
reads a private frame through a C=0 mapping reads ciphertext, and a host write into a private
frame makes the guest decrypt garbage.

This module never imports Unicorn: `HostMemory` is the narrow view the kvm and vmm layers get.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Protocol

from testbed.errors import GuestMemoryError
from testbed.hw.cipher import FrameCipher
from testbed.x86 import PAGE_SHIFT, PAGE_SIZE

OWNER_DRAM = 0
OWNER_PRIVATE = 1

_U64 = struct.Struct("<Q")


class HostMemory(Protocol):
    """What KVM and the VMM may do with guest memory: read and write it *as the host*."""

    @property
    def size(self) -> int: ...

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


class GuestMemory:
    """The physical memory of one VM, with optional memory encryption."""

    def __init__(self, size: int, cipher: FrameCipher | None = None) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise GuestMemoryError(f"guest memory size must be a positive multiple of 4 KiB, not {size}")
        self.size = size
        self.nframes = size >> PAGE_SHIFT
        self.cipher = cipher
        self._dram_buf = ctypes.create_string_buffer(size)
        self.dram = memoryview(self._dram_buf).cast("B")
        self._priv_buf: ctypes.Array[ctypes.c_char] | None = None
        self.private: memoryview | None = None
        self.owner = bytearray(self.nframes)  # OWNER_* per frame; all DRAM at power-on
        if cipher is not None:
            self._priv_buf = ctypes.create_string_buffer(size)
            self.private = memoryview(self._priv_buf).cast("B")
        #: Called with the frame number after ownership moved (the vCPU flushes its TLB).
        self.on_ownership_change: Callable[[int], None] | None = None
        #: Called with (gpa, length) after a host write (the vCPU drops translated code).
        self.on_host_write: Callable[[int, int], None] | None = None
        #: Called with (gpa, length) before a host write; raises to refuse it (the SNP RMP).
        self.host_write_guard: Callable[[int, int], None] | None = None

    # -- addresses ------------------------------------------------------------------------
    @property
    def encrypted(self) -> bool:
        """Whether this VM's memory controller encrypts C=1 accesses."""
        return self.cipher is not None

    def dram_address(self) -> int:
        """Host address of the DRAM alias buffer (for mem_map_ptr)."""
        return ctypes.addressof(self._dram_buf)

    def private_address(self) -> int:
        """Host address of the private alias buffer (for mem_map_ptr)."""
        if self._priv_buf is None:
            raise GuestMemoryError("this VM has no private alias (memory is not encrypted)")
        return ctypes.addressof(self._priv_buf)

    def check_range(self, gpa: int, length: int, what: str = "access") -> None:
        """Raise GuestMemoryError unless [gpa, gpa+length) lies inside guest memory."""
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(f"{what} of {length} bytes outside guest memory (size 0x{self.size:x})", gpa)

    # -- ownership ------------------------------------------------------------------------
    def make_private(self, frame: int) -> bool:
        """Move `frame` to the private alias (decrypting DRAM); True if ownership moved."""
        if self.cipher is None or self.owner[frame] == OWNER_PRIVATE:
            return False
        assert self.private is not None
        off = frame << PAGE_SHIFT
        self.private[off : off + PAGE_SIZE] = self.cipher.decrypt(off, self.dram[off : off + PAGE_SIZE])
        self.owner[frame] = OWNER_PRIVATE
        if self.on_ownership_change is not None:
            self.on_ownership_change(frame)
        return True

    def make_dram(self, frame: int) -> bool:
        """Move `frame` to the DRAM alias (encrypting the plaintext); True if ownership moved."""
        if self.cipher is None or self.owner[frame] == OWNER_DRAM:
            return False
        assert self.private is not None
        off = frame << PAGE_SHIFT
        self.dram[off : off + PAGE_SIZE] = self.cipher.encrypt(off, self.private[off : off + PAGE_SIZE])
        self.owner[frame] = OWNER_DRAM
        if self.on_ownership_change is not None:
            self.on_ownership_change(frame)
        return True

    # -- the CPU's view ------------------------------------------------------------------
    def cpu_read(self, gpa: int, length: int, private: bool) -> bytes:
        """Bytes the CPU reads at `gpa` with C=`private`, without moving ownership.

        Used for page-table walks (always private on SEV) and instruction decoding.
        """
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
        if self.cipher is None or (self.owner[gpa >> PAGE_SHIFT] == OWNER_PRIVATE) == private:
            buf = self.private if (private and self.cipher is not None) else self.dram
            assert buf is not None
            if gpa + 8 > self.size or gpa < 0:
                raise GuestMemoryError("page-table read outside guest memory", gpa)
            return int(_U64.unpack_from(buf, gpa)[0])
        return int(_U64.unpack(self.cpu_read(gpa, 8, private))[0])

    def cpu_write(self, gpa: int, data: bytes, private: bool) -> None:
        """Write as the CPU does through a mapping with C=`private` (moves ownership)."""
        self.check_range(gpa, len(data), "CPU write")
        pos = 0
        while pos < len(data):
            frame = (gpa + pos) >> PAGE_SHIFT
            off = (gpa + pos) & (PAGE_SIZE - 1)
            n = min(len(data) - pos, PAGE_SIZE - off)
            if private:
                self.make_private(frame)
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

    # -- the host's view -------------------------------------------------------------------
    def host_read(self, gpa: int, length: int) -> bytes:
        """What the host (KVM, the VMM) reads: ciphertext wherever a frame is private."""
        return self.cpu_read(gpa, length, private=False)

    def host_write(self, gpa: int, data: bytes) -> None:
        """A host write lands in DRAM; a private frame is first moved there (so the guest's
        next C=1 read decrypts the host's bytes into garbage)."""
        self.check_range(gpa, len(data), "host write")
        if self.host_write_guard is not None:
            self.host_write_guard(gpa, len(data))
        self.cpu_write(gpa, data, private=False)
        if self.on_host_write is not None:
            self.on_host_write(gpa, len(data))

    def host_view(self) -> HostView:
        """The narrow view handed to the kvm and vmm layers."""
        return HostView(self)

    # -- launch -----------------------------------------------------------------------------
    def launch_encrypt(self, gpa: int, length: int) -> None:
        """SEV LAUNCH_UPDATE_DATA: encrypt the loaded image in place (frames become private)."""
        self.check_range(gpa, length, "launch update")
        first = gpa >> PAGE_SHIFT
        last = (gpa + length - 1) >> PAGE_SHIFT
        if self.cipher is None or self.private is None:
            return
        for frame in range(first, last + 1):
            off = frame << PAGE_SHIFT
            if self.owner[frame] == OWNER_DRAM:
                # The image was written as plaintext into DRAM: it *is* the plaintext.
                self.private[off : off + PAGE_SIZE] = self.dram[off : off + PAGE_SIZE]
                self.dram[off : off + PAGE_SIZE] = self.cipher.encrypt(off, self.private[off : off + PAGE_SIZE])
                self.owner[frame] = OWNER_PRIVATE


class HostView:
    """`HostMemory` over a GuestMemory: the host's reads and writes, bounds-checked."""

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory

    @property
    def size(self) -> int:
        """Guest memory size in bytes."""
        return self._memory.size

    def read(self, gpa: int, length: int) -> bytes:
        """Read as the host: ciphertext of private frames."""
        return self._memory.host_read(gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        """Write as the host (into DRAM)."""
        self._memory.host_write(gpa, data)

    def read_u64(self, gpa: int) -> int:
        """One little-endian u64 as the host reads it."""
        return int(_U64.unpack(self._memory.host_read(gpa, 8))[0])


class BytesMemory:
    """`HostMemory` over a plain bytearray: lets the kvm layer be unit-tested without a CPU."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    @property
    def size(self) -> int:
        """Memory size in bytes."""
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
