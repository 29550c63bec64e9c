from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgekd.device.bundle import MANIFEST, read_manifest, write_manifest
from edgekd.device.errors import UsageError
from edgekd.device.io import atomic_write_bytes
from edgekd.device.outputs import atomic_dir
from edgekd.device.paths import inside


def test_atomic_dir_success_and_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / MANIFEST).write_text('{"format": "edgekd-bundle"}')  # edgekd's marker: --overwrite may replace it
        assert not out.exists()  # nothing at the destination until complete
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(UsageError, match="--overwrite"):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("killed mid-way")
    assert (out / "a.txt").read_text() == "1" and not (out / "b.txt").exists()  # old output untouched
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left behind


def test_overwrite_replaces_only_what_edgekd_made(tmp_path):
    from edgekd.device.outputs import check_output_dir, output_lock

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    with pytest.raises(UsageError, match=r"not written by edgekd \(it holds thesis.txt"):
        check_output_dir(docs, overwrite=True)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / MANIFEST).write_text("{}")
    for out in (model, tmp_path):  # the input itself, or a folder holding it
        with pytest.raises(UsageError, match="is \\(or contains\\) this command's input"):
            check_output_dir(out, overwrite=True, inputs=(model,))
    with pytest.raises(UsageError, match="root folder"):
        check_output_dir(Path("/"), overwrite=True)
    with pytest.raises(UsageError, match="home folder"):
        check_output_dir(Path.home(), overwrite=True)
    assert (docs / "thesis.txt").read_text() == "years of work"
    # one writer per output: a second lock on the same --out is refused while the first is held
    with output_lock(tmp_path / "b"):
        with pytest.raises(UsageError, match="another edgekd run"):
            with output_lock(tmp_path / "b"):
                pass
    with output_lock(tmp_path / "b"):  # released
        pass
    (tmp_path / ".c.lock").write_text("999999999")  # left by a killed run: taken over
    with output_lock(tmp_path / "c"):
        pass
    assert not (tmp_path / ".c.lock").exists()


def test_atomic_write_bytes_replaces(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../x", ""])
def test_inside_refuses_escapes(tmp_path, bad):
    with pytest.raises(UsageError, match="refused"):
        inside(tmp_path, bad)


def test_inside_refuses_symlink_escape(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "link").symlink_to("/etc")
    with pytest.raises(UsageError, match="outside"):
        inside(tmp_path / "b", "link/passwd")


def _bundle(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "model.onnx").write_bytes(b"weights")
    write_manifest(root, {"model": {"file": "model.onnx"}})
    return root


def test_manifest_round_trip_and_tamper(tmp_path):
    root = _bundle(tmp_path)
    m = read_manifest(root)
    assert m["files"][0]["path"] == "model.onnx"
    (root / "model.onnx").write_bytes(b"weightz")
    with pytest.raises(UsageError, match="model.onnx does not match"):
        read_manifest(root)


def test_manifest_escaping_path_refused(tmp_path):
    root = _bundle(tmp_path)
    m = json.loads((root / MANIFEST).read_text())
    m["files"].append({"path": "../secret", "bytes": 1, "sha256": "0"})
    (root / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(UsageError, match="escapes"):
        read_manifest(root)


def test_not_a_bundle(tmp_path):
    with pytest.raises(UsageError, match="not an edgekd bundle"):
        read_manifest(tmp_path)
