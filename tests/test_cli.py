"""The `testbed run` command (testbed/cli.py) end to end through testbed.cli.main.

Scenarios:
1. Exit statuses: 0 the guest passed; 1 a guest failure (failed GUEST_ASSERT_EQ, unhandled
   exception); 2 a usage error (missing file, bad --memory, an SEV VM on Intel, an assembly
   error printed as file:line, a bad -D); 3 a timeout.
2. --json prints one object with outcome, ucalls, exception, user_exits, shared_ranges, stats.
3. A failed GUEST_ASSERT_EQ's abort ucall names the guest file and the assert's line.
4. --trace writes JSON Lines with events of the hw, kvm and vmm layers and the ucalls.
5. Whatever goes wrong, stderr never shows a Python traceback.
6. TDX end to end: a KVM hypercall and conversions under `--vm-type tdx --vendor intel --json`;
   `--vendor amd` with tdx is a usage error.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from testbed.cli import EXIT_GUEST_FAILURE, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, main, parse_args
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
    """An unhandled guest exception exits with status 1 and reports vector, error code, rip and
    the rip's source line and symbol."""
    status, report = run_json(capsys, str(GUESTS_DIR / "exceptions_unhandled.s"), "-D", "FAULT=1", *SMALL)
    assert status == EXIT_GUEST_FAILURE == 1, f"status {status}"
    assert report["outcome"] == "unhandled_exception"
    assert report["exception"]["vector"] == 6, f"exception {report['exception']}"
    assert set(report["exception"]) == {"vector", "error_code", "rip", "file", "line", "symbol", "offset"}
    assert (report["exception"]["symbol"], report["exception"]["offset"]) == ("fault_site", 0)


def test_status_3_for_a_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    """A guest spinning forever under --timeout 0.1 exits with status 3 and outcome timeout."""
    status, report = run_json(capsys, str(GUESTS_DIR / "cli_spin.s"), "--memory", "16M", "--timeout", "0.1")
    assert status == EXIT_TIMEOUT == 3, f"status {status}"
    assert report["outcome"] == "timeout"
    assert [u["cmd"] for u in report["ucalls"]] == ["sync"], "the guest's sync before spinning is kept"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "no such guest source file"),
        (["{guest}", "--memory", "lots"], "invalid memory size"),
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


@pytest.mark.parametrize(("source", "defines", "expected"), [
    ("guest_main:\n    ret\nset_memory_shared:\n    ret\n", (),
     "symbol redefined: set_memory_shared (first defined: set_memory_shared at {guest}:3)"),
    ("", (), "symbol missing: guest_main (the guest defines no guest_main, which the runtime calls)"),
    ("guest_main:\nrax:\n    ret\n", (), "{guest}:2: label 'rax': a register name cannot be a symbol"),
    ("guest_main:\n.equ rcx, 5\n    ret\n", (), "{guest}:2: .equ rcx: a register name cannot be a symbol"),
    ("guest_main:\n    mov rbx, FOO\n    ret\n", ("-D", "FOO=rax"), "define FOO=rax: a register is not a value"),
    ("guest_main:\n    ret\n", ("-D", "rax=5"), "define rax: a register name cannot be a symbol"),
    ("guest_main:\n    ret\n", ("-D", "GUEST_MEM_SIZE=1"),
     "define GUEST_MEM_SIZE: the testbed sets it from the VM's layout"),
], ids=["runtime_symbol", "no_guest_main", "register_label", "register_equ", "register_value", "register_name",
        "layout_define"])
def test_symbol_mistakes_are_usage_errors_that_name_the_cause(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                              source: str, defines: tuple[str, ...],
                                                              expected: str) -> None:
    """A guest redefining a runtime symbol (named with its own line), a guest without guest_main, a
    register used as a symbol, a define whose value is a register, a define of the layout: each is
    status 2 naming the cause (Keystone would resolve the register, or blame the runtime's line)."""
    guest = tmp_path / "g.s"
    guest.write_text(source)
    status, _, err = run_cli(capsys, str(guest), *SMALL, *defines)
    assert status == EXIT_USAGE, f"status {status}; stderr: {err}"
    assert expected.format(guest=guest) in err, err


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


# ---------------------------------------------------------------------------------- --expect


@pytest.mark.parametrize(
    ("guest", "defines", "expect", "status"),
    [
        ("exceptions_unhandled.s", ["-D", "FAULT=1"], "unhandled_exception", EXIT_OK),
        ("cli_assert.s", [], "guest_assert", EXIT_OK),
        ("hypercall_insn.s", [], "done", EXIT_OK),
        ("hypercall_insn.s", [], "unhandled_exception", EXIT_GUEST_FAILURE),
        ("cli_assert.s", [], "done", EXIT_GUEST_FAILURE),
        ("cli_spin.s", [], "done", EXIT_GUEST_FAILURE),
    ],
    ids=["fault_expected", "assert_expected", "done_expected", "done_not_fault", "assert_not_done",
         "timeout_not_done"],
)
def test_expect_exits_0_exactly_when_the_outcome_matches(
    capsys: pytest.CaptureFixture[str], guest: str, defines: list[str], expect: str, status: int
) -> None:
    """--expect OUTCOME exits 0 when the run ends with OUTCOME and 1 for any other outcome (a timeout too)."""
    timeout = "0.05" if guest == "cli_spin.s" else "1"  # the spinning guest runs to its timeout
    got, report = run_json(capsys, str(GUESTS_DIR / guest), *defines, "--memory", "8M", "--timeout", timeout,
                           "--expect", expect)
    assert got == status, f"status {got} for outcome {report['outcome']} with --expect {expect}"
    assert (report["outcome"] == expect) == (status == EXIT_OK)


def test_expect_rejects_an_unknown_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    """--expect with a name not in the outcomes list is a usage error (2) listing the outcomes."""
    status, out, err = run_cli(capsys, str(GUESTS_DIR / "hypercall_insn.s"), "--expect", "crashed")
    assert status == EXIT_USAGE and out == ""
    assert "--expect 'crashed': not an outcome" in err and "unhandled_exception" in err, err


def test_expect_is_shown_in_the_human_report(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The human report of an --expect run shows the expected outcome beside the actual one."""
    monkeypatch.setenv("COLUMNS", "200")
    status, out, _ = run_cli(capsys, str(GUESTS_DIR / "exceptions_unhandled.s"), "-D", "FAULT=1", "--memory", "8M",
                             "--expect", "unhandled_exception")
    assert status == EXIT_OK
    assert any("expected" in line and "unhandled_exception" in line for line in out.splitlines()), out


# ------------------------------------------------------------------ input that used to crash


@pytest.fixture
def host_24g(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host as a 24 GiB machine without swap under heuristic overcommit, with the process's
    address space limited to 32 GiB (ulimit -v)."""
    gib = 1 << 30
    monkeypatch.setattr("testbed.options.read_meminfo", lambda: {
        "MemTotal": 24 * gib, "SwapTotal": 0, "MemAvailable": 22 * gib})
    monkeypatch.setattr("testbed.options.read_overcommit_mode", lambda: 0)
    monkeypatch.setattr("testbed.options.read_address_space_limit", lambda: 32 * gib)


BAD_INPUT = [
    (["{guest}", "--timeout", "nan"], "timeout must be positive and finite, not nan"),
    (["{guest}", "--timeout", "inf"], "timeout must be positive and finite, not inf"),
    (["{guest}", "--timeout", "-1"], "timeout must be positive and finite, not -1"),
    (["{guest}", "--timeout", "1e400"], "timeout must be positive and finite"),
    (["{guest}", "--timeout", "1e9"], "at most 86400 s"),
    (["{guest}", "--timeout", "soon"], "timeout 'soon'"),
    (["{guest}", "--memory", "64G"], "maps 64.0 GiB but the process's address space is limited to 32.0 GiB"),
    (["{guest}", "--memory", "65G"], "between 8 MiB and 64 GiB"),
    (["{guest}", "--memory", "9" * 5000], "invalid memory size"),
    (["{tmp}"], "is a directory"),
    (["{tmp}/" + "g" * 300 + ".s"], "File name too long"),
    (["{tmp}/nul\0byte.s"], "not a usable file name"),
    (["{nonutf8}"], ":2:5: not UTF-8 text (byte 0xff)"),
    (["{guest}", "--trace", "/dev/full"], "cannot write trace file /dev/full: No space left on device"),
    (["{guest}", "--trace", "{tmp}"], "cannot write trace file"),
    (["{guest}", "--c-bit", "99"], "C-bit position 99: must be between 32 and 51"),
    (["{guest}", "--c-bit", "-1"], "C-bit position -1"),
    (["{guest}", "--c-bit", "9" * 5000], "C-bit position"),
    (["{guest}", "--seed", "-1"], "seed -1"),
    (["{guest}", "--seed", str(1 << 64)], "seed 18446744073709551616"),
    (["{guest}", "--seed", "9" * 5000], "seed"),
    (["{guest}", "--max-ranges", "0"], "max_ranges 0"),
    (["{guest}", "--max-ranges", "9" * 40], "max_ranges"),
    (["{guest}", "--max-ranges", "many"], "max_ranges 'many'"),
    (["{guest}", "--ghcb-version", "3"], "GHCB version 3"),
    (["{guest}", "--refuse-conversion", "9" * 5000], "--refuse-conversion"),
    (["{guest}", "--pv-features", "pv_everything"], "unknown PV feature 'pv_everything'"),
    (["{guest}", "--pv-features", ""], "an empty feature name"),
    (["{guest}", "--pv-features", "pv_unhalt,"], "an empty feature name"),
    (["{guest}", "--tracker", ""], "unknown tracker ''"),
    (["{guest}", "--refuse-conversion", "0x1000:1:private:x"], "expected GPA[:NPAGES[:private|shared]]"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[
    "timeout_nan", "timeout_inf", "timeout_negative", "timeout_overflow", "timeout_huge", "timeout_word",
    "memory_beyond_host", "memory_beyond_layout", "memory_5000_digits", "guest_is_a_directory",
    "guest_name_too_long", "guest_name_with_nul", "guest_not_utf8", "trace_dev_full", "trace_is_a_directory",
    "c_bit_99", "c_bit_negative", "c_bit_5000_digits", "seed_negative", "seed_2_64", "seed_5000_digits",
    "max_ranges_0", "max_ranges_huge", "max_ranges_word", "ghcb_version_3", "refuse_5000_digits",
    "pv_feature_unknown", "pv_features_empty", "pv_features_trailing_comma", "tracker_empty",
    "refuse_extra_field"])
def test_bad_input_is_one_clear_line_with_status_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, host_24g: None, args: list[str], message: str
) -> None:
    """Input that once ended as 'internal error' exits 2 with one 'testbed: ...' line naming the problem."""
    if "/dev/full" in args and not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this host")
    nonutf8 = tmp_path / "latin1.s"
    nonutf8.write_bytes(b"guest_main:\n    \xff\xfe\n    ret\n")
    argv = [a.format(guest=GUESTS_DIR / "hypercall_insn.s", tmp=tmp_path, nonutf8=nonutf8) for a in args]
    status, out, err = run_cli(capsys, *argv, "--memory" if "--memory" not in argv else "--json",
                               *(["8M"] if "--memory" not in argv else []))
    assert status == EXIT_USAGE, f"status {status}; stderr {err[:500]!r}"
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("testbed: "), f"stderr {err[:500]!r}"
    assert "internal error" not in err
    assert message in err, f"stderr {err[:500]!r} does not mention {message!r}"
    assert len(err) < 1000, f"a {len(err)}-character message echoes the input instead of naming it"


@pytest.mark.parametrize(("argv", "line"), [
    (["bench", "--bogus"], "testbed: unrecognized arguments: --bogus"),
    (["run"], "testbed: run: the following arguments are required: guest"),
])
def test_an_argument_error_names_the_command_once(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                  line: str) -> None:
    """argparse's errors are one line with "testbed: " once, then the subcommand that refused them."""
    assert main(argv) == EXIT_USAGE
    assert capsys.readouterr().err == line + "\n"


def test_a_trace_write_error_mid_run_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A trace file that fails after some events (EIO) ends the run with status 2 naming the file."""
    class FailingFile(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            FailingFile.writes += 1
            if FailingFile.writes > 5:
                raise OSError(5, "Input/output error")
            return super().write(text)

    trace = tmp_path / "t.jsonl"
    real_open = Path.open
    monkeypatch.setattr(Path, "open",
                        lambda self, *a, **k: FailingFile() if self == trace else real_open(self, *a, **k))
    status, _, err = run_cli(capsys, str(GUESTS_DIR / "hypercall_insn.s"), *SMALL, "--trace", str(trace))
    assert status == EXIT_USAGE, f"status {status}; stderr {err!r}"
    assert err.strip() == f"testbed: cannot write trace file {trace}: Input/output error", err


# ------------------------------------------------------------------------------ human output


def test_human_report_prints_bracketed_paths_and_details_literally(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest named bad[rax].s (and :smile:) appears whole in the title, the detail and the abort's location."""
    monkeypatch.setenv("COLUMNS", "400")
    guest = tmp_path / "bad[rax]:smile:[b].s"
    guest.write_text("guest_main:\n    mov rax, 1\n    GUEST_ASSERT_EQ rax, 2\n    ret\n")
    status, out, err = run_cli(capsys, str(guest), *SMALL)
    assert status == EXIT_GUEST_FAILURE, err
    assert out.count(f"{guest}") >= 3, out  # title, detail, ucall abort location
    assert f"{guest}:3" in out, out


def test_print_report_does_not_interpret_markup_in_any_field(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every report field a guest controls (detail, exit names) prints literally, brackets and colons kept."""
    import argparse

    from testbed.cli import _print_report
    from testbed.vmm.vmm import RunReport

    monkeypatch.setenv("COLUMNS", "300")
    report = RunReport(outcome="internal_error", detail="bad ucall [red]x[/red] at :smile: [link=y]z[/link]")
    report.exit_counts["io[/]"] = 2
    args = argparse.Namespace(guest=Path("g[b].s"), vendor="amd", vm_type="default")
    out = io.StringIO()
    _print_report(report, args, out)
    text = out.getvalue()
    for literal in ("bad ucall [red]x[/red] at :smile: [link=y]z[/link]", "io[/]=2", "g[b].s"):
        assert literal in text, f"{literal!r} missing from:\n{text}"


# ------------------------------------------------------------------------------------ TDX


TDX = ["--vm-type", "tdx", "--vendor", "intel"]
KVM_EXIT_HYPERCALL_LONG_MODE = 1
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4


def test_tdx_hypercall_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    """`testbed run guests/hypercall_abi_call.s --vm-type tdx --vendor intel --json`: KVM_HC_MAP_GPA_RANGE
    through TDCALL TDG.VP.VMCALL (R10 = 12) is one KVM_EXIT_HYPERCALL with the guest's arguments and
    LONG_MODE, its ret (0) synced from R10 (kvm/vmx/tdx.c tdx_emulate_vmcall, x86.c
    __kvm_emulate_hypercall); the runtime's boot MapGPA shares the ucall page first."""
    guest = GUESTS_DIR / "hypercall_abi_call.s"
    status, report = run_json(capsys, str(guest), *TDX, "-D", "HC_NR=12", "-D", "HC_A0=0x800000", "-D", "HC_A1=2",
                              *SMALL)
    assert status == EXIT_OK, f"status {status}: {report['outcome']} {report.get('detail')}"
    assert (report["outcome"], report["exception"]) == ("done", None)
    assert report["ucalls"] == [{"cmd": "sync", "args": [0]}, {"cmd": "done", "args": []}]
    hypercalls = [(e["nr"], e["args"], e["flags"]) for e in report["user_exits"] if e["reason"] == "hypercall"]
    assert hypercalls == [(12, [0x1000, 1, 0, 0, 0, 0], KVM_EXIT_HYPERCALL_LONG_MODE),  # boot: the ucall page
                          (12, [0x800000, 2, 0, 0, 0, 0], KVM_EXIT_HYPERCALL_LONG_MODE)]
    assert report["shared_ranges"] == [[0x1, 1], [0x800, 2]]
    assert report["stats"]["exits"] == {"hypercall": 2, "io": 2}


def test_tdx_conversions_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    """guests/conversions.s (dma_churn: shared and back) under `--vm-type tdx`: set_memory_shared/private
    go through MapGPA (one KVM_EXIT_HYPERCALL per chunk, LONG_MODE, ENCRYPTED or DECRYPTED:
    kvm/vmx/tdx.c __tdx_map_gpa) and the VMM's shared ranges equal the reference model's plus the
    ucall page (tests/test_conversions.py)."""
    from test_conversions import MEM, expected_pages, to_ranges

    from testbed.layout import UCALL_GPA

    status, report = run_json(capsys, str(GUESTS_DIR / "conversions.s"), *TDX, "-D", "SHAPE=1", "-D", "CHURN=16",
                              "--seed", "7", "--memory", f"{MEM >> 20}M", "--timeout", "20")
    assert status == EXIT_OK, f"status {status}: {report['outcome']} {report.get('detail')}"
    assert report["outcome"] == "done"
    assert report["shared_ranges"] == to_ranges(expected_pages(1, churn=16) | {UCALL_GPA >> 12})
    hypercalls = [e for e in report["user_exits"] if e["reason"] == "hypercall"]
    assert len(hypercalls) > 2
    assert all(e["nr"] == 12 and e["flags"] == KVM_EXIT_HYPERCALL_LONG_MODE
               and e["args"][2] in (0, KVM_MAP_GPA_RANGE_ENCRYPTED) and e["args"][1] <= 512 for e in hypercalls)
    assert {e["args"][2] for e in hypercalls} == {0, KVM_MAP_GPA_RANGE_ENCRYPTED}


def test_tdx_on_amd_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`--vendor amd --vm-type tdx` is one 'testbed: ...' line naming the Intel requirement, status 2."""
    status, out, err = run_cli(capsys, str(GUESTS_DIR / "hypercall_abi_call.s"), "--vm-type", "tdx",
                               "--vendor", "amd", "--json", *SMALL)
    assert status == EXIT_USAGE == 2, f"status {status}; stderr: {err}"
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("testbed: ") and "Intel" in lines[0], err


class _ClosedPipe(io.StringIO):
    """A stdout whose reader went away (`testbed ... | head`): every write is EPIPE."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_goes_away_is_not_a_testbed_bug(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Output into a closed pipe ends the command quietly (status 1), not with "internal error (a
    testbed bug)"."""
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    status = main(["run", str(GUESTS_DIR / "hypercall_insn.s"), "--json"])
    assert status == EXIT_GUEST_FAILURE
    assert "internal error" not in capsys.readouterr().err


def test_python_dash_m_testbed_is_the_testbed_command() -> None:
    """`python -m testbed` runs the same CLI as the `testbed` console script."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "testbed", "--help"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0 and done.stdout.startswith("usage: testbed"), done.stderr


@pytest.mark.parametrize("command", [["run", "g.s"], ["migrate", "g.s"], ["matrix", "g.s"]])
def test_one_calls_appended_options_never_reach_the_next(command: list[str]) -> None:
    """main() parses every call with one parser (cli.parse_args): a -D or --refuse-conversion of
    one call is not in the next call's arguments, and a call's list is not the parser's default."""
    first = parse_args([*command, "-D", "A=1", "-D", "B=2"])
    again = parse_args(command)
    assert (first.define, again.define) == (["A=1", "B=2"], [])
    again.define.append("C=3")  # a caller that edits its arguments edits only its own
    assert parse_args(command).define == []
    if command[0] == "run":
        assert parse_args([*command, "--refuse-conversion", "0x1000"]).refuse_conversion == ["0x1000"]
        assert parse_args(command).refuse_conversion == []
