"""Run a bundle the way an app would: onnxruntime, numpy, ``tokenizers`` (or ``sentencepiece``) and jinja2 only.

No torch, no transformers: an app can copy this file and the bundle and generate::

    rt = Runtime("bundle/")
    for piece in rt.stream("What is the capital of France?", max_new_tokens=32):
        print(piece, end="", flush=True)

How a token is made: the prompt is formatted with the bundle's chat template and encoded; one
*prefill* run computes the KV cache of the whole prompt; then each *decode* run feeds one token
and the cache, and gets the next logits and the cache grown by one position.

The exported decoder (optimum's ``text-generation-with-past``) takes ``past_key_values.{i}.key``
of shape ``(batch, kv_heads, past, head_dim)`` and returns ``present.{i}.key`` with ``past + 1``
positions. The cache lives in preallocated flat buffers, bound with IO binding: where every layer's
attention is one GroupQueryAttention node, one buffer per tensor that the kernel appends to in
place; otherwise two, step t reading ``past`` from buffer A while onnxruntime writes ``present``
straight into buffer B, which becomes the next step's ``past``. No array is allocated or copied by
Python per token, and on CUDA the cache never leaves the GPU (only the logits come back). A prefill
returns the last position's logits only where the graph has export's ``logits_to_keep`` input.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Container, Iterator, Sequence
from pathlib import Path

import numpy as np

from edgekd.device.bundle import DEFAULT_CONTEXT, Manifest, check_external_data, read_manifest
from edgekd.device.errors import UsageError, first_line
from edgekd.device.paths import inside
from edgekd.device.sampling import Sampling, TextStream, pick_token
from edgekd.device.session import choose_providers, keeps_logits, missing_operator, session_options
from edgekd.device.templates import ChatTemplate, load_chat_template
from edgekd.device.tokenizer import open_tokenizer

MAX_THREADS = 4096  # intra-op threads; beyond any machine edgekd runs on
_KV_NAME = re.compile(r"^(past_key_values|present)\.(\d+)\.(key|value)$")
_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}


def answer_text(tokenizer, ids: Sequence[int], eos_ids: Container[int]) -> str:
    """An answer's text as a person reads it: its eos tokens dropped, special tokens skipped, stripped."""
    return tokenizer.decode([int(t) for t in ids if t not in eos_ids], skip_special_tokens=True).strip()


def format_prompt(chat_template: ChatTemplate | None, prompt: str, answer_prefix: str = "") -> str:
    """The chat template around one user message, then the task's ``answer_prefix`` (given words every answer opens with)."""
    text = chat_template.render([{"role": "user", "content": prompt}]) if chat_template is not None else prompt
    return text + answer_prefix


def encode_prompt(tokenizer, chat_template: ChatTemplate | None, prompt: str, answer_prefix: str = "") -> list[int]:
    """Token ids of a prompt as a bundle's app sends them (``Runtime.encode_prompt`` less the context check)."""
    if not prompt or not prompt.strip():
        raise UsageError("the prompt is empty: pass some text to answer")
    # A chat template writes its own special tokens, as transformers' apply_chat_template does.
    return tokenizer.encode(format_prompt(chat_template, prompt, answer_prefix), add_special_tokens=chat_template is None).ids


@dataclasses.dataclass
class Timing:
    """What the last ``generate_ids`` call measured (seconds and token counts)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0  # one-token runs (the first new token comes from the prefill)
    decode_s: float = 0.0
    stop_token: int | None = None  # the eos token that ended the answer (not yielded), if one did

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


class _KVBuffers:
    """Two flat buffers per cache tensor, swapped each step (A is read as past, B written as present).

    Sized for ``capacity`` positions; a tensor of ``n`` positions occupies the first
    ``kv_heads * n * head_dim`` elements, which is exactly the contiguous layout
    ``(1, kv_heads, n, head_dim)`` that the graph reads and writes. A graph whose attention is
    GroupQueryAttention in every layer (the manifest's ``past_present_share_buffer``) gets one buffer
    per tensor, bound as both past and present at ``(1, kv_heads, capacity, head_dim)``: the kernel
    writes the new positions in place and reads as many as the attention mask says.
    """

    def __init__(self, rt: Runtime, capacity: int):
        import onnxruntime as ort

        self.capacity = capacity
        n = rt.num_kv_heads * capacity * rt.head_dim
        self.buffers = [
            [ort.OrtValue.ortvalue_from_shape_and_type([n], rt.kv_dtype, rt.device, 0) for _ in rt.past_names]
            for _ in range(1 if rt.shares_kv else 2)
        ]
        self.pointers = [[v.data_ptr() for v in group] for group in self.buffers]
        self.current = 0  # which of the two sets holds the valid past


class Runtime:
    """A loaded bundle: tokenizer, chat template and one onnxruntime session.

    ``providers`` overrides the bundle target's execution providers; one that this onnxruntime
    build lacks is dropped with a warning naming it (kept in ``self.warnings``), and the CPU
    provider is always last. ``threads`` sets intra-op threads (None: onnxruntime's default, one
    per physical core). ``verify`` checks every file's SHA-256 against the manifest first.
    ``prepared``: a cache folder where an ``.onnx`` model is kept optimized and packed for this
    machine, its weights mapped from disk at each load (``edgekd.device.prepared``; made at the first).
    """

    def __init__(
        self,
        bundle: str | Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        verify: bool = True,
        session_config: dict[str, str] | None = None,
        prepared: str | Path | None = None,
    ):
        import onnxruntime as ort
        if threads is not None and not 0 <= threads <= MAX_THREADS:  # onnxruntime takes a C int: a huge one is a TypeError
            raise UsageError(f"--threads {threads}: give 1 to {MAX_THREADS} (0 or none: one per physical core)")
        t0 = time.perf_counter()
        self.root = Path(bundle)
        self.manifest = Manifest(read_manifest(self.root, verify=verify))
        model = self.manifest.model
        self.model_path = inside(self.root, self.manifest.model_file)
        if not self.model_path.is_file():
            raise UsageError(f"bundle {self.root} has no model file {model.get('file')!r}")
        if self.model_path.suffix == ".onnx":  # an .ort flatbuffer holds its weights inside
            check_external_data(self.model_path)
        self.tokenizer = open_tokenizer(self.root, self.manifest.data.get("tokenizer"))
        self.chat_template = load_chat_template(self.root)
        self.answer_prefix: str = str((self.manifest.source.task or {}).get("answer_prefix") or "")  # given words answers open with
        self.eos_token_ids = set(int(i) for i in (model.get("eos_token_ids") or []))
        self.shares_kv = bool(model.get("past_present_share_buffer"))  # one cache buffer, written in place
        # a bundle that does not know its context (null) gets the exporter's default: the KV cache is
        # sized from it, never from a requested length alone
        self.context_length = int(model.get("context_length") or 0) or DEFAULT_CONTEXT

        wanted = list(providers) if providers else self.manifest.execution_providers
        self.providers, self.warnings = choose_providers(wanted)
        self.session_config = dict(session_config or {})
        self.threads = threads
        path = self.model_path
        if prepared is not None and path.suffix == ".onnx":  # its packed weights mapped from disk (edgekd.device.prepared)
            from edgekd.device.prepared import prepared_model

            path = prepared_model(path, self.manifest.model_sha256 or f"mtime-{path.stat().st_mtime_ns}", Path(prepared),
                                  self._session_options, self.providers)
        self.session_path = path
        try:
            self.session = ort.InferenceSession(str(path), sess_options=self._session_options(), providers=self.providers)
        except Exception as e:
            missing = missing_operator(str(e), self.manifest.export_check.get("onnxruntime"))
            if missing:
                raise UsageError(f"{self.model_path}: {missing}") from None
            first = first_line(e)
            raise UsageError(f"onnxruntime could not load {path}: {first}") from None
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._bind_names()
        self._make_binding()
        self.load_s = time.perf_counter() - t0
        self.last = Timing()

    def _session_options(self):
        return session_options(self.threads, self.session_config)

    # -- graph introspection ------------------------------------------------------------------

    def _bind_names(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        for needed in ("input_ids", "attention_mask"):
            if needed not in inputs:
                raise UsageError(f"{self.model_path} has no {needed!r} input: it is not a decoder exported with its KV cache")
        if "logits" not in outputs:
            raise UsageError(f"{self.model_path} has no 'logits' output")
        past = sorted((n for n in inputs if _KV_NAME.match(n)), key=_kv_key)
        if not past:
            raise UsageError(
                f"{self.model_path} has no past_key_values inputs: export it with its KV cache "
                "(task text-generation-with-past)"
            )
        present = [re.sub(r"^past_key_values\.", "present.", n) for n in past]
        missing = [n for n in present if n not in outputs]
        if missing:
            raise UsageError(f"{self.model_path} lacks cache outputs {missing[:2]}: not a KV-cache decoder")
        self.past_names, self.present_names = past, present
        self.has_position_ids = "position_ids" in inputs
        # export's logits_to_keep step: the head runs on the last position unless fed otherwise (an input with a default)
        self.keeps_logits = keeps_logits(self.session)
        first = inputs[past[0]]
        self.kv_dtype = _ORT_TO_NUMPY.get(first.type)
        if self.kv_dtype is None:
            raise UsageError(f"{self.model_path}: cache type {first.type} is not supported by the runtime")
        model = self.manifest.model
        shape = first.shape  # (batch, kv_heads, past, head_dim)
        self.num_kv_heads = int(model.get("num_kv_heads") or shape[1])
        self.head_dim = int(model.get("head_dim") or shape[3])
        self.num_layers = len(past) // 2
        self.vocab_size = int(model.get("vocab_size") or self.session.get_outputs()[0].shape[-1])

    def _make_binding(self) -> None:
        """One IOBinding reused for every run. Binding 2 x layers cache tensors per token through
        the public wrapper costs about as much as a small model's run, so bind through its
        underlying object with the device built once (public API as the fallback)."""
        import onnxruntime as ort

        self._binding = self.session.io_binding()
        out_meta = {o.name: o for o in self.session.get_outputs()}
        self.logits_dtype = _ORT_TO_NUMPY.get(out_meta["logits"].type) or np.float32
        self._logits = np.empty((1, 1, self.vocab_size), dtype=self.logits_dtype)
        try:
            raw = self._binding._iobinding
            make = ort.capi.onnxruntime_inference_collection.OrtDevice.make
            self._device = make(self.device, 0)._get_c_device()
            self._cpu = make("cpu", 0)._get_c_device()
            self._bind_in, self._bind_out = raw.bind_input, raw.bind_output
        except AttributeError:  # another onnxruntime version: the public, slower path
            b = self._binding
            self._device, self._cpu = self.device, "cpu"
            self._bind_in = lambda n, d, t, shape, ptr: b.bind_input(n, d, 0, t, shape, ptr)
            self._bind_out = lambda n, d, t, shape, ptr: b.bind_output(n, d, 0, t, shape, ptr)

    # -- text -----------------------------------------------------------------------------------

    def format_prompt(self, prompt: str, chat: bool = True) -> str:
        """The prompt as the model sees it (``format_prompt`` with the bundle's task's answer prefix)."""
        return format_prompt(self.chat_template if chat else None, prompt, self.answer_prefix if chat else "")

    def encode_prompt(self, prompt: str, chat: bool = True, answer_prefix: str | None = None) -> list[int]:
        """Token ids of a prompt (+ ``answer_prefix``, default the task's); refuses one that is empty or leaves no room."""
        prefix = (self.answer_prefix if answer_prefix is None else answer_prefix) if chat else ""
        ids = encode_prompt(self.tokenizer, self.chat_template if chat else None, prompt, prefix)
        if self.context_length and len(ids) >= self.context_length:
            raise UsageError(
                f"the prompt is {len(ids)} tokens but the model's context is {self.context_length}: shorten it"
            )
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- the decoder loop -------------------------------------------------------------------------

    def _start(self, prompt_ids: Sequence[int], capacity: int) -> np.ndarray:
        """Prefill: run the whole prompt, fill the cache; return its logits: the last position's
        ``(1, vocab)`` (a graph with ``logits_to_keep``), or every position's ``(seq, vocab)``."""
        n = len(prompt_ids)
        if n == 0:
            raise UsageError("the prompt has no tokens")
        if self.context_length and capacity > self.context_length:
            capacity = self.context_length
        capacity = max(capacity, n + 1)
        kv = getattr(self, "_kv", None)
        if kv is None or kv.capacity < capacity:
            kv = self._kv = _KVBuffers(self, capacity)
        kv.current = 0
        self._mask = np.ones((1, capacity), dtype=np.int64)
        self._len = 0
        self._capacity = capacity
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(1, n)
        return self._run(ids)[0]

    def _run(self, ids: np.ndarray) -> np.ndarray:
        """One run over ``ids (1, s)`` after ``self._len`` cached positions; returns logits ``(1, rows, vocab)``:
        the last position's where the graph takes ``logits_to_keep`` (left at its default, 1: onnxruntime
        binds no input that has a default), else every position's.

        The logits land in a preallocated host buffer; the cache goes from one buffer set to the
        other. Python allocates nothing per step but the small ids/positions arrays.
        """
        s = ids.shape[1]
        past, total = self._len, self._len + s
        if total > self._capacity:
            raise UsageError(f"the context is full ({self._capacity} tokens)")
        kv = self._kv
        bind_in, bind_out = self._bind_in, self._bind_out
        self._binding.bind_cpu_input("input_ids", ids)
        self._binding.bind_cpu_input("attention_mask", self._mask[:, :total])
        if self.has_position_ids:
            self._binding.bind_cpu_input("position_ids", np.arange(past, total, dtype=np.int64).reshape(1, s))
        if self.shares_kv:  # one buffer, its whole length bound as past and present
            src = dst = kv.pointers[0]
            past_shape = present_shape = [1, self.num_kv_heads, kv.capacity, self.head_dim]
        else:
            src, dst = kv.pointers[kv.current], kv.pointers[1 - kv.current]
            past_shape = [1, self.num_kv_heads, past, self.head_dim]
            present_shape = [1, self.num_kv_heads, total, self.head_dim]
        for name, ptr in zip(self.past_names, src):
            bind_in(name, self._device, self.kv_dtype, past_shape, ptr)
        for name, ptr in zip(self.present_names, dst):
            bind_out(name, self._device, self.kv_dtype, present_shape, ptr)
        rows = 1 if self.keeps_logits else s
        logits = self._logits if rows == 1 else np.empty((1, rows, self.vocab_size), dtype=self.logits_dtype)
        bind_out("logits", self._cpu, self.logits_dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(self._binding)
        kv.current = 0 if self.shares_kv else 1 - kv.current
        self._len = total
        return logits

    def _step(self, token: int) -> np.ndarray:
        """Decode: feed one token, grow the cache by one; return the next logits ``(vocab,)``,
        a view of the runtime's logits buffer that the next run overwrites (copy to keep it)."""
        return self._run(np.array([[token]], dtype=np.int64))[0, -1]

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int = 128,
        sampling: Sampling = Sampling(),
        stop_at_eos: bool = True,
    ) -> Iterator[int]:
        """Yield new token ids one by one until an eos token (not yielded; see
        ``self.last.stop_token``), ``max_new_tokens``, or the end of the context. Fills
        ``self.last`` with the timing. ``stop_at_eos=False`` is for speed measurements."""
        if max_new_tokens < 1:
            raise UsageError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        if self.context_length and len(prompt_ids) >= self.context_length:
            raise UsageError(f"the prompt is {len(prompt_ids)} tokens but the model's context is {self.context_length}: shorten it")
        rng = np.random.default_rng(sampling.seed)
        timing = self.last = Timing(prompt_tokens=len(prompt_ids))
        t0 = time.perf_counter()
        logits = self._start(prompt_ids, len(prompt_ids) + max_new_tokens)[-1]
        timing.prefill_s = time.perf_counter() - t0
        for i in range(max_new_tokens):
            token = pick_token(logits, sampling, rng)
            if stop_at_eos and token in self.eos_token_ids:
                timing.stop_token = token
                break
            timing.new_tokens += 1
            yield token  # the consumer's time between yields is not counted
            if i + 1 == max_new_tokens or self._len + 1 >= self._capacity:  # answered, or context full
                break
            t = time.perf_counter()
            logits = self._step(token)
            timing.decode_s += time.perf_counter() - t
            timing.decode_steps += 1

    def stream(
        self, prompt: str, max_new_tokens: int = 128, sampling: Sampling = Sampling(), chat: bool = True
    ) -> Iterator[str]:
        """Yield the answer to ``prompt`` as text pieces while it is generated."""
        text = TextStream(self.tokenizer)
        for token in self.generate_ids(self.encode_prompt(prompt, chat), max_new_tokens, sampling):
            piece = text.push(token)
            if piece:
                yield piece

    def generate(self, prompt: str, max_new_tokens: int = 128, sampling: Sampling = Sampling(), chat: bool = True) -> str:
        return "".join(self.stream(prompt, max_new_tokens, sampling, chat))

    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits through the KV cache, as an app's decode loop sees them.

        Prefills the prompt, then feeds the response one token at a time. Returns float32
        ``(len(response_ids), vocab)``: row ``i`` is the prediction of ``response_ids[i]``.
        """
        if not response_ids:
            raise UsageError("nothing to score: the response has no tokens")
        rows = [self._start(prompt_ids, len(prompt_ids) + len(response_ids))[-1].copy()]  # the buffer the steps reuse
        for token in response_ids[:-1]:
            rows.append(self._step(int(token)).copy())
        return np.stack(rows).astype(np.float32, copy=False)

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits of one prefill run over ``ids``, as generation computes them (prefill timing): the
        last position's ``(1, vocab)``, or ``(seq, vocab)`` from a graph without ``logits_to_keep``."""
        return self._start(ids, len(ids) + 1)


def _kv_key(name: str) -> tuple[int, int]:
    m = _KV_NAME.match(name)
    assert m is not None  # only called on names that match
    return int(m.group(2)), 0 if m.group(3) == "key" else 1
