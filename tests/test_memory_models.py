"""The three memory models (testbed/hw/memory.py): plain, legacy SEV, guest_memfd.

guest_memfd VM types (sw-protected, sev-snp) keep a private GFN's page in guest_memfd and a
shared GFN's page in the VMM's memory: KVM's fault path picks the backing from the memory
attribute (arch/x86/kvm/mmu/mmu.c, __kvm_mmu_faultin_pfn / kvm_mmu_faultin_pfn_gmem; for
sw-protected kvm_mmu_page_fault() sets PFERR_PRIVATE_ACCESS from kvm_mem_is_private()). The
host never maps guest_memfd, and a conversion discards the side the page leaves (QEMU,
accel/kvm/kvm-all.c kvm_convert_memory: ram_block_discard_range() on to-private,
ram_block_discard_guest_memfd_range() on to-shared). KVM's own guest accessors go through the
memslot's userspace mapping whatever the attribute (virt/kvm/kvm_main.c,
__kvm_read_guest_page / __kvm_vcpu_map). Legacy sev keeps one frame per page: the host reads
ciphertext and a conversion keeps the bytes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from testbed.errors import UsageError
from testbed.hw.cipher import FrameCipher
from testbed.hw.memory import UNMAPPABLE_MESSAGE, GuestMemory, UnmappableMemoryError
from testbed.kvm.memattr import MemoryAttributes
from testbed.layout import UCALL_GPA, Layout
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program
from testbed.vmm.vmm import RunReport

MEM = 8 << 20
FREE = Layout(MEM).free_gpa
PAGE = 4096
SECRET = 0x5EC2E7_C0FFEE_5EC2  # 0x5ec2e7c0ffee5ec2: a pattern no runtime page holds
SECRET_BYTES = SECRET.to_bytes(8, "little")
#: guests load ~SECRET and invert it, so the pattern is in no image and appears only where written
NOT_SECRET = SECRET ^ ((1 << 64) - 1)
GMEM_TYPES = ["sw-protected", "sev-snp"]


def run_text(text: str, vm_type: str, **kw: object) -> tuple[Machine, RunReport]:
    options = VmOptions(vm_type=vm_type, memory=MEM, seed=3, **kw)  # type: ignore[arg-type]
    machine = Machine(build_program("<test>", options, text=text), options)
    return machine, machine.run()


# The guest fills one page with SECRET after making it private (a no-op conversion on SNP,
# whose RAM starts private).
FILL_PRIVATE = """
.equ SECRET_PAGE, GUEST_FREE_GPA
guest_main:
    mov rdi, SECRET_PAGE
    mov rsi, 1
    call set_memory_private
    GUEST_ASSERT_EQ rax, 0
    mov rdi, SECRET_PAGE
    mov rax, NOT_SECRET
    not rax
    mov rcx, 512
fill_loop:
    mov qword ptr [rdi], rax
    add rdi, 8
    dec rcx
    jnz fill_loop
    xor eax, eax           # or GUEST_SYNC's push spills it to the stack, shared on sw-protected
    GUEST_SYNC 1
    ret
"""


@pytest.mark.parametrize("vm_type", GMEM_TYPES)
def test_host_never_reads_a_private_secret(vm_type: str) -> None:
    """A guest's private page is refused to the host view, and no host-mappable byte holds it."""
    machine, report = run_text(FILL_PRIVATE, vm_type, defines={"NOT_SECRET": NOT_SECRET})
    assert report.outcome == "done", report.detail
    mem = machine.memory
    # The guest itself sees its secret (so the test can fail) ...
    assert mem.cpu_read(FREE, PAGE, private=True) == SECRET_BYTES * 512
    # ... the host view refuses the page, naming it ...
    with pytest.raises(UnmappableMemoryError, match=re.escape(UNMAPPABLE_MESSAGE) + f".*0x{FREE:x}"):
        mem.host_read(FREE, 8)
    with pytest.raises(UnmappableMemoryError):
        mem.host_view().read(FREE - 8, 16)  # straddling into the private page: refused whole
    assert mem.host_view_kind(FREE) == "unmappable"
    assert mem.host_view_kind(UCALL_GPA) == "plaintext"
    # ... KVM's view (the memslot's userspace mapping) is the VMM's own page: zeros ...
    assert mem.userspace_view().read(FREE, PAGE) == bytes(PAGE)
    # ... and nothing the host can map contains the pattern anywhere.
    assert SECRET_BYTES not in bytes(mem.dram)


def test_default_vm_shows_guest_data_in_plaintext() -> None:
    """On a plain VM (no private memory) the host reads the guest's bytes as they are."""
    text = f"""
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rax, 0x{SECRET:x}
    mov qword ptr [rdi], rax
    ret
"""
    machine, report = run_text(text, "default")
    assert report.outcome == "done", report.detail
    assert machine.memory.host_read(FREE, 8) == SECRET_BYTES
    assert machine.memory.host_view_kind(FREE) == "plaintext"


# Write SECRET, convert, report what the guest reads, convert back, report again. PRIVATE_FIRST
# says where the page starts: 1 = private (write private, ->shared, ->private), 0 = shared.
CONVERT = """
.equ P, GUEST_FREE_GPA + 0x2000
guest_main:
    mov rdi, P
    mov rsi, 1
.if PRIVATE_FIRST
    call set_memory_private
.else
    call set_memory_shared
.endif
    GUEST_ASSERT_EQ rax, 0
    mov rdi, P
    mov rax, NOT_SECRET
    not rax
    mov qword ptr [rdi], rax
    mov qword ptr [rdi + 0xff8], rax
    mov rax, qword ptr [rdi]
    GUEST_SYNC rax
    mov rdi, P
    mov rsi, 1
.if PRIVATE_FIRST
    call set_memory_shared
.else
    call set_memory_private
.endif
    GUEST_ASSERT_EQ rax, 0
    mov rdi, P
    mov rax, qword ptr [rdi]
    or rax, qword ptr [rdi + 0xff8]
    GUEST_SYNC rax
    mov rdi, P
    mov rsi, 1
.if PRIVATE_FIRST
    call set_memory_private
.else
    call set_memory_shared
.endif
    GUEST_ASSERT_EQ rax, 0
    mov rdi, P
    mov rax, qword ptr [rdi]
    or rax, qword ptr [rdi + 0xff8]
    GUEST_SYNC rax
    ret
"""


@pytest.mark.parametrize("vm_type", GMEM_TYPES)
@pytest.mark.parametrize("private_first", [1, 0])
def test_conversion_discards_the_other_side(vm_type: str, private_first: int) -> None:
    """Contents never cross a conversion: after each one the guest reads zeros (QEMU kvm_convert_memory)."""
    gpa = FREE + 0x2000
    machine, report = run_text(CONVERT, vm_type, defines={"PRIVATE_FIRST": private_first, "NOT_SECRET": NOT_SECRET})
    assert report.outcome == "done", report.detail
    assert report.syncs() == [SECRET, 0, 0]
    mem = machine.memory
    # Both backings of the page hold zeros now: the pattern is gone from everything.
    assert SECRET_BYTES not in bytes(mem.dram)
    assert mem.private is not None and SECRET_BYTES not in bytes(mem.private)
    if private_first:
        assert mem.host_view_kind(gpa) == "unmappable"
    else:
        assert mem.host_read(gpa, PAGE) == bytes(PAGE)


def test_legacy_sev_keeps_contents_across_a_conversion() -> None:
    """Legacy sev has one frame per page: a private->shared conversion keeps the bytes (as ciphertext)."""
    machine, report = run_text(CONVERT, "sev", defines={"PRIVATE_FIRST": 1, "NOT_SECRET": NOT_SECRET})
    assert report.outcome == "done", report.detail
    first, after_shared, after_private = report.syncs()
    assert first == SECRET
    # Read through C=0 the page is the memory controller's ciphertext of SECRET (what the host reads), not zeros...
    host = [int.from_bytes(machine.memory.host_read(FREE + 0x2000 + off, 8), "little") for off in (0, 0xFF8)]
    assert after_shared == host[0] | host[1] != SECRET, f"C=0 read 0x{after_shared:x}, host ciphertext {host}"
    # ... and back through C=1 it decrypts to SECRET again (OR of its first and last qword).
    assert after_private == SECRET
    assert machine.memory.host_view_kind(FREE + 0x2000) == "ciphertext"
    assert machine.memory.host_view_kind(UCALL_GPA) == "plaintext"


def test_ucall_from_a_private_page_is_refused_by_name() -> None:
    """A ucall whose page the guest made private is the guest's failure, naming the refusal."""
    text = """
guest_main:
    mov rdi, UCALL_GPA
    mov rsi, 1
    call set_memory_private
    GUEST_SYNC 7
    ret
"""
    _, report = run_text(text, "sw-protected")
    assert report.outcome == "bad_ucall", report.detail
    assert report.detail == (f"ucall at {UCALL_GPA:#x}: private memory of a guest_memfd VM is not mappable by the "
                             f"host (gpa {UCALL_GPA:#x})")
    assert report.syncs() == []


# The wrong vendor's VMCALL (AMD host) in a page of its own, made private or not, then called.
FIXUP = """
.equ CODE, GUEST_FREE_GPA + 0x4000
guest_main:
.if MAKE_PRIVATE
    mov rdi, CODE
    mov rsi, 1
    call set_memory_private
    GUEST_ASSERT_EQ rax, 0
.endif
    mov rdi, CODE
    mov dword ptr [rdi], 0xc3c1010f
    mov rax, KVM_HC_VAPIC_POLL_IRQ
    call rdi
    GUEST_SYNC rax
    ret
"""


def test_fixup_of_private_code_on_sw_protected_reads_the_vmm_page() -> None:
    """KVM's emulator reads a private page through the userspace mapping (kvm_fetch_guest_virt ->
    __kvm_read_guest_page): zeros, which is no hypercall, so #UD (x86.c handle_ud, EMULTYPE_TRAP_UD)."""
    machine, report = run_text(FIXUP, "sw-protected", defines={"MAKE_PRIVATE": 1})
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None and report.exception["vector"] == 6
    # Nothing was patched: the guest's private page still holds its VMCALL.
    assert machine.memory.cpu_read(FREE + 0x4000, 3, private=True) == b"\x0f\x01\xc1"


def test_fixup_of_shared_code_on_sw_protected_patches() -> None:
    """The same VMCALL in a shared page is read, patched to VMMCALL and run (the control case)."""
    machine, report = run_text(FIXUP, "sw-protected", defines={"MAKE_PRIVATE": 0})
    assert report.outcome == "done", report.detail
    assert report.syncs() == [0]
    assert machine.memory.host_read(FREE + 0x4000, 3) == b"\x0f\x01\xd9"


# ------------------------------------------------------------------ GuestMemory, no CPU
def test_models_per_vm_type() -> None:
    """default is plain, sev/sev-es legacy, sw-protected/sev-snp guest_memfd."""
    models = {}
    for vm_type in ("default", "sw-protected", "sev", "sev-es", "sev-snp"):
        options = VmOptions(vm_type=vm_type, memory=MEM)
        models[vm_type] = Machine(build_program("<t>", options, text="guest_main:\n    ret\n"), options).memory.model
    assert models == {"default": "plain", "sw-protected": "guest_memfd", "sev": "legacy", "sev-es": "legacy",
                      "sev-snp": "guest_memfd"}


@pytest.mark.parametrize("vm_type", ["sw-protected", "sev-snp"])
def test_page_enc_status_protocol_is_refused_on_guest_memfd_types(vm_type: str) -> None:
    """The seed-era page-enc-status protocol has no memory attributes, so a guest_memfd VM type refuses it."""
    with pytest.raises(UsageError, match=f"page-enc-status .* VM type {vm_type} needs them"):
        VmOptions(vm_type=vm_type, memory=MEM, hc_protocol="page-enc-status").validate()


def test_snp_launch_populates_guest_memfd_from_the_vmm_copy() -> None:
    """KVM_SEV_SNP_LAUNCH_UPDATE copies the VMM's pages into guest_memfd (sev_gmem_post_populate);
    the host view of the launched image is refused, the guest runs it."""
    options = VmOptions(vm_type="sev-snp", memory=MEM)
    machine = Machine(build_program("<t>", options, text="guest_main:\n    ret\n"), options)
    base = machine.program.base
    code = machine.program.code[:64]
    assert machine.memory.cpu_read(base, 64, private=True) == code
    assert machine.memory.host_view_kind(base) == "unmappable"
    with pytest.raises(UnmappableMemoryError):
        machine.memory.host_read(base, 64)
    assert machine.run().outcome == "done"


def test_discard_and_populate_unit() -> None:
    """discard_* zero exactly the named GFNs of one backing; populate copies shared -> private."""
    mem = GuestMemory(16 * PAGE, guest_memfd=True)
    attrs = MemoryAttributes(16)
    mem.attach_attributes(attrs)
    mem.dram[0 : 4 * PAGE] = b"\x11" * 4 * PAGE
    mem.populate_private(PAGE, 2 * PAGE)
    attrs.private[1:3] = b"\x01\x01"
    assert mem.cpu_read(PAGE, 2 * PAGE, private=True) == b"\x11" * 2 * PAGE
    mem.discard_private(2, 1)
    assert mem.cpu_read(PAGE, 2 * PAGE, private=True) == b"\x11" * PAGE + bytes(PAGE)
    mem.discard_shared(1, 2)
    assert mem.userspace_read(0, 4 * PAGE) == b"\x11" * PAGE + bytes(2 * PAGE) + b"\x11" * PAGE
    mem.close()


def test_discard_is_a_no_op_for_legacy_memory() -> None:
    """Legacy memory has one frame per page: there is no other side to discard."""
    mem = GuestMemory(4 * PAGE, FrameCipher.from_seed(1))
    mem.cpu_write(PAGE, b"\x22" * PAGE, private=True)
    mem.discard_shared(0, 4)
    mem.discard_private(0, 4)
    assert mem.cpu_read(PAGE, PAGE, private=True) == b"\x22" * PAGE
    assert mem.host_view_kind(PAGE) == "ciphertext"
    mem.close()


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def test_backings_are_sparse_and_closeable() -> None:
    """A 1 GiB guest_memfd VM costs what it touches (two lazily zero-filled mappings) and close() frees them."""
    before = _rss()
    mem = GuestMemory(1 << 30, guest_memfd=True)
    mem.dram[5 * PAGE] = 1
    assert mem.private is not None
    mem.private[7 * PAGE] = 1
    assert _rss() - before < 32 << 20
    mem.close()
    mem.close()  # idempotent
    assert mem.closed
    with pytest.raises(ValueError):
        mem.dram[0]  # the mapping is gone: access fails instead of touching freed memory


# ------------------------------------------------------------------ disasm --view host
@pytest.mark.parametrize(("vm_type", "says"), [
    ("default", "host view: plaintext"),
    ("sw-protected", "host view: plaintext"),  # its RAM starts shared: the code is the VMM's page
    ("sev", "host view: ciphertext"),
    ("sev-snp", "not mappable by the host"),
])
def test_disasm_host_view_says_which_view_applies(capsys: pytest.CaptureFixture[str], vm_type: str, says: str) -> None:
    """`testbed disasm --view host` names the view: plaintext, ciphertext, or not mappable."""
    from testbed.cli import main

    status = main(["disasm", str(GUESTS_DIR / "hypercall_insn.s"), "--view", "host", "--vm-type", vm_type,
                   "--count", "2", "--memory", "8M", "-D", "INSN=0"])
    out = capsys.readouterr()
    assert status == 0, out.err
    assert says in " ".join(out.out.split())  # rich wraps the table title
    if vm_type == "sev-snp":
        assert "vmcall" not in out.out and "0f 01" not in out.out  # no bytes at all


class _RecordingRam:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def discard_shared(self, first_gfn: int, npages: int) -> None:
        self.calls.append(("shared", first_gfn, npages))

    def discard_private(self, first_gfn: int, npages: int) -> None:
        self.calls.append(("private", first_gfn, npages))


def test_vmm_discards_the_side_a_conversion_leaves() -> None:
    """MapGpaHandler.convert: attributes first, then the old side is discarded (QEMU kvm_convert_memory);
    a conversion KVM refuses discards nothing."""
    from testbed.hw.exits import Vendor
    from testbed.hw.memory import BytesMemory
    from testbed.kvm.uapi import KvmVmType
    from testbed.kvm.vm import KvmVm
    from testbed.tracker import make_tracker
    from testbed.vmm.map_gpa import MapGpaHandler

    vm = KvmVm(KvmVmType.KVM_X86_SW_PROTECTED_VM, Vendor.AMD, BytesMemory(64 * PAGE))
    ram = _RecordingRam()
    handler = MapGpaHandler(make_tracker("bitmap", guest_pages=64), 64, vm=vm, ram=ram)
    assert handler.convert(3, 2, True) == 0
    assert handler.convert(3, 1, False) == 0
    assert ram.calls == [("shared", 3, 2), ("private", 3, 1)]
    handler.refused = [(10, 11, None)]
    assert handler.convert(10, 1, True) != 0
    assert ram.calls == [("shared", 3, 2), ("private", 3, 1)]


@pytest.mark.parametrize(("vm_type", "view"), [("sev", "ciphertext"), ("sev-snp", "unmappable")])
def test_ud_explanation_names_the_host_view(vm_type: str, view: str) -> None:
    """The #UD explanation shows ciphertext on legacy sev and no bytes at all on SNP (guest_memfd)."""
    from testbed.machine import run_guest

    report = run_guest(GUESTS_DIR / "hypercall_insn.s", VmOptions(vm_type=vm_type, memory=MEM, seed=1,
                                                                  defines={"INSN": 0}))
    assert report.outcome == "unhandled_exception"
    (entry,) = report.extra["ud_host_view"]
    assert entry["host_view"] == view
    assert (entry["host_bytes"] is None) == (view == "unmappable")
    assert entry["guest_decode"].startswith("vmcall")
