"""Atomic outputs: nothing half-written ever sits where the user expects a finished result."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekd.errors import UsageError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def proc_kib_field(path: str, key: str) -> int | None:
    """Bytes of a ``Key:  N kB`` line of a Linux ``/proc`` file (``/proc/meminfo``,
    ``/proc/self/status``), or None where there is no such file or line."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def iter_jsonl(path: Path, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file; a line that is not
    one JSON object is a ``UsageError`` naming the file and line."""
    path = Path(path)
    if text is None:
        text = path.read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not a JSON line ({e.msg}); each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise UsageError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        yield n, rec


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


# The files that mark a folder as edgekd's own output: only such a folder may be replaced.
OUTPUT_MARKERS = {
    "manifest.json": "a bundle",
    "distill.json": "a distill run",
    "distill.toml": "a distill run",
    "report.json": "a validate report",
}


def check_output_dir(out: Path, overwrite: bool, inputs: tuple[Path | str, ...] = ()) -> None:
    """The one rule for every command's ``--out``, checked before any work starts.

    A missing or empty folder is fine. A non-empty one is replaced only with ``overwrite`` and only
    when edgekd made it (one of ``OUTPUT_MARKERS``); never ``/``, the home folder, one of the
    command's ``inputs`` or a folder that contains one; anything else is refused naming what is there.
    """
    out = Path(out)
    refuse_unsafe_out(out, inputs)
    check_writable(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"{out} exists and is not empty: pass --overwrite to replace it, or choose another --out")
    if not any((out / name).is_file() for name in OUTPUT_MARKERS):
        held = sorted(p.name for p in out.iterdir())
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise UsageError(f"{out} was not written by edgekd (it holds {shown}; no {', '.join(OUTPUT_MARKERS)}): "
                         "--overwrite replaces only edgekd's own outputs; choose another --out")


def refuse_unsafe_out(out: Path, inputs: tuple[Path | str, ...] = ()) -> None:
    """An output is never a file, ``/``, the home folder, an input or a folder holding an input."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder: choose another --out")
    resolved = out.resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise UsageError(f"--out {out} is {'the root folder' if resolved == Path(resolved.anchor) else 'your home folder'}: choose a new folder for the output")
    for given in inputs:
        src = Path(given).expanduser().resolve()
        if src == resolved or resolved in src.parents:
            raise UsageError(f"--out {out} is (or contains) this command's input {given}: choose another --out")


def check_writable(out: Path) -> None:
    """Refuse, before any work, an output whose folder (or nearest existing parent) cannot be written."""
    probe = Path(out)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write into {probe} (read-only or no permission): choose a writable --out")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """One writer per output: an exclusive ``.NAME.lock`` beside ``out`` for the whole run.

    A second run to the same ``--out`` fails at once with a clear line; a lock left by a killed run
    (its process is gone) is taken over."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise UsageError(f"another edgekd run (process {pid}) is writing {out}: wait for it, or choose another --out") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its process is gone
            continue
        except OSError as e:
            raise UsageError(f"cannot write into {out.parent} ({e.strerror}): choose a writable --out") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    else:
        raise UsageError(f"another edgekd run is writing {out}: wait for it, or choose another --out")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False, inputs: tuple[Path | str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    A failure or a kill leaves ``out`` as it was (absent, or the previous output when
    ``overwrite``). The old output is removed only after the new one is complete, and only if it
    is still one edgekd may replace (checked again at the rename: another process may have written
    there meanwhile).
    """
    out = Path(out)
    check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield tmp
        check_output_dir(out, overwrite, inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def make_shareable(folder: Path) -> None:
    """Give a folder from ``tempfile.mkdtemp`` (private: 0700) the permissions the umask gives a
    new folder, before it is renamed into place as something others read (a bundle, a cache)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the libraries' chatter inside a block (transformers' loading notices and GGUF
    progress bars, the exporter's tracer warnings, onnxruntime's quantizers logging every node
    and printing progress bars): warnings, logging below ERROR, stdout and stderr. Errors raise."""
    hf_logging: Any = None
    if "transformers" in sys.modules:  # never imports it: the runtime side has no transformers
        hf_logging = importlib.import_module("transformers.utils.logging")
    level = hf_logging.get_verbosity() if hf_logging else None
    if hf_logging:
        hf_logging.set_verbosity_error()
    old = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        logging.disable(old)
        if hf_logging and level is not None:
            hf_logging.set_verbosity(level)
