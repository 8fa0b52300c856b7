"""SmolLM2-135M end to end: perplexity with quantized weights / KV caches, and generation speed.

A thin runner of :func:`qetjax.bench.smollm2.report_rows` (as ``qetjax-bench --model smollm2``).
Perplexity windows: ``--quick`` 8 windows of 256 tokens (2,040 scored tokens), else 32 of 512
(16,352 scored tokens), from the frozen ``eval`` corpus; calibration from the disjoint ``calib``
corpus. Each row is also printed to stderr as it is measured (and appended to ``--jsonl``).

Usage:
    python scripts/eval_smollm2.py --quick --bits 2 3 4 --methods rtn pq pvq:group_size=64 pvq:group_size=64+gptq
    python scripts/eval_smollm2.py --quick --parts kv speed --bits 2 3 4
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from qetjax.bench import smollm2
from qetjax.bench.report import markdown_by_part, write_csv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 windows of 256 tokens (else 32 of 512)")
    ap.add_argument("--bits", nargs="+", type=float, default=[2.0, 3.0, 4.0])
    ap.add_argument("--methods", nargs="+", default=list(smollm2.WEIGHT_CONFIGS),
                    help="weight configs method[:opt=value...][+gptq][+mixed]")
    ap.add_argument("--kv-methods", nargs="+", default=list(smollm2.KV_CONFIGS),
                    help="registered methods for the KV cache (KIVI and KVQuant-style always run)")
    ap.add_argument("--parts", nargs="+", default=["weights", "kv", "speed"], choices=["weights", "kv", "speed"])
    ap.add_argument("--calib-windows", type=int,
                    help="calibration windows for GPTQ / mixed budgets (default: 8 with --quick, else 16)")
    ap.add_argument("--kv-calib-windows", type=int,
                    help="calibration windows the KV methods are fitted on (default: 2 with --quick, else 4)")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    ap.add_argument("--jsonl", help="append each row to this JSON-lines file as it is measured")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    def on_row(row: dict) -> None:
        print(json.dumps(row, default=str), file=sys.stderr, flush=True)
        if a.jsonl:
            with open(a.jsonl, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        jax.clear_caches()  # each configuration compiles anew; keep a long run's memory bounded

    rows = smollm2.report_rows(a.quick, a.bits, a.methods, a.kv_methods, a.parts, not a.no_progress, on_row,
                                calib_windows=a.calib_windows, kv_calib_windows=a.kv_calib_windows)
    print(markdown_by_part(rows))
    if a.csv:
        write_csv(a.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
