"""``search_export``: the search, top to bottom (``edgekd.search`` describes it), and its table."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekd.device.errors import EdgekdError, UsageError
from edgekd.export.profile import Candidate, resolve_candidates
from edgekd.search.results import NoCandidatePasses, SearchResult, Tried, _beaten, _over_budget, _pick, model_digest
from edgekd.search.sensitivity import measure_sensitivity

MAX_ROUNDS = 3  # validations of the mixed-precision candidate (bisecting the number of 8-bit layers)


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

    The stages: every fixed candidate exported and validated together -> each mixed-precision
    candidate, its layers' sensitivity measured and the number of 8-bit layers bisected on the real
    gates (``_Search.mixed_precision``) -> the smallest passing bundle moved into ``out``.
    """
    from edgekd.device.outputs import BUNDLE, check_output_dir, make_work_dir
    from edgekd.export import graph_notes
    from edgekd.export.profile import TargetProfile, load_target
    from edgekd.models import load_model, resolve_source
    from edgekd.validate import ValidateConfig

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
    check_output_dir(out, overwrite, inputs, kind=BUNDLE)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = make_work_dir(out.parent, f".{out.name}.search-")
    try:
        say(f"loading {model}")
        torch_model, tok = load_model(source, trust_remote_code=trust_remote_code)
        search = _Search(model, profile, vcfg, work, torch_model, tok, trust_remote_code, say, graph_notes(source, torch_model))
        tried = [search.export(c, c.profile, c.name) for c in cands if not c.mixed_precision]
        search.check(tried)
        sensitivity: dict[str, dict] = {}
        for c in (c for c in cands if c.mixed_precision):
            beaten = _beaten(c, cands, tried)
            if beaten:
                say(f"{c.name}: skipped: {beaten}")
                tried.append(Tried(c.name, c.description, c.overrides, None, skipped=beaten))
                continue
            sensitivity[c.name] = search.mixed_precision(c, tried)
        best = _pick(tried)
        result = SearchResult(profile.name, tried, best.name if best else None,
                              tried.index(best) if best else None, out if best else None, sensitivity,
                              vcfg.record(), time.time() - t0)
        if best is None:
            raise NoCandidatePasses(f"no candidate of target {profile.name!r} passes its gates; {result.closest()}", result)
        _keep(best, result, profile, out, overwrite, inputs)
        say(f"kept {best.name}: {out}")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _Search:
    """What the candidates of one search share: the model loaded once, one fp32 export per opset,
    the reference's golden answers (made by the first export), and the validations so far."""

    def __init__(self, model: str, profile, vcfg, work: Path, torch_model, tok, trust_remote_code: bool,
                 say: Callable[[str], None], notes: dict[str, Any] | None = None):
        self.model, self.profile, self.vcfg, self.work, self.notes = model, profile, vcfg, work, notes
        self.torch_model, self.tok, self.trust_remote_code, self.say = torch_model, tok, trust_remote_code, say
        self.fp32: dict[int, Path] = {}
        self.golden: dict[str, Any] | None = None
        self.rounds = 0
        self.seen: dict[str, Tried] = {}  # model digest -> the first candidate exported with it

    def fp32_for(self, prof) -> Path:
        """The fp32 ONNX at ``prof``'s opset, exported once and shared by the candidates."""
        from edgekd.export.onnx import export_onnx

        if prof.opset not in self.fp32:
            self.say(f"exporting the fp32 ONNX once (opset {prof.opset})")
            self.fp32[prof.opset] = export_onnx(self.torch_model, self.work / f"fp32-opset{prof.opset}", prof.opset, self.notes)
        return self.fp32[prof.opset]

    def export(self, cand: Candidate, prof, tag: str) -> Tried:
        """``cand`` exported with ``prof`` through export's own door; a failed export is a result, not an error."""
        from edgekd.export import export_bundle

        bundle = self.work / "bundles" / tag
        try:
            export_bundle(self.model, prof, bundle, trust_remote_code=self.trust_remote_code, fp32_onnx=self.fp32_for(prof),
                          log=lambda m: self.say(f"{tag}: {m}"), golden=self.golden)
            if self.golden is None and (bundle / "golden.json").is_file():
                self.golden = json.loads((bundle / "golden.json").read_text(encoding="utf-8"))
            return Tried(cand.name, cand.description, cand.overrides, bundle)
        except EdgekdError as e:
            self.say(f"{tag}: export failed: {e}")
            return Tried(cand.name, cand.description, cand.overrides, None, error=str(e))

    def check(self, tried: list[Tried]) -> None:
        """Validate what ``tried`` has not yet, together (the models load once). The same model
        files reuse one validation; a bundle over the size budget is not validated."""
        from edgekd.validate import validate

        todo, copies = [], []
        for t in tried:
            if t.bundle is None or t.report is not None:
                continue
            first = self.seen.setdefault(model_digest(t.bundle), t)
            over = _over_budget(t.bundle, self.profile.gates.max_size_mb)
            if first is not t:  # the same model files: one validation speaks for both
                self.say(f"{t.name}: the same model files as {first.name}: its validation is reused")
                t.same_as = first.name
                copies.append((t, first))
            elif over is not None:  # cannot pass whatever it measures: not worth validating
                self.say(f"{t.name}: {over.cost['size_mb']:.1f} MB is over max_size_mb: not validated")
                t.report = over
            else:
                todo.append(t)
        if todo:
            self.rounds += 1
            self.say(f"validating {', '.join(t.name for t in todo)} on the held-out set")
            reports, _ = validate([t.bundle for t in todo if t.bundle is not None], self.vcfg,
                                  out=self.work / f"report-{self.rounds}", log=self.say)
            for t, r in zip(todo, reports):
                t.report = r
        for t, first in copies:
            t.report = first.report

    def mixed_precision(self, c: Candidate, tried: list[Tried]) -> dict[str, Any]:
        """Sensitivity, then as few 8-bit layers as the gates allow: start where the proxy says,
        then bisect on the real gates (fewer 8-bit layers after a pass, more after a failure) for
        at most ``MAX_ROUNDS`` validations. Appends each try to ``tried``; returns the sensitivity."""
        sens = measure_sensitivity(c, self.fp32_for(c.profile), self.torch_model, self.tok, self.work / f"sens-{c.name}", self.say)
        n, k = len(sens.order), sens.first_k
        failing, passing = -1, None  # the most 8-bit layers known to fail, the fewest known to pass
        for _ in range(MAX_ROUNDS):
            prof = c.profile.with_settings(matmul_nbits=dataclasses.replace(
                c.profile.settings["matmul_nbits"], int8_nodes=sens.int8_nodes(k)))
            t = self.export(c, prof, f"{c.name}-{k}")
            t.int8_layers = sorted(sens.order[:k])
            self.check([t])
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
        return sens.record()


def _keep(best: Tried, result: SearchResult, profile, out: Path, overwrite: bool, inputs: tuple) -> None:
    """Move the kept candidate's bundle into ``out`` and record the search in its manifest."""
    from edgekd.device.bundle import MANIFEST
    from edgekd.device.io import read_json, write_json
    from edgekd.device.outputs import BUNDLE, atomic_dir

    assert best.bundle is not None  # a passing candidate was exported
    with atomic_dir(out, overwrite, inputs, kind=BUNDLE) as tmp:
        for p in best.bundle.iterdir():
            os.replace(p, tmp / p.name)
        os.chmod(tmp, os.stat(best.bundle).st_mode & 0o777)
        manifest = read_json(tmp / MANIFEST)
        # manifest.json is not among the hashed files: adding a key keeps read_manifest's check.
        manifest["search"] = {**result.record(), "profile": profile.to_dict()}
        write_json(tmp / MANIFEST, manifest)


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
            assert t.report is not None  # neither skipped nor failed to export: it was validated
            verdict = "FAIL " + "; ".join(g.line() for g in t.report.failed)
            if not t.report.validated:
                verdict += " (not validated)"
        if t.same_as:
            verdict += f" (the same model as {t.same_as})"
        rows.append([name, fmt(t.metric("cost", "size_mb"), "{:.1f}"), fmt(t.metric("cost", "decode_tokens_per_s"), "{:.1f}"),
                     fmt(t.metric("fidelity", "reference", "top1"), "{:.3f}"),
                     fmt(t.metric("fidelity", "reference", "kl_mean"), "{:.4f}"), verdict])
    return rows
