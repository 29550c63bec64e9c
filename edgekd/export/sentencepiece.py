"""``tokenizer.model``: a Unigram ``tokenizer.json`` written again as a SentencePiece model, which
the runtime opens in a quarter of the memory (``edgekd.device.tokenizer``).

What transformers makes of a GGUF's SentencePiece vocabulary (Gemma 3's, 262,144 pieces) is a
``tokenizers`` Unigram model: the pieces and their scores, byte fallback, spaces replaced by "▁",
no other normalization. SentencePiece's own Unigram model runs the same Viterbi search over the
same scores. What differs is written so that the two agree: the added tokens are cut out of the
text by the runtime, as ``tokenizers`` does; a piece whose text appears again later in the
vocabulary (``tokenizers`` keeps the last) is the byte piece that is missing from the vocabulary
when it is one (Gemma 3's tab), else never emitted. Then both are run on probe texts (prose, code,
whitespace runs, scripts, the chat template's markers, the shipped held-out prompts) and
the model is kept only where every id and every decoded text agree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edgekd.device.tokenizer import SENTENCEPIECE_FILE, SentencePieceTokenizer, sentencepiece_available

BYTE = re.compile(r"<0x[0-9A-F]{2}>")
PROBES = [
    "The capital of France is Paris. Knowledge distillation trains a small student.",
    "def add(a, b):\n\treturn a + b\n\n\n    # four spaces, a tab\tand two\t\ttabs",
    "  leading and trailing spaces  ", "a  b   c    d", "line\r\nbreaks\n\nand\n\n\n\nmore",
    "naïve café, déjà vu, Ærøskøbing, Straße", "Привет, мир! Γειά σου κόσμε. שלום עולם. مرحبا بالعالم",
    "日本語のテキスト、中文文本，한국어 텍스트", "emoji 🤖🦙👍🏽 and symbols ™ © ½ ≤ ∑ → ∞", "\u00a0no-break\u2009thin\u200bzero-width",
    "1234567890 3.14159 -42 1e-9 0x1F 2026-12-08", "<bos>hello<eos> <pad> <unk> <mask> [multimodal] <unused0>",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n", "a" * 200, "",
]


def _convertible(data: dict[str, Any]) -> bool:
    model, norm = data.get("model") or {}, data.get("normalizer") or {}
    pre = data.get("pre_tokenizer")
    spaces = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    split = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
    plain = all(not (t.get("lstrip") or t.get("rstrip") or t.get("single_word") or t.get("normalized"))
                for t in data.get("added_tokens") or [])  # matched as the runtime cuts them out: verbatim
    return (model.get("type") == "Unigram" and bool(model.get("byte_fallback")) and norm == spaces
            and pre in (None, split) and plain)  # after the Replace the text has no space left to split on


def _model_proto(data: dict[str, Any]) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = data["model"]
    piece = pb.ModelProto.SentencePiece
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id = int(model["unk_id"])
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.escape_whitespaces = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    added = {int(t["id"]) for t in data.get("added_tokens") or []}
    last = {text: i for i, (text, _) in enumerate(model["vocab"])}
    missing = {f"<0x{b:02X}>" for b in range(256)} - {text for text, _ in model["vocab"] if BYTE.fullmatch(text)}
    for i, (text, score) in enumerate(model["vocab"]):
        p = proto.pieces.add(piece=text, score=float(score))
        if i == int(model["unk_id"]):
            p.type = piece.UNKNOWN
        elif i in added:
            p.type = piece.CONTROL
        elif last[text] != i:  # shadowed: tokenizers never emits it
            byte = f"<0x{ord(text):02X}>" if len(text) == 1 and ord(text) < 256 else ""
            p.piece, p.type = (byte, piece.BYTE) if byte in missing else (f"<shadowed {i}>", piece.UNUSED)
        elif BYTE.fullmatch(text):
            p.type = piece.BYTE
    return proto.SerializeToString()


def _special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a text's (``<bos>``, ...)."""
    bare = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    at = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), 0)
    return full[:at], full[at + len(bare) :]


def write_sentencepiece(out_dir: Path) -> dict[str, Any] | None:
    """Write ``tokenizer.model`` beside a Unigram ``tokenizer.json`` when both give the same ids and
    text on ``PROBES`` and the shipped held-out prompts; returns the manifest's
    ``tokenizer.sentencepiece`` table, or None (another kind of tokenizer, the library missing, or a
    probe that differs: no file)."""
    import json

    from tokenizers import Tokenizer

    from edgekd.device.data import load_records
    from edgekd.device.paths import SHIPPED_HELDOUT, resource

    text = (Path(out_dir) / "tokenizer.json").read_text(encoding="utf-8")
    data = json.loads(text)
    if not _convertible(data) or not sentencepiece_available():
        return None
    path = Path(out_dir) / SENTENCEPIECE_FILE
    path.write_bytes(_model_proto(data))
    prefix, suffix = _special_ids(reference := Tokenizer.from_str(text))
    table: dict[str, Any] = {"file": SENTENCEPIECE_FILE, "prefix": prefix, "suffix": suffix,
                             "added_tokens": [{"id": t["id"], "content": t["content"], "special": bool(t.get("special"))}
                                              for t in data.get("added_tokens") or []]}
    ours = SentencePieceTokenizer(path, table)
    probes = [*PROBES, *(r["prompt"] for r in load_records(resource(SHIPPED_HELDOUT)))]
    for probe in probes:
        for special in (False, True):
            ids = reference.encode(probe, add_special_tokens=special).ids
            if ours.encode(probe, add_special_tokens=special).ids != ids or ours.decode(ids) != reference.decode(ids):
                path.unlink()
                return None
    table["probes"] = len(probes)
    return table
