"""A hostile guest is a normal test case: whatever bytes it executes, the host reports an outcome."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tool_module import load_tool

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
    """Random instruction bytes in guest_main end as one of the documented outcomes, never an exception, and
    internal_error only with a suberror a guest can cause (README, "KVM_EXIT_INTERNAL_ERROR")."""
    text = "guest_main:\n    .byte " + ", ".join(str(b) for b in code) + "\n    ret\n"
    outcome, problem = CAMPAIGN.run_one(text, vm_type, timeout=2)
    assert problem == "", f"{problem}\n{text}"
    assert outcome in OUTCOMES, outcome


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(code=CODE)
def test_random_td_code_never_crashes_the_host(code: list[int]) -> None:
    """The same in a TD, where CPUID, port I/O, HLT, MSRs and VMCALL are #VEs the runtime handles
    or reports (guests/lib/tdx.s) and a private access before acceptance kills the VM: a
    documented outcome, never an exception (fewer examples: a TD boot accepts its memory)."""
    text = "guest_main:\n    .byte " + ", ".join(str(b) for b in code) + "\n    ret\n"
    outcome, problem = CAMPAIGN.run_one(text, "tdx", timeout=2)
    assert problem == "", f"{problem}\n{text}"
    assert outcome in OUTCOMES, outcome


CAMPAIGN = load_tool("hostile_campaign")


@pytest.mark.parametrize("seed", range(20))
def test_hostile_campaign_slice(seed: int) -> None:
    """Hostile steps (CR3 loads, page-table writes, far transfers, 32-bit code with a CS base, IDT
    reloads, malformed ucalls; raw TDCALLs in a TD) end as documented outcomes; internal_error only with a guest
    suberror (tools/hostile_campaign.py runs the full campaign)."""
    rng = random.Random(seed)
    vm_type = CAMPAIGN.VM_TYPES[seed % len(CAMPAIGN.VM_TYPES)]
    text = CAMPAIGN.guest(rng, vm_type)
    outcome, problem = CAMPAIGN.run_one(text, vm_type, timeout=0.15)
    assert problem == "", f"{problem}\n{text}"
    assert outcome in OUTCOMES
