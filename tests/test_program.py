"""Program's line table (testbed/asm/program.py LineTable): the (address, location) pairs it
stands for, as a tuple of them would give them."""

from __future__ import annotations

import bisect
from array import array
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.asm.program import LineTable, Program, SourceLocation

PAIRS = st.lists(
    st.tuples(st.integers(0, 2**64 - 1), st.sampled_from(["a.s", "b.s", "<x>"]), st.integers(1, 2**40)),
    max_size=40,
).map(lambda rows: [(address, SourceLocation(name, line)) for address, name, line in sorted(rows)])


@settings(max_examples=60, deadline=None)
@given(PAIRS, st.integers(-1, 2**64))
def test_a_table_gives_the_pairs_it_was_made_of(pairs: list[tuple[int, SourceLocation]], address: int) -> None:
    """Iteration, length, indexing (negative too), slices and the lookup of an address give
    what the list of pairs gives; a table equals, and hashes as, another of the same pairs."""
    table = LineTable.of(pairs)
    assert list(table) == pairs and len(table) == len(pairs)
    assert [table[i] for i in range(-len(pairs), len(pairs))] == pairs + pairs
    assert table[1:-1:2] == tuple(pairs[1:-1:2])
    i = bisect.bisect_right(pairs, address, key=lambda pair: pair[0]) - 1
    assert table.at_or_below(address) == (pairs[i][1] if i >= 0 else None)
    again = LineTable.of(list(pairs))
    assert again == table and hash(again) == hash(table)
    if pairs:
        address0, location0 = pairs[0]
        moved = [(address0, SourceLocation(location0.file + "x", location0.line)), *pairs[1:]]
        assert LineTable.of(moved) != table


def test_a_program_holds_its_lines_as_a_table_however_given() -> None:
    """Program(lines=<tuple of pairs>) holds a LineTable of them, equal to one made from a list,
    and a table's columns must agree (a column of another length or an unknown file is an error)."""
    pairs = ((0x1000, SourceLocation("g.s", 1)), (0x1001, SourceLocation("g.s", 3)))

    def program(lines: object) -> Program:
        return Program(code=b"\x90\x90", base=0x1000, symbols=MappingProxyType({}),
                       asserts=MappingProxyType({}), lines=lines)  # type: ignore[arg-type]

    made = program(pairs)
    assert isinstance(made.lines, LineTable) and made == program(list(pairs))
    assert made.location(0x1001) == SourceLocation("g.s", 3) and made.location(0x1002) is None
    with pytest.raises(ValueError, match="length"):
        LineTable(array("Q", [1]), ("g.s",), array("I", [0, 0]), array("Q", [1]))
    with pytest.raises(ValueError, match="file"):
        LineTable(array("Q", [1]), ("g.s",), array("I", [1]), array("Q", [1]))


def test_columns_of_other_array_types_are_the_same_table() -> None:
    """A table built from columns of other array types equals, and hashes as, the one `of`
    builds; a negative file id or address is an error, not a table."""
    made = LineTable(array("I", [0x1000, 0x1004]), ("g.s",), array("b", [0, 0]), array("i", [1, 2]))
    pairs = [(0x1000, SourceLocation("g.s", 1)), (0x1004, SourceLocation("g.s", 2))]
    assert made == LineTable.of(pairs) and hash(made) == hash(LineTable.of(pairs)) and list(made) == pairs
    with pytest.raises(OverflowError):
        LineTable(array("q", [1]), ("g.s",), array("b", [-1]), array("Q", [1]))
    with pytest.raises(OverflowError):
        LineTable(array("q", [-1]), ("g.s",), array("I", [0]), array("Q", [1]))


@settings(max_examples=40, deadline=None)
@given(PAIRS, st.permutations(["a.s", "b.s", "<x>", "a.s", "unused.s"]))
def test_equal_tables_give_the_same_columns(pairs: list[tuple[int, SourceLocation]], files: list[str]) -> None:
    """columns() spells equal tables alike - the files in the order the lines first name them,
    each once, unused ones dropped - however the table's own file list was ordered (with a
    name twice, or one no line uses); a table made from the columns is the same table."""
    reference = LineTable.of(pairs)
    ids = {name: files.index(name) for name in files}
    shuffled = LineTable(array("Q", [a for a, _ in pairs]), tuple(files),
                         array("I", [ids[loc.file] for _, loc in pairs]), array("Q", [loc.line for _, loc in pairs]))
    assert shuffled == reference
    assert shuffled.columns() == reference.columns()
    names, addresses, file_ids, lines = reference.columns()
    assert list(names) == list(dict.fromkeys(loc.file for _, loc in pairs))
    assert LineTable(addresses, names, file_ids, lines) == reference
