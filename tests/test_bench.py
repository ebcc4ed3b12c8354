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
   and the TLB ceiling's loop goes through QEMU's page walker (a cleared PTE faults).
7. TDVMCALL hypercalls and MapGPA exits under tdx are figures (no targets) measured in one group
   with SEV-SNP's GHCB hypercalls and PSC exits; their loops make one MAP_GPA_RANGE exit per iteration.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import struct
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

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

    def collect(_quick: bool) -> dict[str, Any]:
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
            "y >= 1": {"figure": "y", "verdict": "undecided", "note": "not measured"},
        },
    }
    out = io.StringIO()
    assert run_bench(out, quick=True, collect_fn=lambda _quick: results) == 0
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
                                       "n": 5}
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
                                               "note": "not measured"}


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
    """The bare TLB loop runs with paging on: a cleared PTE for a data page faults instead of reading flat memory."""
    import unicorn

    uc, end = bench._bare_paged(1)
    uc.emu_start(0x1000, end)  # the intact map runs to HLT
    broken, end = bench._bare_paged(1)
    pte = 0x10000 + 0x3000 + 8 * ((bench.BARE_TLB_DATA >> 12) + 7)
    broken.mem_write(pte, struct.pack("<Q", 0))
    with pytest.raises(unicorn.UcError):
        broken.emu_start(0x1000, end)


def test_the_empty_guest_scenario_runs_through_the_public_api() -> None:
    """scenario_seconds() boots an empty guest with testbed.Vm and gets its done ucall, in positive time."""
    assert bench.scenario_seconds("default", "scenario_ms") > 0


@pytest.mark.skipif(not bench.reuse_available(), reason="Vm.load has no reuse= (snapshot pool) yet")
def test_the_reused_scenario_runs_through_the_snapshot_pool() -> None:
    """scenario_seconds(reuse=True) loads with Vm.load(reuse=True) and gets the empty guest's done ucall."""
    assert bench.scenario_seconds("default", "scenario_ms_reuse", reuse=True) > 0


# ------------------------------------------------------------------ the tracker benchmark's verdicts
def _tracker_bench() -> Any:
    """tools/bench_trackers.py as a module (tools/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_trackers.py"
    spec = importlib.util.spec_from_file_location("bench_trackers", path)
    assert spec is not None and spec.loader is not None
    if "bench_trackers" not in sys.modules:
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_trackers"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["bench_trackers"]


def test_tracker_bench_judges_rate_targets_from_rounds() -> None:
    """bench_trackers: a rate target is met when every round clears it, undecided when the rounds straddle it."""
    tb = _tracker_bench()

    def row(rounds: list[float]) -> Any:
        return tb.Result("dma_churn", "1G", 1 << 18, "ranges", 100, None, None, 0.0, 0.0, 0, None, 0, False,
                         batch_rounds=rounds)

    fast, noisy, slow = row([3e6, 2.6e6, 4e6, 3.1e6, 2.9e6]), row([3e6, 2e6, 4e6, 3.1e6, 2.9e6]), row([1e6] * 5)
    assert tb.rate_check("t", ["1G"], [fast], 2.5e6).verdict == "met"
    assert tb.rate_check("t", ["1G"], [noisy], 2.5e6).verdict == "undecided"
    assert tb.rate_check("t", ["1G", "64G"], [fast, slow], 2.5e6).verdict == "missed"
    assert tb.rate_check("t", ["1G"], [row([3e6] * 3)], 2.5e6).verdict == "undecided", "fewer than 5 rounds"
    assert tb.combine(["met", "undecided"]) == "undecided" and tb.combine([]) == "undecided"


def test_tracker_bench_pairs_per_call_rounds() -> None:
    """bench_trackers: tree vs intervaltree is a ratio per round, over the rounds both trackers ran."""
    tb = _tracker_bench()
    ours = tb.Result("dma_churn", "1G", 1, "tree", 1, None, None, 0.0, 0.0, 0, None, 0, False,
                     call_rounds=[10.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0])
    peer = tb.Result("dma_churn", "1G", 1, "intervaltree", 1, None, None, 0.0, 0.0, 0, None, 0, False,
                     call_rounds=[1.0, 2.0, 4.0, 5.0, 6.0])
    assert tb.paired_call_ratios(ours, peer) == [10.0, 15.0, 10.0, 10.0, 10.0]


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
