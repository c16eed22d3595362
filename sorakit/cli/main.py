"""The `sorakit` command: wires the command modules together; each module stays thin."""

from __future__ import annotations

import logging
import sys

import typer

from sorakit.cli import bench as bench_cmds
from sorakit.cli import devices as device_cmds
from sorakit.cli import export as export_cmds
from sorakit.cli import generate as generate_cmd
from sorakit.cli import optimize as optimize_cmd
from sorakit.cli._common import err_console
from sorakit.errors import SorakitError

app = typer.Typer(
    name="sorakit",
    help="Open-Sora 1.2 from PyTorch to small devices through ONNX: export, optimize, audit, package, generate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("generate")(generate_cmd.generate)
app.command("export")(export_cmds.export)
app.command("inspect")(export_cmds.inspect)
device_cmds.register(app)
app.command("optimize")(optimize_cmd.optimize)
app.command("bench")(bench_cmds.bench)
app.command("eval")(bench_cmds.evaluate)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except SorakitError as e:
        err_console.print(f"[bold red]Error:[/] {e}", highlight=False)
        if getattr(e, "hint", None):
            err_console.print(f"[dim]Hint:[/] {e.hint}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
