"""A hostile-guest campaign: random and malformed guests across VM types; the host never crashes.

Each guest is a few hostile steps in `guest_main`: random instruction bytes, CR3 loads (inside,
outside and at the edge of guest memory), writes of random values into the live page tables,
far transfers and segment loads with random selectors (and 32-bit code segments with a base),
IDT reloads, and hand-made ucalls (unknown commands, too many arguments, bad addresses); on
`tdx` also raw TDCALLs with random leaves, GPR-select bitmaps and TDG.VP.VMCALL arguments (GHCI
leaves, instruction leaves, KVM hypercall numbers, GPAs on either side of the shared bit). The
campaign checks that no Python exception escapes `Machine.run` and that every outcome is one
of the documented ones (README, "Outcomes"), and prints what it saw.

    python tools/hostile_campaign.py [--guests N] [--seed S] [--timeout SECONDS]

The test suite runs a small fixed-seed slice of it (tests/test_hostile_guest.py).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.hw.exits import Vendor
from testbed.machine import Machine, VmOptions, build_program
from testbed.vmm.vmm import OUTCOMES

VM_TYPES = ("default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx")
MEMORY = 8 << 20
#: internal_error suberrors a guest may cause (README, "KVM_EXIT_INTERNAL_ERROR"): emulation, delivery
GUEST_SUBERRORS = {1, 3}
#: requests the testbed does not model, whose run ends as internal_error naming them (README,
#: "Deliberate deviations"): a TD's TDG.MR.REPORT
UNMODELLED = ("TDCALL TDG.MR.REPORT (leaf 4) is not modelled",)


def _u64(rng: random.Random) -> int:
    return rng.choice([0, MEMORY - 8, MEMORY, MEMORY + 0x1000, 1 << 32, (1 << 40) - 0x1000,
                       rng.getrandbits(64), rng.getrandbits(32), rng.randrange(0, MEMORY, 8)])


def _code32_descriptor(base: int) -> int:
    return 0x00CF9B000000FFFF | ((base & 0xFFFFFF) << 16) | (((base >> 24) & 0xFF) << 56)


def _tdcall(rng: random.Random) -> str:
    """A raw TDCALL: a random leaf (mostly TDG.VP.VMCALL) and RCX, R10-R15 as a TD might set them."""
    shared = rng.choice([1 << 47, 1 << 51])
    leaf = rng.choice([0, 0, 0, 1, 3, 4, 6, 8, rng.getrandbits(16), rng.getrandbits(64)])
    rcx = rng.choice([0xFFCC, 0xFFCC, 0, 1, 0x10, rng.getrandbits(16), rng.getrandbits(64),
                      _u64(rng) | rng.randrange(8)])
    r10 = rng.choice([0, 0, 0, 1, 12, 0x999, rng.getrandbits(64)])
    r11 = rng.choice([0x10000, 0x10001, 0x10001, 0x10002, 0x10003, 0x10004, 0x10005, 10, 12, 18, 30, 31, 32, 48,
                      rng.getrandbits(64)])
    regs = {"r10": r10, "r11": r11}
    for reg in ("r12", "r13", "r14", "r15"):
        regs[reg] = rng.choice([_u64(rng), _u64(rng) | shared, shared - 0x1000, 0x1000, 1, 4, 0, 0x2000])
    loads = "".join(f"    movabs {reg}, {value:#x}\n" for reg, value in regs.items())
    return f"{loads}    movabs rcx, {rcx:#x}\n    movabs rax, {leaf:#x}\n    .byte 0x66, 0x0f, 0x01, 0xcc\n"


def step(rng: random.Random, n: int, tdx: bool = False) -> str:
    """One hostile step (assembly text; labels made unique with `n`); `tdx` adds raw TDCALLs."""
    kind = rng.choice(["bytes", "cr3", "pte", "far", "seg", "compat", "idt", "ucall", "ucall"]
                      + (["tdcall", "tdcall", "tdcall"] if tdx else []))
    if kind == "tdcall":
        return _tdcall(rng)
    if kind == "bytes":
        return "    .byte " + ", ".join(str(rng.randrange(256)) for _ in range(rng.randint(1, 24))) + "\n"
    if kind == "cr3":
        return f"    movabs rax, {_u64(rng) & ~0xFFF & ((1 << 52) - 1):#x}\n    mov cr3, rax\n"
    if kind == "pte":
        return (f"    mov rax, cr3\n    mov rcx, 0xfffff000\n    and rax, rcx\n"
                f"    movabs rbx, {_u64(rng):#x}\n    mov qword ptr [rax + {rng.randrange(0, 4096, 8):#x}], rbx\n"
                "    mov rax, cr3\n    mov cr3, rax\n")
    if kind == "far":
        return (f"    push {rng.randrange(0x10000):#x}\n    lea rax, [rip + far_{n}]\n    push rax\n    retfq\n"
                f"far_{n}:\n")
    if kind == "seg":
        reg = rng.choice(["ds", "es", "ss", "fs", "gs"])
        return f"    mov ax, {rng.randrange(0x10000):#x}\n    mov {reg}, ax\n"
    if kind == "compat":
        base = rng.choice([0, 0x10000, 0x200000, rng.getrandbits(32) & ~0xFFF])
        tail = ", ".join(str(rng.randrange(256)) for _ in range(rng.randint(1, 8)))
        return (f"    mov rdi, RT_GDT\n    movabs rax, {_code32_descriptor(base):#x}\n"
                "    mov qword ptr [rdi + 0x38], rax\n    sub rsp, 16\n    mov word ptr [rsp], 0x3f\n"
                "    mov qword ptr [rsp + 2], rdi\n    lgdt [rsp]\n    add rsp, 16\n"
                f"    push 0x38\n    lea rax, [rip + compat_{n}]\n    mov ecx, {base:#x}\n    sub rax, rcx\n"
                "    push rax\n    retfq\n"
                f"compat_{n}:\n    .byte {tail}\n")
    if kind == "idt":
        return (f"    sub rsp, 16\n    mov word ptr [rsp], {rng.randrange(0x10000):#x}\n"
                f"    movabs rax, {_u64(rng):#x}\n    mov qword ptr [rsp + 2], rax\n    lidt [rsp]\n    add rsp, 16\n"
                "    ud2\n")
    cmd = rng.choice([0, 1, 2, 3, 4, 5, 99, rng.getrandbits(64)])
    nargs = rng.choice([0, 1, 3, 6, 7, 1 << 63])
    gpa = rng.choice(["UCALL_GPA", "UCALL_GPA", hex(_u64(rng) & 0xFFFFFFFF)])
    return (f"    mov rdi, UCALL_GPA\n    movabs rax, {cmd:#x}\n    mov qword ptr [rdi], rax\n"
            f"    movabs rax, {nargs:#x}\n    mov qword ptr [rdi + 8], rax\n"
            f"    mov eax, {gpa}\n    mov dx, UCALL_PORT\n    out dx, eax\n")


def guest(rng: random.Random, vm_type: str = "default") -> str:
    """A guest of 1-3 hostile steps (raw TDCALLs among them on `tdx`)."""
    steps = "".join(step(rng, i, tdx=vm_type == "tdx") for i in range(rng.randint(1, 3)))
    return "guest_main:\n" + steps + "    ret\n"


def run_one(text: str, vm_type: str, timeout: float) -> tuple[str, str]:
    """(outcome, problem): problem is empty when the run ended as documented."""
    vendor = Vendor.INTEL if vm_type == "tdx" else Vendor.AMD  # a TD needs Intel, the rest run on AMD
    options = VmOptions(vm_type=vm_type, vendor=vendor, memory=MEMORY, timeout=timeout, seed=1)
    try:
        report = Machine(build_program("<hostile>", options, text=text), options).run()
    except Exception as exc:  # exactly what the campaign looks for
        return "EXCEPTION", f"{type(exc).__name__}: {exc}"
    if report.outcome not in OUTCOMES:
        return report.outcome, f"undocumented outcome {report.outcome!r}"
    if report.outcome == "internal_error":
        internal = report.extra.get("internal")
        if any(what in report.detail for what in UNMODELLED):
            return report.outcome, ""
        if internal is None or internal["suberror"] not in GUEST_SUBERRORS:
            return report.outcome, f"internal_error without a guest suberror: {report.detail}"
    return report.outcome, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=0.5)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    seen: Counter[tuple[str, str]] = Counter()
    problems: list[str] = []
    start = time.perf_counter()
    for i in range(args.guests):
        vm_type = VM_TYPES[i % len(VM_TYPES)]
        text = guest(rng, vm_type)
        outcome, problem = run_one(text, vm_type, args.timeout)
        seen[(vm_type, outcome)] += 1
        if problem:
            problems.append(f"guest {i} on {vm_type}: {problem}\n{text}")
    print(f"{args.guests} guests in {time.perf_counter() - start:.1f} s")
    for (vm_type, outcome), count in sorted(seen.items()):
        print(f"  {vm_type:13} {outcome:20} {count}")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
