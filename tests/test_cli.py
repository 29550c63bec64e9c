"""The CLI as a user runs it: a real subprocess, exit codes, one-line errors, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import requires_smollm2

from edgekd import __version__


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgekd", *args], capture_output=True, text=True, timeout=timeout
    )


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and __version__ in r.stdout
    r = run("--help")
    assert r.returncode == 0
    for word in ("distill", "export", "validate", "teachers", "inspect"):
        assert word in r.stdout


def test_models_lists_the_packaged_default():
    r = run("teachers")
    assert r.returncode == 0
    assert "smollm2-135m-instruct" in r.stdout


@pytest.mark.parametrize("arg", ["/no/such/path", "not-a-known-teacher", "some-org/not-cached"])
def test_inspect_bad_source_is_one_line(arg, tmp_path, monkeypatch):
    r = run("inspect", arg)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) <= 2 and lines[0].startswith("error:")


def test_inspect_corrupt_gguf_and_empty_folder(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 7)
    r = run("inspect", str(bad))
    assert r.returncode == 2 and "GGUF" in r.stderr and "Traceback" not in r.stderr
    r = run("inspect", str(tmp_path))
    assert r.returncode == 2 and "config.json" in r.stderr


def test_inspect_tiny_folder_json(tiny_teacher_dir):
    import json

    r = run("inspect", str(tiny_teacher_dir), "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["layers"] == 4 and facts["tied_embeddings"] and facts["pad_token"] == "<|im_end|>"


@requires_smollm2
@pytest.mark.smollm2
def test_inspect_smollm2_table():
    r = run("inspect", "smollm2-135m-instruct")
    assert r.returncode == 0, r.stderr
    for fact in ("30", "576", "49152", "134.5M", "True"):
        assert fact in r.stdout


def test_every_distill_setting_is_a_flag_or_documented_config_only():
    import dataclasses
    import inspect

    from edgekd import cli
    from edgekd.distill.config import CONFIG_ONLY, DistillConfig

    flags = set(inspect.signature(cli.distill).parameters)
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    assert fields - flags == set(CONFIG_ONLY), "every DistillConfig field is a flag (derived in cli.with_distill_flags) unless CONFIG_ONLY"
    assert all(name in inspect.getdoc(cli.distill) for name in CONFIG_ONLY)  # said in `edgekd distill --help`
