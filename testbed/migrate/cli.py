"""`testbed migrate GUEST.s`: live-migrate a running guest to a second VM and check every page.

Exit status: 0 when the guest finished on the target with no page lost or corrupted and the
host-side state (KVM's status, the trackers, the SNP RMP) and the vCPU state arrived as they
were; 1 for any other outcome (a guest failure, pages lost or corrupted, a host-side or vCPU
difference, a refused or failed migration); 2 for a usage or assembly error; 3 when the guest
or the migration ran out of time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from testbed.migrate.migration import DEFAULT_ROUNDS, DEFAULT_SLICE_EXITS, MIGRATE_VM_TYPES, migrate


def add_migrate_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `testbed migrate`."""
    p = sub.add_parser("migrate", help="live-migrate a guest that converts pages, and check every page")
    p.add_argument("guest", type=Path, help="guest source (.s)")
    p.add_argument("--vm-type", default="sev-snp", help=f"{', '.join(MIGRATE_VM_TYPES)} (default sev-snp)")
    p.add_argument("--tracker", default=None,
                   help="the source VMM's shared-page tracker: bitmap, ranges, tree, donated (the guest's "
                        "own structure: guests/lib/donate.s), native-bitmap, native-ranges, native-tree where built")
    p.add_argument("--max-ranges", default=None, help="tracker bound (records) before it is poisoned")
    p.add_argument("--rounds", default=str(DEFAULT_ROUNDS),
                   help=f"pre-copy rounds after the bulk round (default {DEFAULT_ROUNDS})")
    p.add_argument("--slice", default=str(DEFAULT_SLICE_EXITS),
                   help=f"guest exits the source runs per round (default {DEFAULT_SLICE_EXITS})")
    p.add_argument("--memory", default="8M", help="guest memory (default 8M)")
    p.add_argument("--define", "-D", action="append", default=[], metavar="NAME=VALUE", help="assembler define")
    p.add_argument("--seed", default="1", help="the source's memory-key seed (the target's is seed + 1; default 1)")
    p.add_argument("--hc-protocol", default="map-gpa-range", choices=("map-gpa-range", "page-enc-status"),
                   help="conversion hypercall ABI; page-enc-status resyncs from KVM's page-enc bitmap")
    p.add_argument("--timeout", default="30", help="seconds for the whole migration and run (default 30)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    """`testbed migrate`."""
    from testbed.asm import parse_define
    from testbed.errors import UsageError
    from testbed.machine import VmOptions
    from testbed.options import parse_int

    if args.vm_type not in MIGRATE_VM_TYPES:
        raise UsageError(f"--vm-type {args.vm_type}: testbed migrate takes {', '.join(MIGRATE_VM_TYPES)}")
    rounds = parse_int(args.rounds, "--rounds", range(0, 1 << 16))
    slice_exits = parse_int(args.slice, "--slice", range(1, 1 << 32))
    more: dict[str, Any] = {"tracker": args.tracker} if args.tracker else {}
    options = VmOptions(vm_type=args.vm_type, memory=args.memory, seed=args.seed, timeout=args.timeout,
                        max_ranges=args.max_ranges, hc_protocol=args.hc_protocol,
                        defines=dict(parse_define(d) for d in args.define), **more)
    options.validate()
    report = migrate(args.guest, options, rounds=rounds, slice_exits=slice_exits)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        out = sys.stdout
        out.write(f"{args.guest}: {report.vm_type}, tracker {report.tracker}: {report.outcome}"
                  + (f" ({report.detail})" if report.detail else "") + "\n")
        out.write(f"pages compared {report.compared_pages}, lost {report.lost_pages}, "
                  f"corrupted {report.corrupted_pages}; downtime {report.downtime_s * 1e3:.1f} ms, "
                  f"total {report.total_s:.2f} s\n")
        if report.status_pages or report.tracker_pages or report.rmp_pages:
            out.write(f"host-side state differs: status {report.status_pages}, tracker {report.tracker_pages}, "
                      f"rmp {report.rmp_pages} pages\n")
        for what, why in report.extra.get("not_compared", {}).items():
            out.write(f"not compared: {what} ({why})\n")
        for v in report.vcpu_mismatches:
            out.write(f"  vCPU {v['field']}: source {v['source']}, target {v['target']}\n")
        resync = report.resync
        if resync.get("fallback"):
            out.write(f"status resync: {resync['source']} ({resync.get('reason')})\n")
        elif resync.get("source") == "donated":
            out.write(f"status: the guest's donated structure ({resync.get('donated_reads', 0)} reads, "
                      f"{resync.get('retried_reads', 0)} mid-update reads retried next round, "
                      f"{resync.get('before_donation', 0)} rounds from KVM's attributes before the donation)\n")
        donation = report.extra.get("target_donation")
        if donation is not None:
            out.write(f"target: donation at 0x{donation['gpa']:x} ({donation['size']} bytes) "
                      + ("taken over" if donation["accepted"] else f"refused: {donation['reason']}") + "\n")
        out.write("round  kind     sent  private  shared  zero  dirty  status-bytes  changes  time-ms\n")
        for r in report.rounds:
            out.write(f"{r.round:5d}  {r.kind:7s}  {r.pages_sent:4d}  {r.private_pages_sent:7d}  "
                      f"{r.shared_pages_sent:6d}  {r.zero_pages:4d}  {r.dirty_pages:5d}  {r.status_bytes:12d}  "
                      f"{r.status_changes:7d}  {r.time_s * 1e3:7.2f}\n")
        for m in report.mismatches:
            out.write(f"  gfn 0x{m['gfn']:x}: {m['kind']} (source {m['source']}, target {m['target']})\n")
    if report.passed:
        return 0
    return 3 if report.outcome == "timeout" else 1
