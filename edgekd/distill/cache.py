"""The teacher-logit cache: the teacher's top-k log-probabilities and token ids at every position
that carries loss, computed once and stored in ``OUT/cache/``; later epochs and reruns skip the
teacher forward.

Layout: ``cache/topk-<key16>-r<rank>of<world>.safetensors`` with tensors ``logp (M, k)`` float32
(log_softmax(teacher_logits / T), so the tail mass 1 - sum(exp(logp)) is exact), ``idx (M, k)``
int32 token ids sorted by descending probability, and ``example``, ``start``, ``count`` (n,) int64
locating each example's rows. The metadata ``key`` hashes the teacher's files, the tokenized data,
k, T and the vocabulary size: any change misses the cache instead of reading stale numbers. Each
process writes its own part, atomically (temporary name, then rename); a reader merges all parts
of its key, so a cache built with 2 processes is read by 1 or 8.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgekd.distill.data import Example, collate
from edgekd.models import decoder_of


def cache_key(teacher_fingerprint: str, data_digest: str, k: int, temperature: float, vocab: int) -> str:
    h = hashlib.sha256(f"{teacher_fingerprint}|{data_digest}|k={k}|T={temperature!r}|V={vocab}|v1".encode())
    return h.hexdigest()


@torch.no_grad()
def teacher_topk(teacher, examples: list[Example], indices: list[int], *, k: int, temperature: float, vocab: int,
                 batch_size: int, chunk_size: int, device, on_batch=None) -> dict[str, torch.Tensor]:
    """Run the teacher over ``examples[indices]`` and keep the top-k log-probs per loss position."""
    decoder, head = decoder_of(teacher), teacher.get_output_embeddings()
    order = sorted(indices, key=lambda i: len(examples[i].ids))
    logps, idxs, ex_ids, starts, counts = [], [], [], [], []
    row = 0
    pad = 0
    for b in range(0, len(order), batch_size):
        part = order[b : b + batch_size]
        batch = collate([examples[i] for i in part], pad)
        mask = batch["loss_mask"].to(device)
        hidden = decoder(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).last_hidden_state[mask]
        w = head.weight[:vocab]
        bias = None if head.bias is None else head.bias[:vocab]
        for c in range(0, hidden.shape[0], chunk_size):
            logits = torch.nn.functional.linear(hidden[c : c + chunk_size], w, bias).float()
            top = torch.log_softmax(logits / temperature, -1).topk(min(k, vocab), -1)
            logps.append(top.values.cpu())
            idxs.append(top.indices.to(torch.int32).cpu())
        for i in part:
            n = examples[i].n_targets
            ex_ids.append(i)
            starts.append(row)
            counts.append(n)
            row += n
        if on_batch:
            on_batch(len(part), int(batch["attention_mask"].sum()))
    empty_k = min(k, vocab)
    return {
        "logp": torch.cat(logps) if logps else torch.zeros((0, empty_k)),
        "idx": torch.cat(idxs) if idxs else torch.zeros((0, empty_k), dtype=torch.int32),
        "example": torch.tensor(ex_ids, dtype=torch.long),
        "start": torch.tensor(starts, dtype=torch.long),
        "count": torch.tensor(counts, dtype=torch.long),
    }


def part_path(folder: Path, key: str, rank: int, world: int) -> Path:
    return Path(folder) / f"topk-{key[:16]}-r{rank}of{world}.safetensors"


def write_part(folder: Path, key: str, rank: int, world: int, tensors: dict[str, torch.Tensor]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = part_path(folder, key, rank, world)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({n: t.contiguous() for n, t in tensors.items()}, tmp, metadata={"key": key})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(folder: Path, key: str, n_examples: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
    """``{example index: (logp (n, k), idx (n, k))}`` when the parts of ``key`` cover every example,
    else None (the cache is rebuilt). An unreadable or foreign part is ignored."""
    table: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for path in sorted(Path(folder).glob(f"topk-{key[:16]}-r*of*.safetensors")):
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    continue
            t = load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            continue
        for e, s, c in zip(t["example"].tolist(), t["start"].tolist(), t["count"].tolist()):
            table[e] = (t["logp"][s : s + c], t["idx"][s : s + c])
    if len(table) < n_examples or any(i not in table for i in range(n_examples)):
        return None
    return table


def stale_parts(folder: Path, key: str) -> list[Path]:
    """Parts of other keys (an older teacher, data or k): safe to delete."""
    return [p for p in Path(folder).glob("topk-*.safetensors") if not p.name.startswith(f"topk-{key[:16]}-")]
