"""Shared CLI pieces: consoles, the error contract, option types, progress bars.

Both consoles have rich markup turned off: prompts, paths and messages are printed as they are
(a prompt holding ``[/]`` or a hint like ``pip install 'sorakit[export]'`` stays intact). Styled
output is built from ``rich.text.Text``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

BundleArg = Annotated[Path, typer.Argument(help="A bundle directory (made by `sorakit export`)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Device profile: cpu, iphone-15-pro, mac, android")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables")]


def styled(text: str, style: str) -> Text:
    """``text`` in ``style``, never parsed as markup."""
    return Text(text, style=style)


_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F]}


def one_line(text: str, limit: int = 2000) -> str:
    """Messages of the error contract are single lines, with control characters (which a path or
    prompt may hold, e.g. terminal escape sequences) shown as escapes."""
    text = " ".join(str(text).split()).translate(_CONTROL)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def print_error(message: str, hint: str | None = None) -> None:
    """The error contract's output: one ``Error:`` line, then a ``Hint:`` line if there is one."""
    err_console.print(Text.assemble(styled("Error:", "bold red"), " ", one_line(message)), soft_wrap=True,
                      highlight=False)
    if hint:
        err_console.print(Text.assemble(styled("Hint:", "dim"), " ", one_line(hint)), soft_wrap=True, highlight=False)


def note(message: str) -> None:
    err_console.print(Text.assemble(styled("note:", "yellow"), " ", one_line(message)), soft_wrap=True,
                      highlight=False)


def progress_bar(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("{task.description}", markup=False, style="bold"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
    )


def print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


def parse_resolution(text: str, name: str = "--resolution") -> tuple[int, int]:
    from sorakit.validate import resolution

    return resolution(text, name)
