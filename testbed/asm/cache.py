"""A content-addressed cache of assembled programs, shared by processes (the user's cache dir).

An entry's key is a SHA-256 over everything an assembly reads: the sources (names and texts),
the defines, the load address, the include directories, the assembler's own sources
(testbed/asm/*.py and testbed/decode.py: a changed guard misses every entry) and Keystone's and
Capstone's versions. The files the sources include are found only while
assembling, so an entry records each include (the file read, its SHA-256, and the candidate
paths tried before it and absent) and is used only if all of them still hold.

Where the files are is not part of the key: a path under one of the assembly's roots (each
source's directory and each include directory, `Roots`) is written in the key and the entry
as the root's index and the rest of the path, and a hit gives back the paths under this
assembly's roots. So a second checkout of the project (a clean clone, a CI workspace) or a
guest written to a new temporary directory finds the programs already assembled elsewhere.
The roots' relations to each other (which lies under which, and where) are part of the key,
so every include candidate an entry records maps to the candidate this assembly would try;
a root under none of the others is free to be anywhere. Roots are spelled as the front end
joins include names to them (pathlib's spelling), the current directory is no root (paths
relative to it stay as written), and an assembly that named an include by an absolute path
is not stored (that file does not move with the checkout, nor do the includes inside it).

Where: $TESTBED_CACHE_DIR, else $XDG_CACHE_HOME/testbed, else ~/.cache/testbed (entries in
its asm/ subdirectory). TESTBED_CACHE_DIR=off disables the cache.

Safety: entries are JSON (never pickle: the directory may be shared, and a pickle runs code
when loaded), carry their key and a SHA-256 of their payload, and are written to a temporary
file in the same directory and renamed into place (os.replace is atomic), so parallel writers
of one key each leave a whole entry and readers never see a partial one. A missing, corrupt,
foreign or stale entry is a miss: the program is assembled again and the entry rewritten. Any
OSError (an unwritable or missing directory, a full disk) makes the cache a no-op, silently.

Size: bounded. A hit touches its entry (mtime), and a store that finds more than MAX_ENTRIES
entries removes the least recently used down to PRUNE_TO (and temporary files a killed writer
left, once an hour old). Entries are 0.1-0.3 MB, so the cache stays under ~300 MB; a suite
whose guests live in temporary directories adds hundreds of entries per run, which grew an
unpruned cache past a gigabyte in a day.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from testbed.asm.assembler import _assemble_unit, _includes_valid
from testbed.asm.frontend import IncludeRecord
from testbed.asm.program import AssertSite, LineTable, Program

FORMAT = 5  # 2: Program.features (the image note); 3: paths relative to the roots; 4: include names;
#            5: the line table as columns
DISABLED = ("off", "0", "none", "false", "no")

_Included = tuple[IncludeRecord, ...]


def cache_dir() -> Path | None:
    """The directory entries go in, or None when the cache is disabled."""
    configured = os.environ.get("TESTBED_CACHE_DIR", "").strip()
    if configured.lower() in DISABLED:
        return None
    if configured:
        root = Path(configured)
    elif xdg := os.environ.get("XDG_CACHE_HOME", "").strip():
        root = Path(xdg) / "testbed"
    else:
        root = Path.home() / ".cache" / "testbed"
    return root / "asm"


def _toolchain_sources() -> list[Path]:
    """The testbed's files an assembly's result depends on: the assembler with its guards, and
    the decoder its branch checks read."""
    return [*sorted(Path(__file__).parent.glob("*.py")), Path(__file__).parent.parent / "decode.py"]


@functools.cache
def _toolchain() -> str:
    """The assembler's sources (with the guards, testbed/asm/*.py, and the decoder its branch
    checks read, testbed/decode.py), the installed Keystone and Capstone: a change to any
    invalidates every entry (an entry is a program that passed the checks then). A package is
    identified by its Python files and its libraries' sizes and mtimes (found without importing
    it: only the worker process imports Keystone; and importlib.metadata costs ~20 ms a
    process)."""
    digest = hashlib.sha256()
    for path in _toolchain_sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for name in ("keystone", "capstone"):
        try:
            spec = importlib.util.find_spec(name)
            locations = list(spec.submodule_search_locations or []) if spec is not None else []
            for package in map(Path, locations):
                for path in sorted(package.iterdir()):
                    if path.suffix == ".py":
                        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
                    elif path.is_file():
                        stat = path.stat()
                        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
        except (ImportError, OSError, ValueError):
            digest.update(f"{name} unknown".encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _text_digest(text: str) -> str:
    """SHA-256 of a source's text, remembered: every build of a guest names the same runtime
    (~150 KB), and JSON-escaping it whole into each key cost ~10 % of a default scenario."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


#: Marks a path written relative to a root: MARK, the root's index, MARK, the rest of the path.
#: NUL is in no path and no source name the assembler is given (Roots.of refuses one that has it).
MARK = "\x00"


class Roots:
    """The directories an assembly's paths are written relative to in its key and its entry
    (module docstring): each source's directory, then each include directory, in that order,
    each once, spelled as the front end spells the directories it joins include names to
    (pathlib's: `a/./b` is `a/b`). A path under several roots is written relative to the
    longest. The current directory (`.`) is no root: paths relative to it stay as written,
    and mean the same files wherever the same relative names do."""

    def __init__(self, directories: Sequence[str]) -> None:
        self.directories = tuple(directories)
        self._prefixes = tuple(d if d.endswith(os.sep) else d + os.sep for d in self.directories)

    @classmethod
    def of(cls, names: Sequence[str], include_dirs: Sequence[Path]) -> Roots | None:
        """The roots of an assembly of the sources `names` (None if a name holds MARK: such an
        assembly is not cached across processes)."""
        found: dict[str, None] = {}
        for name in names:
            if MARK in name:
                return None
            if not name.startswith("<"):
                found.setdefault(str(Path(name).parent), None)
        for include_dir in include_dirs:
            if MARK in str(include_dir):
                return None
            found.setdefault(str(Path(include_dir)), None)
        found.pop(".", None)
        return cls(list(found))

    def relocate(self, path: str, *, skip: int = -1) -> str:
        """`path` relative to the longest root it lies under (but root `skip`), or as it is: a
        root itself is MARK index MARK, a path under it MARK index MARK and the rest after the
        root's separator."""
        best, length = -1, 0
        for index, prefix in enumerate(self._prefixes):
            if index != skip and len(prefix) > length and path.startswith(prefix):
                best, length = index, len(prefix)
        if best < 0:
            return path if path not in self.directories else f"{MARK}{self.directories.index(path)}{MARK}"
        return f"{MARK}{best}{MARK}{path[length:]}"

    def expand(self, written: str) -> str:
        """The path `relocate` wrote; ValueError if it names no root of this assembly."""
        if not written.startswith(MARK):
            return written
        index, mark, rest = written[1:].partition(MARK)
        if not mark or not index.isdigit() or int(index) >= len(self.directories):
            raise ValueError(f"no root {index!r}")
        return self._prefixes[int(index)] + rest if rest else self.directories[int(index)]

    def structure(self) -> list[str | None]:
        """How the roots lie: each one relative to the longest other root it is under, or None
        (free). Two assemblies whose roots lie alike map every path the same way."""
        lie: list[str | None] = []
        for index, directory in enumerate(self.directories):
            written = self.relocate(directory, skip=index)
            lie.append(None if written == f"{MARK}{index}{MARK}" else written)  # under none but itself
        return lie


#: No roots: every path as it is (the in-process digest of a program; a cache with no roots).
NO_ROOTS = Roots(())


def movable(included: Sequence[IncludeRecord]) -> bool:
    """Whether the includes an assembly read may be written relative to its roots: not when one
    was named by an absolute path, which names the same file from every checkout (and so does
    every relative include inside it)."""
    return not any(os.path.isabs(name) for name, _absent, _found, _digest in included)


def cache_key(
    sources: Sequence[tuple[str, str]], base: int, defines: Mapping[str, int | str], include_dirs: Sequence[Path],
    roots: Roots | None = None,
) -> str:
    """The entry name for one assembly: each source by its name (relative to `roots`, which
    default to the assembly's own, Roots.of) and its text's digest."""
    if roots is None:
        roots = Roots.of([name for name, _ in sources], include_dirs) or NO_ROOTS
    material = {
        "format": FORMAT,
        "toolchain": _toolchain(),
        "roots": roots.structure(),
        "sources": [[roots.relocate(name), _text_digest(text)] for name, text in sources],
        "base": base,
        "defines": [[name, type(value).__name__, str(value)] for name, value in defines.items()],
        "include_dirs": [roots.relocate(str(d)) for d in include_dirs],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _encode(program: Program, included: _Included, roots: Roots = NO_ROOTS) -> dict[str, Any]:
    """The entry's payload; every path relative to `roots` (module docstring)."""
    relocated: dict[str, str] = {}

    def written(path: str) -> str:
        found = relocated.get(path)
        if found is None:
            found = relocated[path] = roots.relocate(path)
        return found

    return {
        "code": program.code.hex(),
        "base": program.base,
        "symbols": dict(program.symbols),
        "asserts": [[site_id, written(s.file), s.line, s.kind, s.message] for site_id, s in program.asserts.items()],
        "lines": _encode_lines(LineTable.of(program.lines), written),
        "features": list(program.features),
        "included": [[name, [written(p) for p in absent], written(found), digest]
                     for name, absent, found, digest in included],
    }


def program_digest(program: Program) -> str:
    """SHA-256 over everything a Program holds (code, base, symbols, asserts, lines)."""
    return hashlib.sha256(json.dumps(_encode(program, ()), sort_keys=True).encode()).hexdigest()


def _encode_lines(table: LineTable, written: Callable[[str], str]) -> dict[str, Any]:
    """Program.lines as its columns: the file names (through `written`) and each number column
    as the hex of its little-endian array, which JSON reads as one string and _decode_lines
    back with no work per line (a runtime's table has thousands of lines)."""
    files, addresses, file_ids, line_numbers = table.columns()
    return {"files": [written(name) for name in files], "addresses": _column_hex(addresses),
            "file_ids": _column_hex(file_ids), "line_numbers": _column_hex(line_numbers)}


def _column_hex(column: array[int]) -> str:
    if sys.byteorder != "little":
        column = array(column.typecode, column)
        column.byteswap()
    return column.tobytes().hex()


def _column(text: object, typecode: str) -> array[int]:
    """The array _column_hex wrote; TypeError/ValueError if `text` is not one."""
    if not isinstance(text, str):
        raise TypeError("line table column")
    column = array(typecode)
    column.frombytes(bytes.fromhex(text))  # ValueError: not hex, or not whole items
    if sys.byteorder != "little":
        column.byteswap()
    return column


def _decode_lines(entry: Any, file: Callable[[object], str]) -> LineTable:
    """Program.lines from the entry's columns (_encode_lines), each file name through `file`
    (_decode's); TypeError/ValueError if they are not that (LineTable checks that the columns
    agree in length and name only files it holds)."""
    if not isinstance(entry, dict):
        raise TypeError("line table")
    files = tuple(file(name) for name in entry["files"])
    return LineTable(_column(entry["addresses"], "Q"), files, _column(entry["file_ids"], "I"),
                     _column(entry["line_numbers"], "Q"))


def _decode(payload: dict[str, Any], roots: Roots = NO_ROOTS) -> tuple[Program, _Included]:
    """The entry's program, its paths under `roots`; KeyError/TypeError/ValueError if it is
    not one (or names a root the assembly has not)."""
    files: dict[str, str] = {}  # one string object per file name

    def file(name: object) -> str:
        if not isinstance(name, str):
            raise TypeError("file name")
        found = files.get(name)
        if found is None:
            found = files[name] = roots.expand(name)
        return found

    def integer(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError("integer")
        return value

    symbols = payload["symbols"]
    if not isinstance(symbols, dict):
        raise TypeError("symbols")
    program = Program(
        code=bytes.fromhex(payload["code"]),
        base=integer(payload["base"]),
        symbols=MappingProxyType({str(name): integer(value) for name, value in symbols.items()}),
        asserts=MappingProxyType({
            integer(i): AssertSite(file(f), integer(line), str(kind), str(message))
            for i, f, line, kind, message in payload["asserts"]
        }),
        lines=_decode_lines(payload["lines"], file),
        features=tuple(str(name) for name in payload["features"]),
    )
    included = tuple(
        (str(name), tuple(file(p) for p in absent), file(found), str(digest))
        for name, absent, found, digest in payload["included"]
    )
    return program, included


#: Entries past which a store prunes the least recently used, down to PRUNE_TO (module docstring).
MAX_ENTRIES = 1000
PRUNE_TO = 800
_STALE_TEMPORARY_NS = 3600 * 10**9


def load(directory: Path, key: str, roots: Roots = NO_ROOTS) -> tuple[Program, _Included] | None:
    """The cached program for `key` and its includes, their paths under `roots` (the roots of
    the assembly the key was made for; a path relative to a root is a miss without them), or
    None (missing, unreadable, corrupt or stale). A hit touches the entry: pruning removes the
    least recently used."""
    path = directory / f"{key}.json"
    try:
        entry = json.loads(path.read_bytes())
        payload_text = entry["payload"]
        if (entry["format"] != FORMAT or entry["key"] != key
                or hashlib.sha256(payload_text.encode()).hexdigest() != entry["sha256"]):
            return None
        program, included = _decode(json.loads(payload_text), roots)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return None
    if not _includes_valid(included):
        return None
    with contextlib.suppress(OSError):  # a read-only cache is still read
        os.utime(path)
    return program, included


def prune(directory: Path) -> None:
    """Past MAX_ENTRIES entries, remove the least recently used (oldest mtime) down to PRUNE_TO,
    and temporary files older than an hour. Races with other processes are harmless: a removed
    entry is a miss, a file already gone is skipped."""
    try:
        with os.scandir(directory) as scan:
            files = [item for item in scan if item.name.endswith((".json", ".tmp"))]
    except OSError:
        return
    entries = [item for item in files if item.name.endswith(".json")]
    if len(entries) <= MAX_ENTRIES:
        return
    now = time.time_ns()
    aged: list[tuple[int, str]] = []
    for item in files:
        try:
            mtime = item.stat().st_mtime_ns
        except OSError:
            continue
        if item.name.endswith(".tmp"):
            if now - mtime > _STALE_TEMPORARY_NS:
                with contextlib.suppress(OSError):
                    os.unlink(item.path)
            continue
        aged.append((mtime, item.path))
    aged.sort()
    for _, path in aged[: max(len(aged) - PRUNE_TO, 0)]:
        with contextlib.suppress(OSError):
            os.unlink(path)


def store(directory: Path, key: str, program: Program, included: _Included, roots: Roots = NO_ROOTS) -> None:
    """Write the entry atomically, its paths relative to `roots`; any OSError leaves the cache
    as it was, silently."""
    payload_text = json.dumps(_encode(program, included, roots), separators=(",", ":"))
    entry = {
        "format": FORMAT,
        "key": key,
        "sha256": hashlib.sha256(payload_text.encode()).hexdigest(),
        "payload": payload_text,
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, separators=(",", ":"))
            os.replace(temporary, directory / f"{key}.json")
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError:
        return
    prune(directory)


# This process's programs too (a test matrix assembles one guest for many VM types): same key
# and roots, same include check.
_MEMORY_SIZE = 64
_memory: dict[tuple[str, tuple[str, ...]], tuple[Program, _Included]] = {}


def assemble_sources_cached(
    sources: Sequence[tuple[str, str]],
    *,
    base: int,
    defines: Mapping[str, int | str],
    include_dirs: Sequence[Path] = (),
) -> Program:
    """assemble_sources through this process's memory and the user cache (module docstring)."""
    found = Roots.of([name for name, _ in sources], include_dirs)
    roots = found or NO_ROOTS  # (None: a name holds MARK, the assembly stays in this process)
    key = cache_key(sources, base, defines, include_dirs, roots)
    memory_key = (key, roots.directories)
    hit = _memory.get(memory_key)
    if hit is not None and _includes_valid(hit[1]):
        return hit[0]
    directory = cache_dir() if found is not None else None
    hit = load(directory, key, roots) if directory is not None else None
    if hit is None:
        hit = _assemble_unit(sources, base, defines, include_dirs)
        if directory is not None and movable(hit[1]):
            store(directory, key, *hit, roots)
    if len(_memory) >= _MEMORY_SIZE:
        _memory.pop(next(iter(_memory)))
    _memory[memory_key] = hit
    return hit[0]
