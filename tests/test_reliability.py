"""Cross-command reliability: a killed export leaves nothing at the destination, and an
existing bundle survives a killed --overwrite (issue 6; distill's kill/resume test is in
tests/test_distill.py)."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgekd.device.bundle import read_manifest


def _export(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgekd", "export", str(model), "--target", "cpu", "--out", str(out), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_a_sigkilled_overwrite_keeps_the_old_bundle(tiny_teacher_dir, tmp_path):
    """(A killed first export leaves nothing: tests/test_odd_input.py.) An --overwrite killed mid-way,
    once its partial folder exists, leaves the old bundle as it was, hashes and all."""
    out = tmp_path / "bundle"
    assert _export(tiny_teacher_dir, out).wait() == 0
    before = read_manifest(out)
    proc = _export(tiny_teacher_dir, out, "--overwrite")
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".bundle.partial-*")) and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # exporting or quantizing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the export finished before the kill"
    assert read_manifest(out) == before


# --- nothing lost, no way around the checks (issue 16) -----------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
from conftest import run_edgekd  # noqa: E402
from test_runtime import shared_fp32_bundle  # noqa: E402


def _one_clear_line(r: subprocess.CompletedProcess, code: int, words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert words in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr


def test_export_overwrite_never_deletes_its_input_or_a_users_folder(tiny_teacher_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_teacher_dir, model)
    files = sorted(p.name for p in model.iterdir())
    _one_clear_line(run_edgekd("export", model, "--target", "cpu", "--out", model, "--overwrite"), 2, "this command's input")
    _one_clear_line(run_edgekd("export", model, "--target", "cpu", "--out", tmp_path, "--overwrite"), 2, "this command's input")
    assert sorted(p.name for p in model.iterdir()) == files
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine")
    _one_clear_line(run_edgekd("export", model, "--target", "cpu", "--out", docs, "--overwrite"), 2, "not written by edgekd")
    assert (docs / "notes.txt").read_text() == "mine"
    _one_clear_line(run_edgekd("export", model, "--target", "cpu", "--out", "/", "--overwrite"), 2, "root folder")


def test_two_exports_to_one_new_out_one_wins_the_other_is_refused(tiny_teacher_dir, tmp_path):
    out = tmp_path / "bundle"
    first = _export(tiny_teacher_dir, out)
    lock = tmp_path / ".bundle.lock"
    for _ in range(200):
        if lock.exists():
            break
        time.sleep(0.05)
    second = run_edgekd("export", tiny_teacher_dir, "--target", "cpu", "--out", out)
    assert first.wait(timeout=300) == 0
    winner = read_manifest(out)  # the first run's bundle, complete
    # refused either while the first holds the lock, or (a tiny export is quick) once it has finished
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "another edgekd run" in second.stderr or "exists and is not empty" in second.stderr, second.stderr
    assert read_manifest(out) == winner and not lock.exists()  # nothing silently replaced


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_teacher_dir) -> Path:
    return shared_fp32_bundle(tmp_path_factory, tiny_teacher_dir)


def _tampered(bundle: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    return copy


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.pop("files"), "files must be a non-empty list"),
    (lambda m: m.update(files=[f for f in m["files"] if f["path"] != "model.onnx"]), "model.onnx is not listed"),
    (lambda m: m.update(files=[f for f in m["files"] if f["path"] != "tokenizer.json"]), "tokenizer.json is not listed"),
    (lambda m: m["target"].update(execution_providers="CPUExecutionProvider"), "target.execution_providers must be a list"),
    (lambda m: m["target"]["gates"].update(min_top1_vs_reference=float("nan")), "target.gates.min_top1_vs_reference must be a finite"),
    (lambda m: m["model"].update(file=7), "model.file must be a file name"),
    (lambda m: m["files"][0].update(bytes="12"), "files[0] must be"),
])
def test_a_damaged_manifest_is_refused_naming_the_field(bundle, tmp_path, edit, words):
    _one_clear_line(run_edgekd("generate", _tampered(bundle, tmp_path, edit), "hi", "-n", "2"), 2, words)


def test_validate_target_pins_the_gates_whatever_the_manifest_says(bundle, tmp_path):
    from test_validate import break_with_quantize_dynamic

    broken = break_with_quantize_dynamic(bundle, tmp_path / "broken")
    loose = _tampered(broken, tmp_path, lambda m: m["target"].update(gates={}))
    from edgekd.device.bundle import read_manifest as read
    from edgekd.device.bundle import write_manifest

    m = read(loose, verify=False)
    write_manifest(loose, {k: v for k, v in m.items() if k not in ("format", "format_version", "files")})  # hashes re-signed
    fast = ["--no-speed", "--num-prompts", "2", "--answer-tokens", "6"]
    r = run_edgekd("validate", loose, "--out", tmp_path / "r1", *fast)
    assert r.returncode == 0 and "no gates" in r.stdout
    assert "the bundle's own manifest" in json.loads((tmp_path / "r1" / "report.json").read_text())["bundles"][0]["gates_from"]
    r = run_edgekd("validate", loose, "--out", tmp_path / "r2", "--target", "cpu", *fast)
    assert r.returncode == 1 and "gate(s) failed" in r.stderr  # which of cpu's gates a 12-position probe trips varies by CPU
    report = json.loads((tmp_path / "r2" / "report.json").read_text())["bundles"][0]
    assert "--target cpu" in report["gates_from"]
    from edgekd.export.profile import load_target

    cpu = {k for k, v in dataclasses.asdict(load_target("cpu").gates).items() if v is not None}
    assert {g["name"] for g in report["gates"]} == cpu and not all(g["passed"] for g in report["gates"])


def test_paths_with_brackets_print_as_text(tmp_path):
    weird = tmp_path / "a[/]b[red]c"
    _one_clear_line(run_edgekd("export", weird, "--target", "cpu", "--out", tmp_path / "o"), 2, "a[/]b[red]c")


def test_a_bug_has_its_own_exit_code(tiny_teacher_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import edgekd.device.tasks
    from edgekd.cli import app

    monkeypatch.setattr(edgekd.device.tasks, "shipped_tasks", lambda: 1 / 0)
    r = CliRunner().invoke(app, ["tasks"])
    assert r.exit_code == 3 and "internal error, ZeroDivisionError" in r.output and "EDGEKD_DEBUG" in r.output


def test_a_read_only_report_folder_is_refused_before_any_work(bundle, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    # root writes into a folder without write permission; no one creates files in /sys (sysfs)
    where = Path("/sys") if os.geteuid() == 0 else ro
    try:
        _one_clear_line(run_edgekd("validate", bundle, "--out", where / "edgekd-report"), 2, f"cannot write into {where}")
    finally:
        ro.chmod(0o700)


# --- property tests: a manifest or bundle file of any shape loads, or raises edgekd's own error --

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_FIELDS = ["files", "model", "target", "source", "format_version", ("model", "file"), ("target", "gates"),
           ("target", "execution_providers"), ("model", "eos_token_ids"), ("model", "num_layers")]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(_FIELDS), value=_json)
def test_any_manifest_field_value_loads_or_is_a_usage_error(bundle, tmp_path_factory, field, value):
    from edgekd.device.bundle import read_manifest as read
    from edgekd.device.errors import UsageError

    root = tmp_path_factory.mktemp("prop")
    for name in ("manifest.json", "tokenizer.json", "tokenizer_config.json", "model.onnx"):
        shutil.copy(bundle / name, root / name)
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"] = [f for f in m["files"] if (root / f["path"]).exists()]
    if isinstance(field, tuple):
        if isinstance(m.get(field[0]), dict):
            m[field[0]][field[1]] = value
    else:
        m[field] = value
    (root / "manifest.json").write_text(json.dumps(m))
    try:
        read(root)
    except UsageError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_manifest_bytes_load_or_are_a_usage_error(tmp_path_factory, data):
    from edgekd.device.bundle import read_manifest as read
    from edgekd.device.errors import UsageError

    root = tmp_path_factory.mktemp("bytes")
    (root / "manifest.json").write_bytes(data)
    with pytest.raises(UsageError):
        read(root)


@pytest.mark.parametrize("name, content, words", [
    ("tokenizer_config.json", "[]", "must hold a JSON object"),
    ("tokenizer_config.json", "{not json", "is not valid JSON"),
    ("tokenizer.json", '{"version": "1.0", "model": 7}', "is not a tokenizer file"),
    ("chat_template.jinja", "{% for x in %}", "does not parse"),
])
def test_damaged_bundle_files_re_signed_are_one_line_errors(bundle, tmp_path, name, content, words):
    """Files changed and the manifest re-signed (hashes updated): still one line naming the file."""
    from edgekd.device.bundle import read_manifest as read
    from edgekd.device.bundle import write_manifest

    copy = tmp_path / "damaged"
    shutil.copytree(bundle, copy)
    (copy / name).write_text(content)
    m = read(copy, verify=False)
    write_manifest(copy, {k: v for k, v in m.items() if k not in ("format", "format_version", "files")})
    _one_clear_line(run_edgekd("generate", copy, "hi", "-n", "2"), 2, words)
