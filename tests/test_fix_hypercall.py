"""Wrong-vendor hypercall instructions: KVM_X86_QUIRK_FIX_HYPERCALL_INSN on and off.

The four cases of tools/testing/selftests/kvm/x86/fix_hypercall_test.c, on both vendors:
1. the guest (guests/fix_hypercall.s) installs a #UD handler that counts its runs, sets
   RAX = -EFAULT and skips the 3-byte instruction, then makes KVM_HC_SCHED_YIELD with the
   native or the foreign instruction at `hypercall_site`;
2. it syncs RAX, the #UD count and the 3 bytes now at `hypercall_site`;
3. quirk on (the default): a foreign instruction is patched in guest memory to the native one
   and re-executed (emulator_fix_hypercall() in arch/x86/kvm/x86.c), so RAX = 0, no #UD;
   quirk off (KVM_CAP_DISABLE_QUIRKS2): the guest's #UD handler runs and the bytes stay;
   the native instruction is never touched, quirk or not.
The CLI's --no-fix-hypercall is the same switch, checked end to end.
"""

from __future__ import annotations

import json

import pytest

from testbed.cli import main
from testbed.hw.exits import Vendor
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program

GUEST = GUESTS_DIR / "fix_hypercall.s"
MEMORY = 16 << 20

VMCALL = b"\x0f\x01\xc1"
VMMCALL = b"\x0f\x01\xd9"
INSN_DEFINE = {VMCALL: 0, VMMCALL: 1}
EFAULT_RET = 0xFFFF_FFFF_FFFF_FFF2  # the selftest's guest_ud_handler sets RAX = -EFAULT

NATIVE = {Vendor.AMD: VMMCALL, Vendor.INTEL: VMCALL}
FOREIGN = {Vendor.AMD: VMCALL, Vendor.INTEL: VMMCALL}


def as_u24(insn: bytes) -> int:
    """The 3 instruction bytes as the guest reads them (little-endian, masked to 24 bits)."""
    return int.from_bytes(insn, "little")


def run_case(vendor: Vendor, insn: bytes, fix_hypercall: bool) -> tuple[int, int, int, bytes]:
    """Run the guest; returns (RAX, #UD count, bytes as the guest saw them, bytes as the host sees them)."""
    options = VmOptions(vendor=vendor, memory=MEMORY, timeout=5.0, fix_hypercall=fix_hypercall,
                        defines={"INSN": INSN_DEFINE[insn]})
    program = build_program(GUEST, options)
    machine = Machine(program, options)
    report = machine.run()
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    syncs = report.syncs()
    assert len(syncs) == 3, f"expected RAX, #UD count and bytes; got {[hex(s) for s in syncs]}"
    host_bytes = machine.memory.host_read(program.symbols["hypercall_site"], 3)
    return syncs[0], syncs[1], syncs[2], host_bytes


VENDORS = pytest.mark.parametrize("vendor", list(Vendor), ids=[v.value for v in Vendor])


@VENDORS
def test_quirk_on_patches_foreign_instruction(vendor: Vendor) -> None:
    """Quirk on: the foreign instruction is rewritten to the native bytes and the hypercall completes."""
    rax, uds, guest_view, host_view = run_case(vendor, FOREIGN[vendor], fix_hypercall=True)
    native = as_u24(NATIVE[vendor])
    assert uds == 0, f"#UD handler ran {uds} times; KVM should have fixed the instruction up"
    assert rax == 0, f"RAX = 0x{rax:x}, expected KVM_HC_SCHED_YIELD's 0"
    assert guest_view == native, f"bytes at hypercall_site 0x{guest_view:06x}, expected native 0x{native:06x}"
    assert host_view == NATIVE[vendor], f"guest memory holds {host_view.hex()}, expected {NATIVE[vendor].hex()}"


@VENDORS
def test_quirk_off_injects_ud_and_leaves_bytes(vendor: Vendor) -> None:
    """Quirk off: the guest's #UD handler runs once and the foreign bytes stay as written."""
    rax, uds, guest_view, host_view = run_case(vendor, FOREIGN[vendor], fix_hypercall=False)
    foreign = as_u24(FOREIGN[vendor])
    assert uds == 1, f"#UD handler ran {uds} times, expected once"
    assert rax == EFAULT_RET, f"RAX = 0x{rax:x}, expected the handler's -EFAULT 0x{EFAULT_RET:x}"
    assert guest_view == foreign, f"bytes at hypercall_site 0x{guest_view:06x}, expected unchanged 0x{foreign:06x}"
    assert host_view == FOREIGN[vendor]


@VENDORS
@pytest.mark.parametrize("fix_hypercall", [True, False], ids=["quirk_on", "quirk_off"])
def test_native_instruction_is_never_patched(vendor: Vendor, fix_hypercall: bool) -> None:
    """The native instruction makes the hypercall directly: no #UD, no rewrite, quirk on or off."""
    rax, uds, guest_view, host_view = run_case(vendor, NATIVE[vendor], fix_hypercall=fix_hypercall)
    native = as_u24(NATIVE[vendor])
    assert uds == 0, f"#UD handler ran {uds} times for the native instruction"
    assert rax == 0, f"RAX = 0x{rax:x}, expected 0"
    assert guest_view == native, f"bytes at hypercall_site 0x{guest_view:06x}, expected 0x{native:06x}"
    assert host_view == NATIVE[vendor]


@pytest.mark.parametrize("flag", [False, True], ids=["default", "no_fix_hypercall"])
def test_cli_no_fix_hypercall_flag(flag: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """`testbed run --no-fix-hypercall` disables the quirk: VMCALL on AMD then takes the guest's #UD."""
    argv = ["run", str(GUEST), "--vendor", "amd", "-D", "INSN=0", "--memory", "16M", "--timeout", "5", "--json"]
    if flag:
        argv.append("--no-fix-hypercall")
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 0, f"status {status}; stderr: {err}"
    assert "Traceback" not in err
    report = json.loads(out)
    syncs = [u["args"][0] for u in report["ucalls"] if u["cmd"] == "sync"]
    if flag:
        assert syncs == [EFAULT_RET, 1, as_u24(VMCALL)], f"syncs {[hex(s) for s in syncs]}"
    else:
        assert syncs == [0, 0, as_u24(VMMCALL)], f"syncs {[hex(s) for s in syncs]}"
