"""Progress bars for long command-line work (pretraining, benchmarks, the demo): stderr, terminals only.

stdout carries what scripts and tests read (tables, JSON), so bars go to stderr. Where stderr is not a
terminal (CI, a redirected log) a bar would only add redraw noise or a stale final frame, so it is
disabled there (rich's ``disable``); the work and its results are the same either way. ``FORCE_TERMINAL``
(rich's own variable) turns bars on in a captured stream when that is wanted.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress, ProgressColumn


def progress_console() -> Console:
    """The console progress bars and status spinners draw on: stderr."""
    return Console(stderr=True)


def progress_bar(*columns: str | ProgressColumn, console: Console | None = None, transient: bool = True) -> Progress:
    """A rich ``Progress`` on stderr (or ``console``), live only when that console is a terminal.

    ``transient`` (the default) clears the bar when done, leaving the results as the only output; pass
    False where the finished bar is itself the record (e.g. ``hotlora model init``'s final loss).
    """
    console = console if console is not None else progress_console()
    return Progress(*columns, console=console, transient=transient, disable=not console.is_terminal)
