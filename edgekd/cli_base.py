"""The Typer app edgekd's commands register on, its two consoles, and how a command fails: every
library error (``EdgekdError``) is one red line and an exit code (1 failure, 2 bad input); a signal
stops a command as Ctrl-C does. Set EDGEKD_DEBUG=1 to see tracebacks.

The commands themselves: ``cli.py`` (the road: teachers, targets, tasks, inspect, distill, export,
run) and ``cli_bundle.py`` (what takes a bundle: generate, validate, check, bench).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from edgekd import __version__
from edgekd.device.errors import EXIT_CODES, INTERNAL_ERROR, EdgekdError, UsageError, first_line

if TYPE_CHECKING:
    from rich.status import Status

# The order `edgekd --help` lists the commands in: the road's.
COMMAND_ORDER = ("teachers", "targets", "tasks", "inspect", "distill", "export", "generate", "validate", "check", "bench", "run")

app = typer.Typer(
    name="edgekd",
    help=(
        "Ship a small, fast, faithful copy of a teacher LLM to the edge.\n\n"
        "The road: distill a student from the teacher -> export it to ONNX "
        "for a target profile (cpu, mobile, cuda, web) -> validate the bundle against the "
        "teacher and pass or fail the target's gates -> generate with it.\n\n"
        "Start with `edgekd teachers`, `edgekd tasks` and `edgekd inspect smollm2-135m-instruct`.\n\n"
        "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + "."
    ),
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    # Help and usage errors as plain text: a help text's [gates] or a path's [/dim] is text, not
    # markup, and a usage error is one line (main() below), not a box.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Text is text: nothing edgekd prints is parsed as Rich markup (paths and prompts hold brackets);
# colour is given as a style.
console = Console(markup=False, highlight=False)
# What `pip install edgekd` leaves out and `pip install 'edgekd[toolchain]'` brings (pyproject.toml).
TOOLCHAIN_MODULES = {"torch", "transformers", "optimum", "onnx", "onnx_ir", "accelerate", "safetensors", "gguf",
                     "huggingface_hub", "matplotlib"}
err_console = Console(stderr=True, markup=False, highlight=False)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line (no file, line number or source line from deep inside a library)."""
    return f"warning: {first_line(str(message), 10**6)}\n"


# click's (typer's vendored copy) base error: a usage error, printed as one line by main()
_CLICK_ERROR: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def command(*args, **kwargs) -> Callable:
    """Register a command whose ``EdgekdError`` becomes one red line and an exit code."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a, **k):
            if not os.environ.get("EDGEKD_DEBUG"):
                warnings.formatwarning = _one_line_warning
            try:
                _check_numbers(k)
                return fn(*a, **k)
            except EdgekdError as e:
                if os.environ.get("EDGEKD_DEBUG"):
                    raise
                _error_line(str(e))
                raise typer.Exit(e.exit_code) from None
            except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (main() makes them this)
                err_console.print("interrupted" if not isinstance(e, Terminated) else f"stopped by signal {e.signum}", style="yellow")
                raise typer.Exit(128 + getattr(e, "signum", 2)) from None
            except (typer.Exit, typer.Abort, SystemExit, _CLICK_ERROR):  # a usage error: one line in main()
                raise
            except ModuleNotFoundError as e:  # a runtime-only install (pip install edgekd) running a toolchain command
                if os.environ.get("EDGEKD_DEBUG") or (e.name or "").split(".")[0] not in TOOLCHAIN_MODULES:
                    raise
                _error_line(f"`edgekd {fn.__name__}` needs the toolchain ({e.name} is not installed): "
                            "pip install 'edgekd[toolchain]' (a device needs only `edgekd check` and `edgekd generate`)")
                raise typer.Exit(2) from None
            except OSError as e:  # a full disk, a read-only folder, a missing permission: the user's to fix
                if os.environ.get("EDGEKD_DEBUG"):
                    raise
                where = e.filename or next((k[o] for o in ("out", "json_out", "bundle") if k.get(o)), None)
                where = f" {where}" if where else ""
                _error_line(f"cannot use{where}: {e.strerror or e} (free some space, or choose a writable folder)")
                raise typer.Exit(2) from None
            except Exception as e:  # a bug or an unforeseen failure: still one line, its own exit code
                if os.environ.get("EDGEKD_DEBUG"):
                    raise
                machine = machine_error(e)  # a library's words for a full disk or a read-only folder
                if machine is not None:
                    _error_line(machine)
                    raise typer.Exit(2) from None
                first = first_line(str(e))
                _error_line(f"internal error, {type(e).__name__}: {first} (set EDGEKD_DEBUG=1 for the traceback)")
                raise typer.Exit(INTERNAL_ERROR) from None

        app.command(*args, **kwargs)(wrapper)
        app.registered_commands.sort(key=lambda c: COMMAND_ORDER.index(c.name) if c.name in COMMAND_ORDER else len(COMMAND_ORDER))
        return fn

    return deco


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that every ``finally`` and context
    manager cleans up as for Ctrl-C (the lock, the ``.partial`` folder, temporary work)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def _check_numbers(options: dict) -> None:
    """Every number a flag gives is finite: ``--lr nan`` or ``--temperature inf`` is bad input,
    named here, not a late failure deep in a library (``nan <= 0`` is false, so range checks pass it)."""
    import math

    for name, value in options.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"--{name.replace('_', '-')} = {v}: give a finite number")


def machine_error(e: BaseException) -> str | None:
    """One line for an error a library raises about the machine rather than the code (safetensors
    reports a full disk as a bare Exception), or None when it is not one."""
    text = str(e)
    for words, what in (("No space left", "the disk is full"), ("Read-only file system", "the folder is read-only"),
                        ("Permission denied", "permission denied"), ("Disk quota exceeded", "the disk quota is exceeded")):
        if words in text:
            return f"cannot write: {what} ({first_line(e)}): free some space, or choose a writable folder"
    return None


_LINE_BREAKS = set("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")  # what str.splitlines (and a terminal) breaks at


def _error_line(message: str) -> None:
    """``error: message`` in red, on one line: text, never markup (paths may hold brackets), with
    line breaks inside it (a path or a prompt may hold one) shown escaped."""
    one = "".join(ascii(c)[1:-1] if c in _LINE_BREAKS else c for c in message)
    err_console.print(Text("error: ", style="bold red") + Text(one), soft_wrap=True)


def _progress(status: Status, soft_wrap: bool | None = None) -> Callable[[str], None]:
    """A ``log`` callback: each progress line replaces the spinner's text and is kept, dimmed, on stderr."""

    def log(msg: str) -> None:
        status.update(Text(msg))  # a spinner parses markup whatever the console says: text only
        err_console.print(msg, style="dim", soft_wrap=soft_wrap)

    return log


def _version(value: bool) -> None:
    if value:
        console.print(f"edgekd {__version__}")
        raise typer.Exit()


Threads = Annotated[Optional[int], typer.Option("--threads", help="onnxruntime intra-op threads (default: one per physical core).")]
SessionConfig = Annotated[Optional[list[str]], typer.Option(
    "--session-config", metavar="KEY=VALUE",
    help="An onnxruntime session config entry, repeatable; e.g. mlas.disable_kleidiai=1 makes an ARM CPU's "
         "int8-activation MatMulNBits quantize activations per block as x86 does (docs/devices.md); "
         "enable_cpu_mem_arena=0 (also enable_mem_pattern, enable_mem_reuse) sets that SessionOptions switch.")]
Prepared = Annotated[Optional[Path], typer.Option(
    "--prepared", metavar="DIR",
    help="Keep the model optimized and its weights packed for this machine under DIR (made at the first run, "
         "then mapped from disk at each load: pages the system can drop instead of heap; the peak RSS barely "
         "moves; an .onnx bundle only; docs/runtime.md).")]
