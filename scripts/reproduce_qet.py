"""Reproduces the QET paper's experiment and extends it to Gaussian and MiniLM weights.

Every method is built with ``qetjax.for_budget`` at the same stored bits per
element (codes, codebooks at their stored width, indicator maps, scales and
rotations all count). Prints markdown tables:

* A. the paper's setting: ``qet_paper`` data, compression ratios 4/8/12/16 against
  fp32, 8 subspaces, QET with 1..4 levels vs PQ, OPQ, RTN; MSE, MAE, MRE, SQNR,
  QTR/DTR (fit+encode / decode time over PQ's at the same ratio, same run);
  the paper's "MSE in 1-4 iterations" ratios at equal centroids (indicators not
  counted) and at equal stored bits; Table 1 (block ranges, codebook share).
* B. Gaussian and MiniLM-L6 weights (intermediate [384, 1536], attention query
  [384, 384]) at 2, 3, 4 bits per element, with CQO and Residual Optimization.
* C. order-0 entropy of the indicator maps per level.
* D. speed: QET vs PQ at the same centroids.

Usage:
    python scripts/reproduce_qet.py [--quick] [--rows 1024 --cols 512]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import qetjax
from qetjax import metrics, swap_tree
from qetjax.bench import data
from qetjax.methods.qet import qet

try:
    from qetjax.methods import opq as _opq  # noqa: F401  (registers "opq")

    HAVE_OPQ = True
except ImportError:
    HAVE_OPQ = False

KEY = jax.random.key(0)
MINILM = {
    "MiniLM L0 intermediate": "encoder/layer_0/mlp/intermediate/kernel",
    "MiniLM L0 attn query": "encoder/layer_0/attention/query/kernel",
}


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` (dicts) restricted to ``columns``."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def describe(q: qetjax.Quantizer) -> str:
    """A short description of a quantizer's configuration."""
    a = dict(q.spec.args)
    if q.spec.name in ("pq", "opq"):
        return f"k={a['num_centroids']}"
    if q.spec.name == "qet":
        cb = f", cb{a['codebook_bits']}" if a["codebook_bits"] else ""
        return f"L={a['levels']}, k={a['num_centroids']}{cb}"
    if q.spec.name == "rtn":
        return f"{a['bits']}b, g={a['group_size'] or a['granularity'] or 'row'}"
    if q.spec.name == "qet_residual":
        second = qetjax.core.from_spec(a["second"])
        return f"L={a['levels']}, k={a['num_centroids']} + {second.spec.name}({describe(second)})"
    return q.spec.name


def build(method: str, shape, bpe: float, **options):
    """``for_budget`` or ``None`` when nothing of the method fits the budget."""
    try:
        return qetjax.for_budget(method, shape, bpe, **options)
    except ValueError as err:
        if "too small" in str(err):
            return None
        raise


def evaluate(name: str, q, x, repeats: int) -> dict:
    """Quantizes ``x`` with ``q``; errors, stored-bit shares and timings."""
    qa, tq = metrics.time_fn(qetjax.quantize, q, KEY, x, repeats=repeats)
    y, td = metrics.time_fn(qetjax.dequantize, qa, repeats=repeats)
    b = qetjax.bits(qa)
    book = sum(v for k, v in b.items() if k.startswith("codebook"))
    return {
        "method": name,
        "config": describe(q),
        "bits/el": b["total"] / x.size,
        "codebook %": 100 * book / b["total"],
        "indicators %": 100 * b.get("indicators", 0) / b["total"],
        "MSE": metrics.mse(x, y),
        "MAE": metrics.mae(x, y),
        "MRE": metrics.mre(x, y),
        "SQNR dB": metrics.sqnr_db(x, y),
        "fit+enc s": tq.run_s,
        "dec s": td.run_s,
        "compile s": tq.compile_s + td.compile_s,
    }


def missing(name: str, why: str) -> dict:
    return {"method": name, "config": why}


def methods_at(shape, bpe: float, levels: range, extended: bool):
    """(name, quantizer or None, why) of every method at one budget."""
    d = shape[1] // 8
    out = [("PQ", build("pq", shape, bpe, subvector_dim=d), "does not fit")]
    if HAVE_OPQ:
        opq = build("opq", shape, bpe, subvector_dim=d, rotation_dtype="float16")
        out.append(("OPQ (fp16 rotation)", opq, "does not fit (rotation)"))
    else:
        out.append(("OPQ", None, "n/a (not yet)"))
    out.append(("RTN", build("rtn", shape, bpe), "does not fit"))
    for lv in levels:
        out.append((f"QET L={lv}", build("qet", shape, bpe, levels=lv, subspaces=8), "does not fit (indicators)"))
    if extended:
        out.append(("PQ CQO10", build("pq", shape, bpe, subvector_dim=d, codebook_bits=10), "does not fit"))
        out.append(("QET L=1 CQO10", build("qet", shape, bpe, levels=1, subspaces=8, codebook_bits=10), "does not fit"))
        for stage in ("pq", "rtn"):
            paper = build("qet_residual", shape, bpe, residual_stage=stage)
            out.append((f"QET-paper res={stage}", paper, "does not fit"))
    else:
        out.append(("QET-paper res=pq", build("qet_residual", shape, bpe), "does not fit"))
    return out


def run_budget(x, bpe: float, levels: range, extended: bool, repeats: int) -> list[dict]:
    """All methods at one budget on ``x``, with QTR/DTR against PQ."""
    rows = []
    for name, q, why in methods_at(x.shape, bpe, levels, extended):
        rows.append(evaluate(name, q, x, repeats) if q is not None else missing(name, why))
    pq_row = rows[0]
    for r in rows:
        if "MSE" in r and "MSE" in pq_row:
            r["QTR"] = r["fit+enc s"] / pq_row["fit+enc s"]
            r["DTR"] = r["dec s"] / pq_row["dec s"]
            r["MSE / PQ"] = r["MSE"] / pq_row["MSE"]
    return rows


def block_ranges(x, levels: int) -> tuple[list[float], list[float]]:
    """Range and std of each swap-tree output block relative to the whole matrix's."""
    y, _ = swap_tree.forward(x, levels)
    y = np.asarray(y)
    widths = swap_tree.block_widths(x.shape[1], levels)
    edges = np.cumsum((0,) + widths)
    xr, xs = float(np.ptp(np.asarray(x))), float(np.std(np.asarray(x)))
    blocks = [y[:, a:b] for a, b in zip(edges[:-1], edges[1:])]
    return [float(np.ptp(b)) / xr for b in blocks], [float(np.std(b)) / xs for b in blocks]


def equal_centroid_ratios(x, bpe: float, levels: range) -> dict:
    """The paper's view: QET(L) MSE / PQ MSE with PQ's centroids, indicators not counted."""
    pq_q = qetjax.for_budget("pq", x.shape, bpe, subvector_dim=x.shape[1] // 8)
    k, d = dict(pq_q.spec.args)["num_centroids"], x.shape[1] // 8
    base = metrics.mse(x, qetjax.dequantize(qetjax.quantize(pq_q, KEY, x)))
    out = {"k": k}
    for lv in levels:
        qa = qetjax.quantize(qet(lv, d, k), KEY, x)
        out[f"L={lv}"] = metrics.mse(x, qetjax.dequantize(qa)) / base
    return out


def entropy_rows(name: str, x, levels: range) -> list[dict]:
    rows = []
    for lv in levels:
        _, ind = swap_tree.forward(x, lv)
        h = np.asarray(swap_tree.indicator_entropy(ind))
        per_level = [b.shape[1] * x.shape[0] for b in swap_tree.indicator_bits(ind)]
        saved = sum((1 - hl) * nb for hl, nb in zip(h, per_level)) / x.size
        rows.append(
            {
                "data": name,
                "levels": lv,
                "H per level (bits/bit)": ", ".join(f"{v:.5f}" for v in h),
                "indicator bits/el": sum(per_level) / x.size,
                "order-0 saving bits/el": saved,
            }
        )
    return rows


def speed_rows(x, k: int, repeats: int) -> list[dict]:
    d = x.shape[1] // 8
    rows = []
    for name, q in [("PQ", qetjax.pq(d, k))] + [(f"QET L={lv}", qet(lv, d, k)) for lv in (1, 2, 3, 4)]:
        qa, tq = metrics.time_fn(qetjax.quantize, q, KEY, x, repeats=repeats)
        _, td = metrics.time_fn(qetjax.dequantize, qa, repeats=repeats)
        rows.append(
            {
                "method": name,
                "fit+enc s": tq.run_s,
                "dec s": td.run_s,
                "compile s": tq.compile_s + td.compile_s,
                "dec MB/s (fp32 out)": x.size * 4 / td.run_s / 1e6,
            }
        )
    for r in rows:
        r["QTR"], r["DTR"] = r["fit+enc s"] / rows[0]["fit+enc s"], r["dec s"] / rows[0]["dec s"]
    return rows


COLS = ["method", "config", "bits/el", "MSE", "MAE", "MRE", "SQNR dB", "MSE / PQ", "QTR", "DTR", "codebook %", "indicators %"]
SHORT = ["method", "config", "bits/el", "MSE", "SQNR dB", "MSE / PQ", "codebook %", "indicators %"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small matrices, fewer settings")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the first (compile) call in A and D")
    parser.add_argument("--sections", default="ABCD", help="which sections to run, e.g. 'BCD'")
    args = parser.parse_args()
    shape = (256, 128) if args.quick else (args.rows, args.cols)
    levels = range(1, 5)
    t0 = time.time()
    print(f"# QET reproduction (shape {shape}, {'quick' if args.quick else 'full'}; jax {jax.__version__}, "
          f"{jax.devices()[0].platform}; OPQ {'available' if HAVE_OPQ else 'n/a (not yet)'})\n")

    x = data.qet_paper(jax.random.key(1), shape)
    if "A" in args.sections:
        section_a(x, shape, levels, args.repeats)
    sets = {"Gaussian": data.gaussian(jax.random.key(2), shape)}
    weights = data.minilm_weights(list(MINILM.values()) if not args.quick else [MINILM["MiniLM L0 attn query"]])
    for label, path in MINILM.items():
        if path in weights:
            sets[f"{label} {weights[path].shape}"] = jax.numpy.asarray(weights[path])
    if "B" in args.sections:
        section_b(sets, args.quick)
    if "C" in args.sections:
        print("## C. Indicator map entropy (order 0, per level)\n")
        ent = []
        for name, xs in [("qet_paper", x)] + list(sets.items()):
            ent += entropy_rows(name, xs, levels)
        print(table(ent, ["data", "levels", "H per level (bits/bit)", "indicator bits/el", "order-0 saving bits/el"]) + "\n")
    if "D" in args.sections:
        print(f"## D. Speed: QET vs PQ at the same centroids (qet_paper {shape}, k=256, median of {args.repeats})\n")
        print(table(speed_rows(x, min(256, shape[0]), args.repeats),
                    ["method", "fit+enc s", "dec s", "compile s", "QTR", "DTR", "dec MB/s (fp32 out)"]) + "\n")
    print(f"Total wall time {time.time() - t0:.0f} s (2 shared CPU cores, timings under load).")


def section_a(x: jax.Array, shape: tuple[int, int], levels: range, repeats: int) -> None:
    """The paper's experiment: QET vs baselines at compression ratios 4..16."""
    print(f"## A. Paper setting: qet_paper data {shape}, 8 subspaces, equal stored bits\n")
    best = {}
    for ratio in (4, 8, 12, 16):
        bpe = 32 / ratio
        rows = run_budget(x, bpe, levels, False, repeats)
        print(f"### Compression ratio {ratio} ({bpe:.3g} bits/element)\n")
        print(table(rows, COLS) + "\n")
        qets = [r for r in rows if r["method"].startswith("QET") and "MSE" in r]
        bases = [r for r in rows if not r["method"].startswith("QET") and "MSE" in r]
        if qets and bases:
            bq, bb = min(qets, key=lambda r: r["MSE"]), min(bases, key=lambda r: r["MSE"])
            best[ratio] = (bq["method"], bb["method"], bq["MSE"] / bb["MSE"])
    print("### Best QET vs best baseline at equal stored bits\n")
    print(table([{"ratio": r, "best QET": a, "best baseline": b, "MSE ratio": m} for r, (a, b, m) in best.items()],
                ["ratio", "best QET", "best baseline", "MSE ratio"]) + "\n")

    print("### Paper's claim, MSE(QET L) / MSE(PQ) at PQ's centroids (indicator bits NOT counted)\n")
    eq = [{"ratio": r, **equal_centroid_ratios(x, 32 / r, levels)} for r in (4, 8, 12, 16)]
    print(table(eq, ["ratio", "k"] + [f"L={lv}" for lv in levels]) + "\n")

    print("### Table 1: block range and std after the swap tree, relative to the whole matrix\n")
    t1 = []
    for lv in levels:
        rng, std = block_ranges(x, lv)
        t1.append({"levels": lv, "range / range(x) per block": ", ".join(f"{v:.3f}" for v in rng),
                   "std / std(x) per block": ", ".join(f"{v:.3f}" for v in std)})
    print(table(t1, ["levels", "range / range(x) per block", "std / std(x) per block"]) + "\n")
    xc = np.asarray(x)
    print(f"(data: min {xc.min():.3f}, max {xc.max():.3f}, {int((np.abs(xc - 0.5) > 0.5).sum())} outliers outside [0, 1])\n")


def section_b(sets: dict, quick: bool) -> None:
    """Gaussian and MiniLM matrices at 2/3/4 bits with the CQO and residual variants."""
    print("## B. Gaussian and MiniLM weights, 2/3/4 bits per element, CQO and Residual Optimization\n")
    for name, xs in sets.items():
        for bpe in ((2.0, 4.0) if quick else (2.0, 3.0, 4.0)):
            rows = run_budget(xs, bpe, range(1, 3), True, 1)
            print(f"### {name}, {bpe:g} bits/element\n")
            print(table(rows, SHORT) + "\n")


if __name__ == "__main__":
    main()
