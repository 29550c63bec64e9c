"""Where edgekd writes: the rule every ``--out`` obeys, work folders and locks that know which
process owns them, and the atomic swap that puts a finished output in place (a kill at any point
leaves the previous output or the new one, never half of either)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekd.device.errors import UsageError
from edgekd.device.io import current_umask, json_object_or_none, loads_bounded

# What marks a folder as edgekd's own output. Read from the file's content, never from its name
# alone: a web app has a manifest.json of its own, a project a report.json.
DISTILL_TOML_MARKER = "# The resolved config of this run: `edgekd distill --config distill.toml` reruns it."
BUNDLE, DISTILL_RUN, REPORT = "a bundle", "a distill run", "a validate report"
OUTPUT_MARKERS = {  # file -> (what it marks, the ``format`` its JSON carries)
    "manifest.json": (BUNDLE, "edgekd-bundle"),
    "distill.json": (DISTILL_RUN, "edgekd-distill"),
    "report.json": (REPORT, "edgekd-report"),
}


def edgekd_output(folder: Path) -> str | None:
    """What edgekd output ``folder`` is ("a bundle", "a distill run", "a validate report"), read
    from the markers edgekd writes into it, or None when nothing in it says it is edgekd's."""
    folder = Path(folder)
    for name, (what, fmt) in OUTPUT_MARKERS.items():
        data = json_object_or_none(folder / name)
        if data is not None and data.get("format") == fmt:
            return what
        # a report of an edgekd before the marker: exactly its three keys, with report.md beside it
        if what == REPORT and data is not None and set(data) == {"passed", "command", "bundles"} and (folder / "report.md").is_file():
            return what
    try:
        with open(folder / "distill.toml", encoding="utf-8") as f:
            if f.readline().rstrip("\n") == DISTILL_TOML_MARKER:
                return DISTILL_RUN
    except (OSError, UnicodeDecodeError):
        pass
    return None


def check_output_dir(out: Path, overwrite: bool, inputs: tuple[Path | str, ...] = (), kind: str | None = None) -> None:
    """The one rule for every command's ``--out``, checked before any work starts.

    A missing or empty folder is fine. A non-empty one is replaced only with ``overwrite`` and only
    when edgekd wrote it (``edgekd_output`` reads its marker; with ``kind``, only that kind of
    output); never ``/``, the home folder, one of the command's ``inputs`` or a folder that
    contains one; anything else is refused naming what is there. A previous output that a killed
    run left aside mid-swap is put back first.
    """
    out = Path(out)
    if out.parent.is_dir():
        _restore_or_sweep_old(out)
    refuse_unsafe_out(out, inputs)
    check_writable(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"{out} exists and is not empty: pass --overwrite to replace it, or choose another --out")
    what = edgekd_output(out)
    if what is None or (kind is not None and what != kind):
        held = sorted(p.name for p in out.iterdir())
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        found = f"it is {what}, not {kind}" if what else f"it holds {shown}; no file in it carries edgekd's marker"
        raise UsageError(f"{out} was not written by edgekd ({found}): "
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
    try:  # a file written and removed, not os.access: root passes that on a read-only mount, as in /sys
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".edgekd-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"cannot write into {probe} ({e.strerror or 'read-only or no permission'}): choose a writable --out") from None


# ---------------------------------------------------------------------------------------------
# Which process owns a lock or a work folder: PID, its start time and the boot, so that a PID
# reused by another process (or by edgekd itself, PID 1 in a restarted container) is not taken
# for the run that wrote it.


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, field 22 of ``/proc/PID/stat``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_identity() -> dict[str, Any]:
    """This process as a lock or a work folder records it."""
    return {"pid": os.getpid(), "start": _start_ticks(os.getpid()), "boot": _boot_id(), "host": socket.gethostname()}


def owner_alive(ident: Any) -> bool:
    """Is the process a lock or work folder recorded still running? Unknown hosts count as alive
    (a shared disk: edgekd cannot tell, so it leaves their files alone)."""
    if not isinstance(ident, dict) or not isinstance(ident.get("pid"), int) or not 0 < ident["pid"] < 2**31:
        return False  # damaged: nothing runs under it
    if ident.get("host") not in (None, socket.gethostname()):
        return True
    boot = _boot_id()
    if ident.get("boot") and boot and ident["boot"] != boot:
        return False  # written before this machine (or container) started
    pid = ident["pid"]
    start = _start_ticks(pid)
    if isinstance(ident.get("start"), int) and start is not None:
        return start == ident["start"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()  # a legacy lock naming this very process was left by an earlier one


def _read_identity(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if text.isascii() and text.isdigit():  # a lock of an earlier edgekd: the PID alone
        return {"pid": int(text)}
    try:
        return loads_bounded(text)
    except ValueError:
        return None


WORK_MARKER = ".edgekd-work"  # inside every temporary folder edgekd makes: who made it


def make_work_dir(parent: Path | None, prefix: str) -> Path:
    """A new temporary folder (``tempfile.mkdtemp``) marked with this process's identity, after
    removing the folders of the same ``prefix`` in ``parent`` that killed runs left behind."""
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    sweep_stale(parent, prefix)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        write_marker(tmp)
    except BaseException:  # a full disk, a signal: no unmarked folder is left that no sweep would take
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def write_marker(folder: Path) -> None:
    """Mark ``folder`` as this process's work (``WORK_MARKER``)."""
    (folder / WORK_MARKER).write_text(json.dumps(process_identity()), encoding="utf-8")


def sweep_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove the folders ``parent/prefix*`` that carry edgekd's work marker and whose process is
    gone (a kill -9, a power cut); a folder without the marker is not edgekd's and stays."""
    removed: list[Path] = []
    try:
        candidates = [p for p in Path(parent).iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for p in candidates:
        if _abandoned(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _abandoned(folder: Path) -> bool:
    """A folder of edgekd's work (it carries the marker) whose process is gone."""
    marker = folder / WORK_MARKER
    return folder.is_dir() and not folder.is_symlink() and marker.is_file() and not owner_alive(_read_identity(marker))


@contextlib.contextmanager
def work_dir(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """``make_work_dir`` for the length of a block; removed at its end (error, Ctrl-C and SIGTERM
    included); a kill -9 leaves it to the next run's sweep."""
    tmp = make_work_dir(parent, prefix)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _create_with(path: Path, text: str) -> None:
    """Create ``path`` holding ``text`` in one step (``FileExistsError`` if it exists): written to a
    temporary file, then hard-linked into place, so that no reader ever sees it empty."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """One writer per output: an exclusive ``.NAME.lock`` beside ``out`` for the whole run.

    A second run to the same ``--out`` fails at once with a line naming the lock file; a lock left
    by a killed run (its process is gone, or its PID now belongs to another process) is taken over."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    for _ in range(2):
        try:
            _create_with(lock, json.dumps(process_identity()))
        except FileExistsError:
            ident = _read_identity(lock)
            if owner_alive(ident):
                raise UsageError(f"another edgekd run (process {ident['pid']}) is writing {out}: wait for it, choose another --out, "
                                 f"or, if no such run is going on, remove the lock file {lock}") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its process is gone
            continue
        except OSError as e:
            raise UsageError(f"cannot write into {out.parent} ({e.strerror}): choose a writable --out") from None
        break
    else:
        raise UsageError(f"another edgekd run is writing {out}: wait for it, or remove the lock file {lock}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False, inputs: tuple[Path | str, ...] = (), kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    A failure, Ctrl-C or SIGTERM leaves ``out`` as it was (absent, or the previous output when
    ``overwrite``); a kill -9 leaves a marked ``.NAME.partial-*`` folder that the next run to
    ``out`` removes. The old output is removed only after the new one is complete, and only if it
    is still one edgekd may replace (checked again at the rename: another process may have written
    there meanwhile).
    """
    out = Path(out)
    check_output_dir(out, overwrite, inputs, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_work_dir(out.parent, f".{out.name}.partial-")
    make_shareable(tmp)  # an output is the user's, with the permissions their umask gives
    try:
        yield tmp
        check_output_dir(out, overwrite, inputs, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    with signals_held():  # Ctrl-C or SIGTERM waits for the two renames: never between them
        try:
            if out.exists():
                old = make_work_dir(out.parent, f".{out.name}.old-")
                os.replace(out, old / out.name)
            os.replace(tmp, out)
        except BaseException:
            if old is not None and (old / out.name).exists() and not out.exists():
                os.replace(old / out.name, out)  # the previous output back where it was
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    (out / WORK_MARKER).unlink(missing_ok=True)  # moved in with the folder; a kill here leaves a harmless file
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP for a block (delivered at its end): a step that must not
    be cut in two. Elsewhere than Unix the block runs as it is."""
    held = {signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _restore_or_sweep_old(out: Path) -> None:
    """A kill -9 between atomic_dir's two renames leaves the previous output in ``.NAME.old-*``
    and nothing at ``out``: put it back. Otherwise an ``.old-*`` of a dead run is removed."""
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not _abandoned(old):
            continue
        if (old / out.name).is_dir() and not out.exists():
            os.replace(old / out.name, out)
        shutil.rmtree(old, ignore_errors=True)


def make_shareable(folder: Path) -> None:
    """Give a folder from ``tempfile.mkdtemp`` (private: 0700) the permissions the umask gives a
    new folder, before it is renamed into place as something others read (a bundle, a cache)."""
    os.chmod(folder, 0o777 & ~current_umask())
