"""Speed of qetjax product quantization beside faiss-cpu and scipy, in one run.

On one float32 Gaussian matrix (4096 x 4096; ``--quick``: 512 x 256), for
subvector sizes 4 and 2 with 256 centroids (2 and 4 bits/element of codes) and
both layouts (one codebook per column group, one shared codebook), it times
fit, encode and decode and measures the MSE of:

* qetjax ``pq(d, 256, codebook_dtype="float32", iters=25)`` (compile time
  reported separately, via ``qetjax.metrics.time_fn``);
* faiss ``ProductQuantizer`` (25 iterations): at its defaults (OpenMP threads =
  cores) and tuned (one thread, ``distance_compute_blas_threshold = 1``). The
  shared layout trains one ``faiss.Kmeans`` on all subvectors (subsampled to
  256 points per centroid, like qetjax) and encodes/decodes with a
  ``ProductQuantizer`` whose every sub-codebook is that codebook. faiss's
  "WARNING clustering ... please provide at least" lines are silenced by
  ``min_points_per_centroid = 1``, which only controls that warning;
* scipy ``kmeans2`` (25 iterations, k-means++ init) and ``vq``: slow, so timed
  on a few subspaces (or rows) and extrapolated linearly (marked ``~``).

Implementations run interleaved in the same process, ``--repeats`` rounds;
tables show medians. Decode is reported as achieved output bytes/second beside
the machine's write bandwidth measured here, both into a fresh buffer (a jitted
function's new output pays first-touch page faults) and into a
preallocated/donated buffer.

Run: ``PYTHONPATH=. python scripts/bench_speed.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no OpenMP spinning on a shared machine

import faiss  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.cluster.vq as vq  # noqa: E402

import qetjax  # noqa: E402
from qetjax.metrics import time_fn  # noqa: E402

K, ITERS = 256, 25


def timed(fn, *args):
    """(result, seconds) of one call, waited on."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------- bandwidth


def bandwidth(x: np.ndarray, repeats: int) -> dict[str, float]:
    """Write bandwidth (bytes written / s) of a numpy copy and of jitted functions."""
    dst = np.empty_like(x)
    np.copyto(dst, x)
    out = {}
    out["numpy copy into preallocated buffer"] = min(timed(np.copyto, dst, x)[1] for _ in range(repeats))
    xj = jnp.asarray(x)
    fresh = jax.jit(lambda a: a * 2.0)
    jax.block_until_ready(fresh(xj))
    out["jit a*2, fresh output"] = min(timed(fresh, xj)[1] for _ in range(repeats))
    inplace = jax.jit(lambda a: a * 2.0, donate_argnums=0)
    buf = inplace(jnp.array(x))
    ts = []
    for _ in range(repeats):
        buf, t = timed(inplace, buf)
        ts.append(t)
    out["jit a*2, donated buffer (in place)"] = min(ts)
    return {k: x.nbytes / v for k, v in out.items()}


# --------------------------------------------------------------------------- qetjax


class Qetjax:
    """qetjax PQ, compiled once; ``run`` times one fit/encode/decode round."""

    def __init__(self, x: jax.Array, d: int, shared: bool):
        self.x = x
        self.q = qetjax.pq(d, K, shared_codebook=shared, codebook_dtype="float32", iters=ITERS)
        self.fit = jax.jit(self.q.fit)
        self.encode = jax.jit(self.q.encode)
        self.decode = jax.jit(self.q.decode)
        self.decode_into = jax.jit(lambda p, c, out: self.q.decode(p, c), donate_argnums=2)
        self.decode_sum = jax.jit(lambda p, c: jnp.sum(self.q.decode(p, c), axis=0))
        key = jax.random.key(0)
        self.params, t_fit = time_fn(self.fit, key, x, repeats=1)
        self.codes, t_enc = time_fn(self.encode, self.params, x, repeats=1)
        _, t_dec = time_fn(self.decode, self.params, self.codes, repeats=1)
        self.buf = self.decode_into(self.params, self.codes, jnp.zeros_like(x))
        jax.block_until_ready(self.decode_sum(self.params, self.codes))
        self.compile = {"fit": t_fit.compile_s, "encode": t_enc.compile_s, "decode": t_dec.compile_s}

    def run(self, round_: int) -> dict[str, float]:
        r = {}
        self.params, r["fit"] = timed(self.fit, jax.random.key(round_), self.x)
        self.codes, r["encode"] = timed(self.encode, self.params, self.x)
        y, r["decode"] = timed(self.decode, self.params, self.codes)
        self.buf, r["decode_into"] = timed(self.decode_into, self.params, self.codes, self.buf)
        _, r["decode_sum"] = timed(self.decode_sum, self.params, self.codes)
        r["mse"] = qetjax.metrics.mse(self.x, y)
        return r


# --------------------------------------------------------------------------- faiss


def faiss_settings(tuned: bool) -> None:
    faiss.omp_set_num_threads(1 if tuned else os.cpu_count())
    faiss.cvar.distance_compute_blas_threshold = 1 if tuned else 20


def faiss_run(x: np.ndarray, d: int, shared: bool, tuned: bool, seed: int) -> dict[str, float]:
    faiss_settings(tuned)
    n, w = x.shape
    pq = faiss.ProductQuantizer(w, w // d, 8)
    pq.cp.niter = ITERS
    pq.cp.seed = seed
    pq.cp.min_points_per_centroid = 1  # only silences the "please provide at least" warning
    pq.verbose = False
    r = {}
    t0 = time.perf_counter()
    if shared:
        km = faiss.Kmeans(d, K, niter=ITERS, seed=seed, max_points_per_centroid=256, min_points_per_centroid=1)
        km.train(x.reshape(-1, d))
        faiss.copy_array_to_vector(np.tile(km.centroids.reshape(-1), w // d), pq.centroids)
    else:
        pq.train(x)
    r["fit"] = time.perf_counter() - t0
    codes, r["encode"] = timed(pq.compute_codes, x)
    y, r["decode"] = timed(pq.decode, codes)
    r["mse"] = float(np.mean((x - y) ** 2))
    return r


# --------------------------------------------------------------------------- scipy


def scipy_run(x: np.ndarray, d: int, shared: bool, sample: int, seed: int) -> dict[str, float]:
    """scipy on ``sample`` subspaces (per group) or rows (shared), extrapolated."""
    n, w = x.shape
    parts = x.reshape(n, w // d, d)
    rng = np.random.default_rng(seed)
    r = {}
    if shared:
        train = parts.reshape(-1, d)
        train = train[rng.choice(train.shape[0], min(train.shape[0], 256 * K), replace=False)]
        t0 = time.perf_counter()
        c, _ = vq.kmeans2(train, K, iter=ITERS, minit="++", seed=seed)
        r["fit"] = time.perf_counter() - t0
        rows = min(n, sample)
        t0 = time.perf_counter()
        codes, _ = vq.vq(parts[:rows].reshape(-1, d), c)
        r["encode"] = (time.perf_counter() - t0) * n / rows
        y = c[codes]
        r["mse"] = float(np.mean((parts[:rows].reshape(-1, d) - y) ** 2))
        return r
    s = min(w // d, sample)
    fit = enc = err = 0.0
    for j in range(s):
        t0 = time.perf_counter()
        c, _ = vq.kmeans2(parts[:, j], K, iter=ITERS, minit="++", seed=seed + j)
        t1 = time.perf_counter()
        codes, _ = vq.vq(parts[:, j], c)
        enc += time.perf_counter() - t1
        fit += t1 - t0
        err += float(np.mean((parts[:, j] - c[codes]) ** 2))
    scale = (w // d) / s
    return {"fit": fit * scale, "encode": enc * scale, "mse": err / s}


# --------------------------------------------------------------------------- tables


def med(rows: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in rows]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="512 x 256 instead of 4096 x 4096")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median reported)")
    ap.add_argument("--scipy-sample", type=int, default=4, help="subspaces (rows x 256 when shared) timed for scipy")
    args = ap.parse_args()
    shape = (512, 256) if args.quick else (4096, 4096)
    x_np = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    x = jnp.asarray(x_np)
    out_bytes = x_np.nbytes

    print(f"# qetjax PQ vs faiss {faiss.__version__} vs scipy: {shape[0]}x{shape[1]} float32 Gaussian, "
          f"k={K}, {ITERS} iterations, median of {args.repeats} interleaved rounds")
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}, load average at start {os.getloadavg()[0]:.1f} "
          f"(shared with other jobs: timings are noisy). OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}.\n")

    bw = bandwidth(x_np, max(3, args.repeats))
    print("## Memory write bandwidth (bytes written / s)\n\n| operation | GB/s |\n|---|---|")
    for k, v in bw.items():
        print(f"| {k} | {v / 1e9:.1f} |")

    results = []
    for d in (4, 2):
        for shared in (False, True):
            layout = "shared" if shared else "per-group"
            q = Qetjax(x, d, shared)
            rows = {"qetjax": [], "faiss default": [], "faiss tuned": []}
            for r in range(args.repeats):
                rows["qetjax"].append(q.run(r))
                rows["faiss default"].append(faiss_run(x_np, d, shared, False, r))
                rows["faiss tuned"].append(faiss_run(x_np, d, shared, True, r))
            sc = scipy_run(x_np, d, shared, args.scipy_sample * (256 if shared else 1), 0)
            results.append((d, layout, q.compile, rows, sc))
            print(f"\n... done d={d} {layout}", flush=True)

    print("\n## Fit + encode (seconds, median) and MSE\n")
    print("| bits/el | d | layout | impl | fit | encode | fit+encode | compile (fit/enc/dec) | MSE | "
          "(fit+enc) / faster faiss | MSE / faiss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d, layout, comp, rows, sc in results:
        fe = {name: med(rs, "fit") + med(rs, "encode") for name, rs in rows.items()}
        best = min(("faiss default", "faiss tuned"), key=fe.get)
        mse_f = med(rows[best], "mse")
        for name, rs in rows.items():
            c = f"{comp['fit']:.1f}/{comp['encode']:.1f}/{comp['decode']:.1f}" if name == "qetjax" else ""
            print(f"| {8 // d} | {d} | {layout} | {name} | {med(rs, 'fit'):.3f} | {med(rs, 'encode'):.3f} | "
                  f"{fe[name]:.3f} | {c} | {med(rs, 'mse'):.5f} | {fe[name] / fe[best]:.2f} | "
                  f"{med(rs, 'mse') / mse_f:.3f} |")
        print(f"| {8 // d} | {d} | {layout} | scipy kmeans2 (~extrapolated) | ~{sc['fit']:.1f} | "
              f"~{sc['encode']:.2f} | ~{sc['fit'] + sc['encode']:.1f} |  | {sc['mse']:.5f} | "
              f"{(sc['fit'] + sc['encode']) / fe[best]:.1f} | {sc['mse'] / mse_f:.3f} |")

    print(f"\n## Decode (seconds, median; GB/s = {out_bytes / 1e6:.0f} MB of float32 output / time)\n")
    print("| bits/el | d | layout | impl | output | seconds | GB/s | / faster faiss |")
    print("|---|---|---|---|---|---|---|---|")
    for d, layout, _, rows, _ in results:
        fd = min(med(rows["faiss default"], "decode"), med(rows["faiss tuned"], "decode"))
        cases = [
            ("qetjax", "fresh array (page faults)", med(rows["qetjax"], "decode")),
            ("qetjax", "donated buffer (in place)", med(rows["qetjax"], "decode_into")),
            ("qetjax", "fused consumer (column sums, no output)", med(rows["qetjax"], "decode_sum")),
            ("faiss default", "fresh numpy array", med(rows["faiss default"], "decode")),
            ("faiss tuned", "fresh numpy array", med(rows["faiss tuned"], "decode")),
        ]
        for name, kind, t in cases:
            print(f"| {8 // d} | {d} | {layout} | {name} | {kind} | {t:.4f} | {out_bytes / t / 1e9:.2f} | {t / fd:.2f} |")


if __name__ == "__main__":
    main()
