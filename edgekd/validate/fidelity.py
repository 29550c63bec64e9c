"""The PyTorch side of fidelity: a teacher or reference model run on the bundle's token ids, so
its logits and greedy answers compare with the bundle's (``edgekd.device.fidelity``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgekd.device.errors import UsageError
from edgekd.device.fidelity import Example


class TorchModel:
    """A PyTorch causal LM (teacher or reference) run on token ids from the bundle's tokenizer."""

    def __init__(self, spec: str, role: str, batch_size: int = 8):
        from edgekd.models import load_model

        self.spec, self.role, self.batch_size = spec, role, batch_size
        try:
            self.model, self.tokenizer = load_model(spec)
        except UsageError as e:
            raise UsageError(f"the {role} {spec!r} could not be loaded ({e}): pass --{role} with a model that exists here") from None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def fp32_bytes(self) -> int:
        """The model's weights at fp32 (tied matrices once): what the bundle's size is measured against."""
        seen = {id(p): p.numel() for p in self.model.parameters()}
        return 4 * sum(seen.values())

    def check_tokenizer(self, bundle_tokenizer) -> None:
        """Refuse a model whose tokenizer maps text to different ids than the bundle's."""
        ours = bundle_tokenizer.get_vocab(with_added_tokens=True)
        theirs = self.tokenizer.get_vocab()
        probe = "Knowledge distillation: 42 tokens, naïve café, déjà vu!\n  def f(x): return x"
        same_ids = bundle_tokenizer.encode(probe, add_special_tokens=False).ids == self.tokenizer.encode(probe, add_special_tokens=False)
        if ours != theirs or not same_ids:
            differ = sum(1 for k, v in ours.items() if theirs.get(k) != v) + len(set(theirs) - set(ours))
            raise UsageError(
                f"the {self.role} {self.spec!r} has a different tokenizer from the bundle's ({len(theirs)} vs "
                f"{len(ours)} tokens, {differ} differ): its logits cannot be compared; pass the {self.role} "
                "the bundle was made from"
            )

    def logits(self, examples: Sequence[Example]) -> list[np.ndarray]:
        """``(answer_len, vocab)`` float32 logits predicting each answer token, batched forward."""
        import torch

        out: list[np.ndarray] = []
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start : start + self.batch_size]
            seqs = [ex.prompt + ex.answer for ex in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):  # right padding: positions start at 0 for every row
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            for i, ex in enumerate(chunk):
                p = len(ex.prompt)
                out.append(logits[i, p - 1 : p - 1 + len(ex.answer)].float().numpy())
        return out

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int]) -> list[list[int]]:
        """Batched greedy answers; each ends at and includes its first eos token."""
        from edgekd.models import greedy_answers

        return greedy_answers(self.model, prompts, max_new_tokens, eos_ids, self.pad_id, self.batch_size)
