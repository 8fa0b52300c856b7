"""Before and after fine-tuning the float side information (qetjax.finetune), MiniLM end to end.

For each weight configuration and budget, the 36 linear kernels of MiniLM-L6 are quantized as in
``qetjax-bench --model minilm`` (:func:`qetjax.bench.minilm.quantize_model`, the same evaluation
corpus and fp32 reference), then every float leaf of the quantized kernels (codebooks, scales,
zeros, gain levels, rotations) is trained with :func:`qetjax.finetune` on ``1 - cosine`` of the
sentence embeddings to the fp32 model's, on the *calibration* sentences only (disjoint from the
evaluation corpus; the last ``--held-out`` calibration batches are the early-stopping slice).
Integer codes are unchanged and the stored bits are checked equal before and after.

Each row: stored bits per weight, the evaluation metrics before and after, the steps run, the
fine-tuning time and the peak RSS above the process's RSS before fine-tuning (polled every 10 ms).
Rows are appended to ``--out`` (JSON lines) as they finish and printed as a markdown table.

Example:
    PYTHONPATH=. python scripts/finetune_bench.py --methods pq pvq:group_size=64+gptq --bits 2 3 --steps 80
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from qetjax.bench import memory
from qetjax.bench import minilm as bench
from qetjax.bench.config import parse_config
from qetjax.finetune import cosine_loss, default_optimizer, embedding_batches, finetune
from qetjax.models import minilm
from qetjax.tree import tree_bits

KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _embed(params, batch):
    return minilm.embed(params, **batch)


def calibration_batches(s: bench.Setup, batch_size: int) -> dict:
    """The setup's calibration sentences as stacked batches with the fp32 model's embeddings
    (the sentences beyond a whole number of batches are not used)."""
    n = s.calib["input_ids"].shape[0] // batch_size * batch_size
    inputs = {k: np.asarray(s.calib[k][:n]).reshape(-1, batch_size, s.calib[k].shape[1]) for k in KEYS}
    return embedding_batches(_embed, s.params, inputs)


def run_one(s: bench.Setup, batches: dict, label: str, bits: float, args: argparse.Namespace) -> dict:
    config = parse_config(label)
    row = {"config": label, "budget": bits}
    t0 = time.perf_counter()
    try:
        qtree = jax.block_until_ready(bench.quantize_model(s.params, config, "linear", bits, calib=s.calib))
    except ValueError as err:
        return {**row, "status": f"n/a ({str(err)[:80]})"}
    row["quantize_s"] = time.perf_counter() - t0
    row["bpw"] = tree_bits(qtree).quantized_bits_per_weight
    before = bench.evaluate(qtree, s.batches, s.reference)
    steps, held = [], []

    def callback(step: int, value: float, held_out: float | None) -> None:
        steps.append(value)
        if held_out is not None:
            held.append(held_out)
            print(f"# {label} {bits}: step {step} loss {value:.4f} held-out {held_out:.4f}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    with memory.RssPeak() as peak:
        tuned = jax.block_until_ready(finetune(
            qtree, cosine_loss(_embed), batches, default_optimizer(args.lr), steps=args.steps, held_out=args.held_out,
            eval_every=args.eval_every, patience=args.patience, progress=not args.no_progress, callback=callback))
    seconds = time.perf_counter() - t0
    if tree_bits(tuned) != tree_bits(qtree):
        raise AssertionError(f"{label} at {bits}: stored bits changed by fine-tuning")
    after = bench.evaluate(tuned, s.batches, s.reference)
    return {**row, "status": "ok", **{f"{k}_before": v for k, v in before.items()},
            **{f"{k}_after": v for k, v in after.items()}, "steps": len(steps),
            "held_out_best": min(held) if held else None, "finetune_s": seconds, "peak_MiB": peak.delta / 2**20}


def run_llm(label: str, bits: float, args: argparse.Namespace) -> dict:
    """SmolLM2-135M: perplexity before and after fine-tuning on the next-token KL to the fp32 model
    (calibration windows only; the evaluation windows of :mod:`qetjax.bench.smollm2`)."""
    from qetjax.bench import smollm2
    from qetjax.finetune import kl_loss
    from qetjax.models import llama
    from qetjax.tree import dequantize_tree

    s = smollm2.setup(windows=args.llm_windows, window=args.llm_window, calib_windows=args.llm_calib_windows)
    config = parse_config(label)
    row = {"model": "smollm2", "config": label, "budget": bits, "ppl_fp32": s.reference_ppl}
    t0 = time.perf_counter()
    inputs = smollm2.calibration_inputs(s.params, s.calib) if config.gptq else None
    qtree = jax.block_until_ready(smollm2.quantize_weights(s.params, config, bits, inputs=inputs))
    row["quantize_s"] = time.perf_counter() - t0
    row["bpw"] = tree_bits(qtree).quantized_bits_per_weight
    ppl = lambda tree: smollm2.perplexity(llama.stack_layers(dequantize_tree(tree)), s.windows)
    row["ppl_before"] = ppl(qtree)
    logits = lambda p, b: llama.logits(llama.stack_layers(p), b["input_ids"])
    ids = s.calib["input_ids"][:, None, :]  # one window per batch
    batches = {"inputs": {"input_ids": ids}, "mask": np.ones(ids.shape, np.float32)}
    steps = []
    t0 = time.perf_counter()
    with memory.RssPeak() as peak:
        tuned = jax.block_until_ready(finetune(
            qtree, kl_loss(logits, llama.unstack_layers(s.params)), batches, default_optimizer(args.lr),
            steps=args.steps, held_out=args.held_out, eval_every=args.eval_every, patience=args.patience,
            progress=not args.no_progress, callback=lambda step, value, held: steps.append(value)))
    row |= {"finetune_s": time.perf_counter() - t0, "peak_MiB": peak.delta / 2**20, "steps": len(steps)}
    if tree_bits(tuned) != tree_bits(qtree):
        raise AssertionError(f"{label} at {bits}: stored bits changed by fine-tuning")
    row["ppl_after"] = ppl(tuned)
    row["gap_ratio"] = (row["ppl_after"] - s.reference_ppl) / (row["ppl_before"] - s.reference_ppl)
    return {**row, "status": "ok"}


def markdown(rows: list[dict]) -> str:
    cols = ["config", "budget", "bpw", "cos_mean_before", "cos_mean_after", "cos_min_before", "cos_min_after",
            "top1_before", "top1_after", "steps", "finetune_s", "peak_MiB", "quantize_s"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"| {r['config']} | {r['budget']} | {r.get('status')} |")
            continue
        out.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["rtn", "lloyd_max", "pq", "rq", "qet", "trellis", "pvq:group_size=32"])
    p.add_argument("--bits", nargs="+", type=float, default=[2.0, 3.0])
    p.add_argument("--sentences", type=int, default=128, help="evaluation sentences (the --quick size of qetjax-bench)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--calib-sentences", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--held-out", type=int, default=4, help="calibration batches kept for early stopping")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    p.add_argument("--llm-windows", type=int, default=4, help="SmolLM2 evaluation windows")
    p.add_argument("--llm-window", type=int, default=128, help="tokens per SmolLM2 window")
    p.add_argument("--llm-calib-windows", type=int, default=24, help="SmolLM2 calibration windows (one a batch)")
    p.add_argument("--out", default="finetune_bench.jsonl")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.model == "smollm2":
        for label in args.methods:
            for bits in args.bits:
                row = run_llm(label, bits, args)
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps({**row, "args": vars(args)}) + "\n")
        return
    s = bench.setup(args.sentences, args.max_length, args.calib_sentences)
    batches = calibration_batches(s, args.batch_size)
    rows = []
    for label in args.methods:
        for bits in args.bits:
            rows.append(run_one(s, batches, label, bits, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps({**rows[-1], "args": vars(args)}) + "\n")
            jax.clear_caches()  # each configuration compiles anew; keep a long run's memory bounded
    print(markdown(rows))


if __name__ == "__main__":
    main()
