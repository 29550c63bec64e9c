"""How faithful and how small is each export recipe? One model, every variant, side by side.

    python benchmarks/export_fidelity.py smollm2-135m-instruct
    python benchmarks/export_fidelity.py runs/student --variants cpu,mobile,dynamic
    python benchmarks/export_fidelity.py smollm2-135m-instruct --variants cpu,my-profile.toml

The model is exported to fp32 ONNX once; each variant then runs a shipped profile's steps (cpu,
mobile, cuda), a profile file, or a naive anchor: ``dynamic`` (onnxruntime ``quantize_dynamic``,
int8 MatMul+Gather, per-channel) and ``avx512`` (optimum's ``ORTQuantizer`` with
``AutoQuantizationConfig.avx512(is_static=False)``). Against the fp32 PyTorch model, on teacher-forced
texts: top-1 agreement, mean KL(PyTorch || variant) in nats per token, perplexity; decode tokens/s is
a plain greedy loop over ``InferenceSession.run`` with the KV cache, batch 1, ``--threads`` threads.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

# Short, varied texts (prose, instructions, facts, code, numbers): teacher-forced positions.
TEXTS = [
    "The Industrial Revolution began in Britain in the late eighteenth century. Steam engines, "
    "first used to pump water out of mines, soon powered factories, ships and railways, and cities "
    "grew quickly as workers moved from farms to find jobs in the new mills.",
    "To make a simple tomato sauce, warm olive oil in a pan, add a chopped onion and cook it slowly "
    "until soft. Stir in two cloves of garlic, then a tin of tomatoes and a pinch of salt, and let it "
    "simmer for twenty minutes before tasting.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to "
    "make glucose and oxygen. It takes place mainly in the leaves, inside small structures called "
    "chloroplasts that contain the pigment chlorophyll.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])\n",
    "Dear team, thank you for your hard work this quarter. Our sales grew by twelve percent and we "
    "welcomed three new colleagues. Next month we will review our goals and plan the summer schedule.",
    "The Pacific Ocean is the largest and deepest of the world's oceans. It covers about one third of "
    "the surface of the Earth and contains the Mariana Trench, whose deepest point lies nearly eleven "
    "kilometres below sea level.",
    "Question: What is the capital of Japan?\nAnswer: The capital of Japan is Tokyo, which is also the "
    "largest city in the country and one of the most populous metropolitan areas in the world.",
    "A good night's sleep helps the body repair itself and the brain store memories. Most adults need "
    "between seven and nine hours each night, and keeping a regular schedule makes falling asleep easier.",
]
DECODE_PROMPT = "Write a short story about a robot who learns to paint."
NAIVE = ("dynamic", "avx512")


def eval_sequences(model, tok, new_tokens: int) -> list[np.ndarray]:
    """The fixed texts, plus each held-out prompt (chat template) with the model's own greedy answer
    (``new_tokens`` tokens, batched in PyTorch): in-distribution positions for the agreement."""
    import json

    import torch

    from edgekd.device.paths import resource

    seqs = [np.asarray([tok(t, add_special_tokens=False)["input_ids"]], dtype=np.int64) for t in TEXTS]
    if new_tokens <= 0:
        return seqs
    prompts = [json.loads(line)["prompt"] for line in resource("examples/prompts/heldout.jsonl").read_text().splitlines() if line.strip()]
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    tok.padding_side = "left"
    batch = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    for row, mask in zip(out, batch["attention_mask"]):
        ids = row[int((mask == 0).sum()):].tolist()  # drop the left padding
        while len(ids) > 1 and ids[-1] == tok.pad_token_id and ids[-2] == tok.pad_token_id:
            ids.pop()  # drop padding after an early eos, keep the eos itself
        seqs.append(np.asarray([ids], dtype=np.int64))
    return seqs


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def torch_logits(model, ids_list):
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.from_numpy(ids)).logits[0].float().numpy() for ids in ids_list]


def ort_logits(sess, ids_list, facts):
    from edgekd.export.onnx import ort_forward

    return [ort_forward(sess, ids, None, facts)[0][0] for ids in ids_list]


def fidelity(ref: list[np.ndarray], got: list[np.ndarray], ids_list) -> dict[str, float]:
    agree, kl, nll, n = 0, 0.0, 0.0, 0
    for r, g, ids in zip(ref, got, ids_list):
        lr, lg = log_softmax(r), log_softmax(g)
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        kl += float((np.exp(lr) * (lr - lg)).sum())
        tgt = ids[0, 1:]
        nll -= float(lg[np.arange(len(tgt)), tgt].sum())
        n += r.shape[0]
    n_pred = sum(ids.shape[1] - 1 for ids in ids_list)
    return {"top1": agree / n, "kl": kl / n, "ppl": float(np.exp(nll / n_pred))}


def torch_ppl(ref, ids_list) -> float:
    nll = sum(-float(log_softmax(r)[np.arange(ids.shape[1] - 1), ids[0, 1:]].sum()) for r, ids in zip(ref, ids_list))
    return float(np.exp(nll / sum(ids.shape[1] - 1 for ids in ids_list)))


def decode_tps(sess, prompt_ids: np.ndarray, facts, new_tokens: int) -> float:
    from edgekd.export.onnx import ort_forward

    logits, past = ort_forward(sess, prompt_ids, None, facts)  # prefill, not timed
    nxt = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
    t = time.perf_counter()
    for _ in range(new_tokens):
        logits, past = ort_forward(sess, nxt, past, facts)
        nxt = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
    return new_tokens / (time.perf_counter() - t)


def build_variant(name: str, fp32: Path, work: Path) -> tuple[Path, str]:
    """The ONNX file of a variant, and how it was made (for the table)."""
    from edgekd.export import run_steps
    from edgekd.export.profile import load_target
    from edgekd.export.steps import load_onnx, run_step, save_onnx

    out = work / name.replace("/", "_").replace(".toml", "")
    if name == "fp32":
        return fp32, "optimum-onnx export, no quantization"
    if name == "dynamic":
        dst, _ = run_step("quantize_dynamic", fp32, out, load_target("cpu").settings["quantize_dynamic"], None)
        return dst, "`quantize_dynamic` int8, MatMul+Gather, per-channel"
    if name == "avx512":
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        from edgekd.device.io import quiet

        with quiet():
            q = ORTQuantizer.from_pretrained(fp32.parent, file_name=fp32.name)
            q.quantize(save_dir=out, quantization_config=AutoQuantizationConfig.avx512(is_static=False, per_channel=False),
                       use_external_data_format=True)
        return next(out.glob("*quantized.onnx")), "optimum `ORTQuantizer`, `avx512` dynamic config"
    profile = load_target(name)
    path, recipe = run_steps(fp32, profile, out)
    if path.suffix == ".onnx":  # repack as the bundle would (one file when < 2 GB)
        final = out / "final" / "model.onnx"
        save_onnx(load_onnx(path), final)
        path = final
    return path, f"profile `{profile.name}`: " + " → ".join(r["step"] for r in recipe)


def file_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a folder, .gguf file or known teacher name")
    ap.add_argument("--variants", default="fp32,cpu,mobile,cuda,dynamic,avx512",
                    help="comma-separated: fp32, cpu, mobile, cuda, a profile .toml, dynamic, avx512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens generated for the decode timing")
    ap.add_argument("--no-speed", action="store_true", help="skip the decode timing")
    ap.add_argument("--answer-tokens", type=int, default=48,
                    help="greedy answer length generated for each held-out prompt (0: the fixed texts only)")
    args = ap.parse_args()

    import torch

    from edgekd.export.onnx import export_onnx, model_facts, session
    from edgekd.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    facts = model_facts(model.config)
    ids_list = eval_sequences(model, tok, args.answer_tokens)
    ref = torch_logits(model, ids_list)
    prompt = np.asarray([tok(DECODE_PROMPT)["input_ids"]], dtype=np.int64)
    n_pos = sum(i.shape[1] for i in ids_list)

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgekd-bench-") as work:
        work = Path(work)
        t = time.time()
        fp32 = export_onnx(model, work / "fp32", 17)
        print(f"# exported fp32 in {time.time() - t:.0f}s", flush=True)
        fp32_mb = file_mb(fp32)
        for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
            t = time.time()
            try:
                path, how = build_variant(name, fp32, work)
                sess = session(path, threads=args.threads)
            except Exception as e:  # e.g. fp16 kernels missing on this CPU build: say so in the table
                rows.append((name, f"failed: {type(e).__name__}: {str(e)[:80]}", None, None, None))
                continue
            built = time.time() - t
            fid = fidelity(ref, ort_logits(sess, ids_list, facts), ids_list)
            tps = None if args.no_speed else decode_tps(sess, prompt, facts, args.new_tokens)
            rows.append((name, how, file_mb(path), fid, tps))
            print(f"# {name}: {file_mb(path):.1f} MB, top-1 {fid['top1']:.3f}, built in {built:.0f}s", flush=True)
            del sess

    print(f"\nModel `{args.model}`; {len(TEXTS)} texts + {len(ids_list) - len(TEXTS)} held-out prompts with "
          f"{args.answer_tokens}-token greedy answers, {n_pos} teacher-forced positions; PyTorch fp32 "
          f"perplexity {torch_ppl(ref, ids_list):.2f}; fp32 ONNX {fp32_mb:.1f} MB; decode: greedy, batch 1, "
          f"{args.threads} threads, {args.new_tokens} tokens.\n")
    print("| variant | recipe | size MB | % of fp32 | top-1 vs fp32 PyTorch | mean KL | perplexity | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, how, mb, fid, tps in rows:
        if fid is None:
            print(f"| {name} | {how} | – | – | – | – | – | – |")
            continue
        speed = "–" if tps is None else f"{tps:.0f}"
        print(f"| {name} | {how} | {mb:.1f} | {100 * mb / fp32_mb:.0f}% | {fid['top1']:.3f} | {fid['kl']:.4f} | "
              f"{fid['ppl']:.2f} | {speed} |")


if __name__ == "__main__":
    main()
