"""The layering of DESIGN.md, checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "testbed"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_only_the_cpu_imports_unicorn() -> None:
    """Unicorn is imported by testbed/hw/cpu.py alone (and the benchmark's bare baseline)."""
    users = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py") if any(
        i == "unicorn" or i.startswith("unicorn.") for i in imports_of(p))}
    assert users <= {"hw/cpu.py", "bench.py"}, users


def test_only_asm_imports_keystone_and_only_decode_imports_capstone() -> None:
    """One seam per external engine: asm.py for Keystone, decode.py for capstone."""
    for engine, allowed in (("keystone", {"asm.py"}), ("capstone", {"decode.py"})):
        users = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py") if any(
            i == engine or i.startswith(engine + ".") for i in imports_of(p))}
        assert users <= allowed, (engine, users)


def test_kvm_never_reaches_into_the_emulator_or_the_vmm() -> None:
    """kvm/ may use hw's exit codes and memory protocol, never hw.cpu, the VMM or the machine."""
    for path in modules("kvm"):
        bad = {i for i in imports_of(path) if i in ("testbed.hw.cpu", "testbed.machine")
               or i.startswith("testbed.vmm")}
        assert not bad, (path.name, bad)


def test_vmm_never_imports_hardware_internals() -> None:
    """vmm/ sees exits and the host's memory view only: no hw.cpu, no cipher, no emulator."""
    for path in modules("vmm"):
        bad = {i for i in imports_of(path) if i in ("testbed.hw.cpu", "testbed.hw.cipher", "testbed.machine")}
        assert not bad, (path.name, bad)
