"""The `testbed` command: run guests, show the SEV decode demo, disassemble, replay, bench.

Every error a user can cause (bad options, a guest that does not assemble, an unreadable
file) is printed as one line on stderr with exit status 2; nothing reaches the user as a
Python traceback.

Exit status of `testbed run`: 0 the guest passed; 1 any guest failure; 2 usage or assembly
error; 3 timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from testbed.errors import TestbedError, UsageError
from testbed.hw.exits import Vendor

EXIT_OK = 0
EXIT_GUEST_FAILURE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

_SIZE_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'64M' -> 67108864; accepts K, M, G, T suffixes (optionally followed by 'iB' or 'B')."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = t[-1:] if t[-1:] in _SIZE_SUFFIX else ""
    number = t[: len(t) - len(suffix)] if suffix else t
    try:
        value = int(number, 0) * _SIZE_SUFFIX[suffix]
    except ValueError:
        raise UsageError(f"invalid size {text!r}: expected e.g. 64M, 1G or a byte count") from None
    if value <= 0:
        raise UsageError(f"invalid size {text!r}: must be positive")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so main() owns the exit status."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{self.prog}: {message}")


def _add_vm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vendor", choices=[v.value for v in Vendor], default="amd", help="CPU vendor (default amd)")
    p.add_argument("--vm-type", default="default", help="default, sw-protected, sev, sev-es, sev-snp")
    p.add_argument("--memory", default="64M", help="guest memory (default 64M)")
    p.add_argument("--define", "-D", action="append", default=[], metavar="NAME=VALUE", help="assembler define")
    p.add_argument("--c-bit", type=int, default=51, help="SEV C-bit position reported in CPUID 0x8000001F (default 51)")
    p.add_argument("--seed", type=int, default=None, help="seed for the VM's memory-encryption key")


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar."""
    parser = _Parser(prog="testbed", description="Confidential-VM guest/host ABI testbed on an emulated x86-64 CPU.")
    sub: Any = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="assemble and run a guest program")
    run.add_argument("guest", type=Path, help="guest source (.s)")
    _add_vm_options(run)
    run.add_argument("--ghcb-version", type=int, default=2,
                     help="GHCB protocol version KVM offers to SEV-ES/SNP guests (1 or 2; default 2)")
    run.add_argument("--no-fix-hypercall", action="store_true", help="disable KVM_X86_QUIRK_FIX_HYPERCALL_INSN")
    run.add_argument("--no-map-gpa-exit", action="store_true", help="do not enable the KVM_HC_MAP_GPA_RANGE user exit")
    run.add_argument("--pv-features", default=None,
                     help="comma-separated KVM PV features to advertise (pv_unhalt, pv_send_ipi, pv_sched_yield, "
                          "hc_map_gpa_range) or 'none'; default: all modelled")
    run.add_argument("--tracker", default=None, help="shared-page tracker: bitmap, ranges or tree")
    run.add_argument("--max-ranges", type=int, default=None, help="tracker bound (records) before it is poisoned")
    run.add_argument("--hc-protocol", default="map-gpa-range", choices=("map-gpa-range", "page-enc-status"),
                     help="conversion hypercall ABI: today's KVM_HC_MAP_GPA_RANGE or the seed-era "
                          "KVM_HC_PAGE_ENC_STATUS (in-kernel bitmap)")
    run.add_argument("--refuse-conversion", action="append", default=[], metavar="GPA[:NPAGES[:private|shared]]",
                     help="VMM fault injection: refuse conversions of this range, both ways or to one "
                          "state only (repeatable)")
    run.add_argument("--implicit-conversion", default="convert", choices=("convert", "refuse"),
                     help="VMM policy on KVM_EXIT_MEMORY_FAULT: convert and retry, or end the run")
    run.add_argument("--timeout", type=float, default=10.0,
                     help="seconds before the run ends as 'timeout' (default 10)")
    run.add_argument("--trace", type=Path, default=None, help="write every event as JSON Lines to this file")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="hypercalls under both vendors (and SEV): the VMCALL decode failure")
    demo.add_argument("--json", action="store_true")
    demo.add_argument("--seed", type=int, default=1)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="measure exit rates and compute speed against bare Unicorn")
    bench.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    # Commands whose code lives in their own modules.
    from testbed.disasm import add_disasm_subparser
    from testbed.replay import add_replay_subparser

    add_replay_subparser(sub)
    add_disasm_subparser(sub)
    return parser


def vm_options_from_args(args: argparse.Namespace) -> Any:
    """VmOptions from the shared VM flags."""
    from testbed.asm import parse_define
    from testbed.machine import VmOptions

    defines: dict[str, int | str] = {}
    for d in args.define:
        name, value = parse_define(d)
        defines[name] = value
    options = VmOptions(
        vendor=Vendor(args.vendor),
        vm_type=args.vm_type,
        memory=parse_size(args.memory),
        defines=defines,
        seed=args.seed,
        c_bit=args.c_bit,
    )
    return options


def _parse_range(text: str) -> tuple[int, int, bool | None]:
    """'0x600000:4:private' -> (0x600000, 4, True); NPAGES defaults to 1, direction to both."""
    parts = text.split(":")
    directions: dict[str, bool | None] = {"private": True, "shared": False, "both": None}
    try:
        gpa = int(parts[0], 0)
        npages = int(parts[1], 0) if len(parts) > 1 and parts[1] else 1
        to = directions[parts[2].lower()] if len(parts) > 2 else None
    except (ValueError, KeyError):
        raise UsageError(f"--refuse-conversion {text!r}: expected GPA[:NPAGES[:private|shared]]") from None
    if len(parts) > 3 or gpa < 0 or gpa & 0xFFF or npages < 1:
        raise UsageError(f"--refuse-conversion {text!r}: GPA must be page aligned and NPAGES >= 1")
    return gpa, npages, to


def _parse_pv_features(text: str) -> int:
    from testbed.vmm.cpuid import PV_FEATURE_NAMES

    if text.strip().lower() == "none":
        return 0
    mask = 0
    for name in filter(None, (t.strip().lower() for t in text.split(","))):
        if name not in PV_FEATURE_NAMES:
            raise UsageError(f"unknown PV feature {name!r}: expected {', '.join(PV_FEATURE_NAMES)} or none")
        mask |= 1 << PV_FEATURE_NAMES[name]
    return mask


def cmd_run(args: argparse.Namespace) -> int:
    """`testbed run`."""
    from testbed.machine import Machine, build_program

    options = vm_options_from_args(args)
    options.fix_hypercall = not args.no_fix_hypercall
    options.ghcb_version = args.ghcb_version
    options.map_gpa_exit = not args.no_map_gpa_exit
    options.timeout = args.timeout
    if args.tracker:
        options.tracker = args.tracker
    options.max_ranges = args.max_ranges
    options.hc_protocol = args.hc_protocol
    options.implicit_conversion = args.implicit_conversion
    options.refuse_conversions = [_parse_range(r) for r in args.refuse_conversion]
    if args.pv_features is not None:
        options.pv_features = _parse_pv_features(args.pv_features)
    if not args.guest.is_file():
        raise UsageError(f"{args.guest}: no such guest source file")
    options.validate()
    trace_file = None
    try:
        if args.trace is not None:
            try:
                trace_file = args.trace.open("w")
            except OSError as exc:
                raise UsageError(f"cannot write trace file {args.trace}: {exc.strerror}") from None
            options.trace = trace_file
        program = build_program(args.guest, options)
        report = Machine(program, options).run()
    finally:
        if trace_file is not None:
            trace_file.close()
    if args.json:
        sys.stdout.write(json.dumps(report.to_json()) + "\n")
    else:
        _print_report(report, args, sys.stdout)
    if report.outcome == "done":
        return EXIT_OK
    if report.outcome == "timeout":
        return EXIT_TIMEOUT
    return EXIT_GUEST_FAILURE


def _print_report(report: Any, args: argparse.Namespace, out: IO[str]) -> None:
    console = Console(file=out, highlight=False)
    table = Table(title=f"{args.guest} on {args.vendor} / {args.vm_type}")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    style = "green" if report.outcome == "done" else "red"
    table.add_row("outcome", f"[{style}]{report.outcome}[/]")
    if report.detail:
        table.add_row("detail", report.detail)
    for u in report.ucalls:
        where = f" at {u['file']}:{u['line']}" if "file" in u else ""
        table.add_row(f"ucall {u['cmd']}", ", ".join(f"0x{a:x}" for a in u["args"]) + where)
    if report.exception:
        e = report.exception
        table.add_row("exception", f"vector {e['vector']} error 0x{e['error_code']:x} rip 0x{e['rip']:x}")
    if report.termination:
        table.add_row("termination", f"set {report.termination['reason_set']} code {report.termination['reason_code']}")
    table.add_row("user exits", ", ".join(f"{k}={v}" for k, v in sorted(report.exit_counts.items())) or "none")
    table.add_row("shared ranges", ", ".join(f"gfn 0x{g:x}+{n}" for g, n in report.shared_ranges) or "none")
    table.add_row("wall time", f"{report.wall_s:.3f} s")
    console.print(table)


def cmd_demo(args: argparse.Namespace) -> int:
    """`testbed demo`."""
    from testbed.demo import run_demo

    return run_demo(sys.stdout, as_json=args.json, seed=args.seed)


def cmd_bench(args: argparse.Namespace) -> int:
    """`testbed bench`."""
    from testbed.bench import run_bench

    return run_bench(sys.stdout, quick=args.quick, as_json=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit status (the console script exits with it)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stdout)
            return EXIT_USAGE
        return int(args.func(args))
    except TestbedError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a testbed bug: still one line, never a traceback
        print(f"testbed: internal error (a testbed bug, please report it): {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return EXIT_GUEST_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
