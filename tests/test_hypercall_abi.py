"""The KVM hypercall ABI as real guests see it: kvm/hypercall.py behind the hw and vmm layers.

Scenarios, each a guest in guests/ and a host half here (KVM selftests' shape):
1. Unknown numbers return -KVM_ENOSYS, KVM_HC_VAPIC_POLL_IRQ returns 0, and no GPR other than
   RAX changes across a hypercall (guests/hypercall_abi_gprs.s asserts each one), on both
   vendors.
2. A hypercall at CPL 3 returns -KVM_EPERM whatever its number: the CPL check in
   ____kvm_emulate_hypercall() (arch/x86/kvm/x86.c) precedes the switch.
3. KVM_HC_KICK_CPU and KVM_HC_SCHED_YIELD follow their PV bits in CPUID 0x40000001.EAX when
   KVM_CAP_ENFORCE_PV_FEATURE_CPUID is on (tools/testing/selftests/kvm/x86/kvm_pv_test.c),
   and ignore them when it is off.
4. KVM_HC_MAP_GPA_RANGE: -KVM_ENOSYS without KVM_CAP_EXIT_HYPERCALL, -KVM_EINVAL for the
   three argument errors KVM checks (no user exit), otherwise exactly one KVM_EXIT_HYPERCALL
   whose ret lands in RAX; the VMM's own refusals (reserved attrs, outside memory) come back
   through that exit's ret.
5. The guest API's constants work as documented immediates in GUEST_ASSERT_EQ, negated too.
"""

from __future__ import annotations

from typing import Any

import pytest
from guest_compat import far_return_to_64, far_return_to_compat, load_compat_segment

from testbed.hw.exits import Vendor
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program, run_guest
from testbed.vmm.vmm import RunReport

MEMORY = 16 << 20
TIMEOUT = 5.0

# include/uapi/linux/kvm_para.h, as the guest sees them in RAX (u64)
KVM_HC_VAPIC_POLL_IRQ = 1
KVM_HC_KICK_CPU = 5
KVM_HC_SCHED_YIELD = 11
KVM_HC_MAP_GPA_RANGE = 12
ENOSYS_RET = 0xFFFF_FFFF_FFFF_FC18  # -KVM_ENOSYS (1000)
EPERM_RET = 0xFFFF_FFFF_FFFF_FFFF  # -KVM_EPERM (1)
EINVAL_RET = 0xFFFF_FFFF_FFFF_FFEA  # -KVM_EINVAL (22)
UNKNOWN_NR = 0x999

# CPUID 0x40000001.EAX bits (arch/x86/include/uapi/asm/kvm_para.h)
KVM_FEATURE_PV_UNHALT = 7
KVM_FEATURE_PV_SCHED_YIELD = 13
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0

CALL_GUEST = GUESTS_DIR / "hypercall_abi_call.s"
GPRS_GUEST = GUESTS_DIR / "hypercall_abi_gprs.s"

VENDORS = pytest.mark.parametrize("vendor", list(Vendor), ids=[v.value for v in Vendor])
#: both vendors on a default VM, and a TD (Intel): the same guest, the same answers, unless a
#: test says why a TD's differs. In a TD KVM_HYPERCALL is TDG.VP.VMCALL with R10 = nr
#: (guests/lib/tdx.s tdx_kvm_hypercall; kvm/vmx/tdx.c tdx_emulate_vmcall).
PLATFORMS = pytest.mark.parametrize(("vendor", "vm_type"),
                                    [(Vendor.AMD, "default"), (Vendor.INTEL, "default"), (Vendor.INTEL, "tdx")],
                                    ids=["amd", "intel", "tdx"])


def hypercall(nr: int, *args: int, vendor: Vendor = Vendor.AMD, user: bool = False, **options: Any) -> RunReport:
    """Run guests/hypercall_abi_call.s: hypercall `nr` with a0..a3 = `args`, RAX synced."""
    defines: dict[str, int | str] = {"HC_NR": nr, "USER": int(user)}
    for i, value in enumerate(args):
        defines[f"HC_A{i}"] = value
    report = run_guest(
        CALL_GUEST, VmOptions(vendor=vendor, memory=MEMORY, timeout=TIMEOUT, defines=defines, **options)
    )
    assert report.outcome == "done", f"guest did not finish: {report.outcome} {report.detail}"
    return report


def rax_of(report: RunReport) -> int:
    """The single value the guest synced: RAX after the hypercall."""
    syncs = report.syncs()
    assert len(syncs) == 1, f"expected one GUEST_SYNC, got {[hex(s) for s in syncs]}"
    return syncs[0]


def hypercall_exits(report: RunReport) -> list[dict[str, Any]]:
    """The KVM_EXIT_HYPERCALL user exits of a run, in order."""
    return [e for e in report.user_exits if e["reason"] == "hypercall"]


# ------------------------------------------------------------------------ numbers, registers


@PLATFORMS
def test_unknown_nr_returns_enosys(vendor: Vendor, vm_type: str) -> None:
    """An unknown hypercall number returns -KVM_ENOSYS in RAX (x86.c: `ret = -KVM_ENOSYS` default)."""
    rax = rax_of(hypercall(UNKNOWN_NR, vendor=vendor, vm_type=vm_type))
    assert rax == ENOSYS_RET, f"RAX = 0x{rax:x}, expected -KVM_ENOSYS 0x{ENOSYS_RET:x}"


@PLATFORMS
def test_vapic_poll_irq_returns_zero(vendor: Vendor, vm_type: str) -> None:
    """KVM_HC_VAPIC_POLL_IRQ returns 0 (Documentation/virt/kvm/x86/hypercalls.rst, x86.c)."""
    rax = rax_of(hypercall(KVM_HC_VAPIC_POLL_IRQ, vendor=vendor, vm_type=vm_type))
    assert rax == 0, f"RAX = 0x{rax:x}, expected 0"


@PLATFORMS
@pytest.mark.parametrize("nr", [KVM_HC_VAPIC_POLL_IRQ, UNKNOWN_NR, KVM_HC_KICK_CPU, KVM_HC_SCHED_YIELD],
                         ids=["vapic_poll_irq", "unknown", "kick_cpu", "sched_yield"])
def test_hypercall_clobbers_only_rax(vendor: Vendor, vm_type: str, nr: int) -> None:
    """A hypercall changes RAX only: every other GPR keeps its value (hypercalls.rst)."""
    report = run_guest(GPRS_GUEST, VmOptions(vendor=vendor, vm_type=vm_type, memory=MEMORY, timeout=TIMEOUT,
                                             defines={"HC_NR": nr}))
    aborts = [u for u in report.ucalls if u["cmd"] == "abort"]
    assert report.outcome == "done", (
        f"{report.detail}; "
        + "; ".join(f"{u.get('file')}:{u.get('line')} 0x{u['args'][0]:x} != 0x{u['args'][1]:x}" for u in aborts)
    )
    expected = 0 if nr != UNKNOWN_NR else ENOSYS_RET
    assert rax_of(report) == expected, f"RAX = 0x{rax_of(report):x}, expected 0x{expected:x}"


# ------------------------------------------------------------------------------- CPL 3


@PLATFORMS
@pytest.mark.parametrize("nr", [UNKNOWN_NR, KVM_HC_VAPIC_POLL_IRQ, KVM_HC_MAP_GPA_RANGE],
                         ids=["unknown", "vapic_poll_irq", "map_gpa_range"])
def test_cpl3_hypercall_returns_eperm(vendor: Vendor, vm_type: str, nr: int) -> None:
    """At CPL 3 every hypercall returns -KVM_EPERM and none exits: x86.c checks CPL before the
    switch. In a TD the TDCALL behind KVM_HYPERCALL is #GP(0) at CPL 3 before the TDX module or
    KVM see it (kvm-x86 9d7dfb95da2c: "TDCALL and SEAMCALL #GP at CPL > 0")."""
    if vm_type == "tdx":
        report = run_guest(CALL_GUEST, VmOptions(vendor=vendor, vm_type=vm_type, memory=MEMORY, timeout=TIMEOUT,
                                                 defines={"HC_NR": nr, "HC_A0": 0x800000, "HC_A1": 1, "USER": 1}))
        assert report.outcome == "unhandled_exception", f"{report.outcome}: {report.detail}"
        assert report.exception is not None and report.exception["vector"] == 13, report.exception
        assert hypercall_exits(report)[1:] == [], "a CPL-3 TDCALL reached KVM"
        return
    report = hypercall(nr, 0x800000, 1, 0, vendor=vendor, user=True)
    rax = rax_of(report)
    assert rax == EPERM_RET, f"RAX = 0x{rax:x} at CPL 3, expected -KVM_EPERM 0x{EPERM_RET:x}"
    assert hypercall_exits(report) == [], f"a CPL-3 hypercall exited to userspace: {hypercall_exits(report)}"


# ---------------------------------------------------------------------- PV feature gating


PV_CASES = [
    (KVM_HC_KICK_CPU, KVM_FEATURE_PV_UNHALT),
    (KVM_HC_SCHED_YIELD, KVM_FEATURE_PV_SCHED_YIELD),
]
PV_IDS = ["kick_cpu", "sched_yield"]


@pytest.mark.parametrize(("nr", "feature"), PV_CASES, ids=PV_IDS)
def test_pv_hypercall_succeeds_with_its_feature_bit(nr: int, feature: int) -> None:
    """With enforcement on, KICK_CPU/SCHED_YIELD return 0 when their PV bit is set (kvm_pv_test.c)."""
    rax = rax_of(hypercall(nr, 0, 0, pv_features=1 << feature))
    assert rax == 0, f"nr {nr} with PV bit {feature} set: RAX = 0x{rax:x}, expected 0"


@pytest.mark.parametrize(("nr", "feature"), PV_CASES, ids=PV_IDS)
def test_pv_hypercall_enosys_without_its_feature_bit(nr: int, feature: int) -> None:
    """With enforcement on, KICK_CPU/SCHED_YIELD return -KVM_ENOSYS when their PV bit is clear (kvm_pv_test.c)."""
    all_but = 0xFFFF_FFFF & ~(1 << feature)
    for pv in (0, all_but):
        rax = rax_of(hypercall(nr, 0, 0, pv_features=pv))
        assert rax == ENOSYS_RET, (
            f"nr {nr} with CPUID 0x40000001.EAX = 0x{pv:x}: RAX = 0x{rax:x}, expected 0x{ENOSYS_RET:x}"
        )


def test_pv_gating_is_on_by_default() -> None:
    """VmOptions enables KVM_CAP_ENFORCE_PV_FEATURE_CPUID unless told otherwise."""
    assert VmOptions().enforce_pv_cpuid is True
    rax = rax_of(hypercall(KVM_HC_SCHED_YIELD, 0, pv_features=0))
    assert rax == ENOSYS_RET, f"RAX = 0x{rax:x}, expected 0x{ENOSYS_RET:x}"


@pytest.mark.parametrize(("nr", "feature"), PV_CASES, ids=PV_IDS)
@pytest.mark.parametrize("pv_set", [False, True], ids=["bit_clear", "bit_set"])
def test_pv_hypercall_ungated_without_enforcement(nr: int, feature: int, pv_set: bool) -> None:
    """Without KVM_CAP_ENFORCE_PV_FEATURE_CPUID, guest_pv_has() is always true: both return 0."""
    pv = (1 << feature) if pv_set else 0
    rax = rax_of(hypercall(nr, 0, 0, pv_features=pv, enforce_pv_cpuid=False))
    assert rax == 0, f"nr {nr}, PV 0x{pv:x}, not enforced: RAX = 0x{rax:x}, expected 0"


# ----------------------------------------------------------------------- MAP_GPA_RANGE


GPA = 0x800000  # inside the 16 MiB guest, above the runtime's page tables
NPAGES = 4


@PLATFORMS
def test_map_gpa_range_enosys_without_exit_cap(vendor: Vendor, vm_type: str) -> None:
    """Without KVM_CAP_EXIT_HYPERCALL bit 12, MAP_GPA_RANGE returns -KVM_ENOSYS and never exits (x86.c)."""
    report = hypercall(KVM_HC_MAP_GPA_RANGE, GPA, NPAGES, 0, vendor=vendor, vm_type=vm_type, map_gpa_exit=False)
    rax = rax_of(report)
    assert rax == ENOSYS_RET, f"RAX = 0x{rax:x}, expected 0x{ENOSYS_RET:x}"
    assert hypercall_exits(report) == []
    # A TD's runtime shares its ucall page with MapGPA, SUBFUNC_UNSUPPORTED here (tdx.c
    # tdx_map_gpa): its first ucall is a KVM_EXIT_MEMORY_FAULT the VMM answers by converting.
    assert report.shared_ranges == ([[1, 1]] if vm_type == "tdx" else [])


@PLATFORMS
@pytest.mark.parametrize(
    ("gpa", "npages"),
    [(GPA + 0x10, NPAGES), (GPA, 0), (0x1000, 0xFFFF_FFFF_FFFF_FFFF), (GPA, (1 << 64) - (GPA >> 12))],
    ids=["unaligned_gpa", "zero_pages", "gfn_plus_npages_wraps", "gfn_plus_npages_is_2_64"],
)
def test_map_gpa_range_einval_for_bad_arguments(vendor: Vendor, vm_type: str, gpa: int, npages: int) -> None:
    """Unaligned gpa, npages 0 or a wrapping gfn+npages give -KVM_EINVAL with no user exit (x86.c)."""
    report = hypercall(KVM_HC_MAP_GPA_RANGE, gpa, npages, 0, vendor=vendor, vm_type=vm_type)
    rax = rax_of(report)
    assert rax == EINVAL_RET, f"gpa 0x{gpa:x} npages 0x{npages:x}: RAX = 0x{rax:x}, expected 0x{EINVAL_RET:x}"
    exits, shared = hypercall_exits(report), report.shared_ranges
    if vm_type == "tdx":  # the runtime's boot conversion of its ucall page (guests/lib/tdx.s)
        assert [e["args"][0] for e in exits[:1]] == [0x1000] and shared[:1] == [[1, 1]]
        exits, shared = exits[1:], shared[1:]
    assert exits == [], f"KVM exited for a call it must reject: {exits}"
    assert shared == []


@PLATFORMS
def test_map_gpa_range_exits_once_and_ret_lands_in_rax(vendor: Vendor, vm_type: str) -> None:
    """A valid MAP_GPA_RANGE makes one KVM_EXIT_HYPERCALL (nr 12, args, LONG_MODE flag); its ret is RAX."""
    report = hypercall(KVM_HC_MAP_GPA_RANGE, GPA, NPAGES, 0, vendor=vendor, vm_type=vm_type)
    exits = hypercall_exits(report)
    if vm_type == "tdx":  # the runtime's boot conversion of its ucall page comes first
        exits = exits[1:]
    assert len(exits) == 1, f"expected exactly one hypercall exit, got {exits}"
    run = exits[0]
    shape = {k: run[k] for k in ("reason", "nr", "args", "flags")}
    assert shape == {
        "reason": "hypercall",
        "nr": KVM_HC_MAP_GPA_RANGE,
        "args": [GPA, NPAGES, 0, 0, 0, 0],
        "flags": KVM_EXIT_HYPERCALL_LONG_MODE,
    }, f"exit {run}"
    rax = rax_of(report)
    assert rax == 0, f"RAX = 0x{rax:x}, expected the VMM's ret 0"
    assert run["ret"] == rax, f"exit ret 0x{run['ret']:x} != RAX 0x{rax:x}"


SHARED_THEN_PRIVATE = f"""
guest_main:
    push rbx
    mov rax, KVM_HC_MAP_GPA_RANGE
    mov rbx, {GPA:#x}
    mov rcx, {NPAGES}
    mov rdx, KVM_MAP_GPA_RANGE_DECRYPTED
    KVM_HYPERCALL
    GUEST_SYNC rax
    mov rax, KVM_HC_MAP_GPA_RANGE
    mov rbx, {GPA:#x}
    mov rcx, 1
    mov rdx, KVM_MAP_GPA_RANGE_ENCRYPTED
    KVM_HYPERCALL
    GUEST_SYNC rax
    pop rbx
    ret
"""


def test_map_gpa_range_updates_shared_ranges() -> None:
    """A DECRYPTED call adds [gfn, npages] to shared_ranges; an ENCRYPTED call takes pages out again."""
    report = run_guest("map_gpa_shared_then_private.s", VmOptions(memory=MEMORY, timeout=TIMEOUT),
                       text=SHARED_THEN_PRIVATE)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [0, 0], f"RAX values {[hex(s) for s in report.syncs()]}"
    assert [e["args"][:3] for e in hypercall_exits(report)] == [
        [GPA, NPAGES, 0],
        [GPA, 1, KVM_MAP_GPA_RANGE_ENCRYPTED],
    ]
    gfn = GPA >> 12
    assert report.shared_ranges == [[gfn + 1, NPAGES - 1]], (
        f"shared_ranges {report.shared_ranges}, expected [[0x{gfn + 1:x}, {NPAGES - 1}]]"
    )


@pytest.mark.parametrize(
    ("gpa", "npages", "attrs"),
    [
        (GPA, NPAGES, 1 << 5),  # reserved attrs bit 5
        (GPA, NPAGES, 1 << 63),  # reserved attrs bit 63
        (GPA, NPAGES, 3),  # page-size hint 3: neither 4K, 2M nor 1G
        ((16 << 20) - 0x1000, 2, 0),  # last page + one beyond guest memory
        (1 << 40, 1, KVM_MAP_GPA_RANGE_ENCRYPTED),  # to private far outside guest memory
    ],
    ids=["attrs_bit5", "attrs_bit63", "page_size_3", "straddles_end", "outside_memory"],
)
def test_vmm_refuses_what_kvm_forwards(gpa: int, npages: int, attrs: int) -> None:
    """KVM forwards attrs/ranges unchecked (the user exit happens); the VMM's policy answers EINVAL.

    KVM checks only alignment, npages != 0 and wrap-around (x86.c; private_mem_conversions_test.c
    passes arbitrary attrs). Refusing reserved attribute bits and ranges outside guest memory is
    testbed/vmm/map_gpa.py's policy, not KVM's. On a non-SNP VM the VMM answers -KVM_EINVAL, the
    hypercall ABI's error (hypercalls.rst), which complete_hypercall_exit() writes into RAX raw.
    """
    report = hypercall(KVM_HC_MAP_GPA_RANGE, gpa, npages, attrs)
    exits = hypercall_exits(report)
    assert len(exits) == 1, f"KVM must forward gpa 0x{gpa:x} npages 0x{npages:x} attrs 0x{attrs:x}: {exits}"
    assert exits[0]["args"][:3] == [gpa, npages, attrs]
    rax = rax_of(report)
    assert rax == EINVAL_RET, f"RAX = 0x{rax:x}, expected the VMM's -KVM_EINVAL, written raw"
    assert exits[0]["ret"] == rax
    assert report.shared_ranges == []


# ------------------------------------------------------------------ guest API: constants


NEGATED_CONSTANT_GUEST = """
guest_main:
    mov rax, UNKNOWN_NR
    KVM_HYPERCALL
    GUEST_SYNC rax
    GUEST_ASSERT_EQ rax, -KVM_ENOSYS
    ret
"""


def test_assert_against_negated_prelude_constant() -> None:
    """GUEST_ASSERT_EQ rax, -KVM_ENOSYS compares with the immediate -1000: it holds for -1000, fails for -1.

    Keystone 0.9.2 encodes `push -SYMBOL` as a memory load; a silent acceptance would compare RAX
    with whatever memory holds, so both the passing and the failing compare are pinned.
    """
    options = VmOptions(memory=MEMORY, timeout=TIMEOUT, defines={"UNKNOWN_NR": UNKNOWN_NR})
    program = build_program("negated_constant.s", options, text=NEGATED_CONSTANT_GUEST)
    report = Machine(program, options).run()
    assert report.syncs() == [ENOSYS_RET], f"syncs {[hex(s) for s in report.syncs()]}"
    assert report.outcome == "done", f"{report.outcome}: {report.detail} (the assert did not compare with -1000)"
    program = build_program("negated_constant.s", options, text=NEGATED_CONSTANT_GUEST.replace("ENOSYS", "EPERM"))
    report = Machine(program, options).run()
    assert report.outcome == "guest_assert", report.detail
    assert report.detail == ("negated_constant.s:6: rax == -KVM_EPERM failed: "
                             f"0x{ENOSYS_RET:x} != 0x{EPERM_RET:x}")


# ------------------------------------------------------------------ 32-bit callers, end to end

# Add a 32-bit code segment at 0x38 to the runtime's GDT (tests/guest_compat.py), far-return
# into compatibility mode at `compat`, make one hypercall there with RAX,
# RBX, RCX, RDX, RSI as loaded in 64-bit mode (their upper halves untouched), far-return to
# 64-bit mode and sync RAX exactly as KVM left it.
COMPAT_GUEST = ("guest_main:\n    push rbx\n" + load_compat_segment()
                + "    movabs rax, HC_NR\n    movabs rbx, HC_A0\n    movabs rcx, HC_A1\n    movabs rdx, HC_A2\n"
                + "    movabs rsi, HC_A3\n" + far_return_to_compat("compat")
                + "compat:\n    .byte INSN_BYTES\n" + far_return_to_64("back64")
                + "back64:\n    GUEST_SYNC rax\n    pop rbx\n    ret\n")
INSN_BYTES = {Vendor.AMD: "0x0f, 0x01, 0xd9", Vendor.INTEL: "0x0f, 0x01, 0xc1"}


def compat_hypercall(vendor: Vendor, nr: int, *args: int) -> RunReport:
    """COMPAT_GUEST with the vendor's native instruction: one hypercall from a 32-bit code segment."""
    defines: dict[str, int | str] = {"HC_NR": nr}
    for i in range(4):
        defines[f"HC_A{i}"] = args[i] if i < len(args) else 0
    text = COMPAT_GUEST.replace("INSN_BYTES", INSN_BYTES[vendor])
    report = run_guest("compat_hypercall.s", VmOptions(vendor=vendor, memory=MEMORY, timeout=TIMEOUT,
                                                       defines=defines), text=text)
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    return report


@VENDORS
def test_32bit_caller_unknown_nr_gets_u32_enosys(vendor: Vendor) -> None:
    """From a compatibility-mode segment, nr is truncated (upper bits ignored) and RAX =
    (u32)-KVM_ENOSYS = 0xfffffc18: is_64_bit_hypercall() is false (CS.L = 0), x86.c."""
    report = compat_hypercall(vendor, (0xDEAD << 32) | UNKNOWN_NR)
    assert rax_of(report) == 0xFFFF_FC18, f"RAX = 0x{rax_of(report):x}"


@VENDORS
def test_32bit_caller_nr_truncated_to_a_known_call(vendor: Vendor) -> None:
    """nr = (1 << 32) | KVM_HC_VAPIC_POLL_IRQ from 32-bit code is VAPIC_POLL_IRQ: RAX = 0."""
    assert rax_of(compat_hypercall(vendor, (1 << 32) | KVM_HC_VAPIC_POLL_IRQ)) == 0


@VENDORS
def test_32bit_caller_map_gpa_range_exit(vendor: Vendor) -> None:
    """MAP_GPA_RANGE from 32-bit code: the exit's args are the low 32 bits, flags = 0 (no
    KVM_EXIT_HYPERCALL_LONG_MODE), and the VMM's ret reaches RAX as u32."""
    report = compat_hypercall(vendor, (7 << 32) | KVM_HC_MAP_GPA_RANGE, (5 << 32) | GPA, (1 << 40) | 2,
                              (1 << 33) | KVM_MAP_GPA_RANGE_ENCRYPTED)
    exits = hypercall_exits(report)
    assert [(e["nr"], e["args"][:3], e["flags"]) for e in exits] == [
        (KVM_HC_MAP_GPA_RANGE, [GPA, 2, KVM_MAP_GPA_RANGE_ENCRYPTED], 0)], exits
    assert rax_of(report) == 0


def test_32bit_caller_in_a_td_is_a_ve_kvm_never_sees() -> None:
    """In a TD the native VMCALL, from 32-bit code too, is a #VE with exit reason 18 that KVM
    never sees (the TDX module's td_generic_ve_exit); the runtime reports it unhandled (vector
    20, error code = the exit reason), as Linux's virt_exception_kernel would."""
    text = COMPAT_GUEST.replace("INSN_BYTES", INSN_BYTES[Vendor.INTEL])
    defines: dict[str, int | str] = {"HC_NR": UNKNOWN_NR, "HC_A0": 0, "HC_A1": 0, "HC_A2": 0, "HC_A3": 0}
    report = run_guest("compat_hypercall.s", VmOptions(vendor=Vendor.INTEL, vm_type="tdx", memory=MEMORY,
                                                       timeout=TIMEOUT, defines=defines), text=text)
    assert report.outcome == "unhandled_exception", f"{report.outcome}: {report.detail}"
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["exit_reason"]) == (20, 18)
    assert hypercall_exits(report)[1:] == [] and report.syncs() == []


# ------------------------------------------------------------------------- SEND_IPI, e2e

KVM_HC_SEND_IPI = 10
KVM_FEATURE_PV_SEND_IPI = 11
EOPNOTSUPP_RET = 0xFFFF_FFFF_FFFF_FFA1  # -95


@PLATFORMS
@pytest.mark.parametrize(("pv", "icr", "expected"), [
    (1 << KVM_FEATURE_PV_SEND_IPI, 0xFD, EOPNOTSUPP_RET),
    (1 << KVM_FEATURE_PV_SEND_IPI, 0xFD | 0x800, EINVAL_RET),
    (1 << KVM_FEATURE_PV_SEND_IPI, 0xFD | 0xC0000, EINVAL_RET),
    (0, 0xFD | 0x800, ENOSYS_RET),
], ids=["self_ipi", "dest_logical", "shorthand", "no_pv_feature"])
def test_send_ipi_answers(vendor: Vendor, vm_type: str, pv: int, icr: int, expected: int) -> None:
    """KVM_HC_SEND_IPI end to end: -KVM_ENOSYS without PV_SEND_IPI (x86.c guest_pv_has), -KVM_EINVAL
    for destination-mode/shorthand ICR bits before the APIC map, -EOPNOTSUPP with no in-kernel
    APIC map (lapic.c kvm_pv_send_ipi; a3 is the ICR). A TD has the in-kernel APIC (split
    irqchip, tdx_vcpu_create): its IPI to itself (bit 0, min 0) is delivered, which the testbed
    does not model - the run ends naming it."""
    if vm_type == "tdx" and expected == EOPNOTSUPP_RET:
        defines: dict[str, int | str] = {"HC_NR": KVM_HC_SEND_IPI, "USER": 0, "HC_A0": 1, "HC_A1": 0, "HC_A2": 0,
                                         "HC_A3": icr}
        report = run_guest(CALL_GUEST, VmOptions(vendor=vendor, vm_type=vm_type, memory=MEMORY, timeout=TIMEOUT,
                                                 defines=defines, pv_features=pv))
        assert report.outcome == "internal_error" and "KVM_HC_SEND_IPI to this vCPU" in report.detail, report.detail
        return
    rax = rax_of(hypercall(KVM_HC_SEND_IPI, 1, 0, 0, icr, vendor=vendor, vm_type=vm_type, pv_features=pv))
    assert rax == expected, f"RAX = 0x{rax:x}, expected 0x{expected:x}"


@pytest.mark.parametrize(("low", "high", "min_id"), [(0, 0, 0), (2, 1, 0), (1, 1, 1)],
                         ids=["empty", "other_ids", "min_above"])
def test_send_ipi_in_a_td_counts_the_vcpus_reached(low: int, high: int, min_id: int) -> None:
    """In a TD KVM has an APIC map, so KVM_HC_SEND_IPI returns the count of IPIs delivered, 0 when
    the bitmaps name no existing vCPU (lapic.c kvm_pv_send_ipi/__pv_send_ipi; min is a u32),
    not -EOPNOTSUPP."""
    report = hypercall(KVM_HC_SEND_IPI, low, high, min_id, 0xFD, vendor=Vendor.INTEL, vm_type="tdx",
                       pv_features=1 << KVM_FEATURE_PV_SEND_IPI)
    assert rax_of(report) == 0


def test_send_ipi_min_is_a_u32() -> None:
    """`u32 min`: a2 = 1 << 32 is min 0, so bit 0 of the low bitmap names this vCPU (lapic.c
    kvm_pv_send_ipi) and the IPI is delivered (not modelled: the run ends naming it)."""
    defines: dict[str, int | str] = {"HC_NR": KVM_HC_SEND_IPI, "USER": 0, "HC_A0": 1, "HC_A1": 0, "HC_A2": 1 << 32,
                                     "HC_A3": 0xFD}
    report = run_guest(CALL_GUEST, VmOptions(vendor=Vendor.INTEL, vm_type="tdx", memory=MEMORY, timeout=TIMEOUT,
                                             defines=defines, pv_features=1 << KVM_FEATURE_PV_SEND_IPI))
    assert report.outcome == "internal_error" and "KVM_HC_SEND_IPI to this vCPU" in report.detail, report.detail


def test_clock_pairing_end_to_end() -> None:
    """KVM_HC_CLOCK_PAIRING (wallclock) returns -KVM_EOPNOTSUPP: the modelled host's clocksource is
    not TSC based (x86.c kvm_pv_clock_pairing(), kvm_get_walltime_and_clockread())."""
    assert rax_of(hypercall(9, GPA, 0)) == EOPNOTSUPP_RET


# ---------------------------------------------------------------- the KVM signature leaf


@pytest.mark.parametrize(("base", "expected"), [(0x40000000, 0), (0x40000100, 0), (None, ENOSYS_RET)],
                         ids=["base_0x40000000", "base_0x40000100", "no_signature"])
def test_pv_features_found_through_the_signature(base: int | None, expected: int) -> None:
    """KVM finds the PV features at the base where "KVMKVMKVM" is (kvm_get_hypervisor_cpuid(),
    kvm_apply_cpuid_pv_features_quirk() in cpuid.c); without the signature there are none, so the
    enforced SCHED_YIELD is -KVM_ENOSYS although its bit is in the leaf userspace set."""
    rax = rax_of(hypercall(KVM_HC_SCHED_YIELD, 0, pv_features=1 << KVM_FEATURE_PV_SCHED_YIELD,
                           kvm_cpuid_base=base))
    assert rax == expected, f"RAX = 0x{rax:x}, expected 0x{expected:x}"


def test_signature_lookup_unit() -> None:
    """CpuidTable.pv_features(): the first base with the signature wins; a features leaf at a base
    without the signature is ignored."""
    from testbed.kvm.vm import CpuidEntry
    from testbed.vmm.cpuid import build_cpuid

    table = build_cpuid(Vendor.AMD, 0x1234, kvm_base=0x40000200)
    assert table.kvm_cpuid_base() == 0x40000200 and table.pv_features() == 0x1234
    table.set(CpuidEntry(0x40000001, 0, 0xFFFF, 0, 0, 0))  # no signature at 0x40000000
    assert table.pv_features() == 0x1234
    assert build_cpuid(Vendor.AMD, 0x1234, kvm_base=None).pv_features() == 0


# ----------------------------------------------- one guest, one answer: PAGE_ENC_STATUS paths


def test_page_enc_status_same_ranges_on_sev_and_sev_es() -> None:
    """The seed-era KVM_HC_PAGE_ENC_STATUS reaches the in-kernel bitmap through VMMCALL (sev) and
    through the GHCB (sev-es) alike, and matches what MAP_GPA_RANGE records (guests/conversions.s)."""
    answers = {}
    for vm_type in ("sev", "sev-es"):
        for proto in ("page-enc-status", "map-gpa-range"):
            report = run_guest(GUESTS_DIR / "conversions.s", VmOptions(vm_type=vm_type, hc_protocol=proto,
                                                                       memory=MEMORY, timeout=TIMEOUT))
            assert report.outcome == "done", f"{vm_type} {proto}: {report.outcome} {report.detail}"
            answers[(vm_type, proto)] = report.shared_ranges
    reference = answers[("sev", "map-gpa-range")]
    assert reference, "the guest converted nothing"
    for key, ranges in answers.items():
        assert ranges == reference, f"{key}: {ranges} != {reference}"


# -------------------------------------------- sw-protected: a private access after MAP_GPA_RANGE

PRIVATE_ACCESS_GUEST = f"""
guest_main:
    push rbx
    mov rdi, {GPA:#x}
    mov rsi, 1
    call set_memory_shared
    GUEST_SYNC rax
    mov rax, {GPA:#x}
    mov qword ptr [rax], 0x1234
    mov rdi, {GPA:#x}
    mov rsi, 1
    call set_memory_private
    GUEST_SYNC rax
    mov rax, {GPA:#x}
    mov rbx, qword ptr [rax]
    GUEST_SYNC rbx
    pop rbx
    ret
"""


def test_sw_protected_private_access_after_map_gpa_private() -> None:
    """sw-protected: after MAP_GPA_RANGE(private) the page is private in KVM's attributes, so the
    guest's access is served from the private backing without a memory fault (it does not see the
    value it wrote while the page was shared: the VMM discards the other side on conversion)."""
    report = run_guest("private_after_map.s", VmOptions(vm_type="sw-protected", memory=MEMORY, timeout=TIMEOUT),
                       text=PRIVATE_ACCESS_GUEST)
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    syncs = report.syncs()
    assert syncs[:2] == [0, 0], f"conversions returned {[hex(s) for s in syncs[:2]]}"
    assert [e["reason"] for e in report.user_exits if e["reason"] == "memory_fault"] == []
    assert report.shared_ranges == []


# ------------------------------------------------------------------ single-stepping over exits
#: Set RFLAGS.TF, run INSN_BYTES (an instruction KVM emulates and skips), then a NOP; the #DB
#: handler records the first trap's RIP and DR6, and clears TF.
SINGLE_STEP = """
.equ DB_COUNT, GUEST_FREE_GPA
guest_main:
    push rbx
    mov rax, DB_COUNT
    mov qword ptr [rax], 0
    GUEST_SET_HANDLER 1, db_handler
    mov rax, KVM_HC_VAPIC_POLL_IRQ
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    .byte INSN_BYTES
after_insn:
    nop
    mov rbx, DB_COUNT
    mov rcx, qword ptr [rbx + 8]
    lea rdx, [rip + after_insn]
    sub rcx, rdx
    GUEST_SYNC rcx
    mov rcx, qword ptr [rbx + 16]
    GUEST_SYNC rcx
    pop rbx
    ret
db_handler:
    mov rax, DB_COUNT
    inc qword ptr [rax]
    cmp qword ptr [rax], 1
    jne 1f
    mov rcx, qword ptr [rdi + EX_RIP]
    mov qword ptr [rax + 8], rcx
    mov rcx, dr6
    mov qword ptr [rax + 16], rcx
1:
    and qword ptr [rdi + EX_RFLAGS], -257
    ret
"""


@pytest.mark.parametrize(("vendor", "insn"), [
    (Vendor.AMD, "0x0f, 0x01, 0xd9"),  # VMMCALL
    (Vendor.INTEL, "0x0f, 0x01, 0xc1"),  # VMCALL
    (Vendor.AMD, "0x0f, 0x09"),  # WBINVD: KVM skips it
], ids=["vmmcall", "vmcall", "wbinvd"])
def test_a_trap_flag_over_an_instruction_kvm_skips_is_a_db_after_it(vendor: Vendor, insn: str) -> None:
    """With RFLAGS.TF set, an instruction KVM emulates and skips is followed by #DB with DR6.BS,
    at the next instruction (x86.c kvm_skip_emulated_instruction -> kvm_vcpu_do_singlestep),
    as after any instruction the CPU retires."""
    report = run_guest("single_step.s", VmOptions(vendor=vendor, memory=MEMORY, timeout=TIMEOUT),
                       text=SINGLE_STEP.replace("INSN_BYTES", insn))
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    offset, dr6 = report.syncs()
    assert offset == 0, f"first #DB at after_insn{offset - (1 << 64) if offset >> 63 else offset:+d}"
    assert dr6 & (1 << 14), f"DR6 0x{dr6:x}: BS clear"
