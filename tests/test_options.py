"""VmOptions (testbed/machine.py) and the spellings it shares with the CLI (testbed/options.py).

Scenarios:
1. Every field accepts the CLI's spelling and the Python value and normalises both to one
   canonical value (vendor "amd" -> Vendor.AMD, vm_type KvmVmType -> "sev-es", memory "64M"
   -> bytes, pv_features names -> mask, refuse_conversions "GPA:N:dir" -> tuples, ...).
2. Every field rejects a wrong value *and* a wrong type with a UsageError naming the field
   and the value — never an AttributeError or TypeError from deep inside a run.
3. A field assigned after construction is checked again by validate() (Machine calls it).
4. Sizes parse one way everywhere (parse_size, shared by VmOptions, the CLI and replay).
5. check_host_memory refuses, with the numbers, a guest the host cannot back.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import pytest

from testbed.errors import UsageError
from testbed.hw.exits import Vendor
from testbed.kvm.uapi import KvmVmType
from testbed.kvm.version import KvmVersion
from testbed.machine import VmOptions, run_guest
from testbed.options import check_host_memory, parse_size, read_meminfo
from testbed.vmm.cpuid import PV_FEATURE_NAMES

GIB = 1 << 30

#: (field, value given, value it normalises to)
ACCEPTED: list[tuple[str, Any, Any]] = [
    ("vendor", "amd", Vendor.AMD),
    ("vendor", "Intel", Vendor.INTEL),
    ("vendor", Vendor.INTEL, Vendor.INTEL),
    ("vm_type", "sev-es", "sev-es"),
    ("vm_type", "SEV-SNP", "sev-snp"),
    ("vm_type", KvmVmType.KVM_X86_SEV_ES_VM, "sev-es"),
    ("vm_type", KvmVmType.KVM_X86_SW_PROTECTED_VM, "sw-protected"),
    ("memory", "64M", 64 << 20),
    ("memory", "1G", GIB),
    ("memory", "2GiB", 2 * GIB),
    ("memory", "0x800000", 8 << 20),
    ("memory", 16 << 20, 16 << 20),
    ("max_memory", "128M", 128 << 20),
    ("max_memory", None, None),
    ("fix_hypercall", False, False),
    ("map_gpa_exit", False, False),
    ("enforce_pv_cpuid", False, False),
    ("record_exits", False, False),
    ("pv_features", None, None),
    ("pv_features", "none", 0),
    ("pv_features", "pv_unhalt,pv_send_ipi",
     (1 << PV_FEATURE_NAMES["pv_unhalt"]) | (1 << PV_FEATURE_NAMES["pv_send_ipi"])),
    ("pv_features", 0x10, 0x10),
    ("timeout", 2, 2.0),
    ("timeout", "0.5", 0.5),
    ("seed", 7, 7),
    ("seed", "0x10", 16),
    ("seed", None, None),
    ("c_bit", 47, 47),
    ("vm_type", "tdx", "tdx"),
    ("vm_type", KvmVmType.KVM_X86_TDX_VM, "tdx"),
    ("gpaw", "48", 48),
    ("gpaw", 52, 52),
    ("c_bit", "32", 32),
    ("tracker", "tree", "tree"),
    ("tracker", "Bitmap", "bitmap"),
    ("defines", {"PAGES": 4, "X": "1+2"}, {"PAGES": 4, "X": "1+2"}),
    ("defines", ["PAGES=4"], {"PAGES": "4"}),
    ("hc_protocol", "page-enc-status", "page-enc-status"),
    ("ghcb_version", 1, 1),
    ("ghcb_version", "2", 2),
    ("implicit_conversion", "refuse", "refuse"),
    ("max_ranges", 8, 8),
    ("max_ranges", "16", 16),
    ("max_ranges", None, None),
    ("refuse_conversions", ["0x600000:4:private"], [(0x600000, 4, True)]),
    ("refuse_conversions", ["0x600000"], [(0x600000, 1, None)]),
    ("refuse_conversions", [(0x601000, 2, False)], [(0x601000, 2, False)]),
    ("kvm_version", "7.1", KvmVersion("7.1")),
    ("kvm_cpuid_base", 0x40000100, 0x40000100),
    ("kvm_cpuid_base", "0x40000100", 0x40000100),
    ("kvm_cpuid_base", None, None),
    ("pending_event_every", "3", 3),
    ("pending_event_every", None, None),
]

#: (field, bad value, text the error must contain)
REJECTED: list[tuple[str, Any, str]] = [
    ("vendor", 3, "vendor 3"),
    ("vendor", "arm", "vendor 'arm'"),
    ("vm_type", "tdx-2", "unknown VM type 'tdx-2'"),
    ("gpaw", 51, "GPA width (gpaw) 51"),
    ("gpaw", "x", "GPA width (gpaw) 'x'"),
    ("pending_event_every", -1, "pending-event-every -1"),
    ("vm_type", 2, "unknown VM type 2"),
    ("memory", 1.5, "memory size 1.5"),
    ("memory", "64Q", "memory size '64Q'"),
    ("memory", "-64M", "memory size '-64M'"),
    ("memory", 0, "memory size 0"),
    ("max_memory", "lots", "max memory size 'lots'"),
    ("memory", True, "memory size True"),
    ("fix_hypercall", 1, "fix_hypercall 1"),
    ("map_gpa_exit", "no", "map_gpa_exit 'no'"),
    ("enforce_pv_cpuid", None, "enforce_pv_cpuid None"),
    ("record_exits", 0, "record_exits 0"),
    ("pv_features", "pv_frobnicate", "unknown PV feature 'pv_frobnicate'"),
    ("pv_features", 1 << 40, "pv_features 0x10000000000"),
    ("pv_features", 1.0, "pv_features 1.0"),
    ("timeout", float("nan"), "timeout must be positive and finite, not nan"),
    ("timeout", float("inf"), "timeout must be positive and finite, not inf"),
    ("timeout", -1, "timeout must be positive and finite, not -1"),
    ("timeout", 0, "timeout must be positive and finite, not 0"),
    ("timeout", 1e9, "timeout 1000000000.0: at most"),
    ("timeout", "soon", "timeout 'soon'"),
    ("timeout", None, "timeout None"),
    ("seed", -1, "seed -1"),
    ("seed", 1 << 64, "seed 18446744073709551616"),
    ("seed", 1.5, "seed 1.5"),
    ("seed", "9" * 5000, "seed '999"),
    ("c_bit", 52, "C-bit position 52"),
    ("c_bit", 31, "C-bit position 31"),
    ("c_bit", 10**100, "C-bit position 1000"),
    ("c_bit", "x", "C-bit position 'x'"),
    ("tracker", "heap", "unknown tracker 'heap'"),
    ("tracker", None, "unknown tracker None"),
    ("defines", {"1X": 1}, "define '1X'"),
    ("defines", {"X": 1.5}, "define X=1.5"),
    ("defines", {"X": 1 << 64}, "does not fit in 64 bits"),
    ("defines", "X=1", "defines 'X=1'"),
    ("trace", "trace.jsonl", "trace 'trace.jsonl'"),
    ("hc_protocol", "vmcall", "unknown hypercall protocol 'vmcall'"),
    ("ghcb_version", 3, "GHCB version 3"),
    ("ghcb_version", 2.0, "GHCB version 2.0"),
    ("implicit_conversion", "ignore", "unknown implicit-conversion policy 'ignore'"),
    ("max_ranges", 0, "max_ranges 0"),
    ("max_ranges", 10**30, "max_ranges 1000"),
    ("max_ranges", -5, "max_ranges -5"),
    ("refuse_conversions", ["0x600001"], "--refuse-conversion '0x600001'"),
    ("refuse_conversions", ["0x600000:0"], "--refuse-conversion '0x600000:0'"),
    ("refuse_conversions", ["0x600000:1:sideways"], "--refuse-conversion '0x600000:1:sideways'"),
    ("refuse_conversions", [(0x600000, 1)], "refuse_conversions entry"),
    ("refuse_conversions", "0x600000", "refuse_conversions '0x600000'"),
    ("kvm_version", "6.0", "unknown KVM version '6.0'"),
    ("kvm_cpuid_base", 0x40000001, "KVM CPUID base 1073741825"),
    ("kvm_cpuid_base", 0x50000000, "KVM CPUID base"),
]


def test_the_tables_cover_every_field() -> None:
    """Each VmOptions field has an accepted and a rejected spelling below (a new field needs both)."""
    fields = {f.name for f in dataclasses.fields(VmOptions)}
    accepted = {name for name, _, _ in ACCEPTED} | {"trace"}  # trace: a file object, below
    rejected = {name for name, _, _ in REJECTED}
    assert fields - accepted == set(), f"fields without an accepted spelling: {sorted(fields - accepted)}"
    assert fields - rejected == set(), f"fields without a rejected value: {sorted(fields - rejected)}"


@pytest.mark.parametrize(("name", "given", "expected"), ACCEPTED,
                         ids=[f"{n}={g!r}"[:60] for n, g, _ in ACCEPTED])
def test_a_field_accepts_the_cli_spelling_and_the_python_value(name: str, given: Any, expected: Any) -> None:
    """VmOptions(field=value) normalises the CLI's spelling and the Python value to one canonical value."""
    options = VmOptions(**{name: given})
    assert getattr(options, name) == expected
    assert type(getattr(options, name)) is type(expected)


@pytest.mark.parametrize(("name", "given", "message"), REJECTED,
                         ids=[f"{n}={g!r}"[:60] for n, g, _ in REJECTED])
def test_a_field_rejects_a_bad_value_naming_field_and_value(name: str, given: Any, message: str) -> None:
    """VmOptions(field=bad) raises UsageError whose one-line message names the field and the value."""
    with pytest.raises(UsageError) as info:
        VmOptions(**{name: given})
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text and len(text) < 400, text


def test_trace_accepts_a_writable_text_stream() -> None:
    """trace takes any object with write() (a file, a StringIO) or None."""
    stream = io.StringIO()
    assert VmOptions(trace=stream).trace is stream
    assert VmOptions(trace=None).trace is None


def test_validate_checks_a_field_assigned_after_construction() -> None:
    """A field set after VmOptions() is normalised (or rejected) again by validate()."""
    options = VmOptions()
    options.vm_type = "SEV"  # type: ignore[assignment]  # the CLI spelling, any case
    options.memory = "32M"  # type: ignore[assignment]
    options.validate()
    assert (options.vm_type, options.memory) == ("sev", 32 << 20)
    options.timeout = float("nan")
    with pytest.raises(UsageError, match="timeout"):
        options.validate()


def test_an_sev_type_on_intel_is_refused_by_validate() -> None:
    """A valid vendor and VM type that do not fit together are refused by validate(), naming both."""
    with pytest.raises(UsageError, match="sev-es needs an AMD vCPU"):
        VmOptions(vendor="intel", vm_type="sev-es").validate()


def test_the_readme_spellings_run_through_the_python_api() -> None:
    """run_guest with the CLI's strings (vendor, vm_type, memory) runs the guest to done."""
    report = run_guest("guests/hypercall_insn.s",
                       VmOptions(vendor="amd", vm_type="sev-es", memory="8M", seed="1", defines={"INSN": 2}))
    assert report.outcome == "done", report.detail


# ------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(("text", "size"), [
    ("64M", 64 << 20), ("64m", 64 << 20), ("64MiB", 64 << 20), ("64MB", 64 << 20), ("1G", GIB), ("1T", 1 << 40),
    ("4096", 4096), ("0x1000", 4096), (" 8M ", 8 << 20), (8 << 20, 8 << 20),
])
def test_parse_size_reads_binary_suffixes(text: str | int, size: int) -> None:
    """parse_size takes K/M/G/T/P (binary, optionally B or iB), decimal or 0x counts, and ints."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "1.5G", "64Q", "0", "-1M", "1" * 5000, "0x", "64 M B"])
def test_parse_size_rejects_what_is_not_a_size(text: str) -> None:
    """parse_size raises UsageError (never ValueError) for anything else, even 5,000 digits."""
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)


# ----------------------------------------------------------------------- host memory

MEMINFO_24G = {"MemTotal": 24 * GIB, "SwapTotal": 0, "MemAvailable": 22 * GIB,
               "CommitLimit": 12 * GIB, "Committed_AS": 10 * GIB}


def test_a_guest_larger_than_ram_and_swap_is_accepted_because_its_mappings_reserve_nothing() -> None:
    """A 64 GiB guest on a 24 GiB host passes in heuristic and always-overcommit modes: its
    backings are MAP_NORESERVE, which mm/mmap.c do_mmap honours unless overcommit is strict."""
    for mode in (0, 1):
        for vm_type in ("default", "sev", "sev-snp"):
            check_host_memory(64 * GIB, vm_type, meminfo=MEMINFO_24G, overcommit=mode, address_space=None)


def test_a_guest_beyond_the_emulators_physical_address_space_is_refused() -> None:
    """RAM must fit below the private alias at 2^39 in Unicorn's 40-bit physical space."""
    with pytest.raises(UsageError, match=r"1\.0 TiB: the emulator's physical address space holds at most 512\.0 GiB"):
        check_host_memory(1 << 40, "default", meminfo={}, overcommit=0, address_space=None)


def test_a_guest_beyond_the_address_space_limit_is_refused_with_the_numbers() -> None:
    """With RLIMIT_AS (ulimit -v) below what the backings map, the guest is refused before mmap fails."""
    with pytest.raises(UsageError, match=r"maps 128\.0 GiB but the process's address space is limited to 100\.0 GiB"):
        check_host_memory(64 * GIB, "sev", meminfo={}, overcommit=0, address_space=100 * GIB)


def test_a_guest_within_ram_is_accepted_because_memory_is_reserved_lazily() -> None:
    """A 16 GiB guest on a 24 GiB host passes (its RAM is reserved, not touched), on every VM type."""
    for vm_type in ("default", "sev", "sev-snp"):
        check_host_memory(16 * GIB, vm_type, meminfo=MEMINFO_24G, overcommit=0, address_space=None)


def test_strict_overcommit_counts_every_backing() -> None:
    """Under vm.overcommit_memory=2 the reservations of both backings must fit in CommitLimit - Committed_AS."""
    check_host_memory(1 * GIB, "sev", meminfo=MEMINFO_24G, overcommit=2)
    with pytest.raises(UsageError, match=r"reserves 3\.0 GiB but only 2\.0 GiB is left under CommitLimit"):
        check_host_memory(3 * GIB // 2, "sev", meminfo=MEMINFO_24G, overcommit=2)


def test_read_meminfo_gives_the_fields_the_check_uses_in_bytes() -> None:
    """read_meminfo returns MemAvailable, CommitLimit and Committed_AS as /proc/meminfo states them,
    in bytes (kB times 1024), and nothing else."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        assert read_meminfo() == {}
        return
    expected = {}
    for line in lines:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if name in ("MemAvailable", "CommitLimit", "Committed_AS") and fields and fields[0].isdigit():
            expected[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    got = read_meminfo()
    assert set(got) == set(expected) and "MemAvailable" in got
    assert got["CommitLimit"] == expected["CommitLimit"]  # fixed while nothing changes swap or RAM
    # MemAvailable and Committed_AS move between the two reads; same unit and magnitude
    assert abs(got["MemAvailable"] - expected["MemAvailable"]) < (256 << 20)


def test_what_a_run_touches_must_fit_in_available_memory() -> None:
    """The page tables and runtime a run touches must fit in MemAvailable, whatever the overcommit mode."""
    tiny = dict(MEMINFO_24G, MemAvailable=32 << 20)
    with pytest.raises(UsageError, match=r"only 32\.0 MiB is available"):
        check_host_memory(64 << 20, "default", meminfo=tiny, overcommit=1)


def test_an_unreadable_meminfo_refuses_nothing() -> None:
    """Without /proc/meminfo the check passes and the allocation decides."""
    check_host_memory(64 * GIB, "sev", meminfo={}, overcommit=None)


def test_a_define_expression_is_checked_where_it_is_assembled() -> None:
    """A define whose value is not an expression is a UsageError naming it when the guest is built."""
    options = VmOptions(memory="8M", defines={"INSN": "1+"})
    with pytest.raises(UsageError, match=r"define INSN=1\+: not a valid expression"):
        run_guest("guests/hypercall_insn.s", options)


def test_the_donated_tracker_needs_the_map_gpa_exit() -> None:
    """tracker=donated without the MAP_GPA_RANGE user exit is refused: the donation exit is only
    enabled with it, and the tracker would stay without a donation (poisoned) for the whole run."""
    with pytest.raises(UsageError, match="donated tracker needs"):
        VmOptions(tracker="donated", map_gpa_exit=False).validate()
    VmOptions(tracker="donated").validate()
