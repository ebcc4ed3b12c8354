"""Assembler front end: turns guest assembly sources into a loadable `Program`.

This package is the only code that uses Keystone (testbed/asm/keystone_worker.py runs it). It
assembles Intel-syntax x86-64 sources with Keystone 0.9.2 and adds what Keystone lacks or gets
wrong, by rewriting text before Keystone sees it and by asking Keystone more than once when something fails:

* `.include "file"` is resolved here (Keystone silently ignores it), relative to the including
  file first, then the include directories.
* Defines (`-D NAME=VALUE`) become `.equ NAME, VALUE` lines at the top of the unit.
* Every `GUEST_ASSERT*` and `GUEST_FAIL` statement gets a unique call-site id appended as its
  last macro argument; `Program.asserts` maps the id back to the file and line the assert is
  written at, the macro and its text (GUEST_FAIL's message: it never enters guest memory).
* Numeric local labels (`1:`, `1b`, `1f`), which Keystone rejects, become hidden unique names.
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

Where each part lives (a reader finds each in a file named for it):

* program.py       Program, SourceLocation, CodeLocation, AssertSite: what the host gets back.
* assembler.py     assemble_source/assemble_sources/assemble_files, read_source, parse_define,
                   and the symbol-table trick.
* engine.py        the Keystone seam: the worker process, its timeouts, hang and crash handling.
* keystone_worker.py  the worker itself: the only module that imports Keystone.
* lexer.py         reading sources and splitting them into statements.
* frontend.py      the source front end: includes, defines, assert sites, numeric local labels.
* syntax.py        directive tables and statement parsing helpers.
* guards.py        the mis-assembly guards (operands Keystone hangs on or mis-encodes).
* evaluate.py      constant expressions computed as Keystone (and GNU as) compute them.
* expand.py        macro, .rept and .irp bodies expanded for the guards (Keystone expands them).
* guest_api.py     the guest API's operand rules and assert-site messages.
* locate_error.py  locating Keystone's errors by probing and bisection.
"""

from testbed.asm.assembler import assemble_files, assemble_source, assemble_sources, parse_define, read_source
from testbed.asm.program import AssertSite, CodeLocation, Program, SourceLocation

__all__ = [
    "AssertSite",
    "CodeLocation",
    "Program",
    "SourceLocation",
    "assemble_files",
    "assemble_source",
    "assemble_sources",
    "parse_define",
    "read_source",
]
