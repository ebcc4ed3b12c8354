"""The page walk and TLB fill in C (testbed/hw/_nativemmu.c) against their reference model, the
Python walker (testbed/x86/paging.py) and fill (testbed/hw/mmu.py `_tlb_fill`)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.hw.cipher import FrameCipher
from testbed.hw.memory import OWNER_PRIVATE, GuestMemory
from testbed.kvm.memattr import MemoryAttributes
from testbed.machine import Machine, VmOptions, build_program
from testbed.x86.paging import PageFault, PagingMode, Translation, walk

native = pytest.importorskip("testbed.hw._nativemmu", reason="the optional C extension is not built")

PAGE = 4096
U64 = (1 << 64) - 1


def reference(result: Translation | PageFault) -> tuple[Any, ...]:
    """The Python walker's answer in the C walker's tuple form."""
    if isinstance(result, Translation):
        return (0, result.gpa, result.writable, result.user, result.executable, result.encrypted)
    return (1, result.error_code, result.table_gpa)


@st.composite
def walks(draw: st.DrawFn) -> dict[str, Any]:
    """Random page tables along a random VA's path (entries inside and outside memory, PS at
    every level, reserved and ignored bits, the encryption bit), and a random access."""
    phys_bits = draw(st.integers(36, 52))
    enc_bit = draw(st.sampled_from([0, 0, 47, 51, phys_bits - 1]) | st.integers(12, 62))
    mode = PagingMode(phys_bits=phys_bits, enc_mask=(1 << enc_bit) if enc_bit else 0,
                      enc_means_private=draw(st.booleans()))
    npages = draw(st.integers(1, 6))
    writes: list[tuple[int, int]] = []
    va = draw(st.integers(0, U64))
    junk_masks = st.sampled_from([0, 0, 0, 0x1FF000, 0x3FFFE000, mode.reserved_mask, 0x7FF0000000000000,
                                  mode.enc_mask, 1 << 63, U64])

    def junk() -> int:
        return draw(st.integers(0, U64)) & draw(junk_masks)

    cr3 = (draw(st.integers(0, npages + 1)) << 12) | junk() & ~(mode.address_mask & ~0xFFF)
    table = cr3 & mode.address_mask
    for level in (4, 3, 2, 1):
        gpa = table + ((va >> (12 + 9 * (level - 1))) & 0x1FF) * 8
        if gpa + 8 > npages * PAGE:
            break
        flags = draw(st.integers(0, 0x1FF)) | (1 if draw(st.integers(0, 9)) else 0)  # mostly present
        entry = ((draw(st.integers(0, npages + 1)) << 12) | flags | junk() | junk()) & U64
        writes.append((gpa, entry))
        table = entry & mode.address_mask
    return {"npages": npages, "writes": writes, "cr3": cr3, "va": va, "mode": mode, "access": draw(st.integers(0, 2)),
            "user": draw(st.booleans()), "wp": draw(st.booleans()), "nxe": draw(st.booleans())}


@settings(max_examples=250, deadline=None)
@given(walks())
def test_native_walk_equals_the_python_walker(case: dict[str, Any]) -> None:
    """The C walk returns the Python walk's translation or #PF error code (present, write, user,
    reserved, fetch bits; nested fault on a table outside memory) on random 4-level tables with
    1 GiB / 2 MiB leaves, reserved bits above MAXPHYADDR, NX with and without EFER.NXE, U/S,
    R/W with CR0.WP, and the C-bit (set = private) or shared bit (set = shared) stripped."""
    mode = case["mode"]
    mem = bytearray(case["npages"] * PAGE)
    for gpa, entry in case["writes"]:
        struct.pack_into("<Q", mem, gpa, entry)

    def read_u64(pa: int) -> int:
        return int(struct.unpack_from("<Q", mem, pa)[0])

    expected = reference(walk(read_u64, case["cr3"], case["va"], case["access"], case["user"], mode,
                              wp=case["wp"], nxe=case["nxe"], mem_size=len(mem)))
    got = native.walk(mem, case["cr3"], case["va"], case["access"], case["user"], mode.phys_bits, mode.enc_mask,
                      mode.enc_means_private, case["wp"], case["nxe"])
    assert got == expected


def _detached(memory: GuestMemory, mode: PagingMode, attrs: MemoryAttributes | None) -> Any:
    """A NativeMmu without an engine (no hook), configured as the MMU configures it."""
    mmu = native.NativeMmu(0, 0, 0, [0, 0, 0, 0], lambda _va, _access: None)
    model = 2 if memory.guest_memfd else 1 if memory.encrypted else 0
    mmu.configure(memory.dram_address(), memory.private_address() if memory.private is not None else 0,
                  memory.size, model, memory.owner if memory.encrypted else None,
                  attrs.private if attrs is not None else None, None, bytearray(memory.nframes),
                  bytearray(memory.nframes), mode.phys_bits, mode.enc_mask, mode.enc_means_private, False,
                  attrs is not None, 1 << 39)
    return mmu


@st.composite
def backed_walks(draw: st.DrawFn) -> dict[str, Any]:
    """Tables in 8 frames of both backings (different contents), a random owner or attribute
    per frame, and a VA whose indices hit the written entries."""
    va = draw(st.integers(0, (1 << 48) - 1))
    entries: list[tuple[bool, int, int]] = []
    for _ in range(12):
        frame = draw(st.integers(0, 7))
        level = draw(st.integers(1, 4))
        gpa = (frame << 12) + ((va >> (12 + 9 * (level - 1))) & 0x1FF) * 8
        entry = (draw(st.integers(0, 9)) << 12) | draw(st.integers(0, 0x1FF)) | draw(st.sampled_from([0, 1 << 51]))
        entries.append((draw(st.booleans()), gpa, entry))
    return {"va": va, "cr3": draw(st.integers(0, 8)) << 12, "entries": entries,
            "private": [draw(st.booleans()) for _ in range(8)], "access": draw(st.integers(0, 2)),
            "user": draw(st.booleans()), "wp": draw(st.booleans())}


@settings(max_examples=60, deadline=None)
@given(backed_walks())
def test_native_walk_reads_the_backing_the_python_walker_reads(case: dict[str, Any]) -> None:
    """Legacy SEV: the C walk reads a private-owned table frame from the private alias, as
    cpu_read_u64(private=True) does, and hands a DRAM-owned one (which needs decryption) back
    to Python. guest_memfd: it reads the backing KVM's attribute selects, as gmem_read_u64."""
    mode = PagingMode(phys_bits=48, enc_mask=1 << 51)
    legacy = GuestMemory(8 * PAGE, FrameCipher.from_seed(1))
    gmem = GuestMemory(8 * PAGE, guest_memfd=True)
    attrs = MemoryAttributes(8)
    gmem.attach_attributes(attrs)
    try:
        for frame, private in enumerate(case["private"]):
            legacy.owner[frame] = OWNER_PRIVATE if private else 0
            attrs.private[frame] = 1 if private else 0
        for private, gpa, entry in case["entries"]:
            for memory in (legacy, gmem):
                assert memory.private is not None
                struct.pack_into("<Q", memory.private if private else memory.dram, gpa, entry)
        args = (case["cr3"], case["va"], case["access"], case["user"], case["wp"], True)
        read: list[int] = []

        def legacy_read(pa: int) -> int:
            read.append(pa >> 12)
            return legacy.cpu_read_u64(pa, True)

        expected = reference(walk(legacy_read, *args[:4], mode, wp=case["wp"], mem_size=legacy.size))
        got = _detached(legacy, mode, None).walk(*args)
        if any(not case["private"][f] for f in read if f < 8):
            assert got is None  # the entry needs decrypting: Python's
        else:
            assert got == expected
        expected = reference(walk(gmem.gmem_read_u64, *args[:4], mode, wp=case["wp"], mem_size=gmem.size))
        assert _detached(gmem, mode, attrs).walk(*args) == expected
    finally:
        legacy.close()
        gmem.close()


def test_native_walk_refuses_bad_parameters() -> None:
    """An address width outside 12..52 or an unknown access kind is a ValueError naming them."""
    with pytest.raises(ValueError, match="phys_bits"):
        native.walk(bytes(PAGE), 0, 0, 0, False, 60, 0, True, False, True)
    with pytest.raises(ValueError, match="access"):
        native.walk(bytes(PAGE), 0, 0, 7, False, 48, 0, True, False, True)


PAGES_TOUCH = """
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rcx, 64
touch:
    add qword ptr [rdi], 1
    add rdi, 4096
    dec rcx
    jnz touch
    GUEST_SYNC 0x600d
    mov rax, 0x400000000000    # canonical, unmapped: #PF
    mov rax, [rax]
    ret
"""


def _run_pages(vm_type: str, monkeypatch: pytest.MonkeyPatch, python_only: bool) -> tuple[Any, ...]:
    if python_only:
        monkeypatch.setenv("TESTBED_NO_NATIVE_MMU", "1")
    else:
        monkeypatch.delenv("TESTBED_NO_NATIVE_MMU", raising=False)
    options = VmOptions(memory=8 << 20, vm_type=vm_type, seed=1)
    with Machine(build_program("<pages>", options, text=PAGES_TOUCH), options) as machine:
        report = machine.run()
        cpu = machine.cpu
        native_fills = cpu._native_mmu.fills if cpu._native_mmu is not None else 0
        return (report.outcome, report.detail, report.ucalls, cpu.tlb_fills), native_fills


@pytest.mark.parametrize("vm_type", ["default", "sev", "sw-protected"])
def test_python_fill_fallback_gives_the_same_results(vm_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the C fill (most fills done in C) and with it disabled (TESTBED_NO_NATIVE_MMU=1,
    every fill in Python) a guest touching pages and then faulting ends the same way, with the
    same number of TLB fills (on sev most first touches move a frame's ownership: Python's)."""
    fast, native_fills = _run_pages(vm_type, monkeypatch, python_only=False)
    slow, no_fills = _run_pages(vm_type, monkeypatch, python_only=True)
    assert fast == slow
    assert no_fills == 0
    assert 0 < native_fills < fast[3]  # C did fills, and Python the faulting one (at least)
    assert fast[0] == "unhandled_exception" and "#PF" in fast[1]


def test_native_fill_write_protects_clean_pages_while_dirty_logging() -> None:
    """Dirty logging in the C fill, as in the Python fill (hw/mmu.py `_tlb_fill`): with KVM's
    bitmap set, a read of a clean page maps it without WRITE, a store sets the page's bit and
    maps it writable (KVM's write-protection fault, counted), and a dirty page is writable for
    reads too; without a bitmap every writable mapping has WRITE."""
    memory = GuestMemory(16 * PAGE)
    try:
        for table, entry in ((0x1000, 0x2003), (0x2000, 0x3003), (0x3000, 0x4003), (0x4000 + 5 * 8, 0x5003)):
            struct.pack_into("<Q", memory.dram, table, entry)
        mmu = _detached(memory, PagingMode(phys_bits=48, enc_mask=0), None)
        cr0 = 1 << 16  # WP
        write = 2
        assert mmu.fill(0x5000, 1, 0x08, 0x1000, cr0) == (0x5000, 1 | write)
        bitmap = bytearray(2)
        mmu.set_dirty_log(bitmap)
        assert mmu.fill(0x5000, 0, 0x08, 0x1000, cr0) == (0x5000, 1)  # read: write-protected
        assert bitmap == bytearray(2) and mmu.dirty_faults == 0
        assert mmu.fill(0x5000, 1, 0x08, 0x1000, cr0) == (0x5000, 1 | write)  # store: marked
        assert bitmap[0] == 1 << 5 and mmu.dirty_faults == 1
        assert mmu.fill(0x5000, 0, 0x08, 0x1000, cr0) == (0x5000, 1 | write)  # dirty: writable
        with pytest.raises(ValueError, match="cannot cover"):
            mmu.set_dirty_log(bytearray(1))
        mmu.set_dirty_log(None)
        mmu.close()
    finally:
        memory.close()


@pytest.mark.parametrize("vm_type", ["default", "sev-snp"])
def test_walk_now_reads_the_vcpus_cr3_and_cr0(vm_type: str) -> None:
    """NativeMmu.walk_now (PVALIDATE's walk) is walk() with the vCPU's own CR3 and CR0.WP."""
    from testbed.x86 import CR0_WP, Reg

    options = VmOptions(vm_type=vm_type, memory=8 << 20)
    with Machine(build_program("<w>", options, text="guest_main:\n    ret\n"), options) as machine:
        machine.boot_to(machine.program.symbols["guest_main"])
        cpu = machine.cpu
        mmu = cpu._native_mmu
        cr3, wp = cpu.read_reg(Reg.CR3), bool(cpu.read_reg(Reg.CR0) & CR0_WP)
        for va in (0x0, 0x1000, 0x100000, 0x600000, 0x7FF000, 1 << 47, 0xFFFF_8000_0000_0000):
            for access in (0, 1, 2):
                assert mmu.walk_now(va, access, False) == mmu.walk(cr3, va, access, False, wp, True), (hex(va), access)
        assert mmu.walk_now(0x600000, 0, False)[0] == 0  # a mapped page: the walk succeeded
