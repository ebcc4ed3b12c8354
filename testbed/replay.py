"""Replays a guest's logged page-encryption hypercalls into the shared-page trackers.

The seed thread (re: "[PATCH v2 1/9] KVM: x86: Add AMD SEV specific Hypercall3", Dec 2020 -
Jan 2021) quotes Ashish Kalra's log of every KVM_HC_PAGE_ENC_STATUS call of a booting guest:

    [   56.146336] page_enc_status_hc invoked, gpa = 1f018000, npages = 1, enc = 1

The printk that wrote it is not in the series' patches (v6's and v9's svm_page_enc_status_hc()
print nothing), so its format is inferred from the output: gpa is hexadecimal without 0x
(1f018000 has a letter, and every gpa of the log ends in 000, page-aligned), and npages is
*assumed* to be printed the same way, %lx - the seed's "npages = 100" fits 0x100 = 256 pages as
well as 100 pages, so that reading is an assumption, not a fact. enc is read as decimal digits;
only whether it is nonzero matters, which is the same in either base. This module owns that
format both ways (`parse_log`, `format_log_line`), turns the lines into conversions, applies
them to trackers (`replay`), and provides the `testbed replay` subcommand that compares the
trackers on a real log (testbed/data/seed_boot.log is the seed thread's excerpt).

What the host did with each call is modelled on the series' v9 (8 Dec 2020), patch 08/18,
svm_page_enc_status_hc() (kvm/hypercall.py `page_enc_status_hc` models the same function in
the VM), with KVM's bitmap `guest_pages` long (sized from the memslots, 12/18), and assuming
the printk ran on entry, before any check:

* the GFN is gpa >> PAGE_SHIFT (``gfn_start = gpa_to_gfn(gpa)``: an unaligned gpa is
  truncated), and any nonzero enc means encrypted (``if (enc)``);
* ``if (!npages) return 0;`` - *ignored (returned 0)*: nothing applied;
* ``if (gfn_end <= gfn_start) return -EINVAL;`` - a range that wraps past 2^64 is *rejected
  (-EINVAL)*, the only call refused;
* ``if (sev->page_enc_bmap_size < gfn_end) goto unlock; ... return 0;`` - a range reaching past
  the bitmap is *ignored (returned 0)*, dropped whole;
* the gfn_to_pfn() memslot checks are not replayed (the log does not say which GFNs had a
  memslot; they refuse only a GFN whose memslot could not be faulted in).

A line that mentions page_enc_status_hc but does not parse is *malformed*: reported with its
line number and reason and skipped; the replay is then incomplete (`complete` false). A log
with no page_enc_status_hc line at all, or none that parses, is an error (exit 2)."""

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
    RangesTracker,
    SharedTracker,
    make_tracker,
)
from testbed.x86 import U64

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
#: a bitmap for exabytes. Calls past it are ignored, as KVM ignores calls past its bitmap.
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


#: SkippedLine.kind: the line does not parse / KVM answers -EINVAL / KVM answers 0, applies nothing.
MALFORMED, REJECTED, IGNORED = "malformed", "rejected", "ignored"


@dataclass(frozen=True)
class SkippedLine:
    """A line not applied: `kind` says why (MALFORMED, REJECTED, IGNORED), `reason` in words."""

    line: int
    text: str
    reason: str
    kind: str = MALFORMED


@dataclass(frozen=True)
class ParsedLog:
    """The hypercall events of a log, in order, the malformed lines that mention one, and how
    many lines the log has."""

    events: list[PageEncEvent]
    malformed: list[SkippedLine]
    lines: int = 0


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
    # gpa and npages are read as the kernel's %lx: certain for gpa, an assumption for npages
    # (module doc: the printk is not in the series).
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
    n = 0
    for n, text in enumerate(lines, 1):
        item = parse_line(text, n)
        if isinstance(item, PageEncEvent):
            events.append(item)
        elif item is not None:
            malformed.append(item)
    return ParsedLog(events, malformed, n)


def format_log_line(usecs: int, gfn: int, npages: int, shared: bool) -> str:
    """One line as the kernel printed it: printk time stamp, %lx gpa and npages, enc 0 = shared."""
    return (
        f"[{usecs // 1_000_000:5d}.{usecs % 1_000_000:06d}] {_MARK}, "
        f"gpa = {gfn << PAGE_SHIFT:x}, npages = {npages:x}, enc = {0 if shared else 1}"
    )


def seed_boot_log() -> Traversable:
    """The seed thread's boot log excerpt, shipped as package data."""
    return resources.files("testbed") / "data" / "seed_boot.log"


@dataclass(frozen=True)
class Prepared:
    """What KVM did with each event: the conversions it applied (with their log lines), the
    calls it refused with -EINVAL and the ones it answered 0 without applying anything."""

    conversions: list[Conversion]
    lines: list[int]
    rejected: list[SkippedLine]
    ignored: list[SkippedLine]

    @property
    def skipped(self) -> list[SkippedLine]:
        """The rejected and ignored calls, in log order."""
        return sorted([*self.rejected, *self.ignored], key=lambda s: s.line)


def kvm_answer(gfn: int, npages: int, guest_pages: int) -> tuple[str, str] | None:
    """What v9's svm_page_enc_status_hc() does with `npages` pages from `gfn` and a bitmap of
    `guest_pages` bits: None if it applies them, else (REJECTED or IGNORED, the reason)."""
    if not npages:
        return IGNORED, "ignored (returned 0): npages = 0"  # if (!npages) return 0;
    end = (gfn + npages) & U64
    if end <= gfn:  # if (gfn_end <= gfn_start) return -EINVAL;
        return REJECTED, f"rejected (-EINVAL): gfn 0x{gfn:x} + npages 0x{npages:x} wraps past 2^64"
    if guest_pages < end:  # if (sev->page_enc_bmap_size < gfn_end) goto unlock; ... return 0;
        return IGNORED, (f"ignored (returned 0): gfn 0x{gfn:x} + npages 0x{npages:x} = 0x{end:x} is past the "
                         f"page-encryption bitmap (0x{guest_pages:x} pages)")
    return None


def prepare(events: Iterable[PageEncEvent], guest_pages: int, hint: str = "") -> Prepared:
    """Split events into the conversions KVM applies and the calls it refuses or ignores
    (`kvm_answer`); `hint` is added to the reason of a call past the bitmap."""
    conversions: list[Conversion] = []
    lines: list[int] = []
    rejected: list[SkippedLine] = []
    ignored: list[SkippedLine] = []
    for ev in events:
        answer = kvm_answer(ev.gfn, ev.npages, guest_pages)
        if answer is None:
            conversions.append(ev.conversion())
            lines.append(ev.line)
            continue
        kind, reason = answer
        if kind == IGNORED and ev.npages and hint:
            reason = f"{reason}; {hint}"
        text = ev.text or format_log_line(0, ev.gfn, ev.npages, ev.shared)
        (rejected if kind == REJECTED else ignored).append(SkippedLine(ev.line, text, reason, kind))
    return Prepared(conversions, lines, rejected, ignored)


def replay(events: Iterable[PageEncEvent], tracker: SharedTracker) -> list[SkippedLine]:
    """Apply the events to `tracker` in order as KVM would (`kvm_answer`, the tracker's size
    standing for the bitmap's); return the calls not applied (rejected or ignored)."""
    prepared = prepare(events, tracker.guest_pages)
    tracker.apply(prepared.conversions)
    return prepared.skipped


def inferred_guest_pages(events: Iterable[PageEncEvent]) -> int:
    """The smallest power-of-two guest (>= 1 GiB, <= 1 TiB) holding every event's pages; calls
    KVM never applies (npages 0, a range that wraps) do not count."""
    top = max((ev.gfn + ev.npages for ev in events if ev.npages and ev.gfn + ev.npages <= U64), default=0)
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
    """One tracker's replay: how long apply() took, what it holds, what it costs, and (when it
    poisoned) the index of the conversion that poisoned it."""

    name: str
    seconds: float
    memory_bytes: int
    poisoned: bool
    shared_ranges: list[tuple[int, int]]
    poisoned_at: int | None = None


def run_trackers(
    conversions: Sequence[Conversion], kinds: Iterable[str], guest_pages: int, max_ranges: int
) -> list[TrackerRun]:
    """Replay `conversions` into a fresh tracker of each kind, timing only the tracker's work.
    A tracker that ends poisoned is replayed again, untimed, one conversion at a time, to find
    the conversion that poisoned it."""
    runs = []
    for kind in kinds:
        tracker = make_tracker(kind, guest_pages=guest_pages, max_ranges=max_ranges)
        start = time.perf_counter()
        tracker.apply(conversions)
        seconds = time.perf_counter() - start
        poisoned_at = None
        if tracker.poisoned:
            poisoned_at = _poison_index(make_tracker(kind, guest_pages=guest_pages, max_ranges=max_ranges),
                                        conversions)
        runs.append(TrackerRun(kind, seconds, tracker.memory_bytes(), tracker.poisoned, tracker.shared_ranges(),
                               poisoned_at))
    return runs


def _poison_index(tracker: SharedTracker, conversions: Sequence[Conversion]) -> int | None:
    """The index of the first conversion after which `tracker` is poisoned, or None."""
    for i, (gfn, npages, shared) in enumerate(conversions):
        tracker.convert(gfn, npages, shared)
        if tracker.poisoned:
            return i
    return None


#: Tracker kinds that never poison: a bitmap is bounded by its size (tracker/base.py).
NEVER_POISONS = frozenset({"bitmap", "native-bitmap"})


@dataclass(frozen=True)
class Expected:
    """What every tracker must hold after the replay, from a model that has no record bound
    (the list tracker of tracker/ranges.py, bound raised past any count the log can reach: a
    conversion adds at most one record): `final`, its shared ranges after every conversion;
    `poison_index`, the first conversion after which it holds more than max_ranges records -
    where a bounded tracker must poison (tracker/base.py) - and `frozen`, its shared ranges
    just before that conversion, the snapshot a poisoned tracker must keep."""

    final: list[tuple[int, int]]
    poison_index: int | None
    frozen: list[tuple[int, int]] | None


def expected_state(conversions: Sequence[Conversion], guest_pages: int, max_ranges: int) -> Expected:
    """Replay `conversions` into the unbounded model, one at a time (see Expected)."""
    unbounded = len(conversions) + 1
    model = RangesTracker(guest_pages, unbounded)
    poison_index = None
    for i, (gfn, npages, shared) in enumerate(conversions):
        model.convert(gfn, npages, shared)
        if poison_index is None and model.range_count() > max_ranges:
            poison_index = i
    frozen = None
    if poison_index is not None:
        before = RangesTracker(guest_pages, unbounded)
        before.apply(conversions[:poison_index])
        frozen = before.shared_ranges()
    return Expected(model.shared_ranges(), poison_index, frozen)


def check_run(run: TrackerRun, expected: Expected, lines: Sequence[int], max_ranges: int) -> str | None:
    """How `run` departs from `expected` (None when it does not): a tracker that poisons must
    poison at the model's event and keep the model's state from just before it; one that does
    not must end with the model's final state. `lines` maps conversion indexes to log lines."""
    def at(index: int | None) -> str:
        return "no line (replayed one by one it never poisons)" if index is None else f"line {lines[index]}"

    if run.name in NEVER_POISONS:
        if run.poisoned:
            return "poisoned, though a bitmap never poisons"
    elif run.poisoned:
        if expected.poison_index is None or expected.frozen is None:
            return f"poisoned at {at(run.poisoned_at)}, though no event leaves more than {max_ranges} records"
        if run.poisoned_at != expected.poison_index:
            return (f"poisoned at {at(run.poisoned_at)}, not at {at(expected.poison_index)} where the records "
                    f"first exceed {max_ranges}")
        if run.shared_ranges != expected.frozen:
            return f"its poisoned snapshot is not the state before {at(expected.poison_index)}"
        return None
    elif expected.poison_index is not None:
        return f"not poisoned, though the records exceed {max_ranges} at {at(expected.poison_index)}"
    if run.shared_ranges != expected.final:
        return "its shared ranges are not the model's"
    return None


def add_replay_subparser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register `testbed replay LOG [--tracker ...] [--guest-size SIZE] [--max-ranges N] [--json]`."""
    parser = subparsers.add_parser(
        "replay",
        help="replay a kernel log of page_enc_status_hc hypercalls into the shared-page trackers",
        description=(
            "Replay the page_enc_status_hc lines of a kernel log (other lines are ignored) into the "
            "shared-page trackers as the SEV live-migration series (v9) handled them, check every tracker "
            "against an unbounded model (poisoned ones against the model's state where they had to poison), "
            "and print the final shared ranges with each tracker's time and memory. "
            "Exit 0 all agree, 1 a tracker disagrees, 2 usage error or a log with no usable line."
        ),
    )
    parser.add_argument("log", metavar="LOG", help="kernel log file, or - for standard input")
    parser.add_argument(
        "--tracker",
        choices=[*TRACKER_KINDS, "all"],
        default="all",
        help="tracker to replay into (default: all)",
    )
    parser.add_argument(
        "--guest-size",
        metavar="SIZE",
        help="guest memory size, the page-encryption bitmap's, such as 1G, 64G, 1T (default: the log's "
        "highest page, rounded up to a power of two, at least 1G, at most 1T)",
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
    """The log's lines, split at line feeds only (so LOG:LINE is what `sed -n LINEp` shows), a
    trailing carriage return dropped; bytes that are not UTF-8 are replaced, from a file or
    standard input alike."""
    if path == "-":
        stdin = sys.stdin
        if stdin is None:
            raise UsageError("cannot read standard input: it is closed")
        try:
            buffer = getattr(stdin, "buffer", None)
            text = buffer.read().decode("utf-8", errors="replace") if buffer is not None else stdin.read()
        except OSError as err:
            raise UsageError(f"cannot read standard input: {err.strerror or err}") from None
    else:
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        except OSError as err:
            raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _source_name(path: str) -> str:
    return "<stdin>" if path == "-" else path


def check_usable(parsed: ParsedLog, source: str) -> None:
    """UsageError, one line, for a log the replay cannot use: no page_enc_status_hc line at all
    (a binary file, the wrong log), or not one that parses."""
    if parsed.events:
        return
    if not parsed.malformed:
        lines = f"{parsed.lines} line{'' if parsed.lines == 1 else 's'}"
        raise UsageError(f"{source}: no page_enc_status_hc line in its {lines} (expected lines like "
                         f"'{_MARK}, gpa = 1f018000, npages = 1, enc = 1')")
    first = parsed.malformed[0]
    count = len(parsed.malformed)
    which = "the page_enc_status_hc line does not parse" if count == 1 else (
        f"none of the {count} page_enc_status_hc lines parses")
    raise UsageError(f"{source}:{first.line}: {first.reason} ({which})")


def run_replay(args: argparse.Namespace) -> int:
    """The `testbed replay` handler: 0 ok, 1 a tracker disagrees with the model, 2 usage error
    or a log without one usable page_enc_status_hc line."""
    source = _source_name(args.log)
    try:
        max_ranges = options.parse_int(args.max_ranges, "--max-ranges", range(1, options.MAX_MAX_RANGES + 1))
        guest_bytes = parse_size(args.guest_size) if args.guest_size is not None else None
        parsed = parse_log(_read_lines(args.log))
        check_usable(parsed, source)
        hint = ""
        if guest_bytes is not None:
            guest_pages = guest_bytes >> PAGE_SHIFT
        else:
            guest_pages = inferred_guest_pages(parsed.events)
            if guest_pages == MAX_INFERRED_GUEST_BYTES >> PAGE_SHIFT:
                hint = "the guest size was inferred, at most 1 TiB: give --guest-size for a larger guest"
        kinds = list(TRACKER_KINDS) if args.tracker == "all" else [args.tracker]
        prepared = prepare(parsed.events, guest_pages, hint)
        runs = run_trackers(prepared.conversions, kinds, guest_pages, max_ranges)
    except TestbedError as err:
        print(f"testbed replay: error: {err}", file=sys.stderr)
        return 2

    expected = expected_state(prepared.conversions, guest_pages, max_ranges)
    problems = {r.name: check_run(r, expected, prepared.lines, max_ranges) for r in runs}
    disagree = sorted(name for name, problem in problems.items() if problem is not None)
    # Complete: every hypercall line parsed, and a tracker that never poisoned holds the state.
    complete = not parsed.malformed and any(not r.poisoned and problems[r.name] is None for r in runs)

    def line_of(index: int | None) -> int | None:
        return None if index is None else prepared.lines[index]

    def skipped(items: list[SkippedLine]) -> list[dict[str, object]]:
        return [{"line": m.line, "text": m.text, "reason": m.reason} for m in items]

    if args.json:
        print(
            json.dumps(
                {
                    "shared_ranges": [list(r) for r in expected.final],
                    "trackers": {
                        r.name: {
                            "seconds": r.seconds,
                            "memory_bytes": r.memory_bytes,
                            "poisoned": r.poisoned,
                            "poisoned_at_line": line_of(r.poisoned_at),
                            "shared_ranges": [list(x) for x in r.shared_ranges],
                            "agrees": problems[r.name] is None,
                            "problem": problems[r.name],
                        }
                        for r in runs
                    },
                    "disagree": disagree,
                    "max_ranges": max_ranges,
                    "poison_line": line_of(expected.poison_index),
                    "malformed": skipped(parsed.malformed),
                    "rejected": skipped(prepared.rejected),
                    "ignored": skipped(prepared.ignored),
                    "events": len(parsed.events),
                    "applied": len(prepared.conversions),
                    "guest_pages": guest_pages,
                    "guest_size_inferred": guest_bytes is None,
                    "complete": complete,
                }
            )
        )
    else:
        _print_tables(source=source, parsed=parsed, prepared=prepared, runs=runs, expected=expected,
                      problems=problems, guest_pages=guest_pages)
    if disagree:
        detail = "; ".join(f"{name}: {problems[name]}" for name in disagree)
        print(f"testbed replay: error: trackers disagree with the unbounded model ({detail})", file=sys.stderr)
        return 1
    return 0


def _print_tables(
    *,
    source: str,
    parsed: ParsedLog,
    prepared: Prepared,
    runs: list[TrackerRun],
    expected: Expected,
    problems: dict[str, str | None],
    guest_pages: int,
) -> None:
    from testbed.textout import plain_console, plain_table

    # The source path and the log's own lines are printed literally (textout.py).
    console = plain_console(sys.stdout)
    ranges = plain_table(
        f"shared ranges after {len(parsed.events)} events",
        "gfn", "npages", "gpa range",
        caption=f"{source}, guest {_human(guest_pages << PAGE_SHIFT)}, every tracker checked against an "
        "unbounded model",
        right=("gfn", "npages", "gpa range"),
    )
    shown = expected.final[:50]
    for gfn, npages in shown:
        ranges.add_row(
            f"0x{gfn:x}", f"0x{npages:x}", f"0x{gfn << PAGE_SHIFT:x}-0x{((gfn + npages) << PAGE_SHIFT) - 1:x}"
        )
    if len(expected.final) > len(shown):
        ranges.add_row("...", f"{len(expected.final) - len(shown)} more", "")
    console.print(ranges)
    columns = ("tracker", "replay time", "memory", "poisoned", "ranges", "agrees")
    table = plain_table("trackers", *columns, right=("replay time", "memory", "ranges"))
    for r in runs:
        poisoned = "no" if not r.poisoned else (
            "yes" if r.poisoned_at is None else f"at line {prepared.lines[r.poisoned_at]}")
        problem = problems[r.name]
        table.add_row(
            r.name, f"{r.seconds * 1e6:.1f} µs", _human(r.memory_bytes), poisoned,
            str(len(r.shared_ranges)), "yes" if problem is None else f"NO: {problem}",
        )
    console.print(table)
    for item in sorted([*parsed.malformed, *prepared.skipped], key=lambda s: s.line):
        console.print(f"{source}:{item.line}: {item.reason}: {_clip(item.text)}", soft_wrap=True)
    if parsed.malformed:
        console.print(f"incomplete: {len(parsed.malformed)} malformed page_enc_status_hc line(s) skipped, so the "
                      "ranges above miss whatever they converted", soft_wrap=True)


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
