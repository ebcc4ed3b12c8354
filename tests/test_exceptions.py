"""Exception delivery by the hardware model (testbed/hw/events.py) through the guest's IDT.

Scenarios (guests/exceptions_*.s):
1. Unhandled faults (#DE, #UD, #GP, #PF read/write, #BP) reach the runtime's default handler,
   which reports vector, error code and saved RIP: outcome "unhandled_exception"; a fault
   saves the faulting instruction's RIP, a trap (int3) the next one (SDM vol. 3 6.5).
2. #PF error codes and CR2 follow SDM vol. 3 4.7: not-present read 0, write 2; CR2 holds the
   faulting linear address.
3. Handled faults resume; several in a row each arrive with their own vector, never #DF:
   the Unicorn old_exception workaround (tests/test_unicorn_canary.py pins the quirk).
4. A fault with an unusable IDT escalates to a triple fault: outcome "shutdown".
5. An `int` from CPL 3 through a DPL-3 gate to a CPL-0 handler runs the handler at CPL 0
   (GUEST_RUN_USER's way back).
"""

from __future__ import annotations

import pytest

from testbed.asm import Program
from testbed.hw.exits import Vendor
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program
from testbed.vmm.vmm import RunReport

MEMORY = 16 << 20
DE, BP, UD, DF, GP, PF = 0, 3, 6, 8, 13, 14
PFERR_WRITE = 1 << 1

VENDORS = pytest.mark.parametrize("vendor", list(Vendor), ids=[v.value for v in Vendor])


def run(guest: str, vendor: Vendor = Vendor.AMD, text: str | None = None, **defines: int) -> tuple[Program, RunReport]:
    """Assemble and run guests/<guest>; returns the program (for its labels) and the report."""
    options = VmOptions(vendor=vendor, memory=MEMORY, timeout=5.0, defines=dict(defines))
    program = build_program(GUESTS_DIR / guest, options, text=text)
    return program, Machine(program, options).run()


def unhandled(fault: int, vendor: Vendor) -> tuple[Program, dict[str, int]]:
    """Run guests/exceptions_unhandled.s with FAULT=`fault`; returns the program and the exception."""
    program, report = run("exceptions_unhandled.s", vendor, FAULT=fault)
    assert report.outcome == "unhandled_exception", f"{report.outcome}: {report.detail}"
    assert report.exception is not None
    assert report.syncs() == [], "the guest ran past the faulting instruction"
    return program, report.exception


def check(exc: dict[str, int], vector: int, error_code: int | None, rip: int) -> None:
    """Compare a reported exception with the expected one, in hex."""
    got = (exc["vector"], exc["error_code"], exc["rip"])
    assert got == (vector, error_code, rip), (
        f"got vector {got[0]} error 0x{got[1]:x} rip 0x{got[2]:x}; "
        f"expected vector {vector} error {error_code} rip 0x{rip:x}"
    )


# ---------------------------------------------------------------------------- unhandled


@VENDORS
def test_unhandled_de_reports_vector_0_at_the_div(vendor: Vendor) -> None:
    """Division by zero raises #DE (vector 0, no error code) with RIP at the div (SDM vol. 3 6.15)."""
    program, exc = unhandled(0, vendor)
    check(exc, DE, None, program.symbols["fault_site"])


@VENDORS
def test_unhandled_ud2_reports_vector_6_at_the_ud2(vendor: Vendor) -> None:
    """ud2 raises #UD (vector 6) with RIP at the ud2, also when KVM intercepts #UD and re-injects it."""
    program, exc = unhandled(1, vendor)
    check(exc, UD, None, program.symbols["fault_site"])


@VENDORS
def test_unhandled_gp_error_code_is_the_selector(vendor: Vendor) -> None:
    """Loading GDT selector 0x1230 beyond the GDT limit raises #GP(0x1230) at the mov (SDM vol. 3 6.15, #GP)."""
    program, exc = unhandled(2, vendor)
    check(exc, GP, 0x1230, program.symbols["fault_site"])


@VENDORS
def test_unhandled_gp_for_non_canonical_address(vendor: Vendor) -> None:
    """A data access through non-canonical 0x8000000000000000 raises #GP(0), not #PF (SDM vol. 3 6.15)."""
    program, exc = unhandled(6, vendor)
    check(exc, GP, 0, program.symbols["fault_site"])


@VENDORS
def test_unhandled_pf_read_of_frame_0(vendor: Vendor) -> None:
    """A read of unmapped frame 0 raises #PF with error code 0 (not present, read, supervisor)."""
    program, exc = unhandled(3, vendor)
    check(exc, PF, 0, program.symbols["fault_site"])


@VENDORS
def test_unhandled_pf_write_to_frame_0(vendor: Vendor) -> None:
    """A write to unmapped frame 0 raises #PF with error code 2 (not present, write, supervisor)."""
    program, exc = unhandled(4, vendor)
    check(exc, PF, PFERR_WRITE, program.symbols["fault_site"])


@VENDORS
def test_unhandled_int3_is_a_trap(vendor: Vendor) -> None:
    """int3 raises #BP (vector 3) with the saved RIP after the int3: it is a trap (SDM vol. 3 6.5)."""
    program, exc = unhandled(5, vendor)
    assert program.symbols["fault_site_next"] == program.symbols["fault_site"] + 1
    check(exc, BP, None, program.symbols["fault_site_next"])


# --------------------------------------------------------------------------------- #PF


PF_CR2_GUEST = """
.equ FAULT_ADDR, {addr:#x}
guest_main:
    GUEST_SET_HANDLER PF_VECTOR, guest_pf_handler
    mov rax, FAULT_ADDR
fault_site:
    {insn}
    GUEST_SYNC 0x600d
    ret

# Sync CR2 and the error code, then skip the 3-byte faulting mov.
guest_pf_handler:
    mov rax, cr2
    GUEST_SYNC rax
    mov rax, qword ptr [rdi + EX_ERROR_CODE]
    GUEST_SYNC rax
    mov rax, qword ptr [rdi + EX_RIP]
    GUEST_SYNC rax
    add qword ptr [rdi + EX_RIP], 3
    ret
"""


@VENDORS
@pytest.mark.parametrize(
    ("addr", "insn", "error_code"),
    [
        (0x0, "mov rbx, qword ptr [rax]", 0),
        (0x0, "mov qword ptr [rax], rbx", PFERR_WRITE),
        (0x88, "mov rbx, qword ptr [rax]", 0),
        (0xFF8, "mov qword ptr [rax], rbx", PFERR_WRITE),
    ],
    ids=["read_0", "write_0", "read_0x88", "write_0xff8"],
)
def test_pf_handler_sees_cr2_and_error_code(vendor: Vendor, addr: int, insn: str, error_code: int) -> None:
    """A #PF handler reads the faulting linear address in CR2 and the error code, then resumes."""
    program, report = run("exceptions_pf_cr2.s", vendor, text=PF_CR2_GUEST.format(addr=addr, insn=insn))
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    cr2, err, rip, *rest = report.syncs()
    assert rest == [0x600D], "the guest did not resume after the handler"
    assert rip == program.symbols["fault_site"], f"saved RIP 0x{rip:x}, expected 0x{program.symbols['fault_site']:x}"
    assert err == error_code, f"error code 0x{err:x}, expected 0x{error_code:x}"
    assert cr2 == addr, f"CR2 0x{cr2:x}, expected the faulting address 0x{addr:x}"


# ----------------------------------------------------------------------------- handled


@VENDORS
def test_faults_in_a_row_each_arrive_with_their_own_vector(vendor: Vendor) -> None:
    """#DE, #DE, #GP, #UD, #PF, #PF, #BP, #DE in a row each reach the handler as themselves, never #DF."""
    program, report = run("exceptions_handled.s", vendor)
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    sym = program.symbols
    expected = [
        (DE, sym["site_de1"]),
        (DE, sym["site_de2"]),
        (GP, sym["site_gp"]),
        (UD, sym["site_ud"]),
        (PF, sym["site_pf_read"]),
        (PF, sym["site_pf_write"]),
        (BP, sym["site_bp_next"]),
        (DE, sym["site_de3"]),
    ]
    # Each fault syncs vector, error code, RIP (and CR2 for #PF); the guest then syncs 0x600d0 + i.
    got: list[tuple[int, int]] = []
    record: list[int] = []
    for value in report.syncs():
        if value == 0x600D0 + len(got):
            assert len(record) >= 3, f"fault {len(got)}: handler synced {[hex(v) for v in record]}"
            got.append((record[0], record[2]))
            record = []
        else:
            record.append(value)
    assert record == [], f"trailing syncs {[hex(v) for v in record]}"
    assert got == expected, (
        "got " + ", ".join(f"(vector {v}, rip 0x{r:x})" for v, r in got)
        + "; expected " + ", ".join(f"(vector {v}, rip 0x{r:x})" for v, r in expected)
    )
    assert DF not in [v for v, _ in got]


@VENDORS
def test_handled_pf_error_codes_in_sequence(vendor: Vendor) -> None:
    """In the sequence, the read #PF has error code 0 and the write #PF error code 2."""
    _, report = run("exceptions_handled.s", vendor)
    syncs = report.syncs()
    read = syncs[syncs.index(0x600D3) + 1 : syncs.index(0x600D4)]
    write = syncs[syncs.index(0x600D4) + 1 : syncs.index(0x600D5)]
    assert read[:2] == [PF, 0], f"read #PF synced {[hex(v) for v in read]}"
    assert write[:2] == [PF, PFERR_WRITE], f"write #PF synced {[hex(v) for v in write]}"


# ------------------------------------------------------------------------- triple fault


@VENDORS
@pytest.mark.parametrize("fault_kind", [0, 1], ids=["ud2", "div0"])
def test_fault_with_idt_limit_0_is_a_triple_fault(vendor: Vendor, fault_kind: int) -> None:
    """With an IDT of limit 0 a fault escalates #GP -> #DF -> shutdown (KVM_EXIT_SHUTDOWN)."""
    _, report = run("exceptions_triple.s", vendor, FAULT_KIND=fault_kind)
    assert report.outcome == "shutdown", f"{report.outcome}: {report.detail}"
    assert report.user_exits[-1] == {"reason": "shutdown"}
    assert report.syncs() == [], "the guest ran past the fault"
    assert report.exception is None


# ------------------------------------------------------------------------------- CPL 3


@VENDORS
def test_int_from_cpl3_through_dpl3_gate_runs_handler_at_cpl0(vendor: Vendor) -> None:
    """GUEST_RUN_USER returns: `int 0x81` at CPL 3 reaches its CPL-0 handler at CPL 0 (SDM vol. 3 6.12.1)."""
    _, report = run("exceptions_user.s", vendor)
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    assert report.syncs() == [0x23, 0x08], f"CS at CPL 3 / back at CPL 0: {[hex(v) for v in report.syncs()]}"


# ------------------------------------------------------------------ faults during delivery
#: Move the #PF gate (14) to IST 1, so a #PF raised while pushing another event's frame on an
#: unmapped stack can itself be delivered (the runtime's TSS has an IST 1 stack).
PF_ON_IST = """
guest_main:
    lea r9, [rip + rt_exc_stub_table]
    mov rsi, qword ptr [r9 + 14*8]
    mov rdi, 14
    mov rdx, 0x8e
    mov ecx, 1
    call rt_set_gate
"""


@pytest.mark.parametrize(("raise_it", "rip_offset"), [
    ("    int3\n", 0),  # benign first event (a trap: the #PF names the INT3 itself)
    ("    int 0x40\n", 0),  # software INT n, benign
    ("    xor ecx, ecx\n    div ecx\n", 2),  # #DE: contributory, then #PF
], ids=["int3", "int_n", "de"])
def test_a_pf_while_delivering_a_benign_or_contributory_event_is_delivered_serially(
        raise_it: str, rip_offset: int) -> None:
    """A #PF while pushing the frame of a benign event (INT3, INT n) or a contributory fault
    (#DE) is not a #DF: the #PF is delivered, at the instruction that raised the first event,
    with CR2 = the first push (RSP - 8) (SDM vol. 3 table 6-5; APM vol. 2 8.2.9)."""
    text = PF_ON_IST + "    mov rsp, 0x1000\nfault_site:\n" + raise_it + "    GUEST_SYNC 0x600d\n    ret\n"
    program, report = run("exceptions_serial.s", text=text)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    exc = report.exception
    check(exc, PF, PFERR_WRITE, program.symbols["fault_site"] + rip_offset)
    assert exc["cr2"] == 0xFF8


def test_a_pf_while_delivering_a_pf_is_a_double_fault() -> None:
    """#PF + #PF is a #DF (SDM vol. 3 table 6-5): a #PF whose own frame cannot be pushed."""
    text = "guest_main:\n    mov rsp, 0x1000\n    mov rax, qword ptr [0x10]\n    GUEST_SYNC 0x600d\n    ret\n"
    _, report = run("exceptions_pf_pf.s", text=text)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None and report.exception["vector"] == DF


@pytest.mark.parametrize(("attrs", "vector"), [
    (0x00, GP),  # type 0 and not present: the type is checked first, #GP
    (0x0E, 11),  # a not-present interrupt gate: #NP
])
def test_int_gate_checks_come_in_the_cpus_order(attrs: int, vector: int) -> None:
    """INT 0x40 (software: EXT = 0 in the error code) through a bad gate: its type is checked
    before its present bit, so a type-0 gate is #GP even when not present (SDM vol. 2 INT n
    pseudocode, IA-32e mode); the fault names the INT."""
    text = (f"guest_main:\n    mov rdi, RT_IDT\n    mov byte ptr [rdi + 0x40*16 + 5], {attrs:#x}\n"
            "fault_site:\n    int 0x40\n    GUEST_SYNC 0x600d\n    ret\n")
    program, report = run("exceptions_gate.s", text=text)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    check(report.exception, vector, 0x40 * 8 + 2, program.symbols["fault_site"])


@pytest.mark.parametrize(("segment", "msr"), [("fs", 0xC0000100), ("gs", 0xC0000101)])
def test_cr2_of_an_fs_or_gs_access_includes_the_segment_base(segment: str, msr: int) -> None:
    """CR2 holds the faulting linear address: an access through FS or GS adds the segment's base
    (SDM vol. 3 4.7; 3.4.4: FS and GS keep their bases in 64-bit mode)."""
    text = (f"guest_main:\n    mov ecx, {msr:#x}\n    xor edx, edx\n    mov eax, 0x1000\n    wrmsr\n"
            f"    mov ebx, 0x88\n    mov rax, qword ptr {segment}:[rbx - 0x1000 + 0x10]\n    GUEST_SYNC 1\n    ret\n")
    _, report = run("exceptions_segment_cr2.s", text=text)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["cr2"]) == (PF, 0x98)


def test_the_handlers_cpl_is_its_code_segments_dpl_not_the_gate_selectors_rpl() -> None:
    """A gate whose selector names the kernel code segment (DPL 0) with RPL 3 runs its handler at
    CPL 0 with CS = 0x08 (SDM vol. 3 6.12.1: the new CPL is the code segment's DPL, and CS.RPL
    is set to it); a gate naming a data segment is #GP(selector)."""
    text = """
guest_main:
    GUEST_SET_HANDLER 3, bp_handler
    mov rdi, RT_IDT
    mov word ptr [rdi + 3*16 + 2], 0x0b
    int3
.if DATA_SELECTOR
    mov word ptr [rdi + 3*16 + 2], 0x10
fault_site:
    int3
.endif
    ret
bp_handler:
    mov bx, cs
    GUEST_SYNC rbx
    ret
"""
    _, report = run("exceptions_gate_rpl.s", text=text, DATA_SELECTOR=0)
    assert report.outcome == "done" and report.syncs() == [0x08], report.detail
    program, report = run("exceptions_gate_rpl.s", text=text, DATA_SELECTOR=1)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    check(report.exception, GP, 0x10, program.symbols["fault_site"])
