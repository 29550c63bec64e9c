"""Mixed precision by measured sensitivity: splice decoder layers between the 4-bit and the 8-bit
graphs of the ``matmul_nbits`` step, score them on calibration text, rank the layers
(``edgekd.search`` says how the search uses it)."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edgekd.device.errors import EdgekdError
from edgekd.export.profile import Candidate

CALIBRATION_PROMPTS = 8  # prompts from the shipped training set (never the held-out set)
CALIBRATION_TOKENS = 32  # greedy answer tokens the fp32 model writes for each, scored with the prompt
PROXY_MARGIN = 0.8  # the proxy must pass gates tightened to 80% of their allowance (KL, 1 - top-1)
LAYER_RE = re.compile(r"/(?:model/)?(?:layers|h|blocks|layer)\.(\d+)/")

# ---------------------------------------------------------------------------------------------
# Mixed precision: splice layers between two quantized graphs, measure KL on calibration text
def layer_prefixes(model) -> dict[int, str]:
    """Decoder layer index -> the node-name substring of its nodes (e.g. ``/model/layers.3/``)."""
    prefixes: dict[int, str] = {}
    for n in model.graph.node:
        m = LAYER_RE.search(n.name)
        if m:
            prefixes.setdefault(int(m.group(1)), m.group(0))
    return dict(sorted(prefixes.items()))


def _key(name: str) -> str:
    return re.sub(r"_Q\d+$", "", name)  # MatMulNBitsQuantizer names a quantized MatMul NAME_Q4 / NAME_Q8


def splice(base, donor, prefixes: Sequence[str]):
    """A copy of ``base`` whose MatMul / MatMulNBits nodes under ``prefixes`` come from ``donor``.

    Both graphs must come from the same model through ``matmul_nbits`` (or be its input), so a
    node keeps its name up to the ``_Q<bits>`` suffix and its input and output tensors. The donor's
    initializers are renamed (``@donor``) so they cannot clash with the base's.
    """
    import onnx

    def ours(n) -> bool:
        return n.op_type in ("MatMul", "MatMulNBits") and any(p in n.name for p in prefixes)

    donor_nodes = {_key(n.name): n for n in donor.graph.node if ours(n)}
    donor_inits = {t.name: t for t in donor.graph.initializer}
    model = onnx.ModelProto()
    model.CopyFrom(base)
    g = model.graph
    nodes, added = [], {}
    for n in g.node:
        d = donor_nodes.get(_key(n.name)) if ours(n) else None
        if d is None:
            nodes.append(n)
            continue
        new = onnx.NodeProto()
        new.CopyFrom(d)
        for j, name in enumerate(new.input):
            if name in donor_inits:
                new.input[j] = name + "@donor"
                if name not in added:
                    t = onnx.TensorProto()
                    t.CopyFrom(donor_inits[name])
                    t.name = name + "@donor"
                    added[name] = t
        nodes.append(new)
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + list(added.values()))
    have = {o.domain for o in model.opset_import}
    model.opset_import.extend(o for o in donor.opset_import if o.domain not in have)
    return model


class Scorer:
    """KL(fp32 || model) and top-1 agreement on calibration token ids, one full-sequence forward."""

    def __init__(self, sequences: Sequence[Sequence[int]], reference_logits: Sequence, facts: dict):
        self.sequences, self.reference, self.facts = sequences, reference_logits, facts

    def __call__(self, model) -> dict[str, float]:
        import numpy as np
        import onnxruntime as ort

        from edgekd.device.fidelity import log_softmax
        from edgekd.export.onnx import ort_forward

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        kls, agree = [], []
        for ids, ref in zip(self.sequences, self.reference):
            logits, _ = ort_forward(sess, np.asarray([ids], dtype=np.int64), None, self.facts)
            lq, lp = log_softmax(logits[0]), log_softmax(ref)
            kls.append(np.clip((np.exp(lp) * (lp - lq)).sum(-1), 0.0, None))
            agree.append(logits[0].argmax(-1) == ref.argmax(-1))
        return {"kl": float(np.concatenate(kls).mean()), "top1": float(np.concatenate(agree).mean())}


def calibration(torch_model, tok) -> tuple[list[list[int]], list]:
    """Token ids of shipped training prompts (chat template) + the model's own greedy answers, and
    the model's fp32 logits over them ``(seq, vocab)``: the text the sensitivity is measured on."""
    import torch

    from edgekd.device.data import load_records
    from edgekd.device.paths import SHIPPED_TRAIN, resource
    from edgekd.models import model_written_texts

    records = load_records(resource(SHIPPED_TRAIN), limit=CALIBRATION_PROMPTS)
    seqs = model_written_texts(torch_model, tok, [r["prompt"] for r in records], CALIBRATION_TOKENS)
    logits = []
    for seq in seqs:
        with torch.inference_mode():
            logits.append(torch_model(input_ids=torch.tensor([seq])).logits[0].float().numpy())
    return seqs, logits


def _proxy_ok(metrics: dict[str, float], gates) -> bool:
    """The calibration proxy passes the gates tightened by ``PROXY_MARGIN``."""
    ok = True
    if gates.max_kl_vs_reference is not None:
        ok &= metrics["kl"] <= PROXY_MARGIN * gates.max_kl_vs_reference
    if gates.min_top1_vs_reference is not None:
        ok &= metrics["top1"] >= 1 - PROXY_MARGIN * (1 - gates.min_top1_vs_reference)
    return bool(ok)


@dataclasses.dataclass
class Sensitivity:
    """What the mixed-precision analysis measured, and the layers it ranks most sensitive first."""

    prefixes: dict[int, str]
    layers: list[dict]  # [{"layer", "kl", "top1"}] with only that layer at 4 bits
    order: list[int]  # layers, most sensitive first
    proxy: dict[int, dict]  # k -> {"kl", "top1"} of the 4-bit model with the top-k layers at 8 bits
    first_k: int  # the smallest k whose proxy passes (len(order) when none does)
    seconds: float

    def int8_nodes(self, k: int) -> tuple[str, ...]:
        return tuple(self.prefixes[i] for i in sorted(self.order[:k]))

    def record(self) -> dict:
        return {"layers": self.layers, "order": self.order,
                "proxy": [{"int8_layers": k, **v} for k, v in sorted(self.proxy.items())],
                "first_k": self.first_k, "calibration_prompts": CALIBRATION_PROMPTS,
                "calibration_answer_tokens": CALIBRATION_TOKENS, "proxy_margin": PROXY_MARGIN,
                "seconds": round(self.seconds, 1)}


def measure_sensitivity(cand: Candidate, fp32_path: Path, torch_model, tok, work: Path,
                        say: Callable[[str], None]) -> Sensitivity:
    """Rank decoder layers by the KL each adds alone at 4 bits (the rest at 8); find how many to
    keep at 8 bits."""
    from edgekd.export import run_steps
    from edgekd.export.onnx import model_facts
    from edgekd.export.steps import load_onnx, run_step

    t0 = time.time()
    prof = cand.profile
    steps = prof.steps[: prof.steps.index("matmul_nbits")]
    say(f"{cand.name}: preparing 4-bit and 8-bit graphs for the sensitivity scan")
    before, _ = run_steps(fp32_path, dataclasses.replace(prof, steps=steps), work / "before")
    s4 = dataclasses.replace(prof.settings["matmul_nbits"], int8_nodes=())
    s8 = dataclasses.replace(s4, bits=8, algorithm="rtn")
    q4, q8 = (load_onnx(run_step("matmul_nbits", before, work / q, s, prof)[0]) for q, s in (("q4", s4), ("q8", s8)))
    prefixes = layer_prefixes(q4)
    if not prefixes:
        raise EdgekdError(f"{cand.name}: found no decoder layers in the graph's node names (expected '/layers.N/')")

    seqs, ref = calibration(torch_model, tok)
    score = Scorer(seqs, ref, model_facts(torch_model.config))
    layers: list[dict] = []
    for i, prefix in prefixes.items():
        say(f"{cand.name}: sensitivity of layer {i + 1}/{len(prefixes)}")
        layers.append({"layer": i, **score(splice(q8, q4, [prefix]))})
    order = [r["layer"] for r in sorted(layers, key=lambda r: (-r["kl"], r["layer"]))]

    proxy: dict[int, dict] = {}

    def at(k: int) -> dict:
        if k not in proxy:
            say(f"{cand.name}: proxy with {k} of {len(order)} layers at 8 bits")
            proxy[k] = score(splice(q4, q8, [prefixes[i] for i in order[:k]]))
        return proxy[k]

    lo, hi = 0, len(order)  # the smallest k whose proxy passes, assuming more 8-bit layers never hurt
    if not _proxy_ok(at(hi), prof.gates):
        first = hi
    else:
        while lo < hi:
            mid = (lo + hi) // 2
            if _proxy_ok(at(mid), prof.gates):
                hi = mid
            else:
                lo = mid + 1
        first = lo
    return Sensitivity(prefixes, layers, order, proxy, first, time.time() - t0)


