"""Tests of testbed/replay.py: the page_enc_status_hc log format, replay, and `testbed replay`.

1. The seed's boot log parses to 26 events and replays to the same three shared ranges in
   every tracker.
2. Odd lines: other messages are ignored; a malformed hypercall line is reported with its line
   number and skipped; calls are answered as the series' v9 svm_page_enc_status_hc() (patch
   08/18, 8 Dec 2020) answered them: npages 0 and a range past the bitmap are ignored (returned
   0), only a range that wraps is rejected (-EINVAL).
3. The subcommand: JSON and table output, exit 0 / 1 (a tracker disagrees with the unbounded
   model, poisoned ones with its state where they had to poison) / 2 (usage error, a log with
   no usable line).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.errors import UsageError
from testbed.replay import (
    IGNORED,
    REJECTED,
    PageEncEvent,
    SkippedLine,
    add_replay_subparser,
    format_log_line,
    inferred_guest_pages,
    main,
    parse_line,
    parse_log,
    parse_size,
    replay,
    run_replay,
    seed_boot_log,
)
from testbed.tracker import TRACKER_KINDS, RangesTracker, make_tracker

SEED_SHARED = [(0x1D767, 0x100), (0x1F00E, 1), (0x1F018, 1)]
LINE = "[ 56.146336] page_enc_status_hc invoked, gpa = 1f018000, npages = 1, enc = 1"


def seed_lines() -> list[str]:
    return seed_boot_log().read_text().splitlines()


def test_seed_log_parses_to_its_26_events() -> None:
    """The packaged seed excerpt holds 26 well-formed hypercall lines, in log order."""
    parsed = parse_log(seed_lines())
    assert parsed.malformed == []
    assert len(parsed.events) == 26
    assert parsed.events[0] == PageEncEvent(line=1, timestamp=56.146336, gpa=0x1F018000, npages=1, enc=1)
    assert [e.timestamp for e in parsed.events] == sorted(e.timestamp or 0 for e in parsed.events)


@pytest.mark.parametrize("kind", TRACKER_KINDS)
def test_seed_log_replays_to_three_shared_ranges(kind: str) -> None:
    """Replaying the seed boot log leaves the 0x100-page buffer and two DMA pages shared."""
    tracker = make_tracker(kind, guest_pages=1 << 18)
    assert replay(parse_log(seed_lines()).events, tracker) == []
    assert tracker.shared_ranges() == SEED_SHARED


def test_npages_and_gpa_are_hexadecimal() -> None:
    """gpa and npages are read as the kernel's %lx: 'npages = 100' is 256 pages."""
    ev = parse_line("[ 56.459276] page_enc_status_hc invoked, gpa = 1d767000, npages = 100, enc = 0", 7)
    assert isinstance(ev, PageEncEvent)
    assert (ev.gfn, ev.npages, ev.shared, ev.line) == (0x1D767, 0x100, True, 7)


def test_other_lines_are_ignored_and_prefixes_tolerated() -> None:
    """Lines without the message are ignored; dmesg prefixes, quoting and a missing stamp are fine."""
    lines = [
        "[    0.000000] Linux version 5.10.0",
        "> > > [ 56.146336] page_enc_status_hc invoked, gpa = 1f018000, npages = 1, enc = 0",
        "kvm_amd: page_enc_status_hc invoked, gpa = 0x2000, npages = 0x2, enc = 0  ",
        "",
    ]
    parsed = parse_log(lines)
    assert parsed.malformed == []
    assert [(e.line, e.timestamp, e.gfn, e.npages) for e in parsed.events] == [
        (2, 56.146336, 0x1F018, 1),
        (3, None, 2, 2),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "[ 1.0] page_enc_status_hc invoked, gpa = zz000, npages = 1, enc = 0",
        "[ 1.0] page_enc_status_hc invoked, gpa = 1000, npages = 1",
        "[ 1.0] page_enc_status_hc invoked, gpa = 1000, npages = 1, enc = 0 trailing",
        "[ 1.0] page_enc_status_hc invoked, gpa = 1000, npages = -1, enc = 0",
        "[ 1.0] page_enc_status_hc invoked",
    ],
)
def test_malformed_line_is_reported_with_its_number_and_skipped(text: str) -> None:
    """A hypercall line that does not parse is reported with its line number; the others still apply."""
    parsed = parse_log([LINE, text, LINE.replace("enc = 1", "enc = 0")])
    assert parsed.malformed == [SkippedLine(2, text, "malformed page_enc_status_hc line")]
    assert [e.line for e in parsed.events] == [1, 3]


def test_calls_are_answered_as_v9_svm_page_enc_status_hc() -> None:
    """npages 0 and a range past the bitmap are ignored (returned 0), a wrapping range rejected (-EINVAL)."""
    lines = [
        "page_enc_status_hc invoked, gpa = 1000, npages = 0, enc = 0",  # "if (!npages) return 0;"
        # "if (sev->page_enc_bmap_size < gfn_end) goto unlock; ... return 0;"
        "page_enc_status_hc invoked, gpa = fff000, npages = 2, enc = 0",
        # "if (gfn_end <= gfn_start) return -EINVAL;" (gfn_t wraps)
        "page_enc_status_hc invoked, gpa = 3000, npages = fffffffffffffffe, enc = 0",
        "page_enc_status_hc invoked, gpa = 5000, npages = 1, enc = 0",
    ]
    tracker = make_tracker("ranges", guest_pages=0x1000)
    skipped = replay(parse_log(lines).events, tracker)
    assert [(r.line, r.kind) for r in skipped] == [(1, IGNORED), (2, IGNORED), (3, REJECTED)]
    assert skipped[0].reason == "ignored (returned 0): npages = 0" and skipped[0].text == lines[0]
    assert skipped[1].reason.startswith("ignored (returned 0): gfn 0xfff + npages 0x2 = 0x1001 is past")
    assert skipped[2].reason.startswith("rejected (-EINVAL):")
    assert tracker.shared_ranges() == [(5, 1)]


def test_nonzero_enc_means_private_and_unaligned_gpa_truncates() -> None:
    """enc is tested for nonzero as the kernel did, and a gpa is truncated to its frame."""
    ev = parse_line("page_enc_status_hc invoked, gpa = 1fff, npages = 1, enc = 2", 1)
    assert isinstance(ev, PageEncEvent)
    assert (ev.gfn, ev.shared) == (1, False)


@settings(deadline=None, max_examples=50)
@given(
    usecs=st.integers(0, 10**10),
    gfn=st.integers(0, (1 << 40) - 1),
    npages=st.integers(1, 1 << 20),
    shared=st.booleans(),
)
def test_format_log_line_round_trips(usecs: int, gfn: int, npages: int, shared: bool) -> None:
    """A line written by format_log_line parses back to the same conversion and time stamp."""
    ev = parse_line(format_log_line(usecs, gfn, npages, shared), 1)
    assert isinstance(ev, PageEncEvent)
    assert ev.conversion() == (gfn, npages, shared)
    assert ev.timestamp == pytest.approx(usecs / 1e6)


def test_guest_size_is_inferred_as_a_power_of_two_of_at_least_1g() -> None:
    """The default guest covers the log's highest page, rounded up to a power of two, >= 1 GiB, <= 1 TiB."""
    events = parse_log(seed_lines()).events
    assert inferred_guest_pages(events) == 1 << 18
    far = parse_log(["page_enc_status_hc invoked, gpa = 80000000, npages = 1, enc = 0"]).events
    assert inferred_guest_pages(far) == 1 << 20  # the page at 2 GiB needs a 4 GiB guest
    huge = parse_log(["page_enc_status_hc invoked, gpa = 0, npages = ffffffffffff, enc = 0"]).events
    assert inferred_guest_pages(huge) == 1 << 28  # capped: a bogus npages cannot size a bitmap


@pytest.mark.parametrize(
    ("text", "size"),
    [("1G", 1 << 30), ("64G", 64 << 30), ("1T", 1 << 40), ("512M", 512 << 20), ("4096", 4096), ("2GiB", 2 << 30)],
)
def test_parse_size_accepts_binary_suffixes(text: str, size: int) -> None:
    """Sizes take K/M/G/T/P binary suffixes, optionally followed by B or iB."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1.5G", "abc", "100", "0", "128T", ""])
def test_parse_size_rejects_bad_sizes(text: str) -> None:
    """A size that is not a positive 4 KiB multiple up to 64T is a UsageError."""
    with pytest.raises(UsageError):
        parse_size(text)


def write_seed(tmp_path: Path) -> str:
    path = tmp_path / "boot.log"
    path.write_text(seed_boot_log().read_text())
    return str(path)


def test_cli_json_reports_ranges_trackers_and_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`replay --json` prints one object with the final ranges and every tracker's time and memory."""
    assert main([write_seed(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shared_ranges"] == [list(r) for r in SEED_SHARED]
    assert set(out["trackers"]) == set(TRACKER_KINDS)
    for stats in out["trackers"].values():
        assert stats["seconds"] >= 0 and stats["memory_bytes"] > 0 and stats["poisoned"] is False
    assert out["events"] == 26 and out["malformed"] == [] and out["guest_pages"] == 1 << 18


def test_cli_reports_malformed_lines_in_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Malformed lines appear in the JSON with line, text and reason; the rest replays, marked incomplete."""
    path = tmp_path / "log"
    path.write_text(f"{LINE}\nboot noise\n[ 2.0] page_enc_status_hc invoked, gpa = ??\n")
    assert main([str(path), "--json", "--tracker", "tree"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["malformed"] == [{"line": 3, "text": "[ 2.0] page_enc_status_hc invoked, gpa = ??",
                                 "reason": "malformed page_enc_status_hc line"}]
    assert list(out["trackers"]) == ["tree"]
    assert out["events"] == 1 and out["complete"] is False


def test_cli_table_lists_the_ranges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --json the ranges and the trackers are printed as tables."""
    assert main([write_seed(tmp_path), "--guest-size", "64G"]) == 0
    out = capsys.readouterr().out
    assert "0x1d767" in out and "0x100" in out and "64.0 GiB" in out
    for kind in TRACKER_KINDS:
        assert kind in out


def test_cli_poisoned_trackers_leave_the_final_ranges_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --max-ranges 1 the list and tree poison; the final ranges (the bitmap's) are still reported, exit 0."""
    assert main([write_seed(tmp_path), "--json", "--max-ranges", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trackers"]["ranges"]["poisoned"] and out["trackers"]["tree"]["poisoned"]
    assert not out["trackers"]["bitmap"]["poisoned"]
    assert out["shared_ranges"] == [list(r) for r in SEED_SHARED]


def test_cli_unreadable_log_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unreadable log exits 2 with a one-line error and no traceback."""
    assert main(["/nonexistent/boot.log"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read /nonexistent/boot.log" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("option", [["--guest-size", "12Q"], ["--max-ranges", "0"]])
def test_cli_bad_option_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str]
) -> None:
    """A bad --guest-size or --max-ranges exits 2 with a one-line error."""
    assert main([write_seed(tmp_path), *option]) == 2
    assert capsys.readouterr().err.startswith("testbed replay: error:")


def test_cli_reads_standard_input(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """LOG '-' reads the log from standard input."""
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(seed_lines())))
    assert main(["-", "--json", "--tracker", "bitmap"]) == 0
    assert json.loads(capsys.readouterr().out)["events"] == 26


class _LyingTracker(RangesTracker):
    def shared_ranges(self) -> list[tuple[int, int]]:
        return [(0, 1)]


def test_cli_disagreeing_trackers_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If two unpoisoned trackers end with different ranges, replay says so and exits 1."""
    real = make_tracker

    def rigged(kind: str, *, guest_pages: int, max_ranges: int) -> object:
        if kind == "tree":
            return _LyingTracker(guest_pages, max_ranges)
        return real(kind, guest_pages=guest_pages, max_ranges=max_ranges)

    monkeypatch.setattr("testbed.replay.make_tracker", rigged)
    assert main([write_seed(tmp_path), "--json"]) == 1
    assert "trackers disagree" in capsys.readouterr().err


def test_cli_json_names_the_disagreeing_tracker_and_every_trackers_ranges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--json carries "disagree" and each tracker's own shared_ranges, not only exit 1 and stderr."""
    real = make_tracker

    def rigged(kind: str, *, guest_pages: int, max_ranges: int) -> object:
        if kind == "tree":
            return _LyingTracker(guest_pages, max_ranges)
        return real(kind, guest_pages=guest_pages, max_ranges=max_ranges)

    monkeypatch.setattr("testbed.replay.make_tracker", rigged)
    assert main([write_seed(tmp_path), "--json"]) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["disagree"] == ["tree"]
    assert out["trackers"]["tree"]["shared_ranges"] == [[0, 1]] and out["trackers"]["tree"]["agrees"] is False
    assert out["trackers"]["bitmap"]["shared_ranges"] == [list(r) for r in SEED_SHARED]
    assert out["trackers"]["bitmap"]["agrees"] is True and out["complete"] is True
    assert captured.err.count("\n") == 1 and "tree: its shared ranges are not the model's" in captured.err


def _runs_model(lines: list[str], max_ranges: int) -> tuple[int, list[tuple[int, int]]]:
    """An independent model: the log line after which the shared pages form more than
    `max_ranges` runs, and the runs just before it."""
    shared: set[int] = set()

    def runs() -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for gfn in sorted(shared):
            if out and out[-1][0] + out[-1][1] == gfn:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((gfn, 1))
        return out

    for ev in parse_log(lines).events:
        before = runs()
        pages = set(range(ev.gfn, ev.gfn + ev.npages))
        shared = shared | pages if ev.shared else shared - pages
        if len(runs()) > max_ranges:
            return ev.line, before
    raise AssertionError("never exceeds")


def test_cli_poisoned_trackers_are_checked_against_the_frozen_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """List and tree poison at the same event, the model's, and keep its state from just before (tracker/base.py)."""
    line, frozen = _runs_model(seed_lines(), 1)
    assert main([write_seed(tmp_path), "--json", "--max-ranges", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["poison_line"] == line
    for kind in ("ranges", "tree"):
        tracker = out["trackers"][kind]
        assert tracker["poisoned"] and tracker["poisoned_at_line"] == line and tracker["agrees"], kind
        assert tracker["shared_ranges"] == [list(r) for r in frozen], kind
    assert out["trackers"]["bitmap"]["poisoned_at_line"] is None and out["complete"] is True


class _StaleTracker(RangesTracker):
    """A list tracker whose poisoned snapshot forgets its last record."""

    def shared_ranges(self) -> list[tuple[int, int]]:
        ranges = super().shared_ranges()
        return ranges[:-1] if self.poisoned else ranges


def test_cli_a_poisoned_tracker_with_a_wrong_snapshot_disagrees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poisoned tracker is compared, not excused: a wrong frozen snapshot exits 1 and is named."""
    real = make_tracker

    def rigged(kind: str, *, guest_pages: int, max_ranges: int) -> object:
        if kind == "ranges":
            return _StaleTracker(guest_pages, max_ranges)
        return real(kind, guest_pages=guest_pages, max_ranges=max_ranges)

    monkeypatch.setattr("testbed.replay.make_tracker", rigged)
    assert main([write_seed(tmp_path), "--json", "--max-ranges", "2"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["disagree"] == ["ranges"]
    assert out["trackers"]["ranges"]["problem"].startswith("its poisoned snapshot is not the state before line")


BINARY = bytes(range(256)) * 12  # NULs, control bytes, invalid UTF-8: like `head -c 3000 /bin/ls`


def test_cli_binary_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file without one page_enc_status_hc line (a binary) exits 2 with one line, not "0 events" and 0."""
    path = tmp_path / "ls.bin"
    path.write_bytes(BINARY)
    assert main([str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"testbed replay: error: {path}: no page_enc_status_hc line in its ")
    assert "Traceback" not in captured.err


def test_cli_log_with_only_malformed_hypercall_lines_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """When no hypercall line parses the replay exits 2 naming the first as LOG:LINE."""
    path = tmp_path / "boot.log"
    path.write_text("noise\n[ 1.0] page_enc_status_hc invoked, gpa = zz\n[ 1.1] page_enc_status_hc invoked\n")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"testbed replay: error: {path}:2: malformed page_enc_status_hc line "
                   "(none of the 2 page_enc_status_hc lines parses)\n")


def test_cli_reads_invalid_utf8_from_standard_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bytes that are not UTF-8 on stdin are replaced, as in a file: no UnicodeDecodeError."""
    data = b"\xe9t\xe9 latin-1 noise\n" + LINE.encode() + b"\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    assert main(["-", "--json", "--tracker", "bitmap"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["events"] == 1 and out["shared_ranges"] == []


def test_cli_line_numbers_count_newlines_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A form feed or a lone CR inside a line does not shift LOG:LINE (str.splitlines would)."""
    path = tmp_path / "boot.log"
    path.write_bytes(b"noise\x0cmore\rstill line 1\r\n[ 2.0] page_enc_status_hc invoked, gpa = ??\r\n"
                     + LINE.encode() + b"\r\n")
    assert main([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [m["line"] for m in out["malformed"]] == [2]
    assert out["events"] == 1


def test_cli_labels_ignored_and_rejected_calls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The table and JSON call a past-the-bitmap or empty call "ignored (returned 0)", a wrap "-EINVAL"."""
    path = tmp_path / "boot.log"
    path.write_text("\n".join([
        LINE,
        "[ 2.0] page_enc_status_hc invoked, gpa = 2000, npages = 0, enc = 0",
        "[ 3.0] page_enc_status_hc invoked, gpa = 3000, npages = ffffffffffffffff, enc = 0",
        "[ 4.0] page_enc_status_hc invoked, gpa = 40000000, npages = 1, enc = 0",
    ]) + "\n")
    assert main([str(path), "--guest-size", "1G"]) == 0
    out = capsys.readouterr().out
    assert f"{path}:2: ignored (returned 0): npages = 0:" in out
    assert f"{path}:3: rejected (-EINVAL): gfn 0x3 + npages 0xffffffffffffffff wraps past 2^64:" in out
    assert f"{path}:4: ignored (returned 0): gfn 0x40000 + npages 0x1 = 0x40001 is past" in out
    assert main([str(path), "--json", "--guest-size", "1G"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [m["line"] for m in result["ignored"]] == [2, 4] and [m["line"] for m in result["rejected"]] == [3]
    assert result["applied"] == 1


def test_inferred_guest_size_ignores_calls_kvm_does_not_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrapping range does not inflate the inferred guest; a call past the 1 TiB cap says --guest-size."""
    path = tmp_path / "boot.log"
    path.write_text("page_enc_status_hc invoked, gpa = 5000, npages = 1, enc = 0\n"
                    "page_enc_status_hc invoked, gpa = 3000, npages = ffffffffffffffff, enc = 0\n")
    assert main([str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["guest_pages"] == 1 << 18
    path.write_text("page_enc_status_hc invoked, gpa = 5000, npages = 1, enc = 0\n"
                    "page_enc_status_hc invoked, gpa = 20000000000, npages = 1, enc = 0\n")
    assert main([str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["guest_pages"] == 1 << 28 and result["guest_size_inferred"] is True
    assert "give --guest-size" in result["ignored"][0]["reason"]


def test_add_replay_subparser_registers_an_int_returning_handler() -> None:
    """The subparser registers `replay` with its options and func=run_replay."""
    parser = argparse.ArgumentParser(prog="testbed")
    add_replay_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["replay", "x.log", "--tracker", "ranges", "--guest-size", "1T", "--max-ranges", "9"])
    assert args.func is run_replay
    assert (args.log, args.tracker, args.guest_size, args.max_ranges, args.json) == ("x.log", "ranges", "1T", 9, False)
    assert parser.parse_args(["replay", "x.log"]).tracker == "all"
