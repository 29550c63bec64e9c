"""`edgekd distill` end to end on tiny models: the real CLI, the files it writes, the cache,
resume after a real SIGKILL, and the errors a user can hit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from edgekd.cli import app
from edgekd.device.config import read_toml
from edgekd.device.paths import resource
from edgekd.distill import checkpoint as ckpt
from edgekd.distill.config import DistillConfig
from edgekd.distill.config_io import resolve
from edgekd.distill.importance import keep_most_influential
from edgekd.models import load_model

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_FILES = {
    "distill.json", "distill.toml", "metrics.jsonl", "config.json", "generation_config.json", "model.safetensors",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "data", "cache",
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Prompts for the teacher, prompt/response records, and held-out prompts."""
    d = tmp_path_factory.mktemp("data")
    words = ["sea", "stars", "wind", "Paris", "Rome", "poem", "capital", "blue", "sky", "numbers"]
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Write about the {w} and the {words[(i * 3) % 10]}"}) + "\n" for i, w in enumerate(words * 2)))
    (d / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": f"Explain the {w}", "response": f"The {w} is blue and the {words[(i + 1) % 10]} is near. " * (1 + i % 3)}) + "\n"
        for i, w in enumerate(words * 2)))
    (d / "heldout.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me about the {w}"}) + "\n" for w in words[:4]))
    (d / "heldout_pairs.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me about the {w}", "response": f"The {w} is blue."}) + "\n" for w in words[:4]))
    return d


def run_cli(*args: str) -> CliRunner.Result:
    return CliRunner().invoke(app, ["distill", *args])


def tiny_args(teacher: Path, out: Path, data: Path, *extra: str) -> list[str]:
    """Flags for a tiny run; with --data the held-out set has its responses (no generation)."""
    held = "heldout_pairs.jsonl" if "--data" in extra else "heldout.jsonl"
    return ["--teacher", str(teacher), "--student", "layers:2", "--out", str(out), "--heldout", str(data / held),
            "--max-new-tokens", "12", "--batch-size", "4", "--lr", "3e-3", *extra]


def test_cli_end_to_end_writes_a_loadable_student_and_distill_json(tiny_teacher_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*tiny_args(tiny_teacher_dir, out, tiny_data, "--prompts", str(tiny_data / "prompts.jsonl"), "--epochs", "3", "--eval-every", "4"))
    assert r.exit_code == 0, r.output
    # checkpoints are gone once the run is complete; the teacher's top-k was kept as it wrote the
    # answers (data/topk), so no cache/ pass was needed
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES - {"cache"} and (out / "data" / "topk").is_dir()
    info = json.loads((out / "distill.json").read_text())
    assert info["teacher"] == str(tiny_teacher_dir) and info["heldout"] == "data/heldout.jsonl"
    scan = info["student"]["scan"]  # layers:2 keeps the 2 layers of highest measured block influence
    assert len(scan["block_influence"]) == 4 and scan["method"].startswith("block influence")
    assert len(info["teacher_fingerprint"]) == 64 and info["student"]["layers"] == keep_most_influential(scan["block_influence"], 2)
    held = [json.loads(line) for line in (out / info["heldout"]).read_text().splitlines()]
    assert len(held) == 4 and all({"prompt", "response"} <= set(h) for h in held)
    before, after = info["metrics"]["before"], info["metrics"]["after"]
    assert after["kl"] < before["kl"] and after["top1_agreement"] >= before["top1_agreement"]
    assert info["data"]["train"]["examples"] == 20 and info["data"]["padding_waste"] < 0.5
    cfg = read_toml(out / "distill.toml")
    assert cfg["teacher"] == str(tiny_teacher_dir) and cfg["epochs"] == 3  # the resolved config, rerunnable
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, info["steps"] + 1)) and len([m for m in lines if "eval" in m]) >= 3
    model, tok = load_model(str(out))
    assert model.config.num_hidden_layers == 2 and tok.chat_template and tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id


@pytest.mark.filterwarnings("ignore:the student")
def test_default_config_and_shipped_examples_parse(tiny_teacher_dir):
    from edgekd.distill.students import build_student

    cfg = DistillConfig()
    assert cfg.teacher == "smollm2-135m-instruct" and cfg.student == "layers:21" and cfg.loss == "fkl"
    tomls = sorted((ROOT / "examples").glob("distill-*.toml"))
    assert len(tomls) >= 3
    for toml in tomls:
        if toml.name == "distill-student-arch.toml":  # an architecture for --student, not a run config
            teacher, tok = load_model(str(tiny_teacher_dir))
            assert build_student(str(toml), teacher, tok).model.config.num_hidden_layers == 4
        else:
            assert resolve(toml, {}).teacher == "smollm2-135m-instruct"
    assert resource("examples/prompts/train.jsonl").is_file()


def test_flags_override_the_config_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.01\nloss = "rkl"\nepochs = 2\n')
    cfg = resolve(f, {"lr": 0.002, "epochs": None})
    assert cfg.lr == 0.002 and cfg.loss == "rkl" and cfg.epochs == 2


@pytest.mark.parametrize("content, message", [
    ("lr = -1\n", "lr = -1"), ("temperature = 0\n", "temperature = 0"), ("loss = 'kld'\n", "loss = 'kld' is not one of"),
    ("epochs = 'two'\n", "epochs must be an integer"), ("lerning_rate = 1\n", "unknown key 'lerning_rate'"),
    ("alpha = 2\n", "alpha = 2"), ("lr = [\n", "not valid TOML"),
])
def test_bad_config_values_are_one_line_usage_errors(tmp_path, content, message):
    f = tmp_path / "c.toml"
    f.write_text(content)
    r = CliRunner().invoke(app, ["distill", "--config", str(f), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_non_empty_out_is_refused_and_foreign_folders_never_overwritten(tiny_teacher_dir, tiny_data, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    args = tiny_args(tiny_teacher_dir, foreign, tiny_data, "--data", str(tiny_data / "pairs.jsonl"), "--max-steps", "1")
    r = run_cli(*args)
    assert r.exit_code == 2 and "exists and is not empty" in r.output
    r = run_cli(*args, "--overwrite")
    assert r.exit_code == 2 and "not an edgekd distill folder" in r.output
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1


def test_overwrite_reuses_teacher_answers_and_cache(tiny_teacher_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_teacher_dir, out, tiny_data, "--prompts", str(tiny_data / "prompts.jsonl"), "--max-steps", "2")
    assert run_cli(*args).exit_code == 0
    # the cache is the top-k kept while the teacher wrote the answers (data/topk/)
    stamp = {p.name: p.stat().st_mtime_ns for p in [out / "data" / "train.jsonl", *(out / "data" / "topk").iterdir()]}
    r = run_cli(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert "reusing the teacher's training answers" in r.output and "the top-k kept while the teacher wrote" in r.output
    assert stamp == {p.name: p.stat().st_mtime_ns for p in [out / "data" / "train.jsonl", *(out / "data" / "topk").iterdir()]}


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_cache_with_full_vocabulary_matches_no_cache(tiny_teacher_dir, tiny_data, tmp_path):
    """Caching changes nothing beyond top-k truncation: with k = vocabulary the runs agree."""
    common = ("--data", str(tiny_data / "pairs.jsonl"), "--max-steps", "4")
    assert run_cli(*tiny_args(tiny_teacher_dir, tmp_path / "a", tiny_data, *common, "--no-cache-teacher")).exit_code == 0
    assert run_cli(*tiny_args(tiny_teacher_dir, tmp_path / "b", tiny_data, *common, "--top-k", "384")).exit_code == 0
    assert not (tmp_path / "a" / "cache").exists() and list((tmp_path / "b" / "cache").glob("topk-*.safetensors"))
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert la == pytest.approx(lb, abs=1e-4)


def test_small_top_k_cache_still_trains(tiny_teacher_dir, tiny_data, tmp_path):
    out = tmp_path / "k4"
    assert run_cli(*tiny_args(tiny_teacher_dir, out, tiny_data, "--data", str(tiny_data / "pairs.jsonl"), "--top-k", "4", "--max-steps", "6")).exit_code == 0
    m = json.loads((out / "distill.json").read_text())["metrics"]
    assert m["after"]["kl"] < m["before"]["kl"]


def test_nan_loss_stops_with_a_clear_message(tiny_teacher_dir, tiny_data, tmp_path):
    r = run_cli(*tiny_args(tiny_teacher_dir, tmp_path / "nan", tiny_data, "--data", str(tiny_data / "pairs.jsonl"),
                           "--max-steps", "6", "--lr", "1e30", "--alpha", "0.5"), "--config", str(_no_clip(tmp_path)))
    assert r.exit_code == 1 and "the loss became nan" in r.output.lower() and "lower --lr" in r.output
    assert not (tmp_path / "nan" / "distill.json").exists()


def _no_clip(tmp_path: Path) -> Path:
    f = tmp_path / "noclip.toml"
    f.write_text("max_grad_norm = 0.0\nwarmup = 0.0\n")
    return f


def test_torn_checkpoints_are_never_picked_up(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    folder = tmp_path / "checkpoints"
    ckpt.save(folder, 2, model, opt)
    (folder / ".step-0000004.tmp-99").mkdir()  # a write killed before its rename
    (folder / ".step-0000004.tmp-99" / "model.safetensors").write_bytes(b"torn")
    (folder / "step-0000006").mkdir()  # a folder missing its files
    assert ckpt.latest(folder).name == "step-0000002"
    ckpt.save(folder, 3, model, opt, keep=2)
    assert not list(folder.glob(".step-*")) and ckpt.latest(folder).name == "step-0000003"


def test_resume_requires_a_distill_folder(tmp_path):
    r = run_cli("--out", str(tmp_path), "--resume")
    assert r.exit_code == 2 and "holds no distill run" in r.output


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_weights(tiny_teacher_dir, tiny_data, tmp_path):
    """A real subprocess killed with SIGKILL at a random moment (during or between checkpoint
    writes), resumed with --resume, ends with exactly the weights of an uninterrupted run."""
    args = tiny_args(tiny_teacher_dir, tmp_path / "x", tiny_data, "--data", str(tiny_data / "pairs.jsonl"), "--epochs", "8",
                     "--checkpoint-every", "1", "--batch-size", "2")
    full = tmp_path / "full"
    assert run_cli(*[str(full) if a == str(tmp_path / "x") else a for a in args]).exit_code == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "edgekd", "distill", *[str(killed) if a == str(tmp_path / "x") else a for a in args]]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(ckpt.complete(killed / "checkpoints")) < 1 and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(random.Random(0).uniform(0.0, 0.5))  # seeded: a failure reruns at the same point
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "distill.json").exists(), "the run finished before the kill"
    step = json.loads((ckpt.latest(killed / "checkpoints") / "state.json").read_text())["step"]

    r = run_cli(*[str(killed) if a == str(tmp_path / "x") else a for a in args], "--resume")
    assert r.exit_code == 0, r.output
    assert f"resuming from step-{step:07d}" in r.output or f"step {step}" in r.output
    a, b = _final_weights(full), _final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == sorted(set(steps)) and len(steps) == json.loads((full / "distill.json").read_text())["steps"]
    info = json.loads((killed / "distill.json").read_text())
    assert info["metrics"]["before"] == json.loads((full / "distill.json").read_text())["metrics"]["before"]


def test_a_run_that_cannot_fit_is_refused_early(tiny_teacher_dir, tiny_data, tmp_path):
    args = tiny_args(tiny_teacher_dir, tmp_path / "o", tiny_data, "--data", str(tiny_data / "pairs.jsonl"))
    r = run_cli(*args, "--batch-size", "100000000000")
    assert r.exit_code == 2 and "lower --batch-size or --max-length" in r.output


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_topk_kept_during_generation_equals_a_teacher_forced_pass(tiny_teacher_dir, temperature):
    """The cache read off generate()'s logits is the one a second, teacher-forced pass computes."""
    from edgekd.distill import cache as tcache
    from edgekd.distill.answers import _captured_part
    from edgekd.distill.data import encode_records
    from edgekd.distill.generate import generate_answers

    teacher, tok = load_model(str(tiny_teacher_dir))
    prompts = ["Tell me about the sea", "Paris is", "Write a poem about the wind and the stars", "Numbers: 1 2 3"]
    answers, _ = generate_answers(teacher, tok, prompts, max_new_tokens=10, temperature=temperature, top_p=0.9,
                                  batch_size=3, seed=0, max_prompt_tokens=200, keep_topk=16, kd_temperature=2.0, vocab=384)
    from edgekd.distill.data import common_prefix, prompt_text

    assert common_prefix([tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]) >= 8  # prefilled once
    captured = _captured_part(answers, list(range(len(prompts))))
    examples, _ = encode_records(tok, answers, 512, False)
    assert [e.n_targets for e in examples] == [len(a["answer_ids"]) for a in answers]
    forced = tcache.teacher_topk(teacher, examples, list(range(len(examples))), k=16, temperature=2.0, vocab=384,
                                 batch_size=2, chunk_size=64, device=torch.device("cpu"))
    order = {e: (s, c) for e, s, c in zip(forced["example"].tolist(), forced["start"].tolist(), forced["count"].tolist())}
    for i in range(len(prompts)):
        s, c = order[i]
        cs, cc = captured["start"][i].item(), captured["count"][i].item()
        assert cc == c
        assert torch.allclose(captured["logp"][cs : cs + cc], forced["logp"][s : s + c], atol=1e-4)
        assert torch.equal(captured["idx"][cs : cs + cc, :4], forced["idx"][s : s + c, :4])


def test_shared_prefix_gives_the_same_loss_and_gradients(tiny_teacher_dir):
    """Running the common prompt prefix once and sharing its KV cache is exact."""
    from edgekd.distill.data import collate, encode_chat
    from edgekd.distill.loop import StudentLoss, shared_prefix_len
    from edgekd.distill.losses import LossSpec, TeacherTargets

    teacher, tok = load_model(str(tiny_teacher_dir))
    student, _ = load_model(str(tiny_teacher_dir))
    torch.manual_seed(0)
    with torch.no_grad():  # a student that is not the teacher: a loss and gradients far from zero to compare
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = [encode_chat(tok, [{"role": "user", "content": f"Classify this: {t}"}, {"role": "assistant", "content": a}])
            for t, a in [("the sea is blue", "positive"), ("rude staff", "negative here"), ("ok", "fine")]]
    P = shared_prefix_len(rows)
    assert P >= 8 and all(r.ids[:P] == rows[0].ids[:P] for r in rows)
    b = collate(rows, 0)
    th = teacher.get_decoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    head = teacher.get_output_embeddings()
    results = []
    for prefix in (0, P):
        student.zero_grad()
        tt = TeacherTargets(hidden=th[b["loss_mask"]].detach(), weight=head.weight.detach(), bias=None)
        loss, agree = StudentLoss(student, LossSpec("fkl", vocab=384), 64, prefix)(b["input_ids"], b["attention_mask"], b["loss_mask"], b["labels"], tt)
        loss.backward()
        results.append((loss.item(), agree.item(), [p.grad.clone() for p in student.parameters()]))
    (l0, a0, g0), (l1, a1, g1) = results
    assert l0 > 0.01 and max(x.abs().max().item() for x in g0) > 1e-3  # something to compare
    assert l0 == pytest.approx(l1, rel=1e-5) and a0 == a1
    for x, y in zip(g0, g1):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4)


def test_intermediate_state_loss_is_exact_with_the_shared_prefix_and_adds_its_term(tiny_teacher_dir):
    """The teacher's stream at the matched depths, and the student's, come out the same with the
    prompt prefix run once; the hidden term adds exactly weight x its hand-computed sum."""
    from edgekd.distill.data import collate, encode_chat
    from edgekd.distill.loop import StudentLoss, decoder_forward, matched_layers, shared_prefix_len
    from edgekd.distill.losses import LossSpec, TeacherTargets, hidden_state_loss
    from edgekd.distill.students import depth_pruned

    teacher, tok = load_model(str(tiny_teacher_dir))
    student = depth_pruned(teacher, [0, 2, 3])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = [encode_chat(tok, [{"role": "user", "content": f"Classify this: {t}"}, {"role": "assistant", "content": a}])
            for t, a in [("the sea is blue", "positive"), ("rude staff", "negative here")]]
    P = shared_prefix_len(rows)
    b = collate(rows, 0)
    s_idx, t_idx = matched_layers([0, 2, 3])
    assert (s_idx, t_idx) == ((1, 2), (2, 3))
    results = []
    for prefix, weight in ((0, 0.0), (0, 0.7), (P, 0.7)):
        with torch.no_grad():
            out = decoder_forward(teacher.get_decoder(), b["input_ids"], b["attention_mask"], prefix, True)
        mask = b["loss_mask"][:, prefix:]
        states = torch.stack([out.hidden_states[t][mask] for t in t_idx])
        tt = TeacherTargets(hidden=out.last_hidden_state[mask], weight=teacher.get_output_embeddings().weight, states=states)
        student.zero_grad()
        loss, _ = StudentLoss(student, LossSpec("fkl", vocab=384, hidden_weight=weight), 64, prefix, s_idx)(
            b["input_ids"], b["attention_mask"], b["loss_mask"], b["labels"], tt)
        loss.backward()
        results.append((loss.item(), states, student.model.layers[0].mlp.up_proj.weight.grad.clone()))
    (kd, _, g_kd), (both, st0, g0), (both_p, st1, g1) = results
    with torch.no_grad():
        mine = decoder_forward(student.get_decoder(), b["input_ids"], b["attention_mask"], 0, True)
        term = hidden_state_loss(torch.stack([mine.hidden_states[i][b["loss_mask"]] for i in s_idx]), st0).sum().item()
    assert term > 0.01 and both == pytest.approx(kd + 0.7 * term, rel=1e-5)
    assert not torch.allclose(g_kd, g0)  # the term reaches the first layer
    assert torch.allclose(st0, st1, atol=1e-5) and both == pytest.approx(both_p, rel=1e-5)
    assert torch.allclose(g0, g1, atol=1e-5, rtol=1e-4)


def test_hidden_loss_trains_a_pruned_student_and_refuses_one_that_is_not(tiny_teacher_dir, tiny_data, tmp_path, tiny_student_dir):
    r = run_cli(*tiny_args(tiny_teacher_dir, tmp_path / "hs", tiny_data, "--data", str(tiny_data / "pairs.jsonl"),
                           "--student", "layers:0,3", "--hidden-loss", "0.5", "--epochs", "1"))
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "hs" / "distill.json").read_text())
    assert result["config"]["hidden_loss"] == 0.5 and result["timing"].get("teacher_cache_s") is None
    assert not list((tmp_path / "hs").glob("cache/topk-*"))  # the teacher ran in the loop
    r = run_cli(*tiny_args(tiny_teacher_dir, tmp_path / "bad", tiny_data, "--data", str(tiny_data / "pairs.jsonl"),
                           "--student", str(tiny_student_dir), "--hidden-loss", "0.5"))
    assert r.exit_code != 0 and "--hidden-loss needs a student pruned from the teacher" in r.output
    assert not (tmp_path / "bad").exists()


def test_on_policy_steps_train_on_the_students_own_answers_in_the_second_half(tiny_teacher_dir, tiny_data, tmp_path):
    r = run_cli(*tiny_args(tiny_teacher_dir, tmp_path / "op", tiny_data, "--prompts", str(tiny_data / "prompts.jsonl"),
                           "--on-policy", "1.0", "--epochs", "2"))
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "op" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    half = len(steps) // 2
    assert [row["on_policy"] for row in steps] == [False] * half + [True] * (len(steps) - half)
    assert all(row["loss"] >= 0 and row["tokens"] > 0 for row in steps)
    r = run_cli(*tiny_args(tiny_teacher_dir, tmp_path / "text", tiny_data, "--data", str(tiny_data / "pairs.jsonl"),
                           "--on-policy", "0.5"))
    assert r.exit_code == 0, r.output  # prompt/response records: the student can answer their prompts
    text = tmp_path / "plain.txt"
    text.write_text("The sea is blue and the sky is near. " * 20)
    r = run_cli(*tiny_args(tiny_teacher_dir, tmp_path / "bad", tiny_data, "--data", str(text), "--on-policy", "0.5"))
    assert r.exit_code != 0 and "--on-policy needs prompt records" in " ".join(r.output.split())


def test_prompt_loss_leaves_out_what_every_prompt_shares(tiny_teacher_dir):
    """train_on_prompt puts loss on the prompts' own text, not on the template and instruction
    every prompt starts with, so the shared prefix still runs once per batch."""
    from edgekd.distill.data import encode_records, untarget_common_prefix
    from edgekd.distill.loop import shared_prefix_len

    _, tok = load_model(str(tiny_teacher_dir))
    records = [{"prompt": f"Classify this: {t}", "response": a} for t, a in [("the sea is blue", "positive"), ("rude staff", "negative")]]
    rows, _ = encode_records(tok, records, 512, True)
    assert shared_prefix_len(rows) == 0  # the system prompt carries loss: nothing can be shared
    n = untarget_common_prefix(rows)
    assert n >= 8 and all(r.ids[:n] == rows[0].ids[:n] and not any(r.target[:n]) for r in rows)
    assert all(any(r.target[n:]) for r in rows) and shared_prefix_len(rows) == n - 1
    answers_only, _ = encode_records(tok, records, 512, False)
    assert all(r.n_targets > a.n_targets for r, a in zip(rows, answers_only))  # the review's own tokens count
    assert untarget_common_prefix(rows[:1]) == 0  # one example shares nothing with another
