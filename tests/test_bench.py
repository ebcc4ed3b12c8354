"""The benchmark's measurement rules (testbed/bench.py), with stub clocks and stub runs.

Scenarios:
1. A duration under the timer floor (1000 ticks of perf_counter's resolution, at least 20 ms)
   is never turned into a figure: the rounds are doubled and the figure measured again.
2. A figure that stays under the floor up to the cap (an instantaneous measurement, or a
   difference of two runs that is zero or negative) is a BenchError naming the figure; the
   CLI prints it as one line with status 2, never a rate like 9e12/s with a "met" target.
3. The human table prints figure names and values literally.
"""

from __future__ import annotations

import io
import time
from types import SimpleNamespace
from typing import Any

import pytest

from testbed import bench
from testbed.bench import BenchError, measure, rate, run_bench, timer_floor
from testbed.cli import EXIT_USAGE, main


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
    """Figure and target names with brackets or colons print as they are; met/missed are words, not markup."""
    monkeypatch.setenv("COLUMNS", "200")
    results = {"hypercalls_per_s [plain]": 123456.0, "x_ratio :smile:": 0.5,
               "targets": {"hypercalls_per_s >= [150k]": True, "x_ratio >= 0.9": False}}
    out = io.StringIO()
    assert run_bench(out, quick=True, collect_fn=lambda _quick: results) == 0
    text = out.getvalue()
    for literal in ("hypercalls_per_s [plain]", "123,456", "x_ratio :smile:", "0.50x",
                    "target hypercalls_per_s >= [150k]", "met", "missed"):
        assert literal in text, f"{literal!r} missing from:\n{text}"
