"""SmolLM2-135M perplexity with the linear kernels of the first ``--layers`` layers quantized (+ GPTQ).

A subset runner of :mod:`qetjax.bench.smollm2` for methods too slow to quantize all 210 kernels on
a shared CPU (the trellis): the same ``--quick`` evaluation windows, calibration windows and fp32
reference, GPTQ on inputs captured once from the fp32 model (as ``eval_smollm2.py``'s ``+gptq``),
but only the q/k/v/o and gate/up/down kernels of layers ``0 .. layers-1`` are quantized (the other
layers and the tied embedding stay float32). Rows are interleaved by budget (every method at the
first budget, then the next), printed to stderr as measured and appended to ``--jsonl``.

Usage:
    PYTHONPATH=. python scripts/trellis_smollm2.py --layers 6 --bits 2 3 \\
        --methods 'trellis:state_bits=10+gptq' 'pvq:group_size=64+gptq' --jsonl /tmp/rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

from qetjax import calibration
from qetjax.bench import smollm2
from qetjax.bench.config import parse_config
from qetjax.bench.memory import MiB, RssPeak
from qetjax.bench.report import markdown_by_part
from qetjax.models import llama
from qetjax.tree import dequantize_tree, tree_bits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6, help="quantize the linear kernels of layers 0 .. layers-1")
    ap.add_argument("--bits", nargs="+", type=float, default=[2.0, 3.0])
    ap.add_argument("--methods", nargs="+", default=["trellis:state_bits=10+gptq", "pvq:group_size=64+gptq"])
    ap.add_argument("--jsonl", help="append each row to this JSON-lines file as it is measured")
    a = ap.parse_args(argv)

    s = smollm2.setup(**smollm2.SIZES["quick"])
    layers = "|".join(str(i) for i in range(a.layers))
    select = rf"^layer_({layers})/[a-z_]+_proj/kernel$"
    apply = llama.CalibrationApply(llama.config_of(s.params))
    inputs = calibration.dense_inputs(apply, llama.unstack_layers(s.params), s.calib, select=select,
                                      mask=s.calib["attention_mask"])
    rows = [{"part": "weights", "config": "fp32", "budget": "-", "ppl": s.reference_ppl, "ppl_ratio": 1.0}]
    for budget in a.bits:
        for text in a.methods:
            config = parse_config(text)
            row = {"part": "weights", "config": text, "budget": budget, "layers": a.layers, "kernels": len(inputs)}
            t0 = time.perf_counter()
            with RssPeak() as mem:
                qtree = jax.block_until_ready(
                    smollm2.quantize_weights(s.params, config, dict.fromkeys(inputs, budget), inputs=inputs))
            seconds = time.perf_counter() - t0
            ppl = smollm2.perplexity(llama.stack_layers(dequantize_tree(qtree)), s.windows)
            bits = tree_bits(qtree)
            row |= {"bpw_linear": bits.quantized_bits_per_weight, "ppl": ppl, "ppl_ratio": ppl / s.reference_ppl,
                    "quantize_s": seconds, "peak_MiB": mem.delta / MiB}
            rows.append(row)
            print(json.dumps(row, default=str), file=sys.stderr, flush=True)
            if a.jsonl:
                with open(a.jsonl, "a") as f:
                    f.write(json.dumps(row, default=str) + "\n")
            del qtree
    print(markdown_by_part(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
