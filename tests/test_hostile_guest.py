"""A hostile guest is a normal test case: whatever bytes it executes, the host reports an outcome."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.machine import Machine, VmOptions, build_program
from testbed.vmm.vmm import OUTCOMES

# Bytes biased towards what the models intercept: 0f 01 xx (VMCALL/VMMCALL/...), MSRs,
# CPUID, port I/O, prefixes, INT/IRET, segment loads.
INTERESTING = [0x0F, 0x01, 0xD9, 0xC1, 0x30, 0x32, 0xA2, 0xE4, 0xE6, 0xEC, 0xEE, 0xF3, 0xF2, 0xFF, 0xCD, 0xCF,
               0x48, 0x8E, 0xFA, 0xF4]
CODE = st.lists(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 255)), min_size=1, max_size=48)


@pytest.mark.parametrize("vm_type", ["default", "sev-es"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(code=CODE)
def test_random_guest_code_never_crashes_the_host(vm_type: str, code: list[int]) -> None:
    """Random instruction bytes in guest_main end as one of the documented outcomes, never an exception."""
    text = "guest_main:\n    .byte " + ", ".join(str(b) for b in code) + "\n    ret\n"
    options = VmOptions(vm_type=vm_type, memory=16 << 20, timeout=2, seed=1)
    report = Machine(build_program("<hostile>", options, text=text), options).run()
    assert report.outcome in OUTCOMES, report.outcome
