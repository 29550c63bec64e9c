"""``edgekd export``: a model -> a bundle an app can ship, tuned for a target profile.

Top to bottom: load the profile and the model; export fp32 ONNX with the KV cache and check it
against PyTorch; run the profile's steps (each ``path in -> path out``); check the final model
against PyTorch; write model, tokenizer, configs, ``genai_config.json`` and ``manifest.json`` into a
temporary folder that replaces ``out`` only when everything succeeded.

``manifest["source"]``: ``spec`` (absolute path for a folder or file, the name for a known teacher
or hub id), ``kind``, ``sha256``; ``teacher`` and ``heldout`` come from the model folder's
``distill.json`` (written by ``edgekd distill``). For a model that was not distilled, ``teacher`` is
the model's own spec (it is its own teacher: validate compares against it) and ``heldout`` is null.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekd import __version__
from edgekd.device.bundle import QatGrid
from edgekd.device.errors import EdgekdError, UsageError

if TYPE_CHECKING:  # loaded where used: `edgekd check` imports this package, and needs no export step
    from edgekd.export.profile import TargetProfile

__all__ = ["export_bundle", "graph_notes", "run_steps", "source_info", "summary"]

MODEL_FILE = "model.onnx"
GOLDEN_PROMPTS = 16  # held-out prompts in the golden reference (edgekd check replays them on the device)
GOLDEN_ANSWER_TOKENS = 32  # answer tokens per golden prompt when the model's task does not say
ORT_FILE = "model.ort"


def _onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def source_info(source) -> dict[str, Any]:
    """The manifest's ``source`` table (see the module docstring); a quantization-aware student's grid
    stays a ``QatGrid`` here, for the steps to be asked about, and ``_manifest`` writes its table."""
    from edgekd.models import KNOWN_TEACHERS

    if source.spec in KNOWN_TEACHERS or source.kind == "hub":
        spec = source.spec
    else:
        spec = str(Path(source.spec).expanduser().resolve())
    teacher, heldout, qat, task = spec, None, None, None
    if source.kind == "folder":
        from edgekd.distill.run import StudentRun

        run = StudentRun(source.path).result()
        if run is not None:
            teacher, qat, task = run.teacher, run.quantization_aware, run.task
            heldout = str(run.heldout) if run.heldout else None
    info = {"spec": spec, "kind": source.kind, "sha256": source.fingerprint(), "teacher": teacher, "heldout": heldout}
    if task:
        info["task"] = task  # validate scores the task against the teacher and applies its gates
    return {**info, "quantization_aware": qat} if qat else info  # a QatGrid until the manifest is written


def graph_notes(source, torch_model) -> dict[str, Any] | None:
    """What the exported graph should carry about where its weights came from: a GGUF's weight
    types (``grid.GGUF_TYPES``; the matmul_nbits step keeps each type's grid)."""
    if source.kind != "gguf":
        return None
    from edgekd.export.grid import GGUF_TYPES, gguf_weight_types

    return {GGUF_TYPES: gguf_weight_types(source.path, torch_model)}


def reproduces_qat_grid(profile: TargetProfile, qat: QatGrid, steps_run: list[dict[str, Any]] | None = None) -> bool:
    """Whether ``profile`` keeps a ``--qat-bits`` student's weights on the grid it was trained on:
    every step's answer (``StepSettings.reproduces_qat_grid``), given what it reported where it ran
    (``steps_run``: the recipe's entries). Weights no step touches stay exact."""
    reports = {r["step"]: r for r in steps_run or ()}
    return all((s := profile.step_settings(name)) is None or s.reproduces_qat_grid(qat, reports.get(name)) for name in profile.steps)


def _io_table(sess) -> tuple[list[dict], list[dict]]:
    dtypes = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32"}

    def rows(items):
        return [{"name": x.name, "dtype": dtypes.get(x.type, x.type),
                 "shape": [d if isinstance(d, int) else str(d) for d in x.shape]} for x in items]

    return rows(sess.get_inputs()), rows(sess.get_outputs())


def run_steps(path: Path, profile: TargetProfile, work: Path, say: Callable[[str], None] = lambda m: None):
    """Run the profile's steps on the ONNX model at ``path``, each writing under ``work``.
    Returns the final model's path and the recipe entries (settings + what each step reported)."""
    from edgekd.export.steps import run_step

    recipe = []
    for i, name in enumerate(profile.steps):
        say(f"step {i + 1}/{len(profile.steps)}: {name}")
        path, entry = run_step(name, path, Path(work) / f"{i + 1}-{name}", profile.step_settings(name), profile)
        recipe.append(entry)
    return path, recipe


def export_bundle(
    model: str,
    target: str | Path,
    out: Path,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    log: Callable[[str], None] | None = None,
    fp32_onnx: Path | None = None,
    golden_prompts: int | None = None,
    golden: dict[str, Any] | None = None,
    golden_data: Path | None = None,
) -> dict[str, Any]:
    """Export ``model`` for ``target`` into the bundle folder ``out``; return the manifest.

    ``model``: a Hugging Face folder, a .gguf file, a cached hub id or a known teacher name.
    ``target``: ``cpu``, ``mobile``, ``cuda``, a path to a profile ``.toml``, or a ``TargetProfile``.
    ``fp32_onnx``: an fp32 export of this same model at the profile's opset, made earlier (the
    search reuses one across candidates); it is checked against PyTorch like a fresh export.
    ``golden_prompts``: held-out prompts in the bundle's golden reference for ``edgekd check``
    (0: none; None: ``GOLDEN_PROMPTS``), from ``golden_data`` (a jsonl of ``{"prompt"}``; default: the distillation's held-out
    split, else the shipped held-out prompts); ``golden``: one made earlier for this same model (the
    search reuses it).

    The stages: the fp32 ONNX, checked against PyTorch on a probe (``_fp32_probe``) -> the
    profile's steps (``run_steps``) -> the model, checked again (``_write_model``) -> tokenizer and
    configs (``_write_configs``) -> the golden reference (``_make_golden``, ``_write_golden``) -> the manifest, and
    the golden replayed through the bundle (``_replay_into_manifest``); all in a temporary folder
    that replaces ``out`` only when every stage passed.
    """
    from edgekd.device.bundle import write_manifest
    from edgekd.device.outputs import BUNDLE, atomic_dir, check_output_dir, output_lock, work_dir
    from edgekd.export.onnx import export_onnx, model_facts
    from edgekd.models import load_model, resolve_source

    say = log or (lambda msg: None)
    out = Path(out)
    from edgekd.export.profile import TargetProfile, load_target

    profile = target if isinstance(target, TargetProfile) else load_target(target)
    source = resolve_source(model)
    inputs = (source.path,) if source.path is not None else ()
    check_output_dir(out, overwrite, inputs, kind=BUNDLE)  # before minutes of work
    golden_prompts = GOLDEN_PROMPTS if golden_prompts is None else golden_prompts
    if golden_data is not None and golden_prompts > 0:
        from edgekd.device.data import load_records

        load_records(Path(golden_data), limit=1)  # a missing or malformed file fails now, not after the export
    origin = source_info(source)
    t0 = time.time()
    say(f"loading {model}")
    torch_model, tok = load_model(source, trust_remote_code=trust_remote_code)
    facts = model_facts(torch_model.config)

    with output_lock(out), work_dir("edgekd-export-") as work, atomic_dir(out, overwrite, inputs, kind=BUNDLE) as tmp:
        traced, changed = _before_export(torch_model, tok, source, profile, say)
        say(f"exporting to ONNX (opset {profile.opset}, KV cache, one merged decoder)")
        path = Path(fp32_onnx) if fp32_onnx is not None and not changed else \
            export_onnx(traced, work / "export", profile.opset, graph_notes(source, traced))
        probe = _fp32_probe(torch_model, tok, path, facts, profile, traced)
        del traced
        path, steps_run = run_steps(path, profile, work, say)
        for entry in steps_run:
            entry.update(changed.get(entry["step"], {}))
        _note_qat_and_context(origin, profile, steps_run, torch_model.config, facts, say)
        recipe = [{"step": "export", "task": "text-generation-with-past", "opset": profile.opset}, *steps_run]
        model_file = _model_file(path, profile)
        final, io_tables = _write_model(path, tmp, model_file, profile, probe, facts, say)
        tokenizer = _write_configs(torch_model, tok, tmp, facts, model_file, profile, say)
        if golden is None and golden_prompts > 0:
            golden = _make_golden(torch_model, tmp, origin, golden_prompts, golden_data, facts, say)
        if golden is not None:
            _write_golden(tmp, golden)
        manifest = write_manifest(tmp, _manifest(origin, profile, recipe, torch_model, tok, facts, tmp, model_file, io_tables,
                                                 probe, final, tokenizer, time.time() - t0))
        if golden is not None:
            _replay_into_manifest(manifest, tmp, golden, profile, say)
    _warn_over_budget(manifest, profile, say)
    return manifest


def _write_golden(tmp: Path, golden: dict[str, Any]) -> None:
    from edgekd.device.bundle import GOLDEN_FILE
    from edgekd.device.io import atomic_write_bytes

    atomic_write_bytes(tmp / GOLDEN_FILE, json.dumps(golden, separators=(",", ":")).encode())


def _warn_over_budget(manifest: dict[str, Any], profile: TargetProfile, say: Callable[[str], None]) -> None:
    model_bytes = manifest["export_check"]["model_bytes"]
    budget = profile.gates.max_size_mb
    if budget is not None and model_bytes / 1e6 > budget:
        say(f"warning: the model is {model_bytes / 1e6:.1f} MB, over the profile's size budget of {budget} MB")


def _before_export(torch_model, tok, source, profile: TargetProfile, say: Callable[[str], None]):
    """The PyTorch model the exporter traces: the model itself, or a copy a step changed first
    (``StepSettings.before_export``: GPTQ rounds the weights ``keep_grid`` then stores exactly).
    Returns (model, what each step that changed it did, by step name)."""
    changed: dict[str, dict] = {}
    for name in profile.steps:
        settings = profile.step_settings(name)
        if settings is not None:
            torch_model, info = settings.before_export(torch_model, tok, source, say)
            if info is not None:
                changed[name] = info
    return torch_model, changed


def _fp32_probe(torch_model, tok, path: Path, facts: dict[str, Any], profile: TargetProfile, traced=None) -> dict[str, Any]:
    """PyTorch's logits on a short probe, and the fp32 ONNX's against those of the model it was
    traced from (``traced``: a GPTQ-rounded copy; default ``torch_model``): an exporter that
    mis-traced the model fails here, before any step runs. The reference the bundle is checked
    against is ``torch_model``'s."""
    from edgekd.export.onnx import compare, ort_probe, probe_ids, session, torch_probe

    ids = probe_ids(tok)
    reference = torch_probe(torch_model, ids)
    next_ids = reference[:, ids.shape[1] - 1 : ids.shape[1]].argmax(-1).astype("int64")
    traced_ref = reference if traced is None or traced is torch_model else torch_probe(traced, ids, next_ids)
    fp32 = compare(traced_ref, ort_probe(session(path), ids, facts, next_ids))
    if fp32["max_abs_logit_diff"] > profile.check.atol_fp32:
        raise EdgekdError(
            f"the fp32 ONNX export differs from PyTorch by {fp32['max_abs_logit_diff']:.2g} logits "
            f"(> check.atol_fp32 = {profile.check.atol_fp32}): the exporter mis-traced this model"
        )
    return {"ids": ids, "reference": reference, "next_ids": next_ids, "fp32": fp32,
            "fp32_bytes": sum(p.stat().st_size for p in path.parent.glob("model.onnx*"))}


def _note_qat_and_context(origin: dict[str, Any], profile: TargetProfile, steps_run: list[dict[str, Any]], config,
                          facts: dict[str, Any], say: Callable[[str], None]) -> None:
    """What the steps imply for the manifest: whether they reproduce a quantization-aware
    student's grid, the context fused attention caps (its rotary tables; a sliding window), and
    whether the KV cache's past and present can share one buffer (attention fused in every layer)."""
    qat: QatGrid | None = origin.get("quantization_aware")
    if qat:
        origin["quantization_aware"] = dataclasses.replace(qat, reproduced_by_recipe=reproduces_qat_grid(profile, qat, steps_run))
    cap = min((r["context_length_cap"] for r in steps_run if r.get("context_length_cap")), default=None)
    window = getattr(config, "sliding_window", None)
    windowed = any(r.get("sliding_window_layers") for r in steps_run)  # the kernel applies the windows itself
    if cap and window and not windowed and getattr(config, "use_sliding_window", True) is not False:
        cap = min(cap, int(window))  # fused attention that sees the whole cache agrees only up to the window
    if cap and (facts["context_length"] or cap) > cap:  # fused attention's rotary tables end there
        say(f"context capped at {cap} tokens (fused attention)")
        facts["context_length"] = cap
    # every layer's attention one GroupQueryAttention node: it appends to the cache where it lies, so
    # past and present can be one buffer sized for the context (the runtime then keeps one copy)
    facts["past_present_share_buffer"] = any(r.get("fused_layers") == facts["num_layers"] for r in steps_run)


def _model_file(path: Path, profile: TargetProfile) -> str:
    """The model's name in the bundle: ``model.ort``, ``model.onnx``, or in the transformers.js layout
    ``onnx/model_<dtype>.onnx``."""
    from edgekd.export import bundle as files

    if path.suffix == ".ort":
        return ORT_FILE
    if profile.layout == "transformers.js":
        return files.web_model_file(files.web_dtype(profile.steps, profile.settings["matmul_nbits"].bits))
    return MODEL_FILE


def _write_model(path: Path, tmp: Path, model_file: str, profile: TargetProfile, probe: dict[str, Any],
                 facts: dict[str, Any], say: Callable[[str], None]) -> tuple[dict[str, Any], tuple[list, list]]:
    """The final model into the bundle, checked against PyTorch on the probe once more; returns
    that check and the model's input and output tables."""
    from edgekd.device.bundle import check_external_data
    from edgekd.export import bundle as files
    from edgekd.export.onnx import compare, ort_probe, session

    say(f"writing the bundle ({model_file})")
    written = files.copy_model(path, tmp, model_file, profile.external_data)
    size = sum((tmp / name).stat().st_size for name in written)
    if profile.layout == "transformers.js" and (size > files.WASM_MODEL_LIMIT or len(written) > 1):
        raise UsageError(f"the model is {size / 1e9:.2f} GB: a web bundle must stay under {files.WASM_MODEL_LIMIT / 1e9:.2f} GB, "
                         "what onnxruntime-web's 32-bit WebAssembly heap (4 GiB) holds with its session; export a smaller "
                         "student (edgekd distill --student layers:N) or fewer bits")
    if model_file.endswith(".onnx"):
        check_external_data(tmp / model_file)
    sess = session(tmp / model_file, profile.execution_providers)
    final = compare(probe["reference"], ort_probe(sess, probe["ids"], facts, probe["next_ids"]))
    if final["max_abs_logit_diff"] > profile.check.max_abs_logit_diff:
        raise EdgekdError(
            f"the exported model drifts from PyTorch by {final['max_abs_logit_diff']:.3g} logits on the probe "
            f"(> check.max_abs_logit_diff = {profile.check.max_abs_logit_diff} in {profile.name}): "
            "use a higher precision recipe or relax the check"
        )
    return final, _io_table(sess)


def _write_configs(torch_model, tok, tmp: Path, facts: dict[str, Any], model_file: str, profile: TargetProfile,
                   say: Callable[[str], None]) -> dict[str, Any]:
    """Tokenizer, configs, onnxruntime-genai's config and the JavaScript replay; returns the
    manifest's ``tokenizer`` table: what was changed in the decoder, and the SentencePiece model
    the runtime opens in less memory where there is one (``edgekd.export.sentencepiece``)."""
    from edgekd.export import bundle as files
    from edgekd.export.sentencepiece import write_sentencepiece

    files.write_tokenizer_and_configs(torch_model, tok, tmp)
    tokenizer_note = files.normalize_decoder(tmp)  # so onnxruntime-genai tokenizes as edgekd does
    if tokenizer_note:
        say(f"tokenizer: {tokenizer_note}")
    table: dict[str, Any] = {"decoder": tokenizer_note or "as the model's tokenizer has it"}
    spm = write_sentencepiece(tmp)
    if spm:
        table["sentencepiece"] = spm
        say(f"tokenizer: also as a SentencePiece model ({spm['file']}), the same ids on {spm['probes']} probe texts")
    files.write_genai_config(tmp, files.genai_config(facts, torch_model.config.model_type, model_file,
                                                     profile.execution_providers, tok.pad_token_id))
    files.write_js_check(tmp)
    if profile.layout == "transformers.js":
        files.write_transformers_js_config(tmp, files.web_dtype(profile.steps, profile.settings["matmul_nbits"].bits))
    return table


def _make_golden(torch_model, tmp: Path, origin: dict[str, Any], prompts: int, data: Path | None,
                 facts: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """The golden reference: the PyTorch model's greedy answers and top-k on held-out prompts."""
    from edgekd.export.golden import golden_records, make_golden

    records, where = golden_records(origin, prompts, data)
    n = (origin.get("task") or {}).get("validate_answer_tokens") or GOLDEN_ANSWER_TOKENS
    return make_golden(torch_model, tmp, records, n, facts["eos_token_ids"], where, say,
                       answer_prefix=(origin.get("task") or {}).get("answer_prefix") or "")


def _manifest(origin: dict[str, Any], profile: TargetProfile, recipe: list[dict[str, Any]], torch_model, tok,
              facts: dict[str, Any], tmp: Path, model_file: str, io_tables: tuple[list, list], probe: dict[str, Any],
              final: dict[str, Any], tokenizer: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The manifest's table (``write_manifest`` adds the files and their hashes)."""
    from edgekd.device.bundle import decode_weight_bytes

    model_bytes = sum(p.stat().st_size for p in tmp.glob(model_file + "*"))
    fp32_bytes = probe["fp32_bytes"]
    return {
        "edgekd_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {**origin, "quantization_aware": origin["quantization_aware"].table()} if origin.get("quantization_aware") else origin,
        "target": profile.to_dict(),
        "recipe": recipe,
        "model": {
            "file": model_file,
            "opset": profile.opset,
            "architecture": (torch_model.config.architectures or [type(torch_model).__name__])[0],
            "model_type": torch_model.config.model_type,
            "inputs": io_tables[0],
            "outputs": io_tables[1],
            **facts,
            "pad_token_id": tok.pad_token_id,
            "decode_weight_bytes": decode_weight_bytes(tmp / model_file),
        },
        "export_check": {
            "probe_tokens": int(probe["ids"].shape[1] + 1),
            "fp32_max_abs_logit_diff": probe["fp32"]["max_abs_logit_diff"],
            "max_abs_logit_diff": final["max_abs_logit_diff"],
            "top1_agreement": final["top1_agreement"],
            "fp32_model_bytes": fp32_bytes,
            "model_bytes": model_bytes,
            "size_ratio_vs_fp32": model_bytes / fp32_bytes,
            "seconds": round(seconds, 1),
            "onnxruntime": _onnxruntime_version(),  # the release the bundle was checked with (check names it)
        },
        "tokenizer": tokenizer,
    }


def _replay_into_manifest(manifest: dict[str, Any], tmp: Path, golden: dict[str, Any], profile: TargetProfile,
                          say: Callable[[str], None]) -> None:
    """The bundle's greedy answers against the golden reference's, as check will see them,
    recorded in the manifest (no file changed since it was written: the hashes stand)."""
    from edgekd.device.bundle import MANIFEST
    from edgekd.device.check import replay_golden
    from edgekd.device.io import write_json
    from edgekd.device.runtime import Runtime

    say("replaying the golden reference with the bundle")
    figures, _, _ = replay_golden(Runtime(tmp, providers=profile.execution_providers, verify=False),
                                  golden["examples"], golden["answer_tokens"])
    manifest["export_check"]["golden"] = {k: figures[k] for k in (
        "positions", "top1", "kl_mean", "greedy_exact", "greedy_exact_ci95", "greedy_prefix_tokens")}
    manifest["export_check"]["golden"]["prompts"] = len(golden["examples"])
    write_json(tmp / MANIFEST, manifest)
