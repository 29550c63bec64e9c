"""The bundle contract between ``edgekd export`` (writes) and ``validate``/``generate`` (read).

A bundle is a folder an app can ship::

    manifest.json        what is in the bundle and how it was made (see ``Manifest`` below)
    model.onnx           decoder with KV cache (+ model.onnx.data when weights are external)
    tokenizer.json ...   tokenizer files, chat template, generation_config.json, config.json
    tokenizer.model      the same tokenizer as a SentencePiece model, where export wrote one
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
- ``tokenizer``: ``{"decoder"}``, what export changed in tokenizer.json's decoder, and
  ``"sentencepiece": {"file", "prefix", "suffix", "added_tokens", "probes"}`` where the bundle also
  ships its Unigram tokenizer as a SentencePiece model (``edgekd.device.tokenizer``)
- ``files``: ``[{"path", "bytes", "sha256"}]`` for every file but the manifest itself
- ``export_check``: what export measured against PyTorch (e.g. ``max_abs_logit_diff``)

Every path read from a manifest goes through ``edgekd.device.paths.inside``: nothing escapes the bundle.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from edgekd.device.errors import UsageError
from edgekd.device.io import read_json, sha256_file, write_json
from edgekd.device.outputs import WORK_MARKER
from edgekd.device.paths import inside

MANIFEST = "manifest.json"
FORMAT = "edgekd-bundle"
FORMAT_VERSION = 1
# golden.json: the reference's greedy answers and top-k log-probs on held-out prompts (written by
# edgekd.export.golden, replayed by edgekd.device.check on the device)
GOLDEN_FILE = "golden.json"
GOLDEN_FORMAT = "edgekd-golden"
GOLDEN_VERSION = 1
DEFAULT_CONTEXT = 2048  # the context of a model whose config does not say (null in a manifest)
MAX_CONTEXT = 1 << 22  # a context_length above this is a damaged manifest, not a model
GOLDEN_TOP_K = 20  # log-probs kept per answer position: enough for KL over the mass that matters


def file_entries(root: Path) -> list[dict[str, Any]]:
    """Size and SHA-256 of every file under ``root`` except the manifest, sorted by path."""
    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise UsageError(f"refused symlink {p.relative_to(root)} in bundle {root}")
        if p.is_file() and p.name != MANIFEST and p.relative_to(root).as_posix() != WORK_MARKER:  # the marker goes at the rename
            entries.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return entries


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill ``format``, ``format_version`` and ``files`` and write ``manifest.json`` into ``root``."""
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": file_entries(root)}
    write_json(root / MANIFEST, full)
    return full


def read_versioned_json(path: Path, fmt: str, version: int, what: str, fix: str = "") -> dict[str, Any]:
    """A JSON object of edgekd's own format ``fmt`` at ``version`` (``{"format", "format_version",
    ...}``), or a one-line ``UsageError`` naming the file, what is wrong and ``fix``."""
    data = read_json(path, fix)
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise UsageError(f"{path} is not {what}{fix}")
    if data.get("format_version") != version:
        raise UsageError(f"{path} has format_version {data.get('format_version')}; this edgekd reads {version}")
    return data


@dataclasses.dataclass(frozen=True)
class QatGrid:
    """The grid a quantization-aware student was trained on (``edgekd distill --qat-bits``): distill
    writes it to distill.json (``student.quantization_aware``), export reads it, asks each step
    whether it stores the weights on it, and records the answer in the manifest
    (``source.quantization_aware.reproduced_by_recipe``)."""

    bits: int  # of the linear layers' grid (4 or 8)
    block_size: int
    head_bits: int = 0  # the tied head and embedding's int grid (0: not trained on one)
    grid: str = ""  # which grid, in words (edgekd.quant.GRID)
    linear_layers: int = 0  # how many layers trained on it
    reproduced_by_recipe: bool | None = None  # export's answer; None before export

    @classmethod
    def from_table(cls, table: Any, where: str) -> QatGrid | None:
        """The grid from its JSON table (None for none); a malformed one is refused, naming ``where``."""
        if not table:
            return None
        if not isinstance(table, dict) or not all(isinstance(table.get(k), int) for k in ("bits", "block_size")):
            raise UsageError(f"{where}: quantization_aware must be a table with integer bits and block_size; re-run the command that wrote it")
        return cls(**{f.name: table[f.name] for f in dataclasses.fields(cls) if f.name in table})

    def table(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Source:
    """The manifest's ``source`` table: the model the bundle was exported from."""

    spec: str | None = None  # the exported model (a path, a known teacher's name or a hub id)
    kind: str | None = None  # folder, gguf or hub
    sha256: str | None = None  # of the source's files
    teacher: str | None = None  # what it was distilled from (itself when not distilled)
    heldout: str | None = None  # the distillation's held-out split, or None
    task: dict[str, Any] | None = None  # the task it was distilled for (edgekd.device.tasks.Task.record)
    quantization_aware: QatGrid | None = None  # the --qat-bits grid it was trained on


class Manifest:
    """A checked ``manifest.json`` (``read_manifest``) read by attribute. ``data`` keeps the whole
    table for what has no accessor (and for tools that re-sign a bundle)."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    @property
    def source(self) -> Source:
        table = self.data.get("source") or {}
        fields: dict[str, Any] = {f.name: table.get(f.name) for f in dataclasses.fields(Source)}
        fields["quantization_aware"] = QatGrid.from_table(fields["quantization_aware"], "manifest.json source")
        return Source(**fields)

    @property
    def target(self) -> dict[str, Any]:
        """The resolved target profile as a table (``name``, ``gates``, ``execution_providers``, steps)."""
        return self.data.get("target") or {}

    @property
    def target_name(self) -> str | None:
        return self.target.get("name")

    @property
    def gates(self) -> dict[str, float | None]:
        return dict(self.target.get("gates") or {})

    @property
    def execution_providers(self) -> list[str]:
        return list(self.target.get("execution_providers") or [])

    @property
    def model(self) -> dict[str, Any]:
        """``file``, ``num_layers``, ``eos_token_ids``, ... (see the module docstring)."""
        return self.data.get("model") or {}

    @property
    def model_file(self) -> str:
        return str(self.model.get("file", "model.onnx"))

    @property
    def files(self) -> list[dict[str, Any]]:
        return list(self.data.get("files") or [])

    @property
    def model_sha256(self) -> str | None:
        return next((f["sha256"] for f in self.files if f["path"] == self.model_file), None)

    @property
    def model_bytes(self) -> int:
        """The model file and its external data (``model.onnx``, ``model.onnx.data``)."""
        name = self.model_file
        return int(sum(f["bytes"] for f in self.files if f["path"] == name or f["path"].startswith(name + ".")))

    @property
    def bundle_bytes(self) -> int:
        """Every file the bundle ships."""
        return int(sum(f["bytes"] for f in self.files))

    @property
    def export_check(self) -> dict[str, Any]:
        """What export measured against PyTorch (``fp32_model_bytes``, ``onnxruntime``, ``golden``, ...)."""
        return self.data.get("export_check") or {}


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
    manifest = read_versioned_json(path, FORMAT, FORMAT_VERSION, "an edgekd bundle manifest")
    check_types(manifest, path)
    model_file = manifest["model"]["file"]
    inside(root, model_file)  # an escaping path is refused as such, before anything else
    for entry in manifest["files"]:
        inside(root, entry["path"])
    listed = {entry["path"] for entry in manifest["files"]}
    for p in sorted(root.iterdir()) if verify else ():  # verify=False: read to re-sign, no integrity check
        used = p.name in USED_FILES or p.name == model_file or p.name == model_file + ".data"
        if used and p.is_file() and p.name not in listed:
            raise UsageError(f"bundle file {p.name} is not listed in {path}: the bundle was changed after export; re-export it")
    if verify and model_file not in listed:
        raise UsageError(f"{path} does not list the model file {model_file}: the bundle was changed after export; re-export it")
    for entry in manifest["files"]:
        target = inside(root, entry["path"])
        if not target.is_file():
            raise UsageError(f"bundle file {entry['path']} is missing from {root}")
        if verify and (target.stat().st_size != entry["bytes"] or sha256_file(target) != entry["sha256"]):
            raise UsageError(f"bundle file {entry['path']} does not match its manifest hash: it was changed after export")
    inside(root, manifest.get("model", {}).get("file", "model.onnx"))
    return manifest


# The files of a bundle that edgekd or onnxruntime-genai open besides the model: each must be hashed.
USED_FILES = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "config.json", "generation_config.json", "genai_config.json", GOLDEN_FILE}


def check_types(manifest: dict[str, Any], path: Path) -> None:
    """Every manifest field edgekd reads has the type it expects, or a one-line error naming it."""

    def need(cond: bool, field: str, what: str) -> None:
        if not cond:
            raise UsageError(f"{path}: {field} must be {what}: the manifest is damaged; re-export the bundle")

    files: Any = manifest.get("files")  # any JSON value (or None) until need() has checked it
    need(isinstance(files, list) and len(files) > 0, "files", "a non-empty list of {path, bytes, sha256}")
    for i, e in enumerate(files):
        need(isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
             and isinstance(e.get("bytes"), int) and not isinstance(e.get("bytes"), bool), f"files[{i}]", "{path: str, bytes: int, sha256: str}")
    model: Any = manifest.get("model")  # likewise
    need(isinstance(model, dict), "model", "a table")
    need(isinstance(model.get("file"), str) and model["file"] != "", "model.file", "a file name")
    for key in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"):
        if key in model:
            need(isinstance(model[key], int) and not isinstance(model[key], bool) and model[key] > 0, f"model.{key}", "a positive integer")
    if model.get("context_length") is not None:
        ctx = model["context_length"]
        need(isinstance(ctx, int) and not isinstance(ctx, bool) and 0 < ctx <= MAX_CONTEXT, "model.context_length",
             f"a whole number of tokens from 1 to {MAX_CONTEXT} (or null)")
    if "eos_token_ids" in model:
        need(isinstance(model["eos_token_ids"], list) and all(isinstance(t, int) for t in model["eos_token_ids"]), "model.eos_token_ids", "a list of integers")
    need(isinstance(manifest.get("source", {}), (dict, type(None))), "source", "a table")
    tokenizer: Any = manifest.get("tokenizer") or {}
    need(isinstance(tokenizer, dict), "tokenizer", "a table")
    if tokenizer.get("sentencepiece") is not None:
        need(_sentencepiece_table(tokenizer["sentencepiece"]), "tokenizer.sentencepiece",
             "{file: str, prefix: [int], suffix: [int], added_tokens: [{id: int, content: str}]}")
    target = manifest.get("target", {})
    need(isinstance(target, dict), "target", "a table")
    providers = target.get("execution_providers", [])
    need(isinstance(providers, list) and all(isinstance(p, str) for p in providers), "target.execution_providers", "a list of provider names")
    gates = target.get("gates") or {}
    need(isinstance(gates, dict), "target.gates", "a table")
    for name, v in gates.items():
        need(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)), f"target.gates.{name}", "a finite number or null")


def _sentencepiece_table(table: Any) -> bool:
    def ints(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)

    added = table.get("added_tokens", []) if isinstance(table, dict) else None
    return (isinstance(table, dict) and isinstance(table.get("file"), str) and ints(table.get("prefix", []))
            and ints(table.get("suffix", [])) and isinstance(added, list)
            and all(isinstance(t, dict) and ints([t.get("id")]) and isinstance(t.get("content"), str) for t in added))


def check_external_data(model_path: Path) -> None:
    """Refuse an ONNX file whose external-data locations escape its folder, before loading weights.

    Without the ``onnx`` package (a runtime-only install) the check is onnxruntime's own: it refuses
    an absolute or escaping external-data path when it loads the model (seen with onnxruntime 1.32).
    A file that never spells ``location`` (the key every external-data entry has) has none, and is not
    parsed: parsing a model with its weights inside would hold them in memory a second time."""
    if not _mentions(model_path, b"location"):
        return
    try:
        import onnx
    except ModuleNotFoundError:
        return

    model = onnx.load(str(model_path), load_external_data=False)
    root = model_path.parent
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for kv in tensor.external_data:
                if kv.key == "location":
                    inside(root, kv.value)


def _mentions(path: Path, word: bytes, chunk: int = 1 << 20) -> bool:
    """Whether the file holds ``word``, read a chunk at a time (the page cache, not this process, holds it)."""
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if word in tail + block:
                return True
            tail = block[-len(word):]
    return False


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.t is not None and attr.HasField("t"):
                yield attr.t
            for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _all_tensors(g)


GATHERED_ONLY = {"Gather", "GatherBlockQuantized"}  # an embedding table: one row read a token


def decode_weight_bytes(model_file: Path) -> int:
    """Bytes of weights one decode step reads: every initializer but those only gathered from
    (a tied embedding that the head also reads counts). The bandwidth roofline of decode is the
    machine's read bandwidth over this. An ``.ort`` flatbuffer counts whole (an upper bound)."""
    if model_file.suffix != ".onnx":
        return model_file.stat().st_size
    import numpy as np
    import onnx
    from onnx import helper

    m = onnx.load(str(model_file), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in m.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in m.graph.initializer:
        ops = consumers.get(init.name, set())
        if ops and ops <= GATHERED_ONLY:
            continue
        total += int(np.prod(init.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def bundle_decode_weight_bytes(root: Path, manifest: Manifest) -> int:
    """The weight bytes a decode step of the bundle at ``root`` reads: as export recorded them
    (``model.decode_weight_bytes``), else counted from its model file (a bundle exported before
    they were recorded; needs onnx)."""
    return manifest.model.get("decode_weight_bytes") or decode_weight_bytes(inside(root, manifest.model_file))
