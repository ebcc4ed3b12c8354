"""Suite-wide settings: Hypothesis runs derandomized unless asked to explore; the collected
suite is frozen out of the garbage collector's sight.

Every user who contributes runs the suite, and CI runs it once on a clean clone: a property
test must not pass or fail by the luck of the draw there. `HYPOTHESIS_PROFILE=explore`
draws fresh examples (what a fuzzing session wants); a failure it finds is pinned with
`@example` in the test, as tests/kvm/test_ghcb_page.py does.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator

import pytest


def _leave_hypothesis_unrewritten(config: pytest.Config) -> None:
    """pytest marks every package of a distribution with a pytest11 plugin for assertion
    rewriting, Hypothesis's included: rewritten, its ~80 modules are parsed and compiled from
    source in each worker (~0.5-1 s each time; pytest never writes the rewritten code under
    PYTHONDONTWRITEBYTECODE) for asserts no test of ours makes. Unmarked, it loads from its
    installed bytecode. pytest has no public way to unmark: if its hook's attributes change,
    this does nothing, and tests/test_quality.py (test_hypothesis_is_not_assertion_rewritten)
    says so."""
    hook = getattr(config.pluginmanager, "rewrite_hook", None)
    marked = getattr(hook, "_must_rewrite", None)
    if isinstance(marked, set) and "hypothesis" not in sys.modules:
        marked.discard("hypothesis")
        cache = getattr(hook, "_marked_for_rewrite_cache", None)
        if isinstance(cache, dict):
            cache.clear()


def _only_hands_out_tests(config: pytest.Config) -> bool:
    """This process is an xdist controller that neither collects nor runs tests (a worker has
    `workerinput`; under --collect-only the controller collects itself)."""
    distributed = config.getoption("dist", "no") != "no" and not config.getoption("collectonly")
    return distributed and not hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)  # before Hypothesis's own plugin applies --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    """The suite's Hypothesis profiles, loaded before any test module is imported - in each
    process that runs tests: an xdist controller only hands tests out, and importing Hypothesis
    there cost it ~1 s. Every process leaves Hypothesis unrewritten, the controller too:
    Hypothesis's own terminal summary imports it there at the session's end."""
    _leave_hypothesis_unrewritten(config)
    if _only_hands_out_tests(config):
        return
    from hypothesis import settings

    settings.register_profile("default", derandomize=True)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


#: Young collections every 20,000 net allocations instead of 700: the assembler's front end and
#: the tests allocate millions of short-lived objects, almost all freed by their reference
#: counts, and each young collection also walks what is still alive. Cycles are still
#: collected, only less often.
gc.set_threshold(20_000, 20, 20)


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[None]:
    """No cyclic collection while the suite is collected: assertion rewriting holds each test
    module's whole AST alive while it builds more, so every young collection walked tens of
    thousands of live nodes (~1 s per worker); collecting makes almost no cyclic garbage, and
    what it makes is collected at its end (pytest_collection_finish)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _collect_then_freeze() -> None:
    """Collect the garbage there is, then move everything left (all of it alive) to the
    permanent generation, out of the walks of later collections. Garbage is collected first:
    frozen, it would be kept for good."""
    gc.collect()
    gc.freeze()


def pytest_collection_finish(session: pytest.Session) -> None:
    """The collected suite (its modules, items, fixtures and the libraries they imported: ~100k
    objects per worker) lives until the end: frozen, the full collections the tests' own
    allocations trigger stop walking it each time."""
    _collect_then_freeze()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """At its end pytest collects garbage five times over, to surface exceptions raised in
    finalizers (_pytest/unraisableexception.py), each walk over the whole heap (~0.1 s per
    process). One collection here frees the same garbage - its finalizers still report to
    pytest's hook, installed until then - and the freeze leaves those five only what is freed
    after this."""
    _collect_then_freeze()
