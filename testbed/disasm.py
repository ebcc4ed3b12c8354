"""`testbed disasm`: a guest's code after boot, as the guest sees it or as the host does.

The guest is booted (its runtime runs up to guest_main, so memory is encrypted and the
hypercall instruction patched); then the code is read either through the CPU's plaintext
view or through the host's view, which for an SEV guest is ciphertext.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from testbed.decode import disassemble
from testbed.errors import UsageError


def add_disasm_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `testbed disasm`."""
    from pathlib import Path

    from testbed.cli import _add_vm_options

    p = sub.add_parser("disasm", help="disassemble a guest after boot, guest or host view")
    p.add_argument("guest", type=Path)
    _add_vm_options(p)
    p.add_argument("--view", choices=("guest", "host"), default="guest")
    p.add_argument("--symbol", default=None, help="start at this label (default: guest_main)")
    p.add_argument("--count", type=int, default=16, help="instructions to show (default 16)")
    p.set_defaults(func=cmd_disasm)


def cmd_disasm(args: argparse.Namespace) -> int:
    """Boot the guest to guest_main, then disassemble from the symbol in the chosen view."""
    from testbed.cli import vm_options_from_args
    from testbed.machine import Machine, build_program

    if not args.guest.is_file():
        raise UsageError(f"{args.guest}: no such guest source file")
    options = vm_options_from_args(args)
    options.validate()
    program = build_program(args.guest, options)
    symbol = args.symbol or "guest_main"
    if symbol not in program.symbols:
        raise UsageError(f"{args.guest}: no symbol {symbol!r}")
    machine = Machine(program, options)
    machine.boot_to(program.symbols["guest_main"])
    address = program.symbols[symbol]
    length = 16 * max(1, args.count)
    if args.view == "guest":
        code = machine.cpu.fetch_bytes(address, length)
    else:
        code = machine.memory.host_read(machine.cpu.gva_to_gpa(address), length)
    console = Console(file=sys.stdout, highlight=False)
    table = Table(title=f"{args.guest} {symbol} @ 0x{address:x}: {args.view} view ({args.vendor}/{args.vm_type})")
    table.add_column("address")
    table.add_column("bytes")
    table.add_column("instruction")
    for insn in disassemble(code, address, limit=args.count):
        table.add_row(f"0x{insn.address:x}", insn.raw.hex(" "), insn.text)
    console.print(table)
    return 0
