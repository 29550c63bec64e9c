"""The golden reference a bundle carries (``golden.json``), so ``edgekd check`` can measure it on
the device it ships to without torch or the teacher.

Written at export from the unquantized PyTorch model on held-out prompts: each prompt as text and
as the token ids the bundle's own tokenizer and chat template give it, the model's greedy answer
(up to ``answer_tokens``, its eos included), and at each answer position the model's top-k token
ids and log-probabilities (teacher-forced on that answer, as ``Runtime.score`` reads it).
The file is listed and hashed in ``manifest.json`` like every other bundle file. The format is
read by ``edgekd.device.check``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgekd.device.bundle import GOLDEN_FORMAT, GOLDEN_TOP_K, GOLDEN_VERSION


def golden_records(origin: dict[str, Any], limit: int, data: Path | None = None) -> tuple[list[dict[str, str]], str]:
    """The held-out prompts for the golden file: ``data`` when given, else the distillation's
    held-out split when the model has one, else the shipped held-out prompts
    (``edgekd.device.data.choose_data``)."""
    from edgekd.device.data import choose_data, load_records

    path, where, _ = choose_data(data, heldout=origin.get("heldout"))
    return load_records(path, limit=limit), f"{where} ({path.name})"


def make_golden(model, bundle_dir: Path, records: Sequence[dict[str, str]], answer_tokens: int, eos_ids: Sequence[int],
                prompts_from: str, say: Callable[[str], None] = lambda m: None, answer_prefix: str = "") -> dict[str, Any]:
    """Greedy answers and top-k log-probs of the PyTorch ``model`` on ``records``' prompts, encoded by
    the tokenizer and chat template already written into ``bundle_dir`` (then the task's ``answer_prefix``)."""
    import torch
    from tokenizers import Tokenizer

    from edgekd.device.runtime import answer_text, encode_prompt
    from edgekd.device.templates import load_chat_template

    tokenizer = Tokenizer.from_file(str(Path(bundle_dir) / "tokenizer.json"))
    template = load_chat_template(Path(bundle_dir))
    eos = set(int(e) for e in eos_ids)
    device = next(model.parameters()).device
    examples = []
    say(f"golden reference: greedy answers and top-{GOLDEN_TOP_K} log-probs on {len(records)} held-out prompts")
    with torch.no_grad():
        for rec in records:
            ids = encode_prompt(tokenizer, template, rec["prompt"], answer_prefix if template is not None else "")
            x = torch.tensor([ids], device=device)
            past, answer, top_ids, top_lp = None, [], [], []
            for _ in range(answer_tokens):  # greedy with the model's own KV cache, one token at a time
                out = model(input_ids=x, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logp = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
                lp, ix = logp.topk(GOLDEN_TOP_K)
                token = int(ix[0])
                answer.append(token)
                top_ids.append([int(i) for i in ix])
                top_lp.append([round(float(v), 6) for v in lp])
                if token in eos:
                    break
                x = torch.tensor([[token]], device=device)
            examples.append({"prompt": rec["prompt"], "prompt_ids": ids, "answer_ids": answer,
                             "answer": answer_text(tokenizer, answer, eos),
                             "topk_ids": top_ids, "topk_logprobs": top_lp})
    return {"format": GOLDEN_FORMAT, "format_version": GOLDEN_VERSION, "prompts_from": prompts_from,
            "answer_tokens": answer_tokens, "top_k": GOLDEN_TOP_K, "examples": examples}
