"""A bundle's tokenizer, opened in as little memory as its vocabulary allows.

Every bundle ships ``tokenizer.json`` (the ``tokenizers`` library; onnxruntime-genai and the
JavaScript runtimes read it). The ``tokenizers`` library holds a Unigram vocabulary as a trie that
costs about 0.9 kB a piece: 237 MB resident for Gemma 3's 262,144 pieces, more than the model's
layers take once packed. Where export could express the same tokenizer as a SentencePiece model
and found it giving the same ids and text on its probes (``edgekd.export.sentencepiece``), the
bundle also ships ``tokenizer.model`` and its manifest says so (``tokenizer.sentencepiece``); the
runtime then opens that one with the ``sentencepiece`` library (57 MB for Gemma 3). Without the
library, or with ``EDGEKD_TOKENIZER=json``, it opens ``tokenizer.json`` as before.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgekd.device.errors import UsageError, first_line
from edgekd.device.paths import inside

SENTENCEPIECE_FILE = "tokenizer.model"


@dataclasses.dataclass(frozen=True)
class Encoding:
    ids: list[int]  # what ``tokenizers.Encoding.ids`` is: the runtime reads nothing else


class SentencePieceTokenizer:
    """The subset of ``tokenizers.Tokenizer`` the runtime uses (``encode(...).ids``, ``decode``),
    over a SentencePiece model. Added tokens (``<bos>``, ...) are cut out of the text first and
    given their ids, as ``tokenizers`` does; ``add_special_tokens`` puts the manifest's prefix and
    suffix ids around the text's, as the tokenizer's post-processor does."""

    def __init__(self, model_file: Path, table: dict[str, Any]):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        added = table.get("added_tokens") or []
        self.added = {str(t["content"]): int(t["id"]) for t in added}
        self.special = {int(t["id"]) for t in added if t.get("special")}
        self.content = {int(t["id"]): str(t["content"]) for t in added}
        self.prefix = [int(i) for i in table.get("prefix") or []]
        self.suffix = [int(i) for i in table.get("suffix") or []]
        names = sorted(self.added, key=len, reverse=True)  # the longest first, as tokenizers matches
        self.split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        ids: list[int] = []
        for i, part in enumerate(self.split.split(text) if self.split else [text]):
            if i % 2:
                ids.append(self.added[part])
            elif part:
                ids.extend(self.processor.encode(part))
        return Encoding(self.prefix + ids + self.suffix if add_special_tokens else ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if i not in self.content:
                run.append(i)
                continue
            out.append(self.processor.decode(run))
            run = []
            if not (skip_special_tokens and i in self.special):
                out.append(self.content[i])
        out.append(self.processor.decode(run))
        return "".join(out)


def sentencepiece_available() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def open_tokenizer(root: Path, table: dict[str, Any] | None) -> Any:
    """The bundle's tokenizer: its SentencePiece model where the manifest's ``tokenizer`` table names
    one and the ``sentencepiece`` library is here, else ``tokenizer.json`` (which says the same, in
    more memory; ``table`` None asks for it)."""
    spm = (table or {}).get("sentencepiece")
    if spm and os.environ.get("EDGEKD_TOKENIZER", "") != "json" and sentencepiece_available():
        path = inside(root, str(spm.get("file") or SENTENCEPIECE_FILE))
        try:
            return SentencePieceTokenizer(path, spm)
        except (OSError, RuntimeError) as e:  # the library raises RuntimeError on a damaged file
            raise UsageError(f"{path} is not a SentencePiece model ({first_line(e, 120)}): re-export the bundle") from None
    from tokenizers import Tokenizer

    path = root / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"bundle {root} has no tokenizer.json: re-export it with `edgekd export`")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception on a damaged file
        raise UsageError(f"{path} is not a tokenizer file ({first_line(e, 120)}): re-export the bundle") from None
