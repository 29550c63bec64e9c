"""Training data: read files, let the teacher write answers, tokenize, and batch with little padding.

Accepted inputs (errors name the file and the line):

- ``.txt``: plain text; cut into ``max_length`` windows, loss on every token.
- ``.jsonl`` records, one kind per record: ``{"text"}`` (loss on every token), ``{"messages": [...]}``
  (chat; loss on assistant turns), ``{"prompt", "response"}`` (chat template applied; loss on the
  response), or ``{"prompt"}`` alone (``--prompts``: the teacher writes the response).

An ``Example`` is token ids plus a 0/1 ``target`` per token: 1 where the model is trained to
predict that token from the ones before it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from edgekd.device.errors import UsageError
from edgekd.device.io import iter_jsonl, jsonl_lines


@dataclasses.dataclass
class Example:
    ids: list[int]
    target: list[int]  # 1 = a token the loss predicts (response tokens, or all tokens of plain text)
    prompt: str | None = dataclasses.field(default=None, compare=False)  # the user prompt it answers (prompt records)

    @property
    def n_targets(self) -> int:
        """Positions with loss: token i is predicted at position i - 1, so token 0 never counts."""
        return sum(self.target[1:])


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def _read_text(path: Path, kind: str) -> str:
    """A UTF-8 file's text; one line saying what to fix where it is missing, not UTF-8 or unreadable."""
    if not path.is_file():
        raise UsageError(f"{kind} file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start}): convert the file to UTF-8") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror})") from None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``.jsonl`` file, or one ``{"text"}`` record for a ``.txt`` file."""
    path = Path(path)
    text = _read_text(path, "data")
    if not text.strip():
        raise UsageError(f"{path} is empty: give it some data")
    if path.suffix.lower() == ".txt":
        return [{"text": text}]
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise UsageError(f"{path}: unsupported data file type {path.suffix!r}: use .txt or .jsonl")
    records = []
    for n, rec in iter_jsonl(path, text):
        _check_record(rec, f"{path}:{n}")
        records.append(rec)
    return records


def _check_record(rec: dict, where: str) -> None:
    def is_str(key):
        return isinstance(rec.get(key), str)

    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise UsageError(f"{where}: each message needs a string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise UsageError(f"{where}: 'messages' has no assistant turn to learn from")
    elif "text" in rec:
        if not is_str("text") or not rec["text"].strip():
            raise UsageError(f"{where}: 'text' must be a non-empty string")
    elif "prompt" in rec:
        if not is_str("prompt") or not rec["prompt"].strip():
            raise UsageError(f"{where}: 'prompt' must be a non-empty string")
        if "response" in rec and not is_str("response"):
            raise UsageError(f"{where}: 'response' must be a string")
    else:
        raise UsageError(f"{where}: a record needs 'text', 'messages' or 'prompt' (+ 'response'); got keys {sorted(rec)}")


def read_prompts(path: Path) -> list[str]:
    """Prompts from a ``.jsonl`` of ``{"prompt"}`` records or a ``.txt`` with one prompt a line."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        prompts = [line.strip() for line in jsonl_lines(_read_text(path, "prompts")) if line.strip()]
        if not prompts:
            raise UsageError(f"{path} is empty: give it one prompt a line")
        return prompts
    records = read_records(path)
    for n, rec in enumerate(records, 1):
        if "prompt" not in rec:
            raise UsageError(f"{path}: record {n} has no 'prompt' (a prompts file holds {{\"prompt\": ...}} records)")
    return [r["prompt"] for r in records]


def file_digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenizing
# ---------------------------------------------------------------------------------------------


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # No chat template: a plain "role: content" layout.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def prompt_text(tok, prompt: str) -> str:
    """The prompt as the model sees it before answering (chat template + generation prompt)."""
    return _render(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def encode_chat(tok, messages: list[dict], train_on_prompt: bool = False, finished: bool = True) -> Example:
    """Tokens of a conversation; targets on assistant turns (all turns if ``train_on_prompt``).

    ``finished=False`` (an answer cut at max_new_tokens) leaves off the end-of-turn markup so the
    student is not taught to stop where the teacher did not."""
    ids: list[int] = []
    target: list[int] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], add_generation_prompt=True)
        last = i == len(messages) - 1
        if last and not finished:
            upto = before + msg["content"]
        else:
            upto = _render(tok, messages[: i + 1], add_generation_prompt=False)
        if not before.startswith(done) or not upto.startswith(before):
            raise UsageError("the tokenizer's chat template does not render conversations as growing prefixes; use text records")
        for text, is_target in ((before[len(done):], train_on_prompt), (upto[len(before):], True)):
            t = tok(text, add_special_tokens=False)["input_ids"] if text else []
            ids += t
            target += [int(is_target)] * len(t)
        done = upto
    return Example(ids, target)


def encode_generated(tok, prompt: str, answer_ids: list[int]) -> Example:
    """The prompt as the teacher saw it and the very tokens it generated (no detokenize/retokenize
    round trip), targets on the answer: the positions whose teacher log-probs the generation kept."""
    ids = tok(prompt_text(tok, prompt), add_special_tokens=False)["input_ids"]
    return Example(ids + list(answer_ids), [0] * len(ids) + [1] * len(answer_ids))


def encode_text(tok, text: str, max_length: int) -> list[Example]:
    """Plain text cut into windows of ``max_length`` tokens, an end-of-text token at the end."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]
    return [Example(ids[i : i + max_length], [1] * len(ids[i : i + max_length])) for i in range(0, len(ids), max_length) if len(ids[i : i + max_length]) > 1]


def encode_records(tok, records: list[dict], max_length: int, train_on_prompt: bool) -> tuple[list[Example], dict]:
    """Tokenize records; truncate to ``max_length`` and count what was truncated or dropped."""
    examples: list[Example] = []
    truncated = dropped = 0
    for rec in records:
        if "text" in rec and "messages" not in rec:
            examples += encode_text(tok, rec["text"], max_length)
            continue
        if "messages" in rec:
            ex = encode_chat(tok, rec["messages"], train_on_prompt)
        else:
            if "response" not in rec:
                raise UsageError(
                    "a training record has a 'prompt' but no 'response': add the answers, "
                    "or pass the file with --prompts so the teacher writes them"
                )
            if rec.get("answer_ids") and not train_on_prompt and not rec.get("prompt_truncated"):
                ex = encode_generated(tok, rec["prompt"], rec["answer_ids"])
            else:
                msgs = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
                ex = encode_chat(tok, msgs, train_on_prompt, finished=rec.get("finished", True))
        if len(ex.ids) > max_length:
            truncated += 1
            ex = Example(ex.ids[:max_length], ex.target[:max_length])
        if ex.n_targets == 0:
            dropped += 1  # the prompt alone filled max_length: nothing left to learn
            continue
        ex.prompt = rec.get("prompt") if isinstance(rec.get("prompt"), str) else None
        examples.append(ex)
    summary = {
        "examples": len(examples),
        "tokens": sum(len(e.ids) for e in examples),
        "target_tokens": sum(e.n_targets for e in examples),
        "truncated": truncated,
        "dropped_no_targets": dropped,
    }
    return examples, summary


def examples_digest(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.ids, e.target]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Batching: length buckets, so padding wastes little compute
# ---------------------------------------------------------------------------------------------


def plan_epoch(lengths: list[int], batch_size: int, seed: int, epoch: int, repeats: list[int] | None = None) -> list[list[int]]:
    """Example indices, batched for one epoch: shuffle, sort by length inside windows of 32
    batches, cut, and shuffle the batches. Deterministic in (seed, epoch), so a resumed run sees
    the same order. Similar lengths share a batch, so little compute goes to padding.
    ``repeats[i]``: how often example i is drawn in the epoch (default once; ``balanced_repeats``)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    pool = [i for i, r in enumerate(repeats) for _ in range(r)] if repeats is not None else list(range(len(lengths)))
    order = [pool[j] for j in torch.randperm(len(pool), generator=g).tolist()]
    window = batch_size * 32
    batches = []
    for w in range(0, len(order), window):
        part = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def balanced_repeats(labels: list[str | None], seed: int) -> list[int]:
    """How often each example is drawn per epoch so that every label occurs as often as the most
    common one: each example of a label with ``c`` of ``M`` examples is drawn ``M // c`` times, and a
    seeded ``M % c`` of them once more. Examples without a label are drawn once.

    ``balanced_repeats(["a", "a", "a", "b"], 0) == [1, 1, 1, 3]``. Oversampling the minority class
    (Japkowicz & Stephen 2002) keeps every example and its soft targets, unlike undersampling."""
    counts: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        if label is not None:
            counts.setdefault(label, []).append(i)
    repeats = [1] * len(labels)
    if not counts:
        return repeats
    most = max(len(v) for v in counts.values())
    g = torch.Generator().manual_seed(seed)
    for members in counts.values():
        base, extra = divmod(most, len(members))
        lucky = {members[j] for j in torch.randperm(len(members), generator=g)[:extra].tolist()}
        for i in members:
            repeats[i] = base + (i in lucky)
    return repeats


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` ``(B, S)``: ``loss_mask[b, p]``
    is 1 where position p predicts a target token p + 1; ``labels[b, p]`` is that token."""
    S = max(len(e.ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    attn = torch.zeros((B, S), dtype=torch.long)
    loss_mask = torch.zeros((B, S), dtype=torch.bool)
    labels = torch.full((B, S), pad_id, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids)
        attn[b, :n] = 1
        labels[b, : n - 1] = torch.tensor(e.ids[1:])
        loss_mask[b, : n - 1] = torch.tensor(e.target[1:], dtype=torch.bool)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask, "labels": labels}


def padding_waste(batches: list[list[int]], lengths: list[int]) -> float:
    """Fraction of the batched tensor that is padding."""
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / max(total, 1)


def common_prefix(encoded: list[list[int]], minimum: int = 8) -> int:
    """Length of the token prefix every prompt shares, leaving at least one token of each prompt
    after it (0 below ``minimum`` tokens)."""
    first = encoded[0]
    n = min(len(e) for e in encoded) - 1
    for e in encoded:
        n = min(n, next((j for j, (a, b) in enumerate(zip(first, e)) if a != b), n))
    return n if n >= minimum else 0


def untarget_common_prefix(examples: list[Example]) -> int:
    """Take the loss off the tokens every example starts with (chat template, system prompt, a
    task's instruction): the same text in every row teaches nothing new, and leaving it without
    targets lets the trainer run it once per batch. Returns how many leading tokens that was."""
    n = common_prefix([e.ids for e in examples], minimum=0) if len(examples) > 1 else 0
    for e in examples:
        e.target[:n] = [0] * min(n, len(e.target))
    return n


def prefill(model, input_ids):
    """The key/value cache of ``input_ids`` (a batch-1 shared prefix) with every token of every
    layer kept: a sliding-window layer's mask comes from positions, and Gemma 2 and 3 make no cache
    of their own in training mode, nor one whose windowed layers could be expanded to a batch."""
    from transformers.cache_utils import DynamicCache

    return model(input_ids=input_ids, past_key_values=DynamicCache(), use_cache=True).past_key_values


def expand_cache(cache, batch: int):
    """A batch-1 key/value cache as a ``batch``-row one (views, no copies): a shared prefix."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache.from_legacy_cache(tuple((k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in cache.to_legacy_cache()))


def steps_per_epoch(n_batches: int, grad_accum: int) -> int:
    return math.ceil(n_batches / grad_accum)
