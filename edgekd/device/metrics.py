"""Every number a bundle report carries, in one table: where it is, how it is shown, whether and
how it is gated, and whether a golden replay on the device (``edgekd check``) can answer it.

The gates (``validate/gates.py``), the report's rows (``validate/report.py``) and what
``edgekd check`` applies (``check.py``) all derive from ``METRICS``. Adding a metric is a scoring
function that puts the number in the report and a row here; a gate on it adds its field to
``targets.Gates`` (a test checks that the two agree).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Metric:
    path: tuple[str, ...]  # where it is in a bundle report: ("fidelity", "reference", "top1")
    label: str  # the row's label in the report's tables
    fmt: str = "{:.3f}"
    gate: str | None = None  # the gate on it: "min_..." fails below the threshold, "max_..." above
    meaning: str = ""  # what the gate checks, said in its verdict line
    on_device: bool = False  # a golden replay answers it (edgekd check applies the gate)

    @property
    def direction(self) -> str:
        return "min" if (self.gate or "").startswith("min_") else "max"


def _fid(side: str, key: str, label: str, fmt: str = "{:.3f}", **gate) -> Metric:
    return Metric(("fidelity", side, key), label, fmt, **gate)


def _task(key: str, label: str, fmt: str = "{:.3f}", **gate) -> Metric:
    return Metric(("task", *key.split(".")), f"task: {label}", fmt, **gate)


def _cost(key: str, label: str, fmt: str, **gate) -> Metric:
    return Metric(("cost", key), label, fmt, **gate)


METRICS: tuple[Metric, ...] = (
    # the bundle against the model it was exported from (export's gates)
    _fid("reference", "top1", "top-1 vs reference", gate="min_top1_vs_reference", meaning="top-1 agreement with the reference", on_device=True),
    _fid("reference", "kl_mean", "mean KL vs reference", "{:.4f}", gate="max_kl_vs_reference", meaning="mean KL(reference || bundle), nats", on_device=True),
    _fid("reference", "kl_p95", "p95 KL vs reference", "{:.4f}"),
    _fid("reference", "ppl_bundle", "perplexity (bundle)", "{:.2f}"),
    _fid("reference", "ppl_model", "perplexity (reference)", "{:.2f}"),
    _fid("reference", "ppl_ratio", "ppl ratio vs reference", gate="max_ppl_ratio_vs_reference", meaning="perplexity ratio bundle / reference", on_device=True),
    _fid("reference", "max_abs_logit_error", "max abs logit error vs reference"),
    _fid("reference", "greedy_exact", "greedy exact match vs reference", "{:.2f}", gate="min_greedy_exact_vs_reference",
         meaning="share of prompts whose greedy answer is the reference's, token for token", on_device=True),
    _fid("reference", "greedy_prefix_tokens", "greedy common prefix vs reference (tokens)", "{:.1f}", gate="min_greedy_prefix_vs_reference",
         meaning="mean common prefix (tokens) of greedy answers with the reference", on_device=True),
    # the bundle against the teacher (does the job the way the teacher does)
    _fid("teacher", "top1", "top-1 vs teacher", gate="min_top1_vs_teacher", meaning="top-1 agreement with the teacher"),
    _fid("teacher", "kl_mean", "mean KL vs teacher", "{:.4f}", gate="max_kl_vs_teacher", meaning="mean KL(teacher || bundle), nats"),
    _fid("teacher", "kl_p95", "p95 KL vs teacher", "{:.4f}"),
    _fid("teacher", "ppl_model", "perplexity (teacher)", "{:.2f}"),
    _fid("teacher", "ppl_ratio", "ppl ratio vs teacher", gate="max_ppl_ratio_vs_teacher", meaning="perplexity ratio bundle / teacher"),
    _fid("teacher", "greedy_exact", "greedy exact match vs teacher", "{:.2f}"),
    _fid("teacher", "greedy_prefix_tokens", "greedy common prefix vs teacher (tokens)", "{:.1f}"),
    # a task's figures (edgekd.device.tasks.score_answers), each beside the baseline a trivial answerer scores
    _task("label_agreement", "label agreement vs teacher", gate="min_label_agreement_vs_teacher",
          meaning="share of held-out prompts whose answer names the teacher's label"),
    _task("balanced_label_agreement", "balanced label agreement vs teacher", gate="min_balanced_label_agreement_vs_teacher",
          meaning="mean over the teacher's labels of the share answered with that label (a constant answer scores 1 / labels)"),
    _task("majority_baseline", "a constant answer of the teacher's majority label"),
    # how decided the teacher's own labels were (tasks.label_margins): a near-tie flips with any copy of it
    _task("teacher_decided_share", "teacher's labels decided (margin >= 1 nat)"),
    _task("label_agreement_teacher_decided", "label agreement where the teacher decided"),
    _task("label_agreement_teacher_near_tie", "label agreement on the teacher's near-ties"),
    _task("truth.accuracy", "accuracy vs the records' labels"),
    _task("truth.teacher_accuracy", "teacher accuracy vs the records' labels"),
    _task("truth.teacher_bare_accuracy", "uncalibrated teacher accuracy vs the records' labels"),
    _task("truth.accuracy_gain_vs_bare_teacher", "accuracy gain vs the uncalibrated teacher", gate="min_accuracy_gain_vs_bare_teacher",
          meaning="the bundle's accuracy minus the uncalibrated teacher's, against the held-out records' own labels"),
    _task("truth.teacher_auc", "teacher's ranking vs the records' labels (AUC of its label score)"),
    _task("truth.majority_baseline", "a constant answer's accuracy vs the records' labels"),
    _task("truth.accuracy_drop_vs_teacher", "accuracy drop vs the teacher", gate="max_accuracy_drop_vs_teacher",
          meaning="the teacher's accuracy minus the bundle's, against the held-out records' own labels"),
    _task("truth.rouge_l", "ROUGE-L vs the records' references"),
    _task("truth.teacher_rouge_l", "teacher ROUGE-L vs the references"),
    _task("exact_match", "exact answer vs teacher", gate="min_exact_match_vs_teacher",
          meaning="share of held-out prompts answered with the teacher's exact text"),
    _task("rouge_l", "ROUGE-L vs teacher", gate="min_rouge_l_vs_teacher", meaning="mean ROUGE-L F1 of the answers against the teacher's"),
    _task("baseline_input_rouge_l", "ROUGE-L of the input copied (baseline)"),
    _task("baseline_first_sentence_rouge_l", "ROUGE-L of its first sentence (baseline)"),
    # what it costs
    _cost("size_mb", "model size (MB)", "{:.1f}", gate="max_size_mb", meaning="model file(s) size, MB (1e6 bytes)", on_device=True),
    _cost("size_vs_teacher_fp32", "size / teacher at fp32", "{:.0%}"),
    _cost("bundle_mb", "bundle size (MB)", "{:.1f}"),
    _cost("load_s", "load time (s)", "{:.2f}"),
    _cost("prefill_ms", "prefill (ms, 128 tokens)", "{:.1f}"),
    _cost("decode_tokens_per_s", "decode (tokens/s, batch 1)", "{:.1f}", gate="min_decode_tokens_per_s",
          meaning="decode tokens/s at batch 1 on this machine", on_device=True),
    # decode reads every weight once a token: its limit is the read bandwidth over those bytes (validate.speed.roofline)
    _cost("decode_weight_mb", "weights read a decode step (MB)", "{:.1f}"),
    _cost("read_bandwidth_gb_s", "read bandwidth (GB/s, measured)", "{:.1f}"),
    _cost("decode_roofline_tokens_per_s", "decode roofline (tokens/s)", "{:.0f}"),
    _cost("decode_roofline_share", "decode, share of the bandwidth roofline", "{:.0%}"),
    # resident memory while the bundle answers a 480-token prompt (validate.speed.memory_by_stage, a fresh process)
    _cost("peak_rss_mb", "peak RSS (MB, the process)", "{:.0f}"),
    _cost("bundle_peak_rss_mb", "peak RSS above the bare interpreter (MB)", "{:.0f}", gate="max_peak_rss_mb",
          meaning="peak resident memory the bundle adds to its process answering a 480-token prompt, MB (1e6 bytes)",
          on_device=True),
    _cost("peak_rss_over_model", "peak RSS above the interpreter / model file", "{:.2f}"),
)

# gate name -> (where the value is in a bundle report, "min" or "max", what it means)
GATES: dict[str, tuple[tuple[str, ...], str, str]] = {m.gate: (m.path, m.direction, m.meaning) for m in METRICS if m.gate}
# the gates a golden reference answers on the device; the others need the teacher or PyTorch
CHECKED_HERE: tuple[str, ...] = tuple(m.gate for m in METRICS if m.gate and m.on_device)
# a task's figures also measured for the reference against the teacher (what the student's bundle is compared with)
TASK_FIGURES: tuple[str, ...] = tuple(m.path[1] for m in METRICS if m.path[0] == "task" and len(m.path) == 2 and m.gate)
TASK_GATES: tuple[str, ...] = tuple(m.gate for m in METRICS if m.gate and m.path[0] == "task")
