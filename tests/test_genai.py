"""onnxruntime-genai, a runtime edgekd did not write, loads edgekd's bundles and answers as
`edgekd generate` does: the same prompt ids from its own tokenizer, the same greedy tokens.

The tokenizer is the one transformers' GGUF converter writes (a decoder of ByteFallback, Fuse,
Replace("\u2581"), ByteLevel around a byte-level BPE): onnxruntime-genai read every space of it as
id -1 until export normalised the decoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_model, build_tokenizer, genai_greedy, save_model, tiny_llama_config

from edgekd.device.runtime import Runtime
from edgekd.export import export_bundle
from edgekd.export.bundle import BYTE_LEVEL_DECODER, normalize_decoder

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is a dev dependency: pip install -e '.[dev]'")

GGUF_DECODER = {"type": "Sequence", "decoders": [
    {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
PROMPTS = ["Write a short poem about the sea.\nThe wind and the stars.", "Explain why the sky is blue, please."]


def gguf_style(folder: Path) -> Path:
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**data, "decoder": GGUF_DECODER}), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def genai_bundles(tmp_path_factory) -> dict[str, Path]:
    """The tiny teacher with a GGUF-style tokenizer, exported for cpu and (on the 4-bit grid) mobile."""
    from edgekd.quant import attach_fake_quantize, bake_fake_quantize

    tok = build_tokenizer()
    root = tmp_path_factory.mktemp("genai")
    plain = gguf_style(save_model(build_model(tiny_llama_config(layers=2)), tok, root / "teacher"))
    model = build_model(tiny_llama_config(layers=2))
    attach_fake_quantize(model, 4, 32, head_bits=8)
    bake_fake_quantize(model)
    grid = gguf_style(save_model(model, tok, root / "grid"))
    out = {"cpu": root / "cpu", "mobile": root / "mobile"}
    export_bundle(str(plain), "cpu", out["cpu"])
    export_bundle(str(grid), "mobile", out["mobile"])
    return out


def assert_genai_answers_as_edgekd(bundle: Path, prompts: list[str], n: int) -> None:
    rt = Runtime(bundle)
    tokenizer = og.Tokenizer(og.Model(str(bundle)))
    for prompt in prompts:
        ids = rt.encode_prompt(prompt)
        text = rt.format_prompt(prompt)
        assert [int(i) for i in tokenizer.encode(text)] == rt.tokenizer.encode(text, add_special_tokens=False).ids
        ours = list(rt.generate_ids(ids, n, stop_at_eos=False))
        theirs = genai_greedy(bundle, ids, n)  # onnxruntime-genai stops at an end-of-sequence token
        assert theirs == ours[: len(theirs)] and (len(theirs) == n or theirs[-1] in rt.eos_token_ids), (prompt, theirs, ours)
        assert tokenizer.decode(tokenizer.encode(prompt)) == rt.decode(rt.tokenizer.encode(prompt).ids) == prompt


@pytest.mark.parametrize("name", ["cpu", "mobile"])
def test_onnxruntime_genai_answers_as_edgekd(genai_bundles, name):
    bundle = genai_bundles[name]
    assert json.loads((bundle / "tokenizer.json").read_text(encoding="utf-8"))["decoder"] == BYTE_LEVEL_DECODER
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["tokenizer"]["decoder"].startswith("decoder Sequence[ByteFallback, Fuse, Replace, ByteLevel] -> ByteLevel")
    assert_genai_answers_as_edgekd(bundle, PROMPTS, 12)


def test_a_decoder_that_decodes_differently_is_kept(tmp_path):
    """A Replace that would change what a token decodes to (a vocabulary holding "\u2581") is not
    dropped: the bundle decodes as the model did, even if onnxruntime-genai then cannot read it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.BPE(vocab={"a": 0, "\u2581": 1, "b": 2}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteLevel()])
    tk.save(str(tmp_path / "tokenizer.json"))
    before = (tmp_path / "tokenizer.json").read_text(encoding="utf-8")
    assert normalize_decoder(tmp_path) is None
    assert (tmp_path / "tokenizer.json").read_text(encoding="utf-8") == before


def test_a_plain_byte_level_tokenizer_is_left_alone(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    before = (tmp_path / "tokenizer.json").read_text(encoding="utf-8")
    assert normalize_decoder(tmp_path) is None
    assert (tmp_path / "tokenizer.json").read_text(encoding="utf-8") == before
