"""Human output: rich tables in which nothing is interpreted.

Every string the commands print comes from somewhere a user or a guest controls — file paths,
symbol names, capstone's disassembly (`qword ptr [rbx + 8]`), report details, error text —
and rich would read `[...]` as markup and `:name:` as an emoji code, silently dropping or
replacing text. So the console here has markup, emoji and highlighting off: a `str` prints
exactly as it is, and colour is given only through `Text` objects made by `styled()`.
Columns fold rather than truncate, so a long value is wrapped, never cut with an ellipsis.
"""

from __future__ import annotations

from typing import IO

from rich.console import Console
from rich.table import Table
from rich.text import Text


def plain_console(file: IO[str]) -> Console:
    """A console that prints every string literally (no markup, no emoji codes, no highlighting)."""
    return Console(file=file, markup=False, emoji=False, highlight=False)


def styled(text: str, style: str) -> Text:
    """`text` in `style`, taken literally."""
    return Text(text, style=style)


def plain_table(title: str, *columns: str, caption: str | None = None, right: tuple[str, ...] = ()) -> Table:
    """A table whose title, caption and cells are printed literally; columns fold long values."""
    table = Table(title=Text(title), caption=Text(caption) if caption is not None else None)
    for name in columns:
        table.add_column(Text(name), overflow="fold", justify="right" if name in right else "left")
    return table
