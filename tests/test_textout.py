"""Human output prints what it is given (testbed/textout.py and every command that uses it).

Scenarios:
1. The plain console prints `[...]` and `:name:` literally, in titles, captions and cells.
2. `testbed demo`'s tables keep capstone's memory operands and every cell's text.
3. `testbed replay`'s tables keep a bracketed log path, and a malformed line is located as
   file:line; a 5,000-digit field is such a line (it never reaches int()).
4. Error messages on stderr keep bracketed paths.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from testbed.cli import EXIT_USAGE, main
from testbed.demo import DemoCell, print_demo
from testbed.textout import plain_console, plain_table, styled


def test_plain_console_prints_markup_and_emoji_codes_literally() -> None:
    """Titles, captions, cells and printed strings keep `[red]`, `[/]` and `:smile:` as text."""
    out = io.StringIO()
    console = plain_console(out)
    table = plain_table("t[b]itle :smile:", "c[o]l", caption="cap[/]")
    table.add_row("[red]x[/red]", styled("[green]ok[/]", "green"))
    console.print(table)
    console.print("line [bold]y[/bold] :thumbs_up:")
    text = out.getvalue()
    for literal in ("t[b]itle :smile:", "c[o]l", "cap[/]", "[red]x[/red]", "[green]ok[/]",
                    "line [bold]y[/bold] :thumbs_up:"):
        assert literal in text, f"{literal!r} missing from:\n{text}"


def test_demo_tables_keep_memory_operands(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's host-view table shows capstone's `[rax]` operands and every cell's text whole."""
    monkeypatch.setenv("COLUMNS", "250")
    host_view = {"rip": 0x100010, "gpa": 0x100010, "guest_bytes": "0f01c1", "guest_decode": "vmcall",
                 "host_bytes": "0000", "host_decode": "add byte ptr [rax], al"}
    cells = [
        DemoCell("amd", "default", "VMMCALL", "done", 0, "hypercall handled [ok]"),
        DemoCell("amd", "sev", "VMCALL", "unhandled_exception", None, "none: #UD :smile:", host_view),
    ]
    out = io.StringIO()
    print_demo(out, cells)
    text = out.getvalue()
    for literal in ("add byte ptr [rax], al", "hypercall handled [ok]", "none: #UD :smile:", "vmcall"):
        assert literal in text, f"{literal!r} missing from:\n{text}"


SEED_LINES = [
    "[    1.000000] page_enc_status_hc invoked, gpa = 1000, npages = 2, enc = 0",
    "[    1.100000] page_enc_status_hc invoked, gpa = 5000, npages = 1, enc = " + "1" * 5000,
    "[    1.200000] page_enc_status_hc invoked, gpa = " + "f" * 5000 + ", npages = 1, enc = 0",
    "[    1.300000] page_enc_status_hc invoked, gpa = 0000000000000000000000000009000, npages = 1, enc = 0",
]


def test_replay_locates_a_5000_digit_field_and_keeps_a_bracketed_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A field longer than a 64-bit value is reported as LOG:LINE and skipped; the path prints whole."""
    monkeypatch.setenv("COLUMNS", "250")
    log = tmp_path / "boot[1].log"
    log.write_text("\n".join(SEED_LINES) + "\n")
    status = main(["replay", str(log)])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert err == ""
    caption = "".join(line.strip() for line in out.splitlines())  # the caption wraps at the table's width
    assert f"{log}, guest" in caption, out
    assert f"{log}:2: malformed page_enc_status_hc line: enc has 5000 significant digits" in out, out
    assert f"{log}:3: malformed page_enc_status_hc line: gpa has 5000 significant digits" in out, out
    assert f"{log}:4:" not in out, "leading zeros do not make a field too long"
    lines = [line for line in out.splitlines() if f"{log}:" in line]
    assert all(len(line) < 600 for line in lines), "a malformed line is clipped, not echoed whole"


def test_replay_json_lists_the_oversized_lines_as_malformed(capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    """--json reports the 5,000-digit lines under "malformed" with their line numbers and replays the rest."""
    log = tmp_path / "boot.log"
    log.write_text("\n".join(SEED_LINES) + "\n")
    assert main(["replay", str(log), "--json", "--tracker", "ranges"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [m["line"] for m in result["malformed"]] == [2, 3]
    assert result["events"] == 2
    assert result["shared_ranges"] == [[1, 2], [9, 1]]


def test_error_messages_keep_bracketed_paths(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A usage error about a file named with brackets shows the name as it is."""
    missing = tmp_path / "[bold]gone[/bold].s"
    assert main(["run", str(missing)]) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == f"testbed: {missing}: no such guest source file"
