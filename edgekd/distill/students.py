"""Where the student comes from: a pruned copy of the teacher, an existing model that shares the
teacher's tokenizer, or a TOML of architecture fields for a fresh random init.

``build_student(spec, teacher, teacher_tok, seed, calibration) -> Student``. Pruned specs, measured
on ``calibration`` (batches of the run's own data; ``edgekd.distill.importance``):

- ``layers:N``      the N layers of highest block influence (ShortGPT)
- ``layers-kl:N``   layers removed one at a time by the measured KL to the teacher (BlockPruner)
- ``even:N``        N evenly spaced layers, first and last kept (DistilBERT-style, no scan)
- ``layers:0,1,5``  exactly these layers
- ``...+mlp:F``     also keep the share F of every MLP's channels, by activation magnitude (Minitron)
- ``...+heads:F``   also keep the share F of every layer's query heads, by the norm of their output
                    (Minitron; the same number in each key/value group, or, with one query head per
                    group, whole heads with their keys and values); both: ``layers:20+mlp:0.75+heads:0.67``
- ``budget:F``      the candidate of at most a share F of the teacher's parameters with the lowest
                    zero-shot KL to the teacher (depth and width candidates, each measured)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from edgekd.device.config import read_toml
from edgekd.device.errors import UsageError, first_line


@dataclasses.dataclass
class Student:
    model: Any
    tokenizer: Any
    kind: str  # "pruned" | "folder" | "random"
    describe: dict[str, Any]  # what distill.json records about it
    vocab: int  # logits compared over the first `vocab` entries (teacher and student may pad differently)


def evenly_spaced(n_teacher: int, n: int) -> list[int]:
    """``n`` of ``n_teacher`` layer indices, evenly spaced, always keeping the first and the last.

    ``evenly_spaced(30, 6) == [0, 6, 12, 18, 24, 29]`` (the even student of benchmarks/RESULTS-distill.md).
    """
    if not 1 <= n <= n_teacher:
        raise UsageError(f"layers:{n} must be between 1 and the teacher's {n_teacher} layers")
    if n == 1:
        return [0]
    step = (n_teacher - 1) / (n - 1)
    picked = [min(math.ceil(i * step - 1e-9), n_teacher - 1) for i in range(n)]
    picked[-1] = n_teacher - 1
    return picked


def parse_layers(spec: str, n_teacher: int) -> list[int]:
    """``layers:0,6,12`` (or ``even:6``) -> sorted unique teacher layer indices."""
    body = spec.split(":", 1)[1].strip()
    try:
        values = [int(v) for v in body.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--student {spec}: write layers:N, layers-kl:N, even:N or layers:i,j,k with integers") from None
    if not values:
        raise UsageError(f"--student {spec}: no layers given")
    if len(values) == 1 and "," not in body:
        if not spec.startswith("even:"):
            raise UsageError(f"--student {spec}: a layer count is chosen by a scan (build_student), not parsed")
        return evenly_spaced(n_teacher, values[0])
    bad = [v for v in values if not 0 <= v < n_teacher]
    if bad:
        raise UsageError(f"--student {spec}: layer {bad[0]} does not exist (the teacher has layers 0..{n_teacher - 1})")
    if len(set(values)) != len(values):
        raise UsageError(f"--student {spec}: a layer is listed twice")
    return sorted(values)


def depth_pruned(teacher, layers: list[int]):
    """A copy of ``teacher`` keeping only ``layers`` (DistilBERT-style init, Sanh et al. 2019):
    embeddings, final norm and head are copied, decoder layer i of the student is teacher layer
    ``layers[i]``. Works for any decoder whose layers live at ``model.layers.{i}`` or ``transformer.h.{i}``."""
    from transformers import AutoModelForCausalLM

    from edgekd.distill import importance

    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    if isinstance(getattr(cfg, "layer_types", None), list):  # per-layer attention kinds (sliding/full)
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    src = teacher.state_dict()
    prefix = _layers_prefix(src, importance.layers_attribute(teacher))
    state = {}
    for name in student.state_dict():
        if name.startswith(prefix):
            i, rest = name[len(prefix):].split(".", 1)
            state[name] = src[f"{prefix}{layers[int(i)]}.{rest}"]
        elif name in src:
            state[name] = src[name]
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise UsageError(f"cannot prune this teacher's architecture ({type(teacher).__name__}): no weights for {missing[0]}")
    if getattr(cfg, "tie_word_embeddings", False):
        student.tie_weights()
    return student.float()


def _layers_prefix(state: dict, attribute: str) -> str:
    for name in state:
        if f".{attribute}.0." in name:
            return name.split(f".{attribute}.0.")[0] + f".{attribute}."
    raise UsageError(f"cannot prune this teacher: no weights of its decoder layers (.{attribute}.0.)")


def check_same_tokenizer(teacher_tok, student_tok, where: str) -> None:
    """Same tokens with the same ids and the same special tokens, or a clear error."""
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        diff = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])
        example = f" (e.g. {diff[0][0]!r} -> {diff[0][1]})" if diff else ""
        raise UsageError(
            f"{where} does not share the teacher's tokenizer: {len(s_vocab)} vs {len(t_vocab)} tokens, "
            f"{len(diff)} differ{example}; pick a student built on the teacher's tokenizer"
        )
    for attr in ("bos_token", "eos_token", "unk_token"):
        if getattr(teacher_tok, attr) != getattr(student_tok, attr):
            raise UsageError(
                f"{where}: special token {attr} is {getattr(student_tok, attr)!r} but the teacher's is "
                f"{getattr(teacher_tok, attr)!r}; fix the student's tokenizer_config.json"
            )


def random_from_toml(path: Path, teacher, seed: int):
    """A fresh student: the teacher's config with the TOML's architecture fields changed, random init."""
    from transformers import AutoModelForCausalLM

    fields = read_toml(path)
    cfg = copy.deepcopy(teacher.config)
    known = cfg.to_dict()
    for key, value in fields.items():
        if key not in known:
            raise UsageError(f"{path}: unknown architecture field {key!r} for {cfg.model_type} (known: {', '.join(sorted(k for k in known if not k.startswith('_')))})")
        if key == "vocab_size" and value != cfg.vocab_size:
            raise UsageError(f"{path}: vocab_size must stay the teacher's ({cfg.vocab_size}): the student shares its tokenizer")
        setattr(cfg, key, value)
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) != cfg.num_hidden_layers:
        cfg.layer_types = [cfg.layer_types[0]] * cfg.num_hidden_layers
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UsageError(f"{path}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}")
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    except Exception as e:
        raise UsageError(f"{path}: these architecture fields do not build a model ({first_line(e, 200)})") from None


PRUNED_PREFIXES = ("layers:", "layers-kl:", "even:", "budget:")


def is_pruned_spec(spec: str) -> bool:
    return spec.startswith(PRUNED_PREFIXES)


WIDTHS = ("mlp", "heads")  # what a ``+KIND:F`` after the depth prunes


def _split_width(spec: str) -> tuple[str, dict[str, float]]:
    """``layers:15+mlp:0.75+heads:0.67`` -> ``("layers:15", {"mlp": 0.75, "heads": 0.67})``."""
    depth, *parts = spec.split("+")
    widths: dict[str, float] = {}
    for part in parts:
        kind, _, value = part.partition(":")
        if kind not in WIDTHS:
            raise UsageError(f"--student {spec}: after '+' write mlp:F or heads:F (the share of MLP channels or "
                             "attention heads kept, e.g. mlp:0.75)")
        try:
            share = float(value)
        except ValueError:
            raise UsageError(f"--student {spec}: {kind}:F needs a number, e.g. {kind}:0.75") from None
        if not 0 < share <= 1:
            raise UsageError(f"--student {spec}: {kind}:{share} must be in (0, 1]")
        if kind in widths:
            raise UsageError(f"--student {spec}: {kind} is given twice")
        widths[kind] = share
    return depth, widths


def choose_layers(spec: str, teacher, calibration, vocab: int, say) -> tuple[list[int], dict[str, Any]]:
    """The teacher layers a ``layers:N`` / ``layers-kl:N`` / ``even:N`` / list spec keeps, and the scan."""
    from edgekd.distill import importance

    n_teacher = teacher.config.num_hidden_layers
    head, body = spec.split(":", 1)
    if spec.startswith("even:") or "," in body:
        return parse_layers(spec, n_teacher), {"method": "evenly spaced" if head == "even" else "given"}
    try:
        n = int(body)
    except ValueError:
        raise UsageError(f"--student {spec}: write {head}:N with an integer N") from None
    if not 1 <= n <= n_teacher:
        raise UsageError(f"--student {spec}: N must be between 1 and the teacher's {n_teacher} layers")
    if not calibration:
        raise UsageError(f"--student {spec}: the importance scan needs calibration data")
    say(f"measuring block influence of the teacher's {n_teacher} layers on {sum(int(b['attention_mask'].sum()) for b in calibration)} calibration tokens ...")
    scores = importance.block_influence(teacher, calibration)
    scan: dict[str, Any] = {"block_influence": [round(x, 4) for x in scores], "calibration_sequences": sum(len(b["input_ids"]) for b in calibration)}
    if head == "layers":
        kept = importance.keep_most_influential(scores, n)
        scan["method"] = "block influence (ShortGPT, arXiv 2403.03853)"
    else:
        kept, history = importance.iterative_kl(
            teacher, calibration, n, vocab, scores,
            on_step=lambda i, kl: say(f"  removed layer {i}: KL to the teacher {kl:.3f}"))
        scan.update(method="iterative KL (BlockPruner, arXiv 2406.10594)", removals=history)
    return kept, scan


MLP_MULTIPLE = 64  # MLP channels are kept in multiples of this: whole blocks for the 4-bit quantizer


def _mlp_channels_kept(cfg, share: float) -> int:
    keep = max(MLP_MULTIPLE, int(round(cfg.intermediate_size * share / MLP_MULTIPLE)) * MLP_MULTIPLE)
    return min(keep, cfg.intermediate_size)


def width_pruned(model, share: float, calibration) -> dict[str, Any]:
    """Keep the share ``share`` of every MLP's intermediate channels, the ones of highest mean
    |activation| on ``calibration`` (Minitron), rounded to a multiple of ``MLP_MULTIPLE``. Changes
    ``model`` in place; returns what distill.json records."""
    from edgekd.distill import importance

    cfg = model.config
    original = cfg.intermediate_size
    keep = _mlp_channels_kept(cfg, share)
    if keep == cfg.intermediate_size:
        return {"mlp_channels": keep, "mlp_share": 1.0}
    scores = importance.mlp_channel_importance(model, calibration)
    for layer, score in zip(importance.decoder_layers(model), scores):
        idx = torch.sort(torch.topk(score, keep).indices).values
        mlp = layer.mlp
        mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, rows=idx), _sliced(mlp.up_proj, rows=idx)
        mlp.down_proj = _sliced(mlp.down_proj, cols=idx)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep
    cfg.intermediate_size = keep
    return {"mlp_channels": keep, "mlp_share": round(keep / original, 4),
            "method": "activation magnitude (Minitron, arXiv 2407.14679)"}


def _sliced(lin: torch.nn.Linear, rows=None, cols=None) -> torch.nn.Linear:
    """A copy of ``lin`` keeping the output features ``rows`` and the input features ``cols``."""
    w = lin.weight.data if rows is None else lin.weight.data[rows]
    w = w if cols is None else w[:, cols]
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype)
    new.weight.data = w.clone()
    if lin.bias is not None:
        new.bias.data = (lin.bias.data if rows is None else lin.bias.data[rows]).clone()
    return new


def _heads_plan(cfg, share: float) -> tuple[int, int, int]:
    """(query heads per key/value group, groups kept, query heads kept per group) for ``share``.
    With several query heads per group, every group stays and keeps the same number of them (GQA
    stays GQA, the KV cache keeps its shape); with one (multi-head attention), whole heads go, their
    keys and values with them."""
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    group = heads // kv
    if group > 1:
        return group, kv, min(group, max(1, round(group * share)))
    return 1, min(kv, max(1, round(kv * share))), 1


def heads_pruned(model, share: float, calibration) -> dict[str, Any]:
    """Keep the share ``share`` of every layer's query heads, the ones whose attention output has the
    highest mean L2 norm on ``calibration`` (Minitron), as ``_heads_plan`` says. Changes ``model`` in
    place; returns what distill.json records (``kept_heads``: per layer, the teacher's head indices kept)."""
    from edgekd.distill import importance

    cfg = model.config
    group, groups_kept, per_group = _heads_plan(cfg, share)
    heads = cfg.num_attention_heads
    if groups_kept * per_group == heads:
        return {"attention_heads": heads, "heads_share": 1.0}
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    scores = importance.attention_head_importance(model, calibration)
    kept_heads = []
    for layer, score in zip(importance.decoder_layers(model), scores):
        attn = layer.self_attn
        if group > 1:  # the loudest heads of each group
            chosen = [g * group + int(i) for g in range(groups_kept) for i in torch.sort(torch.topk(score[g * group:(g + 1) * group], per_group).indices).values]
        else:  # the loudest heads, each with its own key and value
            chosen = torch.sort(torch.topk(score, groups_kept).indices).values.tolist()
        idx = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in chosen])  # their rows of q, k, v
        if group == 1:
            attn.k_proj, attn.v_proj = _sliced(attn.k_proj, rows=idx), _sliced(attn.v_proj, rows=idx)
        attn.q_proj, attn.o_proj = _sliced(attn.q_proj, rows=idx), _sliced(attn.o_proj, cols=idx)
        attn.num_key_value_groups = per_group  # query heads per key/value head (transformers' attention reads it)
        kept_heads.append(chosen)
    cfg.num_attention_heads, cfg.num_key_value_heads = groups_kept * per_group, groups_kept
    cfg.head_dim = head_dim  # no longer hidden_size / heads
    return {"attention_heads": groups_kept * per_group, "key_value_heads": groups_kept,
            "heads_share": round(groups_kept * per_group / heads, 4), "kept_heads": kept_heads,
            "method": "attention output norm (Minitron, arXiv 2407.14679)"}


def pruned(spec: str, teacher, calibration, vocab: int, say):
    """A pruned student for ``spec`` (depth, optionally ``+mlp:F``, ``+heads:F``) and what its scan measured."""
    depth, widths = _split_width(spec)
    layers, scan = choose_layers(depth, teacher, calibration, vocab, say)
    model = depth_pruned(teacher, layers)
    extra: dict[str, Any] = {"layers": layers, "scan": scan}
    if "mlp" in widths:
        extra["width"] = width_pruned(model, widths["mlp"], calibration)
    if "heads" in widths:
        extra["heads"] = heads_pruned(model, widths["heads"], calibration)
    return model, extra


def layer_params(teacher) -> tuple[int, int]:
    """(parameters of one decoder layer, parameters outside the layers)."""
    from edgekd.distill import importance

    layers = importance.decoder_layers(teacher)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    total = sum(p.numel() for p in teacher.parameters())
    return per_layer, total - per_layer * len(layers)


def budget_student(spec: str, teacher, calibration, vocab: int, say):
    """``budget:F``: depth-only and depth+width (MLP channels, query heads) candidates of at most F x
    the teacher's parameters, each built by block influence and measured zero-shot (KL to the
    teacher at answer positions); the lowest KL wins. Every candidate is recorded."""
    from edgekd.distill import importance

    try:
        share = float(spec.split(":", 1)[1])
    except ValueError:
        raise UsageError(f"--student {spec}: write budget:F with F a share of the teacher's parameters, e.g. budget:0.6") from None
    if not 0 < share < 1:
        raise UsageError(f"--student {spec}: the budget must be a share in (0, 1), e.g. budget:0.6")
    n_teacher = teacher.config.num_hidden_layers
    per_layer, outside = layer_params(teacher)
    total = per_layer * n_teacher + outside
    cfg = teacher.config
    layer0 = dict(importance.decoder_layers(teacher)[0].named_parameters())

    def share_of(*parts: str) -> float:
        return sum(p.numel() for n, p in layer0.items() if any(f".{x}." in f".{n}" for x in parts)) / per_layer

    mlp_share = share_of("mlp")
    # what pruning heads removes: q and o within groups; q, k, v and o for whole heads (one per group)
    heads_share = share_of("q_proj", "o_proj") if _heads_plan(cfg, 1.0)[0] > 1 else share_of("q_proj", "k_proj", "v_proj", "o_proj")
    candidates, seen = [], set()
    for heads in (1.0, 0.5):
        _, groups_kept, per_group = _heads_plan(cfg, heads)
        heads_kept = groups_kept * per_group / cfg.num_attention_heads
        for width in (1.0, 0.75, 0.5):
            mlp_kept = _mlp_channels_kept(cfg, width) / cfg.intermediate_size
            if (heads < 1 and heads_kept == 1) or (width < 1 and mlp_kept == 1):
                continue  # nothing to prune at this share (a single head; a small MLP's rounding)
            layer_cost = per_layer * (1 - mlp_share * (1 - mlp_kept) - heads_share * (1 - heads_kept))
            depth = min(int((share * total - outside) // layer_cost), n_teacher)
            if depth >= 1 and (depth, mlp_kept, heads_kept) not in seen:
                seen.add((depth, mlp_kept, heads_kept))
                candidates.append((depth, width, heads))
    if not candidates:
        raise UsageError(f"--student {spec}: no student fits {share:.0%} of the teacher's {total / 1e6:.1f}M parameters "
                         f"(the embedding and head alone are {outside / total:.0%}): raise the budget")
    t_logp = importance.teacher_answer_logp(teacher, calibration, vocab)
    tried, best = [], None
    for depth, width, heads in candidates:
        cand = f"layers:{depth}" + (f"+mlp:{width}" if width < 1 else "") + (f"+heads:{heads}" if heads < 1 else "")
        model, extra = pruned(cand, teacher, calibration, vocab, lambda m: None)
        kl = importance.answer_kl(model, calibration, t_logp, vocab)
        params = sum(p.numel() for p in model.parameters())
        say(f"  budget candidate {cand}: {params / 1e6:.1f}M parameters, zero-shot KL to the teacher {kl:.3f}")
        tried.append({"spec": cand, "parameters": params, "kl": round(kl, 4)})
        if best is None or kl < best[0]:
            best = (kl, cand, model, extra)
    assert best is not None  # candidates is not empty
    _, cand, model, extra = best
    extra["scan"]["budget"] = {"share": share, "candidates": tried, "chosen": cand}
    return model, extra


def build_student(spec: str, teacher, teacher_tok, seed: int = 0, *, calibration=None, say=lambda m: None,
                  trust_remote_code: bool = False, allow_pickle: bool = False) -> Student:
    """Build the student that ``--student spec`` asks for (see the module docstring)."""
    from edgekd.models import load_model

    t_params = sum(p.numel() for p in teacher.parameters())
    t_vocab = teacher.get_output_embeddings().weight.shape[0]
    if spec.startswith("budget:"):
        model, extra = budget_student(spec, teacher, calibration, t_vocab, say)
        kind, tok = "pruned", teacher_tok
    elif is_pruned_spec(spec):
        model, extra = pruned(spec, teacher, calibration, t_vocab, say)
        kind, tok = "pruned", teacher_tok
    elif spec.endswith(".toml"):
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--student {spec}: file not found")
        model = random_from_toml(path, teacher, seed)
        kind, tok, extra = "random", teacher_tok, {"toml": str(path.resolve())}
    else:
        model, tok = load_model(spec, dtype=torch.float32, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        check_same_tokenizer(teacher_tok, tok, f"student {spec}")
        model.train()
        kind, extra = "folder", {"source": spec}
    vocab = min(model.get_output_embeddings().weight.shape[0], t_vocab)
    if len(teacher_tok) > vocab:
        raise UsageError(f"student {spec} has {vocab} output rows but the tokenizer has {len(teacher_tok)} tokens")
    s_params = sum(p.numel() for p in model.parameters())
    if s_params >= t_params:
        warnings.warn(f"the student ({s_params / 1e6:.1f}M parameters) is not smaller than the teacher ({t_params / 1e6:.1f}M)", stacklevel=2)
    describe = {
        "spec": spec,
        "kind": kind,
        **extra,
        "num_hidden_layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "parameters": s_params,
        "teacher_parameters": t_params,
    }
    return Student(model=model, tokenizer=tok, kind=kind, describe=describe, vocab=vocab)
