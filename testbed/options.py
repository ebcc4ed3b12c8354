"""The spellings of a run's options, shared by the Python API (`VmOptions`) and the CLI.

Each `parse_*` function takes what a user may write — the CLI's string or the Python value
(an enum, an int) — and returns the one normalised value the machine uses, or raises
UsageError naming the option and the value. `VmOptions.__post_init__` calls them, so
`VmOptions(vm_type="sev-es", memory="64M", vendor="amd")` means what `testbed run --vm-type
sev-es --memory 64M --vendor amd` means, and anything else fails before a machine is built.

`check_host_memory` is the one place that decides whether the host can back a guest's RAM.
"""

from __future__ import annotations

import math
import os
import re
import resource
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from testbed.errors import UsageError
from testbed.hw.exits import Vendor
from testbed.kvm.uapi import KvmVmType

VM_TYPES: dict[str, KvmVmType] = {
    "default": KvmVmType.KVM_X86_DEFAULT_VM,
    "sw-protected": KvmVmType.KVM_X86_SW_PROTECTED_VM,
    "sev": KvmVmType.KVM_X86_SEV_VM,
    "sev-es": KvmVmType.KVM_X86_SEV_ES_VM,
    "sev-snp": KvmVmType.KVM_X86_SNP_VM,
    "tdx": KvmVmType.KVM_X86_TDX_VM,
}
HC_PROTOCOLS = ("map-gpa-range", "page-enc-status")
IMPLICIT_CONVERSION_POLICIES = ("convert", "refuse")
AMD_ONLY_VM_TYPES = ("sev", "sev-es", "sev-snp")
INTEL_ONLY_VM_TYPES = ("tdx",)
#: VM types whose private memory is a guest_memfd (they need KVM memory attributes)
GUEST_MEMFD_VM_TYPES = ("sw-protected", "sev-snp", "tdx")
#: a TD's guest physical address width (TDX: shared bit = GPA bit gpaw - 1; 52 needs 5-level EPT)
GPAW_VALUES = (48, 52)
GHCB_VERSIONS = (1, 2)
C_BIT_RANGE = range(32, 52)
#: A run's wall-clock budget: positive and finite, at most a day (Unicorn takes microseconds
#: as a C integer; a larger value is a typo, not a plan).
MAX_TIMEOUT_S = 86_400.0
#: KVM's page-state trackers hold at most this many ranges before they are poisoned; more
#: than a 64 GiB guest has pages is never needed.
MAX_MAX_RANGES = 1 << 24
#: FrameCipher keys are derived from the seed; a seed is an unsigned 64-bit value.
SEED_RANGE = range(0, 1 << 64)

_SIZE = re.compile(r"(?P<number>0[xX][0-9a-fA-F]+|\d+)\s*(?P<unit>[KMGTP]?)(?:I?B)?", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}
#: A size written with more digits than this is not a size (and int() refuses > 4300 digits).
_MAX_SIZE_DIGITS = 24


def _type_name(value: object) -> str:
    """'an int', 'a float': the type of a rejected value, for a message."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from '64M', '1G', '2GiB', '0x4000000' or a byte count (an int passes through).

    Suffixes are binary (K, M, G, T, P, optionally followed by B or iB); the result must be
    positive. UsageError names `what` and the value otherwise.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise UsageError(f"invalid {what} {text!r}: expected a size such as 64M or 1G or a byte count, "
                         f"not {_type_name(text)}")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.fullmatch(text.strip())
        if m is None or len(m["number"]) > _MAX_SIZE_DIGITS:
            raise UsageError(f"invalid {what} {_short(text, 40)!r}: expected a size such as 64M, 1G or a byte count")
        value = int(m["number"], 0 if m["number"][:2].lower() == "0x" else 10) << _SIZE_SHIFT[m["unit"].upper()]
    if value <= 0:
        raise UsageError(f"invalid {what} {text!r}: must be positive")
    return value


def format_bytes(nbytes: int) -> str:
    """'64.0 GiB': a byte count for a message."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f} {unit}"
    return f"{nbytes} B"


def parse_vendor(value: Vendor | str) -> Vendor:
    """Vendor.AMD from 'amd' / 'AMD' / Vendor.AMD."""
    if isinstance(value, Vendor):
        return value
    if isinstance(value, str):
        try:
            return Vendor(value.strip().lower())
        except ValueError:
            pass
    choices = ", ".join(v.value for v in Vendor)
    raise UsageError(f"vendor {value!r}: expected one of {choices} (or a Vendor)")


def parse_vm_type(value: str | KvmVmType) -> str:
    """'sev-es' from 'sev-es' / 'SEV-ES' / KvmVmType.KVM_X86_SEV_ES_VM."""
    if isinstance(value, KvmVmType):
        for name, vm_type in VM_TYPES.items():
            if vm_type is value:
                return name
        raise UsageError(f"vm_type {value.name}: not modelled by this testbed (expected one of "
                         f"{', '.join(VM_TYPES)})")
    if isinstance(value, str) and value.strip().lower() in VM_TYPES:
        return value.strip().lower()
    raise UsageError(f"unknown VM type {value!r}: expected one of {', '.join(VM_TYPES)} (or a KvmVmType)")


def parse_timeout(value: float | int | str) -> float:
    """Seconds: positive, finite, at most a day; '2.5' or 2.5 or 3."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"timeout {value!r}: expected seconds as a number, not {_type_name(value)}")
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        raise UsageError(f"timeout {value!r}: expected seconds as a number") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"timeout must be positive and finite, not {value}")
    if seconds > MAX_TIMEOUT_S:
        raise UsageError(f"timeout {value}: at most {MAX_TIMEOUT_S:g} s")
    return seconds


def parse_int(value: int | str, what: str, allowed: range | None = None) -> int:
    """An integer option ('0x33', '51' or 51); UsageError names `what` when it is not one or
    lies outside `allowed`."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"{what} {value!r}: expected an integer, not {_type_name(value)}")
    if isinstance(value, str):
        text = value.strip()
        if len(text) > _MAX_SIZE_DIGITS:
            raise UsageError(f"{what} {value[:32]!r}...: expected an integer of at most {_MAX_SIZE_DIGITS} digits")
        try:
            value = int(text, 0)
        except ValueError:
            raise UsageError(f"{what} {text!r}: expected an integer") from None
    if allowed is not None and value not in allowed:
        raise UsageError(f"{what} {value}: must be between {allowed.start} and {allowed.stop - 1}")
    return value


def parse_bool(value: bool, what: str) -> bool:
    """Only True or False: 0/1 or 'yes' are rejected, so a misplaced argument is noticed."""
    if not isinstance(value, bool):
        raise UsageError(f"{what} {value!r}: expected True or False, not {_type_name(value)}")
    return value


def parse_choice(value: str, what: str, choices: Iterable[str]) -> str:
    """One of `choices`, case-insensitive."""
    options = tuple(choices)
    if isinstance(value, str) and value.strip().lower() in options:
        return value.strip().lower()
    raise UsageError(f"unknown {what} {value!r}: expected one of {', '.join(options)}")


def parse_pv_features(value: int | str | None) -> int | None:
    """A KVM_CPUID_FEATURES mask: an int, None (all the modelled ones), or the CLI's
    comma-separated names ('pv_unhalt,pv_send_ipi') or 'none'."""
    from testbed.vmm.cpuid import PV_FEATURE_NAMES

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"pv_features {value!r}: expected a mask, feature names or 'none', "
                         f"not {_type_name(value)}")
    if isinstance(value, int):
        if not 0 <= value < 1 << 32:
            raise UsageError(f"pv_features 0x{value:x}: a CPUID register mask is 32 bits")
        return value
    if value.strip().lower() == "none":
        return 0
    names = [t.strip().lower() for t in value.split(",")]
    if not all(names):
        raise UsageError(f"pv_features {value!r}: an empty feature name (write 'none' for no features)")
    mask = 0
    for name in names:
        if name not in PV_FEATURE_NAMES:
            raise UsageError(f"unknown PV feature {name!r}: expected {', '.join(PV_FEATURE_NAMES)} or none")
        mask |= 1 << PV_FEATURE_NAMES[name]
    return mask


def parse_tracker(value: str) -> str:
    """A shared-page tracker name a VM can run with (bitmap, ranges, tree, donated, and the C
    structures native-bitmap, native-ranges, native-tree when the extension is built)."""
    from testbed.tracker import NATIVE_TRACKER_KINDS, VM_TRACKER_KINDS

    return parse_choice(value, "tracker", (*VM_TRACKER_KINDS, *NATIVE_TRACKER_KINDS))


def parse_max_ranges(value: int | str | None) -> int | None:
    """The trackers' record bound: None (the default) or 1 .. MAX_MAX_RANGES."""
    if value is None:
        return None
    return parse_int(value, "max_ranges", range(1, MAX_MAX_RANGES + 1))


def parse_seed(value: int | str | None) -> int | None:
    """The memory-encryption key's seed: None (random) or an unsigned 64-bit value."""
    if value is None:
        return None
    return parse_int(value, "seed", SEED_RANGE)


def parse_kvm_cpuid_base(value: int | str | None) -> int | None:
    """Where the VMM puts KVM's CPUID leaves: 0x40000000 + n * 0x100 up to 0x4000ff00 (the
    bases KVM searches for its signature), or None / 'none' to leave them out."""
    from testbed.vmm.cpuid import KVM_CPUID_BASES

    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    base = parse_int(value, "KVM CPUID base")
    if base not in KVM_CPUID_BASES:
        raise UsageError(f"KVM CPUID base {value!r}: expected 0x40000000 + n * 0x100 up to 0x4000ff00, or none")
    return base


_DEFINE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_defines(value: Mapping[str, int | str] | Iterable[str]) -> dict[str, int | str]:
    """Assembler defines: a mapping NAME -> int or expression, or the CLI's 'NAME=VALUE' list.

    Names and value types are checked here; an expression string is checked where it is
    assembled (asm.py, with the same UsageError), which costs a Keystone call per define."""
    from testbed.asm import parse_define

    if isinstance(value, Mapping):
        items: list[tuple[Any, Any]] = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = []
        for text in value:
            if not isinstance(text, str):
                raise UsageError(f"defines: expected 'NAME=VALUE' strings, not {text!r}")
            items.append(parse_define(text))
    else:
        raise UsageError(f"defines {value!r}: expected a mapping NAME -> value, not {_type_name(value)}")
    out: dict[str, int | str] = {}
    for name, raw in items:
        if not isinstance(name, str) or not _DEFINE_NAME.fullmatch(name):
            raise UsageError(f"define {name!r}: the name must be an identifier (letters, digits, _)")
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise UsageError(f"define {name}={raw!r}: the value must be an int or an expression string")
        if isinstance(raw, int) and not -(2**63) <= raw < 2**64:
            raise UsageError(f"define {name}={raw}: the value does not fit in 64 bits")
        if isinstance(raw, str) and not raw.strip():
            raise UsageError(f"define {name}={raw!r}: the value is empty")
        out[name] = raw
    return out


def parse_refuse_range(text: str) -> tuple[int, int, bool | None]:
    """'0x600000:4:private' -> (0x600000, 4, True); NPAGES defaults to 1, direction to both."""
    parts = text.split(":")
    directions: dict[str, bool | None] = {"private": True, "shared": False, "both": None}
    if len(parts) > 3:
        raise UsageError(f"--refuse-conversion {_short(text, 60)!r}: expected GPA[:NPAGES[:private|shared]]")
    try:
        gpa = parse_int(parts[0], "--refuse-conversion GPA")
        npages = parse_int(parts[1], "--refuse-conversion NPAGES") if len(parts) > 1 and parts[1] else 1
        to = directions[parts[2].strip().lower()] if len(parts) > 2 else None
    except (UsageError, KeyError):
        raise UsageError(f"--refuse-conversion {_short(text, 60)!r}: expected GPA[:NPAGES[:private|shared]]") from None
    return check_refuse_range((gpa, npages, to), text)


def check_refuse_range(value: Any, text: str | None = None) -> tuple[int, int, bool | None]:
    """A (gpa, npages, to_private) tuple: page-aligned GPA, NPAGES >= 1, True/False/None."""
    shown = text if text is not None else value
    if not isinstance(value, tuple) or len(value) != 3:
        raise UsageError(f"refuse_conversions entry {shown!r}: expected (gpa, npages, to_private)")
    gpa, npages, to = value
    if isinstance(gpa, bool) or isinstance(npages, bool) or not isinstance(gpa, int) or not isinstance(npages, int):
        raise UsageError(f"refuse_conversions entry {shown!r}: gpa and npages must be integers")
    if to is not None and not isinstance(to, bool):
        raise UsageError(f"refuse_conversions entry {shown!r}: to_private must be True, False or None")
    if gpa < 0 or gpa & 0xFFF or not 1 <= npages < 1 << 52 or gpa >= 1 << 52:
        raise UsageError(f"--refuse-conversion {shown!r}: GPA must be page aligned and NPAGES >= 1")
    return gpa, npages, to


def parse_refuse_conversions(value: Iterable[Any]) -> list[tuple[int, int, bool | None]]:
    """VMM fault injection ranges: tuples, or the CLI's 'GPA[:NPAGES[:private|shared]]' strings."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise UsageError(f"refuse_conversions {value!r}: expected a list of (gpa, npages, to_private) "
                         "or 'GPA[:NPAGES[:private|shared]]' strings")
    return [parse_refuse_range(v) if isinstance(v, str) else check_refuse_range(v) for v in value]


# ----------------------------------------------------------------------- host memory
#: Host memory a run touches whatever the guest's size (image, runtime data and tables, the
#: emulator's own state), with margin. The runtime maps memory with large pages, so its page
#: tables no longer grow with the guest (testbed/layout.py).
_TOUCHED_OVERHEAD = 64 << 20

#: Bytes of host state the testbed keeps per 4 KiB guest frame, measured at 64 GiB (the
#: memory controller's owner array, KVM's memory attributes, the RMP's assigned and validated
#: entries, the MMU's code-frame arrays): what a run touches even if the guest touches nothing.
_FRAME_BYTES = {"default": 2, "sev": 3, "sev-es": 3}
_FRAME_BYTES_GUEST_MEMFD = 6

#: The emulator's physical address space: Unicorn's x86 is 40 bits wide and the private alias
#: (legacy SEV, guest_memfd) is mapped at 2^39 (hw/unicorn_binding.py PRIVATE_ALIAS_BASE), so
#: guest RAM must fit below it.
EMULATOR_RAM_LIMIT = 1 << 39


def host_backings(vm_type: str) -> int:
    """How many guest-sized mappings a machine reserves (hw/memory.py): the host's memory,
    plus the private alias (legacy SEV) or the guest_memfd backing (sw-protected, sev-snp)."""
    return 1 if vm_type == "default" else 2


#: The /proc/meminfo fields check_host_memory reads: "Name:   value kB" (or a bare count).
_MEMINFO_FIELD = re.compile(r"^(MemAvailable|CommitLimit|Committed_AS):[ \t]*(\d+)(?:[ \t]+(kB))?[ \t]*$", re.M)


def read_meminfo() -> dict[str, int]:
    """The fields of /proc/meminfo check_host_memory uses, in bytes ({} when it cannot be
    read). Every machine is checked (twice through the public API): one regex over the file
    instead of parsing its ~55 lines."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return {}
    return {name: int(value) * (1024 if unit else 1) for name, value, unit in _MEMINFO_FIELD.findall(text)}


def read_overcommit_mode() -> int | None:
    """vm.overcommit_memory (0 heuristic, 1 always, 2 strict), None when unknown."""
    try:
        with open("/proc/sys/vm/overcommit_memory", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def check_host_memory(memory: int, vm_type: str, *, meminfo: dict[str, int] | None = None,
                      overcommit: int | None = -1, address_space: int | None = -1) -> None:
    """UsageError, with the numbers, when the host cannot back a guest of `memory` bytes.

    Guest RAM is reserved as lazily zero-filled MAP_NORESERVE mappings (hw/memory.py): the
    kernel charges pages as they are touched, not the mapping's size (mm/mmap.c do_mmap;
    Documentation/mm/overcommit-accounting.rst), except in strict mode, where MAP_NORESERVE is
    ignored and every mapping must fit under CommitLimit. So a 64 GiB guest maps on a 24 GiB
    host. What stays refused: a size the emulator cannot address (EMULATOR_RAM_LIMIT), mappings
    beyond the process's address-space limit (RLIMIT_AS; `address_space`, None for none),
    strict-mode commit, and a run whose fixed cost - the per-frame host state and the runtime -
    exceeds MemAvailable. Without this check the first three are a MemoryError from mmap and
    the last the OOM killer. The one place to change if the backing changes.
    """
    info = read_meminfo() if meminfo is None else meminfo
    mode = read_overcommit_mode() if overcommit == -1 else overcommit
    size = format_bytes(memory)
    backings = host_backings(vm_type)
    if memory > EMULATOR_RAM_LIMIT:
        raise UsageError(f"memory {size}: the emulator's physical address space holds at most "
                         f"{format_bytes(EMULATOR_RAM_LIMIT)} of guest RAM (the private alias sits above it)")
    limit_as = read_address_space_limit() if address_space == -1 else address_space
    if limit_as is not None and memory * backings > limit_as:
        raise UsageError(f"memory {size}: a {vm_type} guest maps {format_bytes(memory * backings)} but the "
                         f"process's address space is limited to {format_bytes(limit_as)} (ulimit -v)")
    if mode == 2 and "CommitLimit" in info:
        free = info["CommitLimit"] - info.get("Committed_AS", 0)
        if memory * backings > free:
            raise UsageError(f"memory {size}: a {vm_type} guest reserves {format_bytes(memory * backings)} "
                             f"but only {format_bytes(max(free, 0))} is left under CommitLimit "
                             "(vm.overcommit_memory = 2)")
    per_frame = _FRAME_BYTES.get(vm_type, _FRAME_BYTES_GUEST_MEMFD)
    touched = (memory >> 12) * per_frame + _TOUCHED_OVERHEAD
    available = info.get("MemAvailable")
    if available is not None and touched > available:
        raise UsageError(f"memory {size}: a run touches about {format_bytes(touched)} of host memory (the "
                         f"testbed's per-page state and the runtime) but only {format_bytes(available)} is "
                         "available")


def read_address_space_limit() -> int | None:
    """RLIMIT_AS in bytes, None when unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else int(soft)


# ----------------------------------------------------------------------- input files
def read_source_file(path: str | os.PathLike[str], what: str = "guest source file") -> str:
    """The text of a guest source: UsageError naming the file and the reason for anything
    that is not a readable UTF-8 file (missing, a directory, no permission, a name too long
    or holding a NUL byte, undecodable bytes — located at line:column)."""
    shown = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{shown}: no such {what}") from None
    except IsADirectoryError:
        raise UsageError(f"{shown}: is a directory, not a {what}") from None
    except OSError as exc:  # EACCES, ENAMETOOLONG, ELOOP, EIO, ...
        raise UsageError(f"{_short(shown)}: cannot read the {what}: {exc.strerror or exc}") from None
    except ValueError as exc:  # "embedded null byte"
        raise UsageError(f"{_short(shown)!r}: not a usable file name ({exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UsageError(f"{shown}:{line}:{column}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                         "guest sources are UTF-8") from None


def _short(text: str, limit: int = 200) -> str:
    """`text`, cut in the middle when longer than `limit` (a 5,000-character path)."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]}...({len(text) - 2 * keep} characters)...{text[-keep:]}"
