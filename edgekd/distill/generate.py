"""The teacher writes the answers (sequence-level KD, Kim & Rush 2016): batched generation from
the shared prompt prefix's cache, with the teacher's top-k log-probabilities kept where asked."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from edgekd.distill.data import common_prefix, expand_cache, prefill, prompt_text


@torch.no_grad()
def generate_answers(
    model,
    tok,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int,
    max_prompt_tokens: int,
    on_batch: Callable[[int, int], None] | None = None,
    keep_topk: int = 0,
    kd_temperature: float = 1.0,
    vocab: int | None = None,
    keep_logits_of: Sequence[int] = (),
    answer_prefix: str = "",
) -> tuple[list[dict], int]:
    """Sample the teacher's answers to ``prompts``, batched, shortest prompts together.

    Returns ``({"prompt", "response", "finished", "answer_ids"} records in the order of prompts,
    prompts truncated)``. ``finished`` is False when the answer was cut at ``max_new_tokens``;
    ``answer_ids`` are the generated token ids (the eos included when finished). ``on_batch(prompts_done,
    tokens_generated)`` reports progress. Each batch is seeded from ``seed`` and its first prompt's
    index, so results do not depend on how prompts are split across processes.

    ``keep_topk=k``: also keep, per record, the teacher's top-k ``log_softmax(logits / kd_temperature)``
    at every answer position (``"topk": (logp (n, k), idx (n, k))``), read off the logits the
    generation computed anyway: the teacher-logit cache then needs no second teacher pass over
    prompt + answer (``edgekd.distill.cache``).

    ``keep_logits_of=ids``: also keep, per record, the logits of those token ids at every answer
    step (``"kept_logits"``: ``(n, len(ids))`` float32), e.g. a task's label tokens for calibration.

    ``answer_prefix``: every answer starts with this text, given, not generated (a task's fixed
    opening, e.g. "The review is"): the record's ``response`` and ``answer_ids`` include it, and
    ``"prefix_tokens"`` says how many of ``answer_ids`` it is (kept logits start after it).
    """
    if answer_prefix and keep_topk:
        raise ValueError("keep_topk covers generated steps only: not with an answer_prefix")
    device = next(model.parameters()).device
    encoded, cut = _encode_prompts(tok, prompts, max_prompt_tokens)
    prefix_ids = tok(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else []
    encoded = [e + prefix_ids for e in encoded]  # the chat template ends its generation prompt with a newline: no merge
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    eos = _eos_ids(model, tok)
    results: list[dict | None] = [None] * len(prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # The prompts' common first tokens (chat template, system prompt, a task's instruction) are
    # prefilled once; each batch starts from that key/value cache, the rest left-padded after it.
    P = common_prefix(encoded)
    prefix_cache = prefill(model, torch.tensor([encoded[0][:P]], device=device)) if P else None
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, attn = _left_padded([encoded[i] for i in idx], P, pad)
        torch.manual_seed(seed * 7919 + idx[0])
        sample = temperature > 0
        extra = {"past_key_values": expand_cache(prefix_cache, len(idx))} if P else {}
        out = model.generate(**extra, input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
                             do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
                             top_k=None, pad_token_id=pad, eos_token_id=sorted(eos), output_logits=bool(keep_topk or keep_logits_of),
                             return_dict_in_generate=True)
        new = out.sequences[:, ids.shape[1]:].cpu()
        n_tokens = 0
        for row, i in enumerate(idx):
            results[i] = record = _answer_record(tok, prompts[i], new[row], eos, i in cut, prefix_ids)
            n_tokens += len(record["answer_ids"]) - len(prefix_ids)
            if keep_topk:
                record["topk"] = _topk_of(out.logits, row, len(record["answer_ids"]), keep_topk, kd_temperature, vocab)
            if keep_logits_of:
                record["kept_logits"] = _kept_logits(out.logits, row, len(record["answer_ids"]) - len(prefix_ids), keep_logits_of)
        if on_batch:
            on_batch(len(idx), n_tokens)
    done = [r for r in results if r is not None]
    assert len(done) == len(prompts)  # every prompt is in `order`
    return done, len(cut)


def _encode_prompts(tok, prompts: list[str], max_prompt_tokens: int) -> tuple[list[list[int]], set[int]]:
    """Each prompt as the teacher reads it (its chat template), cut to its last ``max_prompt_tokens``
    tokens (the generation prompt must stay); and which prompts were cut."""
    encoded = [tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    cut: set[int] = set()
    for i, e in enumerate(encoded):
        if len(e) > max_prompt_tokens:
            encoded[i] = e[-max_prompt_tokens:]
            cut.add(i)
    return encoded, cut


def _eos_ids(model, tok) -> set[int]:
    """The tokenizer's eos and every eos the model's generation config names."""
    eos = {tok.eos_token_id}
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    eos |= set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
    eos.discard(None)
    return eos


def _left_padded(rows: list[list[int]], P: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` with the shared prefix (``P`` tokens) first and each
    prompt's rest left-padded after it: every prompt ends where generation starts."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for row, r in enumerate(rows):
        ids[row, :P] = torch.tensor(r[:P])
        attn[row, :P] = 1
        ids[row, width - len(r) + P :] = torch.tensor(r[P:])
        attn[row, width - len(r) + P :] = 1
    return ids, attn


def _answer_record(tok, prompt: str, new: torch.Tensor, eos: set[int], truncated: bool, prefix_ids: list[int]) -> dict:
    """One prompt's answer from its generated tokens, cut at the first eos (kept in ``answer_ids``),
    after the given ``prefix_ids``."""
    toks = new.tolist()
    finished = False
    for j, t in enumerate(toks):
        if t in eos:
            toks, finished = toks[:j], True
            break
    answer_ids = prefix_ids + (toks + [new[len(toks)].item()] if finished else toks)
    record = {"prompt": prompt, "response": tok.decode(prefix_ids + toks, skip_special_tokens=True).strip(), "finished": finished,
              "answer_ids": answer_ids, "prompt_truncated": truncated}
    if prefix_ids:
        record["prefix_tokens"] = len(prefix_ids)
    return record


def _kept_logits(logits, row: int, n: int, ids: Sequence[int]) -> np.ndarray:
    """The logits of token ``ids`` at a row's ``n`` generated steps: ``(n, len(ids))`` float32."""
    if not n:
        return np.zeros((0, len(ids)), dtype=np.float32)
    return torch.stack([logits[s][row, list(ids)] for s in range(n)]).float().cpu().numpy()


def _topk_of(logits, row: int, n: int, k: int, kd_temperature: float, vocab: int | None):
    """The teacher's top-k ``log_softmax(logits / kd_temperature)`` at a row's ``n`` answer positions,
    from the logits generation returned: ``(logp (n, k), idx (n, k))``."""
    steps = torch.stack([logits[s][row] for s in range(n)]).float() if n else torch.zeros((0, 1))
    v = vocab or steps.shape[-1]
    top = torch.log_softmax(steps[:, :v] / kd_temperature, -1).topk(min(k, v), -1)
    return top.values.cpu(), top.indices.to(torch.int32).cpu()
