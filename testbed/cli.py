"""The `testbed` command: run guests, show the SEV decode demo, disassemble, replay, bench.

Every error a user can cause (bad options, a guest that does not assemble, an unreadable
file) is printed as one line on stderr with exit status 2; nothing reaches the user as a
Python traceback.

Exit status of `testbed run`: 0 the guest passed; 1 any guest failure; 2 usage or assembly
error; 3 timeout.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from testbed.errors import TestbedError, UsageError
from testbed.hw.exits import Vendor
from testbed.textout import plain_console, plain_table, styled

EXIT_OK = 0
EXIT_GUEST_FAILURE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so main() owns the exit status."""

    def error(self, message: str) -> Any:
        # main() prints "testbed: " before it: name the subcommand only ("testbed: run: ...").
        where = self.prog.removeprefix("testbed").strip()
        raise UsageError(f"{where}: {message}" if where else message)


def _add_vm_options(p: argparse.ArgumentParser,
                    vm_type_help: str = "default, sw-protected, sev, sev-es, sev-snp, tdx") -> None:
    p.add_argument("--vendor", choices=[v.value for v in Vendor], default="amd", help="CPU vendor (default amd)")
    p.add_argument("--vm-type", default="default", help=vm_type_help)
    p.add_argument("--memory", default="64M", help="guest memory (default 64M)")
    p.add_argument("--define", "-D", action="append", default=[], metavar="NAME=VALUE", help="assembler define")
    # Numbers are parsed by VmOptions (testbed/options.py), as from Python: one set of rules
    # and messages, and a 5,000-digit value is refused without being echoed in full.
    p.add_argument("--c-bit", default="51", help="SEV C-bit position reported in CPUID 0x8000001F (default 51)")
    p.add_argument("--gpaw", default="52", help="TDX guest physical address width, 48 or 52 (shared bit 47 or 51)")
    p.add_argument("--seed", default=None, help="seed for the VM's memory-encryption key (0 .. 2^64-1)")
    p.add_argument("--kvm-version", default="kvm-x86", choices=("kvm-x86", "7.1"),
                   help="KVM modelled where the kvm-x86 tree (default) and the 7.1 release differ "
                        "(README: Modelled KVM)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The run flags beyond the VM's (`testbed run`, `testbed golden`): KVM, VMM and timeout."""
    p.add_argument("--ghcb-version", type=int, default=2,
                   help="GHCB protocol version KVM offers to SEV-ES/SNP guests (1 or 2; default 2)")
    p.add_argument("--no-fix-hypercall", action="store_true", help="disable KVM_X86_QUIRK_FIX_HYPERCALL_INSN")
    p.add_argument("--no-map-gpa-exit", action="store_true", help="do not enable the KVM_HC_MAP_GPA_RANGE user exit")
    p.add_argument("--pv-features", default=None,
                   help="comma-separated KVM PV features to advertise (pv_unhalt, pv_send_ipi, pv_sched_yield, "
                        "hc_map_gpa_range) or 'none'; default: all modelled")
    p.add_argument("--tracker", default=None,
                   help="shared-page tracker: bitmap, ranges, tree, donated, or native-bitmap, native-ranges, "
                        "native-tree (C) where built")
    p.add_argument("--max-ranges", default=None, help="tracker bound (records) before it is poisoned")
    p.add_argument("--hc-protocol", default="map-gpa-range", choices=("map-gpa-range", "page-enc-status"),
                   help="conversion hypercall ABI: today's KVM_HC_MAP_GPA_RANGE or the seed-era "
                        "KVM_HC_PAGE_ENC_STATUS (in-kernel bitmap)")
    p.add_argument("--refuse-conversion", action="append", default=[], metavar="GPA[:NPAGES[:private|shared]]",
                   help="VMM fault injection: refuse conversions of this range, both ways or to one "
                        "state only (repeatable)")
    p.add_argument("--pending-event-every", default=None, metavar="N",
                   help="VMM control: make an event pending after every N-th MAP_GPA_RANGE exit, so KVM "
                        "answers a TD's MapGPA with RETRY (tdx)")
    p.add_argument("--implicit-conversion", default="convert", choices=("convert", "refuse"),
                   help="VMM policy on KVM_EXIT_MEMORY_FAULT: convert and retry, or end the run")
    p.add_argument("--timeout", default="10",
                   help="seconds before the run ends as 'timeout' (default 10; positive, finite)")


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar."""
    parser = _Parser(prog="testbed", description="Confidential-VM guest/host ABI testbed on an emulated x86-64 CPU.")
    sub: Any = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="assemble and run a guest program")
    run.add_argument("guest", type=Path, help="guest source (.s)")
    _add_vm_options(run)
    add_run_options(run)
    run.add_argument("--trace", type=Path, default=None, help="write every event as JSON Lines to this file")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    run.add_argument("--expect", default=None, metavar="OUTCOME",
                     help="exit 0 exactly when the run ends with this outcome (done, guest_assert, "
                          "unhandled_exception, ...; see README), 1 otherwise")
    run.add_argument("--force", action="store_true",
                     help="launch a legacy image (GUEST_IMAGE_LEGACY: no KVM_HC_MAP_GPA_RANGE) on a guest_memfd VM "
                          "type, which the control plane refuses otherwise")
    run.add_argument("--plot-memory", type=Path, default=None, metavar="FILE.png",
                     help="also run the guest on the counterpart VM type (sev/sev-es <-> sev-snp; sw-protected "
                          "and tdx beside sev) and draw pinned private, shared and total memory against time, "
                          "side by side, into this PNG")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="hypercalls under both vendors, SEV and TDX: the VMCALL decode failure")
    demo.add_argument("--json", action="store_true")
    demo.add_argument("--seed", default="1", help="seed for the SEV VM's memory-encryption key (default 1)")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="measure exit rates and compute speed against bare Unicorn")
    bench.add_argument("--quick", action="store_true", help="fewer rounds, passes and iterations (a smoke run)")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--rounds", type=int, default=None, metavar="N",
                       help="interleaved rounds, at least 5 (default 7, --quick 5); more narrow what is undecided")
    bench.set_defaults(func=cmd_bench)

    # Commands whose code lives in their own modules.
    from testbed.disasm import add_disasm_subparser
    from testbed.replay import add_replay_subparser

    add_replay_subparser(sub)
    add_disasm_subparser(sub)
    from testbed.matrix import add_matrix_subparser

    add_matrix_subparser(sub)
    from testbed.golden import add_golden_subparser

    add_golden_subparser(sub)
    from testbed.migrate.cli import add_migrate_subparser

    add_migrate_subparser(sub)
    return parser


def vm_options_from_args(args: argparse.Namespace, **more: Any) -> Any:
    """VmOptions from the shared VM flags (and `more` fields); VmOptions checks every value."""
    from testbed.asm import parse_define
    from testbed.machine import VmOptions

    defines: dict[str, int | str] = {}
    for text in args.define:
        name, value = parse_define(text)
        defines[name] = value
    return VmOptions(
        vendor=args.vendor,
        vm_type=args.vm_type,
        memory=args.memory,
        defines=defines,
        seed=args.seed,
        c_bit=args.c_bit,
        gpaw=args.gpaw,
        kvm_version=args.kvm_version,
        **more,
    )


def run_options_from_args(args: argparse.Namespace) -> Any:
    """VmOptions from the VM flags and `add_run_options`' flags."""
    return vm_options_from_args(
        args,
        fix_hypercall=not args.no_fix_hypercall,
        ghcb_version=args.ghcb_version,
        map_gpa_exit=not args.no_map_gpa_exit,
        timeout=args.timeout,
        max_ranges=args.max_ranges,
        hc_protocol=args.hc_protocol,
        implicit_conversion=args.implicit_conversion,
        refuse_conversions=list(args.refuse_conversion),
        pending_event_every=args.pending_event_every,
        pv_features=args.pv_features,
        **({"tracker": args.tracker} if args.tracker is not None else {}),
    )


class _TraceFile:
    """The --trace file: a write error (ENOSPC on /dev/full, EIO, ...) is remembered and
    raised as a UsageError naming the file, whichever layer's emit() hit it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: UsageError | None = None
        try:
            self._file: IO[str] = path.open("w", encoding="utf-8")
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot write trace file {path}: {getattr(exc, 'strerror', None) or exc}") from None

    def _failed(self, exc: OSError) -> UsageError:
        if self.error is None:
            self.error = UsageError(f"cannot write trace file {self.path}: {exc.strerror or exc}")
        return self.error

    def write(self, text: str) -> int:
        if self.error is not None:
            raise self.error
        try:
            return self._file.write(text)
        except OSError as exc:
            raise self._failed(exc) from None

    def flush(self) -> None:
        if self.error is not None:
            raise self.error
        try:
            self._file.flush()
        except OSError as exc:
            raise self._failed(exc) from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:
            self._failed(exc)


def _check_expect(text: str | None) -> str | None:
    from testbed.vmm.vmm import OUTCOMES

    if text is None or text in OUTCOMES:
        return text
    raise UsageError(f"--expect {text!r}: not an outcome; expected one of {', '.join(OUTCOMES)}")


def cmd_run(args: argparse.Namespace) -> int:
    """`testbed run`: the host API's run_guest (a Vm, load, the run loop) and its report."""
    from testbed.api import run_guest
    from testbed.control_plane import check_launch
    from testbed.machine import build_program

    expect = _check_expect(args.expect)
    options = run_options_from_args(args)
    options.validate()
    program = build_program(args.guest, options)  # assembly errors before the trace file is created (cached)
    check_launch(program, options.vm_type, str(args.guest), force=args.force)  # the control plane, before launch
    trace = _TraceFile(args.trace) if args.trace is not None else None
    try:
        options.trace = trace
        report = run_guest(args.guest, options, force=args.force)
    except Exception:
        if trace is not None and trace.error is not None:
            raise trace.error from None
        raise
    finally:
        if trace is not None:
            trace.close()
    if trace is not None and trace.error is not None:
        raise trace.error
    if getattr(args, "plot_memory", None) is not None:
        _plot_memory(args, options, report)
    if args.json:
        sys.stdout.write(json.dumps(report.to_json()) + "\n")
    else:
        _print_report(report, args, sys.stdout, expect)
    if expect is not None:
        return EXIT_OK if report.outcome == expect else EXIT_GUEST_FAILURE
    if report.outcome == "done":
        return EXIT_OK
    if report.outcome == "timeout":
        return EXIT_TIMEOUT
    return EXIT_GUEST_FAILURE


def _plot_memory(args: argparse.Namespace, options: Any, report: Any) -> None:
    """--plot-memory: run the guest on the counterpart VM type too, draw both (testbed/memplot.py)."""
    import dataclasses

    from testbed.api import run_guest
    from testbed.memplot import counterpart, plot_memory

    other_type = counterpart(args.vm_type)
    other = dataclasses.replace(options, vm_type=other_type, trace=None,
                                vendor="amd" if args.vm_type == "tdx" else options.vendor)
    other.normalise()
    other.validate()
    other_report = run_guest(args.guest, other, force=args.force)
    runs = [(args.vm_type, report.to_json().get("memory") or {}),
            (other_type, other_report.to_json().get("memory") or {})]
    legacy_first = sorted(runs, key=lambda run: run[1].get("model") != "legacy")
    plot_memory(legacy_first, args.plot_memory, f"{args.guest}: {options.memory >> 20} MiB guest")


def _print_report(report: Any, args: argparse.Namespace, out: IO[str], expect: str | None = None) -> None:
    # Every string here may come from the guest or the user (paths, details): printed literally.
    console = plain_console(out)
    table = plain_table(f"{args.guest} on {args.vendor} / {args.vm_type}", "what", "value")
    good = report.outcome == (expect or "done")
    table.add_row("outcome", styled(report.outcome, "green" if good else "red"))
    if expect is not None:
        table.add_row("expected", styled(expect, "green" if good else "red"))
    if report.detail:
        table.add_row("detail", report.detail)
    for u in report.ucalls:
        where = f" at {u['file']}:{u['line']}" if "file" in u else ""
        table.add_row(f"ucall {u['cmd']}", ", ".join(f"0x{a:x}" for a in u["args"]) + where)
    if report.ucalls_dropped:
        table.add_row("ucalls left out", f"{report.ucalls_dropped} between the first and the last "
                      f"{len(report.ucalls) // 2} (--trace has every one)")
    if report.exception:
        e = report.exception
        text = f"vector {e['vector']}"
        if e.get("error_code") is not None:
            text += f" error 0x{e['error_code']:x}"
        if e.get("exit_reason") is not None:
            text += f" exit reason {e['exit_reason']}"
        text += f" rip 0x{e['rip']:x}"
        if "cr2" in e:
            text += f" cr2 0x{e['cr2']:x}"
        if "file" in e:
            text += f" at {e['file']}:{e['line']}"
            if e.get("symbol"):
                text += f" ({e['symbol']}+0x{e['offset']:x})"
        table.add_row("exception", text)
    if report.termination:
        table.add_row("termination", f"set {report.termination['reason_set']} code {report.termination['reason_code']}")
    table.add_row("user exits", ", ".join(f"{k}={v}" for k, v in sorted(report.exit_counts.items())) or "none")
    table.add_row("shared ranges", ", ".join(f"gfn 0x{g:x}+{n}" for g, n in report.shared_ranges) or "none")
    table.add_row("wall time", f"{report.wall_s:.3f} s")
    console.print(table)


def cmd_demo(args: argparse.Namespace) -> int:
    """`testbed demo`."""
    from testbed.demo import run_demo
    from testbed.options import SEED_RANGE, parse_int

    return run_demo(sys.stdout, as_json=args.json, seed=parse_int(args.seed, "seed", SEED_RANGE))


def cmd_bench(args: argparse.Namespace) -> int:
    """`testbed bench`."""
    from testbed.bench import run_bench

    return run_bench(sys.stdout, quick=args.quick, as_json=args.json, rounds=args.rounds)


def _one_line(text: str) -> str:
    """An error message as one line: control characters (a newline in a file name) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@functools.cache
def shared_parser() -> argparse.ArgumentParser:
    """The parser main() uses, built once per process: building it costs ~4 ms, and in-process
    callers (the test suite: ~190 calls a run, a harness scripting the CLI) call main() again and
    again. Use it through parse_args, which keeps one call's arguments out of the next."""
    return build_parser()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """`argv` parsed by the shared parser. Each parse starts from a fresh namespace, and an
    append action copies its list before it appends (argparse's _copy_items), but an option
    not given gets the parser's own default list: each list is copied here, so a caller that
    edits its arguments never edits the next call's (tests/test_cli.py pins it)."""
    args = shared_parser().parse_args(argv)
    for name, value in vars(args).items():
        if isinstance(value, list):
            setattr(args, name, list(value))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit status (the console script exits with it)."""
    try:
        args = parse_args(argv)
        if not getattr(args, "func", None):
            shared_parser().print_help(sys.stdout)
            return EXIT_USAGE
        return int(args.func(args))
    except TestbedError as exc:
        print(f"testbed: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError as exc:  # the host could not back what was asked (options.check_host_memory)
        print(f"testbed: out of host memory: {_one_line(str(exc)) or 'an allocation failed'}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`testbed ... | head`): not a testbed bug. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (AttributeError, OSError, ValueError):  # a stdout with no file behind it
            pass
        return EXIT_GUEST_FAILURE
    except Exception as exc:  # a testbed bug: still one line, never a traceback
        print(f"testbed: internal error (a testbed bug, please report it): {type(exc).__name__}: "
              f"{_one_line(str(exc))}", file=sys.stderr)
        return EXIT_GUEST_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
