"""SEV (AMD only): the hypercall-instruction demo, ciphertext, and run-time detection.

Scenarios:
1. Every cell of `testbed demo` (testbed.demo.run_cell: vendor x VM type x instruction): on
   SEV, VMCALL ends in the guest's own #UD - KVM clears the #UD intercept for SEV guests
   (sev_init_vmcb() in arch/x86/kvm/svm/sev.c) and could only read ciphertext anyway - while
   VMMCALL and the runtime's KVM_HYPERCALL succeed; on a plain AMD VM VMCALL is patched.
2. The memory controller's cipher (testbed.hw.memory.GuestMemory + testbed.hw.cipher.FrameCipher):
   the host sees ciphertext, which depends on the address and on the VM's key, and decrypts
   back to the plaintext.
3. Guest views (guests/sev_cbit_alias.s): a frame written through the C=1 mapping reads as
   ciphertext through a second PTE without the C-bit - the same bytes the host reads - and a
   host write into the private frame makes the guest's C=1 read decrypt garbage.
4. Run-time detection (guests/sev_detect.s): CPUID 0x8000001F reports SEV and the C-bit
   position (51 by default, VmOptions.c_bit otherwise), SEV_STATUS bit 0 is set; a plain VM
   reports no SEV. The foundation guest passes under SEV with C-bit 47 too.
5. `--vendor intel --vm-type sev` is a usage error.
"""

from __future__ import annotations

import pytest

from testbed.cli import EXIT_USAGE, main
from testbed.demo import CELLS, INSNS, run_cell
from testbed.errors import GuestMemoryError, UsageError
from testbed.hw.cipher import FrameCipher
from testbed.hw.exits import Vendor
from testbed.hw.memory import GuestMemory
from testbed.layout import Layout
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program, run_guest

MEMORY = 16 << 20
VMCALL_HEX = "0f01c1"
VMMCALL = b"\x0f\x01\xd9"
PAGE = 4096
SEV_BIT = 1 << 1  # CPUID 0x8000001F.EAX bit 1
MSR_AMD64_SEV_ENABLED = 1 << 0  # SEV_STATUS bit 0


def sev_options(**kw: object) -> VmOptions:
    """A small SEV VM with a fixed key."""
    return VmOptions(vendor=Vendor.AMD, vm_type="sev", memory=MEMORY, timeout=5.0, seed=1, **kw)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- demo


DEMO_CELLS = [(vendor, vm_type, insn) for vendor, vm_type in CELLS for insn in INSNS]
DEMO_IDS = [f"{v.value}-{t}-{INSNS[i]}" for v, t, i in DEMO_CELLS]


@pytest.mark.parametrize(("vendor", "vm_type", "insn"), DEMO_CELLS, ids=DEMO_IDS)
def test_demo_cell(vendor: Vendor, vm_type: str, insn: int) -> None:
    """Each demo cell ends as KVM would: only VMCALL under SEV fails, with #UD in the guest."""
    cell = run_cell(vendor, vm_type, insn, seed=1)
    native = "VMMCALL" if vendor is Vendor.AMD else "VMCALL"
    if vm_type == "sev" and INSNS[insn] == "VMCALL":
        assert cell.outcome == "unhandled_exception", f"{cell.outcome}: {cell.detail}"
        assert "#UD" in cell.detail, cell.detail
        assert cell.result is None
        assert cell.host_view is not None, "no ud_host_view recorded for the SEV #UD"
        return
    assert cell.outcome == "done", f"{cell.outcome}: {cell.detail}"
    assert cell.result == 0, f"RAX 0x{cell.result:x}, expected KVM_HC_VAPIC_POLL_IRQ's 0"
    assert cell.host_view is None
    if INSNS[insn] not in (native, "KVM_HYPERCALL"):
        assert cell.kvm_action.startswith(f"decoded, patched to {native}"), cell.kvm_action


def test_sev_vmcall_is_ud_at_the_site_with_ciphertext_host_view() -> None:
    """SEV VMCALL: #UD at hypercall_site; the host reads other bytes there, which do not decode as vmcall."""
    options = sev_options(defines={"INSN": 0})
    program = build_program(GUESTS_DIR / "hypercall_insn.s", options)
    machine = Machine(program, options)
    report = machine.run()
    site = program.symbols["hypercall_site"]
    assert report.outcome == "unhandled_exception", report.detail
    where = program.locate(site)
    assert where is not None and where.symbol == "hypercall_site"
    assert report.exception == {"vector": 6, "error_code": None, "rip": site, "file": where.file, "line": where.line,
                                "symbol": "hypercall_site", "offset": 0}, (
        f"exception {report.exception}, expected #UD at 0x{site:x}"
    )
    views = report.extra.get("ud_host_view")
    assert views and len(views) == 1, f"ud_host_view {views}"
    view = views[0]
    assert view["rip"] == site
    assert view["kvm_intercepts_ud"] is False
    assert str(view["guest_bytes"]).startswith(VMCALL_HEX), f"guest bytes {view['guest_bytes']}"
    assert view["guest_decode"] == "vmcall"
    assert view["host_bytes"] != view["guest_bytes"], "the host read plaintext"
    assert not str(view["host_bytes"]).startswith(VMCALL_HEX)
    assert view["host_decode"] != "vmcall", f"host decode {view['host_decode']}"
    assert machine.memory.host_read(site, 3).hex() == str(view["host_bytes"])[:6]


def test_plain_amd_vmcall_is_patched_in_guest_memory() -> None:
    """On a plain AMD VM the VMCALL at hypercall_site is rewritten to VMMCALL and the call succeeds."""
    options = VmOptions(vendor=Vendor.AMD, memory=MEMORY, timeout=5.0, defines={"INSN": 0})
    program = build_program(GUESTS_DIR / "hypercall_insn.s", options)
    machine = Machine(program, options)
    report = machine.run()
    assert report.outcome == "done", report.detail
    assert report.syncs() == [0]
    site = program.symbols["hypercall_site"]
    patched = machine.memory.host_read(site, 3)
    assert patched == VMMCALL, f"bytes at 0x{site:x}: {patched.hex()}, expected {VMMCALL.hex()}"


# ------------------------------------------------------------------------------ cipher


def encrypted_memory(seed: int = 1, size: int = 16 * PAGE) -> GuestMemory:
    """A small encrypted GuestMemory with a seeded key."""
    return GuestMemory(size, FrameCipher.from_seed(seed))


def test_host_view_of_private_frame_is_not_plaintext() -> None:
    """A frame written through C=1 reads back as plaintext for the CPU and as other bytes for the host."""
    mem = encrypted_memory()
    plaintext = bytes(range(256)) * 16
    mem.cpu_write(2 * PAGE, plaintext, private=True)
    assert mem.cpu_read(2 * PAGE, PAGE, private=True) == plaintext
    host = mem.host_read(2 * PAGE, PAGE)
    assert host != plaintext
    assert plaintext[:64] not in host


def test_equal_plaintext_differs_per_address() -> None:
    """The same plaintext in two frames gives two different ciphertexts (address tweak)."""
    mem = encrypted_memory()
    plaintext = b"\xa5" * PAGE
    mem.cpu_write(3 * PAGE, plaintext, private=True)
    mem.cpu_write(4 * PAGE, plaintext, private=True)
    assert mem.host_read(3 * PAGE, PAGE) != mem.host_read(4 * PAGE, PAGE)
    cipher = FrameCipher.from_seed(1)
    assert cipher.encrypt(0x3000, plaintext) != cipher.encrypt(0x4000, plaintext)


def test_ciphertext_differs_per_key() -> None:
    """Two VMs (seeds) encrypt the same plaintext at the same address differently; one seed is reproducible."""
    plaintext = b"\x5a" * PAGE
    views = []
    for seed in (1, 2, 1):
        mem = encrypted_memory(seed)
        mem.cpu_write(PAGE, plaintext, private=True)
        views.append(mem.host_read(PAGE, PAGE))
    assert views[0] != views[1]
    assert views[0] == views[2]


def test_cipher_round_trips() -> None:
    """decrypt(encrypt(p)) == p for the frame's address, and a wrong address does not decrypt it."""
    cipher = FrameCipher.from_seed(7)
    plaintext = bytes((i * 37) & 0xFF for i in range(PAGE))
    ciphertext = cipher.encrypt(0x5000, plaintext)
    assert ciphertext != plaintext
    assert cipher.decrypt(0x5000, ciphertext) == plaintext
    assert cipher.decrypt(0x6000, ciphertext) != plaintext
    mem = encrypted_memory()
    mem.cpu_write(5 * PAGE, plaintext, private=True)
    assert mem.host_read(5 * PAGE, PAGE) == FrameCipher.from_seed(1).encrypt(5 * PAGE, plaintext)


def test_host_write_into_private_frame_gives_guest_garbage_memory_level() -> None:
    """After the host writes a private frame, the CPU's C=1 read decrypts it into neither value."""
    mem = encrypted_memory()
    secret = b"secret!!" * 8
    mem.cpu_write(6 * PAGE, secret, private=True)
    host_bytes = b"\x11" * len(secret)
    mem.host_write(6 * PAGE, host_bytes)
    seen = mem.cpu_read(6 * PAGE, len(secret), private=True)
    assert seen != secret
    assert seen != host_bytes
    assert mem.host_read(6 * PAGE, len(secret)) == host_bytes


def test_launch_update_data_encrypts_exactly_its_range() -> None:
    """LAUNCH_UPDATE_DATA encrypts [gpa, gpa + len) in place and nothing else (sev.c
    sev_launch_update_data hands the firmware the exact length): the rest of a frame it covers in
    part keeps its bytes in DRAM (the host reads them unchanged, the guest's C=1 view decrypts them
    into garbage); an address or length not 16-byte aligned is refused."""
    mem = encrypted_memory()
    mem.host_write(6 * PAGE, b"\x5a" * PAGE)
    mem.launch_encrypt(6 * PAGE, 0x100)
    assert mem.cpu_read(6 * PAGE, 0x100, private=True) == b"\x5a" * 0x100
    assert mem.host_read(6 * PAGE + 0x100, 0x100) == b"\x5a" * 0x100  # not launched: DRAM as it was
    assert mem.cpu_read(6 * PAGE + 0x100, 0x100, private=True) != b"\x5a" * 0x100
    assert mem.host_read(6 * PAGE, 0x10) != b"\x5a" * 0x10  # launched: ciphertext
    for gpa, length in ((7 * PAGE + 8, 0x100), (7 * PAGE, 0x101)):
        with pytest.raises(GuestMemoryError, match="16-byte"):
            mem.launch_encrypt(gpa, length)


# ---------------------------------------------------------------------------- guest views


STALE_CODE = """
.equ P, GUEST_FREE_GPA
.equ ALIAS, GUEST_FREE_GPA + 0x1000
guest_main:
    push rbx
    push r12
    push r13
    mov rbx, P
    mov dword ptr [rbx], 0x000001b8     # code A: mov eax, 1; ret
    mov byte ptr [rbx + 4], 0
    mov byte ptr [rbx + 5], 0xc3
    call rbx
    GUEST_SYNC rax
    mov rdi, P                          # ALIAS -> P's frame with C=0
    call rt_pte_address
    mov rcx, qword ptr [rax]
    mov rdx, RT_DATA
    mov rdx, qword ptr [rdx + 0x800]
    not rdx
    and rcx, rdx
    mov rdi, ALIAS
    call rt_pte_address
    mov qword ptr [rax], rcx
    mov rdi, ALIAS
    invlpg [rdi]
    mov r12, qword ptr [rdi]            # code A's ciphertext
    mov r13, qword ptr [rdi + 8]
    mov byte ptr [rbx + 1], 2           # code B through C=1: mov eax, 2; ret
    call rbx
    GUEST_SYNC rax
    mov rdi, ALIAS                      # A's ciphertext back through C=0
    mov qword ptr [rdi], r12
    mov qword ptr [rdi + 8], r13
    mov rax, qword ptr [rbx]            # a C=1 data read decrypts A
    GUEST_SYNC rax
    call rbx                            # and so must the fetch
    GUEST_SYNC rax
    pop r13
    pop r12
    pop rbx
    ret
"""


@pytest.mark.parametrize("fill", ["c", "python"])
@pytest.mark.parametrize("vm_type", ["sev", "sev-es"])
def test_a_fetch_decrypts_what_a_data_read_does(vm_type: str, fill: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Code rewritten through a C=0 alias (its ciphertext put back) is what a C=1 data read and an
    instruction fetch both decrypt (fetches are always private, APM 15.34.5): the blocks translated
    from the frame before are dropped when its DRAM bytes are decrypted into it again."""
    if fill == "python":
        monkeypatch.setenv("TESTBED_NO_NATIVE_MMU", "1")
    report = run_guest("stale.s", VmOptions(vm_type=vm_type, memory=MEMORY, seed=1, timeout=20), text=STALE_CODE)
    assert report.outcome == "done", report.detail
    a, b, data, fetched = report.syncs()
    assert (a, b, data & 0xFFFFFFFFFFFF, fetched) == (1, 2, 0xC300000001B8, 1)




def test_c0_alias_of_private_frame_reads_ciphertext() -> None:
    """Through a PTE without the C-bit the guest reads the host's ciphertext; C=1 still reads plaintext."""
    options = sev_options()
    program = build_program(GUESTS_DIR / "sev_cbit_alias.s", options)
    machine = Machine(program, options)
    report = machine.run()
    assert report.outcome == "done", report.detail
    c_bit_mask, c1_read, c0_read, c1_again = report.syncs()
    secret = 0x5EC12E7
    assert c_bit_mask == 1 << 51, f"C-bit mask 0x{c_bit_mask:x}"
    assert c1_read == secret, f"C=1 read 0x{c1_read:x}"
    assert c0_read != secret, f"C=0 alias read the plaintext 0x{c0_read:x}"
    data_gpa = Layout(MEMORY).free_gpa
    host = int.from_bytes(machine.memory.host_read(data_gpa, 8), "little")
    assert c0_read == host, f"guest C=0 view 0x{c0_read:x} != host view 0x{host:x}"
    assert c1_again == secret, f"C=1 read after the C=0 read: 0x{c1_again:x}"


def test_c0_alias_on_plain_vm_reads_plaintext() -> None:
    """Without SEV there is no C-bit: both mappings read the value written."""
    options = VmOptions(vendor=Vendor.AMD, memory=MEMORY, timeout=5.0)
    report = run_guest(GUESTS_DIR / "sev_cbit_alias.s", options)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [0, 0x5EC12E7, 0x5EC12E7, 0x5EC12E7], [hex(s) for s in report.syncs()]


def test_snp_c0_alias_round_trip_meets_a_fresh_unvalidated_page() -> None:
    """On SNP the C=0 access is a memory fault the VMM answers by converting the page to shared,
    punching it out of guest_memfd as QEMU does (ram_block_discard_guest_memfd_range): KVM sees
    the punch (kvm_gmem_punch_hole; the folio goes back to shared in the RMP, sev_gmem_invalidate),
    so when the C=1 read converts it back the page is a new one, not validated: #VC 0x404."""
    options = VmOptions(vendor=Vendor.AMD, vm_type="sev-snp", memory=MEMORY, timeout=5.0, seed=1)
    report = run_guest(GUESTS_DIR / "sev_cbit_alias.s", options)
    assert report.outcome == "unhandled_exception", report.detail
    assert (report.exception or {}).get("vector") == 29 and report.exception.get("error_code") == 0x404
    assert report.syncs()[:2] == [1 << 51, 0x5EC12E7]


def test_host_write_into_private_page_gives_guest_garbage() -> None:
    """A host write into the guest's private frame between two runs makes the guest's C=1 read garbage."""
    options = sev_options()
    program = build_program(GUESTS_DIR / "sev_cbit_alias.s", options)
    machine = Machine(program, options)
    machine.boot_to(program.symbols["host_write_site"])
    data_gpa = Layout(MEMORY).free_gpa
    host_value = 0x1122334455667788
    machine.memory.host_write(data_gpa, host_value.to_bytes(8, "little"))
    report = machine.run()
    assert report.outcome == "done", report.detail
    _, c1_read, c0_read, _ = report.syncs()
    assert c1_read not in (0x5EC12E7, host_value), f"C=1 read 0x{c1_read:x} after the host write"
    assert c0_read == host_value, f"C=0 alias read 0x{c0_read:x}, expected the host's 0x{host_value:x}"


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("c_bit", [51, 47])
def test_guest_detects_sev_and_c_bit(c_bit: int) -> None:
    """CPUID 0x8000001F shows SEV and C-bit `c_bit` (51 by default), SEV_STATUS shows SEV enabled."""
    options = sev_options() if c_bit == 51 else sev_options(c_bit=c_bit)
    report = run_guest(GUESTS_DIR / "sev_detect.s", options)
    assert report.outcome == "done", report.detail
    eax, ebx, sev_status = report.syncs()
    assert eax == SEV_BIT, f"CPUID 0x8000001F.EAX 0x{eax:x}: SEV (bit 1) only, no SEV-ES/SNP bits"
    assert ebx & 0x3F == c_bit, f"CPUID 0x8000001F.EBX 0x{ebx:x}: C-bit {ebx & 0x3F}, expected {c_bit}"
    assert sev_status == MSR_AMD64_SEV_ENABLED, f"SEV_STATUS 0x{sev_status:x}: bit 0 only (not SEV-ES)"


def test_default_c_bit_is_51() -> None:
    """VmOptions' default C-bit position is 51."""
    assert VmOptions().c_bit == 51


@pytest.mark.parametrize("vendor", list(Vendor), ids=[v.value for v in Vendor])
def test_plain_vm_reports_no_sev(vendor: Vendor) -> None:
    """A plain VM's CPUID 0x8000001F.EAX has bit 1 clear (or the leaf is absent): no SEV_STATUS read."""
    report = run_guest(GUESTS_DIR / "sev_detect.s", VmOptions(vendor=vendor, memory=MEMORY, timeout=5.0))
    assert report.outcome == "done", report.detail
    syncs = report.syncs()
    if vendor is Vendor.AMD:
        assert syncs == [0, 0], f"CPUID 0x8000001F.EAX/EBX {[hex(s) for s in syncs]}: no SEV, no C-bit"
    else:
        assert syncs == [0], f"Intel reported leaf 0x8000001F: {[hex(s) for s in syncs]}"


@pytest.mark.parametrize("insn", [1, 2], ids=["VMMCALL", "KVM_HYPERCALL"])
@pytest.mark.parametrize("c_bit", [51, 47])
def test_foundation_guest_passes_under_sev(insn: int, c_bit: int) -> None:
    """guests/hypercall_insn.s with VMMCALL or KVM_HYPERCALL passes under SEV, C-bit 51 or 47."""
    report = run_guest(GUESTS_DIR / "hypercall_insn.s", sev_options(c_bit=c_bit, defines={"INSN": insn}))
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    assert report.syncs() == [0]


def test_sev_on_intel_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`testbed run --vendor intel --vm-type sev` exits with status 2; VmOptions.validate raises UsageError."""
    status = main(["run", str(GUESTS_DIR / "hypercall_insn.s"), "--vendor", "intel", "--vm-type", "sev"])
    _, err = capsys.readouterr()
    assert status == EXIT_USAGE == 2, f"status {status}"
    assert "Traceback" not in err and err.startswith("testbed: ")
    with pytest.raises(UsageError):
        VmOptions(vendor=Vendor.INTEL, vm_type="sev").validate()
