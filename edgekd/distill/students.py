"""Where the student comes from: a depth-pruned copy of the teacher, an existing model that shares
the teacher's tokenizer, or a TOML of architecture fields for a fresh random init.

``build_student(spec, teacher, teacher_tok, seed) -> Student``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from edgekd.config import read_toml
from edgekd.errors import UsageError


@dataclasses.dataclass
class Student:
    model: Any
    tokenizer: Any
    kind: str  # "pruned" | "folder" | "random"
    describe: dict[str, Any]  # what distill.json records about it
    vocab: int  # logits compared over the first `vocab` entries (teacher and student may pad differently)


def evenly_spaced(n_teacher: int, n: int) -> list[int]:
    """``n`` of ``n_teacher`` layer indices, evenly spaced, always keeping the first and the last.

    ``evenly_spaced(30, 6) == [0, 6, 12, 18, 24, 29]`` (the student measured in FACTS.md).
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
    """``layers:6`` or ``layers:0,6,12`` -> sorted unique teacher layer indices."""
    body = spec.split(":", 1)[1].strip()
    try:
        values = [int(v) for v in body.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--student {spec}: write layers:N or layers:i,j,k with integers") from None
    if not values:
        raise UsageError(f"--student {spec}: no layers given")
    if len(values) == 1 and "," not in body:
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
    ``layers[i]``. Works for any decoder whose layers live at ``model.layers.{i}``."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    if isinstance(getattr(cfg, "layer_types", None), list):  # per-layer attention kinds (sliding/full)
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    src = teacher.state_dict()
    prefix = _layers_prefix(src)
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


def _layers_prefix(state: dict) -> str:
    for name in state:
        if ".layers.0." in name:
            return name.split(".layers.0.")[0] + ".layers."
    raise UsageError("cannot prune this teacher: its decoder layers are not at model.layers.N")


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
        raise UsageError(f"{path}: these architecture fields do not build a model ({str(e).splitlines()[0][:200]})") from None


def build_student(spec: str, teacher, teacher_tok, seed: int = 0, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> Student:
    """Build the student that ``--student spec`` asks for (see the module docstring)."""
    from edgekd.teachers import load_model

    n_teacher = teacher.config.num_hidden_layers
    t_params = sum(p.numel() for p in teacher.parameters())
    if spec.startswith("layers:"):
        layers = parse_layers(spec, n_teacher)
        model = depth_pruned(teacher, layers)
        kind, tok, extra = "pruned", teacher_tok, {"layers": layers}
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
    vocab = min(model.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
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
