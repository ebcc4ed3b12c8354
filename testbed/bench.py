"""`testbed bench`: the testbed's speed, as ratios against baselines measured in the same run.

Figures (medians of several repeats; the machine is shared, so expect noise):

* hypercall round trips per second through the kvm layer (a guest loop of KVM_HYPERCALL with
  an unknown number, answered -KVM_ENOSYS in the kernel model);
* KVM_HC_MAP_GPA_RANGE user exits per second through the VMM and its tracker;
* a compute loop's guest instructions per second with every testbed hook installed, against
  bare Unicorn running the same bytes with no hooks;
* SEV: the cost of one TLB miss through the Python page walker, and a guest touching 256
  distinct pages in a loop under `sev` against the same guest on a plain VM.

Each rate comes from two runs of the same guest with different iteration counts, so boot
and assembly costs cancel: rate = (n2 - n1) / (t2 - t1).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import IO, Any

from testbed.errors import TestbedError
from testbed.machine import Machine, VmOptions, build_program
from testbed.textout import plain_console, plain_table, styled

HYPERCALL_LOOP = """
guest_main:
    mov r12, LOOPS
bench_loop:
    mov rax, 0x999
    KVM_HYPERCALL
    dec r12
    jnz bench_loop
    ret
"""

MAP_GPA_LOOP = """
guest_main:
    mov r12, LOOPS
bench_loop:
    mov rax, KVM_HC_MAP_GPA_RANGE
    mov rbx, GUEST_FREE_GPA
    mov rcx, 1
    mov rdx, r12
    and rdx, 1
    shl rdx, 4
    KVM_HYPERCALL
    dec r12
    jnz bench_loop
    ret
"""

COMPUTE_BODY = """
    mov rcx, LOOPS
compute_loop:
    add rax, rcx
    xor rbx, rax
    dec rcx
    jnz compute_loop
"""
COMPUTE_LOOP = "guest_main:\n" + COMPUTE_BODY + "    ret\n"
COMPUTE_INSNS_PER_LOOP = 4

PAGES_LOOP = """
.ifndef PAGES
.equ PAGES, 256
.endif
guest_main:
    mov r12, LOOPS
bench_round:
    mov rdi, GUEST_FREE_GPA
    mov rcx, PAGES
bench_touch:
    add qword ptr [rdi], 1
    add rdi, 4096
    dec rcx
    jnz bench_touch
    dec r12
    jnz bench_round
    ret
"""


def _run(text: str, loops: int, defines: dict[str, int | str] | None = None, **opts: Any) -> tuple[float, int]:
    """(seconds, TLB fills) of one run of a benchmark guest."""
    options = VmOptions(defines={"LOOPS": loops, **(defines or {})}, timeout=600.0, record_exits=False, **opts)
    program = build_program("<bench>", options, text=text)
    with Machine(program, options) as machine:
        t0 = time.perf_counter()
        report = machine.run()
        elapsed = time.perf_counter() - t0
        tlb_fills = machine.cpu.tlb_fills
    if report.outcome != "done":
        raise RuntimeError(f"benchmark guest failed: {report.outcome} {report.detail}")
    return elapsed, tlb_fills


def _run_time(text: str, loops: int, **opts: Any) -> float:
    return _run(text, loops, **opts)[0]


# ------------------------------------------------------------------ the timer floor
#: A figure rests on a measured duration of at least this many ticks of the timer...
FLOOR_TICKS = 1000
#: ...and at least this long (a tick of perf_counter is 1 ns on Linux; scheduling noise is not).
MIN_MEASURED_S = 0.020
#: Rounds are doubled up to this factor before a figure is given up as unmeasurable.
MAX_SCALE = 1 << 16


class BenchError(TestbedError):
    """A figure that could not be measured above the timer's floor: it is not reported."""


def timer_floor() -> float:
    """The shortest duration a figure may rest on: FLOOR_TICKS ticks of time.perf_counter's
    resolution (time.get_clock_info), and at least MIN_MEASURED_S."""
    return max(MIN_MEASURED_S, FLOOR_TICKS * time.get_clock_info("perf_counter").resolution)


def measure(figure: str, once: Callable[[int], tuple[int, float]], *, floor: float | None = None,
            max_scale: int = MAX_SCALE) -> tuple[int, float]:
    """(units, seconds) from `once(scale)`, which measures `scale` times the base rounds.

    A duration below the floor (or a difference of two runs that came out negative or zero)
    says nothing about speed — `bench --quick` once reported 9e12 rounds/s and a met target
    from one — so the rounds are doubled and the figure measured again; past `max_scale` it
    is a BenchError naming the figure, never a number."""
    limit = timer_floor() if floor is None else floor
    scale = 1
    while True:
        units, seconds = once(scale)
        if units > 0 and seconds >= limit:
            return units, seconds
        if scale >= max_scale:
            raise BenchError(f"bench figure {figure}: {units} rounds took {seconds:.3g} s, under the timer floor "
                             f"of {limit:g} s even at {scale}x the base rounds; not reported")
        scale *= 2


def rate(text: str, n1: int, n2: int, repeats: int, figure: str = "rate", **opts: Any) -> float:
    """Iterations per second of the guest's loop, boot excluded (median of `repeats`): the
    difference of a run of n2 and one of n1 iterations, both scaled until it clears the floor."""
    samples = []
    for _ in range(repeats):

        def once(scale: int) -> tuple[int, float]:
            a, b = n1 * scale, n2 * scale
            t1 = _run_time(text, a, **opts)
            t2 = _run_time(text, b, **opts)
            return b - a, t2 - t1

        units, seconds = measure(figure, once)
        samples.append(units / seconds)
    return statistics.median(samples)


def bare_unicorn_compute(loops: int, repeats: int) -> float:
    """Loop iterations per second of COMPUTE_BODY on bare Unicorn (flat memory, no hooks)."""
    import unicorn
    from unicorn import x86_const

    from testbed.asm import assemble_source

    def once(scale: int) -> tuple[int, float]:
        n = loops * scale
        program = assemble_source(COMPUTE_BODY + "    hlt\n", filename="<bare>", base=0x1000, defines={"LOOPS": n})
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.mem_map(0, 0x10000)
        uc.mem_write(0x1000, program.code)
        uc.reg_write(x86_const.UC_X86_REG_RSP, 0x8000)
        t0 = time.perf_counter()
        uc.emu_start(0x1000, 0x1000 + len(program.code))
        return n, time.perf_counter() - t0

    samples = []
    for _ in range(repeats):
        n, seconds = measure("compute_insns_per_s_bare", once)
        samples.append(n / seconds)
    return statistics.median(samples)


def bare_exit_floor(loops: int, repeats: int) -> float:
    """Exits per second of bare Unicorn: a VMMCALL loop whose invalid-instruction hook (through
    the plain Python binding) only moves RIP past the instruction - the ceiling any model of
    a hypercall exit can reach on this machine, measured in the same run."""
    import unicorn
    from unicorn import x86_const

    from testbed.asm import assemble_source

    def skip(u: Any, _ud: Any) -> bool:
        u.reg_write(x86_const.UC_X86_REG_RIP, u.reg_read(x86_const.UC_X86_REG_RIP) + 3)
        return True

    def once(scale: int) -> tuple[int, float]:
        n = loops * scale
        program = assemble_source("mov rcx, LOOPS\nbare: mov rax, 0x999\nvmmcall\ndec rcx\njnz bare\nhlt\n",
                                  filename="<bare>", base=0x1000, defines={"LOOPS": n})
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.mem_map(0, 0x10000)
        uc.mem_write(0x1000, program.code)
        uc.hook_add(unicorn.UC_HOOK_INSN_INVALID, skip)
        t0 = time.perf_counter()
        uc.emu_start(0x1000, 0x1000 + len(program.code))
        return n, time.perf_counter() - t0

    samples = []
    for _ in range(repeats):
        n, seconds = measure("bare_unicorn_exits_per_s", once)
        samples.append(n / seconds)
    return statistics.median(samples)


def tlb_miss_cost(repeats: int, rounds: int = 20, figure: str = "tlb_miss_s", **opts: Any) -> float:
    """Seconds per TLB miss through the Python walker: a loop over 4096 pages (more than the
    TLB holds), timed at two lengths so boot cancels out: (t2 - t1) / (fills2 - fills1)."""

    def once(scale: int) -> tuple[int, float]:
        t1, f1 = _run(PAGES_LOOP, 1, {"PAGES": 4096}, **opts)
        t2, f2 = _run(PAGES_LOOP, 1 + rounds * scale, {"PAGES": 4096}, **opts)
        return f2 - f1, t2 - t1

    samples = []
    for _ in range(repeats):
        fills, seconds = measure(figure, once)
        samples.append(seconds / fills)
    return statistics.median(samples)


def collect(quick: bool = False) -> dict[str, Any]:
    """Every figure of the benchmark, measured now."""
    reps = 1 if quick else 3
    scale = 10 if quick else 1
    results: dict[str, Any] = {}
    results["hypercalls_per_s"] = rate(HYPERCALL_LOOP, 4_000 // scale, 84_000 // scale, reps, "hypercalls_per_s")
    results["map_gpa_exits_per_s"] = rate(MAP_GPA_LOOP, 4_000 // scale, 84_000 // scale, reps,
                                          "map_gpa_exits_per_s")
    floor = bare_exit_floor(80_000 // scale, reps)
    results["bare_unicorn_exits_per_s"] = floor
    results["hypercall_vs_bare_exit_ratio"] = results["hypercalls_per_s"] / floor
    results["map_gpa_vs_bare_exit_ratio"] = results["map_gpa_exits_per_s"] / floor
    loops = 20_000_000 // scale
    testbed_loops = rate(COMPUTE_LOOP, loops // 10, loops, reps, "compute_insns_per_s_testbed")
    bare_loops = bare_unicorn_compute(loops, reps)
    results["compute_insns_per_s_testbed"] = testbed_loops * COMPUTE_INSNS_PER_LOOP
    results["compute_insns_per_s_bare"] = bare_loops * COMPUTE_INSNS_PER_LOOP
    results["compute_ratio"] = testbed_loops / bare_loops
    sev_loops = rate(COMPUTE_LOOP, loops // 10, loops, reps, "compute (sev)", vm_type="sev", seed=1)
    results["compute_sev_vs_plain_ratio"] = sev_loops / testbed_loops
    rounds = 100_000 // scale
    plain = rate(PAGES_LOOP, rounds // 10, rounds, reps, "pages256_rounds_per_s_plain")
    sev = rate(PAGES_LOOP, rounds // 10, rounds, reps, "pages256_rounds_per_s_sev", vm_type="sev", seed=1)
    results["pages256_rounds_per_s_plain"] = plain
    results["pages256_rounds_per_s_sev"] = sev
    results["pages256_sev_ratio"] = sev / plain
    results["tlb_miss_s_plain"] = tlb_miss_cost(reps, rounds=max(2, 20 // scale), figure="tlb_miss_s_plain")
    results["tlb_miss_s_sev"] = tlb_miss_cost(reps, rounds=max(2, 20 // scale), figure="tlb_miss_s_sev",
                                              vm_type="sev", seed=1)
    results["targets"] = {
        "hypercalls_per_s >= 150k": results["hypercalls_per_s"] >= 150_000,
        "map_gpa_exits_per_s >= 80k": results["map_gpa_exits_per_s"] >= 80_000,
        "compute_ratio >= 0.70": results["compute_ratio"] >= 0.70,
        "pages256_sev_ratio >= 0.50": results["pages256_sev_ratio"] >= 0.50,
        "compute_sev_vs_plain_ratio >= 0.90": results["compute_sev_vs_plain_ratio"] >= 0.90,
    }
    return results


def run_bench(out: IO[str], quick: bool = False, as_json: bool = False,
              collect_fn: Callable[[bool], dict[str, Any]] | None = None) -> int:
    """Measure and print; the exit status is 0 (targets are reported, not enforced). A figure
    that cannot be measured above the timer floor raises BenchError: nothing is printed."""
    results = (collect_fn or collect)(quick)
    if as_json:
        out.write(json.dumps(results) + "\n")
        return 0
    console = plain_console(out)
    table = plain_table("testbed bench" + (" (quick)" if quick else ""), "figure", "value", right=("value",))
    for key, value in results.items():
        if key == "targets":
            continue
        if key.startswith("tlb_miss_s"):
            text = f"{value * 1e6:.2f} us"
        elif "ratio" in key:
            text = f"{value:.2f}x"
        else:
            text = f"{value:,.0f}"
        table.add_row(key, text)
    for target, met in results["targets"].items():
        table.add_row(f"target {target}", styled("met", "green") if met else styled("missed", "red"))
    console.print(table)
    return 0
