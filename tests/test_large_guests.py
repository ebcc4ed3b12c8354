"""Large guests: a 64 GiB guest boots and runs, costing what it touches (issue 10, section 2).

The runtime maps memory with large pages (2 MiB, 1 GiB where CPUID offers them) and splits one
where a 4 KiB page needs its own C-bit, as Linux's direct map does for set_memory_decrypted()
(arch/x86/mm/pat/set_memory.c, split_large_page / try_preserve_large_page). On SNP it
validates only the memory below GUEST_ACCEPTED_END at boot and accepts the rest on demand with
accept_memory, as Linux's unaccepted-memory support does (drivers/firmware/efi/
unaccepted_memory.c accept_memory -> arch_accept_memory -> snp_accept_memory); touching memory
not yet accepted raises #VC 0x404 (APM vol. 2, 15.36.10). The guest backings are sparse
(MAP_NORESERVE, lazily zero-filled), so the host's resident memory follows what runs touch.
"""

from __future__ import annotations

import pytest

from testbed.layout import ACCEPT_UNIT, RT_PT_BASE, RT_PT_END, RT_REGION_END, Layout
from testbed.machine import Machine, VmOptions, build_program
from testbed.vmm.vmm import RunReport
from testbed.x86.addr import Gva

GIB = 1 << 30
BIG = 64 * GIB
VM_TYPES = ["default", "sev", "sev-snp"]
C_BIT = 1 << 51
PTE_FLAGS = 0x7
PS = 0x80


def rss() -> int:
    """This process's resident set in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def sync_args(report: RunReport) -> list[int]:
    """Every value of every GUEST_SYNC, in order."""
    return [v for u in report.ucalls if u["cmd"] == "sync" for v in u["args"]]


def run_text(text: str, vm_type: str, memory: int) -> tuple[Machine, RunReport]:
    options = VmOptions(vm_type=vm_type, memory=memory, seed=3, timeout=60)
    machine = Machine(build_program("<large>", options, text=text), options)
    return machine, machine.run()


# Touch four pages at the top of memory (accepted first: a no-op but on SNP), convert the third
# to shared and back, and check that its neighbours kept their data and the page works again.
TOP_SCENARIO = """
.equ TOP, GUEST_MEM_SIZE - 0x4000
.equ CONVERTED, GUEST_MEM_SIZE - 0x2000
guest_main:
    mov rdi, TOP
    mov rsi, 4
    call accept_memory
    GUEST_ASSERT_EQ rax, 0
    mov rdi, TOP
    mov rcx, 4
1:
    mov qword ptr [rdi], rdi
    add rdi, 0x1000
    dec rcx
    jnz 1b
    mov rdi, CONVERTED
    mov rsi, 1
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
    mov rdi, CONVERTED
    mov rax, 0x5151
    mov qword ptr [rdi], rax
    mov rbx, qword ptr [rdi]
    GUEST_ASSERT_EQ rbx, 0x5151
    call set_memory_private
    GUEST_ASSERT_EQ rax, 0
    mov qword ptr [rdi], rdi
    mov rcx, 4
    mov rdi, TOP
2:
    mov rax, qword ptr [rdi]
    GUEST_ASSERT_EQ rax, rdi
    add rdi, 0x1000
    dec rcx
    jnz 2b
    GUEST_SYNC 0x600d
    ret
"""


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_a_64_gib_guest_boots_and_runs_within_touched_memory_plus_100_mib(vm_type: str) -> None:
    """A 64 GiB guest boots, touches pages at the top of memory and converts one there to
    shared and back, and the host's resident memory grows by at most what the guest can have
    touched (the memory accepted at boot and the pages at the top) plus 100 MiB."""
    options = VmOptions(vm_type=vm_type, memory=BIG, seed=3, timeout=60)
    program = build_program("<large>", options, text=TOP_SCENARIO)
    before = rss()
    with Machine(program, options) as machine:
        report = machine.run()
        grown = rss() - before
    assert report.outcome == "done", report.detail
    assert report.syncs() == [0x600D]
    touched = Layout(BIG).accepted_end + 5 * 4096
    assert grown <= touched + (100 << 20), f"RSS grew by {grown >> 20} MiB"


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_boot_work_follows_what_the_guest_uses_not_its_size(vm_type: str) -> None:
    """An empty guest makes the same exits at 64 MiB and at 64 GiB: page tables with large
    pages and, on SNP, validation of a bounded working set (GUEST_ACCEPTED_END) only."""
    exits = []
    for memory in (64 << 20, BIG):
        machine, report = run_text("guest_main:\n    ret\n", vm_type, memory)
        with machine:
            assert report.outcome == "done", report.detail
            exits.append(dict(report.exit_counts))
    assert exits[0] == exits[1]


# Report the entry mapping each of the addresses at GPAS (level and value), after converting
# CONVERTED (NPAGES pages) to shared; then back to private and report CONVERTED's entry again.
# Data written before the conversion must survive on the neighbours.
SPLIT = """
.macro REPORT gpa
    mov rdi, \\gpa
    call rt_pte_lookup
    mov rax, qword ptr [rax]
    GUEST_SYNC rdx, rax
.endm
guest_main:
    mov rdi, CONVERTED - 0x1000
    mov qword ptr [rdi], 0x1111
    mov rdi, CONVERTED + NPAGES * 0x1000
    mov qword ptr [rdi], 0x2222
    mov rdi, CONVERTED
    mov rsi, NPAGES
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
    REPORT CONVERTED
    REPORT CONVERTED - 0x1000
    REPORT CONVERTED + NPAGES * 0x1000
    REPORT FAR
    mov rdi, CONVERTED - 0x1000
    mov rax, qword ptr [rdi]
    GUEST_ASSERT_EQ rax, 0x1111
    mov rdi, CONVERTED + NPAGES * 0x1000
    mov rax, qword ptr [rdi]
    GUEST_ASSERT_EQ rax, 0x2222
    mov rdi, CONVERTED
    mov rsi, NPAGES
    call set_memory_private
    GUEST_ASSERT_EQ rax, 0
    REPORT CONVERTED
    ret
"""


def run_split(converted: int, npages: int, far: int, vm_type: str = "sev") -> tuple[Machine, list[int]]:
    options = VmOptions(vm_type=vm_type, memory=2 * GIB, seed=3, timeout=60,
                        defines={"CONVERTED": converted, "NPAGES": npages, "FAR": far})
    machine = Machine(build_program("<split>", options, text=SPLIT), options)
    report = machine.run()
    assert report.outcome == "done", report.detail
    return machine, sync_args(report)


def test_converting_one_page_inside_a_1_gib_page_splits_it_and_keeps_the_neighbours() -> None:
    """Converting one 4 KiB page inside a 1 GiB page splits it down to 4 KiB PTEs (1 GiB -> 2 MiB
    -> 4 KiB, split_large_page): the page loses its C-bit, its neighbours keep theirs and their
    data, a 2 MiB page further on stays a private 2 MiB page, and converting back restores
    the C-bit (the C-bit is per PTE)."""
    page = GIB + 0x5000
    far = GIB + (4 << 20)
    machine, syncs = run_split(page, 1, far)
    with machine:
        converted, below, above, far_entry, back = (tuple(syncs[i:i + 2]) for i in range(0, 10, 2))
        assert converted == (1, page | PTE_FLAGS)
        assert below == (1, (page - 0x1000) | PTE_FLAGS | C_BIT)
        assert above == (1, (page + 0x1000) | PTE_FLAGS | C_BIT)
        assert far_entry == (2, far | PTE_FLAGS | PS | C_BIT)
        assert back == (1, page | PTE_FLAGS | C_BIT)
        # The CPU's view agrees: the neighbours translate to themselves, private.
        for gpa in (page - 0x1000, page + 0x1000, far):
            translation = machine.cpu.translate(Gva(gpa))
            assert (translation.gpa, translation.encrypted) == (gpa, True)


def test_converting_a_whole_2_mib_page_keeps_it_large() -> None:
    """A conversion that covers a 2 MiB page whole changes the large entry itself instead of
    splitting it (try_preserve_large_page); the pages around it keep their C-bit."""
    start = GIB + (2 << 20)
    machine, syncs = run_split(start, 512, GIB + (8 << 20))
    with machine:
        converted, below, above, _far, back = (tuple(syncs[i:i + 2]) for i in range(0, 10, 2))
        assert converted == (2, start | PTE_FLAGS | PS)
        assert below == (2, (start - (2 << 20)) | PTE_FLAGS | PS | C_BIT)
        assert above == (2, (start + (2 << 20)) | PTE_FLAGS | PS | C_BIT)
        assert back == (2, start | PTE_FLAGS | PS | C_BIT)


# Convert one page in each of COUNT consecutive 2 MiB pages of the second GiB; report how many
# succeeded before the first failure and what it returned, and the runtime's pool pointer.
EXHAUST = """
guest_main:
    mov rdi, 0x40000000
    xor ebx, ebx
1:
    mov rsi, 1
    call set_memory_shared
    test rax, rax
    jnz 2f
    inc rbx
    add rdi, 0x200000
    cmp rbx, COUNT
    jb 1b
2:
    mov rcx, RT_DATA
    mov rcx, qword ptr [rcx + 0x840]
    GUEST_SYNC rbx, rax, rcx
    ret
"""


def test_running_out_of_page_table_pages_fails_the_conversion_with_enomem() -> None:
    """Each 4 KiB conversion in a new 2 MiB page takes a page table from the runtime's pool;
    when it is empty set_memory_shared returns -ENOMEM and changes nothing (the host is not
    told: no range beyond the ones converted)."""
    layout = Layout(2 * GIB)
    pool = (RT_PT_END - RT_PT_BASE) >> 12
    boot = layout.boot_page_table_pages(sev=True)
    expected = pool - boot - 1  # the second GiB's PD, then one PT per 2 MiB page
    options = VmOptions(vm_type="sev", memory=2 * GIB, seed=3, timeout=60, defines={"COUNT": 1024})
    with Machine(build_program("<exhaust>", options, text=EXHAUST), options) as machine:
        report = machine.run()
    assert report.outcome == "done", report.detail
    done, error, pool_next = sync_args(report)
    assert (done, error, pool_next) == (expected, (-12) & (2**64 - 1), RT_PT_END)
    gfns = {gfn for gfn, npages in report.shared_ranges for gfn in range(gfn, gfn + npages)}
    assert (GIB + done * (2 << 20)) >> 12 not in gfns
    assert (GIB + (done - 1) * (2 << 20)) >> 12 in gfns


def test_boot_page_tables_are_a_handful_of_pages_at_64_gib() -> None:
    """After boot a 64 GiB SEV guest's page tables take 5 pages (PML4, PDPT with 1 GiB pages,
    the first GiB's PD and two PTs), the count Layout.boot_page_table_pages gives."""
    text = """
guest_main:
    mov rcx, RT_DATA
    mov rcx, qword ptr [rcx + 0x840]
    GUEST_SYNC rcx
    ret
"""
    machine, report = run_text(text, "sev", BIG)
    with machine:
        assert report.outcome == "done", report.detail
        assert Layout(BIG).boot_page_table_pages(sev=True) == 5
        assert report.syncs() == [RT_PT_BASE + 5 * 4096]


# SNP lazy acceptance: memory at UNACCEPTED (above GUEST_ACCEPTED_END) is touched with or
# without accept_memory first.
ACCEPT = """
.equ UNACCEPTED, GUEST_ACCEPTED_END + 0x3000
guest_main:
.if ACCEPT
    mov rdi, UNACCEPTED
    mov rsi, 1
    call accept_memory
    GUEST_SYNC rax
    call accept_memory                          # the unit is accepted: nothing to do
    GUEST_SYNC rax
.endif
    mov rdi, UNACCEPTED
    mov qword ptr [rdi], 0x77
    mov rax, qword ptr [rdi]
    GUEST_SYNC rax
    ret
"""


def run_accept(accept: int, text: str = ACCEPT, memory: int = 64 << 20) -> RunReport:
    options = VmOptions(vm_type="sev-snp", memory=memory, seed=3, timeout=60, defines={"ACCEPT": accept})
    with Machine(build_program("<accept>", options, text=text), options) as machine:
        return machine.run()


def test_touching_unaccepted_memory_on_snp_raises_vc_404() -> None:
    """Memory above GUEST_ACCEPTED_END is not validated at boot: a private access to it raises
    #VC 0x404 (PAGE_NOT_VALIDATED), which the runtime reports as an unhandled exception."""
    assert Layout(64 << 20).accepted_end == 8 << 20  # the page-table pool's end + one 2 MiB unit
    report = run_accept(0)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["error_code"]) == (29, 0x404)


def test_an_snp_boot_validates_one_unit_of_free_memory_and_the_page_tables_it_takes() -> None:
    """The SNP boot PVALIDATEs [RT_PT_END, GUEST_ACCEPTED_END) - the first ACCEPT_UNIT of free
    memory: 512 pages, one exit each - and each page-table page as the runtime takes it from
    the pool (the boot's 5), as Linux's allocator accepts what it hands out; the rest of the
    runtime's unit and of the pool, and everything above, stay unvalidated."""
    options = VmOptions(vm_type="sev-snp", memory=64 << 20, seed=3)
    with Machine(build_program("<empty>", options, text="guest_main:\n    ret\n"), options) as machine:
        report = machine.run()
        assert machine.cpu.rmp is not None
        validated = bytes(machine.cpu.rmp.validated)
    layout = Layout(64 << 20)
    end = layout.accepted_end
    tables = layout.boot_page_table_pages(sev=True, gbpages=False)
    assert report.outcome == "done", report.detail
    assert end == RT_PT_END + ACCEPT_UNIT and (end - RT_PT_END) >> 12 == 512 and tables == 5
    assert not any(validated[RT_REGION_END >> 12 : RT_PT_BASE >> 12])
    pool = validated[RT_PT_BASE >> 12 : RT_PT_END >> 12]
    assert pool == bytes([1]) * tables + bytes(len(pool) - tables)
    assert set(validated[RT_PT_END >> 12 : end >> 12]) == {1}
    assert not any(validated[end >> 12 :])


@pytest.mark.parametrize(("vm_type", "vendor"), [("sev-snp", "amd"), ("tdx", "intel")])
def test_a_page_table_taken_after_boot_is_accepted_as_it_is_taken(vm_type: str, vendor: str) -> None:
    """A conversion that splits a large page takes a page table from the pool: on SNP it is
    PVALIDATEd then (rt_accept_page) and the conversion works; on TDX it is accepted
    (TDG.MEM.PAGE.ACCEPT). The pool page after it stays unaccepted."""
    text = """
guest_main:
    mov rdi, GUEST_FREE_GPA + 0x3000   # inside the free unit accepted at boot, a 2 MiB page
    mov rsi, 1
    call set_memory_shared
    mov rcx, RT_DATA
    mov rcx, qword ptr [rcx + 0x840]
    GUEST_SYNC rax, rcx
    ret
"""
    # a TD has no GHCB to split for: one table fewer
    boot = Layout(64 << 20).boot_page_table_pages(sev=vm_type == "sev-snp", gbpages=False)
    split = RT_PT_BASE + boot * 4096  # the table the split takes: the pool's next page
    options = VmOptions(vm_type=vm_type, vendor=vendor, memory=64 << 20, seed=3)
    with Machine(build_program("<split>", options, text=text), options) as machine:
        machine.boot_to(machine.program.symbols["guest_main"])
        accepted = _accepted(machine, range(RT_PT_BASE >> 12, (split >> 12) + 2))
        assert accepted == [True] * boot + [False, False]  # the boot's tables only
        report = machine.run()
        accepted = _accepted(machine, range(RT_PT_BASE >> 12, (split >> 12) + 2))
    assert report.outcome == "done", report.detail
    assert sync_args(report) == [0, split + 4096]  # the pool's next page moved past it
    assert accepted == [True] * (boot + 1) + [False]


def _accepted(machine: Machine, gfns: range) -> list[bool]:
    """Whether each frame is validated (SNP's RMP) or accepted (the TDX module)."""
    if machine.cpu.rmp is not None:
        return [bool(machine.cpu.rmp.validated[gfn]) for gfn in gfns]
    tdx = machine.cpu._tdx
    assert tdx is not None
    return [tdx.is_accepted(gfn) for gfn in gfns]


def test_accept_memory_makes_unaccepted_memory_usable() -> None:
    """accept_memory(gpa, npages) validates the 2 MiB units the range touches (rax = 0), a
    second call finds them accepted (rax = 0, nothing validated twice), and the page works."""
    report = run_accept(1)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [0, 0, 0x77]


def test_accept_memory_refuses_a_page_validated_behind_its_back() -> None:
    """A page of an unaccepted unit the guest validated itself makes accept_memory fail
    (-EINVAL): PVALIDATE reports no update, which Linux's pvalidate_pages treats as fatal; a
    range beyond memory fails the same way."""
    text = """
.equ UNIT, GUEST_ACCEPTED_END + ACCEPT_UNIT
guest_main:
    mov rax, UNIT + 0x1000
    xor ecx, ecx
    mov edx, 1
    .byte 0xf2, 0x0f, 0x01, 0xff               # pvalidate
    mov rdi, UNIT
    mov rsi, 2
    call accept_memory
    GUEST_SYNC rax
    mov rdi, GUEST_MEM_SIZE - 0x1000
    mov rsi, 2
    call accept_memory
    GUEST_SYNC rax
    ret
"""
    report = run_accept(0, text)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [(-22) & (2**64 - 1)] * 2


@pytest.mark.parametrize(("vm_type", "vendor"), [("sev-snp", "amd"), ("tdx", "intel")])
def test_accept_memory_refuses_the_runtimes_page_table_memory(vm_type: str, vendor: str) -> None:
    """accept_memory fails (-EINVAL) for a range touching [RT_REGION_END, GUEST_FREE_GPA): the
    runtime's page-table pool, which it accepts page by page as it takes them and its bitmap
    does not mark; the launch-accepted runtime region below it and the free memory above
    succeed (rax = 0)."""
    text = """
guest_main:
    mov rdi, RT_STACKS_END + 0xc0000
    mov rsi, 1
    call accept_memory
    GUEST_SYNC rax
    mov rdi, GUEST_FREE_GPA - 0x1000
    mov rsi, 2
    call accept_memory
    GUEST_SYNC rax
    mov rdi, RT_STACKS_END - 0x1000
    mov rsi, 1
    call accept_memory
    GUEST_SYNC rax
    mov rdi, GUEST_FREE_GPA
    mov rsi, 1
    call accept_memory
    GUEST_SYNC rax
    ret
"""
    options = VmOptions(vm_type=vm_type, vendor=vendor, memory=16 << 20, seed=3)
    with Machine(build_program("<pool>", options, text=text), options) as machine:
        report = machine.run()
    assert report.outcome == "done", report.detail
    assert report.syncs() == [(-22) & (2**64 - 1)] * 2 + [0, 0]


def test_conversions_and_string_helpers_accept_what_they_touch() -> None:
    """set_memory_shared/private and guest_memset/guest_memcmp on unaccepted memory accept it
    first, so they work without an explicit accept_memory."""
    text = """
.equ A, GUEST_ACCEPTED_END + 3 * ACCEPT_UNIT
.equ B, GUEST_ACCEPTED_END + 5 * ACCEPT_UNIT - 0x800
guest_main:
    mov rdi, A
    mov rsi, 1
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
    call set_memory_private
    GUEST_ASSERT_EQ rax, 0
    mov rbx, qword ptr [rdi + 0x1000]          # its unit was accepted whole
    mov rdi, B                                 # straddles two unaccepted units
    mov rsi, 0x5a
    mov rdx, 0x1000
    call guest_memset
    mov rsi, rdi
    call guest_memcmp
    GUEST_SYNC rax
    mov rax, qword ptr [rdi + 0xff8]
    GUEST_SYNC rax
    ret
"""
    report = run_accept(0, text)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [0, 0x5A5A5A5A5A5A5A5A]
    assert ACCEPT_UNIT == 2 << 20
