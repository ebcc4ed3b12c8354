"""Reading and lexing guest sources: UTF-8 text split into statements the way Keystone's lexer does."""

from __future__ import annotations

import re
from dataclasses import dataclass

from testbed.asm.program import SourceLocation
from testbed.errors import AsmError


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


