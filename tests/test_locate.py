"""Reports say where: Program.locate maps an address back to file:line and symbol+offset, and an
unhandled exception's report carries them (and CR2 for a #PF) in the JSON and the human output.

CR2 is the runtime's: its unhandled-exception path (guests/lib/runtime.s, rt_exc_unhandled)
reads CR2 and passes it as the 4th argument of UCALL_UNHANDLED; the host reads no registers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.asm import CodeLocation, assemble_source
from testbed.cli import EXIT_GUEST_FAILURE, main
from testbed.machine import GUESTS_DIR, VmOptions, build_program, run_guest

BASE = 0x40_0000
MEMORY = 8 << 20


def line_of(path: Path, text: str, occurrence: int = 1) -> int:
    """The 1-based line of the `occurrence`-th line of `path` whose text is `text` (stripped)."""
    lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip() == text]
    return lines[occurrence - 1]


def test_locate_maps_each_byte_to_its_line_and_nearest_label() -> None:
    """Every byte of an instruction maps to its line and the nearest label at or below it, with the offset."""
    program = assemble_source("start:\n    nop\n    mov rax, 1\nnext:\nalso:\n    ud2\n", filename="g.s", base=BASE)
    assert program.locate(BASE) == CodeLocation("g.s", 2, "start", 0)
    assert program.locate(BASE + 3) == CodeLocation("g.s", 3, "start", 3)
    # of two labels at one address, the one written last (nearest the code)
    assert program.locate(BASE + 9) == CodeLocation("g.s", 6, "also", 1)
    assert str(program.locate(BASE + 9)) == "g.s:6 (also+0x1)"
    assert program.locate(BASE - 1) is None and program.locate(program.end) is None


def test_locate_attributes_a_macro_expansion_to_the_invoking_line() -> None:
    """An address inside a macro expansion maps to the line that invoked the macro."""
    source = ".macro TWO\n    nop\n    ud2\n.endm\nentry:\n    nop\n    TWO\n"
    program = assemble_source(source, filename="g.s", base=BASE)
    assert program.locate(BASE + 2) == CodeLocation("g.s", 7, "entry", 2)


def test_unhandled_ud_names_the_guest_line_and_symbol() -> None:
    """An unhandled #UD (guests/exceptions_unhandled.s FAULT=1) reports the ud2's file:line and fault_site+0."""
    path = GUESTS_DIR / "exceptions_unhandled.s"
    report = run_guest(path, VmOptions(memory=MEMORY, defines={"FAULT": 1}))
    assert report.outcome == "unhandled_exception", report.detail
    exc = report.exception
    assert exc is not None
    assert (exc["vector"], exc["file"], exc["line"]) == (6, str(path), line_of(path, "ud2"))
    assert (exc["symbol"], exc["offset"]) == ("fault_site", 0)
    assert "cr2" not in exc, "CR2 is reported for #PF only"
    assert report.detail.startswith(f"{path}:{exc['line']} (fault_site+0x0): ")


@pytest.mark.parametrize("vm_type", ["default", "sev-snp"])
def test_unhandled_pf_reports_cr2_and_the_faulting_line(vm_type: str) -> None:
    """An unhandled #PF reports CR2 = the faulting linear address and the load's file:line and
    symbol+offset, on a plain and an SNP guest (where the runtime reads CR2 itself)."""
    text = "guest_main:\n    movabs rax, 0x7ff000123\nload:\n    nop\n    mov rbx, qword ptr [rax]\n    ret\n"
    program = build_program("pf.s", VmOptions(memory=MEMORY, vm_type=vm_type), text=text)
    report = run_guest("pf.s", VmOptions(memory=MEMORY, vm_type=vm_type), text=text)
    assert report.outcome == "unhandled_exception", report.detail
    exc = report.exception
    assert exc is not None
    assert (exc["vector"], exc["cr2"], exc["error_code"]) == (14, 0x7FF000123, 0)  # not present, read
    assert exc["rip"] == program.symbol("load") + 1
    assert (exc["file"], exc["line"], exc["symbol"], exc["offset"]) == ("pf.s", 5, "load", 1)


def test_fault_in_a_macro_expansion_names_the_invoking_line() -> None:
    """A fault inside a guest-API macro's expansion (GUEST_SET_HANDLER's ud2 for vector 40) names
    the line that invoked the macro, and the guest's symbol."""
    text = "guest_main:\n    nop\n    mov ecx, 40\n    GUEST_SET_HANDLER ecx, guest_main\n    ret\n"
    report = run_guest("m.s", VmOptions(memory=MEMORY), text=text)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["line"]) == (6, 4)
    assert report.exception["symbol"] == "guest_main"


def test_cli_shows_file_line_symbol_and_cr2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`testbed run` prints the exception as file:line (symbol+0xoff) with CR2, and --json carries them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    Path("pf.s").write_text("guest_main:\n    xor eax, eax\nbad:\n    mov qword ptr [rax + 0x18], rbx\n    ret\n")
    status = main(["run", "pf.s", "--memory", "8M"])
    out = capsys.readouterr().out
    assert status == EXIT_GUEST_FAILURE
    row = next(line for line in out.splitlines() if "│ exception" in line)
    assert "vector 14 error 0x2 rip 0x100002 cr2 0x18 at pf.s:4 (bad+0x0)" in row, out
    status = main(["run", "pf.s", "--memory", "8M", "--json"])
    exc = json.loads(capsys.readouterr().out)["exception"]
    assert (exc["cr2"], exc["line"], exc["symbol"], exc["error_code"]) == (0x18, 4, "bad", 2)  # write
