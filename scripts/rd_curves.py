"""Rate-distortion on an iid Gaussian matrix: the exact-budget table, speed, and RD curves.

Three parts (``--parts``), all on ``N(0, 1)`` matrices, every stored bit counted:

- ``table``: each method's budget solver at 2, 3 and 4 stored bits per element on a
  ``--rows x --cols`` matrix (default 4096 x 512): stored bits, SQNR, the Shannon bound at
  the budget and the distance to it, fit+encode and decode seconds of one call (compilation
  included; the ``speed`` part times compiled calls).
- ``speed``: fit+encode and decode of ``--speed-methods`` at 3 bits on a
  ``--speed-rows x --cols`` matrix, each timed on a second call (compiled), side by side.
- ``curves``: operating points of every method (its solver asked at budgets 1.5 .. 4.5 in
  steps of ``--step``) on a ``--curve-rows x --cols`` matrix, their lower convex hulls, the
  best SQNR read off each hull at 2, 3, 4 bits, and the plot (``--plot``).

Methods are ``name[:option=value...]`` (values JSON), e.g. ``trellis:scale="tensor"``.

Example:
    $ python scripts/rd_curves.py --parts table --methods trellis lloyd_max
    $ python scripts/rd_curves.py --parts curves --curve-rows 512 --plot docs/rd_curves.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from qetjax import metrics
from qetjax.bench import curves
from qetjax.budget import for_budget
from qetjax.core import bits, dequantize, quantize

DEFAULT_METHODS = ["trellis", 'trellis:scale="tensor"', "pvq", "pq", "rotated_rtn", "nf", "lloyd_max", "rtn"]


def parse(text: str) -> tuple[str, dict]:
    """``name[:option=value...]`` -> (name, options); values are JSON, else plain strings."""
    name, *opts = text.split(":")
    options = {}
    for o in opts:
        k, _, v = o.partition("=")
        try:
            options[k] = json.loads(v)
        except json.JSONDecodeError:
            options[k] = v
    return name, options


def gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), (rows, cols)), np.float32)


def timed(fn, *args, repeat: int = 1):
    out = jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeat - 1):
        out = jax.block_until_ready(fn(*args))
    return out, (time.perf_counter() - t0) / max(1, repeat - 1)


def table(methods: list[str], budgets: list[float], x: np.ndarray) -> None:
    print(f"\n### Exact budgets, iid Gaussian {x.shape[0]}x{x.shape[1]}\n")
    print("| method | budget | config | stored bits/elem | SQNR dB | bound dB | gap dB | fit+encode s | decode s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in methods:
        name, options = parse(m)
        for b in budgets:
            try:
                q = for_budget(name, x.shape, b, **options)
            except ValueError as err:
                print(f"| {m} | {b:g} | n/a: {err} | | | | | | |", flush=True)
                continue
            t0 = time.perf_counter()
            qa = jax.block_until_ready(quantize(q, jax.random.key(0), x))
            t1 = time.perf_counter()
            y = np.asarray(jax.block_until_ready(dequantize(qa)))
            t2 = time.perf_counter()
            s = metrics.sqnr_db(x, y)
            bound = float(curves.shannon_sqnr_db(b))
            cfg = ", ".join(f"{k}={v}" for k, v in q.spec.args if not hasattr(v, "args"))
            print(f"| {m} | {b:g} | {cfg} | {bits(qa)['total'] / x.size:.4f} | {s:.2f} | {bound:.2f} | "
                  f"{bound - s:.2f} | {t1 - t0:.2f} | {t2 - t1:.3f} |", flush=True)


def speed(methods: list[str], x: np.ndarray, budget: float = 3.0) -> None:
    print(f"\n### Speed at {budget:g} bits, iid Gaussian {x.shape[0]}x{x.shape[1]} (compiled calls)\n")
    print("| method | config | fit+encode s | encode Mweights/s | decode s | decode Mweights/s |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        name, options = parse(m)
        q = for_budget(name, x.shape, budget, **options)
        qa, enc = timed(quantize, q, jax.random.key(0), x, repeat=2)
        _, dec = timed(dequantize, qa, repeat=4)
        cfg = ", ".join(f"{k}={v}" for k, v in q.spec.args if not hasattr(v, "args"))
        print(f"| {m} | {cfg} | {enc:.3f} | {x.size / enc / 1e6:.3f} | {dec:.4f} | {x.size / dec / 1e6:.1f} |",
              flush=True)


def rd_curves(methods: list[str], x: np.ndarray, step: float, plot_path: str | None) -> None:
    budgets = np.arange(1.5, 4.5 + 1e-9, step)
    points = {}
    for m in methods:
        name, options = parse(m)
        points[m] = curves.operating_points(x, name, budgets, label=m, **options)
        print(f"{m}: {len(points[m])} operating points", file=sys.stderr, flush=True)
    print(f"\n### Operating points, iid Gaussian {x.shape[0]}x{x.shape[1]} (budgets {budgets[0]:g}..{budgets[-1]:g})\n")
    print("| method | bits/elem | SQNR dB | on hull | config |")
    print("|---|---|---|---|---|")
    for m, pts in points.items():
        hull = set(curves.lower_convex_hull(pts))
        for p in pts:
            print(f"| {m} | {p.bits_per_element:.4f} | {p.sqnr_db:.2f} | {'yes' if p in hull else ''} | {p.config} |")
    print("\n### Best at budget, read off the hulls\n")
    readings = [curves.best_at_budget(curves.lower_convex_hull(pts), b) for b in (2.0, 3.0, 4.0)
                for pts in points.values() if pts]
    print(curves.markdown_readings(readings))
    line = " | ".join(f"{b:g}: {float(curves.shannon_sqnr_db(b)):.2f} / {float(curves.ecsq_curve([b])[0]):.2f}"
                      for b in (2.0, 3.0, 4.0))
    print(f"\nShannon bound / entropy-coded scalar quantizer (dB) at {line}")
    if plot_path:
        curves.plot(points, plot_path, title=f"iid Gaussian {x.shape[0]}x{x.shape[1]}: SQNR vs stored bits")
        print(f"\nplot written to {plot_path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["table", "speed", "curves"], choices=["table", "speed", "curves"])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--bits", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=512)
    p.add_argument("--speed-methods", nargs="+", default=["trellis", "pvq", "pq"])
    p.add_argument("--speed-rows", type=int, default=512)
    p.add_argument("--curve-rows", type=int, default=512)
    p.add_argument("--step", type=float, default=0.25)
    p.add_argument("--plot", help="write the RD plot here (PNG)")
    args = p.parse_args(argv)
    if "table" in args.parts:
        table(args.methods, args.bits, gaussian(args.rows, args.cols))
    if "speed" in args.parts:
        speed(args.speed_methods, gaussian(args.speed_rows, args.cols, seed=1))
    if "curves" in args.parts:
        rd_curves(args.methods, gaussian(args.curve_rows, args.cols, seed=2), args.step, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
