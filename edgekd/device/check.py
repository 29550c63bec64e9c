"""``edgekd check``: the bundle on the machine that ships it, against the golden reference it carries.

Needs only the runtime (onnxruntime, numpy, tokenizers, jinja2, typer, rich): no torch, no
teacher, no PyTorch model. It runs on a phone (Termux), a board or a server as it runs here.

Top to bottom: open the bundle (every file's hash checked against the manifest, ``golden.json``
included); read the golden reference (``edgekd.export.golden``); check that this machine's
tokenizer and chat template give each golden prompt the ids the reference saw; teacher-force the
reference's answers through the bundle's KV cache and compare with the reference's top-k log-probs;
let the bundle answer greedily and compare with the reference's answers; time decode; apply the
target's gates that a golden reference can answer, and say which it cannot (those against the
teacher are ``edgekd validate``'s).

Figures (against the reference, the unquantized model that was exported):

- ``top1``: share of answer positions whose argmax is the reference's.
- ``kl_mean``: KL(reference || bundle) over the reference's top-k tokens plus one bucket for the rest
  of the vocabulary, nats per position. Merging tokens never increases KL, so this is a lower bound
  of the full KL that ``edgekd validate`` reports (they agree to the mass outside the top-k).
- ``ppl_ratio``: perplexity of the reference's answers under the bundle over under the reference.
- ``greedy_exact``, ``greedy_prefix_tokens``: as in ``edgekd.device.fidelity``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.device.bundle import Manifest
from edgekd.device.errors import UsageError
from edgekd.device.metrics import CHECKED_HERE  # the gates a golden reference answers on the device

if TYPE_CHECKING:
    from edgekd.device.bundle_report import BundleReport

__all__ = ["CheckConfig", "check_bundle", "read_golden"]


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    num_prompts: int | None = None  # golden prompts replayed (None: all of them)
    speed: bool = True  # time prefill and decode on this machine
    threads: int | None = None  # onnxruntime intra-op threads (None: one per physical core)
    providers: tuple[str, ...] | None = None  # override the target's execution providers
    target: str | None = None  # a profile whose [gates] apply whatever the bundle's manifest says
    session_config: tuple[tuple[str, str], ...] = ()  # onnxruntime session config entries, e.g. (("mlas.disable_kleidiai", "1"),)
    prepared: Path | None = None  # a cache folder for the model prepared for this machine (edgekd.device.prepared)

    def __post_init__(self):
        if self.num_prompts is not None and self.num_prompts < 1:
            raise UsageError(f"--num-prompts must be >= 1, got {self.num_prompts}")


def read_golden(root: Path, manifest: Manifest) -> dict[str, Any]:
    """The bundle's ``golden.json``, checked: listed in the manifest (so hashed), of a known format,
    each example's fields of the right types. One-line errors say what to do."""
    from edgekd.device.bundle import GOLDEN_FILE, GOLDEN_FORMAT, GOLDEN_VERSION, read_versioned_json

    listed = {e["path"] for e in manifest.files}
    path = Path(root) / GOLDEN_FILE
    if GOLDEN_FILE not in listed or not path.is_file():
        raise UsageError(f"{root} has no golden reference ({GOLDEN_FILE}): re-export it with `edgekd export` "
                         f"(this edgekd writes one), or validate it with `edgekd validate`")
    golden = read_versioned_json(path, GOLDEN_FORMAT, GOLDEN_VERSION, "an edgekd golden reference", ": re-export the bundle")
    examples = golden.get("examples")
    if not isinstance(examples, list) or not examples:
        raise UsageError(f"{path} holds no examples: re-export the bundle")

    vocab = manifest.model.get("vocab_size")
    vocab = vocab if isinstance(vocab, int) and vocab > 0 else 2**31

    def ids(x) -> bool:  # token ids within the model's vocabulary
        return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in x)

    def logprobs(x) -> bool:  # finite log-probabilities
        return isinstance(x, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= 1e-6 for v in x)

    for i, ex in enumerate(examples):
        ok = (isinstance(ex, dict) and isinstance(ex.get("prompt"), str) and ids(ex.get("prompt_ids"))
              and ids(ex.get("answer_ids")) and len(ex["answer_ids"]) > 0 and len(ex["prompt_ids"]) > 0
              and isinstance(ex.get("topk_ids"), list) and isinstance(ex.get("topk_logprobs"), list)
              and len(ex["topk_ids"]) == len(ex["topk_logprobs"]) == len(ex["answer_ids"])
              and all(ids(r) and len(r) > 0 for r in ex["topk_ids"])
              and all(logprobs(lp) and len(lp) == len(r) for r, lp in zip(ex["topk_ids"], ex["topk_logprobs"])))
        if not ok:
            raise UsageError(f"{path}: examples[{i}] must hold prompt, prompt_ids and answer_ids (token ids below the vocabulary's "
                             f"{vocab}) and one top-k row of ids and finite log-probs per answer token: re-export the bundle")
    return golden


def _rest_kl(p: np.ndarray, lq: np.ndarray) -> float:
    """KL over ``p``'s top-k (log-probs ``lq`` of the same tokens) and one bucket for the rest."""
    q = np.exp(lq)
    rest_p, rest_q = max(1.0 - float(p.sum()), 0.0), max(1.0 - float(q.sum()), 1e-12)
    kl = float((p * (np.log(np.maximum(p, 1e-300)) - lq)).sum())
    if rest_p > 0:
        kl += rest_p * (np.log(rest_p) - np.log(rest_q))
    return max(kl, 0.0)


def compare_with_golden(rt, examples: list[dict[str, Any]]) -> tuple[dict[str, float], list[float]]:
    """Teacher-forced figures of the bundle against the golden top-k; returns (figures, KL per position)."""
    from edgekd.device.fidelity import log_softmax

    agree, kls, nll_b, nll_r = [], [], [], []
    for ex in examples:
        lb = log_softmax(rt.score(ex["prompt_ids"], ex["answer_ids"]))
        for pos, token in enumerate(ex["answer_ids"]):
            ids = np.asarray(ex["topk_ids"][pos], dtype=np.int64)
            lp = np.asarray(ex["topk_logprobs"][pos], dtype=np.float64)
            agree.append(int(lb[pos].argmax()) == int(ids[0]))
            kls.append(_rest_kl(np.exp(lp), lb[pos][ids]))
            nll_b.append(-float(lb[pos][token]))
            ref = np.nonzero(ids == token)[0]
            nll_r.append(-float(lp[ref[0]]) if ref.size else -float(lp[-1]))  # outside the top-k: at most the k-th
    ppl_b, ppl_r = float(np.exp(np.mean(nll_b))), float(np.exp(np.mean(nll_r)))
    figures = {"positions": len(agree), "top1": float(np.mean(agree)), "kl_mean": float(np.mean(kls)),
               "kl_p95": float(np.percentile(kls, 95)), "ppl_bundle": ppl_b, "ppl_model": ppl_r, "ppl_ratio": ppl_b / ppl_r}
    return figures, kls


def replay_golden(rt, examples: list[dict[str, Any]], answer_tokens: int) -> tuple[dict[str, Any], list[float], list[list[int]]]:
    """The bundle (a ``Runtime``) against golden examples: teacher-forced figures on the reference's
    answers, then its own greedy answers against them. Returns (figures, KL per position, answers)."""
    from edgekd.device.fidelity import bundle_greedy, compare_greedy

    figures, kls = compare_with_golden(rt, examples)
    ours = bundle_greedy(rt, [ex["prompt_ids"] for ex in examples], answer_tokens)
    figures.update(compare_greedy(ours, [ex["answer_ids"] for ex in examples], answer_tokens))
    return figures, kls, ours


def check_bundle(bundle: str | Path, config: CheckConfig = CheckConfig(),
                 log: Callable[[str], None] = lambda m: None) -> BundleReport:
    """Measure ``bundle`` against its golden reference on this machine; return the report (with
    ``gates``, ``not_checked`` and ``passed``). A failed gate is not an exception (see the CLI)."""
    from edgekd.device.bundle_report import BundleReport
    from edgekd.device.runtime import Runtime, answer_text
    from edgekd.device.speed import environment, measure_memory, memory_cost, read_bandwidth, roofline, time_runtime
    from edgekd.device.tasks import label_of

    log(f"opening {bundle} (checking file hashes) ...")
    rt = Runtime(bundle, providers=config.providers, threads=config.threads, session_config=dict(config.session_config),
                 prepared=config.prepared)
    manifest = rt.manifest
    golden = read_golden(rt.root, manifest)
    examples = golden["examples"][: config.num_prompts or None]
    n = int(golden.get("answer_tokens") or max(len(ex["answer_ids"]) for ex in examples))

    log(f"{len(examples)} golden prompts: the reference's answers teacher-forced, then the bundle's own ...")
    figures, kls, ours = replay_golden(rt, examples, n)
    mismatched = [i for i, ex in enumerate(examples) if rt.encode_prompt(ex["prompt"]) != ex["prompt_ids"]]
    cost: dict[str, Any] = {"size_mb": manifest.model_bytes / 1e6}
    if config.speed:
        log("timing prefill and decode ...")
        cost.update({k: v for k, v in time_runtime(rt).items() if k in ("prefill_tokens", "prefill_ms", "decode_tokens_per_s")})
        weight_bytes = manifest.model.get("decode_weight_bytes")  # recorded at export (the device has no onnx to count them)
        if weight_bytes:  # else no roofline: a 256 MiB bandwidth pass would be spent for nothing
            cost.update(roofline(cost["decode_tokens_per_s"], weight_bytes, read_bandwidth(config.threads)))
        log("measuring resident memory, a long prompt, in a fresh process ...")
        cost.update(memory_cost(measure_memory(rt.root, list(config.providers or ()) or None, config.threads,
                                                dict(config.session_config), config.prepared)))

    answers = [answer_text(rt.tokenizer, a, rt.eos_token_ids) for a in ours]
    task = manifest.source.task or {}
    labels = task.get("labels") or ()
    task_figures = None
    if labels:
        same = [label_of(a, labels) == label_of(ex["answer"], labels) for a, ex in zip(answers, examples)]
        task_figures = {"name": task.get("name"), "label_agreement_vs_reference": float(np.mean(same))}

    if config.target is not None:
        from edgekd.device.config import to_dict
        from edgekd.device.targets import load_gates

        gates_obj, name = load_gates(config.target)
        gates, gates_from = to_dict(gates_obj), f"the target profile {name} (--target {config.target})"
    else:
        gates = manifest.gates
        gates_from = f"the bundle's own manifest (target {manifest.target_name})"
    wanted = {k: v for k, v in gates.items() if v is not None}
    report = BundleReport(
        bundle=str(rt.root.resolve()), target=manifest.target_name,
        environment={**environment(config.threads, rt.session.get_providers()), "session_config": rt.session_config},
        fidelity={"reference": {**figures, "model": manifest.source.spec}}, task=task_figures, cost=cost,
        examples=[{"prompt": ex["prompt"], "reference": ex["answer"], "bundle": a} for ex, a in zip(examples[:4], answers)],
        gates_from=gates_from, not_checked=sorted(k for k in wanted if k not in CHECKED_HERE),
        details={"golden": {"prompts": len(examples), "answer_tokens": n, "top_k": golden.get("top_k"),
                            "prompts_from": golden.get("prompts_from"), "tokenizer_mismatches": mismatched},
                 "kl_per_position": [round(k, 6) for k in kls]},
    )
    if mismatched:  # an app on this machine would send the model other ids than the export measured
        report.problems.append(
            f"{len(mismatched)} of {len(examples)} golden prompts tokenize differently here than at export "
            f"(examples {', '.join(map(str, mismatched[:5]))}): this machine's tokenizers or jinja2 renders the "
            "bundle's tokenizer or chat template differently")
    report.judge({k: v for k, v in wanted.items() if k in CHECKED_HERE})
    return report
