"""Quantized MiniLM-L6 end metrics: every method with a budget solver at 2, 3, 4 stored bits per weight.

Weights: all 36 linear kernels of the encoder (and, separately, the word-embedding table) are
quantized with ``qetjax.for_budget(method, shape, bits)`` per leaf; reported: bits/weight over
the quantized leaves and over the whole model, embedding cosine to the fp32 model (mean,
worst), retrieval top-1/top-5 agreement over a corpus of real sentences (the 32 fixture
sentences + stdlib docstring sentences), quantize wall time (compilation included), and the
saved file size. KV cache: quantizers fitted once per layer (per head, or shared by the heads)
on the K/V of calibration sentences (stdlib docstrings), then applied to the held-out fixture
sentences: attention-output relative error per layer and embedding cosine.

Usage:
    python scripts/eval_minilm.py --quick [--methods rtn,pq] [--bits 2,3,4]
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import qetjax
from qetjax import eval as ev
from qetjax import kv as kvq
from qetjax.corpus import stdlib_sentences
from qetjax.models import minilm
from qetjax.tree import tree_bits

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "minilm_reference.npz"
TARGETS = {"linear": r"^encoder/layer_\d+/.*/kernel$", "embedding": r"^embeddings/word_embeddings/embedding$"}
BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def registered_methods() -> list[str]:
    """Imports every qetjax module (so each registers its methods) and lists those with a budget solver."""
    for mod in pkgutil.walk_packages(qetjax.__path__, "qetjax."):
        try:
            importlib.import_module(mod.name)
        except Exception as err:  # a module another engineer is still writing
            print(f"# skipped {mod.name}: {err!r}", file=sys.stderr)
    return sorted(n for n, m in qetjax.METHODS.items() if m.budget is not None)


def _policy(params: dict, target: str, method: str, bpe: float) -> dict:
    """``{path: quantizer}`` for the target's leaves (raises ValueError if the budget cannot be met)."""
    import re

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    from qetjax.tree import path_str

    return {path_str(p): qetjax.for_budget(method, x.shape, bpe) for p, x in leaves if re.search(TARGETS[target], path_str(p))}


def _setup(quick: bool) -> dict:
    with np.load(FIXTURE) as d:
        fixture = {k: d[k] for k in d.files}
    _, params, tokenizer = minilm.load_pretrained()
    held_out = list(fixture["sentences"])
    extra = stdlib_sentences(96 if quick else 480, exclude=held_out)
    batches = ev.make_batches(tokenizer, held_out + extra, 32, 64 if quick else 128)
    calib_sentences = stdlib_sentences(64 if quick else 256, exclude=held_out + extra)
    calib = minilm.tokenize(tokenizer, calib_sentences, 64 if quick else 128)
    return {
        "params": params, "batches": batches, "reference": ev.embed_corpus(params, batches),
        "fixture": {k: fixture[k] for k in BATCH_KEYS}, "calib": calib,
        "calib_kv": minilm.encode(params, **calib, return_kv=True)[1],
    }


def weight_rows(s: dict, methods: list[str], bits_list: list[int]) -> list[dict]:
    rows = []
    for target in TARGETS:
        for method in methods:
            for bpe in bits_list:
                row = {"part": "weights", "target": target, "method": method, "budget": bpe}
                try:
                    policy = _policy(s["params"], target, method, bpe)
                except ValueError as err:
                    rows.append({**row, "status": f"n/a ({str(err)[:60]})"})
                    continue
                t0 = time.perf_counter()
                qtree = jax.block_until_ready(qetjax.quantize_tree(jax.random.key(0), s["params"], lambda p, x: policy.get(p), progress=False))
                seconds = time.perf_counter() - t0
                tb = tree_bits(qtree)
                with tempfile.TemporaryDirectory() as tmp:
                    size = qetjax.save(os.path.join(tmp, "m.qet"), qtree)
                metrics = ev.evaluate(qtree, s["batches"], s["reference"])
                rows.append({**row, "status": "ok", "bpw_quantized": tb.quantized_bits_per_weight, "bpw_model": tb.bits_per_weight,
                             **metrics, "quantize_s": seconds, "file_MiB": size / 2**20, "payload_MiB": tb.total_bits / 8 / 2**20})
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def kv_rows(s: dict, methods: list[str], bits_list: list[int]) -> list[dict]:
    rows = []
    mask = s["calib"]["attention_mask"]
    tokens = int(np.sum(mask))
    reference = minilm.embed(s["params"], **s["fixture"])
    for method in methods:
        for bpe in bits_list:
            for per_head in (True, False):
                row = {"part": "kv", "method": method, "budget": bpe, "fit": "per head" if per_head else "shared"}
                shape = (tokens if per_head else tokens * 12, 32)  # params amortised over the calibration cache
                try:
                    q = qetjax.for_budget(method, shape, bpe)
                except ValueError as err:
                    rows.append({**row, "status": f"n/a ({str(err)[:60]})"})
                    continue
                t0 = time.perf_counter()
                codec = kvq.fit_kv(jax.random.key(0), q, s["calib_kv"], mask, per_head=per_head)
                seconds = time.perf_counter() - t0
                errors = ev.attention_errors(s["params"], s["fixture"], codec)
                emb = jax.jit(lambda p, c, b: minilm.embed(p, **b, kv_transform=kvq.transform(c)))(s["params"], codec, s["fixture"])
                cos = np.sum(np.asarray(reference) * np.asarray(emb), 1)
                rows.append({**row, "status": "ok", "code_bpe": kvq.code_bits_per_element(codec, 1024, 32),
                             "params_KiB": kvq.params_bits(codec) / 8 / 1024, "attn_err_mean": float(errors.mean()),
                             "attn_err_per_layer": " ".join(f"{e:.3f}" for e in errors), "cos_mean": float(cos.mean()),
                             "cos_min": float(cos.min()), "fit_s": seconds})
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def peak_memory(method: str, bpe: int) -> dict:
    """Peak host RSS increase (getrusage ru_maxrss, KiB on Linux) of quantizing all linear layers, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--memory", method, str(bpe)], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split()[-2:])
    return {"part": "memory", "method": method, "budget": bpe, "rss_before_MiB": before / 1024, "rss_peak_MiB": after / 1024,
            "delta_MiB": (after - before) / 1024}


def _memory_child(method: str, bpe: int) -> None:
    params = minilm.load_params()
    policy = _policy(params, "linear", method, bpe)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    jax.block_until_ready(qetjax.quantize_tree(jax.random.key(0), params, lambda p, x: policy.get(p), progress=False))
    print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run(methods: list[str] | None, bits_list: list[int], quick: bool, memory_methods: list[str] = ("rtn",)) -> list[dict]:
    """All measurements as a list of row dicts (``part`` is ``weights``, ``kv`` or ``memory``)."""
    known = registered_methods()
    methods = known if methods is None else methods
    s = _setup(quick)
    rows = weight_rows(s, methods, bits_list) + kv_rows(s, methods, bits_list)
    return rows + [peak_memory(m, max(bits_list)) for m in memory_methods if m in known]


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict]) -> str:
    """Markdown tables, one per ``part``/``target``."""
    out = []
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["part"], r.get("target", "")), []).append(r)
    for (part, target), rs in groups.items():
        cols = list(dict.fromkeys(k for r in rs for k in r if k not in ("part", "target")))
        out += [f"\n### {part} {target}".rstrip(), "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rs]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller corpus and calibration set")
    ap.add_argument("--methods", help="comma-separated (default: every method with a budget solver)")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--memory-methods", default="rtn")
    ap.add_argument("--memory", nargs=2, metavar=("METHOD", "BITS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.memory:
        registered_methods()
        return _memory_child(a.memory[0], int(a.memory[1]))
    rows = run(a.methods.split(",") if a.methods else None, [int(b) for b in a.bits.split(",")], a.quick, a.memory_methods.split(","))
    print(markdown(rows))


if __name__ == "__main__":
    main()
