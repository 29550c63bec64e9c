"""Atomic outputs: nothing half-written ever sits where the user expects a finished result."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import math
import os
import stat
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from edgekd.device.errors import UsageError, first_line


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
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private (0600); a written file is not
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


def cpuinfo_field(*keys: str) -> str | None:
    """The value of the first ``/proc/cpuinfo`` line that starts with one of ``keys`` (lower case:
    ``"model name"``, ``"flags"``), or None where there is no such file or line."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(keys):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSON-lines text, split at ``\n`` only (JSON Lines' separator; ``\r\n`` too).
    ``str.splitlines`` would also split at U+2028, U+0085 and others, which JSON allows raw inside
    a string."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def jsonl_text(records: Iterable[Any]) -> str:
    """Records as JSON lines, ASCII-escaped: no character inside a string can split a line."""
    return "".join(json_line(r) + "\n" for r in records)


def iter_jsonl(path: Path, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file; a line that is not
    one JSON object is a ``UsageError`` naming the file and line."""
    path = Path(path)
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{path} is not a UTF-8 text file") from None
    for n, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        try:
            rec = loads_bounded(line)
        except ValueError as e:
            raise UsageError(f"{path}:{n}: not a JSON line ({first_line(e)}); each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise UsageError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        yield n, rec


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (a diverged loss, an undefined ratio) as null: JSON has
    no NaN, and a reader of edgekd's files (ours or another language's) must not meet one."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_line(obj: Any) -> str:
    """One JSON line: finite numbers only, ASCII-escaped (no character inside a string splits a line)."""
    return json.dumps(finite_json(obj), ensure_ascii=True, allow_nan=False, default=str)


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(finite_json(obj), indent=2, sort_keys=False, default=str, allow_nan=False)
    atomic_write_bytes(Path(path), (text + "\n").encode())


MAX_JSON_BYTES = 256 << 20  # edgekd's own JSON files (manifest, golden, report) are far smaller
MAX_JSON_DEPTH = 64  # edgekd writes at most a few levels; deeper is a damaged or hostile file


def _depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return False
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return True


def loads_bounded(text: str) -> Any:
    """``json.loads`` that raises ``ValueError`` (never ``RecursionError``) for a text nested deeper
    than ``MAX_JSON_DEPTH`` or a number too long for Python's int parser. ``NaN`` and ``Infinity``
    parse, as Python's json does: each reader's field checks name the field that holds one."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not _depth_ok(data):
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def read_json(path: Path, fix: str = "") -> Any:
    """A JSON file edgekd reads (its own, or one a user hands it), bounded in size and depth; any
    problem is one ``UsageError`` naming the file and ending with ``fix``. Only a regular file is
    read (a FIFO or a link to a device named manifest.json would block or never end)."""
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise UsageError(f"{path} is not a regular file{fix}")
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist{fix}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise UsageError(f"{path} is over the {MAX_JSON_BYTES >> 20} MiB edgekd reads as JSON{fix}")
    try:
        return loads_bounded(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a UTF-8 text file{fix}") from None
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON ({first_line(e)}){fix}") from None


def json_object_or_none(path: Path) -> dict | None:
    """A JSON object file's content, or None for anything else: a missing or unreadable file,
    other JSON, not JSON at all."""
    try:
        data = read_json(path)
    except (UsageError, OSError):
        return None
    return data if isinstance(data, dict) else None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
