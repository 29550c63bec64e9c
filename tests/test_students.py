"""Students: depth-pruned copies, existing folders sharing the tokenizer, random init from a TOML."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, save_model, tiny_llama_config

from edgekd.device.errors import UsageError
from edgekd.distill.students import build_student, evenly_spaced, parse_layers
from edgekd.models import load_model


def test_evenly_spaced_keeps_first_and_last():
    assert evenly_spaced(30, 6) == [0, 6, 12, 18, 24, 29]  # the even student of benchmarks/RESULTS-distill.md
    assert evenly_spaced(4, 2) == [0, 3]
    assert evenly_spaced(5, 5) == [0, 1, 2, 3, 4]
    assert evenly_spaced(7, 1) == [0]
    for n in range(2, 31):
        picked = evenly_spaced(30, n)
        assert len(set(picked)) == n and picked[0] == 0 and picked[-1] == 29 and picked == sorted(picked)


@pytest.mark.parametrize("spec, message", [
    ("even:9", "between 1 and the teacher's 4"),
    ("layers:0,7", "layer 7 does not exist"),
    ("layers:1,1", "listed twice"),
    ("layers:a", "integers"),
    ("layers:", "no layers"),
])
def test_bad_layer_specs(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_layers(spec, 4)


def test_pruned_student_copies_the_chosen_layers(tiny_teacher_dir):
    teacher, tok = load_model(str(tiny_teacher_dir))
    student = build_student("layers:0,3", teacher, tok)
    assert student.describe["layers"] == [0, 3] and student.model.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.model.state_dict()
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])
    assert student.model.lm_head.weight is student.model.model.embed_tokens.weight  # still tied
    # a copy, not a view: training the student leaves the teacher alone
    assert student.model.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()


@pytest.mark.filterwarnings("ignore:the student")
def test_keeping_every_layer_reproduces_the_teacher(tiny_teacher_dir):
    teacher, tok = load_model(str(tiny_teacher_dir))
    student = build_student("even:4", teacher, tok).model.eval()
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    assert torch.allclose(student(ids).logits, teacher(ids).logits, atol=1e-5)


def test_folder_student_with_the_same_tokenizer(tiny_teacher_dir, tiny_student_dir):
    teacher, tok = load_model(str(tiny_teacher_dir))
    student = build_student(str(tiny_student_dir), teacher, tok)
    assert student.kind == "folder" and student.vocab == 384


def test_padded_vocab_is_sliced_to_the_common_size(tiny_teacher_dir, tokenizer, tmp_path):
    padded = save_model(build_model(tiny_llama_config(layers=2, vocab=400)), tokenizer, tmp_path / "padded")
    teacher, tok = load_model(str(tiny_teacher_dir))
    assert build_student(str(padded), teacher, tok).vocab == 384


def test_tokenizer_mismatch_is_refused(tiny_teacher_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["completely different words here"] * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>"], show_progress=False))
    other = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>")
    folder = save_model(build_model(tiny_llama_config(layers=2, vocab=384)), other, tmp_path / "other")
    teacher, tok = load_model(str(tiny_teacher_dir))
    with pytest.raises(UsageError, match="does not share the teacher's tokenizer"):
        build_student(str(folder), teacher, tok)


def test_random_student_from_toml(tiny_teacher_dir, tmp_path):
    teacher, tok = load_model(str(tiny_teacher_dir))
    arch = tmp_path / "arch.toml"
    arch.write_text("num_hidden_layers = 1\nhidden_size = 32\nintermediate_size = 48\n")
    student = build_student(str(arch), teacher, tok, seed=3)
    assert student.kind == "random" and student.model.config.hidden_size == 32
    assert student.model.config.vocab_size == teacher.config.vocab_size
    arch.write_text("num_layers = 1\n")
    with pytest.raises(UsageError, match="unknown architecture field 'num_layers'"):
        build_student(str(arch), teacher, tok)


def test_bigger_student_warns(tiny_teacher_dir, tmp_path):
    teacher, tok = load_model(str(tiny_teacher_dir))
    arch = tmp_path / "big.toml"
    arch.write_text("num_hidden_layers = 8\n")
    with pytest.warns(UserWarning, match="not smaller than the teacher"):
        build_student(str(arch), teacher, tok)


# --- students built by measured importance (edgekd.distill.importance) -------------------------


def _calibration(tok, n: int = 4):
    from edgekd.distill.data import collate, encode_chat

    texts = ["Explain why the sky is blue.", "The capital of France is Paris.", "Write a poem about the sea.", "def add(a, b)"]
    rows = [encode_chat(tok, [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}]) for t in texts[:n]]
    return [collate(rows[:2], 0), collate(rows[2:], 0)]


def _make_identity(model, i: int) -> None:
    """Decoder layer i adds nothing to the residual stream: it is an identity."""
    layer = model.model.layers[i]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_block_influence_ranks_an_identity_layer_least_important(tiny_teacher_dir):
    from edgekd.distill.importance import block_influence

    teacher, tok = load_model(str(tiny_teacher_dir))
    _make_identity(teacher, 2)
    scores = block_influence(teacher, _calibration(tok))
    assert len(scores) == 4 and scores[2] == pytest.approx(0.0, abs=1e-6)
    assert min(range(4), key=lambda i: scores[i]) == 2 and all(s > 1e-4 for i, s in enumerate(scores) if i != 2)
    student = build_student("layers:3", teacher, tok, calibration=_calibration(tok))
    assert student.describe["layers"] == [0, 1, 3]
    assert student.describe["scan"]["method"].startswith("block influence")
    assert student.describe["scan"]["block_influence"][2] == pytest.approx(0.0, abs=1e-4)


def test_iterative_kl_removes_the_identity_layer_first(tiny_teacher_dir):
    teacher, tok = load_model(str(tiny_teacher_dir))
    _make_identity(teacher, 1)
    before = teacher.state_dict()["model.layers.3.mlp.up_proj.weight"].clone()
    student = build_student("layers-kl:2", teacher, tok, calibration=_calibration(tok))
    removals = student.describe["scan"]["removals"]
    assert removals[0]["removed"] == 1 and removals[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert len(removals) == 2 and student.model.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 4 and len(teacher.model.layers) == 4  # the teacher is restored
    assert torch.equal(teacher.state_dict()["model.layers.3.mlp.up_proj.weight"], before)


def test_width_pruning_keeps_the_most_active_channels(tiny_teacher_dir):
    teacher, tok = load_model(str(tiny_teacher_dir))
    full = build_student("even:4", teacher, tok).model.eval()
    half = build_student("even:4+mlp:0.5", teacher, tok, calibration=_calibration(tok))
    assert half.model.config.intermediate_size == 64 and half.describe["width"]["mlp_share"] == 0.5
    assert half.model.model.layers[0].mlp.down_proj.weight.shape == (64, 64)
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    out = half.model.eval()(ids).logits
    assert out.shape == full(ids).logits.shape and torch.isfinite(out).all()
    # the kept channels are the most active ones: pruning by importance beats pruning at random
    from edgekd.distill.importance import answer_kl, teacher_answer_logp

    cal = _calibration(tok)
    t = teacher_answer_logp(teacher, cal, 384)
    rand = build_student("even:4", teacher, tok).model
    g = torch.Generator().manual_seed(0)
    for layer in rand.model.layers:
        idx = torch.sort(torch.randperm(128, generator=g)[:64]).values
        for name in ("gate_proj", "up_proj"):
            lin = getattr(layer.mlp, name)
            new = torch.nn.Linear(64, 64, bias=False)
            new.weight.data = lin.weight.data[idx].clone()
            setattr(layer.mlp, name, new)
        new = torch.nn.Linear(64, 64, bias=False)
        new.weight.data = layer.mlp.down_proj.weight.data[:, idx].clone()
        layer.mlp.down_proj = new
    rand.config.intermediate_size = 64
    assert answer_kl(half.model, cal, t, 384) < answer_kl(rand, cal, t, 384)


def _with_heads_silenced(model, kept_heads: list[list[int]], heads: int = 4, head_dim: int = 16):
    """``model`` with every head not in ``kept_heads[layer]`` zeroed in o_proj's input: what
    dropping those heads must equal, exactly."""
    for layer, kept in zip(model.model.layers, kept_heads):
        for h in set(range(heads)) - set(kept):
            layer.self_attn.o_proj.weight.data[:, h * head_dim:(h + 1) * head_dim] = 0
    return model.eval()


@pytest.mark.filterwarnings("ignore:the student")
def test_head_pruning_keeps_the_loudest_heads_of_each_group_and_equals_zeroing_the_others(tiny_teacher_dir, tmp_path):
    from edgekd.distill.importance import attention_head_importance

    teacher, tok = load_model(str(tiny_teacher_dir))  # 4 query heads of 16 channels, 2 key/value heads
    cal = _calibration(tok)
    scores = attention_head_importance(teacher, cal)
    student = build_student("even:4+heads:0.5", teacher, tok, calibration=cal)
    expected = [[g * 2 + int(torch.argmax(s[g * 2:g * 2 + 2])) for g in range(2)] for s in scores]
    info = student.describe["heads"]
    assert info["kept_heads"] == expected and info["attention_heads"] == 2 and info["heads_share"] == 0.5
    from edgekd.distill.loop import describe_student

    assert "2 query heads (50%)" in describe_student(student.describe)  # the line distill prints
    cfg = student.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 2, 16)
    assert student.model.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    assert student.model.model.layers[0].self_attn.o_proj.weight.shape == (64, 32)
    ref = _with_heads_silenced(build_student("even:4", teacher, tok).model, expected)
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41]])
    assert torch.allclose(student.model.eval()(ids).logits, ref(ids).logits, atol=1e-5)
    # a Hugging Face folder that loads back (head_dim is no longer hidden_size / heads)
    again, _ = load_model(str(save_model(student.model, tok, tmp_path / "s")))
    assert torch.allclose(again.eval()(ids).logits, ref(ids).logits, atol=1e-5)


@pytest.mark.filterwarnings("ignore:the student")
def test_head_pruning_of_multi_head_attention_takes_whole_heads_with_their_keys_and_values(tokenizer):
    from edgekd.distill.importance import attention_head_importance

    teacher = build_model(tiny_llama_config(num_key_value_heads=4))  # one query head per key/value head
    cal = _calibration(tokenizer)
    expected = [sorted(torch.topk(s, 2).indices.tolist()) for s in attention_head_importance(teacher, cal)]
    student = build_student("even:4+heads:0.5", teacher, tokenizer, calibration=cal)
    info = student.describe["heads"]
    assert info["kept_heads"] == expected and (info["attention_heads"], info["key_value_heads"]) == (2, 2)
    attn = student.model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == attn.k_proj.weight.shape == attn.v_proj.weight.shape == (32, 64)
    ref = _with_heads_silenced(build_student("even:4", teacher, tokenizer).model, expected)
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41]])
    assert torch.allclose(student.model.eval()(ids).logits, ref(ids).logits, atol=1e-5)
    budget = build_student("budget:0.8", teacher, tokenizer, calibration=cal).describe
    assert any("+heads:" in c["spec"] for c in budget["scan"]["budget"]["candidates"])
    assert all(c["parameters"] <= 0.8 * budget["teacher_parameters"] for c in budget["scan"]["budget"]["candidates"])


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_a_head_pruned_student_exports_with_fused_attention(tiny_teacher_dir, tmp_path, kv_heads):
    """Fewer query heads (head_dim no longer hidden_size / heads; with multi-head attention, fewer
    key/value heads too) through the whole export: optimum's graph checked against PyTorch, the
    GroupQueryAttention fusion, the bundle's description."""
    import json

    from edgekd.device.runtime import Runtime
    from edgekd.export import export_bundle

    teacher, tok = load_model(str(tiny_teacher_dir))
    if kv_heads == 4:
        teacher = build_model(tiny_llama_config(num_key_value_heads=4))
    student = build_student("layers:3+heads:0.5", teacher, tok, calibration=_calibration(tok))
    manifest = export_bundle(str(save_model(student.model, tok, tmp_path / "s")), "cpu", tmp_path / "b", golden_prompts=0)
    fused = next(r for r in manifest["recipe"] if r["step"] == "fuse_attention")
    assert fused["fused_layers"] == 3
    genai = json.loads((tmp_path / "b" / "genai_config.json").read_text())["model"]["decoder"]
    assert (genai["num_attention_heads"], genai["num_key_value_heads"], genai["head_size"]) == (2, 2, 16)
    assert len(list(Runtime(tmp_path / "b").generate_ids([5, 9, 17], 4, stop_at_eos=False))) == 4


def test_budget_picks_a_candidate_that_fits(tiny_teacher_dir):
    teacher, tok = load_model(str(tiny_teacher_dir))
    student = build_student("budget:0.8", teacher, tok, calibration=_calibration(tok))
    budget = student.describe["scan"]["budget"]
    assert budget["chosen"] in [c["spec"] for c in budget["candidates"]] and len(budget["candidates"]) >= 2
    assert student.describe["parameters"] <= 0.8 * student.describe["teacher_parameters"]
    chosen = [c for c in budget["candidates"] if c["spec"] == budget["chosen"]][0]
    assert chosen["kl"] == min(c["kl"] for c in budget["candidates"])
    assert any("+heads:" in c["spec"] for c in budget["candidates"])  # fewer query heads are candidates too
    assert all(c["parameters"] <= 0.8 * student.describe["teacher_parameters"] for c in budget["candidates"])
    with pytest.raises(UsageError, match="raise the budget"):
        build_student("budget:0.05", teacher, tok, calibration=_calibration(tok))


@pytest.mark.parametrize("spec, message", [
    ("layers:3+width:2", "mlp:F"),
    ("layers:3+mlp:1.5", "must be in"),
    ("layers:3+heads:0", "must be in"),
    ("layers:3+heads:x", "heads:F needs a number"),
    ("layers:3+mlp:0.5+mlp:0.5", "given twice"),
    ("budget:2", "share in"),
    ("layers:x", "integer"),
])
def test_bad_importance_specs(tiny_teacher_dir, spec, message):
    teacher, tok = load_model(str(tiny_teacher_dir))
    with pytest.raises(UsageError, match=message):
        build_student(spec, teacher, tok, calibration=_calibration(tok))
