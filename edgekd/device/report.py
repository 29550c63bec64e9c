"""What ``edgekd validate`` writes and prints: ``report.json``, ``report.md``, PNG plots and a rich
table, one column per bundle (side by side when several are given)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.device.errors import UsageError
from edgekd.device.gates import metric
from edgekd.device.io import atomic_write_bytes, write_json
from edgekd.device.metrics import METRICS


def _fmt(value: Any, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def metric_rows(reports: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for m in METRICS:
        values = [metric(r, *m.path) for r in reports]
        if all(v is None for v in values):
            continue
        label = m.label
        if m.path == ("cost", "prefill_ms"):
            label = f"prefill (ms, {reports[0]['cost'].get('prefill_tokens', 128)} tokens)"
        rows.append([label] + [_fmt(v, m.fmt) for v in values])
    return rows


def gate_rows(reports: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row per gate name: threshold, then value and PASS/FAIL per bundle."""
    names: list[str] = []
    for r in reports:
        names += [g["name"] for g in r["gates"] if g["name"] not in names]
    rows = []
    for name in names:
        row = [name]
        for r in reports:
            g = next((g for g in r["gates"] if g["name"] == name), None)
            if g is None:
                row.append("–")
            else:
                value = "n/a" if g["value"] is None else f"{g['value']:.4g}"
                op = ">=" if name.startswith("min_") else "<="
                row.append(f"{'PASS' if g['passed'] else 'FAIL'} {value} ({op} {g['threshold']:g})")
        rows.append(row)
    return rows


def confusion_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """A labelled task's confusion matrix (rows: the teacher's label; columns: the bundle's), with
    each row's agreement: ``(header, rows)``, or None for a task without labels."""
    confusion = (report.get("task") or {}).get("label_confusion")
    if not confusion:
        return None
    answers = list(next(iter(confusion.values())))
    per_label = report["task"].get("label_agreement_per_label") or {}
    rows = [[f"teacher: {t}", *(str(row[a]) for a in answers), _fmt(per_label.get(t), "{:.3f}")] for t, row in confusion.items()]
    return ["", *(f"bundle: {a}" for a in answers), "agreement"], rows


def verdict_text(cell: str):
    """A table cell as Rich text (never markup: it may quote a path), PASS in green, FAIL in red."""
    import re

    from rich.text import Text

    text = Text(cell)
    for m in re.finditer(r"\b(PASS|FAIL)\b", cell):
        text.stylize("green" if m.group() == "PASS" else "red", m.start(), m.end())
    return text


def rich_tables(reports: Sequence[dict[str, Any]]):
    from rich.table import Table

    names = [r["name"] for r in reports]
    metrics = Table(title="edgekd validate")
    metrics.add_column("metric", style="bold")
    for n in names:
        metrics.add_column(n, justify="right")
    for row in metric_rows(reports):
        metrics.add_row(*row)
    gates = Table(title="gates (from each bundle's target)")
    gates.add_column("gate", style="bold")
    for n in names:
        gates.add_column(n)
    for row in gate_rows(reports):
        gates.add_row(row[0], *[verdict_text(c) for c in row[1:]])
    tables = [metrics]
    for r in reports:  # a labelled task: which labels the bundle gets wrong, and how
        confusion = confusion_table(r)
        if confusion:
            t = Table(title=f"labels, {r['name']}: the teacher's (rows) against the bundle's (columns)")
            for col in confusion[0]:
                t.add_column(col, justify="right")
            for row in confusion[1]:
                t.add_row(*row)
            tables.append(t)
    return [*tables, gates]


def markdown(reports: Sequence[dict[str, Any]], command: str | None = None) -> str:
    names = [r["name"] for r in reports]

    def table(header: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)

    parts = ["# edgekd validate report", ""]
    if command:
        parts += [f"Command: `{command}`", ""]
    for r in reports:
        parts.append(
            f"- **{r['name']}** ({r['bundle']}): target `{r['target']}`, providers {', '.join(r['providers'])}; "
            f"reference `{r['reference']}`, teacher `{r['teacher']}`; {r['data']['prompts']} prompts from "
            f"{r['data']['source']}, answers of up to {r['data']['answer_tokens']} tokens ({r['data']['answers_from']})"
        )
        env = r.get("environment")
        if env:
            parts.append(f"  - measured on {env['cpu']} ({env['machine']}, {env['cpu_count']} CPUs, threads: {env['threads']}), "
                         f"edgekd {env['edgekd']}, onnxruntime {env['onnxruntime']}, torch {env.get('torch')}, Python {env['python']}")
        if r.get("model_sha256"):
            parts.append(f"  - model file SHA-256 `{r['model_sha256']}`")
        cost = r.get("cost") or {}
        if cost.get("teacher_fp32_mb"):
            ref = f", {cost['size_mb'] / cost['reference_fp32_mb']:.0%} of the reference's fp32 export ({cost['reference_fp32_mb']:.1f} MB)" if cost.get("reference_fp32_mb") else ""
            parts.append(f"  - model {cost['size_mb']:.1f} MB: {cost['size_vs_teacher_fp32']:.0%} of the teacher at fp32 ({cost['teacher_fp32_mb']:.1f} MB){ref}")
        if cost.get("memory"):
            from edgekd.device.speed import memory_line

            parts.append(f"  - {memory_line(cost['memory'])}")
        ci = [f"{label} {lo:.3f}-{hi:.3f}" for label, (lo, hi) in _intervals(r)]
        if ci:
            parts.append(f"  - 95% intervals (over prompts; {r['data']['prompts']} prompts): " + "; ".join(ci))
        if r.get("gates_from"):
            parts.append(f"  - gates from {r['gates_from']}")
        for note in r.get("notes", []):
            parts.append(f"  - note: {note}")
        for warning in r.get("warnings", []):
            parts.append(f"  - warning: {warning}")
    parts += ["", table(["metric"] + names, metric_rows(reports)), ""]
    for r in reports:
        confusion = confusion_table(r)
        if confusion:
            parts += [f"## Labels, {r['name']}: the teacher's against the bundle's", "", table(*confusion), ""]
    gates = gate_rows(reports)
    if gates:
        parts += ["## Gates", "", table(["gate"] + names, gates), ""]
    from edgekd.device.bundle_report import BundleReport
    from edgekd.device.gates import verdict_lines

    parts += ["## Plots", "", "![How far the bundle drifts, per token](kl_per_position.png)", "",
              "![Where along the answer the bundle drifts](kl_along_answer.png)", ""]
    verdicts = ", ".join(f"{r['name']}: {'PASS' if r['passed'] else 'FAIL'}" for r in reports)
    parts += ["## Verdict", "", f"Verdict: {verdicts}", ""] + [f"- {line}" for r in reports for line in verdict_lines(BundleReport.from_json(r))] + [""]
    for r in reports:
        if r.get("examples"):
            parts += [f"## Answers side by side ({r['name']}, first {len(r['examples'])} held-out prompts, greedy)", ""]
            rows = [[_cell(e["prompt"]), _cell(e["teacher"]), _cell(e["reference"]), _cell(e["bundle"])] for e in r["examples"]]
            parts += [table(["prompt", "teacher", "reference", "bundle"], rows), ""]
    return "\n".join(parts)


def _intervals(report: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """The 95% intervals a report carries, labelled as the table rows are."""
    out = []
    for side in ("reference", "teacher"):
        fid = (report.get("fidelity") or {}).get(side) or {}
        for key, label in (("top1_ci95", f"top-1 vs {side}"), ("kl_mean_ci95", f"mean KL vs {side}"), ("greedy_exact_ci95", f"greedy exact vs {side}")):
            if fid.get(key):
                out.append((label, fid[key]))
    task = report.get("task") or {}
    if task.get("label_agreement_ci95"):
        out.append(("label agreement vs teacher", task["label_agreement_ci95"]))
    return out


def _cell(text: str, limit: int = 160) -> str:
    """Text for a Markdown table cell: one line, pipes escaped, long text shortened."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kl(path: Path, kls: dict[str, list[np.ndarray]], gate: float | None = None) -> None:
    """Histogram of per-position KL(reference || bundle), one series per bundle, each mean marked,
    and the target's gate on the mean KL (``max_kl_vs_reference``) where there is one."""
    plt = _pyplot()
    flat = {name: np.clip(np.concatenate(parts) if parts else np.zeros(0), 1e-6, None) for name, parts in kls.items()}
    positions = sum(k.size for k in flat.values())
    prompts = max((len(parts) for parts in kls.values()), default=0)
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    values = np.concatenate([k for k in flat.values() if k.size]) if positions else np.array([1e-6, 1.0])
    lo, hi = max(float(values.min()), 1e-6), max(float(values.max()), 1e-5)
    bins = np.logspace(np.log10(lo) - 0.05, np.log10(hi) + 0.05, 40)
    for i, (name, kl) in enumerate(flat.items()):
        color = f"C{i}"
        ax.hist(kl, bins=bins, alpha=0.55, color=color, label=f"{name} (mean {kl.mean():.4f})" if kl.size else name)
        if kl.size:
            ax.axvline(kl.mean(), color=color, linestyle="--", linewidth=1.2)
    if gate is not None:
        ax.axvline(gate, color="red", linewidth=1.5, label=f"gate on the mean: <= {gate:g}")
    ax.set_xscale("log")
    ax.set_xlabel("KL(reference || bundle) at one answer position, nats (log scale; 0 drawn at 1e-6)")
    ax.set_ylabel("answer positions")
    ax.set_title(f"How far the bundle drifts from the reference, per token ({positions} positions, {prompts} prompts)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_kl_along_answer(path: Path, kls: dict[str, list[np.ndarray]], gate: float | None = None) -> None:
    """Mean KL(reference || bundle) at each answer position (over the prompts whose answer reaches
    it): where along the answer the bundle drifts."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    longest = max((len(k) for parts in kls.values() for k in parts), default=0)
    for i, (name, parts) in enumerate(kls.items()):
        x, mean, p90 = [], [], []
        for pos in range(longest):
            at = [float(k[pos]) for k in parts if len(k) > pos]
            if at:
                x.append(pos + 1)
                mean.append(float(np.mean(at)))
                p90.append(float(np.percentile(at, 90)))
        ax.plot(x, mean, marker="o", markersize=3, color=f"C{i}", label=f"{name}: mean")
        ax.fill_between(x, 0, p90, color=f"C{i}", alpha=0.15, label=f"{name}: 90th percentile")
    if gate is not None:
        ax.axhline(gate, color="red", linewidth=1.2, label=f"gate on the overall mean: <= {gate:g}")
    ax.set_xlabel("answer position (token)")
    ax.set_ylabel("KL(reference || bundle), nats")
    ax.set_xlim(0.5, max(longest, 1) + 0.5)
    ax.set_ylim(bottom=0)
    ax.set_title("Where along the answer the bundle drifts from the reference", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_size_vs_agreement(path: Path, reports: Sequence[dict[str, Any]]) -> None:
    """Bundle size against top-1 agreement with the teacher, one point per bundle."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in reports:
        x, y = r["cost"]["size_mb"], r["fidelity"]["teacher"]["top1"]
        ax.scatter([x], [y])
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("top-1 agreement with the teacher")
    ax.set_title("Size against agreement")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


REPORT_FORMAT = "edgekd-report"  # report.json's marker: the folder is a report edgekd may replace


def check_out(out: Path, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output that is a file, ``/``, home, a bundle being validated (or a folder holding
    one), a non-empty folder that is not an earlier edgekd report (read from its report.json's
    marker, not its name: it is not ours to overwrite), or a folder that cannot be written.
    Checked before any work starts."""
    from edgekd.device.outputs import REPORT, check_writable, edgekd_output, refuse_unsafe_out

    out = Path(out)
    refuse_unsafe_out(out, inputs)
    if out.is_dir() and any(out.iterdir()) and edgekd_output(out) != REPORT:
        raise UsageError(f"{out} is not empty and holds no earlier report of edgekd's (a report.json it wrote): choose another --out")
    check_writable(out)


def write_report(out: Path, reports: Sequence[dict[str, Any]], kls: dict[str, list[np.ndarray]], command: str | None = None) -> list[Path]:
    """Write report.json, report.md and the plots into ``out`` (a new folder, or an earlier report
    replaced in one rename once the new one is complete); return the paths written."""
    from edgekd.device.outputs import REPORT, atomic_dir

    with atomic_dir(out, overwrite=True, kind=REPORT) as tmp:  # refuses a folder that is no report of ours
        written = _write_report_files(tmp, reports, kls, command)
    return [Path(out) / p.name for p in written]


def _write_report_files(out: Path, reports: Sequence[dict[str, Any]], kls: dict[str, list[np.ndarray]], command: str | None) -> list[Path]:
    written = []
    gate = (reports[0].get("plots") or {}).get("kl_gate") if reports else None
    for name, fn in (("kl_per_position.png", plot_kl), ("kl_along_answer.png", plot_kl_along_answer)):
        fn(out / name, kls, gate)
        written.append(out / name)
    if len(reports) > 1:
        plot = out / "size_vs_agreement.png"
        plot_size_vs_agreement(plot, reports)
        written.append(plot)
    atomic_write_bytes(out / "report.md", markdown(reports, command).encode())
    written.append(out / "report.md")
    verdict = all(r["passed"] for r in reports)
    write_json(out / "report.json", {"format": REPORT_FORMAT, "passed": verdict, "command": command, "bundles": list(reports)})
    written.append(out / "report.json")
    return written
