"""Cross-command reliability: a killed export leaves nothing at the destination, and an
existing bundle survives a killed --overwrite (issue 6; distill's kill/resume test is in
tests/test_distill.py)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgekd.bundle import read_manifest


def _export(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgekd", "export", str(model), "--target", "cpu", "--out", str(out), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_sigkilled_export_leaves_nothing_and_keeps_the_old_bundle(tiny_teacher_dir, tmp_path):
    out = tmp_path / "bundle"
    proc = _export(tiny_teacher_dir, out)
    time.sleep(random.uniform(2.0, 4.0))  # mid-way: loading, exporting or quantizing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing half-written where the user expects a bundle

    assert _export(tiny_teacher_dir, out).wait() == 0
    before = read_manifest(out)
    proc = _export(tiny_teacher_dir, out, "--overwrite")
    time.sleep(random.uniform(2.0, 4.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_manifest(out) == before  # the old bundle is intact, hashes and all
