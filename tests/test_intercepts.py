"""Tests for the instruction intercepts (testbed/hw/intercepts.py): the sites found by scanning
code pages - an instruction whose bytes straddle a page boundary, one with prefixes, and a code
frame run through a second virtual address."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from guest_compat import far_return_to_64, far_return_to_compat, load_compat_segment

import testbed
from testbed.api import VmTimeoutError
from testbed.hw import intercepts, unicorn_binding
from testbed.hw.intercepts import MAX_SITE_HOOKS, Intercepts
from testbed.layout import Layout
from testbed.machine import Machine, VmOptions, build_program, run_guest
from testbed.vmm.vmm import RunReport
from testbed.x86 import PAGE_SIZE


def at_page_end(label: str, insn: bytes, inside: int, sync: str) -> str:
    """Guest code that jumps to `insn` placed so that its first `inside` bytes end a page (the
    rest on the next one), then reports `sync`."""
    return f"""
    lea rdx, [rip + {label}]
    jmp rdx
.balign 4096
.skip {4096 - inside}, 0xcc
{label}:
    .byte {", ".join(f"0x{b:02x}" for b in insn)}
    GUEST_SYNC {sync}
"""


CPUID_LEAF = "    mov eax, 0x40000000\n    xor ecx, ecx\n"  # KVM's signature leaf


def cpuid(insn: bytes) -> str:
    """CPUID of KVM's signature leaf with the bytes `insn` (its prefixes too), mid-page."""
    return CPUID_LEAF + f"    .byte {', '.join(f'0x{b:02x}' for b in insn)}\n    GUEST_SYNC rbx\n"


# RDMSR of SEV_STATUS and CPUID 0x40000000 (KVM's signature leaf), each starting on the last
# byte of a page: 0F there, the rest of the instruction on the next page.
STRADDLE = ("guest_main:\n    mov ecx, 0xC0010131\n" + at_page_end("straddle_rdmsr", b"\x0f\x32", 1, "rax")
            + CPUID_LEAF + at_page_end("straddle_cpuid", b"\x0f\xa2", 1, "rbx") + "    ret\n")

def run_traced(text: str, **options: Any) -> tuple[RunReport, list[dict[str, Any]]]:
    """Run guest `text` (16 MiB, seed 1, `options`) with a trace: its report and trace events."""
    trace = io.StringIO()
    report = run_guest("<guest>", VmOptions(memory=16 << 20, seed=1, trace=trace, **options), text=text)
    return report, events_of(trace)


def events_of(trace: io.StringIO) -> list[dict[str, Any]]:
    """The events a run wrote to `trace`."""
    return [json.loads(line) for line in trace.getvalue().splitlines()]


KVM_SIGNATURE_EBX = 0x4B4D564B  # "KVMK"


@pytest.mark.parametrize(("vm_type", "sev_status"), [("sev", 0x1), ("sev-es", 0x3), ("sev-snp", 0x7)])
def test_a_site_straddling_a_page_boundary_is_intercepted(vm_type: str, sev_status: int) -> None:
    """An RDMSR whose 0F ends a page still reads the hardware's SEV_STATUS (Unicorn alone
    reads 0), and on SEV-ES/SNP a CPUID so placed raises #VC (SVM_EXIT_CPUID) at its first
    byte before it runs, answered through the GHCB with KVM's signature."""
    report, events = run_traced(STRADDLE, vm_type=vm_type)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [sev_status, KVM_SIGNATURE_EBX]
    cpuid_vcs = [e for e in events if e["event"] == "vc" and e["error_code"] == 0x72 and e["rip"] & 0xFFF == 0xFFF]
    assert len(cpuid_vcs) == (1 if vm_type != "sev" else 0)


def test_a_cpuid_straddling_a_page_boundary_in_a_td_is_the_modules() -> None:
    """In a TD a CPUID whose 0F ends a page is still the TDX module's: leaf 0x40000000 raises
    #VE and reaches KVM as a TDVMCALL, never as a CPUID exit (KVM never sees one from a TD)."""
    text = "guest_main:\n" + CPUID_LEAF + at_page_end("straddle_cpuid", b"\x0f\xa2", 1, "rbx") + "    ret\n"
    report, events = run_traced(text, vm_type="tdx", vendor="intel")
    assert report.outcome == "done", report.detail
    assert report.syncs() == [KVM_SIGNATURE_EBX]
    ves = [e for e in events if e["event"] == "deliver" and e["name"] == "#VE" and e["rip"] & 0xFFF == 0xFFF]
    assert len(ves) == 1
    assert not [e for e in events if e["event"] == "handle_exit" and e["name"] == "EXIT_REASON_CPUID"]


# IN AL, 0x80 with an operand-size prefix: in the middle of a page, then with its 66 ending one.
PREFIXED_IN = ("guest_main:\n    .byte 0x66, 0xe4, 0x80\n" + at_page_end("straddle_in", b"\x66\xe4\x80", 1, "1")
               + "    ret\n")


def test_a_prefixed_in_raises_vc_mid_page_and_straddling() -> None:
    """On SEV-ES an IN with a 66 prefix raises #VC (SVM_EXIT_IOIO) at its prefix before it runs,
    in the middle of a page and with the prefix ending one, and the guest gets the VMM's
    answer through the GHCB (port 0x80 reads 0xff)."""
    report, events = run_traced(PREFIXED_IN, vm_type="sev-es")
    assert report.outcome == "done", report.detail
    ioio = [e["rip"] for e in events if e["event"] == "vc" and e["error_code"] == 0x7B]
    assert len(ioio) == 2 and ioio[1] & 0xFFF == 0xFFF
    assert [e["value"] for e in events if e["event"] == "exit" and e.get("port") == 0x80] == [0xFF, 0xFF]


#: An alias of the identity map: PML4[1] = PML4[0], so 0x8000000000 + x maps x.
ALIAS_MAP = """
    mov rdi, RT_PT_BASE
    mov rax, qword ptr [rdi]
    mov qword ptr [rdi + 8], rax
    mov rax, cr3
    mov cr3, rax
"""

#: An RDMSR of SEV_STATUS (then RET) alone on a page, at `site`.
SITE_PAGE = ".balign 4096\nsite:\n    mov ecx, 0xC0010131\n    rdmsr\n    ret\n"

# The page of `site` run through the identity map, then through the alias. The frame is
# scanned (and hooked) at the first address.
ALIASED = "guest_main:\n" + ALIAS_MAP + """
    lea rbx, [rip + site]
    call rbx
    GUEST_SYNC rax
    mov r12, 0x8000000000
    add rbx, r12
    call rbx
    GUEST_SYNC rax
    sub rbx, r12
    call rbx
    GUEST_SYNC rax
    ret
""" + SITE_PAGE


class _WithoutScanVas:
    """A C fill as an extension older than set_scan_vas shows it (everything else delegated)."""

    def __init__(self, native: Any) -> None:
        self._native = native

    def __getattr__(self, name: str) -> Any:
        if name == "set_scan_vas":
            raise AttributeError(name)
        return getattr(self._native, name)


@pytest.mark.parametrize("fill", ["c", "python", "c-without-scan-vas"])
@pytest.mark.parametrize(("vm_type", "sev_status"), [("sev", 0x1), ("sev-snp", 0x7)])
def test_a_site_run_through_a_second_address_is_intercepted_there_too(vm_type: str, sev_status: int, fill: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A code frame fetched through a second guest-virtual page has its sites hooked there as
    well (hooks are per address; the frame was scanned at the first): the RDMSR of SEV_STATUS
    reads the hardware's value through the identity map, the alias, and the identity map again
    (Unicorn alone reads 0) - with the C fill, the Python fill (TESTBED_NO_NATIVE_MMU), and a C
    fill without set_scan_vas, whose fills all go to Python."""
    if fill == "python":
        monkeypatch.setenv("TESTBED_NO_NATIVE_MMU", "1")
    elif fill == "c-without-scan-vas":
        if unicorn_binding._nativemmu is None:
            pytest.fail("the C extension is part of the install")
        real = unicorn_binding._nativemmu.NativeMmu
        monkeypatch.setattr(unicorn_binding._nativemmu, "NativeMmu", lambda *a: _WithoutScanVas(real(*a)))
    report = run_guest("<alias>", VmOptions(vm_type=vm_type, memory=16 << 20, seed=1), text=ALIASED)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [sev_status] * 3


# The page of `site` run through the identity map, then read through the alias, then run there.
READ_THEN_RUN_AT_ALIAS = "guest_main:\n" + ALIAS_MAP + """
    lea rbx, [rip + site]
    call rbx
    GUEST_SYNC rax
    mov r12, 0x8000000000
    add rbx, r12
    mov al, byte ptr [rbx]             # a data read through the alias first
    call rbx
    GUEST_SYNC rax
    ret
""" + SITE_PAGE


@pytest.mark.parametrize("fill", ["c", "python"])
@pytest.mark.parametrize(("vm_type", "sev_status"), [("sev", 0x1), ("sev-snp", 0x7)])
def test_a_read_through_an_alias_does_not_make_it_executable_unscanned(vm_type: str, sev_status: int, fill: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A data read through a second page of a code frame scanned at the first gives that page no
    executable TLB entry: the call through it that follows is fetched, scanned and hooked there,
    and its RDMSR of SEV_STATUS reads the hardware's value (the read's entry was executable, and
    the RDMSR ran in Unicorn and read 0) - with the C fill and the Python fill."""
    if fill == "python":
        monkeypatch.setenv("TESTBED_NO_NATIVE_MMU", "1")
    report = run_guest("<alias>", VmOptions(vm_type=vm_type, memory=16 << 20, seed=1), text=READ_THEN_RUN_AT_ALIAS)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [sev_status] * 2


# RDMSR and CPUID with prefixes that change nothing in them (REX.W, CS override, operand size),
# in the middle of a page and with their prefixes ending one.
PREFIXED_SITES = ("guest_main:\n    mov ecx, MSR\n    .byte 0x48, 0x0f, 0x32\n    GUEST_SYNC rax\n"
                  "    mov ecx, MSR\n    .byte 0x2e, 0x66, 0x0f, 0x32\n    GUEST_SYNC rax\n" + cpuid(b"\x2e\x0f\xa2")
                  + "    mov ecx, MSR\n" + at_page_end("straddle_rdmsr", b"\x2e\x48\x0f\x32", 2, "rax")
                  + CPUID_LEAF + at_page_end("straddle_cpuid", b"\x48\x0f\xa2", 1, "rbx") + "    ret\n")


@pytest.mark.parametrize(("vm_type", "msr", "value"), [
    ("sev", 0xC0010131, 0x1), ("sev-es", 0xC0010131, 0x3), ("sev-snp", 0xC0010131, 0x7),
    ("default", 0x4B564D05, 1),  # MSR_KVM_POLL_CONTROL, 1 after vCPU creation: KVM's exit path
])
def test_prefixed_msr_and_cpuid_are_intercepted(vm_type: str, msr: int, value: int) -> None:
    """An RDMSR or CPUID with prefixes (REX.W, a segment override, 66) is intercepted at its
    first prefix, in the middle of a page and with its prefixes ending one: the hardware's
    SEV_STATUS, or KVM's answer with RIP past the whole instruction; on SEV-ES/SNP each CPUID
    raises #VC and the runtime's handler skips the prefixes too (Unicorn alone reads 0 and
    never raises #VC)."""
    report, events = run_traced(PREFIXED_SITES, vm_type=vm_type, enforce_pv_cpuid=False, defines={"MSR": msr})
    assert report.outcome == "done", report.detail
    assert report.syncs() == [value, value, KVM_SIGNATURE_EBX, value, KVM_SIGNATURE_EBX]
    if vm_type in ("sev-es", "sev-snp"):
        cpuid_vcs = [e["rip"] & 0xFFF for e in events if e["event"] == "vc" and e["error_code"] == 0x72]
        assert 0xFFF in cpuid_vcs  # the straddling one, at its REX.W
        assert not [e for e in events if e["event"] == "handle_exit" and e["name"] == "SVM_EXIT_CPUID"]


def test_a_prefixed_cpuid_in_a_td_is_the_modules() -> None:
    """In a TD a CPUID with prefixes, mid-page and with its REX.W ending a page, raises #VE
    with the whole instruction's length in VE_INFO, and the runtime resumes after it."""
    text = ("guest_main:\n" + cpuid(b"\x2e\x0f\xa2") + CPUID_LEAF
            + at_page_end("straddle_cpuid", b"\x48\x0f\xa2", 1, "rbx") + "    ret\n")
    report, events = run_traced(text, vm_type="tdx", vendor="intel")
    assert report.outcome == "done", report.detail
    assert report.syncs() == [KVM_SIGNATURE_EBX, KVM_SIGNATURE_EBX]
    assert not [e for e in events if e["event"] == "handle_exit" and e["name"] == "EXIT_REASON_CPUID"]


def compat_guest(insn: bytes, base: int, leaf: int = 0, msr: int = 0) -> str:
    """Run `insn` in 32-bit code whose segment is based at `base`, placed `base` bytes into a
    page (so that its RIP, taken as a linear address, points at REX bytes), with RSI = 5 and the
    registers for a CPUID of `leaf` or an RDMSR of `msr`; sync RSI, RAX and RBX after it."""
    return ("guest_main:\n    push rbx\n" + load_compat_segment(base)
            + f"    mov esi, 5\n    mov eax, {leaf:#x}\n    mov ecx, {msr:#x}\n    xor edx, edx\n"
            + far_return_to_compat("compat", base)
            + f".balign 4096\n.skip {base:#x}, 0x48\ncompat:\n    .byte {', '.join(f'0x{b:02x}' for b in insn)}\n"
            + far_return_to_64("back64")
            + "back64:\n    mov r12, rsi\n    GUEST_SYNC r12, rax, rbx\n    pop rbx\n    ret\n")


@pytest.mark.parametrize("base", [0, 0x1000])
@pytest.mark.parametrize("vm_type", ["default", "sev-es", "sev-snp"])
def test_in_32_bit_code_40_to_4f_are_inc_and_dec_not_rex(vm_type: str, base: int) -> None:
    """In compatibility mode 46 0F A2 is INC ESI then CPUID, and 46 0F 32 INC ESI then RDMSR:
    both run (ESI 5 -> 6), the CPUID (a #VC on SEV-ES/SNP, whose handler reads the instruction
    at CS.base + RIP) answers KVM's signature and the RDMSR the MSR's value, with or without a CS
    base, as the CPU runs them (intercepting 46 0F as a REX-prefixed instruction lost the INC)."""
    cpuid = run_guest("<compat>", VmOptions(vm_type=vm_type, memory=16 << 20, seed=1),
                      text=compat_guest(b"\x46\x0f\xa2", base, leaf=0x40000000))
    assert cpuid.outcome == "done", cpuid.detail
    rdmsr = run_guest("<compat>", VmOptions(vm_type=vm_type, memory=16 << 20, seed=1, enforce_pv_cpuid=False),
                      text=compat_guest(b"\x46\x0f\x32", base, msr=0x4B564D05))
    assert rdmsr.outcome == "done", rdmsr.detail
    (esi, _eax, ebx), = [u["args"][:3] for u in cpuid.ucalls if u["cmd"] == "sync"]
    assert (esi, ebx) == (6, KVM_SIGNATURE_EBX)
    (esi, eax, _ebx), = [u["args"][:3] for u in rdmsr.ucalls if u["cmd"] == "sync"]
    assert (esi, eax) == (6, 1)  # MSR_KVM_POLL_CONTROL starts at 1


@pytest.mark.parametrize("insn", [b"\xf0\x0f\xa2", b"\x2e\xf0\x0f\x32"], ids=["lock-cpuid", "lock-rdmsr"])
@pytest.mark.parametrize("vm_type", ["default", "sev-es", "sev-snp"])
def test_a_locked_cpuid_or_rdmsr_is_ud(vm_type: str, insn: bytes) -> None:
    """LOCK makes CPUID and RDMSR #UD (SDM vol. 2, LOCK: #UD on an instruction it cannot
    prefix), before any exit or #VC; Unicorn alone runs them."""
    text = "guest_main:\n" + CPUID_LEAF + f"    .byte {', '.join(f'0x{b:02x}' for b in insn)}\n    ret\n"
    report = run_guest("<lock>", VmOptions(vm_type=vm_type, memory=16 << 20, seed=1), text=text)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None and report.exception["vector"] == 6


@pytest.mark.parametrize("vm_type", ["sev-es", "sev-snp"])
def test_prefixed_msr_instructions_go_through_the_vc_handler(vm_type: str) -> None:
    """On SEV-ES/SNP a prefixed RDMSR/WRMSR of an MSR KVM handles (MSR_KVM_POLL_CONTROL) raises
    #VC (SVM_EXIT_MSR) and the runtime's handler finds the opcode past the prefixes and resumes
    after them: read 1, write 0, read 0."""
    text = """
guest_main:
    mov ecx, 0x4B564D05
    .byte 0x48, 0x0f, 0x32             # REX.W RDMSR
    GUEST_SYNC rax
    mov ecx, 0x4B564D05
    xor eax, eax
    xor edx, edx
    .byte 0x2e, 0x66, 0x48, 0x0f, 0x30 # CS, 66, REX.W WRMSR
    mov ecx, 0x4B564D05
    .byte 0xf3, 0x0f, 0x32             # REP RDMSR
    GUEST_SYNC rax
    ret
"""
    report, events = run_traced(text, vm_type=vm_type, enforce_pv_cpuid=False)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [1, 0]
    assert len([e for e in events if e["event"] == "vc" and e["error_code"] == 0x7C]) == 3


def test_an_instruction_across_a_page_end_that_is_no_site_costs_no_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A REX.W MOV whose 48 ends a page (89 C3 on the next) is not hooked when the next page is
    readable at the scan: a loop running it 2,000 times calls the site handler a handful of
    times (the boot's own sites), not once per iteration."""
    calls: list[int] = []
    real = Intercepts._on_site

    def counted(self: Intercepts, linear: int) -> None:
        calls.append(linear)
        real(self, linear)

    monkeypatch.setattr(Intercepts, "_on_site", counted)
    text = """
guest_main:
    mov rcx, 2000
    lea rdx, [rip + loop_top]
    jmp rdx
.balign 4096
.skip 4095, 0xcc
loop_top:
    .byte 0x48, 0x89, 0xc3             # mov rbx, rax: its REX.W on the page's last byte
    dec rcx
    jnz loop_top
    ret
"""
    report = run_guest("<loop>", VmOptions(memory=16 << 20, seed=1), text=text)
    assert report.outcome == "done", report.detail
    assert not [linear for linear in calls if linear & 0xFFF == 0xFFF]
    assert len(calls) < 50


# Code written at run time into a frame already run as code, through one address, then run
# through another: `site` and `site2` share a page run through the identity map (and, with
# PRERUN, through the alias PML4[1] = PML4[0] too); `mov ecx, SEV_STATUS; rdmsr; ret` is then
# written at site2 + WRITE and run at site2 + RUN.
NEW_CODE = int.from_bytes(bytes.fromhex("b9310101c00f32c3"), "little")  # mov ecx, 0xc0010131; rdmsr; ret


def written_code_guest(write: str, run: str, prerun: str) -> str:
    return "guest_main:\n" + ALIAS_MAP + f"""
    mov r12, 0x8000000000
    lea rbx, [rip + site]
    call rbx
    add rbx, {prerun}
    call rbx
    lea rdi, [rip + site2]
    add rdi, {write}
    movabs rax, {NEW_CODE:#x}
    mov qword ptr [rdi], rax
    lea rbx, [rip + site2]
    add rbx, {run}
    call rbx
    GUEST_SYNC rax
    ret
.balign 4096
site:
    ret
.skip 0x100
site2:
    ret
.skip 0x100, 0xcc
"""


@pytest.mark.parametrize(("write", "run", "prerun"), [("0", "0", "0"), ("r12", "0", "0"), ("0", "r12", "0"),
                                                      ("0", "r12", "r12"), ("r12", "0", "r12")],
                         ids=["same", "written-at-alias", "run-at-alias", "both-run-written-at-identity",
                              "both-run-written-at-alias"])
@pytest.mark.parametrize(("vm_type", "sev_status"), [("sev", 0x1), ("sev-snp", 0x7)])
def test_code_written_through_one_address_is_intercepted_through_another(
        vm_type: str, sev_status: int, write: str, run: str, prerun: str) -> None:
    """A guest write to a code frame takes execute away from every address that maps it, not
    only the one written through (the TLB is flushed before the next block): new code run
    through another address is fetched and scanned again, and its RDMSR of SEV_STATUS
    intercepted (an alias that kept its executable entry ran it unscanned and read 0)."""
    report = run_guest("<written>", VmOptions(vm_type=vm_type, memory=16 << 20, seed=1),
                       text=written_code_guest(write, run, prerun))
    assert report.outcome == "done", report.detail
    assert report.syncs() == [sev_status]


# IN with prefixes that change nothing in it but where it starts: a segment override, REX.W (IN
# EAX stays 32 bits), and 66 before a segment override (16 bits).
PREFIXED_IO = """
guest_main:
    xor eax, eax
pio_1:
    .byte 0x2e, 0xe4, 0x80             # CS IN AL, 0x80
    GUEST_SYNC rax
    xor eax, eax
pio_2:
    .byte 0x48, 0xe5, 0x80             # REX.W IN EAX, 0x80
    GUEST_SYNC rax
    xor eax, eax
    mov edx, 0x80
pio_3:
    .byte 0x66, 0x2e, 0xed             # 66 CS IN AX, DX
    GUEST_SYNC rax
    ret
"""


@pytest.mark.parametrize(("vm_type", "vendor"), [("default", "amd"), ("sev", "amd"), ("sev-es", "amd"),
                                                 ("sev-snp", "amd"), ("tdx", "intel")])
def test_an_in_with_prefixes_is_intercepted_at_its_first_prefix(vm_type: str, vendor: str) -> None:
    """IN with a segment override, REX.W or 66 before another prefix exits (on SEV-ES/SNP through
    #VC IOIO, whose handler decodes the prefixes; in a TD through #VE) with the size the opcode
    and 66 give, and the guest resumes after the whole instruction: port 0x80 reads all ones
    of that size (1, 4, 2 bytes)."""
    trace = io.StringIO()
    options = VmOptions(vm_type=vm_type, vendor=vendor, memory=16 << 20, seed=1, trace=trace)
    with Machine(build_program("<pio>", options, text=PREFIXED_IO), options) as machine:
        report = machine.run()
        ins = {machine.program.symbols[f"pio_{i}"] for i in (1, 2, 3)}
    assert report.outcome == "done", report.detail
    assert report.syncs() == [0xFF, 0xFFFFFFFF, 0xFFFF]
    events = events_of(trace)
    assert [e["size"] for e in events if e["event"] == "exit" and e.get("port") == 0x80] == [1, 4, 2]
    if vm_type in ("sev-es", "sev-snp"):
        assert {e["rip"] for e in events if e["event"] == "vc" and e["error_code"] == 0x7B} >= ins
    if vm_type == "tdx":
        assert {e["rip"] for e in events if e["event"] == "deliver" and e["name"] == "#VE"} >= ins


# IN AL, DX after 14 prefixes: 15 bytes, the longest instruction there is (Intel SDM Vol. 2A
# §2.1: "The maximum length of an Intel 64 and IA-32 instruction remains 15 bytes"; AMD APM
# Vol. 3 §1.1), mid-page and with its prefixes ending a page.
LONGEST_IN_BYTES = ", ".join(["0x2e"] * 14 + ["0xec"])
LONGEST_IN = f"""
guest_main:
    mov edx, 0x80
    xor eax, eax
longest_in_1:
    .byte {LONGEST_IN_BYTES}
    GUEST_SYNC rax
    lea rax, [rip + before_longest_in_2]
    jmp rax
.balign 4096
.skip 4096 - 14 - 7, 0xcc
before_longest_in_2:
    mov edx, 0x80                      # 5 bytes
    xor eax, eax                       # 2 bytes: the 14 prefixes end the page
longest_in_2:
    .byte {LONGEST_IN_BYTES}
    GUEST_SYNC rax
    ret
"""


@pytest.mark.parametrize(("vm_type", "vendor"), [("default", "amd"), ("sev-es", "amd"), ("sev-snp", "amd"),
                                                 ("tdx", "intel")])
def test_an_in_with_fourteen_prefixes_is_intercepted(vm_type: str, vendor: str) -> None:
    """IN AL, DX after 14 prefixes (15 bytes) exits like any IN, mid-page and across a page end:
    on SEV-ES/SNP through #VC IOIO at its first prefix (the runtime's decoder skips all 14), in a
    TD through #VE; port 0x80 reads 0xff each time (the scan stopped at 13 prefixes, and
    Unicorn ran it without #VC)."""
    trace = io.StringIO()
    options = VmOptions(vm_type=vm_type, vendor=vendor, memory=16 << 20, seed=1, trace=trace)
    with Machine(build_program("<longest>", options, text=LONGEST_IN), options) as machine:
        report = machine.run()
        ins = {machine.program.symbols[f"longest_in_{i}"] for i in (1, 2)}
    assert report.outcome == "done", report.detail
    assert report.syncs() == [0xFF, 0xFF]
    events = events_of(trace)
    assert [e["size"] for e in events if e["event"] == "exit" and e.get("port") == 0x80] == [1, 1]
    if vm_type in ("sev-es", "sev-snp"):
        assert {e["rip"] for e in events if e["event"] == "vc" and e["error_code"] == 0x7B} == ins
    if vm_type == "tdx":
        assert {e["rip"] for e in events if e["event"] == "deliver" and e["name"] == "#VE"} >= ins


@pytest.mark.parametrize("insn", [b"\x2e" * 15 + b"\xec", b"\x2e" * 14 + b"\x0f\x32", b"\x2e" * 14 + b"\xe4\x80"],
                         ids=["in-dx", "rdmsr", "in-imm8"])
def test_an_instruction_longer_than_fifteen_bytes_is_gp_not_an_intercept(insn: bytes) -> None:
    """16 bytes (15 prefixes before IN AL, DX; 14 before RDMSR or IN AL, imm8) exceed the length
    limit: #GP(0) at its first byte (Intel SDM Vol. 3A §6.15, #GP: "exceeding the instruction
    length limit of 15 bytes"), before any intercept - no #VC on SEV-ES, no exit."""
    text = ("guest_main:\n    mov edx, 0x80\n    mov ecx, 0xC0010131\ntoo_long:\n    .byte "
            + ", ".join(f"0x{b:02x}" for b in insn) + "\n    ret\n")
    report, events = run_traced(text, vm_type="sev-es")
    assert report.outcome == "unhandled_exception"
    assert "(too_long+0x0): unexpected #GP (error code 0x0)" in report.detail
    assert not [e for e in events if e["event"] == "vc" and e["error_code"] in (0x7B, 0x7C)]


# One frame (RET, then 600 IN AL, DX: sites on every VM) run through K aliases, a byte written
# into it before each call: each write asks for a W^X flush and each call scans the frame at a
# new address, in the same block.
MANY_ALIASES = """
guest_main:
    push rbx
    mov rdi, RT_PT_BASE                # PML4[1..K] = PML4[0]: (k << 39) + x maps x
    mov rax, qword ptr [rdi]
    mov rcx, 1
1:  mov qword ptr [rdi + rcx*8], rax
    inc rcx
    cmp rcx, K
    jbe 1b
    mov rax, cr3
    mov cr3, rax
    mov rdi, GUEST_FREE_GPA
    mov byte ptr [rdi], 0xc3
    lea rdi, [rdi + 1]
    mov al, 0xec
    mov rcx, 600
    rep stosb
    mov rdi, GUEST_FREE_GPA
    mov rbx, rdi
    call rbx
    mov r12, 0x8000000000
    mov r13, K
2:  mov byte ptr [rdi + 0x800], 0xec
    add rbx, r12
    call rbx
    dec r13
    jnz 2b
    pop rbx
    ret
"""


def test_site_hooks_stay_bounded_when_a_tlb_flush_is_pending() -> None:
    """A scan past MAX_SITE_HOOKS asks for the reset also while a W^X flush's stop hook is
    installed (the two share it): 40 aliases of a frame with 600 sites, each written into before
    it is run, keep the hooks within the bound plus one page's sites, with resets."""
    options = VmOptions(memory=16 << 20, seed=1, defines={"K": 40})
    with Machine(build_program("<aliases>", options, text=MANY_ALIASES), options) as machine:
        report = machine.run()
        assert report.outcome == "done", report.detail
        assert machine.cpu.site_hook_resets > 0
        assert machine.cpu.site_hooks_peak <= MAX_SITE_HOOKS + PAGE_SIZE


def test_no_tlb_flush_is_left_pending_when_a_run_ends() -> None:
    """A guest writing a data word in the page it runs from asks for a W^X flush on each pass;
    a run that ends (here at its timeout) has done it, so nothing is pending and the machine
    can be snapshotted (a pending hardware event refuses it)."""
    spin = """
guest_main:
    lea rdi, [rip + spin]
    jmp rdi
.balign 4096
spin:
    mov qword ptr [rip + word], rax
    jmp spin_next
spin_next:
    pause
    jmp spin
word: .quad 0
"""
    with testbed.Vm(memory="16M", timeout=0.1) as vm:
        vcpu = vm.load("<spin>", text=spin)
        with pytest.raises(VmTimeoutError):
            vcpu.run(0.1)
        cpu = vm.machine.cpu
        assert not cpu._tlb_flush_pending and cpu._stop_hook is None
        vm.snapshot()


CACHE_FLUSH = "guest_main:\n    {insn}\n    GUEST_SYNC 1\n    ret\n"


@pytest.mark.parametrize(("vm_type", "vendor", "exit_name"), [
    ("default", "amd", "SVM_EXIT_WBINVD"), ("default", "intel", "EXIT_REASON_WBINVD"),
    ("sev", "amd", "SVM_EXIT_WBINVD")])
def test_wbinvd_and_invd_exit_and_kvm_skips_them(vm_type: str, vendor: str, exit_name: str) -> None:
    """WBINVD and INVD exit to KVM (svm.c init_vmcb intercepts both; VMX exits unconditionally),
    which skips them: kvm_emulate_wbinvd(), invd_interception() / kvm_emulate_invd() (Unicorn
    ran them without an exit)."""
    for insn, name in (("wbinvd", exit_name), ("invd", exit_name.replace("WBINVD", "INVD"))):
        report, events = run_traced(CACHE_FLUSH.format(insn=insn), vm_type=vm_type, vendor=vendor)
        assert report.outcome == "done", report.detail
        assert report.syncs() == [1]
        assert name in [e["name"] for e in events if e["event"] == "handle_exit"]


@pytest.mark.parametrize("vm_type", ["sev-es", "sev-snp"])
def test_wbinvd_is_a_vc_the_runtime_forwards_and_invd_one_it_refuses(vm_type: str) -> None:
    """On SEV-ES/SNP WBINVD raises #VC SVM_EXIT_WBINVD, which the runtime forwards through the
    GHCB (Linux's vc_handle_wbinvd) and the guest goes on; INVD raises #VC SVM_EXIT_INVD, which
    Linux refuses ("#VC exception for INVD??? Seriously???", ES_UNSUPPORTED): unhandled."""
    report, events = run_traced(CACHE_FLUSH.format(insn="wbinvd"), vm_type=vm_type)
    assert report.outcome == "done", report.detail
    assert [e for e in events if e["event"] == "vc" and e["error_code"] == 0x89]
    report, _ = run_traced(CACHE_FLUSH.format(insn="invd"), vm_type=vm_type)
    assert report.outcome == "unhandled_exception"
    assert "unexpected #VC (error code 0x76)" in report.detail


@pytest.mark.parametrize(("insn", "reason"), [("wbinvd", 54), ("invd", 13)])
def test_wbinvd_and_invd_in_a_td_are_ve_the_runtime_refuses(insn: str, reason: int) -> None:
    """In a TD WBINVD and INVD are #VE (the TDX module's td_generic_ve_exit), which Linux's
    virt_exception_kernel does not handle: unhandled, with the exit reason as error code."""
    report, _ = run_traced(CACHE_FLUSH.format(insn=insn), vm_type="tdx", vendor="intel")
    assert report.outcome == "unhandled_exception"
    assert f"unexpected #VE (exit reason {reason}) at rip" in report.detail


@pytest.mark.parametrize(("insn", "vm_types"), [
    ("rdpmc", ["default", "sev", "sev-es", "tdx"]), ("rdtscp", ["default", "sev-es"]),
    ("monitor", ["default", "sev-snp"]), ("mwait", ["default", "sev-es"]),
    ("mov dr7, rax", ["sev-es", "sev-snp"]), ("mov rax, dr7", ["sev-es"])])
def test_instructions_the_model_lacks_end_the_run_naming_them(insn: str, vm_types: list[str]) -> None:
    """RDPMC, RDTSCP, MONITOR/MWAIT and (on SEV-ES/SNP) MOV to/from DR7 are intercepted by real
    KVM or raise #VC, where Unicorn would run them (RDTSCP, DR7: a silently wrong answer) or
    raise #UD: the run ends as internal_error naming the instruction, before it executes."""
    name = "MOV to/from DR7" if insn.startswith("mov") else insn.upper()
    for vm_type in vm_types:
        vendor = "intel" if vm_type == "tdx" else "amd"
        report, _ = run_traced(CACHE_FLUSH.format(insn=insn), vm_type=vm_type, vendor=vendor)
        assert report.outcome == "internal_error", (vm_type, report.detail)
        assert f"emulator: {name}" in report.detail and "is not modelled" in report.detail
        assert report.syncs() == []


@pytest.mark.parametrize(("insn", "vm_type", "vendor", "expected"), [
    ("rdtscp", "tdx", "intel", "done"), ("monitor", "tdx", "intel", "#UD"),
    ("mov dr7, rax", "default", "amd", "done"), ("mov dr0, rax", "sev-es", "amd", "done")])
def test_where_unicorn_matches_the_hardware_it_still_runs_them(insn: str, vm_type: str, vendor: str,
                                                               expected: str) -> None:
    """Where Unicorn's own behaviour is the real one it is kept: RDTSCP in a TD (the module lets
    it run), MONITOR in a TD (#UD), MOV DR7 on a plain VM (KVM emulates it alike), MOV DR0-3
    on SEV-ES (not intercepted)."""
    report, _ = run_traced(CACHE_FLUSH.format(insn=insn), vm_type=vm_type, vendor=vendor)
    if expected == "done":
        assert report.outcome == "done", report.detail
    else:
        assert report.outcome == "unhandled_exception" and f"unexpected {expected}" in report.detail


@pytest.mark.parametrize(("vm_type", "vendor"), [("default", "amd"), ("default", "intel"), ("tdx", "intel")])
def test_the_tsc_msr_ends_the_run_instead_of_reading_zero(vm_type: str, vendor: str) -> None:
    """RDMSR/WRMSR of IA32_TSC (0x10), which KVM passes to the emulator, ends the run as not
    modelled: Unicorn reads it as 0 and drops writes while RDTSC counts on, where the hardware
    has one counter (SDM vol. 3B 18.17); RDTSC itself runs."""
    for access in ("rdmsr", "wrmsr"):
        text = f"guest_main:\n    rdtsc\n    GUEST_SYNC 1\n    mov ecx, 0x10\n    {access}\n    GUEST_SYNC 2\n    ret\n"
        report, _ = run_traced(text, vm_type=vm_type, vendor=vendor)
        assert report.outcome == "internal_error" and report.syncs() == [1]
        assert f"emulator: {access.upper()} of IA32_TSC is not modelled" in report.detail


USER_IN = """
guest_main:
{iopl}    GUEST_RUN_USER user_in
    GUEST_SYNC rax
    ret
user_in:
    mov dx, 0x80
    in al, dx
    ret
"""
RAISE_IOPL = "    pushfq\n    or qword ptr [rsp], 0x3000\n    popfq\n"


@pytest.mark.parametrize(("vm_type", "vendor"), [("default", "amd"), ("default", "intel"), ("sev-es", "amd"),
                                                 ("tdx", "intel")])
def test_port_io_at_cpl3_above_iopl_is_gp_before_any_exit(vm_type: str, vendor: str) -> None:
    """An IN at CPL 3 with IOPL 0 is #GP(0) - the runtime's TSS maps no I/O permission bits, as
    Linux's (IO_BITMAP_OFFSET_INVALID) - and the fault comes before the intercept (SDM vol. 3C
    26.1.1: no exit, #VC or #VE); with IOPL raised to 3 the IN exits (port 0x80 reads 0xff)."""
    report, events = run_traced(USER_IN.format(iopl=""), vm_type=vm_type, vendor=vendor)
    assert report.outcome == "unhandled_exception"
    assert "(user_in+0x4): unexpected #GP (error code 0x0)" in report.detail
    assert not [e for e in events if e.get("port") == 0x80]
    if vm_type != "tdx":  # Linux's #VE handler refuses port I/O from user mode
        report, _ = run_traced(USER_IN.format(iopl=RAISE_IOPL), vm_type=vm_type, vendor=vendor)
        assert report.outcome == "done", report.detail
        assert [value & 0xFF for value in report.syncs()] == [0xFF]


USER_INSN = "guest_main:\n    GUEST_RUN_USER user_fn\n    GUEST_SYNC 1\n    ret\nuser_fn:\n    {insn}\n    ret\n"


@pytest.mark.parametrize(("insn", "vector"), [
    ("wbinvd", "#GP"), ("invd", "#GP"), ("mov dr7, rax", "#GP"), ("mov ecx, 0xC0010131\n    rdmsr", "#GP"),
    ("rdpmc", "#GP"), ("monitor", "#UD")], ids=["wbinvd", "invd", "dr7", "rdmsr-sev-status", "rdpmc", "monitor"])
@pytest.mark.parametrize(("vm_type", "vendor"), [("default", "amd"), ("sev-es", "amd"), ("tdx", "intel")])
def test_privileged_sites_at_cpl3_fault_before_any_intercept(insn: str, vector: str, vm_type: str,
                                                             vendor: str) -> None:
    """A privileged instruction at CPL 3 faults before it is intercepted (SDM vol. 3C 26.1.1):
    WBINVD, INVD, MOV DR7 and RDMSR (of SEV_STATUS too, which SEV-ES's hardware answered) #GP,
    RDPMC #GP without CR4.PCE, MONITOR #UD - no exit, #VC, #VE or refusal."""
    report, events = run_traced(USER_INSN.format(insn=insn), vm_type=vm_type, vendor=vendor)
    assert report.outcome == "unhandled_exception", report.detail
    code = " (error code 0x0)" if vector == "#GP" else ""  # #UD pushes none
    assert f"unexpected {vector}{code} at rip" in report.detail and "(user_fn+0x" in report.detail
    assert not [e for e in events if e["event"] == "vc" and e["error_code"] not in (0x72, 0x7B)]


def test_mov_dr_with_rex_r_is_no_dr7_on_sev_es() -> None:
    """MOV from DR15 (REX.R with ModRM.reg 7) is #UD, not the DR7 SEV-ES intercepts: left to
    Unicorn's #UD, as on a plain VM."""
    report, _ = run_traced("guest_main:\n    .byte 0x44, 0x0f, 0x21, 0xf8\n    ret\n", vm_type="sev-es")
    assert report.outcome == "unhandled_exception"
    assert "(guest_main+0x0): unexpected #UD" in report.detail


def test_pvalidate_at_cpl3_is_gp() -> None:
    """PVALIDATE is a CPL-0 instruction (AMD APM vol. 3, PVALIDATE: #GP(0) if CPL != 0): at CPL 3
    it faults and validates nothing (it rescinded the page)."""
    text = ("guest_main:\n    GUEST_RUN_USER user_fn\n    GUEST_SYNC rax\n    ret\nuser_fn:\n"
            "    mov rax, GUEST_FREE_GPA\n    xor ecx, ecx\n    xor edx, edx\n"
            "    .byte 0xf2, 0x0f, 0x01, 0xff       # PVALIDATE\n    ret\n")
    report, events = run_traced(text, vm_type="sev-snp")
    assert report.outcome == "unhandled_exception"
    assert "(user_fn+0xb): unexpected #GP (error code 0x0)" in report.detail
    free = Layout(16 << 20).defines()["GUEST_FREE_GPA"]
    assert not [e for e in events if e["event"] == "pvalidate" and e["gpa"] == free and not e["validate"]]


@pytest.mark.parametrize("vm_type", ["default", "sev-es"])
def test_rdtscp_at_cpl3_with_cr4_tsd_is_gp(vm_type: str) -> None:
    """RDTSCP at CPL 3 with CR4.TSD set is #GP(0) before any intercept (it ended the run as
    not modelled)."""
    text = ("guest_main:\n    mov rax, cr4\n    or rax, 4\n    mov cr4, rax\n    GUEST_RUN_USER user_fn\n"
            "    GUEST_SYNC 1\n    ret\nuser_fn:\n    rdtscp\n    ret\n")
    report, _ = run_traced(text, vm_type=vm_type)
    assert report.outcome == "unhandled_exception"
    assert "(user_fn+0x0): unexpected #GP (error code 0x0)" in report.detail


# The last byte of a page is 0F and the next page starts 90 C0 C3 (SETO AL; RET) when the page is
# first run and scanned; the guest then writes 32 C3 there (0F 32: RDMSR across the page end),
# does `between`, and runs it.
NEXT_PAGE_CHANGES = """
guest_main:
    lea rbx, [rip + tail]
    call rbx
    lea rdi, [rip + nextpage]
    mov word ptr [rdi], 0xc332
{between}    mov ecx, 0xC0010131
    xor eax, eax
    call rbx
    GUEST_SYNC rax
    ret
.balign 4096
.skip 4095, 0x90
tail:
    .byte 0x0f
nextpage:
    .byte 0x90, 0xc0, 0xc3
"""


@pytest.mark.parametrize("fill", ["c", "python"])
@pytest.mark.parametrize(("vm_type", "sev_status"), [("sev", 0x1), ("sev-snp", 0x7)])
def test_a_site_completed_by_a_later_write_to_the_next_page_is_intercepted(
        vm_type: str, sev_status: int, fill: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page whose last byte could begin a site that the next page does not complete yet is
    scanned again at each fetch fill, and the next page's frame is write-protected like code:
    the guest's write that turns 0F | 90 into 0F | 32 flushes the TLB, the page is scanned again
    with the new bytes, and the RDMSR of SEV_STATUS across the page end is intercepted (it read
    0: hooked by what the next page held at the first scan) - C and Python fills."""
    if fill == "python":
        monkeypatch.setenv("TESTBED_NO_NATIVE_MMU", "1")
    report = run_guest("<next>", VmOptions(vm_type=vm_type, memory=16 << 20, seed=1),
                       text=NEXT_PAGE_CHANGES.format(between=""))
    assert report.outcome == "done", report.detail
    assert report.syncs() == [sev_status]


# As NEXT_PAGE_CHANGES, with a data read of the first page between the write and the run.
READ_AFTER_NEXT_PAGE_CHANGES = NEXT_PAGE_CHANGES.format(between="    jmp 1f\n1:  mov al, byte ptr [rbx]\n")

#: mov ecx, 0xC0010131; rdmsr; ret - written over a RET as one qword
RDMSR_CODE = int.from_bytes(bytes.fromhex("b9310101c00f32c3"), "little")
# A frame written through the alias (a writable entry there), then run for the first time through
# the identity map, then rewritten through the alias and run again through the identity map.
WRITTEN_BEFORE_IT_WAS_CODE = "guest_main:\n" + ALIAS_MAP + f"""
    mov rdi, GUEST_FREE_GPA
    mov byte ptr [rdi], 0xc3
    mov byte ptr [rdi + 0x100], 0xc3
    mov r12, 0x8000000000
    add rdi, r12
    mov byte ptr [rdi + 0x80], 0xcc
    mov rbx, GUEST_FREE_GPA
    call rbx
    movabs rax, {RDMSR_CODE:#x}
    mov qword ptr [rdi + 0x100], rax
    add rbx, 0x100
    xor eax, eax
    call rbx
    GUEST_SYNC rax
    ret
"""


@pytest.mark.parametrize("fill", ["c", "python"])
@pytest.mark.parametrize("text", [READ_AFTER_NEXT_PAGE_CHANGES, WRITTEN_BEFORE_IT_WAS_CODE],
                         ids=["read-of-a-watching-page", "writable-elsewhere-before-it-was-code"])
@pytest.mark.parametrize(("vm_type", "sev_status"), [("sev", 0x1), ("sev-snp", 0x7)])
def test_no_fill_makes_new_code_executable_unscanned(vm_type: str, sev_status: int, text: str, fill: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Execute is given by a data read only to a frame recorded as scanned (a page watching its
    next one, or rewritten, is fetched and rescanned first), and a frame that becomes code has
    its writable entries elsewhere flushed (a write through one would not trap): the RDMSR of
    SEV_STATUS written into code is intercepted in both cases (it read 0), C and Python fills."""
    if fill == "python":
        monkeypatch.setenv("TESTBED_NO_NATIVE_MMU", "1")
    report = run_guest("<newcode>", VmOptions(vm_type=vm_type, memory=16 << 20, seed=1), text=text)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [sev_status]


# Code run once at a page's start, then entered again at its end, from where it falls through into
# the next page, never run before, whose first instruction is HLT: one translated block over both.
HLT_ON_A_NEW_PAGE = """
guest_main:
    lea rax, [rip + page_start]
    call rax
    lea rax, [rip + near_end]
    jmp rax
.balign 4096
page_start:
    ret
.skip 4093, 0xcc
near_end:
    nop
    nop
    hlt
    GUEST_DONE
.balign 4096
"""


@pytest.mark.parametrize("fill", ["c", "python"])
@pytest.mark.parametrize(("vm_type", "vendor"), [("default", "amd"), ("sev-snp", "amd"), ("tdx", "intel")])
def test_a_flush_asked_for_while_translating_a_block_does_not_skip_its_hlt(
        vm_type: str, vendor: str, fill: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TLB flush asked for during the translation of the block that then runs (the fetch fill of
    its second page makes that frame code) does not make the run loop resume past what the block
    did: its HLT still ends the run as halted (the loop took any pending flush as a stop before
    the block and ran on to GUEST_DONE)."""
    if fill == "python":
        monkeypatch.setenv("TESTBED_NO_NATIVE_MMU", "1")
    report = run_guest("<hlt>", VmOptions(vm_type=vm_type, vendor=vendor, memory=16 << 20, seed=1, timeout=3),
                       text=HLT_ON_A_NEW_PAGE)
    assert report.outcome == "timeout"
    assert report.detail.startswith("vCPU halted")


def _unmemoised_sites(page: bytes, sev_es: bool, cpuid_sites: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    saved = dict(intercepts._PAGE_SITES_MEMO)
    intercepts._PAGE_SITES_MEMO.clear()
    try:
        return intercepts._page_sites(page, sev_es, cpuid_sites)
    finally:
        intercepts._PAGE_SITES_MEMO.clear()
        intercepts._PAGE_SITES_MEMO.update(saved)


def test_page_sites_are_answered_by_contents_and_vm_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan's per-page answer is kept by page contents and the two VM-type flags it reads: a
    remembered answer is the one computed afresh, a page under other flags (MOV DR7 on SEV-ES,
    CPUID without LOCK) gets its own, and the memory stays at its bound."""
    monkeypatch.setattr(intercepts, "_PAGE_SITES_MEMO", type(intercepts._PAGE_SITES_MEMO)())
    page = bytearray(PAGE_SIZE)
    page[100:103] = b"\x0f\x21\xf8"  # MOV RAX, DR7: a site on SEV-ES/SNP only
    page[200:202] = b"\x0f\xa2"  # CPUID: a site on SEV-ES/SNP and TDX only (no LOCK)
    page[300:303] = b"\x66\x0f\x32"  # RDMSR behind a prefix: two starts
    page[PAGE_SIZE - 2:] = b"\x48\x0f"  # may begin a site the next page completes
    page_bytes = bytes(page)
    answers = {}
    for flags in [(False, False), (True, True), (False, True)]:
        first = intercepts._page_sites(page_bytes, *flags)
        assert intercepts._page_sites(bytes(page), *flags) == first == _unmemoised_sites(page_bytes, *flags)
        answers[flags] = first
    assert answers[(False, False)][0] == (300, 301)
    assert answers[(False, True)][0] == (200, 300, 301)
    assert answers[(True, True)][0] == (100, 200, 300, 301)
    assert answers[(True, True)][1] == (PAGE_SIZE - 2, PAGE_SIZE - 1)
    for n in range(intercepts._PAGE_SITES_MEMO_SIZE + 10):
        intercepts._page_sites(n.to_bytes(4, "little") + bytes(PAGE_SIZE - 4), False, False)
    assert len(intercepts._PAGE_SITES_MEMO) == intercepts._PAGE_SITES_MEMO_SIZE
