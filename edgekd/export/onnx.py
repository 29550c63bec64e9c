"""PyTorch -> ONNX with the KV cache (optimum-onnx, one merged decoder), and the probe that checks an
ONNX file against the PyTorch model it came from.

The exported graph follows optimum's names: inputs ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.N.key/value`` (batch, kv_heads, past_len, head_dim); outputs
``logits`` (batch, seq, vocab) and ``present.N.key/value``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.device.errors import EdgekdError, UsageError, first_line
from edgekd.device.io import quiet

TASK = "text-generation-with-past"
# A short, mixed probe: prose, digits, code. Export runs it as one prompt plus one cached decode step.
PROBE_TEXT = "The capital of France is Paris. In 2026, 12 + 30 = 42.\ndef add(a, b):\n    return a + b"


def supported_model_types() -> list[str]:
    """Model types optimum-onnx exports as a decoder with a KV cache."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (fills the registry)
    from optimum.exporters.tasks import TasksManager

    return sorted(k for k, v in TasksManager._SUPPORTED_MODEL_TYPE.items() if TASK in v.get("onnx", {}))


def check_supported(model) -> None:
    cfg = model.config
    arch = (cfg.architectures or [type(model).__name__])[0]
    if getattr(cfg, "is_encoder_decoder", False) or cfg.model_type not in supported_model_types():
        raise UsageError(
            f"architecture {arch} (model_type {cfg.model_type!r}) cannot be exported as a decoder with KV cache "
            f"by optimum-onnx; supported model types: {', '.join(t for t in supported_model_types())}"
        )


def export_onnx(model, out_dir: Path, opset: int, notes: dict[str, Any] | None = None) -> Path:
    """Export ``model`` to ``out_dir/model.onnx`` (one merged decoder with past); return its path.
    What the graph does not show travels in its metadata: each layer's attention facts
    (``fuse.ATTENTION_NOTES``) and ``notes`` (e.g. a GGUF's weight types)."""
    from optimum.exporters.onnx import onnx_export_from_model

    check_supported(model)
    out_dir = Path(out_dir)
    try:
        with quiet():
            onnx_export_from_model(model, out_dir, task=TASK, opset=opset, do_validation=False)
    except (UsageError, EdgekdError):
        raise
    except Exception as e:
        first = first_line(e)
        raise EdgekdError(f"optimum-onnx could not export {model.config.model_type}: {first}") from None
    path = out_dir / "model.onnx"
    if not path.is_file():
        raise EdgekdError(f"optimum-onnx wrote no model.onnx into {out_dir}: unexpected exporter version?")
    from edgekd.export.graph import ATTENTION_NOTES, attention_notes

    notes = {ATTENTION_NOTES: attention_notes(model), **(notes or {})}
    append_metadata(path, {k: v for k, v in notes.items() if v is not None})
    return path


def append_metadata(path: Path, entries: dict[str, Any]) -> None:
    """Add ``entries`` (JSON values) to the ONNX file's ``metadata_props`` without rewriting it:
    protobuf merges a message appended to a serialized one, and a repeated field's entries are
    appended (the steps after export read them with ``fuse.read_notes``)."""
    import json

    import onnx

    extra = onnx.ModelProto()
    for key, value in entries.items():
        extra.metadata_props.add(key=key, value=json.dumps(value, separators=(",", ":")))
    with open(path, "ab") as f:
        f.write(extra.SerializeToString())


def model_facts(config) -> dict[str, Any]:
    """Shapes the runtime needs, from a Hugging Face config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eos = config.eos_token_id
    eos_ids = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
    return {
        "num_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "context_length": getattr(config, "max_position_embeddings", None),
        "bos_token_id": config.bos_token_id,
        "eos_token_ids": eos_ids,
    }


def session(path: Path, providers: tuple[str, ...] | list[str] = ("CPUExecutionProvider",), threads: int = 0):
    """An onnxruntime session on the providers this build has (the CPU provider as the fallback)."""
    import onnxruntime as ort

    from edgekd.device.session import choose_providers

    chosen, _ = choose_providers(providers, warn=False)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), so, providers=chosen)
    except Exception as e:
        first = first_line(e)
        raise EdgekdError(f"onnxruntime cannot load {Path(path).name}: {first}") from None


def _np_dtype(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32}[ort_type]


def feeds_for(inputs, input_ids: np.ndarray, past: dict[str, np.ndarray] | None, facts: dict[str, Any]) -> dict[str, np.ndarray]:
    """The inputs of one forward pass of the exported decoder (``inputs``: the session's
    ``get_inputs()``): ``input_ids`` (batch, seq) after ``past`` (None: an empty cache)."""
    batch, seq = input_ids.shape
    past_len = 0 if not past else next(iter(past.values())).shape[2]
    feeds: dict[str, np.ndarray] = {}
    for inp in inputs:
        name = inp.name
        if name == "input_ids":
            feeds[name] = input_ids.astype(_np_dtype(inp.type))
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, past_len + seq), dtype=_np_dtype(inp.type))
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(past_len, past_len + seq), (batch, seq)).astype(_np_dtype(inp.type))
        elif name.startswith("past_key_values."):
            if past:
                feeds[name] = past[name]
            else:
                shape = (batch, facts["num_kv_heads"], 0, facts["head_dim"])
                feeds[name] = np.zeros(shape, dtype=_np_dtype(inp.type))
        else:
            raise EdgekdError(f"the exported model has an input edgekd does not know: {name}")
    return feeds


def ort_forward(sess, input_ids: np.ndarray, past: dict[str, np.ndarray] | None, facts: dict[str, Any]):
    """One forward pass: ``input_ids`` (batch, seq) after ``past`` -> (logits (batch, seq, vocab), present).
    A graph with a ``logits_to_keep`` input (the step of that name) is asked for every position."""
    feeds = feeds_for(sess.get_inputs(), input_ids, past, facts)
    from edgekd.device.session import LOGITS_TO_KEEP, keeps_logits

    if keeps_logits(sess):
        feeds[LOGITS_TO_KEEP] = np.array(0, dtype=np.int64)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feeds)))
    present = {n.replace("present.", "past_key_values.", 1): v for n, v in outs.items() if n.startswith("present.")}
    return outs["logits"].astype(np.float32), present


def probe_ids(tokenizer) -> np.ndarray:
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    return np.asarray([ids], dtype=np.int64)


def torch_probe(model, ids: np.ndarray, next_ids: np.ndarray | None = None) -> np.ndarray:
    """PyTorch logits for the probe: the prompt, then its last token's successor (greedy, or
    ``next_ids`` (1, 1)) as one cached step; returns (1, seq + 1, vocab) float32."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(ids)
        out = model(input_ids=x, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1) if next_ids is None else torch.from_numpy(next_ids)
        out2 = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat([out.logits, out2.logits], dim=1).float().numpy()


def ort_probe(sess, ids: np.ndarray, facts: dict[str, Any], next_ids: np.ndarray) -> np.ndarray:
    """The same probe in onnxruntime, feeding PyTorch's greedy next token so the two runs align."""
    logits, present = ort_forward(sess, ids, None, facts)
    logits2, _ = ort_forward(sess, next_ids, present, facts)
    return np.concatenate([logits, logits2], axis=1)


def compare(reference: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Max abs logit difference and top-1 agreement, (1, seq, vocab) each."""
    return {
        "max_abs_logit_diff": float(np.abs(reference - logits).max()),
        "top1_agreement": float((reference.argmax(-1) == logits.argmax(-1)).mean()),
    }
