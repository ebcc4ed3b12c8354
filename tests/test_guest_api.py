"""The guest API of guests/lib (prelude.s, runtime.s), end to end: GUEST_SYNC with up to six
values, GUEST_ASSERT and the GUEST_ASSERT_* relations (pass and fail, values in the report),
GUEST_FAIL's message with memory encrypted or not, the caller of a failing helper, the string
helpers, numeric local labels, and the assembly-time refusals. Guests are small (8 MiB) and
the passing checks are batched into few runs.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import testbed
from testbed.api import GuestExceptionError
from testbed.errors import AsmError
from testbed.machine import VmOptions, build_program, run_guest
from testbed.vmm.vmm import RunReport

MEMORY = 8 << 20
MASK = (1 << 64) - 1


def run(text: str, **options: Any) -> RunReport:
    return run_guest("api.s", VmOptions(memory=MEMORY, timeout=10.0, **options), text=text)


def assert_done(report: RunReport) -> None:
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"


def line_of(text: str, marker: str) -> int:
    return 1 + next(i for i, line in enumerate(text.splitlines()) if marker in line)


# ---------------------------------------------------------------------------------- GUEST_SYNC

SYNC_GUEST = """\
guest_main:
    mov rax, 5
    mov ecx, 0xffffffff
    mov rdi, 0x1111
    mov rsi, 0x2222
    GUEST_SYNC rax
    GUEST_SYNC rdi, rsi
    GUEST_SYNC 1, -1, LATER
    GUEST_SYNC rsi, rdi, ecx, 0x8000000000000000
    GUEST_SYNC 1, 2, 3, 4, 5
    GUEST_SYNC rax, rdi, rsi, cl, -KVM_ENOSYS, rsp
    GUEST_ASSERT_EQ rdi, 0x1111
    GUEST_ASSERT_EQ rsi, 0x2222
    GUEST_ASSERT_EQ rax, 5
    ret
.equ LATER, 0x80000000
"""


def test_guest_sync_carries_one_to_six_values() -> None:
    """GUEST_SYNC sends one to six values, registers (rdi and rsi included) and 64-bit
    immediates in any mix, in order, and leaves the registers it names as they were."""
    report = run(SYNC_GUEST)
    assert_done(report)
    rsp = 0x220000 - 8  # guest_main's rsp: KSTACK_TOP less the runtime's return address
    assert [u["args"] for u in report.ucalls if u["cmd"] == "sync"] == [
        [5],
        [0x1111, 0x2222],
        [1, MASK, 0x80000000],
        [0x2222, 0x1111, 0xFFFFFFFF, 1 << 63],
        [1, 2, 3, 4, 5],
        [5, 0x1111, 0x2222, 0xFF, -1000 & MASK, rsp],
    ]


# ---------------------------------------------------------------------------------- asserts

PASSING_ASSERTS = """\
guest_main:
    mov rax, 5
    mov rcx, -1
    GUEST_ASSERT rax
    GUEST_ASSERT rcx
    GUEST_ASSERT 1
    GUEST_ASSERT_EQ rax, 5
    GUEST_ASSERT_NE rax, 6
    GUEST_ASSERT_NE eax, 0xffffffff
    GUEST_ASSERT_LT rax, rcx
    GUEST_ASSERT_LE rax, 5
    GUEST_ASSERT_GT rcx, rax
    GUEST_ASSERT_GE rax, 5
    GUEST_ASSERT_SLT rcx, rax
    GUEST_ASSERT_SLE rax, 5
    GUEST_ASSERT_SGT rax, rcx
    GUEST_ASSERT_SGE rcx, -1
    GUEST_ASSERT_LT al, 0x100
    GUEST_SYNC rax, rcx
    ret
"""


def test_asserts_that_hold_change_nothing() -> None:
    """Every GUEST_ASSERT* that holds lets the guest run on with its registers unchanged;
    the _LT/_LE/_GT/_GE relations are unsigned (-1 is the largest), _SLT/... signed."""
    report = run(PASSING_ASSERTS)
    assert_done(report)
    assert report.syncs() == [5]
    assert report.ucalls[0]["args"] == [5, MASK]


# (the failing statement, the values the abort carries, the detail's text after "api.s:N: ")
FAILING = [
    ("GUEST_ASSERT rbx", [0], "rbx failed: 0x0"),
    ("GUEST_ASSERT 0", [0], "0 failed: 0x0"),
    ("GUEST_ASSERT_EQ rax, 6", [5, 6], "rax == 6 failed: 0x5 != 0x6"),
    ("GUEST_ASSERT_NE rax, 5", [5, 5], "rax != 5 failed: 0x5 == 0x5"),
    ("GUEST_ASSERT_LT rax, 5", [5, 5], "rax < 5 failed: 0x5 >= 0x5"),
    ("GUEST_ASSERT_LE rax, 4", [5, 4], "rax <= 4 failed: 0x5 > 0x4"),
    ("GUEST_ASSERT_GT rax, rcx", [5, MASK], "rax > rcx failed: 0x5 <= 0xffffffffffffffff"),
    ("GUEST_ASSERT_GE rax, 6", [5, 6], "rax >= 6 failed: 0x5 < 0x6"),
    ("GUEST_ASSERT_LT rcx, 1", [MASK, 1], "rcx < 1 failed: 0xffffffffffffffff >= 0x1"),
    ("GUEST_ASSERT_SLT rax, -1", [5, MASK], "rax < -1 (signed) failed: 0x5 >= -0x1"),
    ("GUEST_ASSERT_SLE rax, rcx", [5, MASK], "rax <= rcx (signed) failed: 0x5 > -0x1"),
    ("GUEST_ASSERT_SGT rcx, 0", [MASK, 0], "rcx > 0 (signed) failed: -0x1 <= 0x0"),
    ("GUEST_ASSERT_SGE rcx, 0", [MASK, 0], "rcx >= 0 (signed) failed: -0x1 < 0x0"),
]


@pytest.mark.parametrize(("statement", "values", "detail"), FAILING, ids=[s for s, _, _ in FAILING])
def test_failing_assert_reports_its_line_text_and_values(statement: str, values: list[int], detail: str) -> None:
    """A failing assert ends the run as guest_assert with its values and its file:line, and the
    detail reads like the selftests' REPORT_GUEST_ASSERT: the expression and both values."""
    report = run(f"guest_main:\n    mov rax, 5\n    mov rcx, -1\n    xor ebx, ebx\n    {statement}\n    ret\n")
    assert report.outcome == "guest_assert", f"{report.outcome}: {report.detail}"
    abort = report.ucalls[-1]
    assert abort["cmd"] == "abort"
    assert abort["args"] == values, [hex(v) for v in abort["args"]]
    assert (abort["file"], abort["line"]) == ("api.s", 5)
    assert report.detail == f"api.s:5: {detail}"


# ---------------------------------------------------------------------------------- GUEST_FAIL

FAIL_MESSAGE = 'left "quoted", 50% done'
FAIL_GUEST = """\
guest_main:
    GUEST_SYNC 1
    GUEST_FAIL "left \\"quoted\\", 50% done"
    GUEST_SYNC 2
    ret
"""


@pytest.mark.parametrize("vm_type", ["default", "sev-snp", "tdx"])
def test_guest_fail_message_reaches_the_host(vm_type: str) -> None:
    """GUEST_FAIL's message reaches the host with guest memory in the clear or encrypted (SNP,
    TDX): the guest sends only the site id; the text never enters guest memory."""
    program = build_program("api.s", VmOptions(memory=MEMORY), text=FAIL_GUEST)
    assert b"quoted" not in program.code
    report = run(FAIL_GUEST, vm_type=vm_type, vendor="intel" if vm_type == "tdx" else "amd")
    assert report.outcome == "guest_assert", f"{report.outcome}: {report.detail}"
    assert report.syncs() == [1]
    assert report.ucalls[-1] == {"cmd": "abort", "args": [], "file": "api.s", "line": 3, "message": FAIL_MESSAGE}
    assert report.detail == f"api.s:3: {FAIL_MESSAGE}"


# ---------------------------------------------------------------------------- helper callers

HELPER_GUEST = """\
guest_main:
    mov rdi, 1
    call check_one                     # passes
    call check_one_frameless           # passes
    mov rdi, 2
    call check_one                     # the failing call
    ret

check_one:
    GUEST_HELPER_ENTER
    push rbx
    GUEST_ASSERT_EQ rdi, 1             # the helper's assert
    pop rbx
    GUEST_HELPER_RET

check_one_frameless:
    GUEST_ASSERT_EQ rdi, 1
    ret
"""


def test_failing_assert_in_a_helper_names_its_caller() -> None:
    """An assert failing inside a GUEST_HELPER_ENTER routine reports its own file:line and the
    line of the call into the helper."""
    report = run(HELPER_GUEST)
    assert report.outcome == "guest_assert", f"{report.outcome}: {report.detail}"
    assert_line, call_line = line_of(HELPER_GUEST, "the helper's assert"), line_of(HELPER_GUEST, "the failing call")
    abort = report.ucalls[-1]
    assert (abort["line"], abort["args"]) == (assert_line, [2, 1])
    assert abort["caller"] == {"file": "api.s", "line": call_line}
    assert report.detail == (f"api.s:{assert_line}: rdi == 1 failed: 0x2 != 0x1 "
                             f"(in a helper called from api.s:{call_line})")


def test_assert_outside_a_helper_frame_names_no_caller() -> None:
    """Without a GUEST_HELPER_ENTER frame (a frameless routine, or guest_main itself with its
    own frame) an abort names no caller: the runtime enters guest_main with rbp = 0, and the
    host refuses a return address that is the runtime's call of guest_main."""
    frameless = HELPER_GUEST.replace("    call check_one                     # the failing call",
                                     "    call check_one_frameless")
    report = run(frameless)
    assert report.outcome == "guest_assert" and "caller" not in report.ucalls[-1], report.ucalls[-1]
    framed = "guest_main:\n    GUEST_HELPER_ENTER\n    GUEST_ASSERT_EQ rsp, 0\n    GUEST_HELPER_RET\n"
    report = run(framed)
    assert report.outcome == "guest_assert" and "caller" not in report.ucalls[-1], report.ucalls[-1]
    assert report.detail.startswith("api.s:3: rsp == 0 failed"), report.detail


# ------------------------------------------------------------------------ memset/memcpy/memcmp

STRING_GUEST = """\
.equ A, GUEST_FREE_GPA
.equ B, GUEST_FREE_GPA + 0x1000
guest_main:
    mov rdi, A
    mov rsi, 0x1ab                     # only the low byte is stored
    mov rdx, 100
    mov rcx, 0xc0ffee
    call guest_memset
    GUEST_ASSERT_EQ rax, A
    GUEST_ASSERT_EQ rdi, A             # arguments and rcx preserved
    GUEST_ASSERT_EQ rsi, 0x1ab
    GUEST_ASSERT_EQ rdx, 100
    GUEST_ASSERT_EQ rcx, 0xc0ffee
    mov rbx, A
    movzx eax, byte ptr [rbx + 99]
    GUEST_ASSERT_EQ rax, 0xab
    movzx eax, byte ptr [rbx + 100]
    GUEST_ASSERT_EQ rax, 0              # nothing past n
    mov rdi, B
    mov rsi, A
    mov rdx, 100
    call guest_memcpy
    GUEST_ASSERT_EQ rax, B
    GUEST_ASSERT_EQ rsi, A
    mov rdi, A
    mov rsi, B
    call guest_memcmp
    GUEST_SYNC rax                     # equal: 0
    mov rbx, B
    mov byte ptr [rbx + 50], 0xac
    call guest_memcmp
    GUEST_SYNC rax                     # A[50] - B[50] = 0xab - 0xac
    xchg rdi, rsi
    call guest_memcmp
    GUEST_SYNC rax                     # 0xac - 0xab
    mov rdx, 50
    call guest_memcmp
    GUEST_SYNC rax                     # the first 50 bytes are equal
    xor edx, edx
    call guest_memcmp
    GUEST_SYNC rax, rdi, rsi           # n = 0: equal, pointers preserved
    ret
"""


def test_string_helpers_set_copy_and_compare() -> None:
    """guest_memset/guest_memcpy/guest_memcmp take rdi, rsi, rdx, return in rax, touch exactly
    n bytes and preserve the other registers; memcmp's sign follows the first differing byte."""
    report = run(STRING_GUEST)
    assert_done(report)
    syncs = [u["args"] for u in report.ucalls if u["cmd"] == "sync"]
    assert [s[0] for s in syncs] == [0, -1 & MASK, 1, 0, 0]
    assert syncs[-1][1] - syncs[-1][2] == 0x1000  # rdi = B, rsi = A after the xchg


# Each case the host wrote at TABLE (a count, then op, rdi, rsi, rdx quadruples: 0 memset,
# 1 memcpy, 2 memcmp) run in turn on the ARENA's bytes, a GUEST_SYNC of rax after each.
STRING_TABLE_GUEST = """\
.equ TABLE, GUEST_FREE_GPA
guest_main:
    mov r12, TABLE
    mov r13, qword ptr [r12]
    add r12, 8
st_loop:
    test r13, r13
    jz st_done
    mov rax, qword ptr [r12]
    mov rdi, qword ptr [r12 + 8]
    mov rsi, qword ptr [r12 + 16]
    mov rdx, qword ptr [r12 + 24]
    cmp rax, 1
    je st_copy
    cmp rax, 2
    je st_compare
    call guest_memset
    jmp st_next
st_copy:
    call guest_memcpy
    jmp st_next
st_compare:
    call guest_memcmp
st_next:
    GUEST_SYNC rax
    add r12, 32
    dec r13
    jmp st_loop
st_done:
    ret
"""
TABLE, ARENA, ARENA_SIZE = 0x600000, 0x610000, 3 * 4096 + 24  # three pages and a bit: crossings
OPS = {"set": 0, "copy": 1, "compare": 2}


@st.composite
def string_cases(draw: st.DrawFn) -> list[tuple[str, int, int, int]]:
    """(op, rdi, rsi, rdx) in the arena: any alignment, lengths across pages, copies 1..9 bytes
    apart either way (rep movsb's forward overlap), and compares of a copy with one byte changed
    (or none) so the first difference can be anywhere."""
    cases: list[tuple[str, int, int, int]] = []
    for _ in range(draw(st.integers(1, 12))):
        n = draw(st.integers(0, 64) | st.integers(0, 5000))
        dst = draw(st.integers(0, ARENA_SIZE - n))
        if draw(st.booleans()):
            src = draw(st.integers(max(0, dst - 9), min(ARENA_SIZE - n, dst + 9)))
        else:
            src = draw(st.integers(0, ARENA_SIZE - n))
        op = draw(st.sampled_from(sorted(OPS)))
        if op == "set":
            cases.append(("set", ARENA + dst, draw(st.integers(0, 0x3FF)), n))
        elif op == "copy":
            cases.append(("copy", ARENA + dst, ARENA + src, n))
        else:
            cases.append(("copy", ARENA + dst, ARENA + src, n))
            if n and draw(st.booleans()):
                cases.append(("set", ARENA + dst + draw(st.integers(0, n - 1)), draw(st.integers(0, 255)), 1))
            cases.append(("compare", ARENA + dst, ARENA + src, n))
    return cases


def _model(memory: bytearray, op: str, rdi: int, rsi: int, n: int) -> int:
    """What the helper does to `memory` (the arena) and returns: rep stosb, a forward byte copy
    (rep movsb), and repe cmpsb's first difference."""
    d, s = rdi - ARENA, rsi - ARENA
    if op == "set":
        memory[d : d + n] = bytes([rsi & 0xFF]) * n
        return rdi
    if op == "copy":
        for i in range(n):
            memory[d + i] = memory[s + i]
        return rdi
    for i in range(n):
        if memory[d + i] != memory[s + i]:
            return (memory[d + i] - memory[s + i]) & MASK
    return 0


@settings(max_examples=25, deadline=None)
@given(cases=string_cases(), seed=st.integers(0, 2**32 - 1))
def test_string_helpers_equal_the_byte_instructions(cases: list[tuple[str, int, int, int]], seed: int) -> None:
    """guest_memset/memcpy/memcmp (qwords between unaligned ends) leave the bytes and return what
    rep stosb, a forward rep movsb and repe cmpsb give, at any alignment, across pages, and for
    copies whose source and destination overlap 1..9 bytes apart either way."""
    with testbed.Vm(memory=MEMORY) as vm:
        vcpu = vm.load("strings.s", text=STRING_TABLE_GUEST)
        table = len(cases).to_bytes(8, "little") + b"".join(
            b"".join(v.to_bytes(8, "little") for v in (OPS[op], rdi, rsi, n)) for op, rdi, rsi, n in cases)
        vm.write(TABLE, table)
        memory = bytearray(random.Random(seed).randbytes(ARENA_SIZE))
        vm.write(ARENA, bytes(memory))
        for op, rdi, rsi, n in cases:
            uc = vcpu.run_to_ucall()
            assert uc.cmd == "sync" and uc.args[0] == _model(memory, op, rdi, rsi, n), (op, rdi, rsi, n)
            assert vm.read(ARENA, ARENA_SIZE) == bytes(memory), (op, rdi, rsi, n)
        assert vcpu.run_to_ucall().cmd == "done"


#: (case, whether the first 4 bytes at the end of memory equal the arena's, what the byte
#: instructions give: a value, or a #PF at the end of memory with the bytes before it done)
END = MEMORY  # nothing is mapped from here
FAULT_CASES = [
    (("set", END - 12, 0x5A, 16), True, "fault"),
    (("copy", ARENA, END - 12, 16), True, "fault"),
    (("copy", END - 12, ARENA, 16), True, "fault"),
    (("compare", END - 4, ARENA, 8), False, "value"),  # differs before the end: no fault
    (("compare", END - 4, ARENA, 8), True, "fault"),
]


@pytest.mark.parametrize(("case", "equal", "expect"), FAULT_CASES,
                         ids=["set-into-the-end", "copy-from-the-end", "copy-to-the-end", "compare-differs-before",
                              "compare-reaches-the-end"])
def test_string_helpers_fault_where_the_byte_instructions_do(case: tuple[str, int, int, int], equal: bool,
                                                            expect: str) -> None:
    """Up to the end of guest memory, the helpers touch what rep stosb, rep movsb and repe cmpsb
    touch: a #PF at the first byte past it (cr2) with every byte before it done, and a compare
    that differs before the end returns without reading past it."""
    op, rdi, rsi, n = case
    tail = bytes(range(1, 13))
    arena = (tail[8:] if equal else b"\xff" * 4) + bytes(range(0x40, 0x4C))
    with testbed.Vm(memory=MEMORY) as vm:
        vcpu = vm.load("strings.s", text=STRING_TABLE_GUEST)
        vm.write(TABLE, b"".join(v.to_bytes(8, "little") for v in (1, OPS[op], rdi, rsi, n)))
        vm.write(END - 12, tail)
        vm.write(ARENA, arena)
        if expect == "value":
            uc = vcpu.run_to_ucall()
            assert uc.cmd == "sync" and uc.args[0] == (tail[8] - 0xFF) & MASK
            return
        with pytest.raises(GuestExceptionError) as excinfo:
            vcpu.run_to_ucall()
        assert (excinfo.value.exception["vector"], excinfo.value.exception["cr2"]) == (14, END)
        if op == "set":
            assert vm.read(END - 12, 12) == b"\x5a" * 12
        elif op == "copy" and rdi == ARENA:
            assert vm.read(ARENA, 16) == tail + arena[12:16]
        elif op == "copy":
            assert vm.read(END - 12, 12) == arena[:12]


# ---------------------------------------------------------------------------- local labels

LOCAL_LABEL_GUEST = """\
guest_main:
    xor eax, eax
    mov ecx, 5
1:  add rax, rcx
    dec ecx
    jnz 1b
    jmp 1f
    GUEST_FAIL "jumped over"
1:  GUEST_SYNC rax
    ret
"""


def test_numeric_local_labels_run() -> None:
    """A loop on `1:`/`1b` and a jump over a GUEST_FAIL to `1f` run as GNU as would assemble them."""
    report = run(LOCAL_LABEL_GUEST)
    assert_done(report)
    assert report.syncs() == [15]


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("GUEST_SYNC 1, 2, 3, 4, 5, 6, 7", "GUEST_SYNC takes 1 to 6 values, 7 given"),
        ("GUEST_SYNC qword ptr [rax]", "not memory operands"),
        ("GUEST_ASSERT_LT rax", "GUEST_ASSERT_LT takes 2 values, 1 given"),
        ("GUEST_ASSERT xmm0", "not xmm0"),
        ("GUEST_ASSERT_SLT eax, 1", "GUEST_ASSERT_SLT compares signed 64-bit values: eax is narrower"),
        ("GUEST_ASSERT_NE al, 0x1ff", "0x1ff does not fit the 8-bit register al"),
        ("GUEST_FAIL", 'GUEST_FAIL expects one quoted message'),
        ("GUEST_FAIL rax", 'GUEST_FAIL expects one quoted message'),
        ("GUEST_SYNC 0x10000000000000000", "does not fit in 64 bits"),
    ],
)
def test_guest_api_misuse_is_refused_at_its_line(statement: str, message: str) -> None:
    """A guest-API call that cannot be right is an assembly error at its file:line."""
    with pytest.raises(AsmError) as excinfo:
        build_program("api.s", VmOptions(memory=MEMORY), text=f"guest_main:\n    {statement}\n    ret\n")
    assert (excinfo.value.file, excinfo.value.line) == ("api.s", 2), str(excinfo.value)
    assert message in excinfo.value.message
