"""Assembler front end: turns guest assembly sources into a loadable `Program`.

This is the only module that uses Keystone. It assembles Intel-syntax x86-64 sources with
Keystone 0.9.2 and adds what Keystone lacks or gets wrong, by rewriting text before Keystone
sees it and by asking Keystone more than once when something fails:

* `.include "file"` is resolved here (Keystone silently ignores it), relative to the including
  file first, then the include directories.
* Defines (`-D NAME=VALUE`) become `.equ NAME, VALUE` lines at the top of the unit.
* Every `GUEST_ASSERT*` statement gets a unique call-site id appended as its last macro
  argument; `Program.asserts` maps the id back to the file and line the assert is written at.
* Keystone mis-encodes a symbol after an operator in an instruction operand (`mov rax, -K`
  loads from memory at K, `[rbx - K]` adds K): such expressions are moved into hidden `.equ`
  lines, which it parses right (see `_hoist_operands`).
* Keystone has no symbol table API: a hidden `.quad` table appended to the unit reads each
  label's address back out of the encoding (see `_assemble`).
* Keystone reports errors without a location: they are located by bisection over statements
  (see `_locate_error`) and raised as `AsmError` "file:line: message". `.error "text"`, which
  Keystone ignores, is supported the same way (a reference to a symbol never defined).
* The guest API's value operands (GUEST_SYNC, GUEST_ASSERT_EQ, ...) are checked where they
  are written: no memory operands, no non-GPR registers, plain constants in range
  (`_guest_api_operands`); integer literals must fit 64 bits (`_check_literals`); `.if` and
  `.rept` may use only constants defined before them (`_ABSOLUTE_DIRECTIVES`).
* `Program.locate` maps any address of the code back to file:line and symbol+offset (for
  reports of unhandled exceptions).
* Keystone 0.9.2 hangs, aborts the process, or silently assembles something else on many
  malformed inputs. Known cases are rejected before assembling (`_Preprocessor`,
  `_check_operands`, `_UNSUPPORTED`); Keystone itself runs in a worker process with a timeout
  (`_Worker`), so a case nobody knew about becomes a located error rather than a hang.

Keystone 0.9.2 facts this module relies on are pinned in tests/test_keystone_canary.py.
"""

from __future__ import annotations

import atexit
import bisect
import difflib
import os
import re
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from testbed.errors import AsmError, TestbedError, UsageError

__all__ = [
    "CodeLocation",
    "Program",
    "SourceLocation",
    "assemble_files",
    "assemble_source",
    "parse_define",
    "read_source",
]


# --------------------------------------------------------------------------------------------
# Public value types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceLocation:
    """A line in a guest source file, as shown to users."""

    file: str
    line: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class CodeLocation:
    """Where an address in a program comes from: the statement's file:line, and the nearest
    label at or below the address with the offset from it (symbol None if there is none)."""

    file: str
    line: int  # 1-based
    symbol: str | None
    offset: int

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where} ({self.symbol}+0x{self.offset:x})" if self.symbol is not None else where


@dataclass(frozen=True)
class Program:
    """Encoded guest code, loaded at `base`, with the source information the host needs."""

    code: bytes
    base: int
    # Every label defined (and actually emitted) in the sources -> absolute address.
    symbols: Mapping[str, int]
    # GUEST_ASSERT* call-site id -> where that assert is written.
    asserts: Mapping[int, SourceLocation]
    # (address, location) of each top-level statement that emits bytes, by ascending address.
    # Statements inside .macro/.rept/.irp bodies are attributed to the invoking line.
    lines: Sequence[tuple[int, SourceLocation]] = ()

    @property
    def end(self) -> int:
        """The address just past the code."""
        return self.base + len(self.code)

    def symbol(self, name: str) -> int:
        """The address of label `name`; TestbedError naming it if the sources do not define it."""
        try:
            return self.symbols[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self.symbols), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TestbedError(f"symbol {name!r} is not defined in the guest program{hint}") from None

    def location(self, address: int) -> SourceLocation | None:
        """The statement that emitted the byte at `address`, if `lines` covers it."""
        if not self.base <= address < self.end:
            return None
        i = bisect.bisect_right(self.lines, address, key=lambda entry: entry[0]) - 1
        return self.lines[i][1] if i >= 0 else None

    def locate(self, address: int) -> CodeLocation | None:
        """Map an address in the code (e.g. a faulting RIP) back to its source line and symbol;
        None if no statement emitted a byte there. Inside a macro expansion the line is the
        one that invoked the macro."""
        where = self.location(address)
        if where is None:
            return None
        symbol, start = None, self.base
        # Of several labels at one address the last defined is nearest the code (`fault_site`
        # after `guest_main`); sorted() is stable, so definition order breaks ties.
        for name, value in sorted(self.symbols.items(), key=lambda item: item[1]):
            if value > address:
                break
            if self.base <= value:
                symbol, start = name, value
        return CodeLocation(where.file, where.line, symbol, address - start if symbol is not None else 0)


_NO_DEFINES: Mapping[str, int | str] = MappingProxyType({})


def parse_define(text: str) -> tuple[str, str]:
    """Split a command-line define `NAME=VALUE`; UsageError if it is not of that form."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
        raise UsageError(f"bad define {text!r}: expected NAME=VALUE, e.g. PAGES=4")
    _check_define(name, value)
    return name, value


def assemble_source(
    text: str,
    *,
    filename: str = "<string>",
    base: int,
    defines: Mapping[str, int | str] = _NO_DEFINES,
    include_dirs: Sequence[Path] = (),
) -> Program:
    """Assemble one source text; `filename` is used in locations and to resolve includes."""
    return _assemble([(filename, text)], base, defines, include_dirs)


def assemble_sources(
    sources: Sequence[tuple[str, str]],
    *,
    base: int,
    defines: Mapping[str, int | str] = _NO_DEFINES,
    include_dirs: Sequence[Path] = (),
) -> Program:
    """Assemble (filename, text) pairs in order as one unit; each keeps its own locations."""
    return _assemble(list(sources), base, defines, include_dirs)


def assemble_files(
    paths: Sequence[Path],
    *,
    base: int,
    defines: Mapping[str, int | str] = _NO_DEFINES,
    include_dirs: Sequence[Path] = (),
) -> Program:
    """Assemble the files in order as one unit; each keeps its own file:line locations."""
    sources = [(str(path), read_source(path)) for path in paths]
    return _assemble(sources, base, defines, include_dirs)


def read_source(path: Path | str) -> str:
    """The text of a guest source file: UsageError if it cannot be read, AsmError naming the
    line if it is not UTF-8."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read guest source {path}: {e.strerror or e}") from None
    except ValueError as e:  # e.g. a NUL character in the path
        raise UsageError(f"cannot read guest source {path!r}: {e}") from None
    return _decode_source(data, str(path), None)


def _decode_source(data: bytes, file: str, included_at: SourceLocation | None) -> str:
    """`data` decoded as UTF-8, or AsmError at the line of the first byte that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = f" (included at {included_at})" if included_at is not None else ""
        raise AsmError(
            file, line, f"not UTF-8 text: byte 0x{data[e.start]:02x} ({e.reason}){where}; guest sources are UTF-8"
        ) from None


# --------------------------------------------------------------------------------------------
# The Keystone seam
# --------------------------------------------------------------------------------------------


class _KeystoneError(Exception):
    """Keystone refused a unit (or hung or crashed on it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # "KS_ERR_ASM_..." from Keystone, or _HANG / _CRASH
        self.message = message


_HANG = "HANG"
_CRASH = "CRASH"
_KS_SYMBOL_MISSING = "KS_ERR_ASM_SYMBOL_MISSING"
_KS_SYMBOL_REDEFINED = "KS_ERR_ASM_SYMBOL_REDEFINED"
_KS_MNEMONIC = "KS_ERR_ASM_MNEMONICFAIL"

# Seconds Keystone may take before it is taken to hang: a floor plus a generous rate (it
# assembles about 3 us per statement). Bisection probes after a hang use the shorter floor,
# since several of them may hang in turn. Tests lower these.
_TIMEOUT_FLOOR = 3.0
_PROBE_TIMEOUT_FLOOR = 0.5
_TIMEOUT_PER_BYTE = 2e-6
_STARTUP_TIMEOUT = 60.0

# The worker: runs in its own process with a single Keystone engine, reads requests
# (base, length, text) on stdin and answers (length, status, payload) on a private copy of
# stdout. fd 1 itself goes to /dev/null so that nothing Keystone prints can corrupt replies.
_WORKER_SOURCE = r"""
import os, struct, sys
from keystone import KS_ARCH_X86, KS_MODE_64, Ks, KsError
replies = os.fdopen(os.dup(1), "wb")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
requests = sys.stdin.buffer
ks = Ks(KS_ARCH_X86, KS_MODE_64)
replies.write(b"R")
replies.flush()
while True:
    header = requests.read(12)
    if len(header) < 12:
        break
    base, size = struct.unpack("<QI", header)
    text = requests.read(size)
    try:
        encoding, _count = ks.asm(text, base, as_bytes=True)
        reply = b"\0" + (encoding or b"")
    except KsError as e:
        reply = b"\1" + str(e).encode()
    replies.write(struct.pack("<I", len(reply)) + reply)
    replies.flush()
"""


class _StalledError(Exception):
    """The worker did not answer in time."""


class _Worker:
    """Keystone in a child process, so that its hangs and crashes cannot take the testbed along.

    Hazard: Keystone 0.9.2 loops forever on many malformed statements (`.equ X = 5`,
    `.byte 1,,2`, a statement starting with an operator, an unterminated string) and aborts
    the process on others (`.text`, `.cfi_startproc`). The checks in _Preprocessor reject the
    known cases with a better message; the worker catches the rest. Canaries:
    test_statement_starting_with_an_operator_hangs, test_text_directive_crashes_the_process.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()
        self._lock = threading.Lock()
        atexit.register(self.close)

    def close(self) -> None:
        """Stop the worker process, if this process started one."""
        process, self._process = self._process, None
        if process is not None and self._owner == os.getpid():
            process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()

    def _start(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._process = process
        assert process.stdout is not None
        # Start-up (importing Keystone) does not count against a request's timeout.
        try:
            ready = _read_exactly(process.stdout.fileno(), 1, time.monotonic() + _STARTUP_TIMEOUT)
        except (_StalledError, OSError, EOFError):
            ready = b""
        if ready != b"R":
            self.close()
            raise TestbedError("cannot start the Keystone worker process (is keystone-engine installed?)")
        return process

    def assemble(self, text: bytes, base: int, timeout: float) -> tuple[bool, bytes]:
        """(True, encoding) or (False, Keystone's error text); _KeystoneError on hang or crash."""
        with self._lock:
            if self._owner != os.getpid():  # forked: the worker and its pipes are the parent's
                self._process, self._owner = None, os.getpid()
            process = self._process or self._start()
            assert process.stdin is not None and process.stdout is not None
            deadline = time.monotonic() + timeout
            try:
                process.stdin.write(struct.pack("<QI", base, len(text)) + text)
                process.stdin.flush()
                fd = process.stdout.fileno()
                (size,) = struct.unpack("<I", _read_exactly(fd, 4, deadline))
                reply = _read_exactly(fd, size, deadline)
            except _StalledError:
                self.close()
                raise _KeystoneError(_HANG, f"Keystone did not finish within {timeout:g} s") from None
            except (OSError, EOFError):
                try:
                    status = process.wait(timeout=5)
                    how = f"signal {-status}" if status < 0 else f"exit status {status}"
                except subprocess.TimeoutExpired:
                    how = "closed its output"
                self.close()
                raise _KeystoneError(_CRASH, f"Keystone crashed ({how})") from None
        return reply[0] == 0, reply[1:]


def _read_exactly(fd: int, size: int, deadline: float) -> bytes:
    chunks = []
    while size:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise _StalledError
        chunk = os.read(fd, size)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


_worker = _Worker()


def _ks_asm(text: str, base: int, timeout_floor: float | None = None) -> bytes:
    """Encode `text` at `base`, or raise _KeystoneError."""
    # bytes: Keystone takes UTF-8 string literals through unchanged.
    data = text.encode("utf-8")
    floor = _TIMEOUT_FLOOR if timeout_floor is None else timeout_floor
    ok, payload = _worker.assemble(data, base, floor + len(data) * _TIMEOUT_PER_BYTE)
    if ok:
        return payload
    # Keystone's text is e.g. "Invalid operand (KS_ERR_ASM_INVALIDOPERAND)". KsError's
    # get_asm_count() does not locate the error (see _locate_error), so it is not used.
    raw = payload.decode("utf-8", "replace")
    code = m.group(1) if (m := re.search(r"\((KS_ERR_\w+)\)", raw)) else "KS_ERR"
    message = re.sub(r"\s*\(KS_ERR_\w+\)\s*$", "", raw) or "error"
    raise _KeystoneError(code, message[0].lower() + message[1:])


# --------------------------------------------------------------------------------------------
# Lexing: sources -> statements
# --------------------------------------------------------------------------------------------

# Keystone's statements end at a newline or `;`; comments are `#` or `//` to the end of the
# line and `/* ... */` (which may span lines and does not end the statement). Strings and
# character literals may contain any of these characters.
_TOKEN = re.compile(
    r"""
    (?P<newline>\n)
  | (?P<sep>;)
  | (?P<line_comment>(?:\#|//)[^\n]*)
  | (?P<block_comment>/\*.*?\*/)
  | (?P<open_comment>/\*)
  | (?P<string>"(?:[^"\\\n]|\\[^\n])*")
  | (?P<open_string>")
  | (?P<char>'(?:\\[^\n]|[^\\'\n])')
  | (?P<open_char>')
  | (?P<text>[A-Za-z0-9_.$@+\-*%~!&|^<>=()\[\]{},:\\ \t\r]+|/)
  | (?P<bad>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def _bad_character(char: str, file: str, line: int) -> AsmError:
    """Hazard: a character Keystone's lexer cannot lex (a backtick, `?`, a control character,
    any non-ASCII character outside a string) makes ks_asm loop forever, so it is refused."""
    what = "non-ASCII character" if ord(char) > 0x7F else "character"
    return AsmError(file, line, f"{what} {char!r} is not allowed outside a string literal")


@dataclass(frozen=True)
class _Raw:
    """One statement as written: text without comments, and where it starts."""

    text: str
    line: int


def _split_statements(source: str, file: str) -> list[_Raw]:
    """Split a source into statements the way Keystone's lexer does, minus comments.

    Unterminated strings and block comments are refused here: Keystone hangs on them.
    Canaries: test_semicolon_separates_statements, test_hash_starts_a_comment,
    test_block_comment_does_not_end_a_statement.
    """
    statements: list[_Raw] = []
    parts: list[str] = []
    line = 1
    start = 0  # line of the statement being collected, 0 while it is still blank

    def flush() -> None:
        nonlocal start
        text = "".join(parts).strip()
        if text:
            statements.append(_Raw(text, start))
        parts.clear()
        start = 0

    for m in _TOKEN.finditer(source):
        kind, token = m.lastgroup, m.group()
        if kind == "newline":
            flush()
            line += 1
            continue
        if kind == "sep":
            flush()
            continue
        if kind == "line_comment":
            continue
        if kind == "block_comment":
            parts.append(" ")
            line += token.count("\n")
            continue
        if kind == "open_comment":
            raise AsmError(file, line, "unterminated /* comment")
        if kind == "open_string":
            raise AsmError(file, line, "unterminated string literal")
        if kind == "open_char":
            raise AsmError(file, line, "malformed character literal (expected e.g. 'a' or '\\n')")
        if kind == "bad":
            raise _bad_character(token, file, line)
        if kind in ("string", "char") and "\0" in token:
            raise AsmError(file, line, "NUL character in a literal: use .byte 0")
        if not start and token.strip():
            start = line
        parts.append(token.replace("\r", " "))
    flush()
    return statements


# --------------------------------------------------------------------------------------------
# Statement analysis
# --------------------------------------------------------------------------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# A label at the start of a statement; a `\` in it means it is built from macro arguments.
_LABEL = re.compile(r"([A-Za-z_.$\\][\w.$@\\()]*)\s*:(?![:=])\s*")
_NUMERIC_LABEL = re.compile(r"\d+\s*:")
_BAD_EXPONENT = re.compile(r"\b\d+(?:\.\d*)?[eE](?=\W|$)(?![+-]?\d)")
_REAL_NUMBER = re.compile(r"\b\d+(?:\.\d*[eE][+-]?\d+|\.\d*|[eE][+-]?\d*)(?=\W|$)")
_ASSIGNMENT = re.compile(r"([A-Za-z_.$][\w.$@]*)\s*=(?!=)")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERAL = re.compile(r""""(?:[^"\\\n]|\\.)*"|'(?:\\.|[^\\'])'""")
# Identifiers in an expression; macro parameter references and numbers are matched only so
# that they are skipped.
_REFERENCE = re.compile(r"\\[\w$.]*|\\\(\)|\d[\w.]*|[A-Za-z_.$][\w.$@]*")
_MACRO_PARAM_REF = re.compile(r"\\([\w$.]*)(\(\))?|\\(.)")
_REGISTER = re.compile(
    r"""[re]?[abcd]x|[abcd][lh]|[re]?(?:si|di|sp|bp|ip)|(?:si|di|sp|bp)l|r(?:[89]|1[0-5])[dwb]?
      |[c-gs]s|cr\d+|dr\d+|st\d?|mm\d|[xyz]mm\d+|k[0-7]|bnd[0-3]|[re]?flags""",
    re.VERBOSE,
)
_OPERAND_KEYWORDS = _words(
    "ptr byte word dword qword tbyte xword oword fword mmword xmmword ymmword zmmword offset short "
    "near far and or xor not shl shr mod rel z sae rn rd ru rz"
)
_PREFIXES = _words("rep repe repz repne repnz lock xacquire xrelease notrack bnd data16 addr32")

_BLOCK_OPENERS = {
    ".macro": ".endm",
    ".rept": ".endr",
    ".irp": ".endr",
    ".irpc": ".endr",
    **dict.fromkeys(
        _words(".if .ifeq .ifne .ifgt .ifge .iflt .ifle .ifdef .ifndef .ifnotdef .ifb .ifnb .ifc .ifnc")
        | {".ifeqs", ".ifnes"},
        ".endif",
    ),
}
_BLOCK_CLOSERS = {".endm": ".endm", ".endmacro": ".endm", ".endr": ".endr", ".endif": ".endif"}
_DATA_DIRECTIVES = _words(
    ".byte .short .word .value .2byte .int .long .4byte .quad .8byte .octa .uleb128 .sleb128 .ascii "
    ".asciz .string .single .float .double .align .balign .p2align .org .fill .zero .skip .space"
)
# Directives whose operands are expressions that may reference symbols.
_EXPRESSION_DIRECTIVES = (_DATA_DIRECTIVES - {".ascii", ".asciz", ".string"}) | _words(
    ".equ .set .equiv .rept .if .elseif .ifeq .ifne .ifgt .ifge .iflt .ifle"
)
_SUPPORTED_DIRECTIVES = (
    _DATA_DIRECTIVES
    | _BLOCK_OPENERS.keys()
    | _BLOCK_CLOSERS.keys()
    | _words(".equ .set .equiv .else .elseif .exitm .purgem .intel_syntax .code64 .error")
)
# Why the directives Keystone 0.9.2 mishandles are rejected. Any other directive not in
# _SUPPORTED_DIRECTIVES is rejected too: Keystone silently ignores unknown directives.
# Canaries: test_unknown_directive_is_silently_ignored, test_section_directive_empties_the_output,
# test_globl_zeroes_absolute_references, test_text_directive_crashes_the_process.
_SECTIONS = "sections are not supported: the program is one flat image at its base address"
_UNSUPPORTED = {
    ".text": f"{_SECTIONS} (.text crashes Keystone 0.9.2)",
    ".data": f"{_SECTIONS} (.data crashes Keystone 0.9.2)",
    ".bss": _SECTIONS,
    ".section": f"{_SECTIONS} (Keystone 0.9.2 returns no code at all after .section)",
    ".pushsection": _SECTIONS,
    ".popsection": _SECTIONS,
    ".previous": _SECTIONS,
    ".att_syntax": "only Intel syntax is supported",
    ".globl": "a flat image needs no .globl, and with it Keystone 0.9.2 encodes absolute references to "
    "the symbol (.quad sym, mov rax, sym) as 0",
    ".global": "a flat image needs no .global, and with it Keystone 0.9.2 encodes absolute references to "
    "the symbol (.quad sym, mov rax, sym) as 0",
    ".end": "Keystone 0.9.2 silently drops everything after .end, including later files",
    ".err": 'Keystone 0.9.2 silently ignores .err; use .error "message"',
    ".warning": "Keystone 0.9.2 ignores .warning",
    ".incbin": "use .include for sources; .incbin is not supported",
    ".balignw": "Keystone 0.9.2 aborts the process on .balignw; use .balign",
    ".balignl": "Keystone 0.9.2 aborts the process on .balignl; use .balign",
    ".p2alignw": "Keystone 0.9.2 aborts the process on .p2alignw; use .p2align",
    ".p2alignl": "Keystone 0.9.2 aborts the process on .p2alignl; use .p2align",
    ".align32": "Keystone 0.9.2 aborts the process on .align32; use .balign",
}
# Mnemonics Keystone 0.9.2 lacks, with the bytes to emit instead (Intel TDX module spec, AMD
# APM vol. 3). Canary: test_confidential_vm_mnemonics_are_missing.
_MISSING_MNEMONICS = {
    "tdcall": ".byte 0x66, 0x0f, 0x01, 0xcc",
    "pvalidate": ".byte 0xf2, 0x0f, 0x01, 0xff",
    "rmpadjust": ".byte 0xf3, 0x0f, 0x01, 0xfe",
    "vmgexit": "rep vmmcall",
    "sysretq": ".byte 0x48, 0x0f, 0x07",
}
# Hazard: Keystone 0.9.2 silently drops an .if whose expression it cannot evaluate yet (a
# label, even one defined before; a symbol defined later): the body is assembled and the
# .else/.endif then act on the enclosing block. `.rept LATER` repeats once. So these
# directives may use only names defined before them from constants (testbed/asm.py tracks
# which; inside macro bodies it cannot, and the prelude looks at no value there).
# Canary: tests/test_guest_api_immediates.py::test_if_on_a_symbol_defined_later_is_dropped.
_ABSOLUTE_DIRECTIVES = _words(".if .elseif .ifeq .ifne .ifgt .ifge .iflt .ifle .rept")
# Directives whose operands are names or raw text rather than expressions.
_FREE_FORM_DIRECTIVES = _words(".macro .irp .irpc .purgem .ifc .ifnc .ifb .ifnb .ifeqs .ifnes .ifdef .ifndef")
_NAME = r"(?:[A-Za-z_.$][\w.$@]*|\\[\w$.]+)"
_NAME_OPERAND = {
    ".purgem": re.compile(_NAME),
    ".ifdef": re.compile(_NAME),
    ".ifndef": re.compile(_NAME),
    ".irp": re.compile(rf"{_NAME}\s*(?:,.*)?", re.DOTALL),
    ".irpc": re.compile(rf"{_NAME}\s*(?:,.*)?", re.DOTALL),
}
_NAME_DIRECTIVES = _NAME_OPERAND.keys()
_NAME_OPERAND_HELP = {
    ".purgem": "a macro name",
    ".ifdef": "a symbol name",
    ".ifndef": "a symbol name",
    ".irp": "a parameter name and values: .irp reg, rax, rbx",
    ".irpc": "a parameter name and characters: .irpc c, 123",
}
_RESERVED_PREFIX = "__tb_"  # hidden labels this module adds to the unit
# How deep `.include`s may nest: deeper is almost surely a mistake, and each level costs
# Python stack frames (329 levels used to end in RecursionError).
_MAX_INCLUDE_DEPTH = 100


# The guest API's macros that take values (guests/lib/prelude.s): their operands are
# general-purpose registers, matched by name in lower case by the prelude's __guest_kind, or
# immediates, loaded with movabs. Anything else is refused here, where it is written.
_GUEST_API_VALUE_MACROS = _words("GUEST_SYNC GUEST_ASSERT_EQ GUEST_RUN_USER GUEST_SET_HANDLER GHCB_SET GUEST_TERMINATE")
# Operands (by position) that must be constants, not registers.
_GUEST_API_CONSTANTS = {"GUEST_TERMINATE": ("reason set", "reason code"), "GHCB_SET": ("field offset",)}
# The ranges the prelude checks at run time (a ud2 at the caller's line), checked here too
# where the operand is a plain constant: (operand position, name, lowest, highest).
_GUEST_API_RANGES = {
    "GUEST_TERMINATE": ((0, "reason set", 0, 15), (1, "reason code", 0, 255)),
    "GHCB_SET": ((0, "field offset", 0, 0xFF8),),
    "GUEST_SET_HANDLER": ((0, "vector", 0, 31),),
}
_GPR = re.compile(
    r"r(?:[abcd]x|[sd]i|[sb]p|[89]|1[0-5])|e(?:[abcd]x|[sd]i|[sb]p)|r(?:[89]|1[0-5])[dwb]|[abcd]x|[sd]i|[sb]p"
    r"|[abcd][lh]|(?:[sd]i|[sb]p)l"
)


def _gpr_width(name: str) -> int:
    """The width of general-purpose register `name` (lower case)."""
    if re.fullmatch(r"r(?:[abcd]x|[sd]i|[sb]p|[89]|1[0-5])", name):
        return 64
    if name[0] == "e" or re.fullmatch(r"r\d+d", name):
        return 32
    return 16 if re.fullmatch(r"[abcd]x|[sd]i|[sb]p|r\d+w", name) else 8


def _constant(text: str, constants: Mapping[str, int]) -> int | None:
    """The value of `text` if it is an integer literal or a known constant, maybe negated."""
    m = re.fullmatch(r"(-\s*)?([\w.$]+)", text.strip())
    if not m:
        return None
    token = m.group(2)
    value = constants.get(token) if not token[0].isdigit() else _integer_value(token)
    if value is None:
        return None
    return -value if m.group(1) else value


def _check_guest_api_ranges(
    mnemonic: str, words: Sequence[str], constants: Mapping[str, int], loc: SourceLocation
) -> None:
    """Refuse a plain constant the prelude would refuse at run time, or that cannot equal the
    narrow register it is compared with."""
    for position, what, low, high in _GUEST_API_RANGES.get(mnemonic, ()):
        value = _constant(words[position], constants) if position < len(words) else None
        if value is not None and not low <= value <= high:
            limit = f"{high:#x}" if high > 255 else str(high)
            message = f"{mnemonic}: the {what} must be {low} to {limit}, not {words[position]}"
            raise AsmError(loc.file, loc.line, message)
    if mnemonic == "GUEST_ASSERT_EQ" and len(words) >= 2:
        for register, other in ((words[0], words[1]), (words[1], words[0])):
            value = _constant(other, constants)
            if value is None or not _GPR.fullmatch(register.lower()):
                continue
            width = _gpr_width(register.lower())
            if width < 64 and not -(1 << (width - 1)) <= value < (1 << width):
                raise AsmError(
                    loc.file, loc.line, f"GUEST_ASSERT_EQ: {other} does not fit the {width}-bit register {register} "
                    "(signed or unsigned), so the assert could never pass"
                )


def _guest_api_operands(mnemonic: str, operands: str, constants: Mapping[str, int], loc: SourceLocation) -> str:
    """The operands of a guest-API macro call with register names in lower case; AsmError for
    an operand the prelude cannot load (a memory operand, a register that is not a GPR) or a
    constant out of range."""
    _check_guest_api_ranges(mnemonic, [w.strip() for w in _split_top_level(operands)], constants, loc)
    pieces = []
    constants_only = _GUEST_API_CONSTANTS.get(mnemonic, ())
    for i, piece in enumerate(_split_top_level(operands)):
        word = piece.strip()
        plain = _strip_literals(word)
        if "[" in plain:
            raise AsmError(
                loc.file, loc.line, f"{mnemonic} takes registers and immediates, not memory operands ({word}): "
                "load the value into a register first"
            )
        lower = word.lower()
        if i < len(constants_only) and _REGISTER.fullmatch(lower):
            raise AsmError(
                loc.file, loc.line, f"{mnemonic}: the {constants_only[i]} must be a constant, not register {word}"
            )
        if _REGISTER.fullmatch(lower) and not _GPR.fullmatch(lower):
            raise AsmError(
                loc.file, loc.line, f"{mnemonic} takes general-purpose registers and immediates, not {word}: "
                "move the value into a general-purpose register first"
            )
        pieces.append(piece.replace(word, lower) if _GPR.fullmatch(lower) else piece)
    return ",".join(pieces)


@dataclass(frozen=True)
class _Param:
    name: str
    required: bool  # no default value
    vararg: bool


@dataclass
class _Macro:
    name: str
    params: tuple[_Param, ...]
    loc: SourceLocation
    index: int  # of its .macro item: Keystone knows a macro only after its definition
    body_refs: set[str] = field(default_factory=set)
    body_labels: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Item:
    """One unit of the text handed to Keystone, and what it means to error reporting."""

    text: str  # one or more lines
    loc: SourceLocation
    mnemonic: str = ""
    labels: tuple[str, ...] = ()  # plain labels this statement defines
    refs: frozenset[str] = frozenset()  # identifiers it may reference as symbols
    closers: tuple[str, ...] = ()  # directives that close the blocks still open after it
    define: tuple[str, str] | None = None  # set for the .equ lines made from defines


@dataclass(frozen=True)
class _Label:
    name: str
    loc: SourceLocation
    conditional: bool  # inside a block: may be defined zero times


def _strip_literals(text: str) -> str:
    """`text` with the insides of string literals blanked and character literals made numbers,
    for analysis only; lengths are kept, so positions found in it are positions in `text`."""
    if '"' not in text and "'" not in text:
        return text

    def mask(m: re.Match[str]) -> str:
        literal = m.group()
        return '"' + " " * (len(literal) - 2) + '"' if literal[0] == '"' else "0" * len(literal)

    return _LITERAL.sub(mask, text)


def _split_labels(text: str) -> tuple[list[str], str]:
    """Labels at the start of a statement, and the rest of it."""
    labels = []
    while m := _LABEL.match(text):
        labels.append(m.group(1))
        text = text[m.end() :]
    return labels, text


def _references(operands: str) -> set[str]:
    """Identifiers in `operands` that could name a symbol."""
    text = _strip_literals(operands)
    names = set()
    for m in _REFERENCE.finditer(text):
        token = m.group()
        if token[0] == "\\" or token[0].isdigit() or token in (".", "$"):
            continue
        # Part of a name pasted together from macro arguments (`isr_\n`): not a name itself.
        if (m.end() < len(text) and text[m.end()] == "\\") or (m.start() > 0 and text[m.start() - 1] == ")"):
            continue
        lower = token.lower()
        if _REGISTER.fullmatch(lower) or lower in _OPERAND_KEYWORDS:
            continue
        names.add(token)
    return names


# One `.macro` parameter: `name`, `name:req`, `name:vararg` or `name=default`.
_MACRO_PARAM = re.compile(r"\s*,?\s*([A-Za-z_$][\w$.]*)(?:\s*:\s*(\w+))?(?:\s*=\s*(\"[^\"]*\"|[^,\s]*))?")


def _parse_macro_params(text: str, file: str, line: int) -> tuple[str, tuple[_Param, ...]]:
    """Name and parameters of a `.macro NAME p1, p2=default, p3:req, rest:vararg` line."""
    m = re.match(r"\s*([A-Za-z_.$][\w.$@]*)\s*,?", text)
    if not m:
        raise AsmError(file, line, ".macro needs a name")
    params = []
    rest = text[m.end() :]
    pos = 0
    while pos < len(rest) and rest[pos:].strip():
        pm = _MACRO_PARAM.match(rest, pos)
        if not pm or pm.end() == pos:
            raise AsmError(file, line, f"cannot parse macro parameters {rest.strip()!r}")
        qualifier = (pm.group(2) or "").lower()
        params.append(_Param(pm.group(1), qualifier == "req" or pm.group(3) is None, qualifier == "vararg"))
        pos = pm.end()
    return m.group(1), tuple(params)


_BINARY_OPERATOR_START = re.compile(r"(?:[*/%&|^<>=]|!=)")
_OPERATOR_END = re.compile(r"[-+*/%&|^~!<>=(]$")
_EQU_OPERANDS = re.compile(r"[A-Za-z_.$\\][\w.$@\\()]*\s*,\s*\S")


def _check_operands(directive: str, operands: str, macro_call: bool, loc: SourceLocation) -> None:
    """Reject malformed operands before Keystone sees them.

    Hazard: on these Keystone 0.9.2 either loops forever (`.equ X = 5`, `.byte 1,,2`,
    `.quad [1]`, `.byte &`) or silently assembles something else (`mov rax, [rbx` becomes
    `movabs rax, [0]`; `.byte 1 +` and `mov rax, &` vanish). Canaries:
    test_unclosed_bracket_becomes_absolute_zero, test_empty_operand_drops_the_statement.
    """
    text = _strip_literals(operands)
    depth: list[str] = []
    for c in text:
        if c in "([{":
            depth.append(c)
        elif c in ")]}" and (not depth or "([{"[")]}".index(c)] != depth.pop()):
            raise AsmError(loc.file, loc.line, f"unbalanced {c!r} in {operands!r}")
    if depth:
        raise AsmError(loc.file, loc.line, f"unclosed {depth[-1]!r} in {operands!r}")
    if directive in (".equ", ".set", ".equiv") and not _EQU_OPERANDS.match(operands):
        raise AsmError(loc.file, loc.line, f"{directive} expects NAME, VALUE")
    if directive in _DATA_DIRECTIVES and ("[" in text or "{" in text):
        raise AsmError(loc.file, loc.line, f"brackets are not allowed in {directive} operands")
    if not text.strip() or macro_call:
        return  # macro arguments may be empty or partial expressions
    pieces = _split_top_level(text)
    if directive in (".align", ".balign", ".p2align", ".fill") and len(pieces) > 1:
        pieces = [p for p in pieces if p.strip()]  # `.balign 8, , 3` omits the fill value
    for piece in (p.strip() for p in pieces):
        if not piece:
            raise AsmError(loc.file, loc.line, f"empty operand in {operands!r}")
        if _BINARY_OPERATOR_START.match(piece) or _OPERATOR_END.search(piece):
            raise AsmError(loc.file, loc.line, f"incomplete expression {piece!r}")


# Integer literals as Keystone reads them: 0x hex, 0b binary, h-suffixed hex, 0-prefixed
# octal, decimal. A `-` counts as unary after the start, an opening bracket, a comma or an
# operator.
_INTEGER = re.compile(
    r"(?P<minus>(?:^|(?<=[(\[,+\-*/%&|^~!<>=]))\s*-\s*)?"
    r"\b(?P<number>0[xX][0-9a-fA-F]+|0[bB][01]+|[0-9][0-9a-fA-F]*[hH]|[0-9]+)\b"
)


_DIGIT = re.compile(r"\d")


def _integer_value(token: str) -> int | None:
    lower = token.lower()
    try:
        if lower.startswith(("0x", "0b")):
            return int(lower, 0)
        if lower.endswith("h"):
            return int(lower[:-1], 16)
        return int(lower, 8) if len(lower) > 1 and lower[0] == "0" else int(lower)
    except ValueError:
        return None  # e.g. 09: Keystone reports it


def _check_literals(text: str, loc: SourceLocation) -> None:
    """Refuse an integer literal outside [-2^63, 2^64).

    Hazard: Keystone 0.9.2 hangs on one in a directive (`.quad 0x10000000000000000`),
    silently drops a macro call that passes one (`GUEST_SYNC 0x10000000000000000` assembles
    without its `movabs`), and silently wraps `-0x8000000000000001` to 0x7fffffffffffffff.
    Canaries: tests/test_guest_api_immediates.py (test_oversized_literal_*).
    """
    plain = _strip_literals(text)
    if not _DIGIT.search(plain):
        return
    for m in _INTEGER.finditer(plain):
        value = _integer_value(m.group("number"))
        if value is None:
            continue
        limit = 2**63 if m.group("minus") else 2**64 - 1
        if value > limit:
            number = m.group(0).strip().replace(" ", "")
            raise AsmError(loc.file, loc.line, f"the number {number} does not fit in 64 bits")


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets and literals."""
    pieces, depth, start = [], 0, 0
    for i, c in enumerate(_strip_literals(text)):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return pieces


# Hazard: in instruction operands Keystone's Intel-syntax parser handles a symbol only as the
# first token of an immediate, and only as one added term of an address: `mov rax, -K` and
# `cmp rax, 1+K` load from memory at K, `[rbx - K]` becomes `[rbx + K]`, `[rbx + K*8]` becomes
# `[rbx + K]`, silently. Directive expressions are parsed right, so such an expression is moved
# into a hidden `.equ` just before the statement (`.equ` may be redefined, so this works in
# macro bodies too). Canaries: test_symbol_after_an_operator_becomes_a_memory_operand,
# test_negated_symbol_in_an_address_loses_its_sign.
_BARE_NAME = re.compile(r"[A-Za-z_.$][\w.$@]*")
_PARAM_TOKEN = re.compile(r"\\[\w$.]")
_SYMBOL_FIRST = re.compile(r"\s*(?:\\[\w$.]|[A-Za-z_.$])")
_ADDRESS = re.compile(r"\[([^\[\]]*)\]")


def _symbolic(text: str) -> bool:
    """Whether (literal-free) `text` names a symbol or a macro parameter that may be one."""
    return bool(_references(text) or _PARAM_TOKEN.search(text))


def _signed_terms(text: str) -> list[tuple[str, int, int]]:
    """The terms of a (literal-free) sum as (sign, start, end), split at `+`/`-` outside parentheses."""
    terms, depth, sign, start = [], 0, "+", 0
    for i, c in enumerate(text):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c in "+-" and depth == 0:
            if text[start:i].strip():
                terms.append((sign, start, i))
                sign = c
            elif c == "-":  # a unary minus at the start of a term
                sign = "-" if sign == "+" else "+"
            start = i + 1
    if text[start:].strip():
        terms.append((sign, start, len(text)))
    return terms


def _hoist_operands(operands: str, new_name: Callable[[], str]) -> tuple[str, list[str]]:
    """Operands with every expression Keystone would mis-encode replaced by a hidden `.equ` name,
    and the `.equ` lines defining those names."""
    hoisted: list[str] = []

    def hoist(expression: str) -> str:
        name = new_name()
        hoisted.append(f".equ {name}, {expression}")
        return name

    def address(content: str) -> str:
        plain = _strip_literals(content)
        if not _symbolic(plain):
            return content
        base, displacement, symbols = [], [], []
        for sign, start, end in _signed_terms(plain):
            term, original = plain[start:end].strip(), content[start:end].strip()
            words = re.findall(r"[A-Za-z_][\w]*", term)
            if "\\" in term or any(_REGISTER.fullmatch(w.lower()) for w in words):
                base.append((sign, original))  # a register (or a parameter that may be one)
            else:
                displacement.append((sign, original))
                if _references(term):
                    symbols.append((sign, term))
        if len(symbols) <= 1 and all(sign == "+" and _BARE_NAME.fullmatch(t) for sign, t in symbols):
            return content
        kept = " ".join(f"{sign} {term}" for sign, term in base)
        name = hoist(" ".join(f"{sign} ({term})" for sign, term in displacement))
        return f"{kept.removeprefix('+ ')} + {name}" if kept else name

    pieces = []
    for piece in _split_top_level(operands):
        if "[" in piece:
            pieces.append(_ADDRESS.sub(lambda m: f"[{address(m.group(1))}]", piece))
            continue
        plain = _strip_literals(piece)
        if _symbolic(plain) and not _SYMBOL_FIRST.match(plain):
            lead = len(piece) - len(piece.lstrip())
            pieces.append(piece[:lead] + hoist(piece.strip()))
        else:
            pieces.append(piece)
    return ",".join(pieces), hoisted


@dataclass
class _Block:
    closer: str  # .endm, .endr or .endif
    loc: SourceLocation
    params: frozenset[str] = frozenset()  # macro / .irp parameters usable inside
    macro: _Macro | None = None


class _Preprocessor:
    """Walks the sources (following includes) and builds the items of one assembly unit."""

    def __init__(self, include_dirs: Sequence[Path]) -> None:
        self.include_dirs = [Path(d) for d in include_dirs]
        self.items: list[_Item] = []
        self.asserts: dict[int, SourceLocation] = {}
        self.labels: dict[str, _Label] = {}
        self.macros: dict[str, _Macro] = {}
        self.blocks: list[_Block] = []
        self.positions: list[tuple[str, SourceLocation, bool]] = []  # (hidden label, loc, conditional)
        self.include_stack: list[Path] = []
        self.hoisted = 0
        # `.error "message"` statements: the hidden symbol each one references -> its message.
        self.errors: dict[str, str] = {}
        # Names whose value is a plain integer at this point of the unit (from defines and
        # top-level `.equ NAME, 5`), for the guest API's range checks.
        self.constants: dict[str, int] = {}
        # Names defined so far by .equ/.set/.equiv/= (or -D) from constants only: what an
        # .if or .rept may use (see _ABSOLUTE_DIRECTIVES).
        self.absolute: set[str] = set()

    def new_hoisted_name(self) -> str:
        self.hoisted += 1
        return f"{_RESERVED_PREFIX}expr_{self.hoisted}"

    # -- files ---------------------------------------------------------------------------

    def add_source(
        self, file: str, text: str, resolved: Path | None, include_loc: SourceLocation | None = None
    ) -> None:
        if resolved is not None:
            if len(self.include_stack) > _MAX_INCLUDE_DEPTH and include_loc is not None:
                raise AsmError(
                    include_loc.file, include_loc.line, f"include nesting deeper than {_MAX_INCLUDE_DEPTH} files"
                )
            self.include_stack.append(resolved)
        for raw in _split_statements(text, file):
            self.add_statement(raw.text, SourceLocation(file, raw.line))
        if resolved is not None:
            self.include_stack.pop()

    def finish(self) -> None:
        if self.blocks:
            block = self.blocks[-1]
            raise AsmError(block.loc.file, block.loc.line, f"block is not closed: missing {block.closer}")

    def include(self, operands: str, loc: SourceLocation) -> None:
        m = re.fullmatch(r'"([^"]+)"', operands.strip())
        if not m:
            raise AsmError(loc.file, loc.line, '.include expects a quoted file name: .include "file.s"')
        name = m.group(1)
        here = [] if loc.file.startswith("<") else [Path(loc.file).parent]
        candidates = [d / name for d in [*here, *self.include_dirs]]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            searched = ", ".join(str(p.parent) for p in candidates) or "no directories"
            raise AsmError(loc.file, loc.line, f"include file {name!r} not found (searched: {searched})")
        resolved = found.resolve()
        if resolved in self.include_stack:
            cycle = [*self.include_stack[self.include_stack.index(resolved) :], resolved]
            raise AsmError(loc.file, loc.line, "include cycle: " + " -> ".join(p.name for p in cycle))
        try:
            data = found.read_bytes()
        except OSError as e:
            raise AsmError(loc.file, loc.line, f"cannot read include file {str(found)!r}: {e.strerror or e}") from None
        text = _decode_source(data, str(found), loc)
        self.add_source(str(found), text, resolved, loc)

    # -- statements ----------------------------------------------------------------------

    def add_statement(self, text: str, loc: SourceLocation) -> None:
        file, line = loc.file, loc.line
        if text.startswith("%"):
            # Hazard: NASM directives (%define, %macro) make ks_asm loop forever.
            # Canary: test_statement_starting_with_an_operator_hangs.
            raise AsmError(file, line, f"NASM-style directive {text.split(maxsplit=1)[0]!r} is not supported")
        if re.search(r"%[A-Za-z]", _strip_literals(text)):
            # Hazard: Keystone silently drops a statement with an AT&T register like %eax.
            raise AsmError(file, line, "AT&T-style %register is not supported (Intel syntax only)")
        if _BAD_EXPONENT.search(_strip_literals(text)):
            # Hazard: Keystone hangs on `.double 1.5e` (and encodes `mov rax, 1e` as a double).
            raise AsmError(file, line, "malformed number: an exponent without digits")
        _check_literals(text, loc)
        if _NUMERIC_LABEL.match(text):  # test_numeric_local_labels_are_rejected
            raise AsmError(file, line, "numeric local labels (1:, 1b, 1f) are not supported by Keystone")
        labels, rest = _split_labels(text)
        mnemonic = rest.split(None, 1)[0] if rest else ""
        operands = rest[len(mnemonic) :].strip()
        directive = mnemonic.lower() if mnemonic.startswith(".") else ""
        in_macro = any(b.closer == ".endm" for b in self.blocks)
        params = frozenset(p for b in self.blocks for p in b.params)

        if rest and not (rest[0].isalpha() or rest[0] in "_." or (rest[0] == "\\" and params)):
            # Hazard: a statement starting with an operator or bracket makes ks_asm loop forever.
            # Canary: test_statement_starting_with_an_operator_hangs.
            raise AsmError(file, line, f"a statement must start with a mnemonic, directive or label: {rest}")
        if directive == ".include":
            if labels:
                self.add_statement(" ".join(f"{name}:" for name in labels), loc)
            self.include(operands, loc)
            return
        error_symbol = ""
        if directive == ".error" and mnemonic not in self.macros:
            # Hazard: Keystone 0.9.2 silently ignores `.error`. It becomes a reference to a
            # symbol that is never defined, so assembly fails exactly when the statement is
            # assembled (an .if branch taken, a macro expanded); _locate_error finds the
            # statement that expanded it and reports the message there.
            # Canary: tests/test_guest_api_immediates.py::test_error_directive_is_silently_ignored.
            m = re.fullmatch(r'"((?:[^"\\\n]|\\.)*)"', operands)
            if not m:
                raise AsmError(file, line, '.error expects a quoted message: .error "what went wrong"')
            error_symbol = f"{_RESERVED_PREFIX}error_{len(self.errors)}"
            self.errors[error_symbol] = m.group(1).replace('\\"', '"') or ".error"
            text = "".join(f"{name}: " for name in labels) + f".quad {error_symbol}"
        if directive and directive not in _SUPPORTED_DIRECTIVES and mnemonic not in self.macros:
            reason = _UNSUPPORTED.get(directive, "Keystone 0.9.2 would silently ignore or mishandle it")
            raise AsmError(file, line, f"unsupported directive {mnemonic}: {reason}")
        self.check_backslashes(text, params, loc)
        assignment = None if directive else _ASSIGNMENT.match(rest)
        if assignment:
            _check_operands("", rest[assignment.end() :], False, loc)
        elif directive not in _FREE_FORM_DIRECTIVES:
            _check_operands(directive, operands, mnemonic in self.macros, loc)
        elif directive in _NAME_DIRECTIVES and not _NAME_OPERAND[directive].fullmatch(operands):
            # Hazard: Keystone hangs on e.g. `.purgem foo: x`.
            raise AsmError(file, line, f"{directive} expects {_NAME_OPERAND_HELP[directive]}")
        for name in labels:
            if name.startswith(_RESERVED_PREFIX):
                raise AsmError(file, line, f"label {name!r}: names starting {_RESERVED_PREFIX} are reserved")

        if mnemonic in _GUEST_API_VALUE_MACROS and mnemonic in self.macros and not in_macro and operands:
            checked = _guest_api_operands(mnemonic, operands, self.constants, loc)
            if checked != operands:
                operands = checked
                text = "".join(f"{name}: " for name in labels) + f"{mnemonic} {operands}"
        if mnemonic.startswith("GUEST_ASSERT") and not in_macro:
            # The call-site id becomes the assert macro's last argument. Inside a macro body an
            # assert has no single call site: the macro must forward its own site argument.
            # Case-sensitive, like Keystone's macro names (test_macro_names_are_case_sensitive).
            site = len(self.asserts) + 1
            self.asserts[site] = loc
            operands = f"{operands}, {site}" if operands else str(site)
            text = "".join(f"{name}: " for name in labels) + f"{mnemonic} {operands}"
        instruction = not directive and not assignment and mnemonic not in self.macros
        if instruction and _REAL_NUMBER.search(_strip_literals(operands)):
            # Hazard: Keystone silently encodes `mov rax, 2.5` as the bits of a double.
            # Canary: test_float_literal_is_encoded_as_double_bits.
            raise AsmError(file, line, "floating-point number in an instruction operand")
        if mnemonic in self.macros and not in_macro:
            self.check_macro_arguments(self.macros[mnemonic], operands, loc)

        refs = self.references(mnemonic, directive, rest, operands)
        if error_symbol:
            refs.add(error_symbol)
        hoisted: list[str] = []
        if not directive and not assignment and operands:
            inner = ""
            if mnemonic.lower() in _PREFIXES:  # `lock add [rbx - K], 1`: operands follow the instruction
                inner, _, operands = operands.partition(" ")
                inner += " "
            operands, hoisted = _hoist_operands(operands, self.new_hoisted_name)
            operands = inner + operands.strip()
            if hoisted:
                text = "".join(f"{name}: " for name in labels) + f"{mnemonic} {operands}"
        plain_labels = tuple(name for name in labels if "\\" not in name)
        defines_here = set(plain_labels)
        if directive in (".equ", ".set", ".equiv"):
            defines_here.add(operands.split(",", 1)[0].strip())
        elif assignment:
            defines_here.add(assignment.group(1))
        if directive in _ABSOLUTE_DIRECTIVES and not in_macro and "\\" not in operands:
            unknown = sorted(_references(operands) - self.absolute)
            if unknown:
                raise AsmError(
                    file, line, f"{directive} needs constants defined before it, not {', '.join(unknown)} "
                    f"(Keystone 0.9.2 silently drops an {directive} on a label or a symbol defined later)"
                )
        for name in defines_here:
            self.constants.pop(name, None)
            self.absolute.discard(name)
        if not self.blocks and (directive in (".equ", ".set", ".equiv") or assignment):
            name, value_text = (
                (assignment.group(1), rest[assignment.end() :]) if assignment else operands.split(",", 1)
            )
            value = _constant(value_text, self.constants)
            if value is not None:
                self.constants[name.strip()] = value
        if directive in (".equ", ".set", ".equiv") or assignment:
            name, value_text = (
                (assignment.group(1), rest[assignment.end() :]) if assignment else operands.split(",", 1)
            )
            if "\\" not in name and not _references(value_text) - self.absolute:
                self.absolute.add(name.strip())
        for block in self.blocks:
            if block.macro is not None:
                block.macro.body_refs |= refs
                block.macro.body_labels |= set(plain_labels)
        for name in plain_labels:
            self.labels.setdefault(name, _Label(name, loc, conditional=bool(self.blocks)))

        # A hidden position label before each top-level statement that can emit bytes gives
        # Program.lines; bodies of .macro/.rept/.irp are expanded elsewhere (or repeatedly)
        # and are attributed to the statement that expands them.
        position = ""
        emits = (
            directive in _DATA_DIRECTIVES
            or directive in (".rept", ".irp", ".irpc")
            or (not directive and rest and not assignment)
        )
        if emits and all(b.closer == ".endif" for b in self.blocks):
            position = f"{_RESERVED_PREFIX}line_{len(self.positions)}"
            self.positions.append((position, loc, bool(self.blocks)))

        self.update_blocks(directive, operands, loc)
        self.items.append(
            _Item(
                text="\n".join([*([f"{position}:"] if position else []), *hoisted, text]),
                loc=loc,
                mnemonic=mnemonic,
                labels=plain_labels,
                refs=frozenset(refs - defines_here),
                closers=tuple(b.closer for b in reversed(self.blocks)),
            )
        )

    def references(self, mnemonic: str, directive: str, rest: str, operands: str) -> set[str]:
        """Identifiers a statement may use as symbols, for stubbing and naming missing ones."""
        if m := _ASSIGNMENT.match(rest):
            return _references(rest[m.end() :])
        if directive:
            if directive in (".equ", ".set", ".equiv"):
                return _references(operands.partition(",")[2])
            return _references(operands) if directive in _EXPRESSION_DIRECTIVES else set()
        if mnemonic.lower() in _PREFIXES:
            operands = operands.split(None, 1)[1] if " " in operands else ""
        return _references(operands)

    def check_backslashes(self, text: str, params: frozenset[str], loc: SourceLocation) -> None:
        """`\\name` must name a parameter of an enclosing .macro/.irp/.irpc.

        Hazard: Keystone silently drops a statement with an unknown `\\name`, and a `\\`
        outside any macro can make it hang. Canary: test_unknown_macro_parameter_drops_the_statement.
        """
        for m in _MACRO_PARAM_REF.finditer(_strip_literals(text)):
            if not params:
                raise AsmError(loc.file, loc.line, "'\\' outside a macro body (macro parameters only)")
            name = m.group(1)
            if m.group(3) == "@":
                raise AsmError(loc.file, loc.line, "\\@ is not supported by Keystone 0.9.2")
            if name == "" and m.group(2):
                continue  # \() separates a parameter from the text after it
            if name not in params:
                known = ", ".join(f"\\{p}" for p in sorted(params))
                raise AsmError(loc.file, loc.line, f"unknown macro parameter \\{name} (known: {known})")

    def check_macro_arguments(self, macro: _Macro, operands: str, loc: SourceLocation) -> None:
        """Hazard: Keystone substitutes nothing for a missing argument and then silently drops
        the statements that used it, so arity is checked here.
        Canary: test_missing_macro_argument_drops_the_statement."""
        given = len(_split_top_level(_strip_literals(operands))) if operands else 0
        required = sum(1 for p in macro.params if p.required and not p.vararg)
        vararg = any(p.vararg for p in macro.params)
        if given < required or (given > len(macro.params) and not vararg):
            names = ", ".join(p.name for p in macro.params)
            raise AsmError(
                loc.file,
                loc.line,
                f"macro {macro.name} ({names}, defined at {macro.loc}) takes "
                f"{required if required == len(macro.params) else f'{required} to {len(macro.params)}'}"
                f" comma-separated arguments, {given} given",
            )

    def update_blocks(self, directive: str, operands: str, loc: SourceLocation) -> None:
        if directive in _BLOCK_OPENERS:
            params: frozenset[str] = frozenset()
            macro = None
            if directive == ".macro":
                name, macro_params = _parse_macro_params(operands, loc.file, loc.line)
                macro = _Macro(name, macro_params, loc, len(self.items))
                if not any(b.closer == ".endm" for b in self.blocks):
                    self.macros[name] = macro
                params = frozenset(p.name for p in macro_params)
            elif directive in (".irp", ".irpc"):
                params = frozenset([operands.split(",", 1)[0].strip()])
            self.blocks.append(_Block(_BLOCK_OPENERS[directive], loc, params, macro))
        elif directive in _BLOCK_CLOSERS:
            closer = _BLOCK_CLOSERS[directive]
            if not self.blocks or self.blocks[-1].closer != closer:
                expected = f"expected {self.blocks[-1].closer}" if self.blocks else "no block is open"
                raise AsmError(loc.file, loc.line, f"{directive} does not match ({expected})")
            self.blocks.pop()
        elif directive in (".else", ".elseif") and (not self.blocks or self.blocks[-1].closer != ".endif"):
            raise AsmError(loc.file, loc.line, f"{directive} outside an .if block")
        elif directive == ".purgem" and not any(b.closer == ".endm" for b in self.blocks):
            self.macros.pop(operands.strip(), None)


# --------------------------------------------------------------------------------------------
# Defines
# --------------------------------------------------------------------------------------------

_DEFINE_VALUE = re.compile(r"[A-Za-z0-9_.$@+\-*/%~!&|^<>=() ]+")


def _check_define(name: str, value: str) -> None:
    if not _IDENTIFIER.fullmatch(name):
        raise UsageError(f"define {name!r}: the name must be an identifier (letters, digits, _)")
    if name.startswith(_RESERVED_PREFIX):
        raise UsageError(f"define {name!r}: names starting {_RESERVED_PREFIX} are reserved")
    if not _DEFINE_VALUE.fullmatch(value) or "//" in value or "/*" in value:
        raise UsageError(f"define {name}={value!r}: the value must be a number or an expression")
    try:
        _check_operands(".equ", f"{name}, {value}", False, SourceLocation("<define>", 1))
    except AsmError as e:
        raise UsageError(f"define {name}={value}: not a valid expression ({e.message})") from None
    # Hazard: Keystone silently drops `.equ X, 1+` when more statements follow, so each value
    # is checked alone, where Keystone does report it.
    # Canary: test_directive_error_followed_by_statements_is_lost.
    try:
        _ks_asm(f".equ {name}, {value}\n", 0)
    except _KeystoneError as e:
        raise UsageError(f"define {name}={value}: not a valid expression ({e.message})") from None


def _define_items(defines: Mapping[str, int | str]) -> list[_Item]:
    items = []
    for name, raw in defines.items():
        if isinstance(raw, int):
            if not -(2**63) <= raw < 2**64:
                raise UsageError(f"define {name}={raw}: the value does not fit in 64 bits")
            value = str(int(raw))
        else:
            value = str(raw).strip()
        _check_define(name, value)
        loc = SourceLocation(f"<define {name}>", 1)
        refs = frozenset(_references(value) - {name})
        items.append(_Item(f".equ {name}, {value}", loc, refs=refs, define=(name, value)))
    return items


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


def _table_item(name: str, loc: SourceLocation, conditional: bool) -> _Item:
    """One 8-byte entry of the hidden symbol table: the address of `name`, or all-ones."""
    if not conditional:
        return _Item(f".quad {name}", loc)
    # A label inside a block may never be defined (an .if branch not taken, a macro never
    # expanded): .ifdef keeps the entry 8 bytes long either way.
    return _Item(f".ifdef {name}\n.quad {name}\n.else\n.quad -1\n.endif", loc)


def _render(items: Sequence[_Item], extra: Sequence[str] = ()) -> str:
    return "\n".join([*(item.text for item in items), *extra]) + "\n"


def _assemble(
    sources: Sequence[tuple[str, str]],
    base: int,
    defines: Mapping[str, int | str],
    include_dirs: Sequence[Path],
) -> Program:
    if not 0 <= base < 2**64:
        raise UsageError(f"load address 0x{base:x} is not a 64-bit address")
    pre = _Preprocessor(include_dirs)
    pre.items.extend(_define_items(defines))
    for item in pre.items:
        if item.define is not None:
            pre.absolute.add(item.define[0])
            if (value := _constant(item.define[1], pre.constants)) is not None:
                pre.constants[item.define[0]] = value
    for file, text in sources:
        pre.add_source(file, text, None if file.startswith("<") else Path(file).resolve())
    pre.finish()

    # The symbol-table trick. Keystone returns only bytes, so for every label found in the
    # text (plus the hidden per-statement position labels) a `.quad label` is appended after
    # the program. The last 8 * len(table) bytes of the encoding are then the absolute
    # addresses of those labels; they are read back and cut off before the code is returned.
    # The table comes after all code, so it cannot change the encoding of anything before it.
    # Labels inside blocks get `.ifdef` entries (all-ones when not defined), so the table is
    # 8 bytes per entry whatever is assembled. Canaries: test_quad_of_a_label_is_its_absolute_address,
    # test_ifdef_is_false_for_a_label_never_assembled.
    table_names = [label.name for label in pre.labels.values()]
    table = [_table_item(label.name, label.loc, label.conditional) for label in pre.labels.values()]
    table_names += [name for name, _loc, _cond in pre.positions]
    table += [_table_item(name, loc, cond) for name, loc, cond in pre.positions]
    items = [*pre.items, *table]

    if not items:
        return Program(code=b"", base=base, symbols=MappingProxyType({}), asserts=MappingProxyType({}))
    try:
        encoding = _ks_asm(_render(items), base)
    except _KeystoneError as failure:
        raise _locate_error(items, pre, base, failure) from None

    size = len(encoding) - 8 * len(table)
    if size < 0:
        raise TestbedError(f"internal error: {len(encoding)} bytes cannot hold {len(table)} table entries")
    values = struct.unpack_from(f"<{len(table)}Q", encoding, size)
    addresses = {name: value for name, value in zip(table_names, values, strict=True) if value != 2**64 - 1}

    symbols = {label: addresses[label] for label in pre.labels if label in addresses}
    end = base + size
    placed = sorted(
        (addresses[name], i, loc) for i, (name, loc, _cond) in enumerate(pre.positions) if name in addresses
    )
    lines = []
    for j, (address, _i, loc) in enumerate(placed):
        following = placed[j + 1][0] if j + 1 < len(placed) else end
        if following > address:  # emitted at least one byte
            lines.append((address, loc))
    return Program(
        code=encoding[:size],
        base=base,
        symbols=MappingProxyType(symbols),
        asserts=MappingProxyType(dict(pre.asserts)),
        lines=tuple(lines),
    )


# --------------------------------------------------------------------------------------------
# Error location
# --------------------------------------------------------------------------------------------


def _stub_lines(names: Sequence[str]) -> list[str]:
    """Define each name not defined so far as a label: forward references from a prefix of
    the unit then resolve, as they would in the whole unit."""
    return [f".ifndef {name}\n{name}:\n.endif" for name in names]


def _undefined_names(items: Sequence[_Item], base: int, candidates: Sequence[str]) -> set[str] | None:
    """The candidates the whole unit does not define, or None if that does not make it assemble.

    `.ifndef` is true for a name that is referenced but undefined (and for one never mentioned);
    each probe emits one byte saying so and defines the name, so the unit assembles and the
    bytes can be read back. Canary: test_ifndef_is_true_for_a_referenced_undefined_name.
    """
    probes = [f".ifndef {name}\n.byte 1\n{name}:\n.else\n.byte 0\n.endif" for name in candidates]
    try:
        encoding = _ks_asm(_render(items, probes), base)
    except _KeystoneError:
        return None
    flags = encoding[len(encoding) - len(candidates) :]
    return {name for name, flag in zip(candidates, flags, strict=True) if flag == 1}


def _missing_symbols(items: Sequence[_Item], base: int, undefined: set[str]) -> list[str]:
    """The names in `undefined` that the unit really uses: without a definition it fails.

    Group testing: the unit with all undefined names except those in a group defined still
    fails exactly when the group holds a name in use. Usually one name is missing, so this
    takes about log2(len(undefined)) assemblies.
    """

    def uses_one_of(group: list[str]) -> bool:
        others = [name for name in sorted(undefined) if name not in group]
        try:
            _ks_asm(_render(items, _stub_lines(others)), base)
        except _KeystoneError as e:
            return e.code == _KS_SYMBOL_MISSING
        return False

    def search(group: list[str], known_used: bool) -> list[str]:
        if not (known_used or uses_one_of(group)):
            return []
        if len(group) == 1:
            return group
        half = len(group) // 2
        first = search(group[:half], False)
        return first + search(group[half:], not first)

    return search(sorted(undefined), False)


def _locate_error(items: Sequence[_Item], pre: _Preprocessor, base: int, failure: _KeystoneError) -> TestbedError:
    """Find the statement that makes Keystone fail and describe the error there.

    Why not KsError.get_asm_count(): it is 0 for most parse errors (bad mnemonic, bad operand),
    the number of statements before the error for a few (bad expression token), and the count
    of all statements for errors found at the end (missing symbol, invalid fixup); and its
    statements include blank lines, empty `;` statements, comment lines (twice) and every
    statement of every macro and .rept expansion. Canary: test_error_count_*.

    A missing symbol is found at the end of assembly, so it is located by name: the names
    really missing are found by probing, and the first statement using one is reported.
    Everything else is located by bisection: the unit is cut after item k (closing the blocks
    left open) and the first k whose prefix fails is the failing item. Keystone stops at the
    first parse error and reports missing symbols only after parsing everything, so a prefix
    that fails only because it cuts off the definition of a forward reference (`jmp later`,
    or a label that a macro builds from its arguments, which no text scan can find) is not
    counted as failing; stubs defining the names a text scan can find keep such prefixes
    from failing in the first place.
    """
    names = sorted({name for item in items for name in item.refs} | set(pre.labels))
    missing: list[str] = []
    if failure.code == _KS_SYMBOL_MISSING:
        undefined = _undefined_names(items, base, names)
        if undefined is not None:
            missing = _missing_symbols(items, base, undefined)
            # An `.error` is reported where it is assembled: for one in a macro body that is
            # the statement expanding the macro, which only bisection finds.
            user = next((i for i, item in enumerate(items) if item.refs & set(missing)), None)
            if user is not None and not any(name in pre.errors for name in missing):
                return _error_at(items, user, failure, pre, missing)
        # Not found by name (e.g. a name built from macro arguments): bisect; stubs must not
        # define the missing name, but names the probe found defined are safe to stub.
        names = [] if undefined is None else [name for name in names if name not in undefined]

    def counts(error: _KeystoneError | None) -> bool:
        if error is None:
            return False
        return error.code != _KS_SYMBOL_MISSING or failure.code == _KS_SYMBOL_MISSING

    results: dict[tuple[int, int], _KeystoneError | None] = {}

    def prefix_error(k: int, attempt: int) -> _KeystoneError | None:
        if (k, attempt) not in results:
            closers = items[k - 1].closers if k else ()
            text = _render(items[:k], [*closers, *_stub_lines(attempts[attempt])])
            try:
                _ks_asm(text, base, timeout_floor=_PROBE_TIMEOUT_FLOOR)
                results[k, attempt] = None
            except _KeystoneError as e:
                results[k, attempt] = e
        return results[k, attempt]

    # Fall back to fewer stubs if the stubs themselves break assembly. (A unit that hangs or
    # crashes is not run again whole: that would only cost another timeout.)
    attempts = [names, sorted(set(names) & set(pre.labels)), []]
    attempt = next(
        (
            i
            for i in range(len(attempts))
            if not counts(prefix_error(0, i))
            and (failure.code in (_HANG, _CRASH) or counts(prefix_error(len(items), i)))
        ),
        len(attempts) - 1,
    )
    low, high = 1, len(items)  # invariant: prefix `high` fails, prefix `low - 1` does not
    while low < high:
        mid = (low + high) // 2
        if counts(prefix_error(mid, attempt)):
            high = mid
        else:
            low = mid + 1
    error = prefix_error(high, attempt)
    if error is not None and error.code == _KS_SYMBOL_MISSING:
        raised = [name for name in missing if name in pre.errors]
        directive_error = _error_directive_at(items, high, base, pre, raised, attempts[attempt]) if raised else None
        if directive_error is not None:
            return directive_error
    return _error_at(items, high - 1, error if counts(error) and error else failure, pre, missing)


def _error_directive_at(
    items: Sequence[_Item], k: int, base: int, pre: _Preprocessor, raised: Sequence[str], stubs: Sequence[str]
) -> TestbedError | None:
    """The error of the `.error` that items[k - 1] assembles (of those in `raised`, the first
    written: the prefix of k items fails with every other one stubbed); None if the prefix
    fails for another reason too."""

    def fails_with(defined: Sequence[str]) -> bool:
        text = _render(items[:k], [*items[k - 1].closers, *_stub_lines([*stubs, *defined])])
        try:
            _ks_asm(text, base, timeout_floor=_PROBE_TIMEOUT_FLOOR)
        except _KeystoneError:
            return True
        return False

    order = sorted(raised, key=lambda name: int(name.rsplit("_", 1)[1]))
    if fails_with(order):
        return None
    chosen = next((name for name in order if fails_with([other for other in order if other != name])), order[0])
    item = items[k - 1]
    if item.define is not None:
        name, value = item.define
        return UsageError(f"define {name}={value}: {pre.errors[chosen]}")
    return AsmError(item.loc.file, item.loc.line, pre.errors[chosen])


def _error_at(
    items: Sequence[_Item], index: int, error: _KeystoneError, pre: _Preprocessor, missing: Sequence[str]
) -> TestbedError:
    item = items[index]
    message = _describe(error, item, index, pre, set(missing))
    if item.define is not None:
        name, value = item.define
        return UsageError(f"define {name}={value}: {message}")
    return AsmError(item.loc.file, item.loc.line, message)


def _describe(error: _KeystoneError, item: _Item, index: int, pre: _Preprocessor, missing: set[str]) -> str:
    """Keystone's error made specific to the statement (items[index]) it happened at."""
    macro = pre.macros.get(item.mnemonic)
    if macro is not None and macro.index > index:
        return (
            f"invalid mnemonic: {item.mnemonic} (a macro defined later, at {macro.loc}; "
            "Keystone needs a macro defined before its first use)"
        )
    refs = set(item.refs) | (macro.body_refs if macro else set())
    message = error.message
    if error.code == _HANG:
        message = "Keystone 0.9.2 hangs on this statement (it loops forever on some malformed operands)"
    elif error.code == _CRASH:
        message = f"{error.message} on this statement"
    elif error.code == _KS_SYMBOL_MISSING:
        names = sorted(refs & missing) or sorted(missing)
        message = f"symbol missing: {', '.join(names)}" if names else "symbol missing"
    elif error.code == _KS_SYMBOL_REDEFINED:
        names = sorted(set(item.labels) | (macro.body_labels if macro else set()))
        message = f"symbol redefined: {', '.join(names)}" if names else "symbol redefined"
    elif error.code == _KS_MNEMONIC and not macro and item.mnemonic:
        message = f"invalid mnemonic: {item.mnemonic}"
        if (instead := _MISSING_MNEMONICS.get(item.mnemonic.lower())) is not None:
            message += f" (Keystone 0.9.2 lacks it; write `{instead}`)"
    if macro:
        message += f" (in expansion of macro {macro.name} defined at {macro.loc})"
    return message
