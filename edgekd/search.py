"""``edgekd export --search``: the smallest bundle that still passes the target's gates.

A profile lists candidate recipes in order of preference, each a ``[[candidates]]`` table with a
``name`` and the tables it overrides::

    [[candidates]]
    name = "rtn4"                        # required, unique
    description = "4-bit RTN, int8 head"  # optional
    [candidates.matmul_nbits]
    algorithm = "rtn"                    # only the keys given change; the rest is the profile's

A candidate may override any key of the profile except ``name``, ``description``, ``gates``,
``execution_providers`` and ``candidates``: every candidate is held to the same gates on the same
device. ``mixed_precision = true`` marks the candidate the search fills in itself: its own recipe
(which must run ``matmul_nbits`` at 4 bits) with the decoder layers that measure most sensitive
kept at 8 bits (``matmul_nbits.int8_nodes``), as few as the gates allow.

The search, top to bottom (``search_export``): export the fp32 ONNX once; export every fixed
candidate from it (``export_bundle``) into a work folder beside ``out``; validate them together
(``edgekd.validate``) on the held-out set; for a mixed-precision candidate, measure each layer's
sensitivity, pick the int8 layers, export and validate it (bisecting their number); keep
the smallest passing bundle (the fastest among those within ``SIZE_TIE`` of it) as ``out``,
atomically, with the search recorded under ``manifest["search"]``. When none passes:
``NoCandidatePasses`` (exit 1) naming the candidate and the gate that came closest.

Mixed precision by measured sensitivity (in the spirit of HAWQ, Dong et al. 2019, and of the
per-layer sensitivity scans in llama.cpp's and AutoRound's mixed recipes, with KL on calibration
text as the measure): each decoder layer alone is quantized to 4 bits, the rest at 8 bits, and
the KL(fp32 || that model) on calibration text is the layer's
sensitivity. The mixed models are spliced from the real 4-bit and 8-bit outputs of the
``matmul_nbits`` step (same kernels as the shipped bundle), and a proxy (KL and top-1 on the
calibration text, with a safety margin against the gates) picks how many layers go to 8 bits. The scan keeps
the other layers at 8 bits rather than fp32 (FACTS.md: 8-bit costs KL 0.005 on SmolLM2): the same
ranking from graphs a third of the size, which load and run faster.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgekd.config import to_dict
from edgekd.errors import EdgekdError, UsageError
from edgekd.targets import Candidate, resolve_candidates
from edgekd.validate.gates import GateFailed

__all__ = ["Candidate", "resolve_candidates", "search_export", "SearchResult", "NoCandidatePasses", "table_rows"]

SIZE_TIE = 0.02  # passing bundles within 2% of the smallest size are ranked by decode speed
CALIBRATION_PROMPTS = 8  # prompts from the shipped training set (never the held-out set)
CALIBRATION_TOKENS = 32  # greedy answer tokens the fp32 model writes for each, scored with the prompt
PROXY_MARGIN = 0.8  # the proxy must pass gates tightened to 80% of their allowance (KL, 1 - top-1)
MAX_ROUNDS = 3  # validations of the mixed-precision candidate (bisecting the number of 8-bit layers)
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

        from edgekd.export.onnx import ort_forward
        from edgekd.validate.fidelity import log_softmax

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

    from edgekd.models import greedy_answers
    from edgekd.paths import SHIPPED_TRAIN, resource
    from edgekd.validate.data import load_records

    records = load_records(resource(SHIPPED_TRAIN), limit=CALIBRATION_PROMPTS)
    prompts = []
    for r in records:
        if tok.chat_template:
            ids = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=True)
        else:
            ids = tok(r["prompt"])["input_ids"]
        prompts.append(list(ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = torch_model.generation_config.eos_token_id
    eos_ids = sorted(set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
    answers = greedy_answers(torch_model, prompts, CALIBRATION_TOKENS, eos_ids, pad, batch_size=len(prompts))
    seqs, logits = [], []
    for p, answer in zip(prompts, answers):
        seq = p + answer
        with torch.inference_mode():
            logits.append(torch_model(input_ids=torch.tensor([seq])).logits[0].float().numpy())
        seqs.append(seq)
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
    from edgekd.export.steps import STEPS, load_onnx

    t0 = time.time()
    prof = cand.profile
    steps = prof.steps[: prof.steps.index("matmul_nbits")]
    say(f"{cand.name}: preparing 4-bit and 8-bit graphs for the sensitivity scan")
    before, _ = run_steps(fp32_path, dataclasses.replace(prof, steps=steps), work / "before")
    s4 = dataclasses.replace(prof.matmul_nbits, int8_nodes=())
    s8 = dataclasses.replace(prof.matmul_nbits, bits=8, algorithm="rtn", int8_nodes=())
    STEPS["matmul_nbits"].fn(before, work / "q4" / "model.onnx", s4, prof)
    STEPS["matmul_nbits"].fn(before, work / "q8" / "model.onnx", s8, prof)
    q4, q8 = (load_onnx(work / q / "model.onnx") for q in ("q4", "q8"))
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


# ---------------------------------------------------------------------------------------------
# The search
@dataclasses.dataclass
class Tried:
    """One exported (or failed) candidate and what validation measured."""

    name: str
    description: str
    overrides: dict
    bundle: Path | None
    report: dict | None = None
    error: str | None = None
    int8_layers: list[int] | None = None
    skipped: str | None = None  # why it was not tried (it could not have won)

    @property
    def passed(self) -> bool:
        return self.report is not None and bool(self.report["passed"])

    def metric(self, *path: str) -> float | None:
        from edgekd.validate.gates import metric

        return metric(self.report, *path)

    @property
    def size_mb(self) -> float:
        """The model's size (measured for every validated candidate; inf for one that failed before)."""
        value = self.metric("cost", "size_mb")
        return float("inf") if value is None else value

    def shortfall(self) -> float:
        """How far the worst failed gate is from its threshold, relative to it (0 = passes)."""
        if self.report is None:
            return math.inf
        worst = 0.0
        for g in self.report["gates"]:
            if not g["passed"]:
                worst = max(worst, _gap(g))
        return worst

    def record(self) -> dict:
        return {
            "name": self.name, "description": self.description, "overrides": self.overrides,
            "int8_layers": self.int8_layers, "error": self.error, "skipped": self.skipped, "passed": self.passed,
            "size_mb": self.metric("cost", "size_mb"),
            "decode_tokens_per_s": self.metric("cost", "decode_tokens_per_s"),
            "top1_vs_reference": self.metric("fidelity", "reference", "top1"),
            "kl_vs_reference": self.metric("fidelity", "reference", "kl_mean"),
            "top1_vs_teacher": self.metric("fidelity", "teacher", "top1"),
            "gates": self.report["gates"] if self.report else [],
        }


def _gap(g: dict) -> float:
    if g["value"] is None:
        return math.inf
    return abs(g["value"] - g["threshold"]) / max(abs(g["threshold"]), 1e-12)


@dataclasses.dataclass
class SearchResult:
    target: str
    tried: list[Tried]
    chosen: str | None
    chosen_index: int | None  # into ``tried`` (a mixed candidate may be tried more than once)
    out: Path | None
    sensitivity: dict[str, dict]
    validate: dict
    seconds: float

    def record(self) -> dict:
        return {"target": self.target, "chosen": self.chosen, "chosen_index": self.chosen_index, "candidates": [t.record() for t in self.tried],
                "sensitivity": self.sensitivity, "validate": self.validate, "size_tie": SIZE_TIE,
                "seconds": round(self.seconds, 1)}

    def closest(self) -> str:
        """The candidate that came closest to passing, and its failed gates (closest first)."""
        best = min(self.tried, key=lambda t: t.shortfall())
        if best.report is None:
            return f"every candidate failed to export (first: {self.tried[0].name}: {self.tried[0].error})"
        from edgekd.validate.gates import GateResult

        failed = sorted((g for g in best.report["gates"] if not g["passed"]), key=_gap)
        return f"closest: {best.name!r}, which fails " + "; ".join(GateResult(**g).line() for g in failed)


class NoCandidatePasses(GateFailed):
    """Every candidate failed a gate (exit 1); ``result`` holds what was measured."""

    def __init__(self, message: str, result: SearchResult):
        super().__init__(message)
        self.result = result


def _over_budget(bundle: Path, max_size_mb: float | None) -> dict | None:
    """A report with only the failed size gate when the bundle is over ``max_size_mb``, else None."""
    from edgekd.bundle import Manifest, read_manifest
    from edgekd.validate.gates import apply_gates

    if max_size_mb is None:
        return None
    size = Manifest(read_manifest(bundle, verify=False)).model_bytes / 1e6
    if size <= max_size_mb:
        return None
    report = {"passed": False, "validated": False, "cost": {"size_mb": size}, "fidelity": {}}
    report["gates"] = [dataclasses.asdict(g) for g in apply_gates({"max_size_mb": max_size_mb}, report)]
    return report


def _beaten(mixed: Candidate, cands: Sequence[Candidate], tried: Sequence[Tried]) -> str | None:
    """Why ``mixed`` cannot win, or None. Its smallest form is its 4-bit base recipe (8-bit layers
    only add bytes): when that recipe was tried as a fixed candidate and is over the size budget,
    or something at or below its size passes, the mixed candidate cannot be the pick."""
    base = next((t for c, t in zip((c for c in cands if not c.mixed_precision), tried)
                 if c.profile == mixed.profile and t.report is not None), None)
    if base is None:
        return None
    floor = base.size_mb
    budget = mixed.profile.gates.max_size_mb
    if budget is not None and floor > budget:
        return f"its 4-bit base {base.name!r} is already over max_size_mb ({floor:.1f} MB > {budget:g})"
    winner = min((t for t in tried if t.passed and t.size_mb <= floor),
                 key=lambda t: t.size_mb, default=None)
    if winner is None:
        return None
    return (f"{winner.name!r} passes at {winner.size_mb:.1f} MB, no more than its 4-bit base "
            f"{base.name!r} ({floor:.1f} MB)")


def _pick(tried: Sequence[Tried]) -> Tried | None:
    """The smallest passing candidate; among those within ``SIZE_TIE`` of it, the fastest."""
    passing = [t for t in tried if t.passed]
    if not passing:
        return None
    smallest = min(t.size_mb for t in passing)
    close = [t for t in passing if t.size_mb <= smallest * (1 + SIZE_TIE)]
    return max(close, key=lambda t: (t.metric("cost", "decode_tokens_per_s") or 0.0, -t.size_mb))


def search_export(
    model: str,
    target: str | Path,
    out: Path,
    overwrite: bool = False,
    validate_config=None,
    trust_remote_code: bool = False,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """Export and validate every candidate of ``target``; write the smallest passing one as ``out``.

    Raises ``NoCandidatePasses`` (exit 1) when none passes, after validating all of them; nothing
    is written at ``out`` then. ``validate_config``: an ``edgekd.validate.ValidateConfig``.
    """
    from edgekd.bundle import MANIFEST
    from edgekd.export import export_bundle
    from edgekd.export.onnx import export_onnx
    from edgekd.io import atomic_dir, check_output_dir, write_json
    from edgekd.models import load_model, resolve_source
    from edgekd.targets import TargetProfile, load_target
    from edgekd.validate import ValidateConfig, validate

    say = log or (lambda msg: None)
    t0 = time.time()
    out = Path(out)
    profile: TargetProfile = target if isinstance(target, TargetProfile) else load_target(target)
    cands = resolve_candidates(profile)
    if not cands:
        raise UsageError(f"target {profile.name!r} lists no [[candidates]] to search: add some, or export without --search")
    vcfg = validate_config or ValidateConfig()
    source = resolve_source(model)
    inputs = (source.path,) if source.path is not None else ()
    check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.search-"))
    try:
        say(f"loading {model}")
        torch_model, tok = load_model(source, trust_remote_code=trust_remote_code)
        fp32: dict[int, Path] = {}

        def fp32_for(prof) -> Path:  # one fp32 export per opset, shared by the candidates
            if prof.opset not in fp32:
                say(f"exporting the fp32 ONNX once (opset {prof.opset})")
                fp32[prof.opset] = export_onnx(torch_model, work / f"fp32-opset{prof.opset}", prof.opset)
            return fp32[prof.opset]

        golden: dict[str, Any] = {}  # the reference's golden answers, made by the first export, shared

        def export(cand: Candidate, prof, tag: str) -> Tried:
            bundle = work / "bundles" / tag
            try:
                export_bundle(model, prof, bundle, trust_remote_code=trust_remote_code, fp32_onnx=fp32_for(prof),
                              log=lambda m: say(f"{tag}: {m}"), golden=golden.get("golden"))
                if "golden" not in golden and (bundle / "golden.json").is_file():
                    golden["golden"] = json.loads((bundle / "golden.json").read_text(encoding="utf-8"))
                return Tried(cand.name, cand.description, cand.overrides, bundle)
            except EdgekdError as e:
                say(f"{tag}: export failed: {e}")
                return Tried(cand.name, cand.description, cand.overrides, None, error=str(e))

        rounds = 0

        def check(tried: list[Tried]) -> None:
            nonlocal rounds
            todo = [t for t in tried if t.bundle is not None and t.report is None]
            for t in todo:
                assert t.bundle is not None  # todo holds only exported candidates
                over = _over_budget(t.bundle, profile.gates.max_size_mb)
                if over is not None:  # cannot pass whatever it measures: not worth validating
                    say(f"{t.name}: {over['cost']['size_mb']:.1f} MB is over max_size_mb: not validated")
                    t.report = over
            todo = [t for t in todo if t.report is None]
            if not todo:
                return
            rounds += 1
            say(f"validating {', '.join(t.name for t in todo)} on the held-out set")
            reports, _ = validate([t.bundle for t in todo if t.bundle is not None], vcfg, out=work / f"report-{rounds}", log=say)
            for t, r in zip(todo, reports):
                t.report = r

        # 1. every fixed candidate, validated together (the models are loaded once)
        tried = [export(c, c.profile, c.name) for c in cands if not c.mixed_precision]
        check(tried)
        # 2. mixed precision: sensitivity, then as few 8-bit layers as the gates allow
        sensitivity: dict[str, dict] = {}
        for c in (c for c in cands if c.mixed_precision):
            beaten = _beaten(c, cands, tried)
            if beaten:
                say(f"{c.name}: skipped: {beaten}")
                tried.append(Tried(c.name, c.description, c.overrides, None, skipped=beaten))
                continue
            sens = measure_sensitivity(c, fp32_for(c.profile), torch_model, tok, work / f"sens-{c.name}", say)
            sensitivity[c.name] = sens.record()
            # Validation decides: start where the proxy says, then bisect on the real gates (fewer
            # 8-bit layers after a pass, more after a failure) for at most MAX_ROUNDS validations.
            n, k = len(sens.order), sens.first_k
            failing, passing = -1, None  # the most 8-bit layers known to fail, the fewest known to pass
            for _ in range(MAX_ROUNDS):
                prof = dataclasses.replace(c.profile, matmul_nbits=dataclasses.replace(
                    c.profile.matmul_nbits, int8_nodes=sens.int8_nodes(k)))
                t = export(c, prof, f"{c.name}-{k}")
                t.int8_layers = sorted(sens.order[:k])
                check([t])
                tried.append(t)
                if t.passed:  # (an export that fails its own check counts as a failed gate)
                    passing = k
                else:
                    failing = k
                if passing is None:
                    k = min(n, k + max(1, math.ceil(n / 4)))
                else:
                    k = (failing + passing) // 2
                if k <= failing or k == passing:
                    break

        # 3. keep the smallest passing bundle
        best = _pick(tried)
        result = SearchResult(profile.name, tried, best.name if best else None,
                              tried.index(best) if best else None, out if best else None, sensitivity,
                              vcfg.record(), time.time() - t0)
        if best is None:
            raise NoCandidatePasses(f"no candidate of target {profile.name!r} passes its gates; {result.closest()}", result)
        assert best.bundle is not None  # a passing candidate was exported
        with atomic_dir(out, overwrite, inputs) as tmp:
            for p in best.bundle.iterdir():
                os.replace(p, tmp / p.name)
            os.chmod(tmp, os.stat(best.bundle).st_mode & 0o777)
            manifest = json.loads((tmp / MANIFEST).read_text(encoding="utf-8"))
            # manifest.json is not among the hashed files: adding a key keeps read_manifest's check.
            manifest["search"] = {**result.record(), "profile": to_dict(profile)}
            write_json(tmp / MANIFEST, manifest)
        say(f"kept {best.name}: {out}")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table_rows(result: SearchResult) -> list[list[str]]:
    """``[candidate, size MB, decode tok/s, top-1, KL, verdict]`` per candidate tried, in order."""

    def fmt(v, f):
        return "–" if v is None else f.format(v)

    rows = []
    for i, t in enumerate(result.tried):
        name = t.name + (f" ({len(t.int8_layers)} layers int8)" if t.int8_layers is not None else "")
        if t.skipped:
            verdict = f"skipped: {t.skipped}"
        elif t.error:
            verdict = f"export failed: {t.error}"
        elif t.passed:
            verdict = "PASS" + (" (kept)" if i == result.chosen_index else "")
        else:
            from edgekd.validate.gates import GateResult

            assert t.report is not None  # neither skipped nor failed to export: it was validated
            verdict = "FAIL " + "; ".join(GateResult(**g).line() for g in t.report["gates"] if not g["passed"])
            if t.report.get("validated") is False:
                verdict += " (not validated)"
        rows.append([name, fmt(t.metric("cost", "size_mb"), "{:.1f}"), fmt(t.metric("cost", "decode_tokens_per_s"), "{:.1f}"),
                     fmt(t.metric("fidelity", "reference", "top1"), "{:.3f}"),
                     fmt(t.metric("fidelity", "reference", "kl_mean"), "{:.4f}"), verdict])
    return rows
