"""The `testbed run` command (testbed/cli.py) end to end through testbed.cli.main.

Scenarios:
1. Exit statuses: 0 the guest passed; 1 a guest failure (failed GUEST_ASSERT_EQ, unhandled
   exception); 2 a usage error (missing file, bad --memory, an SEV VM on Intel, an assembly
   error printed as file:line, a bad -D); 3 a timeout.
2. --json prints one object with outcome, ucalls, exception, user_exits, shared_ranges, stats.
3. A failed GUEST_ASSERT_EQ's abort ucall names the guest file and the assert's line.
4. --trace writes JSON Lines with events of the hw, kvm and vmm layers and the ucalls.
5. Whatever goes wrong, stderr never shows a Python traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testbed.cli import EXIT_GUEST_FAILURE, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, main
from testbed.machine import GUESTS_DIR

SMALL = ["--memory", "16M", "--timeout", "5"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(["run", ...]) -> (status, stdout, stderr); stderr must never hold a traceback."""
    status = main(["run", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, f"traceback on stderr:\n{err}"
    assert "Traceback" not in out
    return status, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    """`testbed run ... --json`: the status and the one JSON object on stdout."""
    status, out, err = run_cli(capsys, *argv, "--json")
    lines = out.strip().splitlines()
    assert len(lines) == 1, f"--json printed {len(lines)} lines:\n{out}\nstderr: {err}"
    return status, json.loads(lines[0])


# -------------------------------------------------------------------------- exit statuses


def test_status_0_when_the_guest_passes(capsys: pytest.CaptureFixture[str]) -> None:
    """A guest that reaches GUEST_DONE exits with status 0."""
    status, report = run_json(capsys, str(GUESTS_DIR / "hypercall_insn.s"), *SMALL)
    assert status == EXIT_OK == 0, f"status {status}: {report['outcome']} {report.get('detail')}"
    assert report["outcome"] == "done"


def test_status_1_for_a_failed_guest_assert(capsys: pytest.CaptureFixture[str]) -> None:
    """A failed GUEST_ASSERT_EQ exits with status 1 and outcome guest_assert."""
    status, report = run_json(capsys, str(GUESTS_DIR / "cli_assert.s"), *SMALL)
    assert status == EXIT_GUEST_FAILURE == 1, f"status {status}"
    assert report["outcome"] == "guest_assert"


def test_status_1_for_an_unhandled_exception(capsys: pytest.CaptureFixture[str]) -> None:
    """An unhandled guest exception exits with status 1 and reports vector, error code and rip."""
    status, report = run_json(capsys, str(GUESTS_DIR / "exceptions_unhandled.s"), "-D", "FAULT=1", *SMALL)
    assert status == EXIT_GUEST_FAILURE == 1, f"status {status}"
    assert report["outcome"] == "unhandled_exception"
    assert report["exception"]["vector"] == 6, f"exception {report['exception']}"
    assert set(report["exception"]) == {"vector", "error_code", "rip"}


def test_status_3_for_a_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    """A guest spinning forever under --timeout 0.5 exits with status 3 and outcome timeout."""
    status, report = run_json(capsys, str(GUESTS_DIR / "cli_spin.s"), "--memory", "16M", "--timeout", "0.5")
    assert status == EXIT_TIMEOUT == 3, f"status {status}"
    assert report["outcome"] == "timeout"
    assert [u["cmd"] for u in report["ucalls"]] == ["sync"], "the guest's sync before spinning is kept"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "no such guest source file"),
        (["{guest}", "--memory", "lots"], "invalid size"),
        (["{guest}", "--memory", "3M"], "multiple of 2 MiB"),
        (["{guest}", "--vendor", "intel", "--vm-type", "sev"], "AMD"),
        (["{guest}", "--vm-type", "nonsense"], "unknown VM type"),
        (["{guest}", "-D", "NOEQUALS"], "bad define"),
        (["{guest}", "-D", "X="], "bad define"),
        (["{guest}", "-D", "X=1+"], "not a valid expression"),
        (["{guest}", "--timeout", "0"], "timeout"),
        (["{guest}", "--vendor", "arm"], "invalid choice"),
    ],
    ids=["missing_file", "memory_not_a_size", "memory_not_2m_multiple", "sev_on_intel", "bad_vm_type",
         "define_without_equals", "define_without_value", "define_bad_expression", "zero_timeout", "bad_vendor"],
)
def test_status_2_for_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str],
                                   message: str) -> None:
    """A usage error prints one 'testbed: ...' line on stderr and exits with status 2."""
    argv = [a.format(missing=tmp_path / "missing.s", guest=GUESTS_DIR / "hypercall_insn.s") for a in args]
    status, out, err = run_cli(capsys, *argv)
    assert status == EXIT_USAGE == 2, f"status {status}; stderr: {err}"
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("testbed: "), f"stderr: {err!r}"
    assert message in err, f"stderr {err!r} does not mention {message!r}"


def test_status_2_for_an_assembly_error_at_file_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """An assembly error exits with status 2 and names the guest file and line on stderr."""
    guest = tmp_path / "cli_bad.s"
    guest.write_text("guest_main:\n    mov rax, 1\n    frobnicate rax\n    ret\n")
    status, out, err = run_cli(capsys, str(guest), *SMALL)
    assert status == EXIT_USAGE, f"status {status}; stderr: {err}"
    assert out == ""
    assert f"{guest}:3:" in err, f"stderr {err!r} does not locate the error at {guest}:3"
    assert "frobnicate" in err


# ------------------------------------------------------------------------------------ --json


def test_json_has_the_report_keys(capsys: pytest.CaptureFixture[str]) -> None:
    """--json holds outcome, ucalls, exception, user_exits, shared_ranges and stats, shaped as documented."""
    guest = GUESTS_DIR / "hypercall_abi_call.s"
    status, report = run_json(capsys, str(guest), "-D", "HC_NR=12", "-D", "HC_A0=0x800000", "-D", "HC_A1=2", *SMALL)
    assert status == EXIT_OK, f"status {status}: {report}"
    assert {"outcome", "ucalls", "exception", "user_exits", "shared_ranges", "stats"} <= set(report), sorted(report)
    assert report["outcome"] == "done"
    assert report["exception"] is None
    assert report["ucalls"] == [{"cmd": "sync", "args": [0]}, {"cmd": "done", "args": []}]
    hypercalls = [e for e in report["user_exits"] if e["reason"] == "hypercall"]
    assert [(e["nr"], e["args"], e["flags"]) for e in hypercalls] == [(12, [0x800000, 2, 0, 0, 0, 0], 1)]
    assert all(e["reason"] in ("io", "hypercall") for e in report["user_exits"]), report["user_exits"]
    assert report["shared_ranges"] == [[0x800, 2]]
    stats = report["stats"]
    assert isinstance(stats["wall_s"], float) and stats["wall_s"] >= 0
    assert stats["exits"] == {"io": 2, "hypercall": 1}, f"stats {stats}"


def test_abort_ucall_names_the_assert_file_and_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The abort ucall carries both values and the file:line of the failing GUEST_ASSERT_EQ."""
    guest = GUESTS_DIR / "cli_assert.s"
    line = 1 + next(i for i, text in enumerate(guest.read_text().splitlines()) if "cli_assert: the failing" in text)
    status, report = run_json(capsys, str(guest), *SMALL)
    assert status == EXIT_GUEST_FAILURE
    aborts = [u for u in report["ucalls"] if u["cmd"] == "abort"]
    assert len(aborts) == 1, report["ucalls"]
    abort = aborts[0]
    assert abort["args"] == [0x1234, 0x4321], f"args {[hex(a) for a in abort['args']]}"
    assert Path(abort["file"]).resolve() == guest.resolve(), f"file {abort['file']}"
    assert abort["line"] == line, f"line {abort['line']}, expected {line}"
    assert f"{abort['file']}:{line}" in report["detail"]
    assert [u["args"] for u in report["ucalls"] if u["cmd"] == "sync"] == [[0x5A]]


# ----------------------------------------------------------------------------------- --trace


def test_trace_writes_json_lines_from_every_layer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--trace writes one JSON object per line with hw, kvm and vmm events and each ucall."""
    trace = tmp_path / "trace.jsonl"
    status, _, err = run_cli(capsys, str(GUESTS_DIR / "cli_trace.s"), *SMALL, "--trace", str(trace))
    assert status == EXIT_OK, f"status {status}; stderr {err}"
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert events, "empty trace"
    layers = {e["layer"] for e in events}
    assert {"hw", "kvm", "vmm"} <= layers, f"layers {sorted(layers)}"
    assert any(e["layer"] == "hw" and e.get("vector") == 6 for e in events), "no hw event for the #UD"
    assert any(e["layer"] == "kvm" and e["event"] == "hypercall" and e.get("nr") == 1 for e in events)
    ucalls = [(e["cmd"], e["args"]) for e in events if e["event"] == "ucall"]
    assert ucalls == [("sync", [0]), ("done", [])], f"ucall events {ucalls}"
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)


def test_unwritable_trace_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A --trace path that cannot be written is a usage error (status 2), not a traceback."""
    status, _, err = run_cli(capsys, str(GUESTS_DIR / "hypercall_insn.s"), *SMALL,
                             "--trace", str(tmp_path / "no" / "such" / "dir" / "t.jsonl"))
    assert status == EXIT_USAGE, f"status {status}; stderr {err}"
    assert err.startswith("testbed: ")
