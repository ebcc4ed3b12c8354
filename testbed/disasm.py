"""`testbed disasm`: a guest's code after boot, as the guest sees it or as the host does.

The guest is booted (its runtime runs up to guest_main, so memory is encrypted and the
hypercall instruction patched); then the code is read either through the CPU's plaintext
view or through the host's view: plaintext on a plain VM, ciphertext of a legacy SEV guest's
private frames, and nothing at all of a guest_memfd VM's private pages (sw-protected,
sev-snp, and a TD's private memory on tdx), which the host cannot map — the output says which
applies.

Works on every VM type. A guest that never reaches guest_main is reported with the real cause
(Machine.boot_to: the outcome with vector, error code and RIP) and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from testbed.decode import disassemble
from testbed.errors import GuestBootError, GuestMemoryError, UsageError
from testbed.textout import plain_console, plain_table

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

#: At most this many instructions (at most 15 bytes each): a listing, not a memory dump.
MAX_COUNT = 4096
MAX_INSN_BYTES = 15
PAGE_SIZE = 0x1000
#: What the host sees of a page, as the output names it.
HOST_VIEW_NOTES = {
    "plaintext": "plaintext (the host reads the page as the guest wrote it)",
    "ciphertext": "ciphertext (legacy SEV: the host reads the private frame encrypted)",
    "unmappable": "host cannot read private memory of a guest_memfd VM (not mappable by the host)",
}
#: The unmappable note on `tdx`: a TD's private memory lives in guest_memfd too.
TD_UNMAPPABLE_NOTE = "host cannot read private memory of a TD (guest_memfd: not mappable by the host)"


def _unmappable_note(machine: Any) -> str:
    return TD_UNMAPPABLE_NOTE if getattr(machine, "tdx", False) else HOST_VIEW_NOTES["unmappable"]


def add_disasm_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `testbed disasm`."""
    from pathlib import Path

    from testbed.cli import _add_vm_options

    p = sub.add_parser("disasm", help="disassemble a guest after boot, guest or host view")
    p.add_argument("guest", type=Path)
    _add_vm_options(p)
    p.add_argument("--view", choices=("guest", "host"), default="guest")
    p.add_argument("--symbol", default=None, help="start at this label (default: guest_main)")
    p.add_argument("--count", default="16", help=f"instructions to show (default 16, at most {MAX_COUNT})")
    p.set_defaults(func=cmd_disasm)


def _gpa(machine: Any, va: int) -> int | None:
    """The GPA the guest's page tables give `va`, None when the walk fails."""
    try:
        return int(machine.cpu.gva_to_gpa(va))
    except Exception:  # hw signals a failed walk with its private delivery-fault exception
        return None


def read_code(machine: Any, address: int, length: int, view: str) -> tuple[bytes, list[str], str | None]:
    """Up to `length` bytes at `address` in the chosen view, page by page: (bytes, the host
    view kinds met, why the read stopped early or None)."""
    code = bytearray()
    kinds: list[str] = []
    va = address
    while len(code) < length:
        n = min(length - len(code), PAGE_SIZE - (va & (PAGE_SIZE - 1)))
        gpa = _gpa(machine, va)
        if gpa is None:
            return bytes(code), kinds, f"0x{va:x} is not mapped by the guest's page tables"
        if view == "guest":
            code += machine.cpu.fetch_bytes(va, n)
        else:
            try:
                kind = str(machine.memory.host_view_kind(gpa))
            except GuestMemoryError as exc:
                return bytes(code), kinds, str(exc)
            if kind not in kinds:
                kinds.append(kind)
            if kind == "unmappable":
                return bytes(code), kinds, f"gpa 0x{gpa:x}: {_unmappable_note(machine)}"
            try:
                code += machine.memory.host_read(gpa, n)
            except GuestMemoryError as exc:  # refused (UnmappableMemoryError) or outside RAM
                return bytes(code), kinds, f"gpa 0x{gpa:x}: {exc}"
        va += n
    return bytes(code), kinds, None


def _count(text: str) -> int:
    from testbed.options import parse_int

    return parse_int(text, "--count", range(1, MAX_COUNT + 1))


def cmd_disasm(args: argparse.Namespace) -> int:
    """Boot the guest to guest_main, then disassemble from the symbol in the chosen view."""
    from testbed.cli import vm_options_from_args
    from testbed.machine import Machine, build_program

    count = _count(args.count)
    options = vm_options_from_args(args)
    options.validate()
    program = build_program(args.guest, options)
    symbol = args.symbol if args.symbol is not None else "guest_main"
    if symbol not in program.symbols:
        raise UsageError(f"{args.guest}: no symbol {symbol!r}")
    address = program.symbols[symbol]
    with Machine(program, options) as machine:
        try:
            machine.boot_to(program.symbols["guest_main"])
        except GuestBootError as exc:
            print(f"testbed: disasm {args.guest} ({args.vendor}/{args.vm_type}): {exc}", file=sys.stderr)
            return 1
        code, kinds, stopped = read_code(machine, address, count * MAX_INSN_BYTES, args.view)
    label = "guest view" if args.view == "guest" else "host view" + (f": {kinds[0]}" if kinds else "")
    title = f"{args.guest} {symbol} @ 0x{address:x}: {label} ({args.vendor}/{args.vm_type})"
    notes = [HOST_VIEW_NOTES[k] for k in kinds if k in HOST_VIEW_NOTES and k != "unmappable"]
    insns = disassemble(code, address, limit=count)
    if len(insns) < count and stopped is not None:
        notes.append(f"stops at 0x{address + len(code):x}: {stopped}")
    console = plain_console(sys.stdout)
    if not insns and stopped is not None:
        console.print(f"{title}: nothing to show: {stopped}", soft_wrap=True)
        return 0
    rows = [(f"0x{insn.address:x}", insn.raw.hex(" "), insn.text) for insn in insns]
    console.print(listing(console, title, "; ".join(notes) or None, rows))
    return 0


def listing(console: Console, title: str, caption: str | None, rows: Sequence[tuple[str, str, str]]) -> Table:
    """The listing's table, one line per instruction, as `console` prints it.

    When the table fits the console unfolded (the usual case) the rows go in as one row of
    newline-joined cells: no cell wraps, so each line stays beside its row's other cells and
    rich prints the very text of one row per instruction, in a third of the time (--count
    4096: 12,288 cells). Otherwise (rich folds what is too wide) one row per instruction."""

    def table() -> Table:
        return plain_table(title, "address", "bytes", "instruction", caption=caption)

    if rows and not any("\n" in cell for row in rows for cell in row):
        joined = table()
        joined.add_row(*("\n".join(column) for column in zip(*rows, strict=True)))
        unbounded = console.options.update_width(1 << 20)
        if console.measure(joined, options=unbounded).maximum <= console.width:
            return joined
    per_row = table()
    for row in rows:
        per_row.add_row(*row)
    return per_row
