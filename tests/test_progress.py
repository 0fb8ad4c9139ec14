"""Progress bars draw on stderr and only on a terminal, so captured output and stdout JSON stay clean."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import BarColumn, TextColumn

from hotlora.progress import progress_bar, progress_console


def test_bars_are_off_unless_the_console_is_a_terminal() -> None:
    captured = io.StringIO()
    with progress_bar(TextColumn("work"), BarColumn(), console=Console(file=captured)) as progress:
        task = progress.add_task("work", total=3)
        progress.advance(task, 3)
    assert progress.disable and captured.getvalue() == ""

    terminal = io.StringIO()
    console = Console(file=terminal, force_terminal=True, width=60)
    with progress_bar(TextColumn("work"), BarColumn(), console=console, transient=False) as progress:
        progress.add_task("work", total=1, completed=1)
    assert not progress.disable and "work" in terminal.getvalue()


def test_the_default_console_is_stderr() -> None:
    assert progress_console().stderr
