"""The ``qetjax-bench`` command: every registered method at equal stored bits.

On an embedded default — a Gaussian matrix, the QET paper's synthetic dataset
and, when the ``models`` extra is installed, a real MiniLM weight matrix — each
method that has a budget solver is fitted at 2, 3 and 4 stored bits per element
and one table is printed: method, stored bits/element, MSE, SQNR, fit+encode
seconds, decode seconds (compile time excluded: each is timed on a second call).

With ``--model minilm`` it runs the MiniLM end-to-end evaluation instead
(:func:`qetjax.bench.minilm.run`): the linear kernels (as ``[out, in]``) and the word-embedding
table quantized per leaf at each budget, embedding cosine and retrieval agreement to the
fp32 model, KV-cache attention error, peak memory. ``--methods`` then takes configurations
``method[:option=value...][+gptq]``.

Example:
    $ qetjax-bench --quick
    $ qetjax-bench --bits 2 3 --methods pq rtn --csv results.csv
    $ qetjax-bench --model minilm --quick --methods rtn rtn:group_size=128 pvq:group_size=32+gptq --bits 3 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from qetjax import metrics
from qetjax.bench import curves, data, report
from qetjax.bench.config import parse_config, registered_methods
from qetjax.budget import for_budget
from qetjax.core import bits, dequantize, quantize

COLUMNS = ("data", "shape", "method", "budget", "bits_per_element", "mse", "sqnr_db", "fit_encode_s", "decode_s", "config")


DATA = ("gaussian", "qet_paper", "minilm")


def datasets(quick: bool, names: Sequence[str] = DATA, rows: int | None = None) -> dict[str, np.ndarray]:
    """The embedded default matrices (MiniLM only when its extra is installed).

    ``rows`` overrides the row count of the synthetic matrices (1024, or 256
    with ``quick``): on taller matrices a method's fixed side information
    (OPQ's rotation, LOPQ's per-cell rotations, codebooks) costs fewer bits
    per element.
    """
    shape = (256, 128) if quick else (1024, 512)
    shape = (rows or shape[0], shape[1])
    out = {}
    if "gaussian" in names:
        out["gaussian"] = np.asarray(data.gaussian(jax.random.key(0), shape))
    if "qet_paper" in names:
        out["qet_paper"] = np.asarray(data.qet_paper(jax.random.key(1), shape))
    if "minilm" not in names:
        return out
    try:
        weights = data.minilm_weights()
    except ImportError:
        return out
    name = "encoder/layer_0/attention/query/kernel" if quick else "encoder/layer_0/mlp/intermediate/kernel"
    out["minilm:" + name] = np.asarray(weights[name])
    return out


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """Calls ``fn`` twice (the first compiles) and returns the second call's output and time."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def bench_one(name: str, x: np.ndarray, method: str, budget: float) -> dict[str, Any]:
    """One table row: ``method`` fitted to ``x`` at ``budget`` stored bits per element."""
    row = {"data": name, "shape": "x".join(map(str, x.shape)), "method": method, "budget": budget}
    try:
        q = for_budget(method, x.shape, budget)
    except ValueError as err:  # the method cannot meet this budget on this shape
        return {**row, "config": f"n/a: {err}"}
    key = jax.random.key(0)
    qa, fit_s = _timed(quantize, q, key, x)
    y, dec_s = _timed(dequantize, qa)
    args = ", ".join(f"{k}={v}" for k, v in q.spec.args if not hasattr(v, "args"))
    return {
        **row,
        "bits_per_element": bits(qa)["total"] / x.size,
        "mse": metrics.mse(x, y),
        "sqnr_db": metrics.sqnr_db(x, y),
        "fit_encode_s": fit_s,
        "decode_s": dec_s,
        "config": args,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qetjax-bench``."""
    budgeted = registered_methods()
    parser = argparse.ArgumentParser(prog="qetjax-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small matrices: a seconds-long run")
    parser.add_argument("--bits", type=float, nargs="+", default=[2.0, 3.0, 4.0], help="budgets in bits/element")
    parser.add_argument("--methods", nargs="+", default=budgeted, metavar="METHOD",
                        help=f"methods to run (default: all of {budgeted}); with --model minilm, configurations "
                             "method[:option=value...][+gptq]")
    parser.add_argument("--data", nargs="+", default=list(DATA), choices=DATA,
                        help="matrices to use (minilm needs the models extra)")
    parser.add_argument("--rows", type=int, help="rows of the gaussian and qet_paper matrices (default 1024; 256 with --quick)")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows to a CSV file")
    parser.add_argument("--model", choices=["minilm", "smollm2"], help="run the end-to-end evaluation of this model instead")
    parser.add_argument("--parts", nargs="+", default=["weights", "kv", "memory"],
                        choices=["weights", "kv", "memory", "speed"],
                        help="--model minilm: measurements to make; --model smollm2: weights, kv, speed")
    parser.add_argument("--targets", nargs="+", default=["linear", "embedding"], choices=["linear", "embedding"],
                        help="--model minilm: leaves to quantize")
    parser.add_argument("--sentences", type=int, help="--model minilm: corpus size (default 128 with --quick, else 512)")
    parser.add_argument("--calib-sentences", type=int, help="--model minilm: calibration sentences (default 1024)")
    parser.add_argument("--reference-sentences", metavar="NPZ",
                        help="--model minilm: a .npz file whose 'sentences' open the corpus (e.g. the fixture "
                             "minilm_reference.npz of BENCHMARKS.md's tables; default: $QETJAX_MINILM_REFERENCE, else none)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--curves", metavar="PATH",
                        help="also measure each method's operating points (its solver at budgets 1.5..4.5, step 0.25), "
                             "print the best at each --bits budget off their lower convex hulls and plot them to PATH")
    args = parser.parse_args(argv)
    if args.model == "minilm":
        return _minilm(parser, args)
    if args.model == "smollm2":
        return _smollm2(parser, args, budgeted)
    unknown = sorted(set(args.methods) - set(budgeted))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {budgeted}")

    if args.rows is not None and args.rows < 1:
        parser.error(f"--rows must be at least 1, got {args.rows}")
    sets = datasets(args.quick, args.data, args.rows)
    jobs = [(n, x, m, b) for n, x in sets.items() for m in args.methods for b in args.bits]
    rows = []
    for job in tqdm(jobs, disable=args.no_progress, desc="qetjax-bench", file=sys.stderr):
        rows.append(bench_one(*job))
    print(report.markdown_table(rows, COLUMNS))
    if args.csv:
        report.write_csv(args.csv, rows, COLUMNS)
    if args.curves:
        print("\n" + curves.run(sets, args.methods, args.bits, args.curves)[0])
    return 0


def _minilm(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--model minilm``: :func:`qetjax.bench.minilm.run` with the command's options, printed as markdown."""
    from qetjax.bench import minilm as ev

    try:
        for c in args.methods:
            parse_config(c)
    except ValueError as err:
        parser.error(str(err))
    if args.reference_sentences is not None and not os.path.isfile(args.reference_sentences):
        parser.error(f"--reference-sentences: no file {args.reference_sentences!r}")
    sizes = dict(ev.SIZES["quick" if args.quick else "full"])
    for name in ("sentences", "calib_sentences"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)

    def on_row(row: dict) -> None:
        print(row, file=sys.stderr, flush=True)
        jax.clear_caches()  # each leaf's configuration compiles anew; keep a long run's memory bounded

    rows = ev.run(args.methods, args.bits, parts=args.parts, targets=args.targets, reference=args.reference_sentences,
                  on_row=on_row, **sizes)
    print(report.markdown_by_part(rows))
    if args.csv:
        report.write_csv(args.csv, rows)
    return 0


def _smollm2(parser: argparse.ArgumentParser, args: argparse.Namespace, budgeted: Sequence[str]) -> int:
    """``--model smollm2``: :func:`qetjax.bench.smollm2.report_rows` (default configurations unless --methods)."""
    from qetjax.bench import smollm2

    methods = list(smollm2.WEIGHT_CONFIGS) if list(args.methods) == list(budgeted) else args.methods
    try:
        for c in methods:
            parse_config(c)
    except ValueError as err:
        parser.error(str(err))
    parts = [p for p in args.parts if p != "memory"]  # smollm2's weight rows carry their peak memory

    def on_row(row: dict) -> None:
        print(row, file=sys.stderr, flush=True)
        jax.clear_caches()  # each configuration compiles anew; keep a long run's memory bounded

    rows = smollm2.report_rows(args.quick, args.bits, methods, parts=parts, progress=not args.no_progress, on_row=on_row)
    print(report.markdown_by_part(rows))
    if args.csv:
        report.write_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
