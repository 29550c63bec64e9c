"""Target profiles: what a device needs from a bundle, as data.

A profile is a TOML file (``targets/cpu.toml``, ``mobile.toml``, ``cuda.toml``, or a user's copy)
loaded into the frozen ``TargetProfile`` below. It names the export steps to run, in order
(``steps``); each step reads its settings from the table of the same name. ``[gates]`` holds the
fidelity thresholds ``edgekd validate`` applies. Every key is documented in the shipped files.

    load_target("cpu")                # a shipped profile, by name
    load_target("my-phone.toml")      # a file
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional

from edgekd.config import from_mapping, read_toml, to_dict
from edgekd.errors import UsageError

SHIPPED = ("cpu", "mobile", "cuda", "web")
# The export steps a profile may name, each implemented in edgekd.export.steps.STEPS (a test
# keeps the two equal); named here so this data module imports nothing above it.
STEP_NAMES = ("fuse_attention", "quantize_head_embedding", "matmul_nbits", "quantize_dynamic", "fp16", "optimize", "to_ort")

HeadPrecision = Literal["fp32", "int8", "int4"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UsageError(msg)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class FuseAttention:
    """Step ``fuse_attention``: each layer's attention as one onnxruntime ``GroupQueryAttention``
    node (rotary, cache append, causal softmax in one kernel). Checked against the unfused graph;
    a graph it does not recognise, or that disagrees, is kept unfused and the recipe says why."""

    max_positions: int = 8192  # rotary table length: the bundle's context is capped at this
    pack_qkv: bool = True      # q, k, v weights as one MatMul (GroupQueryAttention's packed input)
    tolerance: float = 1e-3    # largest |logit or cache difference| to the unfused graph accepted

    def __post_init__(self):
        _check(self.max_positions >= 16, f"fuse_attention.max_positions = {self.max_positions}: use at least 16 (8192 is the usual)")
        _check(self.tolerance > 0, "fuse_attention.tolerance must be > 0")


@dataclasses.dataclass(frozen=True)
class QuantizeHeadEmbedding:
    """Step ``quantize_head_embedding``: the lm_head as ``MatMulNBits`` and the embedding as
    ``GatherBlockQuantized``, symmetric block-wise. A tied pair at the same precision shares one
    quantized matrix (stored once)."""

    head: HeadPrecision = "int8"
    embedding: HeadPrecision = "int8"
    block_size: int = 32
    accuracy_level: int = 0  # the head's MatMulNBits; see MatMulNBits.accuracy_level
    keep_grid: bool = True  # a head/embedding already on the int4 grid (--qat-head-bits 4) is stored at int4, exactly
    # how the embedding reads its rows: "block_quantized" (onnxruntime's GatherBlockQuantized, one node) or
    # "standard" (Gather of the same packed rows and scales, dequantized by standard operators: what
    # onnxruntime-web's WebGPU build runs, which registers no GatherBlockQuantized on WebAssembly)
    gather: Literal["block_quantized", "standard"] = "block_quantized"
    # > 0: the head's k highest logits recomputed exactly (fp32 activations, the same quantized rows)
    # after the head ran as one node at accuracy_level: greedy and top-k answers of an fp32-activation
    # head at the speed of an int8-activation one (docs/export.md, "The head, rescored")
    rescore_top_k: int = 0

    def __post_init__(self):
        _check(0 <= self.rescore_top_k <= 1024,
               f"quantize_head_embedding.rescore_top_k = {self.rescore_top_k}: use 0 (off) to 1024 (20 is the usual)")
        _check(not self.rescore_top_k or self.accuracy_level not in (0, 1),
               f"quantize_head_embedding.rescore_top_k recomputes a head computed at lower precision: at accuracy_level "
               f"{self.accuracy_level} it already runs at fp32 activations; set accuracy_level = 4 (int8), or rescore_top_k = 0")
        _check(self.accuracy_level in (0, 1, 2, 3, 4),
               f"quantize_head_embedding.accuracy_level = {self.accuracy_level}: use 0, 1, 2, 3 or 4")
        _check(_power_of_two(self.block_size) and self.block_size >= 16,
               f"quantize_head_embedding.block_size = {self.block_size}: use a power of two >= 16 (32 is the usual)")


@dataclasses.dataclass(frozen=True)
class MatMulNBits:
    """Step ``matmul_nbits``: block-wise weight-only quantization of every constant-weight MatMul."""

    bits: int = 8
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    algorithm: Literal["rtn", "hqq", "k_quant", "gptq"] = "rtn"  # onnxruntime's quantizers (edgekd.export.steps); gptq:
    # edgekd.export.gptq rounds the PyTorch model to the symmetric 4-bit grid before export, keep_grid stores it
    gptq_prompts: int = 64  # gptq: calibration texts, shipped training prompts + the model's own greedy answers
    int8_nodes: tuple[str, ...] = ()  # node-name substrings kept at 8 bits when bits = 4
    fp32_activation_nodes: tuple[str, ...] = ()  # node-name substrings quantized with accuracy_level 0
    int8_activation_nodes: tuple[str, ...] = ()  # node-name substrings computed with accuracy_level 4 (int8 activations)
    keep_grid: bool = True  # a weight already on its grid (--qat-bits 4, a GGUF's Q4/Q5_0/Q6_K/Q8_0...) is stored on it, exactly
    grid_accuracy_level: int = 0  # the accuracy_level of those weights; at 0 (fp32 activations) an 8-bit grid (Q5_0,
    # Q6_K, Q8_0) is stored as two exact 4-bit halves: onnxruntime's 8-bit kernel is fast only at int8 activations
    grid_offsets: Literal["float32", "float16"] = "float32"  # how a grid's per-block offsets are stored (float16: half the bytes, a Cast)

    def __post_init__(self):
        _check(self.bits in (4, 8), f"matmul_nbits.bits = {self.bits}: use 4 or 8")
        _check(_power_of_two(self.block_size) and self.block_size >= 16,
               f"matmul_nbits.block_size = {self.block_size}: use a power of two >= 16 (32 is the usual)")
        _check(self.accuracy_level in (0, 1, 2, 3, 4),
               f"matmul_nbits.accuracy_level = {self.accuracy_level}: use 0 (default), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8)")
        _check(self.grid_accuracy_level in (0, 1, 2, 3, 4),
               f"matmul_nbits.grid_accuracy_level = {self.grid_accuracy_level}: use 0 (fp32 activations), 1, 2, 3 or 4 (int8)")
        _check(not (self.algorithm != "rtn" and self.bits != 4), f"matmul_nbits: algorithm '{self.algorithm}' needs bits = 4 (8-bit is rtn)")
        _check(self.algorithm != "gptq" or (self.symmetric and self.keep_grid),
               "matmul_nbits: algorithm 'gptq' rounds to the symmetric grid that keep_grid stores: set symmetric = true, keep_grid = true")
        _check(self.gptq_prompts >= 1, f"matmul_nbits.gptq_prompts = {self.gptq_prompts}: use at least 1 (64 is the usual)")
        both = sorted(set(self.fp32_activation_nodes) & set(self.int8_activation_nodes))
        _check(not both, f"matmul_nbits: {both} is in both fp32_activation_nodes and int8_activation_nodes: name each pattern in one")


@dataclasses.dataclass(frozen=True)
class QuantizeDynamic:
    """Step ``quantize_dynamic``: onnxruntime's dynamic int8 (the naive anchor; see FACTS.md)."""

    per_channel: bool = True
    op_types: tuple[str, ...] = ("MatMul", "Gather")


@dataclasses.dataclass(frozen=True)
class Fp16:
    """Step ``fp16``: weights and most ops in float16."""

    keep_io_types: bool = True
    keep_fp32_ops: tuple[str, ...] = ()
    keep_fp32_nodes: tuple[str, ...] = ()  # node-name substrings kept float32 (e.g. the norms)


@dataclasses.dataclass(frozen=True)
class Optimize:
    """Step ``optimize``: onnxruntime's offline graph optimization for the first execution provider."""

    level: Literal["basic", "extended", "all"] = "basic"


@dataclasses.dataclass(frozen=True)
class OrtFormat:
    """Step ``to_ort``: convert to the ORT flatbuffer format (smaller runtime, mobile builds)."""

    level: Literal["disable", "basic", "extended", "all"] = "basic"
    constant_folding: bool = True  # false keeps float16 constants and shared scales unfolded in the file (smaller)


@dataclasses.dataclass(frozen=True)
class Check:
    """What export measures against PyTorch on a short probe (prompt + one cached decode step)."""

    atol_fp32: float = 1e-3  # the unquantized ONNX export must match PyTorch this closely (else: a bug)
    max_abs_logit_diff: float = 1.0  # the final model may drift this far; export fails beyond it

    def __post_init__(self):
        _check(self.atol_fp32 > 0, "check.atol_fp32 must be > 0")
        _check(self.max_abs_logit_diff > 0, "check.max_abs_logit_diff must be > 0")


@dataclasses.dataclass(frozen=True)
class Gates:
    """Thresholds ``edgekd validate`` applies; None = not checked. "reference" = the unquantized
    PyTorch model that was exported."""

    min_top1_vs_reference: Optional[float] = None
    max_kl_vs_reference: Optional[float] = None
    max_ppl_ratio_vs_reference: Optional[float] = None
    min_greedy_prefix_vs_reference: Optional[float] = None
    min_greedy_exact_vs_reference: Optional[float] = None
    min_top1_vs_teacher: Optional[float] = None
    max_kl_vs_teacher: Optional[float] = None
    max_ppl_ratio_vs_teacher: Optional[float] = None
    max_size_mb: Optional[float] = None
    # a task's figures (edgekd.tasks): usually set in the task's task.toml, a target may set them too
    min_label_agreement_vs_teacher: Optional[float] = None
    min_balanced_label_agreement_vs_teacher: Optional[float] = None
    max_accuracy_drop_vs_teacher: Optional[float] = None
    min_exact_match_vs_teacher: Optional[float] = None
    min_rouge_l_vs_teacher: Optional[float] = None
    # decode tokens/s at batch 1 where validate or check runs (a device's own profile sets it)
    min_decode_tokens_per_s: Optional[float] = None

    def __post_init__(self):
        for name in ("min_top1_vs_reference", "min_top1_vs_teacher", "min_greedy_exact_vs_reference", "min_label_agreement_vs_teacher",
                     "min_balanced_label_agreement_vs_teacher", "max_accuracy_drop_vs_teacher", "min_exact_match_vs_teacher",
                     "min_rouge_l_vs_teacher"):
            v = getattr(self, name)
            _check(v is None or 0.0 <= v <= 1.0, f"gates.{name} = {v}: use a fraction between 0 and 1")
        for name in ("max_kl_vs_reference", "max_kl_vs_teacher", "min_greedy_prefix_vs_reference", "min_decode_tokens_per_s"):
            v = getattr(self, name)
            _check(v is None or v >= 0.0, f"gates.{name} = {v}: must be >= 0")
        for name in ("max_ppl_ratio_vs_reference", "max_ppl_ratio_vs_teacher", "max_size_mb"):
            v = getattr(self, name)
            _check(v is None or v > 0.0, f"gates.{name} = {v}: must be > 0")


@dataclasses.dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str = ""
    opset: int = 17
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    steps: tuple[str, ...] = ()
    external_data: bool = False  # weights in model.onnx.data beside the graph (forced above 2 GB)
    # "edgekd": model.onnx (or model.ort) at the bundle's root; "transformers.js": the folder
    # transformers.js v4 loads (onnx/model_<dtype>.onnx, config.json's transformers.js_config)
    layout: Literal["edgekd", "transformers.js"] = "edgekd"
    check: Check = Check()
    fuse_attention: FuseAttention = FuseAttention()
    quantize_head_embedding: QuantizeHeadEmbedding = QuantizeHeadEmbedding()
    matmul_nbits: MatMulNBits = MatMulNBits()
    quantize_dynamic: QuantizeDynamic = QuantizeDynamic()
    fp16: Fp16 = Fp16()
    optimize: Optimize = Optimize()
    to_ort: OrtFormat = OrtFormat()
    gates: Gates = Gates()
    # `edgekd export --search`: recipes to try, in order of preference, each a [[candidates]] table
    # with a name and the tables it overrides (checked like the profile itself; see edgekd/search/).
    candidates: tuple[dict, ...] = ()

    def __post_init__(self):
        _check(14 <= self.opset <= 21, f"opset = {self.opset}: use 14..21 (17 is what optimum-onnx tests)")
        _check(len(self.execution_providers) > 0, "execution_providers is empty: list at least CPUExecutionProvider")
        for s in self.steps:
            _check(s in STEP_NAMES, f"unknown step {s!r} in steps (known: {', '.join(STEP_NAMES)})")
        _check(len(set(self.steps)) == len(self.steps), "steps lists a step twice")
        _check("to_ort" not in self.steps or self.steps[-1] == "to_ort", "to_ort must be the last step")
        _check(self.layout != "transformers.js" or ("to_ort" not in self.steps and not self.external_data),
               'layout = "transformers.js" loads one .onnx file: drop to_ort from steps and set external_data = false')
        if self.candidates:
            resolve_candidates(self)  # an unknown key or a wrong type in a candidate fails at load

    def step_settings(self, step: str):
        """The settings table a step reads: the field of the same name, or None for none."""
        return getattr(self, step, None)


def target_path(target: str | Path) -> Path:
    """The file of a shipped profile's name (``cpu``, ``mobile``, ``cuda``) or of a ``.toml`` path."""
    from edgekd.paths import resource

    text = str(target)
    if text in SHIPPED:
        return resource(f"targets/{text}.toml")
    path = Path(text).expanduser()
    if not path.is_file():
        raise UsageError(f"target {text!r} is neither a shipped profile ({', '.join(SHIPPED)}) nor an existing .toml file")
    return path


def load_target(target: str | Path) -> TargetProfile:
    """A shipped profile by name (``cpu``, ``mobile``, ``cuda``) or a path to a ``.toml`` file."""
    path = target_path(target)
    data = read_toml(path)
    data.setdefault("name", path.stem)
    return from_mapping(TargetProfile, data, where=str(path))


def load_gates(target: str | Path) -> tuple[Gates, str]:
    """Only a profile's ``[gates]`` (and its name), for the device check: nothing else in the file is
    read, so no export step (nor onnx) is needed to check its gates."""
    path = target_path(target)
    data = read_toml(path)
    return from_mapping(Gates, data.get("gates") or {}, where=f"{path} [gates]"), str(data.get("name") or path.stem)


# ---------------------------------------------------------------------------------------------
# Candidates (`edgekd export --search`): data in the profile, resolved into full profiles
OWN_KEYS = ("name", "description", "mixed_precision")  # a candidate's own keys, not profile overrides
FIXED_KEYS = ("name", "description", "gates", "execution_providers", "candidates")  # not overridable


@dataclasses.dataclass(frozen=True)
class CandidateMeta:
    """A candidate's own keys (the rest of its table overrides the profile)."""

    name: str
    description: str = ""
    mixed_precision: bool = False  # the search keeps the most sensitive layers at 8 bits

    def __post_init__(self):
        if not self.name.strip() or not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name):
            raise UsageError(f"candidate name {self.name!r}: use letters, digits, '-', '_', '.' or '+'")


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    description: str
    mixed_precision: bool
    overrides: dict  # the table as written (without its own keys)
    profile: TargetProfile  # the target's settings with this candidate's overrides, no candidates


def _merge(base: dict, overrides: Mapping[str, Any]) -> dict:
    """``base`` with ``overrides``; a table overrides key by key (one level, as profiles nest)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def resolve_candidates(profile) -> list[Candidate]:
    """Every ``[[candidates]]`` table of ``profile`` as a full ``TargetProfile``.

    Each is built with ``from_mapping`` from the profile's own settings overlaid with the table, so
    an unknown key or a wrong type is the same error as in the profile itself, naming the candidate.
    """
    base = to_dict(profile)
    base["candidates"] = []
    out: list[Candidate] = []
    for i, raw in enumerate(profile.candidates, 1):
        where = f"target {profile.name!r}, [[candidates]] #{i}"
        if not isinstance(raw, Mapping):
            raise UsageError(f"{where}: must be a table with a name")
        if "name" not in raw:
            raise UsageError(f"{where}: has no name: add name = \"...\"")
        where = f"target {profile.name!r}, candidate {raw['name']!r}"
        meta = from_mapping(CandidateMeta, {k: raw[k] for k in OWN_KEYS if k in raw}, where)
        overrides = {k: v for k, v in raw.items() if k not in OWN_KEYS}
        for key in FIXED_KEYS:
            if key in overrides:
                raise UsageError(f"{where}: '{key}' cannot be set per candidate: every candidate is held to the target's {key}")
        resolved = from_mapping(TargetProfile, _merge(base, overrides), where)
        if meta.mixed_precision and not ("matmul_nbits" in resolved.steps and resolved.matmul_nbits.bits == 4):
            raise UsageError(f"{where}: mixed_precision needs the matmul_nbits step with bits = 4 (it keeps some layers at 8)")
        if any(c.name == meta.name for c in out):
            raise UsageError(f"{where}: two candidates are named {meta.name!r}: give each a different name")
        out.append(Candidate(meta.name, meta.description, meta.mixed_precision, dict(overrides), resolved))
    return out
