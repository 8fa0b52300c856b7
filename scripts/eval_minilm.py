"""Quantized MiniLM-L6 end metrics at 2, 3, 4 stored bits per weight (a thin runner of ``qetjax.bench.minilm.run``).

Weights: the 36 linear kernels (quantized as ``[out, in]``, rows = output channels, unless
``--layout in_out``) and, separately, the word-embedding table, each leaf with
``qetjax.for_budget(method, shape, bits, **options)`` (optionally GPTQ on calibration inputs);
reported: bits/weight over the quantized leaves and the whole model, embedding cosine to the
fp32 model (mean, worst), retrieval top-1/top-5 agreement, quantize wall time (compilation
included), saved file size. KV cache: quantizers fitted once per layer (per head or shared) on
calibration sentences, applied to 32 held-out sentences: attention-output relative error per
layer, embedding cosine. Memory: in a fresh process, RSS polled every 10 ms while all linear
kernels are quantized (peak minus RSS just before; first call with compilation, then cached).

The tables of BENCHMARKS.md open the corpus with the 32 sentences of the reference fixture:
``--reference-sentences ../shared/fixtures/minilm_reference.npz`` (or ``$QETJAX_MINILM_REFERENCE``).

Usage:
    python scripts/eval_minilm.py --quick --methods rtn rtn:group_size=128 pvq:group_size=32+gptq --bits 3 4
"""

from __future__ import annotations

import argparse
import sys

import jax

from qetjax.bench import minilm as ev
from qetjax.bench.config import registered_methods
from qetjax.bench.report import markdown_by_part


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="128 sentences at max_length 64 (else 512 at 128); see qetjax.bench.minilm.SIZES")
    ap.add_argument("--calib-sentences", type=int, help="calibration sentences (default 1024)")
    ap.add_argument("--methods", nargs="+", help="configs method[:opt=value...][+gptq] (default: every budgeted method)")
    ap.add_argument("--bits", nargs="+", type=float, default=[2.0, 3.0, 4.0])
    ap.add_argument("--parts", nargs="+", default=["weights", "kv", "memory"], choices=["weights", "kv", "memory"])
    ap.add_argument("--targets", nargs="+", default=list(ev.TARGETS), choices=list(ev.TARGETS))
    ap.add_argument("--layout", choices=["out_in", "in_out"], help="layout of the linear kernels (default out_in)")
    ap.add_argument("--kv-methods", nargs="+", help="KV-cache configs (default: --methods without +gptq)")
    ap.add_argument("--memory-methods", nargs="+", default=["rtn"])
    ap.add_argument("--reference-sentences", metavar="NPZ",
                    help=f"a .npz whose 'sentences' open the corpus (default ${ev.REFERENCE_ENV}, else none)")
    a = ap.parse_args(argv)
    sizes = dict(ev.SIZES["quick" if a.quick else "full"])
    if a.calib_sentences is not None:
        sizes["calib_sentences"] = a.calib_sentences

    def on_row(row: dict) -> None:
        print(row, file=sys.stderr, flush=True)
        jax.clear_caches()  # each configuration compiles anew; keep a long run's memory bounded

    rows = ev.run(a.methods or registered_methods(), a.bits, parts=a.parts, targets=a.targets, layout=a.layout,
                  kv_configs=a.kv_methods, memory_configs=a.memory_methods, reference=a.reference_sentences,
                  on_row=on_row, **sizes)
    print(markdown_by_part(rows))


if __name__ == "__main__":
    main()
