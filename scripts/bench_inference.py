"""Quantized inference benchmark: decode throughput and model forwards in the three modes of qetjax.nn.

Every number is taken side by side in one run (the machine may be shared; ratios are what count):

1. decode throughput of every method at 3 and 4 bits per weight on one matrix, as weights/s and
   output GB/s, against the machine's write bandwidth (``numpy.copyto`` into a warm buffer)
   measured in the same run; decode is timed fused with a consumer (``.sum()`` in the same jit),
   so the output's fresh pages are not what is measured;
1b. the PVQ split code's rate cost: pulses, bits and SQNR at equal budget against the joint index;
1c. one SmolLM2-sized kernel's product with a batch of 1 or 64 activations on codes, against the
   fp32 product and against decoding the kernel alone;
2. MiniLM batched forward (``--batch`` sentences) and
3. the causal LLM's (SmolLM2, first ``--llm-layers`` layers) prefill and per-token generation
   (the jit-compiled decode loop timed on its own, from the prefill's cache),
   for every method at 3 and 4 bits in each mode it supports (``decode_once``, ``per_layer``,
   ``codes``): time as a ratio to fp32, resident weight bytes (the tree the forward is given),
   peak RSS above the start of the timed call.

Usage:
    nice -n 5 python scripts/bench_inference.py --quick
    python scripts/bench_inference.py --rows 4096 --cols 4096 --parts decode,minilm,llm
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

import qetjax
from qetjax import nn as qnn
from qetjax.bench.memory import RssPeak
from qetjax.combinators import transposed
from qetjax.methods.pvq.quantizer import shape_bits

METHODS = {  # name -> (for_budget method, options): every registered method
    "rtn": ("rtn", {}),
    "lloyd_max": ("lloyd_max", {}),
    "nf": ("nf", {}),
    "rotated_rtn": ("rotated_rtn", {}),
    "pq": ("pq", {}),
    "rq": ("rq", {}),
    "opq": ("opq", {}),
    "lopq": ("lopq", {}),
    "lsq": ("lsq", {}),
    "qet": ("qet", {}),
    "trellis": ("trellis", {"state_bits": 10}),  # the SmolLM2 tables' trellis (decode cost does not depend on it)
    "pvq": ("pvq", {"group_size": 32}),
    "pvq-split": ("pvq", {"group_size": 32, "index": "split"}),
}


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def write_bandwidth(nbytes: int, repeats: int) -> float:
    src, dst = np.ones(nbytes // 4, np.float32), np.empty(nbytes // 4, np.float32)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return nbytes / min(times)  # bytes written per second (each byte also read once)


def quantizer(method: str, shape: tuple[int, int], bits: float) -> qetjax.Quantizer:
    name, options = METHODS[method]
    return qetjax.for_budget(name, shape, bits, **options)


def decode_rows(args) -> Iterator[str]:
    shape = (args.rows, args.cols)
    x = jax.random.normal(jax.random.key(0), shape) * 0.02
    bw = write_bandwidth(x.size * 4, args.repeats)
    yield from [f"write bandwidth (numpy.copyto, warm buffer): {bw / 1e9:.1f} GB/s", "",
            "| method | bits | stored bits/w | decode Mw/s | output GB/s | of write bw | vs pq |",
            "|---|---|---|---|---|---|---|"]
    for bits in args.bits:
        results = {}
        for method in args.methods:
            try:
                q = quantizer(method, shape, bits)
            except ValueError as e:  # e.g. OPQ's rotation alone costs more than the budget on this shape
                yield f"| {method} | {bits} | n/a: {str(e).split(':')[0]} | | | | |"
                continue
            qa = qetjax.quantize(q, jax.random.key(1), x)
            fused = jax.jit(lambda p, c, q=q: q.decode(p, c).sum())
            t = best_time(lambda: fused(qa.params, qa.codes), args.repeats)
            results[method] = (qa.bits_per_element, x.size / t)
        pq_rate = results.get("pq", (0, float("nan")))[1]
        for method, (bpw, rate) in results.items():
            yield (f"| {method} | {bits} | {bpw:.3f} | {rate / 1e6:.1f} | {rate * 4 / 1e9:.2f} | "
                        f"{rate * 4 / bw:.2f} | {rate / pq_rate:.3f} |")


def rate_rows(args) -> Iterator[str]:
    """The split code's rate cost: pulses, stored bits and SQNR at equal budget vs the joint index."""
    shape = (args.rows, args.cols)
    x = jax.random.normal(jax.random.key(0), shape)
    yield from ["| group | bits | index | pulses K | shape bits/group | stored bits/w | SQNR dB |",
                "|---|---|---|---|---|---|---|"]
    for group in (32, 128):
        for bits in args.bits:
            for index in ("joint", "split"):
                q = qetjax.for_budget("pvq", shape, bits, group_size=group, index=index)
                qa = qetjax.quantize(q, jax.random.key(1), x)
                k = dict(q.spec.args)["pulses"]
                yield (f"| {group} | {bits} | {index} | {k} | {shape_bits(group, k, index)} | "
                            f"{qa.bits_per_element:.3f} | {float(qetjax.metrics.sqnr_db(x, qetjax.dequantize(qa))):.2f} |")


def matvec_rows(args) -> Iterator[str]:
    """One SmolLM2-sized kernel (576 inputs, 1536 outputs, Flax ``[in, out]``) times a batch of
    activations, on codes (``qetjax.nn.matmul``) against the fp32 product and against decoding
    the kernel alone (fused with a sum): why generation on codes is slow or fast on this backend."""
    w = jax.random.normal(jax.random.key(0), (576, 1536)) * 0.02
    dense = jax.jit(lambda x, k: x @ k)
    yield from ["| method | bits | batch | fp32 x @ W us | on codes us | on codes / fp32 | decode alone us |",
                "|---|---|---|---|---|---|---|"]
    for bits in args.bits:
        for method in args.methods:
            name, options = METHODS[method]
            qa = qetjax.quantize(transposed(qetjax.for_budget(name, (1536, 576), bits, **options)),
                                 jax.random.key(1), w)
            if qnn.codes_support(qa) is not None:
                continue
            coded = jax.jit(lambda x, k: qnn.matmul(x, k))
            decode = jax.jit(lambda k: qetjax.dequantize(k).sum())
            t_dec = best_time(lambda: decode(qa), args.repeats)
            for batch in (1, 64):
                x = jax.random.normal(jax.random.key(2), (batch, 576))
                t32 = best_time(lambda: dense(x, w), args.repeats)
                tc = best_time(lambda: coded(x, qa), args.repeats)
                yield (f"| {method} | {bits} | {batch} | {t32 * 1e6:.0f} | {tc * 1e6:.0f} | {tc / t32:.1f} | "
                       f"{t_dec * 1e6:.0f} |")


def tree_bytes(tree) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree) if hasattr(a, "dtype"))


def timed(fn, repeats: int) -> tuple[float, float]:
    jax.block_until_ready(fn())  # compile
    with RssPeak() as m:
        t = best_time(fn, repeats)
    return t, m.delta


def mode_trees(qtree, dense=None):
    """The trees of the three modes (``dense``: the decoded tree, when ``dequantize_tree`` cannot
    decode ``qtree`` itself, e.g. stacked layers)."""
    coded, fallbacks = qnn.on_codes(qtree)
    dense = qetjax.dequantize_tree(qtree) if dense is None else dense
    return {"decode_once": dense, "per_layer": qtree, "codes": coded}, fallbacks


def minilm_rows(args) -> Iterator[str]:
    from qetjax.bench import corpus
    from qetjax.models import minilm

    _, params, tokenizer = minilm.load_pretrained()
    sentences = corpus.stdlib_sentences(args.batch)
    batch = {k: jnp.asarray(v) for k, v in minilm.tokenize(tokenizer, sentences).items()}
    dense_fn = jax.jit(minilm.embed)
    stacked_fn = jax.jit(qnn.minilm_embed)
    t32, _ = timed(lambda: dense_fn(params, **batch), args.repeats)
    yield from [f"MiniLM batched forward, {args.batch} sentences x {batch['input_ids'].shape[1]} tokens: "
            f"fp32 {t32 * 1e3:.1f} ms, resident {tree_bytes(params) / 2**20:.1f} MiB (fp32 timed again "
            "right before each row: the ratio is to that)", "",
            "| method | bits | mode | time / fp32 | resident MiB | peak RSS MiB | max abs diff vs decode_once |",
            "|---|---|---|---|---|---|---|"]
    for bits in args.bits:
        for method in args.methods:
            name, options = METHODS[method]
            def policy(path, leaf, name=name, options=options, bits=bits):
                wanted = path.startswith("encoder") and path.endswith("kernel")
                return qetjax.for_budget(name, leaf.shape, bits, **options) if wanted else None

            try:
                qtree = qetjax.quantize_tree(jax.random.key(0), params, policy, layout="out_in", progress=False)
            except ValueError as e:  # e.g. OPQ's rotation alone costs more than the budget on these kernels
                yield f"| {method} | {bits} | n/a: {str(e).splitlines()[0]} | | | | |"
                continue
            trees, fallbacks = mode_trees(qtree)
            once = dense_fn(trees["decode_once"], **batch)
            for mode, tree in trees.items():
                if mode not in args.modes:
                    continue
                if mode == "codes" and fallbacks:
                    yield (f"| {method} | {bits} | codes | falls back to per_layer ({len(fallbacks)} kernels) | | | |")
                    continue
                fn = dense_fn if mode == "decode_once" else stacked_fn
                t32 = best_time(lambda: dense_fn(params, **batch), args.repeats)  # the load drifts between rows
                if mode == "codes":
                    with qnn.intercept():
                        fn = jax.jit(qnn.minilm_embed)
                        t, m = timed(lambda: fn(tree, **batch), args.repeats)
                        out = fn(tree, **batch)
                else:
                    t, m = timed(lambda: fn(tree, **batch), args.repeats)
                    out = fn(tree, **batch)
                yield (f"| {method} | {bits} | {mode} | {t / t32:.2f} | {tree_bytes(tree) / 2**20:.1f} | "
                            f"{m / 2**20:.0f} | {float(jnp.abs(out - once).max()):.1e} |")


def llm_rows(args) -> Iterator[str]:
    from qetjax.models import llama

    _, full, _ = llama.load_pretrained()
    params = llama.first_layers(full, args.llm_layers)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 49152, (args.llm_batch, args.prompt)), jnp.int32)
    max_len = args.prompt + args.new_tokens

    def measure(tree, intercept: bool) -> tuple[float, float, float]:
        """Prefill seconds, seconds per generated token (the decode loop timed on its own, from the
        prefill's cache and first token), and the decode loop's peak RSS."""
        ctx = qnn.intercept() if intercept else _null()
        with ctx:
            mask = jnp.ones_like(ids)
            pf = jax.jit(lambda p: llama.prefill_tokens(p, ids, mask, max_len, None))
            loop = jax.jit(lambda p, first, cache: llama.decode_tokens(p, first, cache, args.new_tokens, None))
            t_pf, _ = timed(lambda: pf(tree), args.repeats)
            first, cache = pf(tree)
            t_loop, m = timed(lambda: loop(tree, first, cache), args.repeats)
        return t_pf, t_loop / max(1, args.new_tokens - 1), m

    p32, g32, _ = measure(params, False)
    yield from [f"SmolLM2 first {args.llm_layers} layers, batch {args.llm_batch}, prompt {args.prompt}, "
            f"{args.new_tokens} new tokens: fp32 prefill {p32 * 1e3:.1f} ms, {g32 * 1e3:.2f} ms/token (fp32 timed "
            "again right before each row: the ratios are to that)", "",
            "| method | bits | mode | prefill / fp32 | tokens/s / fp32 | resident MiB (layers) | peak RSS MiB |",
            "|---|---|---|---|---|---|---|"]
    for bits in args.bits:
        for method in args.methods:
            name, options = METHODS[method]
            flat = llama.unstack_layers(params)
            def policy(path, leaf, name=name, options=options, bits=bits):
                wanted = path.startswith("layer_") and path.endswith("kernel")
                return qetjax.for_budget(name, leaf.shape, bits, **options) if wanted else None

            try:
                flat_q = qetjax.quantize_tree(jax.random.key(0), flat, policy, layout="out_in", progress=False)
            except ValueError as e:
                yield f"| {method} | {bits} | n/a: {str(e).splitlines()[0]} | | | | |"
                continue
            qtree = llama.stack_layers(flat_q)
            trees, fallbacks = mode_trees(qtree, llama.stack_layers(qetjax.dequantize_tree(flat_q)))
            for mode, tree in trees.items():
                if mode not in args.modes:
                    continue
                if mode == "codes" and fallbacks:
                    yield (f"| {method} | {bits} | codes | falls back to per_layer | | | |")
                    continue
                p32, g32, _ = measure(params, False)  # the load drifts between rows
                pf, gt, m = measure(tree, mode == "codes")
                yield (f"| {method} | {bits} | {mode} | {pf / p32:.2f} | {g32 / gt:.2f} | "
                            f"{tree_bytes(tree['layers']) / 2**20:.1f} | {m / 2**20:.0f} |")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few methods")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--bits", type=float, nargs="+", default=[3.0, 4.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--parts", default="decode,rate,matvec,minilm,llm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--llm-layers", type=int, default=30)
    parser.add_argument("--llm-batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["decode_once", "per_layer", "codes"],
                        choices=["decode_once", "per_layer", "codes"], help="the execution modes to measure (MiniLM and the LLM)")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.cols, args.batch, args.llm_layers, args.prompt, args.new_tokens = 512, 1024, 8, 2, 32, 8
        if args.methods == list(METHODS):
            args.methods = ["rtn", "pq", "rq", "pvq", "pvq-split"]
    parts = args.parts.split(",")
    for part, fn in (("decode", decode_rows), ("rate", rate_rows), ("matvec", matvec_rows), ("minilm", minilm_rows),
                     ("llm", llm_rows)):
        if part in parts:
            print(f"\n## {part}\n")
            for row in fn(args):  # each row as soon as it is measured
                print(row, flush=True)


if __name__ == "__main__":
    main()
