"""The exit path exists twice (C fast path, ctypes fallback); both must behave the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from testbed.hw import cpu
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program

ROOT = Path(__file__).resolve().parent.parent


def test_fast_path_is_used_when_built() -> None:
    """With the extension importable, the vCPU registers its invalid-instruction hook in C."""
    options = VmOptions(memory=16 << 20)
    machine = Machine(build_program(GUESTS_DIR / "hypercall_insn.s", options), options)
    assert (machine.cpu._fastexit is not None) == (cpu._fastexit is not None and not os.environ.get(
        "TESTBED_NO_FASTEXIT"))


def test_ctypes_fallback_gives_the_same_results() -> None:
    """A run forced onto the ctypes path (TESTBED_NO_FASTEXIT=1) reports what the default path does."""
    args = [sys.executable, "-m", "testbed.cli", "run", str(GUESTS_DIR / "hypercall_abi_call.s"), "--json",
            "-D", "HC_NR=0x999", "--memory", "16M"]
    env = dict(os.environ)
    results = []
    for disable in ("", "1"):
        env["TESTBED_NO_FASTEXIT"] = disable
        out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        results.append((report["outcome"], report["ucalls"]))
    assert results[0] == results[1]
    assert results[0][1][0]["args"] == [(-1000) & (2**64 - 1)]
