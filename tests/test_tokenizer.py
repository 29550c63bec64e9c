"""A Unigram tokenizer (what transformers makes of a GGUF's SentencePiece vocabulary, as Gemma 3's)
ships beside tokenizer.json as a SentencePiece model, which the runtime opens in less memory: the
same ids, the same text, the same answers."""

from __future__ import annotations

import json

import pytest
from conftest import CORPUS, build_model, save_model, tiny_llama_config

from edgekd.device.tokenizer import SENTENCEPIECE_FILE, SentencePieceTokenizer

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TEXTS = [*CORPUS, "tab\there\t\ttwo", "  spaces   ", "<bos>x<eos>", "<start_of_turn>user\nhi<end_of_turn>\n", "ünï ✓ 日本", ""]


def unigram_tokenizer():
    """Gemma 3's layout in small: four added tokens, 256 byte pieces with the tab's written as a
    character (and again, later, as a piece of its own), the chat markers, words and their parts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = [(t, 0.0) for t in specials] + [("\t" if b == 9 else f"<0x{b:02X}>", 0.0) for b in range(256)]
    vocab += [("<start_of_turn>", -1000.0), ("<end_of_turn>", -1000.0), ("\n", -1000.0), ("\t", -1000.0)]
    words = sorted({w for text in CORPUS for w in text.replace("\n", " ").split(" ") if w})
    pieces = sorted({"\u2581" + w for w in words} | {c for text in CORPUS for c in text if c not in " \n\t"} | {"\u2581"}
                    | {w[:k] for w in words for k in range(2, len(w))})
    vocab += [(p, -1.0 - 0.37 * i % 7 - len(p) * 0.01) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = GEMMA_TEMPLATE
    return fast, len(vocab)


@pytest.fixture(scope="module")
def unigram_bundle(tmp_path_factory):
    from edgekd.export import export_bundle

    tok, n = unigram_tokenizer()
    model = save_model(build_model(tiny_llama_config(layers=2, vocab=n, bos_token_id=2, eos_token_id=1)), tok,
                       tmp_path_factory.mktemp("unigram") / "model")
    out = tmp_path_factory.mktemp("unigram") / "cpu"
    return out, export_bundle(str(model), "cpu", out)


def test_a_unigram_bundle_ships_a_sentencepiece_model_the_runtime_opens(unigram_bundle):
    from tokenizers import Tokenizer

    from edgekd.device.runtime import Runtime

    bundle, manifest = unigram_bundle
    table = manifest["tokenizer"]["sentencepiece"]
    assert table["file"] == SENTENCEPIECE_FILE and (bundle / SENTENCEPIECE_FILE).is_file()
    assert table["prefix"] == [2] and table["suffix"] == [] and table["probes"] > 20
    assert SENTENCEPIECE_FILE in {f["path"] for f in manifest["files"]}  # hashed like every file
    rt = Runtime(bundle)
    assert isinstance(rt.tokenizer, SentencePieceTokenizer)
    reference = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    for text in TEXTS:
        for special in (False, True):
            ids = reference.encode(text, add_special_tokens=special).ids
            assert rt.tokenizer.encode(text, add_special_tokens=special).ids == ids, text
        assert rt.tokenizer.decode(ids) == reference.decode(ids)
        assert rt.tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)
    tab = reference.encode("a\tb", add_special_tokens=False).ids
    assert reference.token_to_id("\t") in tab  # the later of the two tab pieces, as tokenizers keeps it


def test_the_answers_are_the_same_with_either_tokenizer(unigram_bundle, monkeypatch):
    from edgekd.device.runtime import Runtime

    bundle, _ = unigram_bundle
    ours = Runtime(bundle).generate("Write a short poem about the sea.", max_new_tokens=12)
    monkeypatch.setenv("EDGEKD_TOKENIZER", "json")
    json_rt = Runtime(bundle)
    assert not isinstance(json_rt.tokenizer, SentencePieceTokenizer)
    assert json_rt.generate("Write a short poem about the sea.", max_new_tokens=12) == ours


def test_no_sentencepiece_model_where_a_probe_differs_or_the_tokenizer_is_bpe(tmp_path, monkeypatch, tokenizer):
    from tokenizers import AddedToken

    from edgekd.export import sentencepiece

    tok, _ = unigram_tokenizer()
    tok.save_pretrained(tmp_path / "unigram")
    assert sentencepiece.write_sentencepiece(tmp_path / "unigram") is not None  # the same tokenizer converts
    tok.add_tokens([AddedToken("<extra>", lstrip=True)])  # tokenizers eats the space before it; the runtime would not
    tok.save_pretrained(tmp_path / "lstrip")
    assert sentencepiece.write_sentencepiece(tmp_path / "lstrip") is None
    tokenizer.save_pretrained(tmp_path / "bpe")  # byte-level BPE (SmolLM2's kind): tokenizer.json only
    assert json.loads((tmp_path / "bpe" / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert sentencepiece.write_sentencepiece(tmp_path / "bpe") is None
    (tmp_path / "unigram" / SENTENCEPIECE_FILE).unlink()
    monkeypatch.setattr(SentencePieceTokenizer, "decode", lambda self, ids, skip_special_tokens=True: "?")
    assert sentencepiece.write_sentencepiece(tmp_path / "unigram") is None  # a probe that differs
    assert not (tmp_path / "unigram" / SENTENCEPIECE_FILE).exists()  # nothing half-kept


def test_a_damaged_tokenizer_table_is_one_line(unigram_bundle, tmp_path):
    import shutil

    from edgekd.device.bundle import read_manifest
    from edgekd.device.errors import UsageError

    bundle = shutil.copytree(unigram_bundle[0], tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["tokenizer"]["sentencepiece"]["prefix"] = "<bos>"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="tokenizer.sentencepiece must be"):
        read_manifest(bundle)


def test_without_the_sentencepiece_library_the_runtime_reads_tokenizer_json(unigram_bundle, monkeypatch):
    import sys

    from edgekd.device.runtime import Runtime

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # `import sentencepiece` raises ImportError
    rt = Runtime(unigram_bundle[0])
    assert not isinstance(rt.tokenizer, SentencePieceTokenizer)
    assert rt.tokenizer.encode("tab\there", add_special_tokens=False).ids
