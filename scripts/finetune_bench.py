"""Before and after fine-tuning the float side information (qetjax.finetune), MiniLM and SmolLM2 end to end.

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

With ``--model smollm2`` the 210 linear kernels of SmolLM2-135M are quantized as in
:mod:`qetjax.bench.smollm2` and trained on the next-token KL to the fp32 model
(:func:`qetjax.finetune.kl_loss`) over windows of the frozen calibration text; the row holds the
perplexity before and after on that module's evaluation windows (default: the ``--quick`` 8 x 256
tokens), never trained on. ``--cache DIR`` saves each quantized tree with :mod:`qetjax.io` and
reuses it in later runs; ``--max-seconds`` bounds each row's fine-tuning time.

Example:
    PYTHONPATH=. python scripts/finetune_bench.py --methods pq pvq:group_size=64+gptq --bits 2 3 --steps 80
    PYTHONPATH=. python scripts/finetune_bench.py --model smollm2 --methods pq --bits 3 --steps 80 --cache /tmp/q
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from qetjax import io as qio
from qetjax.bench import memory, smollm2
from qetjax.bench import minilm as bench
from qetjax.bench.config import parse_config
from qetjax.core import QuantizedArray
from qetjax.finetune import cosine_loss, default_optimizer, embedding_batches, finetune, kl_loss
from qetjax.models import llama, minilm
from qetjax.tree import dequantize_tree, path_str, tree_bits

KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _embed(params, batch):
    return minilm.embed(params, **batch)


def optimizer(args: argparse.Namespace) -> optax.GradientTransformation:
    """:func:`qetjax.finetune.default_optimizer` at ``--lr``, constant or cosine-decayed over ``--steps``."""
    if args.schedule == "cosine":
        return default_optimizer(optax.cosine_decay_schedule(args.lr, max(args.steps, 1), alpha=0.1))
    return default_optimizer(args.lr)


def _deadline(args: argparse.Namespace) -> Callable[[], bool]:
    """True once ``--max-seconds`` have passed since this call (never without it)."""
    end = time.perf_counter() + args.max_seconds if args.max_seconds else None
    return lambda: end is not None and time.perf_counter() > end


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
        cache = os.path.join(args.cache, f"minilm-{label}-{bits}.qet") if args.cache else None
        budget = (lambda: bench.mixed_budgets(s, config, "linear", bits)) if config.mixed else (lambda: bits)
        qtree = _cached(cache, lambda: bench.quantize_model(s.params, config, "linear", budget(), calib=s.calib))
    except ValueError as err:
        return {**row, "status": f"n/a ({str(err)[:80]})"}
    row["quantize_s"] = time.perf_counter() - t0
    row["bpw"] = tree_bits(qtree).quantized_bits_per_weight
    before = bench.evaluate(qtree, s.batches, s.reference)
    steps, held = [], []

    def callback(step: int, value: float, held_out: float | None) -> bool:
        steps.append(value)
        if held_out is not None:
            held.append(held_out)
            print(f"# {label} {bits}: step {step} loss {value:.4f} held-out {held_out:.4f}", file=sys.stderr, flush=True)
        return out_of_time()

    t0 = time.perf_counter()
    out_of_time = _deadline(args)
    with memory.RssPeak() as peak:
        tuned = jax.block_until_ready(finetune(
            qtree, cosine_loss(_embed), batches, optimizer(args), steps=args.steps, held_out=args.held_out,
            eval_every=args.eval_every, patience=args.patience, progress=not args.no_progress, callback=callback,
            train_unquantized=_norms_and_biases if args.train_norms_biases else False))
    seconds = time.perf_counter() - t0
    if tree_bits(tuned) != tree_bits(qtree):
        raise AssertionError(f"{label} at {bits}: stored bits changed by fine-tuning")
    after = bench.evaluate(tuned, s.batches, s.reference)
    return {**row, "status": "ok", **{f"{k}_before": v for k, v in before.items()},
            **{f"{k}_after": v for k, v in after.items()}, "steps": len(steps),
            "held_out_best": min(held) if held else None, "finetune_s": seconds, "peak_MiB": peak.delta / 2**20}


def _norms_and_biases(path: str) -> bool:
    """MiniLM's LayerNorm scales and biases and its Dense biases (embeddings stay fixed)."""
    return path.endswith(("/bias", "/scale"))


def _cached(path: str | None, make: Callable[[], Any], template: Callable[[dict], Any] | None = None) -> Any:
    """The quantized tree saved at ``path`` (:mod:`qetjax.io`), else ``make()``, saved there when a path is
    given. Only the quantized leaves are saved (by path); ``template(saved)`` rebuilds the whole tree."""
    if path and os.path.exists(path):
        saved = qio.load(path)
        return template(saved) if template else saved
    tree = jax.block_until_ready(make())
    if path:
        if template:
            leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_qa)[0]
            qio.save(path, {path_str(p): x for p, x in leaves if _is_qa(x)})
        else:
            qio.save(path, tree)
    return tree


def _is_qa(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def _replace_by_path(tree: Any, leaves: dict) -> Any:
    """``tree`` with the leaves whose ``/``-joined path is a key of ``leaves`` replaced."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    missing = set(leaves) - {path_str(p) for p, _ in flat}
    if missing:
        raise ValueError(f"saved quantized leaves not in the model: {sorted(missing)[:3]}")
    return jax.tree_util.tree_unflatten(treedef, [leaves.get(path_str(p), x) for p, x in flat])


def _llm_logits(p: Any, b: Any) -> jax.Array:
    """Logits of a stacked SmolLM2 tree (the fp32 reference) or an unstacked one (the tuned tree's decode)."""
    return llama.logits(p if "layers" in p else llama.stack_layers(p), b["input_ids"])


def run_llm(s: smollm2.Setup, label: str, bits: float, args: argparse.Namespace) -> dict:
    """SmolLM2-135M: perplexity before and after fine-tuning on the next-token KL to the fp32 model.

    Training batches: ``--llm-calib-windows`` windows of ``--llm-calib-window`` tokens of the frozen
    calibration text, ``--llm-batch`` windows a batch (the last ``--held-out`` batches for early
    stopping); evaluation: :mod:`qetjax.bench.smollm2`'s windows of the evaluation text (``--quick``:
    8 x 256 tokens), never trained on.
    """
    config = parse_config(label)
    row = {"model": "smollm2", "config": label, "budget": bits, "ppl_fp32": s.reference_ppl}
    ids = smollm2.token_windows("calib", args.llm_calib_windows * args.llm_batch, args.llm_calib_window)

    def make() -> Any:
        return smollm2.quantize_config(s.params, config, bits, {"input_ids": ids, "attention_mask": np.ones_like(ids)})

    cache = os.path.join(args.cache, f"smollm2-{label}-{bits}.qet") if args.cache else None
    t0 = time.perf_counter()
    qtree = _cached(cache, make, lambda saved: _replace_by_path(llama.unstack_layers(s.params), saved))
    row["quantize_s"] = time.perf_counter() - t0
    row["bpw"] = tree_bits(qtree).quantized_bits_per_weight
    ppl = lambda tree: smollm2.perplexity(llama.stack_layers(dequantize_tree(tree)), s.windows)
    row["ppl_before"] = ppl(qtree)
    print(f"# {label} {bits}: {row['bpw']:.3f} bits/weight, ppl {row['ppl_before']:.3f} (fp32 {s.reference_ppl:.3f})",
          file=sys.stderr, flush=True)
    ids = ids.reshape(args.llm_calib_windows, args.llm_batch, args.llm_calib_window)
    mask = np.ones(ids.shape, np.float32)
    mask[..., -1] = 0.0  # the last position's next token is not in the window
    batches = {"inputs": {"input_ids": ids}, "mask": mask}
    losses, held_losses, times = [], [], [time.perf_counter()]

    def callback(step: int, value: float, held: float | None) -> bool:
        losses.append(value)
        times.append(time.perf_counter())
        if held is not None:
            held_losses.append(held)
        print(f"# {label} {bits}: step {step} loss {value:.4f} {times[-1] - times[-2]:.1f} s"
              + ("" if held is None else f" held-out {held:.4f}"), file=sys.stderr, flush=True)
        return out_of_time()

    t0 = time.perf_counter()
    out_of_time = _deadline(args)
    with memory.RssPeak() as peak:
        tuned = jax.block_until_ready(finetune(
            qtree, kl_loss(_llm_logits, s.params), batches, optimizer(args),
            steps=args.steps, held_out=args.held_out, eval_every=args.eval_every, patience=args.patience,
            progress=not args.no_progress, callback=callback))
    row |= {"finetune_s": time.perf_counter() - t0, "peak_MiB": peak.delta / 2**20, "steps": len(losses),
            "step_s_median": float(np.median(np.diff(times))) if len(times) > 1 else None,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "held_out_best": min(held_losses) if held_losses else None}
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
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine: the rate decays from --lr to a tenth of it over --steps")
    p.add_argument("--max-seconds", type=float, default=None, help="stop fine-tuning a row after this many seconds")
    p.add_argument("--held-out", type=int, default=4, help="calibration batches kept for early stopping")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--train-norms-biases", action="store_true",
                   help="MiniLM: also train the unquantized LayerNorms and Dense biases (stored float32)")
    p.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    p.add_argument("--llm-windows", type=int, default=8, help="SmolLM2 evaluation windows (8 x 256: the --quick size)")
    p.add_argument("--llm-window", type=int, default=256, help="tokens per SmolLM2 evaluation window")
    p.add_argument("--llm-calib-windows", type=int, default=24, help="SmolLM2 calibration batches (held-out ones included)")
    p.add_argument("--llm-calib-window", type=int, default=128, help="tokens per SmolLM2 calibration window")
    p.add_argument("--llm-batch", type=int, default=1, help="SmolLM2 calibration windows per batch")
    p.add_argument("--cache", default=None, help="directory to save quantized trees in and reuse them from (qetjax.io)")
    p.add_argument("--out", default="finetune_bench.jsonl")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.cache:
        os.makedirs(args.cache, exist_ok=True)  # before the first quantization, not after it
    if args.model == "smollm2":
        s = smollm2.setup(windows=args.llm_windows, window=args.llm_window, calib_windows=1)
        for label in args.methods:
            for bits in args.bits:
                row = run_llm(s, label, bits, args)
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
