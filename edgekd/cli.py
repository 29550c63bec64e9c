"""The one Typer app. Commands parse their options and call the library; nothing else lives here.

Every library error is an ``EdgekdError``: it is printed as one red line and the command exits
with its code (1 failure, 2 bad input). Set EDGEKD_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from edgekd import __version__
from edgekd.errors import EdgekdError

app = typer.Typer(
    name="edgekd",
    help=(
        "Ship a small, fast, faithful copy of a teacher LLM to the edge.\n\n"
        "The road: [bold]distill[/bold] a student from the teacher -> [bold]export[/bold] it to ONNX "
        "for a target profile (cpu, mobile, cuda) -> [bold]validate[/bold] the bundle against the "
        "teacher and pass or fail the target's gates -> [bold]generate[/bold] with it.\n\n"
        "Start with `edgekd teachers` and `edgekd inspect smollm2-135m-instruct`."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def command(*args, **kwargs) -> Callable:
    """Register a command whose ``EdgekdError`` becomes one red line and an exit code."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a, **k):
            try:
                return fn(*a, **k)
            except EdgekdError as e:
                if os.environ.get("EDGEKD_DEBUG"):
                    raise
                err_console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
                raise typer.Exit(e.exit_code) from None
            except KeyboardInterrupt:
                err_console.print("[yellow]interrupted[/yellow]")
                raise typer.Exit(130) from None
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except Exception as e:  # a bug or an unforeseen failure: still one line
                if os.environ.get("EDGEKD_DEBUG"):
                    raise
                first = (str(e).strip().splitlines() or [""])[0][:300]
                err_console.print(
                    f"[bold red]error:[/bold red] {type(e).__name__}: {first} "
                    "(set EDGEKD_DEBUG=1 for the traceback)",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(1) from None

        app.command(*args, **kwargs)(wrapper)
        return fn

    return deco


def _version(value: bool) -> None:
    if value:
        console.print(f"edgekd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    pass


# Options shared by the commands that load a model.
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run the model's own Python code from its folder (off: it can run anything).")
]
AllowPickle = Annotated[
    bool, typer.Option("--allow-pickle", help="Load pickle-only *.bin weights (off: unpickling can run code).")
]


@command("teachers")
def teachers() -> None:
    """List the teachers edgekd knows by name and whether each is installed."""
    from edgekd.teachers import KNOWN_TEACHERS

    table = Table(title="Known teachers")
    table.add_column("name", no_wrap=True)
    table.add_column("installed", no_wrap=True)
    table.add_column("what / where", overflow="fold")
    for t in KNOWN_TEACHERS.values():
        path = t.path()
        where = f"installed at {path}" if path else f"install with: {t.install}"
        table.add_row(t.name, "[green]yes[/green]" if path else "[red]no[/red]", f"{t.description}\n{where}")
    console.print(table)
    console.print("Any Hugging Face folder, cached hub id (org/name) or .gguf file works too.")


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


@command("inspect")
def inspect(
    model: Annotated[str, typer.Argument(help="A Hugging Face folder, a .gguf file, a cached hub id, or a known teacher name.")],
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Load a model and print its architecture, size, tokenizer and chat template facts."""
    import json

    from edgekd.teachers import describe, load_model, resolve_source

    source = resolve_source(model)
    with console.status(f"loading {model} ..."):
        m, tok = load_model(source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    facts = describe(m, tok, source)
    if json_out:
        print(json.dumps(facts, indent=2))
        return
    table = Table(title=f"{model}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in facts.items():
        if key in ("parameters", "embedding_parameters"):
            value = f"{value / 1e6:.1f}M ({value:,})"
        elif key == "size_on_disk_bytes":
            key, value = "size_on_disk", _fmt_bytes(value)
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
