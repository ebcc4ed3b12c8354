"""The layering of DESIGN.md, checked on the import statements of every module."""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "testbed"


def _statements(nodes: Iterable[ast.AST]) -> Iterator[ast.AST]:
    """Every statement, nested ones too: an import is a statement, so it sits in a statement
    list (a body, orelse, finalbody, an except handler's or a match case's body); the
    expressions, most of a tree, need no visit."""
    for node in nodes:
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from _statements(getattr(node, field, ()))


@functools.cache
def imports_of(path: Path) -> frozenset[str]:
    """The modules `path` imports (parsed once per process: several tests read every module)."""
    names: set[str] = set()
    for node in _statements(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return frozenset(names)


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_only_the_binding_imports_unicorn() -> None:
    """Unicorn is imported by testbed/hw/unicorn_binding.py alone (and the benchmark's bare
    baseline); the MMU, event delivery, intercepts and run loop reach it through the binding."""
    users = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py") if any(
        i == "unicorn" or i.startswith("unicorn.") for i in imports_of(p))}
    assert users == {"hw/unicorn_binding.py", "bench.py"}, users


def _bad(package: str, forbidden: tuple[str, ...], allowed: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in modules(package):
        name = path.relative_to(ROOT).as_posix()
        bad = {i for i in imports_of(path) if any(i == f or i.startswith(f + ".") for f in forbidden)}
        bad -= (allowed or {}).get(name, set())
        if bad:
            found[name] = bad
    return found


def test_hardware_never_imports_kvm_the_vmm_or_the_machine() -> None:
    """hw/ is the bottom layer: no hw module imports kvm/, vmm/, the tracker or the machine
    (the hardware reports exits through the Hypervisor protocol and asks KVM's memory
    attributes through StagePrivacy, both defined in hw/)."""
    forbidden = ("testbed.kvm", "testbed.vmm", "testbed.tracker", "testbed.machine", "testbed.api")
    assert not _bad("hw", forbidden), _bad("hw", forbidden)


def test_kvm_never_imports_the_vmm_or_the_tracker() -> None:
    """kvm/ never reaches up into userspace: no vmm/, no machine, no API, no CLI; and no
    tracker, the VMM's data structure, with no exception (the seed-era page-encryption bitmap
    is KVM's own, kvm/page_enc.py; the VMM reads it with KVM_GET_PAGE_ENC_BITMAP)."""
    forbidden = ("testbed.vmm", "testbed.machine", "testbed.api", "testbed.tracker", "testbed.cli")
    assert not _bad("kvm", forbidden), _bad("kvm", forbidden)


def test_fake_hardware_needs_no_emulator() -> None:
    """testbed/hw/fake.py (the fake VcpuHardware for kvm/vmm unit tests) imports no Unicorn
    and none of the modules built on the binding."""
    imports = imports_of(ROOT / "hw" / "fake.py")
    emulator = {"testbed.hw.cpu", "testbed.hw.unicorn_binding", "testbed.hw.mmu", "testbed.hw.events",
                "testbed.hw.intercepts", "testbed.hw.runloop"}
    assert not {i for i in imports if i.startswith("unicorn") or i in emulator}, imports


def test_c_extension_never_calls_into_kvm() -> None:
    """The C exit path (hw/_fastexit.c) only delivers to the hardware model's handler: its
    code (comments stripped) imports no module, looks up no attribute by name and names
    nothing of kvm/ or vmm/ (the handler is passed in by the binding)."""
    source = (ROOT / "hw" / "_fastexit.c").read_text()
    code = re.sub(r"/\*.*?\*/|//[^\n]*", "", source, flags=re.S)
    for banned in ("PyImport_", "PyObject_GetAttr", "PyObject_CallMethod", "PyObject_SetAttr"):
        assert banned not in code, banned
    assert not re.findall(r"(?i)\w*(?:kvm|vmm|hypercall|vmexit)\w*", code)


def test_only_asm_imports_keystone_and_only_decode_imports_capstone() -> None:
    """One seam per external engine: the asm package's worker for Keystone, decode.py for capstone."""
    for engine, allowed in (("keystone", {"asm/keystone_worker.py"}), ("capstone", {"decode.py"})):
        users = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py") if any(
            i == engine or i.startswith(engine + ".") for i in imports_of(p))}
        assert users <= allowed, (engine, users)


#: The hardware's internals: everything but the exit types and protocols (hw/exits.py), the
#: host's memory protocol (hw/memory.py) and the fake.
HW_INTERNALS = ("testbed.hw.cpu", "testbed.hw.unicorn_binding", "testbed.hw.mmu", "testbed.hw.events",
                "testbed.hw.intercepts", "testbed.hw.runloop", "testbed.hw.cipher", "testbed.hw.rmp",
                "testbed.hw._fastexit", "testbed.hw.watchdog")


def test_kvm_never_reaches_into_the_emulator() -> None:
    """kvm/ may use hw's exit codes and protocols (hw/exits.py) and the memory protocol, never
    the emulator's modules, the cipher or the RMP (it drives them through VcpuHardware)."""
    assert not _bad("kvm", HW_INTERNALS), _bad("kvm", HW_INTERNALS)


def test_vmm_never_imports_hardware_internals() -> None:
    """vmm/ sees exits and the host's memory view only: no emulator module, no cipher, no RMP,
    no machine."""
    forbidden = (*HW_INTERNALS, "testbed.machine")
    assert not _bad("vmm", forbidden), _bad("vmm", forbidden)
