"""Tests of testbed/replay.py: the page_enc_status_hc log format, replay, and `testbed replay`.

1. The seed's boot log parses to 26 events and replays to the same three shared ranges in
   every tracker.
2. Odd lines: other messages are ignored; a malformed hypercall line is reported with its line
   number and skipped; calls KVM would refuse (npages 0, outside guest memory) are rejected.
3. The subcommand: JSON and table output, exit 0 / 1 (trackers disagree) / 2 (usage error).
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


def test_calls_kvm_refuses_are_rejected_not_applied() -> None:
    """npages = 0 and a range past guest memory are rejected, as KVM returns -EINVAL."""
    lines = [
        "page_enc_status_hc invoked, gpa = 1000, npages = 0, enc = 0",
        "page_enc_status_hc invoked, gpa = fff000, npages = 2, enc = 0",
        "page_enc_status_hc invoked, gpa = 5000, npages = 1, enc = 0",
    ]
    tracker = make_tracker("ranges", guest_pages=0x1000)
    rejected = replay(parse_log(lines).events, tracker)
    assert [(r.line, r.reason.split(" =")[0]) for r in rejected] == [(1, "npages"), (2, "gfn+npages")]
    assert rejected[0].text == lines[0]
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
    """Malformed lines appear in the JSON with their line number and text; the replay still succeeds."""
    path = tmp_path / "log"
    path.write_text(f"{LINE}\nboot noise\n[ 2.0] page_enc_status_hc invoked, gpa = ??\n")
    assert main([str(path), "--json", "--tracker", "tree"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["malformed"] == [{"line": 3, "text": "[ 2.0] page_enc_status_hc invoked, gpa = ??"}]
    assert list(out["trackers"]) == ["tree"]


def test_cli_table_lists_the_ranges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --json the ranges and the trackers are printed as tables."""
    assert main([write_seed(tmp_path), "--guest-size", "64G"]) == 0
    out = capsys.readouterr().out
    assert "0x1d767" in out and "0x100" in out and "64.0 GiB" in out
    for kind in TRACKER_KINDS:
        assert kind in out


def test_cli_poisoned_trackers_are_reported_not_compared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --max-ranges 1 the list and tree poison; the bitmap's ranges are reported, exit 0."""
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


def test_add_replay_subparser_registers_an_int_returning_handler() -> None:
    """The subparser registers `replay` with its options and func=run_replay."""
    parser = argparse.ArgumentParser(prog="testbed")
    add_replay_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["replay", "x.log", "--tracker", "ranges", "--guest-size", "1T", "--max-ranges", "9"])
    assert args.func is run_replay
    assert (args.log, args.tracker, args.guest_size, args.max_ranges, args.json) == ("x.log", "ranges", "1T", 9, False)
    assert parser.parse_args(["replay", "x.log"]).tracker == "all"
