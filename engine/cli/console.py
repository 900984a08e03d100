"""How the commands print prose for a person: wrapped to the terminal at spaces, never inside a word, so an id, a
path or a command to copy stays whole (one longer than the line gets a line of its own). A terminal left to wrap
long lines itself cuts them at its last column, mid-word. Into a pipe or a file, lines stay as they are, for grep
and scripts."""

from __future__ import annotations

import os
import sys
import textwrap
from typing import TextIO


def output_width(stream: TextIO) -> int | None:
    """The columns to wrap to: $COLUMNS when set (as Rich reads it too), else the terminal's; None when ``stream``
    is not a terminal."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else None
    except (AttributeError, OSError, ValueError):
        return None


def wrap(line: str, width: int | None, hang: int | None = None) -> list[str]:
    """One line of text as lines of at most ``width`` columns, broken at spaces only; continuation lines start at
    column ``hang`` (under the line's own indent by default). ``width`` None leaves the line whole."""
    if width is None or len(line) <= width:
        return [line]
    indent = len(line) - len(line.lstrip(" "))
    hang = indent if hang is None else hang
    return textwrap.wrap(line, width, subsequent_indent=" " * min(hang, width // 2), break_long_words=False,
                         break_on_hyphens=False)


def say(text: str = "", hang: int | None = None, file: TextIO | None = None) -> None:
    """Print ``text`` (one or more lines) wrapped to the width of the terminal it goes to (stdout by default), made
    safe to show: a path or a name from a run or a config cannot carry an escape sequence to the terminal."""
    from engine.rundir.files import printable

    file = file or sys.stdout
    width = output_width(file)
    print("\n".join(part for line in printable(text).split("\n") for part in wrap(line, width, hang)), file=file,
          flush=True)
