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

import pytest
from hypothesis import settings

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: Young collections every 20,000 net allocations instead of 700: collecting the suite
#: (assertion rewriting builds and drops whole ASTs) and the assembler's front end allocate
#: millions of short-lived objects, almost all freed by their reference counts, and each young
#: collection also walks what is still alive. Cycles are still collected, only less often.
gc.set_threshold(20_000, 20, 20)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The collected suite (its modules, items, fixtures and the libraries they imported: ~100k
    objects per worker) lives until the end: gc.freeze moves it to the permanent generation, so
    the full collections the tests' own allocations trigger stop walking it each time. The
    garbage collection left is collected first: frozen, it would be kept for good."""
    gc.collect()
    gc.freeze()
