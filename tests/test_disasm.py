"""`testbed disasm` (testbed/disasm.py) and the boot it rests on (Machine.boot_to).

Scenarios:
1. The guest boots to guest_main and its code is listed on every VM type and vendor, in the
   guest's view (plaintext, as the CPU fetches it) and the host's: plaintext on a plain VM,
   ciphertext of a legacy SEV guest's private frame, and on a guest_memfd VM (sev-snp, tdx) a
   statement that the host cannot read private memory (of a TD, on tdx), never a failure.
2. A guest that does not reach guest_main is reported with the real cause: the outcome with
   the exception's vector, error code and RIP, the vCPU's stop reason, and status 1.
3. Capstone's text with memory operands (`qword ptr [rbx + 8]`) and guest paths holding
   `[...]` are printed whole (rich markup is off).
4. --count is bounded; a bad value is one line on stderr with status 2.
5. Canary: Unicorn's `until` at a page start fetch-fills the page before it; boot_to stops
   with a code hook instead (hw/cpu.py UnicornVcpu.breakpoint).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import unicorn
from unicorn import unicorn_const as ucc
from unicorn import x86_const as ux

from testbed.cli import EXIT_GUEST_FAILURE, EXIT_OK, EXIT_USAGE, main
from testbed.decode import disassemble
from testbed.disasm import listing
from testbed.errors import GuestBootError
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program
from testbed.textout import plain_console, plain_table

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

GUEST = GUESTS_DIR / "hypercall_insn.s"
SMALL = ["--memory", "8M"]
#: The first instruction of guests/hypercall_insn.s's guest_main, as capstone prints it.
FIRST_INSN = "mov rax, 1"

VM_CONFIGS = [
    ("amd", "default"), ("intel", "default"), ("amd", "sw-protected"), ("intel", "sw-protected"),
    ("amd", "sev"), ("amd", "sev-es"), ("amd", "sev-snp"), ("intel", "tdx"),
]


def disasm(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, str, str]:
    """main(["disasm", ...]) on a wide console -> (status, stdout, stderr); never a traceback."""
    monkeypatch.setenv("COLUMNS", "200")
    status = main(["disasm", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    return status, out, err


@pytest.mark.parametrize(("vendor", "vm_type"), VM_CONFIGS, ids=[f"{v}-{t}" for v, t in VM_CONFIGS])
def test_guest_view_shows_the_plaintext_code_on_every_vm_type(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, vendor: str, vm_type: str
) -> None:
    """--view guest boots to guest_main and lists the guest's own instructions on every VM type."""
    status, out, err = disasm(capsys, monkeypatch, str(GUEST), "--vendor", vendor, "--vm-type", vm_type,
                              "--count", "2", *SMALL)
    assert status == EXIT_OK, f"status {status}; stderr {err!r}"
    assert err == ""
    assert "0x100000" in out and FIRST_INSN in out, out


@pytest.mark.parametrize(("vendor", "vm_type"), VM_CONFIGS, ids=[f"{v}-{t}" for v, t in VM_CONFIGS])
def test_host_view_says_what_the_host_sees_on_every_vm_type(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, vendor: str, vm_type: str
) -> None:
    """--view host succeeds on every VM type and names what the host reads: plaintext,
    ciphertext (legacy SEV, one frame per page) or nothing (a guest_memfd VM's private page)."""
    status, out, err = disasm(capsys, monkeypatch, str(GUEST), "--vendor", vendor, "--vm-type", vm_type,
                              "--view", "host", "--count", "2", "--seed", "1", *SMALL)
    assert status == EXIT_OK, f"status {status}; stderr {err!r}"
    assert err == ""
    out = " ".join(out.split())  # the title wraps at the table's width, which depends on the path
    assert "host view" in out
    with Machine(build_program(GUEST, o := VmOptions(vendor=vendor, vm_type=vm_type, memory="8M")), o) as m:
        m.boot_to(m.program.symbols["guest_main"])
        kind = m.memory.host_view_kind(m.cpu.gva_to_gpa(m.program.symbols["guest_main"]))
    if kind == "unmappable":
        whose = "a TD (guest_memfd" if vm_type == "tdx" else "a guest_memfd VM"
        assert f"host cannot read private memory of {whose}" in out, out
        assert FIRST_INSN not in out
    elif kind == "ciphertext":
        assert "ciphertext" in out, out
        assert FIRST_INSN not in out, "the host decoded plaintext from an encrypted frame"
    else:
        assert "plaintext" in out and FIRST_INSN in out, out
    expected = {"sev": "ciphertext", "sev-es": "ciphertext", "sev-snp": "unmappable", "tdx": "unmappable"}.get(vm_type)
    if expected is not None:
        assert kind == expected, f"{vm_type}: the host sees {kind} at guest_main"


UD_GUEST = "guest_main:\n    ud2\nafter_ud2:\n    ret\n"


def test_boot_to_names_the_exception_vector_error_code_and_rip(tmp_path: Path) -> None:
    """A boot that ends in an unhandled exception raises GuestBootError naming #UD, its error code, RIP and the stop."""
    guest = tmp_path / "boot_ud.s"
    guest.write_text(UD_GUEST)
    options = VmOptions(memory="8M")
    program = build_program(guest, options)
    target = program.symbols["after_ud2"]
    with Machine(program, options) as machine, pytest.raises(GuestBootError) as info:
        machine.boot_to(target)
    message = str(info.value)
    rip = program.symbols["guest_main"]
    assert f"did not reach 0x{target:x} (after_ud2)" in message, message
    assert "unhandled_exception: " in message, message
    assert f"unexpected #UD at rip 0x{rip:x}" in message, message
    assert "vCPU stopped: requested" in message, message


def test_boot_to_names_a_guest_that_finished_first(tmp_path: Path) -> None:
    """A guest that reaches GUEST_DONE before the breakpoint is reported as done, not as a silent miss."""
    guest = tmp_path / "finishes.s"
    guest.write_text("guest_main:\n    ret\nnever_called:\n    ret\n")
    options = VmOptions(memory="8M")
    program = build_program(guest, options)
    with Machine(program, options) as machine, pytest.raises(GuestBootError, match=r"never_called\): done"):
        machine.boot_to(program.symbols["never_called"])


def test_disasm_reports_a_failed_boot_with_status_1_and_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """When the boot does not reach its target, disasm prints the real cause on one stderr line and exits 1."""
    guest = tmp_path / "boot_ud.s"
    guest.write_text(UD_GUEST)
    real_boot_to = Machine.boot_to
    # The runtime always reaches guest_main; aim the boot past the guest's ud2 instead.
    monkeypatch.setattr(Machine, "boot_to",
                        lambda self, _address: real_boot_to(self, self.program.symbols["after_ud2"]))
    status, out, err = disasm(capsys, monkeypatch, str(guest), "--vm-type", "sev-snp", *SMALL)
    assert status == EXIT_GUEST_FAILURE, f"status {status}; stderr {err!r}"
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("testbed: disasm "), err
    assert "unexpected #UD at rip 0x100000" in err, err


# --------------------------------------------------------------------------------- markup


def test_memory_operands_and_bracketed_paths_are_printed_whole(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`qword ptr [rbx + 8]` and a guest named bad[rax].s print literally, not as rich markup."""
    guest = tmp_path / "bad[rax].s"
    guest.write_text("guest_main:\n    mov rax, qword ptr [rbx + 8]\n    mov ecx, 1\n    ret\n")
    status, out, err = disasm(capsys, monkeypatch, str(guest), "--count", "2", *SMALL)
    assert status == EXIT_OK, err
    assert "mov rax, qword ptr [rbx + 8]" in out, out
    assert "bad[rax].s" in out, out


# --------------------------------------------------------------------------------- --count


@pytest.mark.parametrize("count", ["1000000", "0", "-3", "lots", "9" * 5000])
def test_an_out_of_range_count_is_one_usage_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, count: str
) -> None:
    """--count outside 1..4096 (or not a number) exits 2 with one line naming --count."""
    status, out, err = disasm(capsys, monkeypatch, str(GUEST), "--count", count, *SMALL)
    assert status == EXIT_USAGE, f"status {status}; stderr {err[:300]!r}"
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--count" in lines[0] and len(lines[0]) < 300, err[:300]


@pytest.mark.parametrize("symbol", ["", "no_such_label"])
def test_an_unknown_or_empty_symbol_is_one_usage_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, symbol: str
) -> None:
    """--symbol names a label of the guest: an unknown one, or an empty one (not guest_main), exits 2."""
    status, _, err = disasm(capsys, monkeypatch, str(GUEST), "--symbol", symbol, *SMALL)
    assert status == EXIT_USAGE, f"status {status}; stderr {err[:300]!r}"
    assert f"no symbol {symbol!r}" in err


def test_the_largest_count_runs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--count 4096 lists 4096 instructions (the guest image is followed by mapped zero bytes)."""
    status, out, err = disasm(capsys, monkeypatch, str(GUEST), "--count", "4096", *SMALL)
    assert status == EXIT_OK, err
    assert sum(1 for line in out.splitlines() if line.startswith("│ 0x")) == 4096


def test_the_listing_prints_one_row_per_instruction_at_any_width() -> None:
    """The listing prints the very text of a table with one row per instruction, both where it
    fits the console (its rows then go in as one row of joined cells, which rich renders faster)
    and where rich folds cells (row by row): on a wide console, on one exactly as wide as the
    table, and on one a column narrower."""
    program = build_program(GUEST, VmOptions(memory=8 << 20))
    rows = [(f"0x{i.address:x}", i.raw.hex(" "), i.text) for i in disassemble(program.code, program.base, limit=40)]

    def per_row() -> Table:
        table = plain_table("title", "address", "bytes", "instruction", caption="caption")
        for row in rows:
            table.add_row(*row)
        return table

    def printed(table: Table, console: Console, out: io.StringIO) -> str:
        console.print(table)
        return out.getvalue()

    probe = plain_console(io.StringIO())
    natural = probe.measure(per_row(), options=probe.options.update_width(1 << 20)).maximum
    for width, joined in ((200, True), (natural, True), (natural - 1, False)):
        consoles = []
        for _ in range(2):
            out = io.StringIO()
            console = plain_console(out)
            console.width = width
            consoles.append((console, out))
        table = listing(consoles[0][0], "title", "caption", rows)
        assert (len(table.rows) == 1) is joined, width
        assert printed(table, *consoles[0]) == printed(per_row(), *consoles[1]), width


# --------------------------------------------------------------------------------- canary


def test_unicorn_until_at_a_page_start_fills_the_page_before() -> None:
    """Canary: emu_start's `until` at a page start makes Unicorn fetch-fill the previous page.

    This is why UnicornVcpu.breakpoint is a code hook: with `until` = guest_main (0x100000),
    the fill of 0xff000 on SNP hit an unvalidated page and raised #VC 0x404 into the guest.
    If this starts failing, Unicorn no longer probes and `until` would be safe again."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x3000, b"\x48\xc7\xc0\x00\x50\x00\x00\xff\xe0")  # mov rax, 0x5000; jmp rax
    uc.mem_write(0x5000, b"\x90" * 16)
    uc.ctl_set_tlb_mode(ucc.UC_TLB_VIRTUAL)
    fills: list[int] = []

    def fill(_uc: object, vaddr: int, _access: int, entry: object, _ud: object) -> bool:
        fills.append(vaddr & ~0xFFF)
        entry.paddr = vaddr & ~0xFFF  # type: ignore[attr-defined]
        entry.perms = ucc.UC_PROT_ALL  # type: ignore[attr-defined]
        return True

    uc.hook_add(unicorn.UC_HOOK_TLB_FILL, fill)
    uc.emu_start(0x3000, 0x5000)
    assert uc.reg_read(ux.UC_X86_REG_RIP) == 0x5000
    assert 0x4000 in fills, f"fills {[hex(f) for f in fills]}: Unicorn no longer probes the page before `until`"
