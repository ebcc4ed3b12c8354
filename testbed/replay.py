"""Replays a guest's logged page-encryption hypercalls into the shared-page trackers.

The SEV live-migration series logged every hypercall from KVM as

    [   56.146336] page_enc_status_hc invoked, gpa = 1f018000, npages = 1, enc = 1

with gpa and npages printed by %lx (hexadecimal, no 0x) and enc 1 = private (encrypted),
0 = shared. This module owns that format both ways (`parse_log`, `format_log_line`), turns the
lines into conversions, applies them to trackers (`replay`), and provides the `testbed replay`
subcommand that compares the trackers on a real log (testbed/data/seed_boot.log is the seed
thread's excerpt).

What the host did with each call is modelled as KVM did it: the GFN is gpa >> PAGE_SHIFT
(an unaligned gpa is truncated, as gpa_to_gfn does), any nonzero enc means encrypted (the
handler tested `if (enc)`), and a call with npages = 0 or reaching past guest memory was
printed *and then* refused with -EINVAL -- so replay reports it as rejected and applies nothing.
A line that mentions page_enc_status_hc but does not parse is reported with its line number and
skipped; it never stops the replay.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable

from testbed import options
from testbed.errors import TestbedError, UsageError
from testbed.tracker import (
    DEFAULT_MAX_RANGES,
    TRACKER_KINDS,
    Conversion,
    InvalidRangeError,
    SharedTracker,
    check_range,
    make_tracker,
)

PAGE_SHIFT = 12  # x86: 4 KiB pages

_MARK = "page_enc_status_hc invoked"
_BODY = re.compile(
    r"page_enc_status_hc invoked, gpa = (?:0x)?(?P<gpa>[0-9a-fA-F]+), "
    r"npages = (?:0x)?(?P<npages>[0-9a-fA-F]+), enc = (?P<enc>\d+)\s*$"
)
_STAMP = re.compile(r"\[\s*(\d+\.\d+)\]")

#: A guest size inferred from a log is rounded up to a power of two, at least this (1 GiB)...
MIN_INFERRED_GUEST_BYTES = 1 << 30
#: ...and at most this (1 TiB): a hostile or corrupt npages must not make the replay allocate
#: a bitmap for exabytes. Calls past it are rejected, as KVM rejects calls outside its memslots.
MAX_INFERRED_GUEST_BYTES = 1 << 40
#: --guest-size may go up to 64 TiB (a 2 GiB bitmap).
MAX_GUEST_BYTES = 1 << 46


@dataclass(frozen=True)
class PageEncEvent:
    """One logged hypercall: `npages` pages from `gpa` made private (enc != 0) or shared."""

    line: int
    timestamp: float | None
    gpa: int
    npages: int
    enc: int
    text: str = field(default="", compare=False, repr=False)  # the line as logged

    @property
    def gfn(self) -> int:
        return self.gpa >> PAGE_SHIFT

    @property
    def shared(self) -> bool:
        return self.enc == 0

    def conversion(self) -> Conversion:
        return (self.gfn, self.npages, self.enc == 0)


@dataclass(frozen=True)
class SkippedLine:
    """A line not applied: malformed text, or a call the host refuses (`reason` says which)."""

    line: int
    text: str
    reason: str


@dataclass(frozen=True)
class ParsedLog:
    """The hypercall events of a log, in order, and the malformed lines that mention one."""

    events: list[PageEncEvent]
    malformed: list[SkippedLine]


def parse_line(text: str, line: int) -> PageEncEvent | SkippedLine | None:
    """Parse one log line: an event, a malformed-line report, or None if it is not a hypercall line."""
    at = text.find(_MARK)
    if at < 0:
        return None
    body = _BODY.match(text, at)
    if body is None:
        return SkippedLine(line, text.rstrip("\n"), "malformed page_enc_status_hc line")
    for name, digits in (("gpa", 16), ("npages", 16), ("enc", 20)):
        # The kernel printed 64-bit values (%lx of an unsigned long; enc by %d); a longer
        # field is corrupt, and int() refuses over 4,300 decimal digits anyway.
        significant = body[name].lstrip("0")
        if len(significant) > digits or (name == "enc" and int(significant or "0") >= 1 << 64):
            return SkippedLine(line, text.rstrip("\n"),
                               f"malformed page_enc_status_hc line: {name} has {len(significant)} significant "
                               "digits, more than the 64-bit value the kernel printed")
    stamps = _STAMP.findall(text, 0, at)
    try:
        timestamp = float(stamps[-1]) if stamps else None
    except ValueError:  # pragma: no cover - the pattern admits only digits and a dot
        timestamp = None
    return PageEncEvent(
        line=line,
        timestamp=timestamp,
        gpa=int(body["gpa"], 16),
        npages=int(body["npages"], 16),
        enc=int(body["enc"]),
        text=text.rstrip("\n"),
    )


def parse_log(lines: Iterable[str]) -> ParsedLog:
    """Parse log lines (numbered from 1); lines without the hypercall message are ignored."""
    events: list[PageEncEvent] = []
    malformed: list[SkippedLine] = []
    for n, text in enumerate(lines, 1):
        item = parse_line(text, n)
        if isinstance(item, PageEncEvent):
            events.append(item)
        elif item is not None:
            malformed.append(item)
    return ParsedLog(events, malformed)


def format_log_line(usecs: int, gfn: int, npages: int, shared: bool) -> str:
    """One line as the kernel printed it: printk time stamp, %lx gpa and npages, enc 0 = shared."""
    return (
        f"[{usecs // 1_000_000:5d}.{usecs % 1_000_000:06d}] {_MARK}, "
        f"gpa = {gfn << PAGE_SHIFT:x}, npages = {npages:x}, enc = {0 if shared else 1}"
    )


def seed_boot_log() -> Traversable:
    """The seed thread's boot log excerpt, shipped as package data."""
    return resources.files("testbed") / "data" / "seed_boot.log"


def prepare(events: Iterable[PageEncEvent], guest_pages: int) -> tuple[list[Conversion], list[SkippedLine]]:
    """Split events into the conversions a host applies and the calls it refuses (-EINVAL)."""
    conversions: list[Conversion] = []
    rejected: list[SkippedLine] = []
    for ev in events:
        try:
            check_range(ev.gfn, ev.npages, guest_pages)
        except InvalidRangeError as err:
            text = ev.text or format_log_line(0, ev.gfn, ev.npages, ev.shared)
            rejected.append(SkippedLine(ev.line, text, str(err)))
            continue
        conversions.append(ev.conversion())
    return conversions, rejected


def replay(events: Iterable[PageEncEvent], tracker: SharedTracker) -> list[SkippedLine]:
    """Apply the events to `tracker` in order; return the ones refused (not applied)."""
    conversions, rejected = prepare(events, tracker.guest_pages)
    tracker.apply(conversions)
    return rejected


def inferred_guest_pages(events: Iterable[PageEncEvent]) -> int:
    """The smallest power-of-two guest (>= 1 GiB, <= 1 TiB) holding every event's pages."""
    top = max((ev.gfn + ev.npages for ev in events), default=0)
    pages = MIN_INFERRED_GUEST_BYTES >> PAGE_SHIFT
    while pages < top and pages < MAX_INFERRED_GUEST_BYTES >> PAGE_SHIFT:
        pages <<= 1
    return pages


def parse_size(text: str) -> int:
    """Bytes from '1G', '64G', '1T', '512M', '4096' (binary units, as testbed.options parses
    every size); UsageError unless a positive multiple of 4 KiB up to 64 TiB."""
    size = options.parse_size(text, "guest size")
    if size % (1 << PAGE_SHIFT):
        raise UsageError(f"guest size {text!r}: must be a positive multiple of 4 KiB")
    if size > MAX_GUEST_BYTES:
        raise UsageError(f"guest size {text!r}: at most 64T")
    return size


def _human(nbytes: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f} {unit}"
    return f"{nbytes} B"


@dataclass(frozen=True)
class TrackerRun:
    """One tracker's replay: how long apply() took, what it holds, what it costs."""

    name: str
    seconds: float
    memory_bytes: int
    poisoned: bool
    shared_ranges: list[tuple[int, int]]


def run_trackers(
    conversions: Sequence[Conversion], kinds: Iterable[str], guest_pages: int, max_ranges: int
) -> list[TrackerRun]:
    """Replay `conversions` into a fresh tracker of each kind, timing only the tracker's work."""
    runs = []
    for kind in kinds:
        tracker = make_tracker(kind, guest_pages=guest_pages, max_ranges=max_ranges)
        start = time.perf_counter()
        tracker.apply(conversions)
        seconds = time.perf_counter() - start
        runs.append(
            TrackerRun(kind, seconds, tracker.memory_bytes(), tracker.poisoned, tracker.shared_ranges())
        )
    return runs


def add_replay_subparser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register `testbed replay LOG [--tracker ...] [--guest-size SIZE] [--max-ranges N] [--json]`."""
    parser = subparsers.add_parser(
        "replay",
        help="replay a kernel log of page_enc_status_hc hypercalls into the shared-page trackers",
        description=(
            "Replay the page_enc_status_hc lines of a kernel log (other lines are ignored) into the "
            "shared-page trackers and print the final shared ranges with each tracker's time and memory. "
            "With every tracker (the default), check that they agree."
        ),
    )
    parser.add_argument("log", metavar="LOG", help="kernel log file, or - for standard input")
    parser.add_argument(
        "--tracker",
        choices=[*TRACKER_KINDS, "all"],
        default="all",
        help="tracker to replay into (default: all, and compare them)",
    )
    parser.add_argument(
        "--guest-size",
        metavar="SIZE",
        help="guest memory size such as 1G, 64G, 1T (default: the log's highest page, "
        "rounded up to a power of two, at least 1G)",
    )
    parser.add_argument(
        "--max-ranges",
        metavar="N",
        type=int,
        default=DEFAULT_MAX_RANGES,
        help=f"record bound of the list and tree trackers (default: {DEFAULT_MAX_RANGES})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.set_defaults(func=run_replay)
    return parser


def _read_lines(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None


def run_replay(args: argparse.Namespace) -> int:
    """The `testbed replay` handler: 0 ok, 1 trackers disagree, 2 usage error."""
    try:
        max_ranges = options.parse_int(args.max_ranges, "--max-ranges", range(1, options.MAX_MAX_RANGES + 1))
        parsed = parse_log(_read_lines(args.log))
        if args.guest_size is not None:
            guest_pages = parse_size(args.guest_size) >> PAGE_SHIFT
        else:
            guest_pages = inferred_guest_pages(parsed.events)
        kinds = list(TRACKER_KINDS) if args.tracker == "all" else [args.tracker]
        conversions, rejected = prepare(parsed.events, guest_pages)
        runs = run_trackers(conversions, kinds, guest_pages, max_ranges)
    except TestbedError as err:
        print(f"testbed replay: error: {err}", file=sys.stderr)
        return 2

    # Trackers must agree on the final state; a poisoned one holds a stale snapshot by design
    # (tracker/base.py), so it is reported, not compared.
    trusted = [r for r in runs if not r.poisoned]
    reference = trusted[0] if trusted else runs[0]
    disagree = [r.name for r in trusted if r.shared_ranges != reference.shared_ranges]
    if args.json:
        print(
            json.dumps(
                {
                    "shared_ranges": [list(r) for r in reference.shared_ranges],
                    "trackers": {
                        r.name: {"seconds": r.seconds, "memory_bytes": r.memory_bytes, "poisoned": r.poisoned}
                        for r in runs
                    },
                    "malformed": [{"line": m.line, "text": m.text} for m in parsed.malformed],
                    "rejected": [{"line": m.line, "text": m.text, "reason": m.reason} for m in rejected],
                    "events": len(parsed.events),
                    "guest_pages": guest_pages,
                    "complete": bool(trusted),
                }
            )
        )
    else:
        _print_tables(
            source=args.log, parsed=parsed, rejected=rejected, runs=runs, reference=reference,
            guest_pages=guest_pages,
        )
    if disagree:
        names = ", ".join(sorted({reference.name, *disagree}))
        print(f"testbed replay: error: trackers disagree on the shared ranges ({names})", file=sys.stderr)
        return 1
    return 0


def _print_tables(
    *,
    source: str,
    parsed: ParsedLog,
    rejected: list[SkippedLine],
    runs: list[TrackerRun],
    reference: TrackerRun,
    guest_pages: int,
) -> None:
    from testbed.textout import plain_console, plain_table

    # The source path and the log's own lines are printed literally (textout.py).
    console = plain_console(sys.stdout)
    ranges = plain_table(
        f"shared ranges after {len(parsed.events)} events",
        "gfn", "npages", "gpa range",
        caption=f"{source}, guest {_human(guest_pages << PAGE_SHIFT)}, from {reference.name}"
        f"{' (POISONED: a stale snapshot)' if reference.poisoned else ''}",
        right=("gfn", "npages", "gpa range"),
    )
    shown = reference.shared_ranges[:50]
    for gfn, npages in shown:
        ranges.add_row(
            f"0x{gfn:x}", f"0x{npages:x}", f"0x{gfn << PAGE_SHIFT:x}-0x{((gfn + npages) << PAGE_SHIFT) - 1:x}"
        )
    if len(reference.shared_ranges) > len(shown):
        ranges.add_row("...", f"{len(reference.shared_ranges) - len(shown)} more", "")
    console.print(ranges)
    columns = ("tracker", "replay time", "memory", "poisoned", "ranges")
    table = plain_table("trackers", *columns, right=columns)
    for r in runs:
        table.add_row(
            r.name, f"{r.seconds * 1e6:.1f} µs", _human(r.memory_bytes), "yes" if r.poisoned else "no",
            str(len(r.shared_ranges)),
        )
    console.print(table)
    for item in [*parsed.malformed, *rejected]:
        console.print(f"{source}:{item.line}: {item.reason}: {_clip(item.text)}", soft_wrap=True)


def _clip(text: str, limit: int = 300) -> str:
    """A log line for a message: cut in the middle when longer than `limit` characters."""
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}...({len(text) - limit} characters)...{text[-(limit // 2):]}"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m testbed.replay LOG ...`, the same as `testbed replay LOG ...`."""
    parser = argparse.ArgumentParser(prog="testbed")
    add_replay_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["replay", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
