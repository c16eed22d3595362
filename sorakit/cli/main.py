"""The `sorakit` command: wires the command modules together; each module stays thin.

The error contract (docs/errors.md): every failure prints one ``Error:`` line naming the input
and the problem, maybe a ``Hint:`` line, and exits with code 1 — usage errors, ``SorakitError``,
I/O errors and anything unexpected alike. A traceback only with ``--debug`` or
``SORAKIT_DEBUG=1``. Ctrl-C exits with 130.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from typing import Annotated

import typer

from sorakit.cli import bench as bench_cmds
from sorakit.cli import cache as cache_cmd
from sorakit.cli import devices as device_cmds
from sorakit.cli import export as export_cmds
from sorakit.cli import generate as generate_cmd
from sorakit.cli import optimize as optimize_cmd
from sorakit.cli._common import err_console, one_line, print_error
from sorakit.errors import SorakitError

DEBUG_ENV = "SORAKIT_DEBUG"
DEBUG_HINT = f"run again with --debug (or {DEBUG_ENV}=1) to see the traceback"

app = typer.Typer(
    name="sorakit",
    help="Open-Sora 1.2 from PyTorch to small devices through ONNX: export, optimize, audit, package, generate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help=f"Show the traceback of an error (also {DEBUG_ENV}=1); "
                                                        "may be given anywhere on the command line")] = False,
) -> None:
    """Open-Sora 1.2 from PyTorch to small devices through ONNX: export, optimize, audit, package, generate."""


app.command("generate")(generate_cmd.generate)
app.command("export")(export_cmds.export)
app.command("inspect")(export_cmds.inspect)
device_cmds.register(app)
app.command("optimize")(optimize_cmd.optimize)
app.command("bench")(bench_cmds.bench)
app.command("eval")(bench_cmds.evaluate)
app.command("cache")(cache_cmd.cache)

_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space and try again",
    errno.EFBIG: "a file reached the file-size limit (see `ulimit -f`): raise it and try again",
    errno.EACCES: "check the permissions of that path",
    errno.EPERM: "check the permissions of that path",
    errno.EROFS: "that file system is read-only: choose another path",
    errno.ENOENT: "check that the path exists",
    errno.EISDIR: "that path is a directory: give a file name",
    errno.ENOTDIR: "a part of that path is a file, not a directory",
}
if hasattr(errno, "EDQUOT"):
    _OS_HINTS[errno.EDQUOT] = "the disk quota is exceeded: free space and try again"


def describe(e: BaseException) -> tuple[str, str | None]:
    """(message, hint) of the error contract for any exception."""
    if isinstance(e, SorakitError):
        return str(e), getattr(e, "hint", None)
    if _is_click(e):  # typer's (vendored) click: usage errors and the like
        ctx = getattr(e, "ctx", None)
        cmd = getattr(ctx, "command_path", None) or "sorakit"
        return e.format_message(), f"see `{cmd} --help`"
    if isinstance(e, OSError):
        what = e.filename if e.filename is not None else "a file"
        also = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
        reason = e.strerror or str(e) or type(e).__name__
        return f"{what}{also}: {reason}", _OS_HINTS.get(e.errno, DEBUG_HINT)
    if isinstance(e, MemoryError):
        return ("out of memory", "lower --memory-budget, or generate fewer frames or a smaller resolution; "
                + DEBUG_HINT)
    if isinstance(e, RecursionError):
        return "an input is nested too deeply to process", DEBUG_HINT
    text = one_line(str(e), 400) or "(no message)"
    return f"unexpected {type(e).__name__}: {text}", f"this is a bug or an unchecked input; {DEBUG_HINT}, and report it"


def _is_click(e: BaseException) -> bool:
    """A click exception (typer vendors click, so its classes are not importable in one place)."""
    return any(c.__name__ == "ClickException" for c in type(e).__mro__) and hasattr(e, "format_message")


def _split_debug(args: list[str]) -> tuple[list[str], bool]:
    """Take ``--debug`` out of the arguments wherever it stands (before a ``--``)."""
    out, debug, literal = [], False, False
    for a in args:
        if not literal and a == "--debug":
            debug = True
            continue
        if a == "--":
            literal = True
        out.append(a)
    return out, debug


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    try:
        code = app(args=args, prog_name="sorakit", standalone_mode=False)
    except BaseException as e:  # noqa: BLE001 - the top of the program: every failure becomes one line
        if isinstance(e, SystemExit):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # `sorakit` or `sorakit CMD` alone: the help
            ctx = getattr(e, "ctx", None)
            print(ctx.get_help() if ctx is not None else e.format_message())
            sys.exit(0)
        if isinstance(e, KeyboardInterrupt) or type(e).__name__ == "Abort":
            err_console.print("interrupted", highlight=False)
            sys.exit(130)
        if isinstance(e, BrokenPipeError):  # the reader went away (`sorakit ... | head`): nothing to say
            sys.exit(1)
        if debug:
            traceback.print_exc()
        message, hint = describe(e)
        print_error(message, hint)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
