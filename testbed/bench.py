"""`testbed bench`: the testbed's speed against ceilings measured in the same process, paired.

A figure measured alone on a shared machine says little: the same run can be 2x slower a
minute later. So every figure here is measured in *rounds*, interleaved with the ceiling it is
compared to, and each ratio is computed per round from the two measurements taken next to each
other (the ceiling right before the testbed's figure on even rounds, right after it on odd
ones). A figure is reported as the median of its rounds with their min-max (and the rounds
themselves, `--json`), and a target is

* met       when every round meets it (the whole min-max is on the right side),
* missed    when every round misses it,
* undecided when the spread straddles the bound, when fewer than MIN_ROUNDS rounds were taken,
  or when the figure was not measured: the bench says which (`reason`) rather than declaring
  either.

The ceilings (bare Unicorn, no testbed code, the testbed's guest loops themselves):

* exits with a C hook: Unicorn's INSN_INVALID hook in C that only moves RIP past VMMCALL
  (`_fastexit.skip_hook`) - what an exit costs the emulator itself;
* exits with a C hook and a minimal Python handler (`_fastexit.FastExit`, the handler writes
  RAX and RIP back): the ceiling of any exit whose decisions are Python, as KVM's are here;
* exits with a raw ctypes callback (RIP read and written through argtype-free entry points):
  the ceiling of the ctypes fallback used when the C extension is not built;
  all three run HYPERCALL_BODY, whose KVM_HYPERCALL calls a stub holding what the runtime's
  rt_kvm_hypercall holds after boot on an AMD vCPU (VMMCALL; RET) in the loop's 4 KiB page, as
  the testbed's guest has it: the same instructions and translation blocks per iteration;
* a compute loop with no hooks; a TLB-miss-heavy loop (a CR3 reload, then 4096 distinct
  pages, every round) under QEMU's own 4-level page walker, with the testbed guest's page-table
  shape: the code mapped by 4 KiB pages, the data (at the testbed's GUEST_FREE_GPA) by 2 MiB
  pages, CR0.PG set.

The testbed's figures: hypercall round trips through the kvm layer (C path and the ctypes
fallback), KVM_HC_MAP_GPA_RANGE user exits through the VMM, the compute loop (plain and SEV),
a loop touching 256 pages (plain and SEV), the TLB-miss-heavy loop, and a repeated
empty-guest scenario through the public API (`testbed.Vm` + load + run_to_ucall, absolute
milliseconds per scenario after a warm-up of the same figure), booted each time and, where
`Vm.load` takes `reuse=True`, restored from the process's boot snapshot.

Large guests, per VM type (default, sev, sev-snp): the same empty-guest scenario with 64 GiB
and with 64 MiB of guest memory, paired pass by pass (boot_64g_vs_64m: target <= 2.0), and the
growth of this process's resident set while a 64 GiB guest that touched pages at the top of its
memory is open, beyond the pages resident in its backings (/proc/self/smaps): target <= 100 MiB
(resident memory <= touched memory + 100 MiB).

Confidential-VM exit paths, figures only (no targets), measured side by side in one group so
the TDX and SEV-SNP figures come from the same rounds: KVM hypercall round trips through a TD's
TDCALL TDG.VP.VMCALL (R10 = nr, answered in KVM: -KVM_ENOSYS) and through SNP's #VC + GHCB
VMGEXIT; and private<->shared conversion user exits (KVM_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE,
one 4 KiB page each, alternating direction) from a raw TDVMCALL MapGPA and from a raw GHCB Page
State Change request (the runtime's rt_snp_psc, no PVALIDATE), with their per-round ratios.
Absolute rates (hypercalls_per_s, map_gpa_exits_per_s) are figures, never targets: a target is
a ratio to a ceiling measured in the same rounds, or a duration the issue states absolutely.

The groups with a ratio target (exits, compute, page touching, TLB, large-guest boots) take
PASSES short passes per round, alternating the order pass by pass; a figure's round is the
median of its passes, and a ratio's the median of its passes' ratios: this machine's speed
changes over tens to hundreds of milliseconds, so a figure and its ceiling must be measured
within tens of milliseconds of each other (a take clears the 20 ms timer floor) to be paired
at all. Their testbed figures
are slices of a VM booted once (LoopVm: the loop body LOOPS times between two ucalls; the boot,
the first translation and the first touch of every page stay outside every slice). The other
figures' loop rate comes from two runs of the same guest with different iteration counts, so
boot and assembly cancel: rate = (n2 - n1) / (t2 - t1). Every measured duration clears the
timer floor (measure()): below it the rounds are doubled, and a figure that never clears it is
a BenchError, never a number.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import statistics
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from testbed.errors import TestbedError, UsageError
from testbed.hw.exits import Vendor
from testbed.machine import Machine, VmOptions, build_program
from testbed.textout import plain_console, plain_table, styled

HYPERCALL_BODY = """
    mov r12, LOOPS
bench_loop:
    mov rax, 0x999
    KVM_HYPERCALL
    dec r12
    jnz bench_loop
"""
HYPERCALL_LOOP = "guest_main:\n" + HYPERCALL_BODY + "    ret\n"

#: One KVM_HC_MAP_GPA_RANGE user exit per iteration, one page, alternating private and
#: shared (an even LOOPS leaves the page as it found it).
MAP_GPA_BODY = """
    mov r12, LOOPS
bench_loop:
    mov rax, KVM_HC_MAP_GPA_RANGE
    mov rbx, GUEST_FREE_GPA
    mov rcx, 1
    mov rdx, r12
    and rdx, 1
    shl rdx, 4
    KVM_HYPERCALL
    dec r12
    jnz bench_loop
"""
MAP_GPA_LOOP = "guest_main:\n" + MAP_GPA_BODY + "    ret\n"

COMPUTE_BODY = """
    mov rcx, LOOPS
compute_loop:
    add rax, rcx
    xor rbx, rax
    dec rcx
    jnz compute_loop
"""
COMPUTE_INSNS_PER_LOOP = 4

PAGES_BODY = """
.ifndef PAGES
.equ PAGES, 256
.endif
    mov r12, LOOPS
bench_round:
    mov rdi, GUEST_FREE_GPA
    mov rcx, PAGES
bench_touch:
    add qword ptr [rdi], 1
    add rdi, 4096
    dec rcx
    jnz bench_touch
    dec r12
    jnz bench_round
"""
#: The TLB-miss-heavy loop: every round reloads CR3 (a full TLB flush) and then touches
#: TLB_PAGES distinct pages, so every access of every round is a TLB miss whatever size QEMU's
#: TLB has grown to (it resizes at flushes), on the testbed and on bare Unicorn alike.
TLB_BODY = """
    mov r12, LOOPS
tlb_round:
    mov rax, cr3
    mov cr3, rax
    mov rdi, GUEST_FREE_GPA
    mov rcx, PAGES
tlb_touch:
    add qword ptr [rdi], 1
    add rdi, 4096
    dec rcx
    jnz tlb_touch
    dec r12
    jnz tlb_round
"""
TLB_PAGES = 4096

EMPTY_GUEST = "guest_main:\n    ret\n"

#: A TD's MapGPA loop: one raw TDVMCALL<MapGPA> (R10 = 0, R11 = TDVMCALL_MAP_GPA, R12 = GPA with
#: the shared bit for shared, R13 = size) per iteration, one 4 KiB page, alternating shared and
#: private; each is one KVM_EXIT_HYPERCALL (kvm/vmx/tdx.c tdx_map_gpa). The counter lives in RBP,
#: which TDVMCALL does not expose (RCX's bitmap 0xFFCC); the status must be SUCCESS.
TDX_MAP_GPA_LOOP = """
guest_main:
    push rbp
    mov rbp, LOOPS
bench_loop:
    xor r10d, r10d
    mov r11, TDVMCALL_MAP_GPA
    mov r12, RT_TDX_SHARED_MASK
    mov r12, qword ptr [r12]
    test rbp, 1
    jnz bench_shared
    xor r12d, r12d
bench_shared:
    mov rax, GUEST_FREE_GPA
    or r12, rax
    mov r13, 0x1000
    TDVMCALL
    GUEST_ASSERT_EQ r10, 0
    dec rbp
    jnz bench_loop
    pop rbp
    ret
"""

#: SEV-SNP's counterpart: one GHCB Page State Change request of one 4 KiB page per iteration
#: (the runtime's rt_snp_psc: rdi = gpa, rsi = npages, rdx = 1 private / 2 shared), alternating,
#: without PVALIDATE; each is one KVM_EXIT_HYPERCALL (svm/sev.c snp_begin_psc).
SNP_PSC_LOOP = """
guest_main:
    mov r12, LOOPS
    mov r13, 2
bench_loop:
    mov rdi, GUEST_FREE_GPA
    mov rsi, 1
    mov rdx, r13
    call rt_snp_psc
    GUEST_ASSERT_EQ rax, 0
    xor r13, 3
    dec r12
    jnz bench_loop
    ret
"""

#: A target is judged from at least this many rounds; fewer is "undecided".
MIN_ROUNDS = 5
#: Short passes per round of a group with a ratio target (interleave).
PASSES = 5


def _run(text: str, loops: int, defines: dict[str, int | str] | None = None, **opts: Any) -> tuple[float, int]:
    """(seconds, TLB fills) of one run of a benchmark guest."""
    options = VmOptions(defines={"LOOPS": loops, **(defines or {})}, timeout=600.0, record_exits=False, **opts)
    program = build_program("<bench>", options, text=text)
    with Machine(program, options) as machine:
        t0 = time.perf_counter()
        report = machine.run()
        elapsed = time.perf_counter() - t0
        tlb_fills = machine.cpu.tlb_fills
    if report.outcome != "done":
        raise BenchError(f"benchmark guest failed: {report.outcome} {report.detail}")
    return elapsed, tlb_fills


def _run_time(text: str, loops: int, **opts: Any) -> float:
    return _run(text, loops, **opts)[0]


# ------------------------------------------------------------------ the timer floor
#: A figure rests on a measured duration of at least this many ticks of the timer...
FLOOR_TICKS = 1000
#: ...and at least this long (a tick of perf_counter is 1 ns on Linux; scheduling noise is not).
MIN_MEASURED_S = 0.020
#: Rounds are doubled up to this factor before a figure is given up as unmeasurable.
MAX_SCALE = 1 << 16


class BenchError(TestbedError):
    """A figure that could not be measured above the timer's floor: it is not reported."""


def timer_floor() -> float:
    """The shortest duration a figure may rest on: FLOOR_TICKS ticks of time.perf_counter's
    resolution (time.get_clock_info), and at least MIN_MEASURED_S."""
    return max(MIN_MEASURED_S, FLOOR_TICKS * time.get_clock_info("perf_counter").resolution)


def measure(figure: str, once: Callable[[int], tuple[int, float]], *, floor: float | None = None,
            max_scale: int = MAX_SCALE) -> tuple[int, float]:
    """(units, seconds) from `once(scale)`, which measures `scale` times the base rounds.

    A duration below the floor (or a difference of two runs that came out negative or zero)
    says nothing about speed — `bench --quick` once reported 9e12 rounds/s and a met target
    from one — so the rounds are doubled and the figure measured again; past `max_scale` it
    is a BenchError naming the figure, never a number."""
    limit = timer_floor() if floor is None else floor
    scale = 1
    while True:
        units, seconds = once(scale)
        if units > 0 and seconds >= limit:
            return units, seconds
        if scale >= max_scale:
            raise BenchError(f"bench figure {figure}: {units} rounds took {seconds:.3g} s, under the timer floor "
                             f"of {limit:g} s even at {scale}x the base rounds; not reported")
        scale *= 2


def rate_once(text: str, n1: int, n2: int, figure: str = "rate", **opts: Any) -> float:
    """Iterations per second of the guest's loop, boot excluded: the difference of a run of n2
    and one of n1 iterations, both scaled until the difference clears the floor."""

    def once(scale: int) -> tuple[int, float]:
        a, b = n1 * scale, n2 * scale
        t1 = _run_time(text, a, **opts)
        t2 = _run_time(text, b, **opts)
        return b - a, t2 - t1

    units, seconds = measure(figure, once)
    return units / seconds


def rate(text: str, n1: int, n2: int, repeats: int, figure: str = "rate", **opts: Any) -> float:
    """The median of `repeats` rate_once() measurements."""
    return statistics.median(rate_once(text, n1, n2, figure, **opts) for _ in range(repeats))


class LoopVm:
    """A booted VM running `body` in slices: LOOPS = `loops` iterations, then a ucall, over
    and over. One slice is `loops` units of the figure, measured on a VM that is already booted,
    has translated the loop and has touched its pages, so nothing but the loop (and one ucall
    per slice: choose `loops` so that it is under ~1 %) is timed. Short slices of a figure can
    then alternate with short slices of its ceiling (interleave's passes)."""

    def __init__(self, body: str, loops: int, figure: str, defines: dict[str, int | str] | None = None,
                 **opts: Any) -> None:
        from testbed.api import Vm

        self.loops = loops
        self.figure = figure
        text = "guest_main:\nbench_slice:\n" + body + "    GUEST_SYNC 0\n    jmp bench_slice\n"
        self.vm = Vm(timeout=600.0, record_exits=False, **opts)
        try:
            self._vcpu = self.vm.load(text=text, defines={"LOOPS": loops, **(defines or {})})
            self._slice()  # the first slice: translation and the first touch of every page
        except BaseException:
            self.vm.close()
            raise

    def _slice(self) -> None:
        ucall = self._vcpu.run_to_ucall()
        if ucall.cmd != "sync":
            raise BenchError(f"bench figure {self.figure}: the loop ended with {ucall.cmd}, not a slice's ucall")

    def rate(self) -> float:
        """Units per second over enough slices to clear the timer floor (measure())."""

        def once(scale: int) -> tuple[int, float]:
            t0 = time.perf_counter()
            for _ in range(scale):
                self._slice()
            return scale * self.loops, time.perf_counter() - t0

        units, seconds = measure(self.figure, once)
        return units / seconds

    def close(self) -> None:
        self.vm.close()


def sliced(resources: contextlib.ExitStack, body: str, loops: int, figure: str, **opts: Any) -> Callable[[], float]:
    """A take() for `figure`: LoopVm.rate() of one VM, booted at the first take and closed
    with `resources`."""
    source: list[LoopVm] = []

    def take() -> float:
        if not source:
            source.append(resources.enter_context(contextlib.closing(LoopVm(body, loops, figure, **opts))))
        return source[0].rate()

    return take


# ------------------------------------------------------------------ bare Unicorn ceilings
def _bare(body: str, defines: dict[str, int | str], size: int = 0x10000) -> tuple[Any, int]:
    """A bare 64-bit Unicorn with `body` (+ HLT) at 0x1000 in `size` bytes of flat memory:
    (engine, end address)."""
    import unicorn
    from unicorn import x86_const

    from testbed.asm import assemble_source

    program = assemble_source(body + "    hlt\n", filename="<bare>", base=0x1000, defines=defines)
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, size)
    uc.mem_write(0x1000, program.code)
    uc.reg_write(x86_const.UC_X86_REG_RSP, 0x8000)
    return uc, 0x1000 + len(program.code)


def _timed(uc: Any, end: int) -> float:
    t0 = time.perf_counter()
    uc.emu_start(0x1000, end)
    return time.perf_counter() - t0


#: The exit ceilings' guest: HYPERCALL_BODY itself (R12 counts), its KVM_HYPERCALL a call to a
#: stub holding what the runtime's rt_kvm_hypercall holds after boot on an AMD vCPU (the
#: prelude's `call rt_kvm_hypercall`; the runtime patches its VMCALL to VMMCALL), placed, as in
#: the testbed's guest, in the loop's 4 KiB page: per iteration the same six instructions and
#: four translation blocks (mov, call | vmmcall | ret | dec, jnz) on both sides.
BARE_EXIT_LOOP = """
.macro KVM_HYPERCALL
    call bare_kvm_hypercall
.endm
""" + HYPERCALL_BODY + """
    jmp bare_done
bare_kvm_hypercall:
    vmmcall
    ret
bare_done:
"""
VMMCALL_LENGTH = 3
ExitCeiling = Literal["c_hook", "c_hook_py", "ctypes"]


def fastexit_available() -> bool:
    """Whether the C extension with the benchmark's C-only hook is built."""
    try:
        from testbed.hw import _fastexit
    except ImportError:
        return False
    return hasattr(_fastexit, "skip_hook")


def bare_exit_engine(kind: ExitCeiling, loops: int) -> tuple[Any, int, list[Any]]:
    """Bare Unicorn running BARE_EXIT_LOOP (`loops` iterations) with the exit ceiling's
    INSN_INVALID hook installed: (engine, end address, what must outlive the run). The hook only
    moves RIP past VMMCALL: in C (`c_hook`: no Python runs during emu_start), in C calling a
    minimal Python handler that writes RAX and RIP back in one batch (`c_hook_py`), or as a raw
    ctypes callback (`ctypes`)."""
    from unicorn import unicorn_const as ucc
    from unicorn import x86_const as ux
    from unicorn.unicorn_py3 import unicorn as ucpy

    from testbed.hw.unicorn_binding import entry_address

    rip_id = ux.UC_X86_REG_RIP
    uc, end = _bare(BARE_EXIT_LOOP, {"LOOPS": loops})
    keep: list[Any] = []
    if kind == "c_hook":
        from testbed.hw import _fastexit

        keep.append(_fastexit.skip_hook(uc._uch.value, entry_address("uc_hook_add"),
                                        entry_address("uc_reg_read_batch"), entry_address("uc_reg_write_batch"),
                                        rip_id, VMMCALL_LENGTH))
    elif kind == "c_hook_py":
        from testbed.hw import _fastexit

        def handler(rip: int, rax: int, _cs: int, _rbx: int, _rcx: int, _rdx: int, _rsi: int,
                    _rflags: int) -> bool:
            fast.write2(rax, rip + VMMCALL_LENGTH)
            return True

        fast = _fastexit.FastExit(
            uc._uch.value, entry_address("uc_hook_add"), entry_address("uc_reg_read_batch"),
            entry_address("uc_reg_write_batch"),
            [rip_id, ux.UC_X86_REG_RAX, ux.UC_X86_REG_CS, ux.UC_X86_REG_RBX, ux.UC_X86_REG_RCX,
             ux.UC_X86_REG_RDX, ux.UC_X86_REG_RSI, ux.UC_X86_REG_RFLAGS], 2,
            [ux.UC_X86_REG_RAX, rip_id, ux.UC_X86_REG_RFLAGS], handler)
        keep.append(fast)
    else:
        lib: Any = ctypes.CDLL(ucpy.uclib._name)  # its own handle: the ctypes ceiling sets prototypes on it
        handle = ctypes.c_void_p(uc._uch.value)
        read, write = lib.uc_reg_read, lib.uc_reg_write
        read.argtypes = write.argtypes = None
        read.restype = write.restype = ctypes.c_int
        value = ctypes.c_uint64()
        ref = ctypes.byref(value)

        def skip(_h: Any, _ud: Any) -> bool:
            read(handle, rip_id, ref)
            value.value += VMMCALL_LENGTH
            write(handle, rip_id, ref)
            return True

        callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p)(skip)
        keep.append(callback)
        hook = ctypes.c_size_t()
        status = lib.uc_hook_add(handle, ctypes.byref(hook), ctypes.c_int(ucc.UC_HOOK_INSN_INVALID),
                                 ctypes.cast(callback, ctypes.c_void_p), None, ctypes.c_uint64(1),
                                 ctypes.c_uint64(0))
        if status != 0:
            raise BenchError(f"bench ceiling exits ({kind}): uc_hook_add failed with {status}")
    return uc, end, keep


def bare_exit_rate(kind: ExitCeiling, loops: int) -> float:
    """Exits per second of bare Unicorn running BARE_EXIT_LOOP with the `kind` ceiling's hook
    (bare_exit_engine), above the timer floor."""
    from unicorn import x86_const as ux

    def once(scale: int) -> tuple[int, float]:
        n = loops * scale
        uc, end, keep = bare_exit_engine(kind, n)
        seconds = _timed(uc, end)
        if uc.reg_read(ux.UC_X86_REG_R12) != 0:
            raise BenchError(f"bench ceiling exits ({kind}): the loop did not complete")
        for item in keep:
            if hasattr(item, "close"):
                item.close()
        return n, seconds

    units, seconds = measure(f"ceiling_exits_{kind}", once)
    return units / seconds


def bare_compute_rate(loops: int) -> float:
    """Loop iterations per second of COMPUTE_BODY on bare Unicorn (flat memory, no hooks)."""

    def once(scale: int) -> tuple[int, float]:
        n = loops * scale
        uc, end = _bare(COMPUTE_BODY, {"LOOPS": n})
        return n, _timed(uc, end)

    units, seconds = measure("ceiling_compute", once)
    return units / seconds


#: Where the bare TLB loop's pages start - the testbed's GUEST_FREE_GPA for its default 64 MiB
#: guest (Layout(64 MiB).free_gpa), 2 MiB-aligned - and the flat memory it has.
BARE_TLB_DATA = 0x600000
BARE_TLB_SIZE = 32 << 20
_BARE_PML4 = 0x10000
#: Page-table entry bits: present | writable | user, as the runtime writes them; PS: a 2 MiB page.
_PTE_FLAGS = 0x7
_PTE_PS = 0x80


def _bare_paged(rounds: int) -> tuple[Any, int]:
    """Bare Unicorn in long mode with paging on (CR0.PG, CR4.PAE, EFER.LME/LMA) running the
    TLB-miss-heavy loop over a 4-level identity map shaped like the testbed guest's: the first
    2 MiB (code, stack, tables) by 4 KiB pages, the rest - the loop's data - by 2 MiB pages (PS
    set in the PD entry; rt_pte_lookup reports level 2 there in the testbed's guest). QEMU's own
    walker fills the TLB."""
    from unicorn import x86_const as ux

    uc, end = _bare(TLB_BODY, {"LOOPS": rounds, "PAGES": TLB_PAGES, "GUEST_FREE_GPA": BARE_TLB_DATA},
                    size=BARE_TLB_SIZE)
    pdpt, pd, pt = _BARE_PML4 + 0x1000, _BARE_PML4 + 0x2000, _BARE_PML4 + 0x3000
    large = BARE_TLB_SIZE >> 21
    uc.mem_write(_BARE_PML4, struct.pack("<Q", pdpt | _PTE_FLAGS))
    uc.mem_write(pdpt, struct.pack("<Q", pd | _PTE_FLAGS))
    uc.mem_write(pd, struct.pack(f"<{large}Q", pt | _PTE_FLAGS,
                                 *((i << 21) | _PTE_FLAGS | _PTE_PS for i in range(1, large))))
    uc.mem_write(pt, struct.pack("<512Q", *((i << 12) | _PTE_FLAGS for i in range(512))))
    uc.reg_write(ux.UC_X86_REG_CR3, _BARE_PML4)
    uc.reg_write(ux.UC_X86_REG_CR4, 0x20)  # PAE
    uc.msr_write(0xC0000080, 0x500)  # EFER: LME | LMA
    uc.reg_write(ux.UC_X86_REG_CR0, 0x80000011)  # PG | ET | PE
    return uc, end


def bare_tlb_rate(rounds: int) -> float:
    """Rounds per second of the TLB-miss-heavy loop on bare Unicorn (QEMU's page walker). The
    timed run is the engine's second: the first touches the host pages and translates the code,
    as the testbed's difference of two runs leaves those out too."""

    def once(scale: int) -> tuple[int, float]:
        n = rounds * scale
        uc, end = _bare_paged(n)
        _timed(uc, end)
        return n, _timed(uc, end)

    units, seconds = measure("ceiling_tlb", once)
    return units / seconds


# ------------------------------------------------------------------ testbed figures
@contextlib.contextmanager
def _no_fastexit() -> Iterator[None]:
    """vCPUs created inside take the ctypes exit path (testbed/hw/unicorn_binding.py reads
    TESTBED_NO_FASTEXIT when it installs its hooks)."""
    old = os.environ.get("TESTBED_NO_FASTEXIT")
    os.environ["TESTBED_NO_FASTEXIT"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TESTBED_NO_FASTEXIT"]
        else:
            os.environ["TESTBED_NO_FASTEXIT"] = old


def hypercall_rate_ctypes(n1: int, n2: int) -> float:
    """Hypercall round trips per second with the exit hook through ctypes instead of the C path."""
    with _no_fastexit():
        return rate_once(HYPERCALL_LOOP, n1, n2, "hypercalls_ctypes_per_s")


def reuse_available() -> bool:
    """Whether `Vm.load` takes `reuse=` (a fresh VM restored from the process's boot snapshot)."""
    import inspect

    from testbed.api import Vm

    return "reuse" in inspect.signature(Vm.load).parameters


def scenario_seconds(vm_type: str, figure: str, repeats: int = 1, reuse: bool = False,
                     memory: int | None = None) -> float:
    """Seconds per empty-guest scenario through the public API: `testbed.Vm(vm_type=...)`,
    `load` (assembly is cached in the process after the first; with `reuse`, the machine comes
    from the process's pool restored to its boot snapshot), `run_to_ucall`, close. `memory`:
    the guest's size (default VmOptions')."""
    from testbed.api import Vm

    extra: dict[str, Any] = {"reuse": True} if reuse else {}
    size: dict[str, Any] = {} if memory is None else {"memory": memory}

    def once(scale: int) -> tuple[int, float]:
        n = repeats * scale
        t0 = time.perf_counter()
        for _ in range(n):
            with Vm(vm_type=vm_type, **size) as vm:
                ucall = vm.load(text=EMPTY_GUEST, **extra).run_to_ucall()
            if ucall.cmd != "done":
                raise BenchError(f"bench figure {figure}: the empty guest ended with {ucall.cmd}, not done")
        return n, time.perf_counter() - t0

    units, seconds = measure(figure, once)
    return seconds / units


# ------------------------------------------------------------------ large guests
#: The large guest of the issue's targets, and the small one its boot is compared to.
LARGE_GUEST = 64 << 30
SMALL_GUEST = 64 << 20
MIB = 1 << 20
#: Resident memory <= touched memory + this (the issue's 100 MiB).
RSS_SLACK_MIB = 100.0

#: The resident-memory figure's guest: it touches four pages at the top of its memory (accepted
#: first: a no-op but on SNP), so what it touched is spread over the whole 64 GiB.
TOUCH_TOP_GUEST = """
guest_main:
    mov rdi, GUEST_MEM_SIZE - 0x4000
    mov rsi, 4
    call accept_memory
    GUEST_ASSERT_EQ rax, 0
    mov rdi, GUEST_MEM_SIZE - 0x4000
    mov rcx, 4
1:
    mov qword ptr [rdi], rdi
    add rdi, 0x1000
    dec rcx
    jnz 1b
    ret
"""


def process_rss() -> int:
    """This process's resident set in bytes (VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError("bench: no VmRSS in /proc/self/status")


def resident_in(ranges: Sequence[tuple[int, int]]) -> int:
    """Bytes resident in the host address ranges `ranges` ((start, end) pairs, page-aligned):
    mincore() page by page (hw/memimage.resident_pages), exact to the range - /proc/self/smaps
    counts whole mappings, and the kernel merges a backing with a neighbouring anonymous mapping.
    A page read but never written maps the shared zero page, which mincore reports too: it
    counts as touched (VmRSS does not count it)."""
    from testbed.hw.memimage import resident_pages

    bit0 = bytes(i & 1 for i in range(256))  # mincore defines only bit 0 of each byte
    return sum(resident_pages(start, end - start).translate(bit0).count(1) for start, end in ranges) * 4096


def _release_free_heap() -> None:
    """Give freed memory back to the kernel (gc, then glibc's malloc_trim), so that the next
    growth of the resident set counts what is allocated again instead of reusing it."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def rss_over_touched_mib(vm_type: str, figure: str, memory: int = LARGE_GUEST) -> float:
    """MiB by which this process's resident set grows while a `memory`-byte guest that booted
    and ran TOUCH_TOP_GUEST is open, beyond the bytes resident in its backings (the guest memory
    it touched: resident_in over the backings' ranges). The issue's target: <= RSS_SLACK_MIB."""
    from testbed.api import Vm
    from testbed.errors import GuestMemoryError

    _release_free_heap()
    before = process_rss()
    with Vm(vm_type=vm_type, memory=memory) as vm:
        ucall = vm.load(text=TOUCH_TOP_GUEST).run_to_ucall()
        grown = process_rss() - before
        ram = vm.machine.memory
        backings = [ram.dram_address()]
        with contextlib.suppress(GuestMemoryError):  # a VM with one backing
            backings.append(ram.private_address())
        touched = resident_in([(address, address + ram.capacity) for address in backings])
    if ucall.cmd != "done":
        raise BenchError(f"bench figure {figure}: the guest ended with {ucall.cmd}, not done")
    return (grown - touched) / MIB


# ------------------------------------------------------------------ statistics and verdicts
@dataclass(frozen=True)
class Spread:
    """The median of a figure's rounds, their min and max, and how many there were."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        if not samples:
            raise ValueError("a spread needs at least one sample")
        if any(not math.isfinite(s) for s in samples):
            raise ValueError(f"a spread of non-finite samples: {list(samples)}")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.lo, "max": self.hi, "n": self.n}


Verdict = Literal["met", "missed", "undecided"]


def verdict(spread: Spread | None, op: Literal[">=", "<="], bound: float, min_rounds: int = MIN_ROUNDS) -> Verdict:
    """met when every round is on the target's side of `bound`, missed when every round is on
    the other side, undecided when the rounds straddle it, when there are fewer than
    `min_rounds` of them, or when the figure was not measured (None): undecided_reason says which."""
    if spread is None or spread.n < min_rounds:
        return "undecided"
    if op == ">=":
        if spread.lo >= bound:
            return "met"
        if spread.hi < bound:
            return "missed"
    else:
        if spread.hi <= bound:
            return "met"
        if spread.lo > bound:
            return "missed"
    return "undecided"


def undecided_reason(spread: Spread | None, op: Literal[">=", "<="], bound: float,
                     min_rounds: int = MIN_ROUNDS) -> str | None:
    """Why verdict() is undecided - the figure was not measured, too few rounds, or the spread
    straddles the bound - or None when it is met or missed."""
    if spread is None:
        return "not measured"
    if spread.n < min_rounds:
        return f"too few rounds: {spread.n} < {min_rounds}"
    if verdict(spread, op, bound, min_rounds) == "undecided":
        return f"the spread straddles the bound: {spread.lo:.4g} - {spread.hi:.4g} around {bound:g}"
    return None


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios of two figures measured next to each other in the same rounds."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired figures need the same rounds: {len(numerator)} vs {len(denominator)}")
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def pass_paired_ratios(numerator: Sequence[Sequence[float]], denominator: Sequence[Sequence[float]]) -> list[float]:
    """Per-round ratios of two figures measured next to each other pass by pass: each round's
    the median of its passes' ratios (each pass's two values were taken back to back)."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired figures need the same rounds: {len(numerator)} vs {len(denominator)}")
    return [statistics.median(paired_ratios(a, b)) for a, b in zip(numerator, denominator, strict=True)]


@dataclass(frozen=True)
class Measurement:
    """One figure: `take()` measures one round of it (above the timer floor)."""

    name: str
    unit: str
    take: Callable[[], float]


def interleave(rounds: int, groups: Sequence[Sequence[Measurement]],
               passes: Sequence[int] | None = None) -> dict[str, list[list[float]]]:
    """Every measurement `passes[i]` times per round for group i (once without `passes`): each
    figure's values by round, then by pass. Within a group - a ceiling and the figures compared
    to it - the order is as given on even passes and reversed on odd ones, so each figure's
    ceiling is measured right before it in one pass and right after it in the next; the groups
    follow each other in every round, so slow drift of the machine reaches all of them alike.
    Short passes pair a figure with its ceiling within tens of milliseconds (a take clears the
    timer floor, MIN_MEASURED_S): this machine's speed changes over tens to hundreds of
    milliseconds, which one long measurement of each side would see differently."""
    counts = list(passes) if passes is not None else [1] * len(groups)
    if len(counts) != len(groups) or min(counts, default=1) < 1:
        raise ValueError(f"passes {counts} do not fit {len(groups)} groups")
    samples: dict[str, list[list[float]]] = {m.name: [] for group in groups for m in group}
    for index in range(rounds):
        for group, count in zip(groups, counts, strict=True):
            for m in group:
                samples[m.name].append([])
            for p in range(count):
                for m in (group if (index * count + p) % 2 == 0 else list(reversed(group))):
                    samples[m.name][-1].append(m.take())
    return samples


def round_values(per_pass: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, list[float]]:
    """Each figure's value per round: the median of its passes."""
    return {name: [statistics.median(values) for values in rounds_] for name, rounds_ in per_pass.items()}


@dataclass(frozen=True)
class Ratio:
    """A figure as a ratio to the one it is paired with."""

    name: str
    numerator: str
    denominator: str


@dataclass(frozen=True)
class Target:
    """`figure op bound`, judged from the figure's rounds."""

    figure: str
    op: Literal[">=", "<="]
    bound: float
    label: str


@dataclass(frozen=True)
class Plan:
    groups: list[list[Measurement]]
    ratios: list[Ratio]
    targets: list[Target]
    #: passes per round of each group (interleave); empty: one each
    passes: list[int] = field(default_factory=list)
    #: what the measurements opened (the sliced figures' VMs): closed after the rounds
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    #: taken once each before the rounds, and not reported: assembly, imports, the reuse pool
    warmups: list[Measurement] = field(default_factory=list)


#: The large-guest VM types of the issue ("a 64 GiB guest boots and runs under default, sev and
#: sev-snp"), with the suffix of their figures' names.
LARGE_VM_TYPES = {"default": "", "sev": "_sev", "sev-snp": "_sev_snp"}


def _scenario(name: str, vm_type: str, **kwargs: Any) -> tuple[Measurement, Measurement]:
    """The empty-guest scenario `name` (ms per scenario, scenario_seconds) and its warm-up,
    a take of the same scenario named `name (warm-up)`."""
    return (Measurement(name, "ms", lambda: 1e3 * scenario_seconds(vm_type, name, **kwargs)),
            Measurement(f"{name} (warm-up)", "ms",
                        lambda: 1e3 * scenario_seconds(vm_type, f"{name} (warm-up)", **kwargs)))


def plan(quick: bool) -> Plan:
    """What `testbed bench` measures: the groups of paired measurements, the ratios and the targets.

    The groups with a ratio target run PASSES short passes per round: the ceilings on small
    loops, the testbed's figures as slices of a VM booted once (`sliced`, LoopVm), the 64 GiB
    boots next to the 64 MiB ones."""
    q = 10 if quick else 1
    hc1, hc2 = 500, 500 + 10_000 // q
    # the confidential exit paths cost ~10-30x a plain exit: shorter loops
    cc1, cc2 = 100, 100 + 4_000 // q
    sev = {"vm_type": "sev", "seed": 1}
    td: dict[str, Any] = {"vm_type": "tdx", "vendor": Vendor.INTEL}
    snp: dict[str, Any] = {"vm_type": "sev-snp", "seed": 1}
    resources = contextlib.ExitStack()
    passes = 3 if quick else PASSES
    exits: list[Measurement] = []
    if fastexit_available():
        exits += [Measurement("ceiling_exits_c_hook", "exits/s", lambda: bare_exit_rate("c_hook", 50_000)),
                  Measurement("ceiling_exits_c_hook_py", "exits/s", lambda: bare_exit_rate("c_hook_py", 25_000))]
    # Slices of ~5-20 ms each: the one ucall per slice is under 1 % of it.
    exits += [Measurement("hypercalls_per_s", "exits/s",
                          sliced(resources, HYPERCALL_BODY, 4_000, "hypercalls_per_s")),
              Measurement("map_gpa_exits_per_s", "exits/s",
                          sliced(resources, MAP_GPA_BODY, 1_000, "map_gpa_exits_per_s"))]
    scenarios = [_scenario("scenario_ms", "default"), _scenario("scenario_ms_sev_snp", "sev-snp")]
    reuse = reuse_available()
    reused = ([_scenario("scenario_ms_reuse", "default", reuse=True),
               _scenario("scenario_ms_sev_snp_reuse", "sev-snp", reuse=True)] if reuse else [])
    boots = {vm_type: [_scenario(f"boot_64m_ms{suffix}", vm_type, memory=SMALL_GUEST),
                       _scenario(f"boot_64g_ms{suffix}", vm_type, memory=LARGE_GUEST)]
             for vm_type, suffix in LARGE_VM_TYPES.items()}

    def rss(vm_type: str, name: str) -> Measurement:
        return Measurement(name, "MiB", lambda: rss_over_touched_mib(vm_type, name))

    rss_figures = [rss(vm_type, f"rss_64g_over_touched_mib{suffix}") for vm_type, suffix in LARGE_VM_TYPES.items()]
    groups = [
        exits,
        [Measurement("ceiling_compute", "loops/s", lambda: bare_compute_rate(2_000_000)),
         Measurement("compute_loops_per_s", "loops/s",
                     sliced(resources, COMPUTE_BODY, 1_000_000, "compute_loops_per_s")),
         Measurement("compute_loops_per_s_sev", "loops/s",
                     sliced(resources, COMPUTE_BODY, 1_000_000, "compute_loops_per_s_sev", **sev))],
        [Measurement("pages256_rounds_per_s", "rounds/s",
                     sliced(resources, PAGES_BODY, 5_000, "pages256_rounds_per_s")),
         Measurement("pages256_rounds_per_s_sev", "rounds/s",
                     sliced(resources, PAGES_BODY, 5_000, "pages256_rounds_per_s_sev", **sev))],
        [Measurement("ceiling_tlb", "rounds/s", lambda: bare_tlb_rate(8)),
         Measurement("tlb_heavy_rounds_per_s", "rounds/s",
                     sliced(resources, TLB_BODY, 8, "tlb_heavy_rounds_per_s", defines={"PAGES": TLB_PAGES}))],
        *([small[0], large[0]] for small, large in boots.values()),
        [Measurement("ceiling_exits_ctypes", "exits/s", lambda: bare_exit_rate("ctypes", 100_000 // q)),
         Measurement("hypercalls_ctypes_per_s", "exits/s", lambda: hypercall_rate_ctypes(hc1, hc2))],
        [Measurement("snp_ghcb_hypercalls_per_s", "exits/s",
                     lambda: rate_once(HYPERCALL_LOOP, cc1, cc2, "snp_ghcb_hypercalls_per_s", **snp)),
         Measurement("tdx_tdvmcall_hypercalls_per_s", "exits/s",
                     lambda: rate_once(HYPERCALL_LOOP, cc1, cc2, "tdx_tdvmcall_hypercalls_per_s", **td)),
         Measurement("snp_psc_exits_per_s", "exits/s",
                     lambda: rate_once(SNP_PSC_LOOP, cc1, cc2, "snp_psc_exits_per_s", **snp)),
         Measurement("tdx_map_gpa_exits_per_s", "exits/s",
                     lambda: rate_once(TDX_MAP_GPA_LOOP, cc1, cc2, "tdx_map_gpa_exits_per_s", **td))],
        [scenario for scenario, _ in scenarios],
        rss_figures,
    ]
    group_passes = [passes, passes, passes, passes, passes, passes, passes, 1, 1, 1, 1]
    if reused:
        groups.append([scenario for scenario, _ in reused])
        group_passes.append(1)
    warmups = [warmup for _, warmup in [*scenarios, *reused, *(pair for pairs in boots.values() for pair in pairs)]]
    warmups += [Measurement(f"{m.name} (warm-up)", m.unit, m.take) for m in rss_figures]
    ratios = [
        Ratio("hypercalls_vs_c_hook_py", "hypercalls_per_s", "ceiling_exits_c_hook_py"),
        Ratio("hypercalls_vs_c_hook", "hypercalls_per_s", "ceiling_exits_c_hook"),
        Ratio("map_gpa_vs_c_hook_py", "map_gpa_exits_per_s", "ceiling_exits_c_hook_py"),
        Ratio("hypercalls_ctypes_vs_ctypes", "hypercalls_ctypes_per_s", "ceiling_exits_ctypes"),
        Ratio("compute_ratio", "compute_loops_per_s", "ceiling_compute"),
        Ratio("compute_sev_vs_plain_ratio", "compute_loops_per_s_sev", "compute_loops_per_s"),
        Ratio("pages256_sev_ratio", "pages256_rounds_per_s_sev", "pages256_rounds_per_s"),
        Ratio("tlb_heavy_ratio", "tlb_heavy_rounds_per_s", "ceiling_tlb"),
        *(Ratio(f"boot_64g_vs_64m{suffix}", f"boot_64g_ms{suffix}", f"boot_64m_ms{suffix}")
          for suffix in LARGE_VM_TYPES.values()),
        Ratio("tdx_vs_snp_hypercalls_ratio", "tdx_tdvmcall_hypercalls_per_s", "snp_ghcb_hypercalls_per_s"),
        Ratio("tdx_map_gpa_vs_snp_psc_ratio", "tdx_map_gpa_exits_per_s", "snp_psc_exits_per_s"),
    ]
    targets = [
        Target("scenario_ms", "<=", 15.0, "repeated empty-guest scenario (default) <= 15 ms"),
        Target("scenario_ms_sev_snp", "<=", 50.0, "repeated empty-guest scenario (sev-snp) <= 50 ms"),
        Target("scenario_ms_reuse", "<=", 15.0, "repeated empty-guest scenario, load(reuse=True) (default) <= 15 ms"),
        Target("scenario_ms_sev_snp_reuse", "<=", 50.0,
               "repeated empty-guest scenario, load(reuse=True) (sev-snp) <= 50 ms"),
        *(Target(f"boot_64g_vs_64m{suffix}", "<=", 2.0,
                 f"boot of a 64 GiB guest ({vm_type}) <= 2.0x a 64 MiB one")
          for vm_type, suffix in LARGE_VM_TYPES.items()),
        *(Target(f"rss_64g_over_touched_mib{suffix}", "<=", RSS_SLACK_MIB,
                 f"64 GiB guest ({vm_type}): resident memory - touched <= {RSS_SLACK_MIB:.0f} MiB")
          for vm_type, suffix in LARGE_VM_TYPES.items()),
        Target("tlb_heavy_ratio", ">=", 0.10, "TLB-miss-heavy guest >= 0.10x bare Unicorn"),
        Target("hypercalls_vs_c_hook_py", ">=", 0.25, "hypercalls >= 0.25x C hook + minimal Python handler"),
        Target("compute_ratio", ">=", 0.70, "compute_ratio >= 0.70"),
        Target("pages256_sev_ratio", ">=", 0.50, "pages256_sev_ratio >= 0.50"),
        Target("compute_sev_vs_plain_ratio", ">=", 0.90, "compute_sev_vs_plain_ratio >= 0.90"),
    ]
    return Plan(groups, ratios, targets, group_passes, resources, warmups)


def evaluate(plan_: Plan, samples: Mapping[str, Sequence[Sequence[float]]], rounds: int, quick: bool) -> dict[str, Any]:
    """The results `--json` prints: every figure (measured and paired ratio) with its median,
    min, max, n, unit and its rounds (`per_round`), and every target with its verdict and, when
    undecided, the reason (not measured / too few rounds / the spread straddles the bound). A
    ratio whose ceiling was not measured (the C extension not built) is absent, and its target
    undecided. `samples` are interleave()'s: a figure's round is the median of its passes, a
    ratio's round the median of its passes' ratios."""
    units = {m.name: m.unit for group in plan_.groups for m in group}
    figures: dict[str, dict[str, Any]] = {}
    spreads: dict[str, Spread] = {}
    per_round: dict[str, list[float]] = {}
    for name, values in round_values(samples).items():
        per_round[name] = values
        spreads[name] = Spread.of(values)
        figures[name] = {"unit": units.get(name, ""), **spreads[name].as_dict(), "per_round": values}
    for ratio in plan_.ratios:
        if ratio.numerator in samples and ratio.denominator in samples:
            values = pass_paired_ratios(samples[ratio.numerator], samples[ratio.denominator])
            per_round[ratio.name] = values
            spreads[ratio.name] = Spread.of(values)
            figures[ratio.name] = {"unit": "x", "ratio_of": [ratio.numerator, ratio.denominator],
                                   **spreads[ratio.name].as_dict(), "per_round": values}
    targets: dict[str, dict[str, Any]] = {}
    for target in plan_.targets:
        spread = spreads.get(target.figure)
        entry: dict[str, Any] = {"figure": target.figure, "op": target.op, "bound": target.bound,
                                 "verdict": verdict(spread, target.op, target.bound)}
        if spread is not None:
            entry.update(spread.as_dict())
            entry["per_round"] = per_round[target.figure]
        reason = undecided_reason(spread, target.op, target.bound)
        if reason is not None:
            entry["reason"] = reason
        targets[target.label] = entry
    return {"rounds": rounds, "quick": quick, "figures": figures, "targets": targets}


def collect(quick: bool = False, rounds: int | None = None) -> dict[str, Any]:
    """Every figure of the benchmark, measured now in `rounds` interleaved rounds (7, or
    MIN_ROUNDS with --quick, whose loops are shorter), after the plan's warm-ups (one take of
    each scenario and resident-memory figure, under its own name)."""
    n = rounds if rounds is not None else (MIN_ROUNDS if quick else 7)
    p = plan(quick)
    with p.resources:
        for warmup in p.warmups:  # assembly, imports and the reuse pool, outside the rounds
            warmup.take()
        samples = interleave(n, p.groups, p.passes or None)
    return {**evaluate(p, samples, n, quick), "warm_ups": [w.name for w in p.warmups]}


# ------------------------------------------------------------------ output
def _value(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3f}x"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    return f"{value:,.0f}"


_VERDICT_STYLE = {"met": "green", "missed": "red", "undecided": "yellow"}


def run_bench(out: IO[str], quick: bool = False, as_json: bool = False,
              collect_fn: Callable[[bool, int | None], dict[str, Any]] | None = None,
              rounds: int | None = None) -> int:
    """Measure and print; the exit status is 0 (targets are reported, not enforced). `rounds`:
    interleaved rounds (at least MIN_ROUNDS: fewer could judge no target; UsageError). A figure
    that cannot be measured above the timer floor raises BenchError: nothing is printed."""
    if rounds is not None and rounds < MIN_ROUNDS:
        raise UsageError(f"bench --rounds {rounds}: at least {MIN_ROUNDS} (a target is judged from "
                         f"{MIN_ROUNDS} rounds or more)")
    results = (collect_fn or collect)(quick, rounds)
    if as_json:
        out.write(json.dumps(results) + "\n")
        return 0
    console = plain_console(out)
    title = f"testbed bench{' (quick)' if quick else ''}: {results['rounds']} interleaved rounds"
    table = plain_table(title, "figure", "median", "min - max", right=("median", "min - max"),
                        caption="rates per second; ratios per round, against the ceiling measured next to the figure")
    for name, fig in results["figures"].items():
        unit = str(fig["unit"])
        table.add_row(name, _value(fig["median"], unit), f"{_value(fig['min'], unit)} - {_value(fig['max'], unit)}")
    console.print(table)
    verdicts = plain_table("targets", "target", "median [min - max]", "verdict",
                           caption="met / missed only when every round agrees; otherwise undecided, and why")
    for label, entry in results["targets"].items():
        unit = str(results["figures"].get(entry["figure"], {}).get("unit", ""))
        shown = (f"{_value(entry['median'], unit)} [{_value(entry['min'], unit)} - {_value(entry['max'], unit)}]"
                 if "median" in entry else "-")
        word = styled(entry["verdict"], _VERDICT_STYLE[entry["verdict"]])
        if entry.get("reason"):
            word.append(f" ({entry['reason']})")
        verdicts.add_row(label, shown, word)
    console.print(verdicts)
    return 0
