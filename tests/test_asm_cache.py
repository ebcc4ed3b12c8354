"""Tests for the assembly caches: the user cache shared by processes (testbed/asm/cache.py) and
the front end's reuse of the prelude and runtime within a process (assembler._front_end)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.asm import assembler, cache
from testbed.asm.frontend import _Preprocessor
from testbed.asm.program import LineTable, Program, SourceLocation
from testbed.asm.syntax import _render
from testbed.layout import IMAGE_GPA
from testbed.machine import GUESTS_DIR, LIB_DIR, VmOptions, build_program, guest_defines

ROOT = Path(__file__).resolve().parent.parent
GUEST = "guest_main:\n    GUEST_SYNC VALUE\n    GUEST_DONE\n"

# Run in a child process in the directory argv[1]: for each line "VALUE [--no-assembly]" read
# from stdin, build `guest.s` there with VALUE and print the digest of the program; with
# "--no-assembly", fail if anything is assembled. Before each line the process forgets the
# programs it built (cache._memory), so each line finds only what the user cache holds, as a
# new process would: one child does the work of several.
CHILD = """
import sys
from testbed.asm import assembler, cache
from testbed.machine import VmOptions, build_program
assemble = cache._assemble_unit
def refuse(*args, **kwargs):
    raise SystemExit("assembled although the program is cached")
for line in sys.stdin:
    value, *flags = line.split()
    cache._memory.clear()
    cache._assemble_unit = refuse if "--no-assembly" in flags else assemble
    program = build_program(sys.argv[1] + "/guest.s", VmOptions(defines={"VALUE": value}))
    print(cache.program_digest(program), flush=True)
"""


def run_child(directory: Path, cache_dir: Path | str) -> subprocess.Popen[str]:
    """A child (CHILD) reading its builds from stdin."""
    env = {**os.environ, "TESTBED_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(directory)], cwd=directory, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ask(process: subprocess.Popen[str], value: str, *flags: str) -> str:
    """One build by a running child: its program's digest."""
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(" ".join((value, *flags)) + "\n")
    process.stdin.flush()
    digest = process.stdout.readline().strip()
    if not digest:
        _, err = process.communicate(timeout=120)
        pytest.fail(f"the child printed no digest: {err}")
    return digest


def finish(process: subprocess.Popen[str]) -> None:
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err


def child_digest(directory: Path, cache_dir: Path | str, value: str, *flags: str) -> str:
    """One build in a new process."""
    process = run_child(directory, cache_dir)
    digest = ask(process, value, *flags)
    finish(process)
    return digest


def reference(path: Path, value: str) -> str:
    """The digest of the program assembled with no cache at all."""
    options = VmOptions(defines={"VALUE": value})
    defines = dict(sorted((k, str(v)) for k, v in guest_defines(options).items()))
    sources = [(str(LIB_DIR / name), (LIB_DIR / name).read_text()) for name in ("prelude.s", "runtime.s")]
    sources.insert(1, (str(path), path.read_text()))
    program, _ = assembler._assemble_unit(sources, IMAGE_GPA, defines, [LIB_DIR, GUESTS_DIR], reuse=False)
    return cache.program_digest(program)


@pytest.fixture
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty user cache, and no program remembered by this process."""
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_memory", {})
    return tmp_path / "cache" / "asm"


def roots(guest: Path) -> cache.Roots:
    """The roots of build_program's assembly of `guest` (cache.Roots.of)."""
    found = cache.Roots.of([str(LIB_DIR / "prelude.s"), str(guest), str(LIB_DIR / "runtime.s")], [LIB_DIR, GUESTS_DIR])
    assert found is not None
    return found


def entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.json")) if directory.is_dir() else []


def test_a_program_assembled_in_one_process_is_reused_by_another(tmp_path: Path, user_cache: Path) -> None:
    """A second process finds the program in the user cache and assembles nothing (the first is
    this one: it has no entry, so it assembles and writes one)."""
    (tmp_path / "guest.s").write_text(GUEST)
    first = cache.program_digest(build_program(tmp_path / "guest.s", VmOptions(defines={"VALUE": "5"})))
    assert len(entries(user_cache)) == 1
    assert child_digest(tmp_path, user_cache.parent, "5", "--no-assembly") == first == reference(
        tmp_path / "guest.s", "5")


def test_a_changed_define_or_include_misses(tmp_path: Path, user_cache: Path) -> None:
    """A different define, an edited include, or an include that now resolves to another file
    each give a new program, the one assembled without a cache."""
    guest = tmp_path / "guest.s"
    guest.write_text('.include "inc.s"\n' + GUEST)
    (tmp_path / "inc.s").write_text(".equ EXTRA, 1\n")
    one = build_program(guest, VmOptions(defines={"VALUE": "1"}))
    assert cache.program_digest(one) == reference(guest, "1")
    two = build_program(guest, VmOptions(defines={"VALUE": "2"}))
    assert cache.program_digest(two) == reference(guest, "2") != cache.program_digest(one)
    (tmp_path / "inc.s").write_text(".equ EXTRA, 1\nnop\n")  # same size class, other contents
    edited = build_program(guest, VmOptions(defines={"VALUE": "2"}))
    assert cache.program_digest(edited) == reference(guest, "2") != cache.program_digest(two)
    # In another process too (no memory of this one's programs).
    child = run_child(tmp_path, user_cache.parent)
    assert ask(child, "2", "--no-assembly") == cache.program_digest(edited)
    (tmp_path / "inc.s").write_text(".equ EXTRA, 1\n")
    assert ask(child, "2") == cache.program_digest(two)
    finish(child)


def test_an_include_rewritten_in_place_with_its_size_and_mtime_is_seen(tmp_path: Path, user_cache: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The remembered digests of includes (assembler._file_digest) follow the file's inode change
    time, which a same-size rewrite moves even when its mtime is set back; a file changed within
    RACY_NS is always read again."""
    guest = tmp_path / "guest.s"
    guest.write_text('.include "inc.s"\n' + GUEST)
    inc = tmp_path / "inc.s"
    inc.write_text(".byte 1\n")
    os.utime(inc, ns=(10**18, 10**18))
    monkeypatch.setattr(assembler, "RACY_NS", 0)  # trust every stat: the rewrite alone must show
    one = build_program(guest, VmOptions(defines={"VALUE": "1"}))
    assert build_program(guest, VmOptions(defines={"VALUE": "1"})) == one  # checked: digest remembered
    inc.write_text(".byte 2\n")  # same size, same inode
    os.utime(inc, ns=(10**18, 10**18))  # and the same mtime
    two = build_program(guest, VmOptions(defines={"VALUE": "1"}))
    assert b"\x02" in two.code and two.code != one.code
    monkeypatch.setattr(assembler, "RACY_NS", 10**18)  # nothing trusted: read each time
    inc.write_text(".byte 3\n")
    assert b"\x03" in build_program(guest, VmOptions(defines={"VALUE": "1"})).code


def test_an_include_found_earlier_in_the_search_path_misses(tmp_path: Path, user_cache: Path) -> None:
    """An entry is not used when a file now shadows the include it read (searched first)."""
    guest = tmp_path / "g" / "guest.s"
    guest.parent.mkdir()
    guest.write_text('.include "lib.s"\n' + GUEST)
    include_dir = tmp_path / "inc"
    include_dir.mkdir()
    (include_dir / "lib.s").write_text("nop\n")
    macros = ".macro GUEST_SYNC v\n    mov rax, \\v\n.endm\n.macro GUEST_DONE\n    hlt\n.endm\n"
    sources = [("<macros>", macros), (str(guest), guest.read_text())]
    defines = {"VALUE": "3"}
    before = cache.assemble_sources_cached(sources, base=0x1000, defines=defines, include_dirs=[include_dir])
    (guest.parent / "lib.s").write_text("int3\n")
    cache._memory.clear()
    after = cache.assemble_sources_cached(sources, base=0x1000, defines=defines, include_dirs=[include_dir])
    assert b"\xcc" in after.code and b"\xcc" not in before.code


def test_a_program_cached_in_one_directory_is_found_from_another_with_its_paths(
        tmp_path: Path, user_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same guest and include in another directory (a second checkout, a new temporary
    directory) is a hit that names the new directory's files, the program assembled there
    without a cache; a changed include there is still a miss."""
    first, second = tmp_path / "a", tmp_path / "b"
    for directory in (first, second):
        directory.mkdir()
        (directory / "guest.s").write_text('.include "inc.s"\n' + GUEST)
        (directory / "inc.s").write_text(".equ EXTRA, 1\n")
    build_program(first / "guest.s", VmOptions(defines={"VALUE": "3"}))
    assert len(entries(user_cache)) == 1
    cache._memory.clear()
    assembled: list[object] = []
    assemble = cache._assemble_unit
    monkeypatch.setattr(cache, "_assemble_unit", lambda *a, **k: assembled.append(a) or assemble(*a, **k))
    moved = build_program(second / "guest.s", VmOptions(defines={"VALUE": "3"}))
    assert assembled == [] and len(entries(user_cache)) == 1
    assert cache.program_digest(moved) == reference(second / "guest.s", "3")
    assert str(second / "guest.s") in {loc.file for _, loc in moved.lines}
    assert not any(loc.file.startswith(str(first)) for _, loc in moved.lines)
    (second / "inc.s").write_text(".equ EXTRA, 1\nnop\n")
    cache._memory.clear()
    edited = build_program(second / "guest.s", VmOptions(defines={"VALUE": "3"}))
    assert len(assembled) == 1 and cache.program_digest(edited) == reference(second / "guest.s", "3")


def test_roots_that_lie_otherwise_are_another_entry(tmp_path: Path, user_cache: Path) -> None:
    """A second source's directory under the guest's in one assembly and elsewhere in the next:
    the include the second reads is its own (lib/x.s beside the guest), not the file an entry
    of the first would map it to (the second source's directory's x.s, the same contents)."""
    macros = ".macro GUEST_SYNC v\n    mov rax, \\v\n.endm\n.macro GUEST_DONE\n    hlt\n.endm\n"
    one, two, elsewhere = tmp_path / "one", tmp_path / "two", tmp_path / "elsewhere" / "lib"
    for directory, byte in ((one / "lib", 1), (two / "lib", 2), (elsewhere, 1)):
        directory.mkdir(parents=True)
        (directory / "x.s").write_text(f".byte {byte}\n")
        (directory / "other.s").write_text("nop\n")
    text = '.include "lib/x.s"\n' + GUEST

    def build(guest_dir: Path, other_dir: Path) -> bytes:
        sources = [("<macros>", macros), (str(guest_dir / "guest.s"), text), (str(other_dir / "other.s"), "nop\n")]
        return cache.assemble_sources_cached(sources, base=0x1000, defines={"VALUE": "3"}).code

    assert build(one, one / "lib").startswith(b"\x01")
    cache._memory.clear()
    assert build(two, elsewhere).startswith(b"\x02")
    assert len(entries(user_cache)) == 2


def test_concurrent_writers_all_get_the_right_program(tmp_path: Path, user_cache: Path) -> None:
    """Several processes assembling the same programs at once into one empty cache all get the
    program assembled without a cache, and leave one whole entry per program."""
    (tmp_path / "guest.s").write_text(GUEST)
    values = ["7", "8"]  # each process builds both: two writers per program, at once
    processes = [run_child(tmp_path, user_cache.parent) for _ in range(2)]
    for process in processes:  # both start on the same builds before either is waited for
        assert process.stdin is not None
        process.stdin.write("".join(value + "\n" for value in values))
        process.stdin.flush()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=180)  # closes stdin: the child ends after its builds
        assert process.returncode == 0, err
        results.append(out.split())
    expected = [reference(tmp_path / "guest.s", value) for value in values]
    assert results == [expected, expected]
    assert len(entries(user_cache)) == 2 and not list(user_cache.glob(".*.tmp"))
    for entry in entries(user_cache):
        assert cache.load(user_cache, entry.stem, roots(tmp_path / "guest.s")) is not None


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped code byte", "wrong key", "line of no file",
                                    "short column"])
def test_a_corrupt_entry_is_assembled_again(tmp_path: Path, user_cache: Path, damage: str) -> None:
    """A damaged entry is never used: the program is assembled again and the entry rewritten."""
    guest = tmp_path / "guest.s"
    guest.write_text(GUEST)
    good = build_program(guest, VmOptions(defines={"VALUE": "4"}))
    (entry,) = entries(user_cache)
    data = entry.read_text()
    if damage == "truncated":
        entry.write_text(data[: len(data) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x80not json")
    elif damage == "flipped code byte":
        outer = json.loads(data)
        payload = json.loads(outer["payload"])
        payload["code"] = ("0" if payload["code"][0] != "0" else "1") + payload["code"][1:]
        outer["payload"] = json.dumps(payload)
        entry.write_text(json.dumps(outer))
    elif damage == "wrong key":
        outer = json.loads(data)
        outer["key"] = "0" * 64
        entry.write_text(json.dumps(outer))
    else:  # a whole entry (its digest agrees) whose line table no program has
        outer = json.loads(data)
        payload = json.loads(outer["payload"])
        if damage == "line of no file":
            payload["lines"]["file_ids"] = "ffffffff" + payload["lines"]["file_ids"][8:]
        else:  # one address short of the other columns
            payload["lines"]["addresses"] = payload["lines"]["addresses"][16:]
        outer["payload"] = json.dumps(payload)
        outer["sha256"] = hashlib.sha256(outer["payload"].encode()).hexdigest()
        entry.write_text(json.dumps(outer))
    assert cache.load(user_cache, entry.stem, roots(guest)) is None
    cache._memory.clear()
    again = build_program(guest, VmOptions(defines={"VALUE": "4"}))
    assert again == good
    loaded = cache.load(user_cache, entry.stem, roots(guest))
    assert loaded is not None and loaded[0] == good


def test_an_unwritable_cache_directory_means_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache directory that cannot be created (its parent is a file) is no cache, no error."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TESTBED_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(cache, "_memory", {})
    (tmp_path / "guest.s").write_text(GUEST)
    program = build_program(tmp_path / "guest.s", VmOptions(defines={"VALUE": "6"}))
    assert cache.program_digest(program) == reference(tmp_path / "guest.s", "6")
    assert blocker.read_text() == ""


def test_a_read_only_cache_directory_means_no_cache(tmp_path: Path, user_cache: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache directory the process may not write in (EACCES on create) is no cache, no error."""
    user_cache.mkdir(parents=True)

    def refuse(*_args: object, **_kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied", str(user_cache))

    # The tests run as root, which writes through mode bits; refuse the way EACCES would.
    monkeypatch.setattr(cache.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(cache, "_memory", {})
    (tmp_path / "guest.s").write_text(GUEST)
    program = build_program(tmp_path / "guest.s", VmOptions(defines={"VALUE": "6"}))
    assert cache.program_digest(program) == reference(tmp_path / "guest.s", "6")
    assert entries(user_cache) == []


def test_a_store_past_the_bound_prunes_the_least_recently_used(tmp_path: Path, user_cache: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_ENTRIES a store removes the entries used longest ago down to PRUNE_TO (a hit
    counts as a use: it touches its entry), and a writer's temporary file once it is an hour
    old; what is kept still loads."""
    monkeypatch.setattr(cache, "MAX_ENTRIES", 4)
    monkeypatch.setattr(cache, "PRUNE_TO", 2)
    guest = tmp_path / "guest.s"
    guest.write_text(GUEST)
    for value in ["1", "2", "3", "4"]:
        build_program(guest, VmOptions(defines={"VALUE": value}))
    by_age = entries(user_cache)  # four entries, given distinct ages, oldest first
    for age, entry in enumerate(by_age):
        os.utime(entry, ns=(10**15 + age, 10**15 + age))
    stale = user_cache / ".0123456789abcdef.x.tmp"
    stale.write_text("{")
    os.utime(stale, ns=(10**15, 10**15))
    oldest = by_age[0]
    cache._memory.clear()
    assert cache.load(user_cache, oldest.stem, roots(guest)) is not None  # a hit: now the most recent
    assert len(entries(user_cache)) == 4 and stale.exists()  # at the bound: nothing pruned
    cache._memory.clear()
    build_program(guest, VmOptions(defines={"VALUE": "5"}))  # the fifth entry's store prunes
    kept = entries(user_cache)
    assert len(kept) == 2 and oldest in kept and not stale.exists()
    assert all(entry not in kept for entry in by_age[1:])
    for entry in kept:
        assert cache.load(user_cache, entry.stem, roots(guest)) is not None


def test_off_disables_the_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TESTBED_CACHE_DIR=off writes nothing, not even in the default location."""
    monkeypatch.setenv("TESTBED_CACHE_DIR", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cache, "_memory", {})
    assert cache.cache_dir() is None
    (tmp_path / "guest.s").write_text(GUEST)
    build_program(tmp_path / "guest.s", VmOptions(defines={"VALUE": "9"}))
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


def test_the_default_location_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TESTBED_CACHE_DIR the cache is $XDG_CACHE_HOME/testbed, else ~/.cache/testbed."""
    monkeypatch.delenv("TESTBED_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "testbed" / "asm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "testbed" / "asm"


# -- the front end's reuse within a process --------------------------------------------------


def unit(guest: Path | tuple[str, str], options: VmOptions) -> tuple[list[tuple[str, str]], dict[str, str]]:
    defines = dict(sorted((k, str(v)) for k, v in guest_defines(options).items()))
    source = (str(guest), guest.read_text()) if isinstance(guest, Path) else guest
    sources = [(str(LIB_DIR / name), (LIB_DIR / name).read_text()) for name in ("prelude.s", "runtime.s")]
    sources.insert(1, source)
    return sources, defines


#: One bundled guest of each shape the front end treats differently: plain, with includes and
#: macros of its own, a legacy image, an image that lies about itself, a TD runtime user, a
#: user-mode guest, a GHCB-level guest. Every bundled guest also runs through the reused front
#: end in tests/test_matrix.py, whose outcomes are pinned.
FRONT_END_GUESTS = ["conversions", "private_mem_conversions", "legacy_image", "lying_image", "tdx_runtime",
                    "exceptions_user", "ghcb_hostile"]


@pytest.mark.parametrize("guest", [GUESTS_DIR / f"{name}.s" for name in FRONT_END_GUESTS], ids=lambda p: p.stem)
def test_reused_front_end_equals_the_reference(guest: Path) -> None:
    """For each shape of guest the reused prelude and replayed runtime give the very items
    (text, locations, labels, line positions) and program of the reference front end."""
    sources, defines = unit(guest, VmOptions(memory=8 << 20))
    dirs = [LIB_DIR, GUESTS_DIR]
    assembler._front_end(sources, defines, dirs)  # records the prelude and the runtime
    reused, was_reused = assembler._front_end(sources, defines, dirs)
    fresh = assembler._front_end_uncached(sources, defines, dirs)
    assert was_reused
    assert _render(reused.items) == _render(fresh.items)
    assert reused.items == fresh.items
    assert reused.positions == fresh.positions and reused.labels == fresh.labels
    assert reused.asserts == fresh.asserts and reused.included == fresh.included
    _same_checks(reused, fresh)


def _same_checks(reused: _Preprocessor, fresh: _Preprocessor) -> None:
    """The checks after assembly and what they read are the reference's too."""
    assert reused.branch_checks == fresh.branch_checks and reused.span_checks == fresh.span_checks
    assert reused.deferred == fresh.deferred and reused.constants == fresh.constants
    assert reused.equ_defs == fresh.equ_defs and reused.unsettled == fresh.unsettled


def test_the_runtime_is_replayed_for_a_plain_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once recorded, no statement of the prelude or the runtime (or its include, sev.s) is
    processed again for a guest that changes nothing they read; the program is the reference's."""
    # A hidden .equ (hoisted operand), a numeric local label and an assert site: each shifts a
    # hidden name or a number the replayed runtime must follow.
    guest = "guest_main:\n    mov rax, -GUEST_MEM_SIZE\n1:  GUEST_ASSERT_EQ rax, 0\n    jz 1b\n    GUEST_DONE\n"
    sources, defines = unit(("<g1>", guest), VmOptions())
    dirs = [LIB_DIR, GUESTS_DIR]
    assembler._front_end(sources, defines, dirs)
    processed: list[str] = []
    add_statement = _Preprocessor.add_statement

    def counting(self: _Preprocessor, text: str, loc: SourceLocation) -> None:
        processed.append(loc.file)
        add_statement(self, text, loc)

    monkeypatch.setattr(_Preprocessor, "add_statement", counting)
    pre, reused = assembler._front_end(sources, defines, dirs)
    assert reused and processed and set(processed) == {"<g1>"}
    fresh = assembler._front_end_uncached(sources, defines, dirs)
    assert pre.items == fresh.items and pre.positions == fresh.positions and pre.labels == fresh.labels
    program, _ = assembler._assemble_unit(sources, IMAGE_GPA, defines, dirs)
    assert program == assembler._assemble_unit(sources, IMAGE_GPA, defines, dirs, reuse=False)[0]


def test_replayed_hidden_names_follow_the_middle() -> None:
    """The replayed last source's hidden names (hoisted operands, line positions) are numbered
    after the middle's, as the reference front end numbers them; the program is the same."""
    sources = [
        ("<a>", ".equ K, 8\n"), ("<b>", "mov rax, -K\nnop\nmov rcx, [rbx - K]\n"),
        ("<c>", "there: mov rdx, -K\nnop\n")
    ]
    # Recorded after no middle: the replay after <b> moves the line counter by 3, the expr one by 2.
    pre, reused = assembler._front_end(sources, {}, [])
    fresh = assembler._front_end_uncached(sources, {}, [])
    assert reused and pre.items == fresh.items and pre.positions == fresh.positions
    assert "__tb_line_3:" in pre.items[-2].text and "__tb_expr_3" in pre.items[-2].text
    program, _ = assembler._assemble_unit(sources, 0x1000, {}, [])
    assert program == assembler._assemble_unit(sources, 0x1000, {}, [], reuse=False)[0]


def test_a_guest_redefining_what_the_runtime_reads_is_processed_in_full() -> None:
    """A guest that redefines a constant the runtime's statements name is not replayed over:
    the result is the reference front end's (here a located error in the runtime, if any)."""
    guest = ("<g2>", ".equ GUEST_MEM_SIZE, 0x100000\nguest_main:\n    GUEST_DONE\n")
    sources, defines = unit(guest, VmOptions())
    dirs = [LIB_DIR, GUESTS_DIR]
    assembler._front_end(sources, defines, dirs)
    key = (tuple(map(str, dirs)), tuple((k, "str", v) for k, v in defines.items()), tuple(sources[0]))
    prefix = assembler._prefixes[key]
    pre = prefix.fork()
    assembler._add(pre, *sources[1])
    suffix = assembler._suffixes[(key, tuple(sources[-1]))]  # this unit's runtime, whatever ran before
    assert suffix is not None
    assert not assembler._replayable(prefix, pre, suffix)


@settings(max_examples=300)
@given(text=st.text(alphabet="ab$@._ \t,:+-[]()é1\n", max_size=30),
       name=st.text(alphabet="ab$@._é1", min_size=1, max_size=4))
def test_the_whole_name_set_finds_what_the_whole_name_match_finds(text: str, name: str) -> None:
    """_replayable's set lookup of a changed name in the runtime's text answers exactly as
    the whole-name regex it replaces (names of [\\w.$@] characters, at any position)."""
    suffix = assembler._Suffix(positions=0, hoisted=0, items=(), new_positions=(), new_labels=(), hoisted_after=0,
                               included=(), texts=(text,), names=assembler._whole_names(text),
                               plan=assembler._plan((), ()))
    expected = re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.$@])", text) is not None
    assert assembler._occurs(name, suffix) == expected


def test_every_guard_is_in_the_key() -> None:
    """The toolchain part of an entry's key covers every module whose change can change what is
    assembled or refused (the guards, the expansion checks, the expression evaluator, the
    decoder of the branch checks): a changed guard misses the entries made before it."""
    names = {path.name for path in cache._toolchain_sources()}
    assert {"guards.py", "expand.py", "evaluate.py", "branches.py", "frontend.py", "decode.py"} <= names
    assert all(path.is_file() for path in cache._toolchain_sources())


def test_program_digest_is_stable() -> None:
    """The digest used by these tests covers code, base, symbols, asserts and lines."""
    program = build_program(GUESTS_DIR / "hypercall_insn.s", VmOptions())
    assert cache.program_digest(program) == hashlib.sha256(
        json.dumps(cache._encode(program, ()), sort_keys=True).encode()).hexdigest()


def _front_end_equals_reference(guest: Path, options: VmOptions) -> bool:
    """Run the cached front end for `guest` under `options`, check it against the reference
    front end, and say whether it reused cached work."""
    sources, defines = unit(guest, options)
    dirs = [LIB_DIR, GUESTS_DIR]
    reused, was_reused = assembler._front_end(sources, defines, dirs)
    fresh = assembler._front_end_uncached(sources, defines, dirs)
    assert reused.items == fresh.items
    assert reused.positions == fresh.positions and reused.labels == fresh.labels
    assert reused.asserts == fresh.asserts and reused.included == fresh.included
    _same_checks(reused, fresh)
    return was_reused


def test_a_runtime_recorded_under_other_defines_is_replayed_when_they_do_not_reach_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A new set of defines that differs only in names the runtime never reads (a guest's own
    -D) replays the runtime recorded under the other set (no new record), and gives the
    reference front end's items; a define the runtime reads (GUEST_MIGRATION_READY) records
    anew, and gives the reference's items too; every record's whole-name set is its texts'."""
    monkeypatch.setattr(assembler, "_prefixes", {})
    monkeypatch.setattr(assembler, "_suffixes", {})
    monkeypatch.setattr(assembler, "_donors", {})
    records: list[object] = []
    real = assembler._record_suffix

    def counted(*args: object) -> object:
        records.append(args)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(assembler, "_record_suffix", counted)
    guest = GUESTS_DIR / "hypercall_abi_call.s"
    for nr in ("0x999", "12", "1"):
        assert _front_end_equals_reference(guest, VmOptions(memory=8 << 20, defines={"HC_NR": nr}))
    assert len(records) == 1  # recorded under HC_NR=0x999, replayed under the other two
    assert _front_end_equals_reference(guest, VmOptions(memory=8 << 20,
                                                        defines={"HC_NR": "1", "GUEST_MIGRATION_READY": "1"}))
    assert len(records) == 2  # the runtime reads GUEST_MIGRATION_READY: recorded anew
    assert _front_end_equals_reference(guest, VmOptions(memory=16 << 20, defines={"HC_NR": "1"}))
    assert len(records) == 3  # GUEST_MEM_SIZE and the layout the runtime reads differ
    # The later records took their whole-name sets from the first's texts (_whole_names keeps
    # them): each is still exactly its own texts' set, computed afresh (__wrapped__).
    recorded = [r for r in assembler._suffixes.values() if r is not None]
    assert len(recorded) == 3 and len({r.texts for r in recorded}) == 1
    afresh = assembler._whole_names.__wrapped__
    assert all(r.names == frozenset().union(*map(afresh, r.texts)) for r in recorded)


def test_a_program_from_a_replayed_runtime_is_the_reference_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: a program whose runtime was replayed from other defines is byte for byte
    (code, symbols, asserts, lines) the program assembled with nothing cached."""
    monkeypatch.setattr(assembler, "_prefixes", {})
    monkeypatch.setattr(assembler, "_suffixes", {})
    monkeypatch.setattr(assembler, "_donors", {})
    monkeypatch.setattr(cache, "_memory", {})
    monkeypatch.setenv("TESTBED_CACHE_DIR", "off")
    guest = GUESTS_DIR / "conversions.s"
    build_program(guest, VmOptions(memory=24 << 20, defines={"SHAPE": 1}))
    options = VmOptions(memory=24 << 20, defines={"SHAPE": 2, "CHURN": 5})
    replayed = build_program(guest, options)
    defines = dict(sorted((k, str(v)) for k, v in guest_defines(options).items()))
    sources = [(str(LIB_DIR / name), (LIB_DIR / name).read_text()) for name in ("prelude.s", "runtime.s")]
    sources.insert(1, (str(guest), guest.read_text()))
    fresh, _ = assembler._assemble_unit(sources, IMAGE_GPA, defines, [LIB_DIR, GUESTS_DIR], reuse=False)
    assert cache.program_digest(replayed) == cache.program_digest(fresh)
    assert len(assembler._donors) == 1 and len(assembler._suffixes) == 1  # one record, replayed


def test_roots_write_paths_relative_to_the_longest_root_and_back() -> None:
    """A path under a root is written as that root's index and the rest (the longest root
    when several hold it), expands back to itself, and a path under none stays as it is; an
    index the assembly has no root for is an error; a name holding the mark is not cached."""
    roots = cache.Roots(["/w/guests", "/w/guests/lib", "/tmp/t0"])
    for path in ["/w/guests/a.s", "/w/guests/lib/b.s", "/tmp/t0/c.s", "/elsewhere/d.s", "<macros>", "/w/guests"]:
        assert roots.expand(roots.relocate(path)) == path
    assert roots.relocate("/w/guests/lib/b.s") == f"{cache.MARK}1{cache.MARK}b.s"
    assert roots.relocate("/w/guestsX/a.s") == "/w/guestsX/a.s"  # a prefix of the name, not a directory
    assert roots.structure() == [None, f"{cache.MARK}0{cache.MARK}lib", None]
    slash = cache.Roots(["/", "/tmp/x"])  # the root `/`: the rest after its separator
    assert cache.Roots(["/q", "/tmp/x"]).expand(slash.relocate("/a.s")) == "/q/a.s"
    with pytest.raises(ValueError, match="no root"):
        roots.expand(f"{cache.MARK}3{cache.MARK}/x.s")
    assert cache.Roots.of(["/w/guests/a.s", f"/w/{cache.MARK}/b.s"], []) is None
    found = cache.Roots.of(["<p>", "/w/guests/./a.s", "/w/guests/lib/r.s", "x.s"],
                           [Path("/w/guests/lib"), Path("/w/guests"), Path(".")])
    assert found is not None and found.directories == ("/w/guests", "/w/guests/lib")  # as pathlib spells them; no `.`


@pytest.mark.parametrize("layout", ["dot in the name", "include dir .", "include dir /", "absolute include"])
def test_a_hit_from_another_layout_is_what_that_layout_assembles(tmp_path: Path, user_cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """Whatever the spelling of the names and directories, a program found in the cache for a
    second layout is the one assembled there without a cache (its include's byte and its file
    names): a `.` in a source name, `.` or `/` as an include directory, an include named by an
    absolute path that lies under a root (which names the same file from every checkout)."""
    name = "testbed_cache_probe_inc.s"  # in no system directory: `/` is searched for it
    first, second, lib = tmp_path / "a", tmp_path / "b", tmp_path / "lib"
    for directory in (first, second, lib):
        directory.mkdir()
    (lib / name).write_text(".byte 1\n")
    (second / name).write_text(".byte 2\n")  # found before lib's in the second layout
    text = f'.include "{name}"\nnop\n'

    def build(directory: Path) -> Program:
        if layout == "dot in the name":
            sources, dirs = [(f"{directory}/./x.s", text)], [lib]
        elif layout == "include dir .":  # run from the first directory, which is `.`
            sources, dirs = [("<m>", text)], [Path(".") if directory == first else directory, lib]
        elif layout == "include dir /":  # beside a relative directory, under no root
            sources, dirs = [("<m>", text)], [Path("/") if directory == first else directory, Path("../lib")]
        else:
            sources, dirs = [("<m>", f'.include "{first / name}"\nnop\n')], [directory]
        return cache.assemble_sources_cached(sources, base=0x1000, defines={}, include_dirs=dirs)

    monkeypatch.chdir(first)
    if layout == "absolute include":
        (first / name).write_text(".byte 2\n")  # the second layout's own file is byte 2 as well
        build(first)
        (first / name).write_text(".byte 3\n")  # then the file both name changes
    else:
        build(first)
    cache._memory.clear()
    found = build(second)
    cache._memory.clear()
    monkeypatch.setenv("TESTBED_CACHE_DIR", "off")
    reference = build(second)
    assert found.code == reference.code and found.lines == reference.lines
    assert found.code.startswith(b"\x03" if layout == "absolute include" else b"\x02")


def test_a_line_table_survives_its_entry_columns() -> None:
    """An entry's line table is columns of hex (_encode_lines) that decode to the same table,
    each file name through the entry's roots; equal tables are written alike."""
    program = build_program(GUESTS_DIR / "hypercall_insn.s", VmOptions())
    written = cache._encode_lines(LineTable.of(program.lines), str)
    assert set(written) == {"files", "addresses", "file_ids", "line_numbers"}
    assert all(isinstance(written[k], str) for k in ("addresses", "file_ids", "line_numbers"))
    assert cache._decode_lines(json.loads(json.dumps(written)), str) == program.lines
    assert cache._encode_lines(LineTable.of(list(program.lines)), str) == written
