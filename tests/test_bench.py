"""The benchmark's measurement rules (testbed/bench.py), with stub clocks and stub runs.

Scenarios:
1. A duration under the timer floor (1000 ticks of perf_counter's resolution, at least 20 ms)
   is never turned into a figure: the rounds are doubled and the figure measured again.
2. A figure that stays under the floor up to the cap (an instantaneous measurement, or a
   difference of two runs that is zero or negative) is a BenchError naming the figure; the
   CLI prints it as one line with status 2, never a rate like 9e12/s with a "met" target.
3. The human table prints figure names and values literally.
4. A target is met only when every round meets it, missed only when every round misses it,
   and undecided when the rounds straddle its bound or are fewer than five.
5. Rounds are interleaved: within a group the ceiling is measured right before its figure on
   even rounds and right after it on odd ones, and a ratio is taken per round, so a machine
   whose speed swings from round to round still gives the ratio it has, with a narrow spread.
6. The ceilings run on bare Unicorn: the C-only exit hook and the ctypes one skip VMMCALL,
   and the TLB ceiling's loop goes through QEMU's page walker (a cleared PD entry faults).
7. TDVMCALL hypercalls and MapGPA exits under tdx are figures (no targets) measured in one group
   with SEV-SNP's GHCB hypercalls and PSC exits; their loops make one MAP_GPA_RANGE exit per iteration.
8. The plan holds the issue's targets and bounds, pairs each judged ratio with its own ceiling in
   one group, and measures what each figure's name says (C-only hook, reuse=True, 64 GiB boots);
   no absolute rate is a target; an undecided target says why; `--rounds` takes 5 or more.
9. The ceilings run the testbed guest's own instructions (the hypercall stub) and page-table
   shape (2 MiB data pages); the C-hook ceiling runs no Python during emu_start.
10. Large guests: 64 GiB boots paired with 64 MiB ones, and resident memory against the pages
    resident in the guest's backings.
11. The tracker benchmark: every round above the timer floor, targets as per-round ratios to the
    loop measured next to each round, pairs adjacent with alternating order, no dropped rounds.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import io
import json
import math
import struct
import sys
import time
import types
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from tool_module import load_tool

from testbed import bench
from testbed.bench import (
    BenchError,
    Measurement,
    Plan,
    Ratio,
    Spread,
    Target,
    evaluate,
    interleave,
    measure,
    paired_ratios,
    rate,
    run_bench,
    timer_floor,
    verdict,
)
from testbed.cli import EXIT_USAGE, main
from testbed.errors import MachineClosedError
from testbed.hw.exits import Vendor


def test_the_floor_is_1000_ticks_and_at_least_20_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    """timer_floor() is max(20 ms, 1000 x perf_counter's resolution from time.get_clock_info)."""
    assert timer_floor() >= max(0.020, 1000 * time.get_clock_info("perf_counter").resolution)
    coarse = SimpleNamespace(resolution=1e-3)
    monkeypatch.setattr(bench.time, "get_clock_info", lambda _name: coarse)
    assert timer_floor() == pytest.approx(1.0)


def test_an_instantaneous_measurement_is_an_error_naming_the_figure() -> None:
    """A measurement that always takes 0 s is retried with doubled rounds up to the cap, then refused by name."""
    scales: list[int] = []

    def instant(scale: int) -> tuple[int, float]:
        scales.append(scale)
        return 1000 * scale, 0.0

    with pytest.raises(BenchError, match=r"bench figure hypercalls_per_s: .* under the timer floor") as info:
        measure("hypercalls_per_s", instant, floor=0.02, max_scale=64)
    assert scales == [1, 2, 4, 8, 16, 32, 64]
    assert "not reported" in str(info.value)


def test_a_short_measurement_is_repeated_with_doubled_rounds() -> None:
    """A run below the floor is measured again with twice the rounds; the first one above it is used."""
    calls: list[int] = []

    def linear(scale: int) -> tuple[int, float]:
        calls.append(scale)
        return 100 * scale, 0.004 * scale  # 4 ms per 100 rounds

    units, seconds = measure("compute", linear, floor=0.02)
    assert calls == [1, 2, 4, 8]
    assert (units, seconds) == (800, pytest.approx(0.032))


def test_a_negative_or_zero_difference_is_never_a_figure() -> None:
    """A difference of two runs that comes out <= 0 (noise) is re-measured, not divided by a tiny epsilon."""
    results = iter([(10, -0.5), (20, 0.0), (40, 0.05)])
    assert measure("pages", lambda _scale: next(results), floor=0.02) == (40, 0.05)


def test_rate_refuses_a_loop_faster_than_the_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """rate() over runs whose loop costs nothing (only boot) raises BenchError, never 9e12 rounds/s."""
    monkeypatch.setattr(bench, "_run_time", lambda _text, _loops, **_opts: 0.25)
    monkeypatch.setattr(bench, "MAX_SCALE", 8)
    with pytest.raises(BenchError, match="pages256_rounds_per_s_plain"):
        rate("unused", 100, 1000, repeats=1, figure="pages256_rounds_per_s_plain")


def test_rate_is_measured_above_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """rate() returns loops/second from a difference that clears the floor (boot cancels out)."""
    seen: list[int] = []

    def run_time(_text: str, loops: int, **_opts: Any) -> float:
        seen.append(loops)
        return 0.3 + loops * 1e-6  # 1 us per loop, 0.3 s of boot

    monkeypatch.setattr(bench, "_run_time", run_time)
    assert rate("unused", 100, 1100, repeats=1, figure="x") == pytest.approx(1e6)
    assert max(seen) - min(seen) >= timer_floor() / 1e-6 * 0.999, "the difference measured is below the floor"


def test_bench_command_prints_an_unmeasurable_figure_as_one_line(capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`testbed bench` whose figure cannot be measured exits 2 with one line naming it, and prints no table."""

    def collect(_quick: bool, _rounds: int | None) -> dict[str, Any]:
        raise BenchError("bench figure compute_insns_per_s_bare: 0 rounds took 0 s, under the timer floor")

    monkeypatch.setattr(bench, "collect", collect)
    status = main(["bench", "--quick"])
    out, err = capsys.readouterr()
    assert status == EXIT_USAGE
    assert out == ""
    assert err.strip().splitlines() == [
        "testbed: bench figure compute_insns_per_s_bare: 0 rounds took 0 s, under the timer floor"]


def test_the_table_prints_names_and_values_literally(monkeypatch: pytest.MonkeyPatch) -> None:
    """Figure and target names with brackets or colons print as they are; verdicts are words, not markup."""
    monkeypatch.setenv("COLUMNS", "200")
    spread = {"median": 123456.0, "min": 100000.0, "max": 150000.0, "n": 5}
    results = {
        "rounds": 5, "quick": True,
        "figures": {"hypercalls_per_s [plain]": {"unit": "exits/s", **spread},
                    "x_ratio :smile:": {"unit": "x", "median": 0.5, "min": 0.4, "max": 0.6, "n": 5}},
        "targets": {
            "hypercalls_per_s >= [150k]": {"figure": "hypercalls_per_s [plain]", "verdict": "undecided", **spread},
            "x_ratio >= 0.9": {"figure": "x_ratio :smile:", "verdict": "missed", "median": 0.5, "min": 0.4,
                               "max": 0.6, "n": 5},
            "y >= 1": {"figure": "y", "verdict": "undecided", "reason": "not measured"},
        },
    }
    out = io.StringIO()
    assert run_bench(out, quick=True, collect_fn=lambda _quick, _rounds: results) == 0
    text = out.getvalue()
    for literal in ("hypercalls_per_s [plain]", "123,456", "100,000 - 150,000", "x_ratio :smile:", "0.500x",
                    "hypercalls_per_s >= [150k]", "undecided", "missed", "not measured", "5 interleaved rounds"):
        assert literal in text, f"{literal!r} missing from:\n{text}"


# ------------------------------------------------------------------ verdicts from spreads
def test_a_target_is_met_only_when_every_round_meets_it() -> None:
    """verdict(): >= is met when the minimum clears the bound (equality counts), missed when the maximum is under it."""
    assert verdict(Spread.of([0.30, 0.26, 0.25, 0.40, 0.31]), ">=", 0.25) == "met"
    assert verdict(Spread.of([0.10, 0.12, 0.24, 0.2, 0.11]), ">=", 0.25) == "missed"
    assert verdict(Spread.of([0.20, 0.30, 0.28, 0.27, 0.29]), ">=", 0.25) == "undecided"


def test_an_upper_bound_is_judged_from_the_other_end_of_the_spread() -> None:
    """verdict(): <= is met when the maximum is at or under the bound, missed when the minimum is over it."""
    assert verdict(Spread.of([9.0, 12.0, 15.0, 11.0, 10.0]), "<=", 15.0) == "met"
    assert verdict(Spread.of([16.0, 40.0, 19.0, 22.0, 17.0]), "<=", 15.0) == "missed"
    assert verdict(Spread.of([14.0, 16.0, 13.0, 12.0, 14.5]), "<=", 15.0) == "undecided"


def test_too_few_rounds_or_no_figure_is_undecided() -> None:
    """A spread of fewer than five rounds, or a figure not measured, never gives met or missed."""
    assert verdict(Spread.of([1.0, 1.0, 1.0, 1.0]), ">=", 0.5) == "undecided"
    assert verdict(Spread.of([0.1] * 4), ">=", 0.5) == "undecided"
    assert verdict(None, ">=", 0.5) == "undecided"
    assert bench.MIN_ROUNDS == 5


def test_a_spread_is_median_min_max_and_count() -> None:
    """Spread.of gives the median, the extremes and n, and refuses no samples or a non-finite one."""
    assert Spread.of([3.0, 1.0, 2.0, 10.0, 4.0]) == Spread(3.0, 1.0, 10.0, 5)
    with pytest.raises(ValueError):
        Spread.of([])
    with pytest.raises(ValueError):
        Spread.of([1.0, float("inf")])


# ------------------------------------------------------------------ pairing and interleaving
def test_rounds_alternate_the_order_within_a_group() -> None:
    """interleave(): a group runs in order on even rounds and reversed on odd ones, groups one after the other."""
    log: list[str] = []

    def m(name: str) -> Measurement:
        return Measurement(name, "x", lambda: log.append(name) or 1.0)

    samples = interleave(3, [[m("c1"), m("a"), m("b")], [m("c2"), m("d")]])
    assert log == ["c1", "a", "b", "c2", "d",
                   "b", "a", "c1", "d", "c2",
                   "c1", "a", "b", "c2", "d"]
    assert {name: len(values) for name, values in samples.items()} == {"c1": 3, "a": 3, "b": 3, "c2": 3, "d": 3}


def test_passes_alternate_the_order_and_a_round_is_their_median() -> None:
    """interleave() with passes: a group runs its passes back to back, alternating the order
    pass by pass (so a figure sits right next to its ceiling on both sides within
    milliseconds), and each round's value is the median of the passes; a group with one pass
    is as before."""
    log: list[str] = []
    values = {"c": iter([1.0, 9.0, 2.0, 3.0, 4.0, 8.0]), "f": iter([5.0, 6.0, 0.0, 7.0, 7.0, 7.0]),
              "s": iter([10.0, 11.0])}

    def m(name: str) -> Measurement:
        return Measurement(name, "x", lambda: log.append(name) or next(values[name]))

    samples = interleave(2, [[m("c"), m("f")], [m("s")]], passes=[3, 1])
    assert log == ["c", "f", "f", "c", "c", "f", "s",
                   "f", "c", "c", "f", "f", "c", "s"]
    assert bench.round_values(samples) == {"c": [2.0, 4.0], "f": [5.0, 7.0], "s": [10.0, 11.0]}
    with pytest.raises(ValueError, match="passes"):
        interleave(1, [[m("c")]], passes=[0])


def test_a_ratio_is_paired_pass_by_pass() -> None:
    """With passes, a ratio's round is the median of its passes' ratios (each pass's two values
    taken back to back), not the ratio of the two figures' medians, which may come from
    different passes; each figure's round is the median of its passes."""
    per_pass = {"c": [[1.0, 8.0, 3.0]], "f": [[1.0, 4.0, 9.0]]}  # pass ratios 1, 0.5, 3
    groups = [[Measurement("c", "x", lambda: 0.0), Measurement("f", "x", lambda: 0.0)]]
    p = Plan(groups, [Ratio("r", "f", "c")], [Target("r", ">=", 1.2, "r >= 1.2")], [3])
    assert bench.round_values(per_pass) == {"c": [3.0], "f": [4.0]}
    paired = evaluate(p, per_pass, 1, quick=False)
    assert paired["figures"]["r"]["median"] == 1.0
    medians = {name: [[value] for value in values] for name, values in bench.round_values(per_pass).items()}
    assert evaluate(p, medians, 1, quick=False)["figures"]["r"]["median"] == pytest.approx(4 / 3)


def test_collect_runs_the_plans_passes_and_closes_its_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    """collect() takes each measurement of a group its passes' times a round, pairs the ratio
    pass by pass, and closes what the plan opened - also when a take fails."""
    takes: collections.Counter[str] = collections.Counter()
    closed: list[bool] = []

    def make(fail: bool) -> Plan:
        resources = contextlib.ExitStack()
        resources.callback(closed.append, True)

        def take(name: str) -> float:
            takes[name] += 1
            if fail and takes[name] == 2:
                raise BenchError("bench figure a: failed")
            return float(takes[name])

        groups = [[Measurement("a", "x", lambda: take("a")), Measurement("b", "x", lambda: take("b"))]]
        return Plan(groups, [Ratio("r", "a", "b")], [], [3], resources)

    monkeypatch.setattr(bench, "scenario_seconds", lambda *_a, **_kw: 0.001)
    monkeypatch.setattr(bench, "plan", lambda _quick: make(False))
    results = bench.collect(quick=True, rounds=5)
    assert takes == {"a": 15, "b": 15} and closed == [True]
    assert results["figures"]["r"] == {"unit": "x", "ratio_of": ["a", "b"], "median": 1.0, "min": 1.0, "max": 1.0,
                                       "n": 5, "per_round": [1.0] * 5}
    takes.clear()
    closed.clear()
    monkeypatch.setattr(bench, "plan", lambda _quick: make(True))
    with pytest.raises(BenchError):
        bench.collect(quick=True, rounds=5)
    assert closed == [True]


def test_a_slice_is_loops_units_of_one_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    """LoopVm.rate() counts whole slices of LOOPS iterations: three slices of a 200-hypercall
    loop are 600 units, and the VM's KVM answered exactly 600 hypercalls in them."""
    loop = bench.LoopVm(bench.HYPERCALL_BODY, 200, "hc_test", memory="8M")
    try:
        seen: list[tuple[str, int]] = []

        def three_slices(figure: str, once: Callable[[int], tuple[int, float]]) -> tuple[int, float]:
            units, seconds = once(3)
            seen.append((figure, units))
            return units, seconds

        monkeypatch.setattr(bench, "measure", three_slices)
        before = loop.vm.machine.kvm_vcpu.stat_hypercalls
        assert loop.rate() > 0
        assert seen == [("hc_test", 600)]
        assert loop.vm.machine.kvm_vcpu.stat_hypercalls - before == 600
    finally:
        loop.close()


def test_a_sliced_figure_runs_slices_of_one_booted_vm() -> None:
    """LoopVm: the loop body runs LOOPS times between two ucalls of a VM booted once; a take is
    whole slices (units = slices x LOOPS) above the timer floor; the resources close the VM.
    A body that leaves the loop is a BenchError naming the figure, not a rate."""
    resources = contextlib.ExitStack()
    take = bench.sliced(resources, bench.HYPERCALL_BODY, 200, "hc_test", memory="8M")
    assert take() > 0 and take() > 0
    resources.close()
    with pytest.raises(MachineClosedError):
        take()  # the VM went with the resources
    with pytest.raises(BenchError, match=r"hc_test.*done"):
        bench.LoopVm("    ret\n", 1, "hc_test", memory="8M")


def test_paired_ratios_cancel_a_machine_whose_speed_swings() -> None:
    """With the machine 1x-3x slower from round to round, per-round ratios stay exact while the rates swing."""
    slowdown = [1.0, 3.0, 1.5, 2.5, 1.0, 2.0, 3.0]  # a fake clock: how slow each round's machine is
    calls = {"n": 0}

    def timed(rate_when_idle: float) -> Measurement:
        def take() -> float:
            round_index = calls["n"] // 2  # two measurements per round
            calls["n"] += 1
            return rate_when_idle / slowdown[round_index]

        return Measurement(f"rate{rate_when_idle:g}", "exits/s", take)

    ceiling, fig = timed(1000.0), timed(300.0)  # the testbed runs at 0.3x its ceiling
    plan = Plan([[ceiling, fig]], [Ratio("fig_ratio", fig.name, ceiling.name)],
                [Target("fig_ratio", ">=", 0.25, "ratio >= 0.25"), Target(fig.name, ">=", 150.0, "fig >= 150")])
    results = evaluate(plan, interleave(len(slowdown), plan.groups), len(slowdown), quick=True)
    ratio = results["figures"]["fig_ratio"]
    assert (ratio["median"], ratio["min"], ratio["max"]) == (pytest.approx(0.3),) * 3
    assert ratio["n"] == len(slowdown) and ratio["unit"] == "x" and ratio["ratio_of"] == [fig.name, ceiling.name]
    assert results["targets"]["ratio >= 0.25"]["verdict"] == "met"
    raw = results["figures"][fig.name]
    assert (raw["min"], raw["max"]) == (pytest.approx(100.0), pytest.approx(300.0))
    assert results["targets"]["fig >= 150"]["verdict"] == "undecided", "the absolute rate straddles 150"


def test_paired_ratios_are_per_round() -> None:
    """paired_ratios divides round i by round i, and refuses figures with different numbers of rounds."""
    assert paired_ratios([2.0, 9.0, 4.0], [1.0, 3.0, 8.0]) == [2.0, 3.0, 0.5]
    with pytest.raises(ValueError, match="same rounds"):
        paired_ratios([1.0, 2.0], [1.0])


def test_a_ratio_without_its_ceiling_is_absent_and_its_target_undecided() -> None:
    """evaluate(): when a ceiling was not measured (C extension not built), the ratio is left out, not guessed."""
    plan = Plan([], [Ratio("r", "fig", "missing_ceiling")], [Target("r", ">=", 0.25, "r >= 0.25")])
    results = evaluate(plan, {"fig": [[1.0]] * 5}, 5, quick=False)
    assert "r" not in results["figures"]
    assert results["targets"]["r >= 0.25"] == {"figure": "r", "op": ">=", "bound": 0.25, "verdict": "undecided",
                                               "reason": "not measured"}


def test_bench_json_end_to_end_with_stub_measurements(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`testbed bench --quick --json` gives every figure with median/min/max/n and every target a verdict."""
    values = iter(range(1, 1000))

    def stub_plan(quick: bool) -> Plan:
        assert quick
        ceiling = Measurement("ceiling_exits_c_hook_py", "exits/s", lambda: 1000.0 + next(values))
        fig = Measurement("hypercalls_per_s", "exits/s", lambda: 400.0)
        scenario = Measurement("scenario_ms", "ms", lambda: 20.0 + next(values))
        return Plan([[ceiling, fig], [scenario]],
                    [Ratio("hypercalls_vs_c_hook_py", "hypercalls_per_s", "ceiling_exits_c_hook_py")],
                    [Target("hypercalls_vs_c_hook_py", ">=", 0.25, "hc"),
                     Target("scenario_ms", "<=", 15.0, "scenario"),
                     Target("hypercalls_per_s", ">=", 400.0, "abs")])

    monkeypatch.setattr(bench, "plan", stub_plan)
    monkeypatch.setattr(bench, "scenario_seconds", lambda *_args, **_kw: 0.001)
    assert main(["bench", "--quick", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rounds"] == 5 and doc["quick"] is True
    for name in ("ceiling_exits_c_hook_py", "hypercalls_per_s", "scenario_ms", "hypercalls_vs_c_hook_py"):
        assert set(doc["figures"][name]) >= {"median", "min", "max", "n", "unit"}
        assert doc["figures"][name]["n"] == 5
    assert {label: t["verdict"] for label, t in doc["targets"].items()} == {
        "hc": "met", "scenario": "missed", "abs": "met"}


# ------------------------------------------------------------------ the real ceilings, small loops
@pytest.mark.skipif(not bench.fastexit_available(), reason="the C extension is not built")
@pytest.mark.parametrize("kind", ["c_hook", "c_hook_py", "ctypes"])
def test_each_exit_ceiling_runs_its_vmmcall_loop_to_the_end(kind: bench.ExitCeiling) -> None:
    """bare_exit_rate() completes the loop (RCX reaches 0, checked inside) and gives a positive rate above the floor."""
    assert bench.bare_exit_rate(kind, 2000) > 0


def test_the_tlb_ceiling_goes_through_qemus_page_walker() -> None:
    """The bare TLB loop runs with paging on: a cleared PD entry of a data page faults, flat memory is not read."""
    import unicorn

    uc, end = bench._bare_paged(1)
    uc.emu_start(0x1000, end)  # the intact map runs to HLT
    broken, end = bench._bare_paged(1)
    pde = 0x10000 + 0x2000 + 8 * ((bench.BARE_TLB_DATA + 7 * 4096) >> 21)
    broken.mem_write(pde, struct.pack("<Q", 0))
    with pytest.raises(unicorn.UcError):
        broken.emu_start(0x1000, end)


def _bare_walk(uc: Any, va: int) -> tuple[int, int]:
    """(level, entry) of the leaf mapping `va` in a bare engine's 4-level tables (CR3 = 0x10000)."""
    table = 0x10000
    for level in (4, 3, 2, 1):
        index = (va >> (12 + 9 * (level - 1))) & 0x1FF
        entry = struct.unpack("<Q", uc.mem_read(table + 8 * index, 8))[0]
        if level == 1 or entry & 0x80:
            return level, entry
        table = entry & 0x000F_FFFF_FFFF_F000
    raise AssertionError("unreachable")


PTE_PROBE = """
.macro REPORT gpa
    mov rdi, \\gpa
    call rt_pte_lookup
    mov rax, qword ptr [rax]
    GUEST_SYNC rdx, rax
.endm
guest_main:
    lea rbx, [rip + guest_main]
    REPORT rbx
    REPORT GUEST_FREE_GPA + 0x5000
    mov rax, GUEST_FREE_GPA
    GUEST_SYNC rax
    ret
"""


def test_the_tlb_ceiling_has_the_testbed_guests_page_table_shape() -> None:
    """The bare TLB loop maps code by 4 KiB and data (at GUEST_FREE_GPA) by 2 MiB pages, as the testbed's guest does."""
    from testbed.api import Vm

    with Vm() as vm:
        vcpu = vm.load(text=PTE_PROBE)
        syncs = [vcpu.run_to_ucall().args for _ in range(3)]
    (code_level, _code), (data_level, data_entry), (free_gpa,) = (tuple(args) for args in syncs)
    uc, _end = bench._bare_paged(1)
    assert free_gpa == bench.BARE_TLB_DATA
    assert _bare_walk(uc, 0x1000)[0] == code_level == 1
    level, entry = _bare_walk(uc, bench.BARE_TLB_DATA + 0x5000)
    assert level == data_level == 2
    assert entry & 0x80 and data_entry & 0x80, "a 2 MiB page on both sides"


def test_the_exit_ceilings_run_the_testbeds_hypercall_instructions() -> None:
    """The bare exit loop runs the testbed's hypercall loop and its VMMCALL; RET stub, in the loop's page."""
    from testbed.api import Vm
    from testbed.asm import assemble_source
    from testbed.decode import disassemble

    def shape(code: bytes, base: int, loop: int, stub: int) -> tuple[list[str], list[str]]:
        body = disassemble(code[loop - base:], loop, limit=4)
        texts = [i.text if i.mnemonic not in ("call", "jne") else i.mnemonic for i in body]
        assert next(i for i in body if i.mnemonic == "call").op_str == hex(stub)
        assert body[-1].op_str == hex(loop)
        return texts, [i.text for i in disassemble(code[stub - base:], stub, limit=2)]

    bare = assemble_source(bench.BARE_EXIT_LOOP + "    hlt\n", filename="<bare>", base=0x1000,
                           defines={"LOOPS": 7})
    bare_loop, bare_stub = bare.symbols["bench_loop"], bare.symbols["bare_kvm_hypercall"]
    with Vm() as vm:
        vm.load(text=bench.HYPERCALL_LOOP, defines={"LOOPS": 7})
        symbols = vm.machine.program.symbols
        loop, stub = symbols["bench_loop"], symbols["rt_kvm_hypercall"]
        base = loop & ~0xFFF
        code = vm.read(base, (stub & ~0xFFF) + 0x1000 - base)
    assert shape(bare.code, 0x1000, bare_loop, bare_stub) == shape(code, base, loop, stub)
    assert shape(code, base, loop, stub)[1] == ["vmmcall", "ret"]
    assert bare_loop >> 12 == bare_stub >> 12 and loop >> 12 == stub >> 12, "the stub in the loop's page"


def test_the_empty_guest_scenario_runs_through_the_public_api() -> None:
    """scenario_seconds() boots an empty guest with testbed.Vm and gets its done ucall, in positive time."""
    assert bench.scenario_seconds("default", "scenario_ms") > 0


@pytest.mark.skipif(not bench.reuse_available(), reason="Vm.load has no reuse= (snapshot pool) yet")
def test_the_reused_scenario_runs_through_the_snapshot_pool() -> None:
    """scenario_seconds(reuse=True) loads with Vm.load(reuse=True) and gets the empty guest's done ucall."""
    assert bench.scenario_seconds("default", "scenario_ms_reuse", reuse=True) > 0


# ------------------------------------------------------------------ the plan: the issue's targets and pairings
#: The issue's targets, word for word in numbers: figure -> (op, bound).
ISSUE_TARGETS = {
    "scenario_ms": ("<=", 15.0),
    "scenario_ms_sev_snp": ("<=", 50.0),
    "boot_64g_vs_64m": ("<=", 2.0),
    "boot_64g_vs_64m_sev": ("<=", 2.0),
    "boot_64g_vs_64m_sev_snp": ("<=", 2.0),
    "rss_64g_over_touched_mib": ("<=", 100.0),
    "rss_64g_over_touched_mib_sev": ("<=", 100.0),
    "rss_64g_over_touched_mib_sev_snp": ("<=", 100.0),
    "tlb_heavy_ratio": (">=", 0.10),
    "hypercalls_vs_c_hook_py": (">=", 0.25),
}
#: Each ratio the issue judges: ratio -> (figure, the ceiling or baseline it is divided by).
ISSUE_PAIRINGS = {
    "hypercalls_vs_c_hook_py": ("hypercalls_per_s", "ceiling_exits_c_hook_py"),
    "tlb_heavy_ratio": ("tlb_heavy_rounds_per_s", "ceiling_tlb"),
    "boot_64g_vs_64m": ("boot_64g_ms", "boot_64m_ms"),
    "boot_64g_vs_64m_sev": ("boot_64g_ms_sev", "boot_64m_ms_sev"),
    "boot_64g_vs_64m_sev_snp": ("boot_64g_ms_sev_snp", "boot_64m_ms_sev_snp"),
}


def test_plan_holds_the_issues_targets_and_no_raw_rate_target() -> None:
    """plan() holds every target of the issue with its bound, and none on an absolute rate."""
    p = bench.plan(quick=True)
    targets = {t.figure: (t.op, t.bound) for t in p.targets}
    assert {name: targets.get(name) for name in ISSUE_TARGETS} == ISSUE_TARGETS
    if bench.reuse_available():
        assert targets["scenario_ms_reuse"] == ("<=", 15.0) and targets["scenario_ms_sev_snp_reuse"] == ("<=", 50.0)
    units = {m.name: m.unit for group in p.groups for m in group}
    ratios = {r.name for r in p.ratios}
    for figure in targets:
        assert figure in ratios or units[figure] in ("ms", "MiB"), f"{figure} is judged as a raw {units[figure]}"
    assert not {"hypercalls_per_s", "map_gpa_exits_per_s"} & set(targets)


def test_plan_pairs_each_ratio_with_its_ceiling_in_one_group() -> None:
    """plan() divides each judged figure by its own ceiling or baseline, measured in the same group."""
    p = bench.plan(quick=True)
    pairs = {r.name: (r.numerator, r.denominator) for r in p.ratios}
    expected = dict(ISSUE_PAIRINGS)
    if not bench.fastexit_available():
        del expected["hypercalls_vs_c_hook_py"]
    assert {name: pairs[name] for name in expected} == expected
    groups = [{m.name for m in group} for group in p.groups]
    for numerator, denominator in expected.values():
        assert any({numerator, denominator} <= g for g in groups), f"{numerator} not measured next to {denominator}"
        group = next(g for g in p.groups if numerator in {m.name for m in g})
        index = {m.name: i for i, m in enumerate(group)}
        assert len(group) == 2 or abs(index[numerator] - index[denominator]) <= 2
    for i, group in enumerate(p.groups):
        names = {m.name for m in group}
        if names & {"ceiling_exits_c_hook_py", "ceiling_tlb", "boot_64g_ms"}:
            assert p.passes[i] >= 3, "a ratio target's group runs short passes"


def test_plan_measures_each_figure_with_what_its_name_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """plan()'s measurements call what their names say: the C-only hook, reuse=True, 64 GiB / 64 MiB, VM types."""
    calls: dict[str, tuple[Any, ...]] = {}

    def record(kind: str) -> Callable[..., float]:
        def stub(*args: Any, **kwargs: Any) -> float:
            calls[current[0]] = (kind, args, tuple(sorted(kwargs.items())))
            return 1.0
        return stub

    current = [""]
    monkeypatch.setattr(bench, "fastexit_available", lambda: True)
    monkeypatch.setattr(bench, "reuse_available", lambda: True)
    for name in ("bare_exit_rate", "bare_compute_rate", "bare_tlb_rate", "scenario_seconds", "rss_over_touched_mib",
                 "hypercall_rate_ctypes", "rate_once"):
        monkeypatch.setattr(bench, name, record(name))
    monkeypatch.setattr(bench, "sliced", lambda _res, body, _loops, figure, **opts: (
        lambda: record("sliced")(body, figure, **opts)))
    p = bench.plan(quick=True)
    for group in p.groups:
        for m in group:
            current[0] = m.name
            m.take()
    assert calls["ceiling_exits_c_hook"][:2] == ("bare_exit_rate", ("c_hook", 50_000))
    assert calls["ceiling_exits_c_hook_py"][:2] == ("bare_exit_rate", ("c_hook_py", 25_000))
    assert calls["ceiling_exits_ctypes"][:2] == ("bare_exit_rate", ("ctypes", 10_000))
    assert calls["ceiling_tlb"][0] == "bare_tlb_rate" and calls["ceiling_compute"][0] == "bare_compute_rate"
    assert calls["hypercalls_per_s"][:2] == ("sliced", (bench.HYPERCALL_BODY, "hypercalls_per_s"))
    assert calls["tlb_heavy_rounds_per_s"][1] == (bench.TLB_BODY, "tlb_heavy_rounds_per_s")
    assert calls["scenario_ms_reuse"] == ("scenario_seconds", ("default", "scenario_ms_reuse"), (("reuse", True),))
    assert calls["scenario_ms_sev_snp_reuse"][2] == (("reuse", True),)
    assert calls["scenario_ms"] == ("scenario_seconds", ("default", "scenario_ms"), ())
    for vm_type, suffix in bench.LARGE_VM_TYPES.items():
        assert calls[f"boot_64g_ms{suffix}"] == ("scenario_seconds", (vm_type, f"boot_64g_ms{suffix}"),
                                                  (("memory", 64 << 30),))
        assert calls[f"boot_64m_ms{suffix}"] == ("scenario_seconds", (vm_type, f"boot_64m_ms{suffix}"),
                                                  (("memory", 64 << 20),))
        assert calls[f"rss_64g_over_touched_mib{suffix}"][:2] == (
            "rss_over_touched_mib", (vm_type, f"rss_64g_over_touched_mib{suffix}"))
    assert bench.LARGE_GUEST == 64 << 30 and bench.RSS_SLACK_MIB == 100.0


def test_warm_ups_are_named_apart_and_run_before_the_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each scenario and memory figure has its own `(warm-up)`, and collect() takes them before the rounds."""
    p = bench.plan(quick=True)
    names = [w.name for w in p.warmups]
    assert len(names) == len(set(names))
    scenario_like = {m.name for g in p.groups for m in g if m.unit in ("ms", "MiB")}
    assert set(names) == {f"{name} (warm-up)" for name in scenario_like}
    log: list[str] = []
    warm = [Measurement("w1", "ms", lambda: log.append("w1") or 1.0),
            Measurement("w2", "ms", lambda: log.append("w2") or 1.0)]
    fig = Measurement("f", "ms", lambda: log.append("f") or 1.0)
    monkeypatch.setattr(bench, "plan", lambda _quick: Plan([[fig]], [], [], [1], contextlib.ExitStack(), warm))
    assert bench.collect(quick=True, rounds=5)["warm_ups"] == ["w1", "w2"]
    assert log == ["w1", "w2"] + ["f"] * 5


@pytest.mark.skipif(not bench.fastexit_available(), reason="the C extension is not built")
@pytest.mark.parametrize(("kind", "python_calls"), [("c_hook", 0), ("c_hook_py", 300), ("ctypes", 300)])
def test_only_the_c_hook_ceiling_runs_no_python_during_emu_start(kind: bench.ExitCeiling, python_calls: int) -> None:
    """The C-hook ceiling runs no Python during emu_start; the Python-handler and ctypes ones once per exit."""
    from unicorn import x86_const as ux

    uc, end, keep = bench.bare_exit_engine(kind, 300)
    seen: list[str] = []

    def profile(frame: Any, event: str, _arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename == bench.__file__:
            seen.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        uc.emu_start(0x1000, end)
    finally:
        sys.setprofile(None)
    assert uc.reg_read(ux.UC_X86_REG_R12) == 0, "the loop ran to its end"
    assert len(seen) == python_calls, collections.Counter(seen)
    for item in keep:
        if hasattr(item, "close"):
            item.close()


@pytest.mark.skipif(not bench.reuse_available(), reason="Vm.load has no reuse= (snapshot pool) yet")
def test_reused_scenarios_come_from_the_snapshot_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """scenario_seconds(reuse=True) takes every machine from the snapshot pool; without reuse, none."""
    from testbed.snapshot import POOL

    def twice(_figure: str, once: Callable[[int], tuple[int, float]]) -> tuple[int, float]:
        return once(2)

    bench.scenario_seconds("default", "warm", reuse=True)  # boots once and fills the pool
    monkeypatch.setattr(bench, "measure", twice)
    hits, misses = POOL.hits, POOL.misses
    bench.scenario_seconds("default", "scenario_ms_reuse", reuse=True)
    assert (POOL.hits - hits, POOL.misses - misses) == (2, 0)
    bench.scenario_seconds("default", "scenario_ms")
    assert (POOL.hits - hits, POOL.misses - misses) == (2, 0)


# ------------------------------------------------------------------ verdict reasons, --rounds
def test_an_undecided_target_says_why_and_every_figure_has_its_rounds() -> None:
    """evaluate() gives an undecided target its reason, and every figure and target its per-round values."""
    groups = [[Measurement(n, "x", lambda: 0.0) for n in ("c", "f", "few")]]
    p = Plan(groups, [Ratio("r", "f", "c")],
             [Target("r", ">=", 1.5, "straddles"), Target("f", ">=", 1.0, "met"), Target("c", ">=", 9.0, "missed"),
              Target("few", ">=", 0.0, "few"), Target("absent", ">=", 1.0, "absent")])
    samples = {"c": [[1.0], [2.0], [1.0], [1.0], [1.0]], "f": [[2.0], [2.0], [1.0], [2.0], [3.0]],
               "few": [[1.0], [1.0], [1.0]]}
    results = evaluate(p, samples, 5, quick=True)
    reasons = {label: t.get("reason") for label, t in results["targets"].items()}
    assert reasons["met"] is None and reasons["missed"] is None
    assert reasons["straddles"].startswith("the spread straddles the bound: 1 - 3 around 1.5")
    assert reasons["few"] == "too few rounds: 3 < 5" and reasons["absent"] == "not measured"
    assert results["figures"]["r"]["per_round"] == [2.0, 1.0, 1.0, 2.0, 3.0]
    assert results["targets"]["straddles"]["per_round"] == [2.0, 1.0, 1.0, 2.0, 3.0]
    assert results["figures"]["c"]["per_round"] == [1.0, 2.0, 1.0, 1.0, 1.0]


def test_bench_rounds_option_sets_the_rounds_and_refuses_fewer_than_five(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`testbed bench --rounds N` runs N rounds; fewer than 5 is a one-line usage error."""
    seen: list[int | None] = []

    def collect(quick: bool, rounds: int | None) -> dict[str, Any]:
        seen.append(rounds)
        return {"rounds": rounds, "quick": quick, "figures": {}, "targets": {}}

    monkeypatch.setattr(bench, "collect", collect)
    assert main(["bench", "--quick", "--json", "--rounds", "6"]) == 0
    assert json.loads(capsys.readouterr().out)["rounds"] == 6 and seen == [6]
    assert main(["bench", "--rounds", "4"]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and "--rounds 4: at least 5" in err and len(err.strip().splitlines()) == 1
    assert seen == [6]


# ------------------------------------------------------------------ large guests
def test_resident_in_counts_the_pages_a_mapping_has_in_memory() -> None:
    """resident_in(): the pages of the ranges in memory (mincore) - pages touched, not pages mapped."""
    import ctypes
    import mmap

    area = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        holder = ctypes.c_char.from_buffer(area)
        address = ctypes.addressof(holder)
        del holder
        assert bench.resident_in([(address, address + 64 * 4096)]) == 0
        for page in range(0, 40, 4):
            area[page * 4096] = 1
        assert bench.resident_in([(address, address + 64 * 4096)]) == 10 * 4096
    finally:
        area.close()


def test_rss_over_touched_is_the_growth_beyond_the_backings_resident_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """rss_over_touched_mib() is the RSS growth minus the pages resident in the guest's backings, in MiB."""
    rss = iter([100 << 20, 300 << 20])
    ranges: list[list[tuple[int, int]]] = []
    monkeypatch.setattr(bench, "process_rss", lambda: next(rss))
    monkeypatch.setattr(bench, "resident_in", lambda r: ranges.append(r) or 150 << 20)
    assert bench.rss_over_touched_mib("sev", "rss_test", memory=bench.SMALL_GUEST) == 50.0
    assert [end - start for start, end in ranges[0]] == [bench.SMALL_GUEST] * 2, "sev: the DRAM and private backings"


# ------------------------------------------------------------------ the tracker benchmark
def _tracker_bench() -> Any:
    """tools/bench_trackers.py as a module."""
    return load_tool("bench_trackers")


def _native_bench() -> Any:
    """tools/bench_native_trackers.py as a module (it imports bench_trackers: loaded first)."""
    _tracker_bench()
    return load_tool("bench_native_trackers")


def _row(tb: Any, tracker: str, size: str = "1G", **rounds: list[float]) -> Any:
    return tb.Result("dma_churn", size, 1 << 18, tracker, 100, None, None, 0.0, 0.0, 0, None, 0, False, **rounds)


def test_tracker_bench_judges_ratio_targets_from_paired_rounds() -> None:
    """bench_trackers' ratio targets are met / missed only when every round agrees, else undecided with why."""
    tb = _tracker_bench()
    fast, noisy, slow = [1.0, 0.9, 1.2, 1.0, 0.95], [1.0, 0.5, 1.2, 1.0, 0.95], [0.5] * 5
    assert tb.ratio_check("t", ["1G"], [fast], 0.86).verdict == "met"
    noisy_check = tb.ratio_check("t", ["1G"], [noisy], 0.86)
    assert noisy_check.verdict == "undecided" and "straddles" in noisy_check.reason
    assert tb.ratio_check("t", ["1G", "64G"], [fast, slow], 0.86).verdict == "missed"
    few = tb.ratio_check("t", ["1G"], [[1.0] * 3], 0.86)
    assert few.verdict == "undecided" and "too few rounds" in few.reason
    assert tb.ratio_check("t", ["1G"], [[]], 0.86).reason == "1G: not measured"
    assert tb.combine(["met", "undecided"]) == "undecided" and tb.combine([]) == "undecided"


def test_tracker_bench_targets_are_ratios_to_the_paired_bare_loop_not_raw_rates() -> None:
    """bench_trackers judges per-round ratios to the paired bare loop / peer, never raw rates."""
    tb = _tracker_bench()
    assert math.isclose(tb.RANGES_VS_BARE_MIN, 2.5 / 2.9)
    assert math.isclose(tb.BITMAP_VS_BARE_MIN, 10 / 16)
    fast_rates = [1e9] * 5
    results = [
        _row(tb, "ranges", batch_rounds=fast_rates, batch_vs_bare_rounds=[0.5] * 5),
        _row(tb, "bitmap", batch_rounds=fast_rates, batch_vs_bare_rounds=[0.7] * 5),
        _row(tb, "tree", batch_rounds=fast_rates, call_vs_peer_rounds=[12.0, 9.0, 11.0, 12.0, 13.0]),
        _row(tb, "intervaltree", call_rounds=[1.0] * 5),
    ]
    for workload in ("boot", "discontiguous"):
        results.append(tb.Result(workload, "1G", 1 << 18, "ranges", 1, None, None, 0.0, 0.0, 1000, None, 0, False))
    verdicts = {c.target.split(" ")[0]: c.verdict for c in tb.targets(results, ["1G"]) if "x " in c.target}
    assert verdicts == {"ranges": "missed", "bitmap": "met", "tree": "undecided"}


def test_tracker_bench_refuses_a_pairing_that_drops_rounds() -> None:
    """bench_trackers: a tree / intervaltree pairing missing a round is an error, never a shorter list."""
    tb = _tracker_bench()
    peer = _row(tb, "intervaltree", call_rounds=[1.0] * 5)
    assert tb.peer_ratio_rounds(_row(tb, "tree", call_vs_peer_rounds=[10.0] * 5), peer) == [10.0] * 5
    with pytest.raises(ValueError, match="paired rounds"):
        tb.peer_ratio_rounds(_row(tb, "tree", call_vs_peer_rounds=[10.0] * 4), peer)


def test_tracker_rounds_alternate_and_keep_each_pair_adjacent() -> None:
    """bench_trackers' rounds keep each pair adjacent and reverse their order every other round."""
    tb = _tracker_bench()
    names = ["bitmap", "ranges", "tree", "intervaltree", "portion"]
    even = tb.round_steps(names, lambda n: n in tb.BARE_LOOP, 0)
    odd = tb.round_steps(names, lambda n: n in tb.BARE_LOOP, 1)
    assert odd == even[::-1]
    for steps in (even, odd):
        for name in tb.BARE_LOOP:
            assert abs(steps.index((name, "bare")) - steps.index((name, "batch"))) == 1
        assert abs(steps.index(("tree", "calls")) - steps.index(("intervaltree", "calls"))) == 1
    assert even.index(("ranges", "bare")) < even.index(("ranges", "batch"))
    assert odd.index(("ranges", "bare")) > odd.index(("ranges", "batch"))
    with pytest.raises(ValueError, match="neighbours"):
        tb.round_steps(["tree", "ranges", "intervaltree"], lambda _n: False, 0)


def test_tracker_timing_rests_on_the_timer_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_trackers times replays until they clear bench's floor; one that never does is a BenchError."""
    import functools

    tb = _tracker_bench()
    monkeypatch.setattr(tb, "_RUNS", {})
    now = [0.0]
    monkeypatch.setattr(tb, "time", SimpleNamespace(perf_counter=lambda: now[0]))  # a clock runs advance
    prepared: list[int] = []

    def advance() -> None:
        now[0] += timer_floor() / 6

    def prepare() -> Callable[[], object]:
        prepared.append(1)
        return advance

    per_replay = tb.timed_replays("sleepy", prepare, 1)
    assert len(prepared) == 1 + 2 + 4 + 8, "doubled until 8 replays (8/6 of the floor) clear it"
    assert per_replay == pytest.approx(timer_floor() / 6)
    assert tb.timed_replays("sleepy (round 2)", prepare, 1) == pytest.approx(timer_floor() / 6)
    assert len(prepared) == 15 + 8, "a later round starts at the runs the last one needed"
    monkeypatch.setattr(tb, "floor_measure", functools.partial(bench.measure, max_scale=4))
    with pytest.raises(BenchError, match="bench figure instant"):
        tb.timed_replays("instant", lambda: lambda: None, 1)


def test_tracker_measure_pairs_every_round_and_times_lookups_and_export_in_rounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_trackers.measure() pairs every round and times lookups and export in at least 5 rounds."""
    from testbed.workloads import make_workload

    tb = _tracker_bench()
    clock = iter(range(1, 100_000))

    def fake_timed(_figure: str, prepare: Callable[[], Callable[[], object]], units: int) -> float:
        prepare()()
        return float(next(clock)) / 1000

    monkeypatch.setattr(tb, "timed_replays", fake_timed)
    ops = list(make_workload("dma_churn", tb.SIZES["1G"], seed=1, conversions=40))
    results, calibration = tb.measure("dma_churn", "1G", ops, ["bitmap", "ranges", "tree", "intervaltree"], 7,
                                      {})
    by = {r.tracker: r for r in results}
    for name in ("bitmap", "ranges", "tree"):
        assert len(by[name].batch_vs_bare_rounds) == 7 and len(by[name].batch_rounds) == 7
    assert len(by["intervaltree"].call_rounds) == tb.PEER_REPEATS
    assert len(tb.peer_ratio_rounds(by["tree"], by["intervaltree"])) == tb.PEER_REPEATS
    for r in results:
        assert len(r.is_shared_rounds) >= 5 and len(r.export_rounds) >= 5
    assert set(calibration) == {"raw bitarray", "raw bisect list"}


def test_native_paired_rounds_clear_the_timer_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_native_trackers' paired rounds clear the timer floor on both sides."""

    from testbed.tracker import NATIVE_TRACKER_KINDS
    from testbed.workloads import make_workload

    if not NATIVE_TRACKER_KINDS:
        pytest.skip("the native trackers are not built")
    native = _native_bench()
    monkeypatch.setattr(bench, "MIN_MEASURED_S", 0.005)
    # The tool collects garbage before each replay; in this process (the whole suite's heap) a
    # collection costs far more than the replay it precedes, so the test skips it.
    monkeypatch.setattr(native, "gc", types.SimpleNamespace(collect=lambda: 0, disable=gc.disable, enable=gc.enable))
    ops = list(make_workload("dma_churn", 1 << 18, seed=1, conversions=300))
    slices = [ops[k:k + 100] for k in range(0, len(ops), 100)]
    bitmap_s, ranges_s = native.paired_round(1 << 18, slices, 0)
    assert min(bitmap_s, ranges_s) >= timer_floor()


def test_native_crossover_runs_end_where_they_began(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_native_trackers' crossover run (churn, then its undo) leaves the tracker as set up, so runs can repeat."""

    from testbed.tracker import make_tracker

    native = _native_bench()
    ops = native.crossover_ops(64, 500)
    setup, churn = ops[:64], ops[64:]
    reference = make_tracker("ranges", guest_pages=native.CROSSOVER_GUEST, max_ranges=256)
    reference.apply(setup)
    built: list[Any] = []
    monkeypatch.setattr(native, "make_tracker", lambda *a, **kw: built.append(make_tracker(*a, **kw)) or built[-1])
    prepare = native.crossover_replay("ranges", 64, setup, churn)
    for _ in range(3):
        prepare()()
    assert len(built) == 1, "one tracker per figure, set up once"
    assert built[0].shared_ranges() == reference.shared_ranges()


# ------------------------------------------------------------------ TDX next to SEV-SNP (figures, no targets)
CC_FIGURES = {
    "snp_ghcb_hypercalls_per_s": ("sev-snp", bench.HYPERCALL_LOOP),
    "tdx_tdvmcall_hypercalls_per_s": ("tdx", bench.HYPERCALL_LOOP),
    "snp_psc_exits_per_s": ("sev-snp", bench.SNP_PSC_LOOP),
    "tdx_map_gpa_exits_per_s": ("tdx", bench.TDX_MAP_GPA_LOOP),
}


def test_bench_json_has_the_tdx_and_snp_exit_figures(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`testbed bench --quick --json` (the real plan, stub measurements) reports TDVMCALL hypercalls
    and MapGPA exits per second under tdx next to SNP's GHCB hypercalls and PSC exits, measured in
    the same rounds, with their per-round ratios; none of them is a target."""
    seen: dict[str, dict[str, Any]] = {}
    fixed = {"snp_ghcb_hypercalls_per_s": 2000.0, "tdx_tdvmcall_hypercalls_per_s": 8000.0,
             "snp_psc_exits_per_s": 1000.0, "tdx_map_gpa_exits_per_s": 3000.0}

    def stub_rate_once(text: str, n1: int, n2: int, figure: str = "rate", **opts: Any) -> float:
        seen[figure] = {"text": text, "n2": n2, **opts}
        return fixed.get(figure, 1000.0)

    monkeypatch.setattr(bench, "rate_once", stub_rate_once)
    monkeypatch.setattr(bench, "sliced", lambda *_a, **_kw: lambda: 1000.0)
    monkeypatch.setattr(bench, "hypercall_rate_ctypes", lambda *_a: 1000.0)
    monkeypatch.setattr(bench, "bare_exit_rate", lambda *_a: 4000.0)
    monkeypatch.setattr(bench, "bare_compute_rate", lambda *_a: 1e6)
    monkeypatch.setattr(bench, "bare_tlb_rate", lambda *_a: 100.0)
    monkeypatch.setattr(bench, "scenario_seconds", lambda *_a, **_kw: 0.001)
    monkeypatch.setattr(bench, "rss_over_touched_mib", lambda *_a, **_kw: 10.0)
    assert main(["bench", "--quick", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for name, (vm_type, text) in CC_FIGURES.items():
        fig = doc["figures"][name]
        assert (fig["unit"], fig["median"], fig["n"]) == ("exits/s", fixed[name], 5)
        assert (seen[name]["vm_type"], seen[name]["text"]) == (vm_type, text)
        assert seen[name]["n2"] <= 1000, "--quick keeps the confidential loops short"
    assert seen["tdx_map_gpa_exits_per_s"]["vendor"] is seen["tdx_tdvmcall_hypercalls_per_s"]["vendor"] is Vendor.INTEL
    assert doc["figures"]["tdx_vs_snp_hypercalls_ratio"]["median"] == pytest.approx(4.0)
    assert doc["figures"]["tdx_vs_snp_hypercalls_ratio"]["ratio_of"] == ["tdx_tdvmcall_hypercalls_per_s",
                                                                          "snp_ghcb_hypercalls_per_s"]
    assert doc["figures"]["tdx_map_gpa_vs_snp_psc_ratio"]["median"] == pytest.approx(3.0)
    targeted = {t["figure"] for t in doc["targets"].values()}
    assert not targeted & {*CC_FIGURES, "tdx_vs_snp_hypercalls_ratio", "tdx_map_gpa_vs_snp_psc_ratio"}


def test_tdx_and_snp_figures_share_one_group() -> None:
    """The four confidential figures are one interleaved group, so TDX and SNP come from the same rounds."""
    groups = [[m.name for m in g] for g in bench.plan(quick=True).groups]
    assert sorted(CC_FIGURES) in [sorted(g) for g in groups]


@pytest.mark.parametrize(("loop", "vm_type"), [("TDX_MAP_GPA_LOOP", "tdx"), ("SNP_PSC_LOOP", "sev-snp")])
def test_conversion_loops_make_one_map_gpa_exit_per_iteration(loop: str, vm_type: str) -> None:
    """The TDX MapGPA and SNP PSC loops run to done, each iteration one KVM_EXIT_HYPERCALL
    (KVM_HC_MAP_GPA_RANGE) for the loop's page, alternating shared and private (kvm/vmx/tdx.c
    tdx_map_gpa; svm/sev.c snp_begin_psc)."""
    from testbed.layout import Layout
    from testbed.machine import VmOptions, run_guest

    memory = 16 << 20
    vendor = "intel" if vm_type == "tdx" else "amd"
    report = run_guest("<bench>", VmOptions(vm_type=vm_type, vendor=vendor, memory=memory, seed=1, timeout=20.0,
                                            defines={"LOOPS": 4}), text=getattr(bench, loop))
    assert report.outcome == "done", report.detail
    free = Layout(memory).free_gpa
    exits = [e for e in report.user_exits if e["reason"] == "hypercall" and e["args"][0] == free]
    assert [e["nr"] for e in exits] == [12] * 4
    assert len({e["args"][2] for e in exits}) == 2, "the loop alternates shared and private"
