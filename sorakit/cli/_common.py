"""Shared CLI pieces: consoles, error reporting, option types, progress bars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sorakit.errors import SorakitError

console = Console()
err_console = Console(stderr=True)

BundleArg = Annotated[Path, typer.Argument(help="A bundle directory (made by `sorakit export`)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Device profile: cpu, iphone-15-pro, mac, android")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables")]


def progress_bar(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
    )


def fail(message: str, hint: str | None = None) -> None:
    err_console.print(f"[bold red]Error:[/] {message}", highlight=False)
    if hint:
        err_console.print(f"[dim]Hint:[/] {hint}", highlight=False)
    raise typer.Exit(code=1)


def report_error(e: SorakitError) -> None:
    fail(str(e), getattr(e, "hint", None))


def print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise SorakitError(f"resolution {text!r} is not HEIGHTxWIDTH, e.g. 256x256") from None

