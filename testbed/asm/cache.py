"""A content-addressed cache of assembled programs, shared by processes (the user's cache dir).

An entry's key is a SHA-256 over everything an assembly reads: the sources (names and texts),
the defines, the load address, the include directories, the assembler's own sources
(testbed/asm/*.py) and Keystone's version. The files the sources include are found only while
assembling, so an entry records each include (the file read, its SHA-256, and the candidate
paths tried before it and absent) and is used only if all of them still hold.

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
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from testbed.asm.assembler import _assemble_unit, _includes_valid
from testbed.asm.program import AssertSite, Program, SourceLocation

FORMAT = 2  # 2: Program.features (the image note)
DISABLED = ("off", "0", "none", "false", "no")

_Included = tuple[tuple[tuple[str, ...], str, str], ...]


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


@functools.cache
def _toolchain() -> str:
    """The assembler's sources and the installed Keystone: a change to either invalidates every
    entry. Keystone is identified by its Python binding's files and its library's size and
    mtime (found without importing it: only the worker process imports Keystone; and
    importlib.metadata costs ~20 ms a process)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        spec = importlib.util.find_spec("keystone")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        for package in map(Path, locations):
            for path in sorted(package.iterdir()):
                if path.suffix == ".py":
                    digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
                elif path.is_file():
                    stat = path.stat()
                    digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
    except (ImportError, OSError, ValueError):
        digest.update(b"keystone unknown")
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _text_digest(text: str) -> str:
    """SHA-256 of a source's text, remembered: every build of a guest names the same runtime
    (~150 KB), and JSON-escaping it whole into each key cost ~10 % of a default scenario."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def cache_key(
    sources: Sequence[tuple[str, str]], base: int, defines: Mapping[str, int | str], include_dirs: Sequence[Path]
) -> str:
    """The entry name for one assembly: each source by its name and its text's digest."""
    material = {
        "format": FORMAT,
        "toolchain": _toolchain(),
        "sources": [[name, _text_digest(text)] for name, text in sources],
        "base": base,
        "defines": [[name, type(value).__name__, str(value)] for name, value in defines.items()],
        "include_dirs": [str(d) for d in include_dirs],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _encode(program: Program, included: _Included) -> dict[str, Any]:
    return {
        "code": program.code.hex(),
        "base": program.base,
        "symbols": dict(program.symbols),
        "asserts": [[site_id, s.file, s.line, s.kind, s.message] for site_id, s in program.asserts.items()],
        "lines": [[address, loc.file, loc.line] for address, loc in program.lines],
        "features": list(program.features),
        "included": [[list(absent), found, digest] for absent, found, digest in included],
    }


def program_digest(program: Program) -> str:
    """SHA-256 over everything a Program holds (code, base, symbols, asserts, lines)."""
    return hashlib.sha256(json.dumps(_encode(program, ()), sort_keys=True).encode()).hexdigest()


#: The SourceLocations of the entries this process decoded, by file and line: the runtime's
#: thousands of lines are the same in every guest's entry, and finding a location costs less
#: than building the frozen dataclass again (locations are immutable, so programs may share
#: them). Bounded: forgotten when it holds _LOCATIONS_MAX_FILES files.
_LOCATIONS_MAX_FILES = 256
_locations: dict[str, dict[int, SourceLocation]] = {}


def _decode_lines(entries: Any) -> tuple[tuple[int, SourceLocation], ...]:
    """Program.lines from the entry's [address, file, line] lists; TypeError/ValueError if
    they are not that (the checks of `integer` and `file` in _decode, on the hot path)."""
    lines: list[tuple[int, SourceLocation]] = []
    append = lines.append
    for address, name, line in entries:
        by_line = _locations.get(name)
        if by_line is None:
            if not isinstance(name, str):
                raise TypeError("file name")
            if len(_locations) >= _LOCATIONS_MAX_FILES:
                _locations.clear()
            by_line = _locations[name] = {}
        if type(line) is not int and (not isinstance(line, int) or isinstance(line, bool)):
            raise TypeError("integer")
        location = by_line.get(line)
        if location is None:
            location = by_line[line] = SourceLocation(name, line)
        if type(address) is not int and (not isinstance(address, int) or isinstance(address, bool)):
            raise TypeError("integer")
        append((address, location))
    return tuple(lines)


def _decode(payload: dict[str, Any]) -> tuple[Program, _Included]:
    """The entry's program; KeyError/TypeError/ValueError if it is not one."""
    files: dict[str, str] = {}  # one string object per file name

    def file(name: object) -> str:
        if not isinstance(name, str):
            raise TypeError("file name")
        return files.setdefault(name, name)

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
        lines=_decode_lines(payload["lines"]),
        features=tuple(str(name) for name in payload["features"]),
    )
    included = tuple(
        (tuple(str(p) for p in absent), str(found), str(digest)) for absent, found, digest in payload["included"]
    )
    return program, included


#: Entries past which a store prunes the least recently used, down to PRUNE_TO (module docstring).
MAX_ENTRIES = 1000
PRUNE_TO = 800
_STALE_TEMPORARY_NS = 3600 * 10**9


def load(directory: Path, key: str) -> tuple[Program, _Included] | None:
    """The cached program for `key` and its includes, or None (missing, unreadable, corrupt or
    stale). A hit touches the entry: pruning removes the least recently used."""
    path = directory / f"{key}.json"
    try:
        entry = json.loads(path.read_bytes())
        payload_text = entry["payload"]
        if (entry["format"] != FORMAT or entry["key"] != key
                or hashlib.sha256(payload_text.encode()).hexdigest() != entry["sha256"]):
            return None
        program, included = _decode(json.loads(payload_text))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
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


def store(directory: Path, key: str, program: Program, included: _Included) -> None:
    """Write the entry atomically; any OSError leaves the cache as it was, silently."""
    payload_text = json.dumps(_encode(program, included), separators=(",", ":"))
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


# This process's programs too (a test matrix assembles one guest for many VM types): same key,
# same include check.
_MEMORY_SIZE = 64
_memory: dict[str, tuple[Program, _Included]] = {}


def assemble_sources_cached(
    sources: Sequence[tuple[str, str]],
    *,
    base: int,
    defines: Mapping[str, int | str],
    include_dirs: Sequence[Path] = (),
) -> Program:
    """assemble_sources through this process's memory and the user cache (module docstring)."""
    key = cache_key(sources, base, defines, include_dirs)
    hit = _memory.get(key)
    if hit is not None and _includes_valid(hit[1]):
        return hit[0]
    directory = cache_dir()
    hit = load(directory, key) if directory is not None else None
    if hit is None:
        hit = _assemble_unit(sources, base, defines, include_dirs)
        if directory is not None:
            store(directory, key, *hit)
    if len(_memory) >= _MEMORY_SIZE:
        _memory.pop(next(iter(_memory)))
    _memory[key] = hit
    return hit[0]
