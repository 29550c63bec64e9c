"""The bundle contract between ``edgekd export`` (writes) and ``validate``/``generate`` (read).

A bundle is a folder an app can ship::

    manifest.json        what is in the bundle and how it was made (see ``Manifest`` below)
    model.onnx           decoder with KV cache (+ model.onnx.data when weights are external)
    tokenizer.json ...   tokenizer files, chat template, generation_config.json, config.json
    genai_config.json    for onnxruntime-genai

``manifest.json`` keys (format_version 1):

- ``format``: "edgekd-bundle"; ``format_version``: 1; ``edgekd_version``; ``created`` (ISO time)
- ``source``: ``{"spec", "kind", "sha256", "teacher", "heldout"}``: the exported model; the
  teacher it was distilled from and its held-out data file (from ``distill.json``), or null
- ``target``: the resolved target profile as a table, including ``gates`` and ``execution_providers``
- ``recipe``: the export steps that ran, in order, each ``{"step": name, ...settings}``
- ``model``: ``{"file", "opset", "inputs", "outputs", "num_layers", "num_kv_heads", "head_dim",
  "vocab_size", "context_length", "bos_token_id", "eos_token_ids", "pad_token_id"}``; inputs and
  outputs are ``[{"name", "dtype", "shape"}]`` with symbolic dims as strings
- ``files``: ``[{"path", "bytes", "sha256"}]`` for every file but the manifest itself
- ``export_check``: what export measured against PyTorch (e.g. ``max_abs_logit_diff``)

Every path read from a manifest goes through ``edgekd.paths.inside``: nothing escapes the bundle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekd.errors import UsageError
from edgekd.io import sha256_file, write_json
from edgekd.paths import inside

MANIFEST = "manifest.json"
FORMAT = "edgekd-bundle"
FORMAT_VERSION = 1


def file_entries(root: Path) -> list[dict[str, Any]]:
    """Size and SHA-256 of every file under ``root`` except the manifest, sorted by path."""
    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise UsageError(f"refused symlink {p.relative_to(root)} in bundle {root}")
        if p.is_file() and p.name != MANIFEST:
            entries.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return entries


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill ``format``, ``format_version`` and ``files`` and write ``manifest.json`` into ``root``."""
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": file_entries(root)}
    write_json(root / MANIFEST, full)
    return full


def read_manifest(root: Path, verify: bool = True) -> dict[str, Any]:
    """Read and check a bundle's manifest.

    Refuses (``UsageError``) a folder that is not a bundle, a path that escapes the bundle, a
    missing file, and (with ``verify``) a file whose size or SHA-256 differs: the file was changed.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder: pass a bundle written by `edgekd export`")
    path = root / MANIFEST
    if not path.is_file():
        raise UsageError(f"{root} is not an edgekd bundle (no {MANIFEST}): run `edgekd export` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{path} is not an edgekd bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{path} has format_version {manifest.get('format_version')}; this edgekd reads {FORMAT_VERSION}")
    for entry in manifest.get("files", []):
        target = inside(root, entry["path"])
        if not target.is_file():
            raise UsageError(f"bundle file {entry['path']} is missing from {root}")
        if verify and (target.stat().st_size != entry["bytes"] or sha256_file(target) != entry["sha256"]):
            raise UsageError(f"bundle file {entry['path']} does not match its manifest hash: it was changed after export")
    inside(root, manifest.get("model", {}).get("file", "model.onnx"))
    return manifest


def check_external_data(model_path: Path) -> None:
    """Refuse an ONNX file whose external-data locations escape its folder, before loading weights."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    root = model_path.parent
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for kv in tensor.external_data:
                if kv.key == "location":
                    inside(root, kv.value)


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.t is not None and attr.HasField("t"):
                yield attr.t
            for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _all_tensors(g)
