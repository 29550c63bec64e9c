"""Odd input, signals and full disks (issue 27): one test per cause, not per example.

- ownership by content: ``--overwrite`` and report folders replace only what edgekd marked as its own;
- one number check: no NaN or inf passes a setting, a flag, a profile or a task;
- JSON lines split at ``\\n`` only, written ASCII-safe; JSON read with a depth and size bound;
- text is text: paths, prompts and help texts print as they are, one line;
- a library's error that comes from the user's input or the machine is edgekd's one line, exit 2;
- SIGTERM cleans up as Ctrl-C; a rerun sweeps what a kill -9 left; a lock knows a reused PID;
- bounded work: answer tokens capped at the context, a template's size and time, a pipeline's plan;
- a fuzz test over the CLI's flags.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_edgekd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import _one_clear_line
from test_runtime import shared_fp32_bundle

from edgekd.device.errors import UsageError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_teacher_dir) -> Path:
    return shared_fp32_bundle(tmp_path_factory, tiny_teacher_dir)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- ownership by content, not by name -------------------------------------------------------------


def test_overwrite_never_replaces_a_folder_whose_edgekd_file_names_are_not_edgekds(tiny_teacher_dir, tmp_path):
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "my app", "start_url": "/"}')  # a web app manifest
    (webapp / "index.html").write_text("<html></html>")
    (webapp / "app.js").write_text("main()")
    before = _tree(webapp)
    _one_clear_line(run_edgekd("export", tiny_teacher_dir, "--target", "cpu", "--out", webapp, "--overwrite"), 2, "not written by edgekd")
    assert _tree(webapp) == before

    from edgekd.device.outputs import check_output_dir, edgekd_output

    for name in ("distill.json", "report.json", "distill.toml"):  # each marker file, with the user's content
        folder = tmp_path / name.replace(".", "-")
        folder.mkdir()
        (folder / name).write_text('{"passed": true}' if name.endswith(".json") else 'lr = 1.0\n')
        (folder / "src.py").write_text("print(1)")
        assert edgekd_output(folder) is None
        with pytest.raises(UsageError, match="not written by edgekd"):
            check_output_dir(folder, overwrite=True)
    # a bundle is not a report: a kind-checked output refuses edgekd's other outputs too
    b = tmp_path / "b"
    b.mkdir()
    (b / "manifest.json").write_text('{"format": "edgekd-bundle"}')
    assert edgekd_output(b) == "a bundle"
    with pytest.raises(UsageError, match="it is a bundle, not a validate report"):
        check_output_dir(b, overwrite=True, kind="a validate report")


def test_validate_never_replaces_a_users_folder_holding_a_report_json(bundle, tmp_path):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "report.json").write_text('{"passed": true, "bundles": []}')
    (proj / "src" / "main.py").write_text("print('mine')")
    before = _tree(proj)
    _one_clear_line(run_edgekd("validate", bundle, "--out", proj, "--no-speed", "--num-prompts", "1", "--answer-tokens", "2"), 2,
                    "holds no earlier report of edgekd's")
    assert _tree(proj) == before
    # an edgekd report is replaced whole, in one rename, and carries its marker
    out = tmp_path / "report"
    for _ in range(2):
        r = run_edgekd("validate", bundle, "--out", out, "--no-speed", "--num-prompts", "1", "--answer-tokens", "2")
        assert r.returncode in (0, 1), r.stderr
        assert json.loads((out / "report.json").read_text())["format"] == "edgekd-report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj", "report"]  # no temporaries left
    assert oct((out / "report.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_distill_overwrite_refuses_a_folder_that_only_has_a_distill_toml(tmp_path):
    from edgekd.distill.run import StudentRun

    folder = tmp_path / "project"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "mine.txt").write_text("keep")
    (folder / "distill.toml").write_text("lr = 1e-4\n")  # the user's own config, not a run of edgekd's
    assert not StudentRun(folder).is_ours()
    r = run_edgekd("distill", "--out", folder, "--overwrite", "--max-steps", "1", "--teacher", tmp_path / "none")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (folder / "checkpoints" / "mine.txt").read_text() == "keep"


# --- one number check ----------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--temperature", "nan"),
                                         ("--gen-temperature", "nan"), ("--label-loss", "nan"), ("--alpha", "-inf")])
def test_non_finite_flags_are_refused_naming_the_flag(tmp_path, flag, value):
    _one_clear_line(run_edgekd("distill", "--out", tmp_path / "o", flag, value), 2, flag)
    assert not (tmp_path / "o").exists()


def test_non_finite_numbers_in_files_are_refused_naming_the_key(tmp_path):
    from edgekd.device.config import from_mapping
    from edgekd.distill.config import DistillConfig
    from edgekd.export.profile import load_target

    profile = tmp_path / "p.toml"
    profile.write_text('description = "x"\nexecution_providers = ["CPUExecutionProvider"]\nsteps = []\n[gates]\nmax_size_mb = inf\n')
    with pytest.raises(UsageError, match=r"max_size_mb = inf must be a finite number"):
        load_target(str(profile))
    with pytest.raises(UsageError, match="lr = nan must be a finite number"):
        from_mapping(DistillConfig, {"lr": float("nan")}, "run.toml")
    task = tmp_path / "task"
    shutil.copytree(Path(__file__).parents[1] / "tasks" / "sentiment", task)
    text = (task / "task.toml").read_text().replace("min_label_agreement_vs_teacher = 0.85", "min_label_agreement_vs_teacher = nan")
    (task / "task.toml").write_text(text)
    from edgekd.device.tasks import load_task

    with pytest.raises(UsageError, match="must be a finite number"):
        load_task(str(task))


def test_a_negative_count_is_a_usage_error_not_a_bug(tiny_teacher_dir, tmp_path):
    _one_clear_line(run_edgekd("export", tiny_teacher_dir, "--target", "cpu", "--out", tmp_path / "o", "--golden-prompts", "-1"), 2,
                    "--golden-prompts -1")


def test_written_json_holds_no_nan(tmp_path):
    from edgekd.device.io import read_json, write_json

    write_json(tmp_path / "a.json", {"loss": float("nan"), "x": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "a.json").read_text(), parse_constant=lambda c: 1 / 0) == {"loss": None, "x": [None, 1.5]}
    assert read_json(tmp_path / "a.json")["x"][1] == 1.5


@pytest.mark.parametrize("args, words", [
    (["-n", "2", "--seed", "-1"], "seed must be"),
    (["-n", "2", "--temperature", "nan"], "--temperature"),
    (["-n", "2", "--top-p", "inf"], "--top-p"),
    (["-n", "2", "--threads", "99999999999999999999"], "--threads"),  # found by the fuzz test below
    (["-n", "2", "--threads", "-1"], "--threads"),
])
def test_generate_refuses_bad_sampling_in_one_line(bundle, args, words):
    _one_clear_line(run_edgekd("generate", bundle, "hi", *args), 2, words)


# --- JSON lines and bounded JSON ----------------------------------------------------------------


def test_jsonl_splits_at_newlines_only_and_writes_ascii(tmp_path):
    from edgekd.device.io import iter_jsonl, jsonl_text

    records = [{"prompt": "a\u2028b\u0085c\x1cd"}, {"prompt": "second"}]
    text = jsonl_text(records)
    assert text.isascii() and text.count("\n") == 2
    raw = tmp_path / "raw.jsonl"  # a raw U+2028 inside a JSON string is valid JSON: one record
    raw.write_text(json.dumps(records[0], ensure_ascii=False) + "\r\n" + json.dumps(records[1]) + "\n", encoding="utf-8")
    for path, content in ((tmp_path / "esc.jsonl", text), (raw, None)):
        if content is not None:
            path.write_text(content)
        assert [r for _, r in iter_jsonl(path)] == records


@pytest.mark.parametrize("text, words", [
    ("[" * 10000 + "]" * 10000, "nested deeper"),
    ('{"a": ' + "9" * 5000 + "}", "not valid JSON"),
    ("\xff", "not a UTF-8 text file"),
])
def test_hostile_json_is_one_line(tmp_path, text, words):
    from edgekd.device.io import read_json

    p = tmp_path / "x.json"
    p.write_text(text, encoding="latin-1")
    with pytest.raises(UsageError, match=words):
        read_json(p)


def _resigned(bundle: Path, tmp_path: Path, edit) -> Path:
    from edgekd.device.bundle import read_manifest, write_manifest

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    edit(copy)
    m = read_manifest(copy, verify=False)
    write_manifest(copy, {k: v for k, v in m.items() if k not in ("format", "format_version", "files")})
    return copy


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["model"].update(context_length="long"), "model.context_length must be a whole number"),
    (lambda m: m["model"].update(context_length=10**12), "model.context_length must be a whole number"),
])
def test_manifest_numbers_are_type_and_range_checked(bundle, tmp_path, edit, words):
    def change(copy):
        m = json.loads((copy / "manifest.json").read_text())
        edit(m)
        (copy / "manifest.json").write_text(json.dumps(m))

    copy = tmp_path / "c"
    shutil.copytree(bundle, copy)
    change(copy)
    _one_clear_line(run_edgekd("generate", copy, "hi", "-n", "2"), 2, words)


@pytest.mark.parametrize("edit", [
    lambda g: g["examples"][0].update(answer_ids=["a"]),
    lambda g: g["examples"][0].update(answer_ids=[10**9] * len(g["examples"][0]["answer_ids"])),
    lambda g: g["examples"][0]["topk_logprobs"][0].__setitem__(0, "x"),
])
def test_a_damaged_golden_is_one_line(bundle, tmp_path, edit):
    def change(copy):
        g = json.loads((copy / "golden.json").read_text())
        edit(g)
        (copy / "golden.json").write_text(json.dumps(g))

    if not (bundle / "golden.json").is_file():
        pytest.skip("the fp32 test bundle has no golden reference")
    r = run_edgekd("check", _resigned(bundle, tmp_path, change), "--no-speed")  # progress lines, then one error line, last
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "golden.json" in r.stderr.strip().splitlines()[-1]


# --- text is text -----------------------------------------------------------------------------------


def test_markup_and_newlines_in_user_text_print_as_they_are(tmp_path):
    weird = tmp_path / "[bold]x[/dim][red]"
    _one_clear_line(run_edgekd("export", weird, "--target", "cpu", "--out", tmp_path / "o"), 2, "[bold]x[/dim][red]")
    r = run_edgekd("export", tmp_path / "a\nb", "--target", "cpu", "--out", tmp_path / "o")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "a\\nb" in r.stderr
    r = run_edgekd("run", "--help")
    assert "[distill]" in r.stdout and "[[export]]" in r.stdout
    r = run_edgekd("export", "--bogus")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--bogus" in r.stderr


# --- a library's errors from the user's input or the machine --------------------------------------


@pytest.mark.parametrize("template", [
    "{{ 'x' * 100000000 }}",
    "{% for i in range(10**9) %}{% endfor %}",
    "{{ messages.append(1) }}",
    "{{ 2 ** 100000 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{{ '%0300000000d' % 1 }}",
    "{{ 'a'.ljust(300000000) }}",
    "{{ foo.bar.baz }}",
])
def test_a_hostile_chat_template_is_bad_input(template):
    from edgekd.device.templates import ChatTemplate

    with pytest.raises(UsageError, match="chat template"):
        ChatTemplate(template, {}).render([{"role": "user", "content": "hi"}])


def test_a_template_that_loops_for_ever_is_stopped(monkeypatch):
    import edgekd.device.templates as templates

    monkeypatch.setattr(templates, "TEMPLATE_MAX_SECONDS", 0.5)
    t0 = time.time()
    with pytest.raises(UsageError, match="ran for over"):
        templates.ChatTemplate("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", {}).render([])
    assert time.time() - t0 < 10


def test_a_full_disk_in_a_library_is_one_line():
    from edgekd.cli_base import machine_error

    assert "the disk is full" in machine_error(Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"))
    assert machine_error(ValueError("a bug")) is None


# --- signals, locks and leftovers ----------------------------------------------------------------


def _export_proc(model: Path, out: Path, tmpdir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgekd", "export", str(model), "--target", "cpu", "--out", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(tmpdir)})


def _wait_for(path_glob, folder: Path, seconds: float = 60.0) -> None:
    t0 = time.time()
    while time.time() - t0 < seconds and not list(folder.glob(path_glob)):
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_export_leaves_nothing_after_a_rerun(tiny_teacher_dir, tmp_path, sig):
    work, tmp = tmp_path / "w", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    out = work / "bundle"
    proc = _export_proc(tiny_teacher_dir, out, tmp)
    _wait_for(".bundle.partial-*", work)
    time.sleep(0.5)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read() if proc.stderr else ""
        assert sorted(p.name for p in work.iterdir()) == [] and _ours(tmp) == []  # cleaned up as Ctrl-C
    rerun = _export_proc(tiny_teacher_dir, out, tmp)
    assert rerun.wait(timeout=300) == 0
    assert sorted(p.name for p in work.iterdir()) == ["bundle"] and _ours(tmp) == []


def _ours(tmp: Path) -> list[str]:
    """edgekd's temporary folders in ``tmp`` (libraries keep files of their own there)."""
    return [p.name for p in tmp.iterdir() if p.name.startswith("edgekd-")]


def test_a_lock_whose_pid_was_reused_is_taken_over_and_a_live_one_is_named(tmp_path):
    from edgekd.device.outputs import output_lock, process_identity

    me = process_identity()
    (tmp_path / ".a.lock").write_text(json.dumps({**me, "start": (me["start"] or 0) + 12345}))  # this PID, another process
    with output_lock(tmp_path / "a"):
        pass
    (tmp_path / ".b.lock").write_text(json.dumps({**me, "boot": "another-boot"}))  # written before a restart
    with output_lock(tmp_path / "b"):
        pass
    (tmp_path / ".c.lock").write_text(str(os.getpid()))  # an earlier edgekd's lock naming this PID: not us
    with output_lock(tmp_path / "c"):
        pass
    with output_lock(tmp_path / "d"):
        with pytest.raises(UsageError, match=r"remove the lock file .*\.d\.lock"):
            with output_lock(tmp_path / "d"):
                pass


def test_sweep_removes_only_marked_folders_of_dead_processes(tmp_path):
    from edgekd.device.outputs import WORK_MARKER, make_work_dir, sweep_stale

    dead = tmp_path / ".o.partial-dead"
    dead.mkdir()
    (dead / WORK_MARKER).write_text(json.dumps({"pid": 2**22 + 7, "start": 1, "boot": None, "host": None}))
    unmarked = tmp_path / ".o.partial-users"
    unmarked.mkdir()
    (unmarked / "keep.txt").write_text("mine")
    assert sweep_stale(tmp_path, ".o.partial-") == [dead]
    live = make_work_dir(tmp_path, ".o.partial-")  # this process's: alive
    assert sweep_stale(tmp_path, ".o.partial-") == []
    assert unmarked.is_dir() and live.is_dir() and not dead.exists()


def test_check_json_into_a_folder_is_refused_before_the_check(bundle, tmp_path):
    _one_clear_line(run_edgekd("check", bundle, "--json", tmp_path, "--no-speed"), 2, "is a folder")


# --- bounded work ----------------------------------------------------------------------------------


def test_answer_tokens_are_capped_at_the_context():
    from edgekd.validate import answer_room

    assert answer_room(100000, [[1] * 10, [1] * 30], 256) == 225
    assert answer_room(5, [[1] * 10], 256) == 5
    with pytest.raises(UsageError, match="fills the bundle's 256-token context"):
        answer_room(5, [[1] * 300], 256)


@pytest.mark.parametrize("text, words", [
    ('model = "m"\n', "no [[export]]"),
    ('[distill]\nout = "x"\n[[export]]\ntarget = "cpu"\nout = "x"\n', "write the same out folder"),
    ('model = "{model}"\n[[export]]\ntarget = "cpu"\nout = "{model}/bundle"\n', "inside (or holds) the model"),
    ('model = "{model}"\n[[export]]\ntarget = "cpu"\nout = "b"\n[[export]]\ntarget = "mobile"\nout = "b/m"\n', "are nested"),
])
def test_a_pipeline_plan_is_checked_whole_before_any_work(tmp_path, text, words):
    model = tmp_path / "m"
    model.mkdir()
    (tmp_path / "p.toml").write_text(text.format(model=model.as_posix()))
    r = run_edgekd("run", "p.toml", cwd=tmp_path, timeout=120)
    _one_clear_line(r, 2, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "p.toml"]


# --- a fuzz test over the CLI ---------------------------------------------------------------------

_odd_number = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e308", "99999999999999999999", "", "1.5", "x", "[red]", "2\n3"])
_odd_text = st.sampled_from(["", " ", "\u2028", "[bold]x[/bold]", "[/]", "a\nb", "\x00", "é" * 50, "-", "--"])


def _cli(args: list[str], capsys) -> tuple[int, str]:
    """``edgekd ARGS`` in this process, as the console script runs it: (exit code, stderr)."""
    from edgekd.cli import main

    old = sys.argv
    sys.argv = ["edgekd", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["--lr", "--temperature", "--alpha", "--beta", "--skew", "--label-loss", "--hidden-loss", "--on-policy",
                             "--epochs", "--max-steps", "--batch-size", "--top-k", "--chunk-size", "--qat-bits", "--seed",
                             "--max-new-tokens", "--gen-temperature", "--max-length", "--student", "--loss", "--task"]),
       value=_odd_number | _odd_text)
def test_fuzz_distill_flags(tmp_path_factory, capsys, flag, value):
    root = tmp_path_factory.mktemp("fuzz")
    code, err = _cli(["distill", "--out", str(root / "o"), "--teacher", str(root / "no-teacher"), flag, value], capsys)
    assert code in (1, 2) and "Traceback" not in err and "internal error" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in root.iterdir()) == []  # nothing written, the --out included


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["-n", "--temperature", "--top-k", "--top-p", "--seed", "--threads"]),
       value=_odd_number | _odd_text, prompt=_odd_text)
def test_fuzz_generate_flags(bundle, capsys, flag, value, prompt):
    before = _tree(bundle)
    code, err = _cli(["generate", str(bundle), prompt or "hi", flag, value, *([] if flag == "-n" else ["-n", "3"])], capsys)
    assert code in (0, 2) and "Traceback" not in err and "internal error" not in err, err
    if code:
        assert len(err.strip().splitlines()) == 1, err
    assert _tree(bundle) == before


def test_an_output_left_aside_by_a_killed_swap_is_put_back(tmp_path):
    from edgekd.device.outputs import WORK_MARKER, check_output_dir

    old = tmp_path / ".bundle.old-x"
    (old / "bundle").mkdir(parents=True)
    (old / "bundle" / "manifest.json").write_text('{"format": "edgekd-bundle"}')
    (old / WORK_MARKER).write_text(json.dumps({"pid": 2**22 + 9, "start": 1}))  # its process is gone
    with pytest.raises(UsageError, match="exists and is not empty"):  # the bundle is back, and not overwritten
        check_output_dir(tmp_path / "bundle", overwrite=False)
    assert (tmp_path / "bundle" / "manifest.json").is_file() and not old.exists()


def test_a_report_of_an_earlier_edgekd_is_still_ours_and_odd_files_are_not_read(tmp_path):
    from edgekd.device.io import read_json
    from edgekd.device.outputs import edgekd_output

    old = tmp_path / "old-report"
    old.mkdir()
    (old / "report.json").write_text('{"passed": true, "command": null, "bundles": []}')
    (old / "report.md").write_text("# edgekd validate report")
    assert edgekd_output(old) == "a validate report"
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "manifest.json")
    assert edgekd_output(fifo) is None  # never opened: it would block
    with pytest.raises(UsageError, match="not a regular file"):
        read_json(fifo / "manifest.json")


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path):
    from edgekd.distill.loop import logged_eval, trim_metrics

    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 0, "eval": {"kl": 1.0}}\n{"step": 1, "loss": 2}\n{"step": 2, "lo')
    trim_metrics(m, 1)
    assert m.read_text().splitlines() == ['{"step": 0, "eval": {"kl": 1.0}}', '{"step": 1, "loss": 2}']
    assert logged_eval(m, 0) == {"kl": 1.0}


def test_a_bracketed_bundle_path_in_progress_lines_is_text(bundle, tmp_path):
    weird = tmp_path / "b[/x][bold]"
    shutil.copytree(bundle, weird)
    r = run_edgekd("check", weird, "--no-speed", "--num-prompts", "1")
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
