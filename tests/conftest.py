"""Suite-wide settings: Hypothesis runs derandomized unless asked to explore.

Every user who contributes runs the suite, and CI runs it once on a clean clone: a property
test must not pass or fail by the luck of the draw there. `HYPOTHESIS_PROFILE=explore`
draws fresh examples (what a fuzzing session wants); a failure it finds is pinned with
`@example` in the test, as tests/kvm/test_ghcb_page.py does.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
