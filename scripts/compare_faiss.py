"""qetjax's PQ / OPQ / RQ / LSQ side by side with faiss's, same data, same configuration.

For every dataset and method both libraries fit on the same float32 matrix,
encode it and decode it; the table gives the reconstruction MSE of each, their
ratio, and fit / encode / decode times as ratios qetjax / faiss (qetjax's
compile time is reported separately and not included in its times). Codebooks
are float32 on both sides.

Datasets: a Gaussian matrix, the QET paper's synthetic data (truncated normal
with 1e-4 outliers) and MiniLM-L6's stacked intermediate kernels. ``--quick``
keeps the first 2048 rows and 128 columns of each, and fewer OPQ and LSQ
iterations (on both sides). On a loaded machine faiss's OpenMP threads spin;
``--faiss-threads 1`` avoids that, and ``OPENBLAS_NUM_THREADS=1`` does the
same for the eigendecomposition in RQ's progressive k-means (LAPACK).
``--data`` and ``--methods`` select rows by name prefix.

Run:
    PYTHONPATH=. python scripts/compare_faiss.py --quick
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import faiss
import jax
import jax.numpy as jnp
import numpy as np

import qetjax
from qetjax.metrics import time_fn


def qet_paper(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """The QET paper's data (from qetjax.data when present)."""
    try:
        from qetjax.bench.data import qet_paper as make
    except ImportError:
        k1, k2, k3 = jax.random.split(key, 3)
        x = 0.5 + 0.16 * jax.random.truncated_normal(k1, -0.5 / 0.16, 0.5 / 0.16, shape)
        outlier = jax.random.uniform(k2, shape) < 1e-4
        return jnp.where(outlier, jax.random.uniform(k3, shape, minval=-100.0, maxval=100.0), x)
    return make(key, shape)


def minilm_intermediate() -> np.ndarray:
    """The six [384, 1536] intermediate kernels of MiniLM-L6, stacked: [2304, 1536]."""
    from qetjax.models import minilm

    layers = minilm.load_params()["encoder"]
    names = sorted(n for n in layers if n.startswith("layer_"))
    return np.concatenate([np.asarray(layers[n]["mlp"]["intermediate"]["kernel"]) for n in names], axis=0)


def datasets(quick: bool) -> dict[str, np.ndarray]:
    rows, width = (2048, 128) if quick else (None, None)
    out = {
        "gaussian 4096x512": np.asarray(jax.random.normal(jax.random.key(0), (4096, 512))),
        "qet_paper 4096x512": np.asarray(qet_paper(jax.random.key(1), (4096, 512))),
        "minilm intermediate 2304x1536": minilm_intermediate(),
    }
    if width:
        out = {f"{k} [:{rows}, :{width}]": np.ascontiguousarray(v[:rows, :width]) for k, v in out.items()}
    return {k: v.astype(np.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_qetjax(q: qetjax.Quantizer, x: np.ndarray) -> dict:
    xj = jnp.asarray(x)
    key = jax.random.key(0)
    params, t_fit = time_fn(jax.jit(q.fit), key, xj, repeats=1)
    codes, t_enc = time_fn(jax.jit(q.encode), params, xj)
    xh, t_dec = time_fn(jax.jit(q.decode), params, codes)
    return dict(
        mse=float(np.mean((np.asarray(xh) - x) ** 2)),
        fit=t_fit.run_s,
        encode=t_enc.run_s,
        decode=t_dec.run_s,
        compile=t_fit.compile_s + t_enc.compile_s + t_dec.compile_s,
    )


def run_faiss(train: Callable, encode: Callable, decode: Callable, x: np.ndarray) -> dict:
    _, t_fit = timed(lambda: train(x))
    codes, t_enc = timed(lambda: encode(x))
    codes, t_enc2 = timed(lambda: encode(x))
    xh, t_dec = timed(lambda: decode(codes))
    xh, t_dec2 = timed(lambda: decode(codes))
    return dict(mse=float(np.mean((xh - x) ** 2)), fit=t_fit, encode=min(t_enc, t_enc2), decode=min(t_dec, t_dec2))


# ----------------------------------------------------------------------------- methods


def faiss_pq(w: int, d: int, k: int) -> tuple:
    pq = faiss.ProductQuantizer(w, w // d, int(np.log2(k)))
    return pq.train, pq.compute_codes, pq.decode


def faiss_opq(w: int, d: int, k: int, iters: int) -> tuple:
    opq = faiss.OPQMatrix(w, w // d)
    opq.niter = iters
    pq = faiss.ProductQuantizer(w, w // d, int(np.log2(k)))

    def train(x):
        opq.train(x)
        pq.train(opq.apply_py(x))

    return train, lambda x: pq.compute_codes(opq.apply_py(x)), lambda c: opq.reverse_transform(pq.decode(c))


def faiss_rq(w: int, stages: int, k: int, beam: int, refine: bool = False) -> tuple:
    rq = faiss.ResidualQuantizer(w, stages, int(np.log2(k)))
    rq.max_beam_size = beam
    if refine:  # niter_codebook_refine (5) rounds of least-squares codebooks
        rq.train_type = rq.Train_progressive_dim | rq.Train_refine_codebook
    return rq.train, rq.compute_codes, rq.decode


def faiss_lsq(w: int, books: int, k: int, iters: int) -> tuple:
    lsq = faiss.LocalSearchQuantizer(w, books, int(np.log2(k)))
    lsq.train_iters = iters
    return lsq.train, lsq.compute_codes, lsq.decode


def methods(w: int, quick: bool) -> dict[str, tuple[qetjax.Quantizer, tuple]]:
    f32 = dict(codebook_dtype="float32")
    opq_iters, lsq_iters = (10, 10) if quick else (50, 25)
    fopq = faiss_opq(w, 8, 256, opq_iters)  # one faiss run serves both OPQ rows
    out = {
        "PQ d=8 k=256": (qetjax.pq(8, 256, **f32), faiss_pq(w, 8, 256)),
        f"OPQ d=8 k=256 iters={opq_iters}": (qetjax.opq(8, 256, iters=opq_iters, **f32), fopq),
        f"OPQ d=8 k=256 iters={opq_iters} random start": (  # faiss's start; ours defaults to the identity
            qetjax.opq(8, 256, iters=opq_iters, init_rotation="random", **f32),
            fopq,
        ),
        "RQ M=4 k=256 beam=1": (qetjax.rq(4, 256, 1, **f32), faiss_rq(w, 4, 256, 1)),
        "RQ M=4 k=256 beam=4": (qetjax.rq(4, 256, 4, **f32), faiss_rq(w, 4, 256, 4)),
        "RQ M=4 k=256 beam=4 refine=5": (qetjax.rq(4, 256, 4, refine_iters=5, **f32), faiss_rq(w, 4, 256, 4, True)),
        f"LSQ M=4 k=256 iters={lsq_iters}": (
            qetjax.lsq(4, 256, train_iters=lsq_iters, **f32),
            faiss_lsq(w, 4, 256, lsq_iters),
        ),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2048x128 subsets, fewer OPQ/LSQ iterations")
    parser.add_argument("--methods", default="", help="comma-separated name prefixes to run (default: all)")
    parser.add_argument("--data", default="", help="comma-separated dataset name prefixes to run (default: all)")
    parser.add_argument("--faiss-threads", type=int, default=0, help="faiss OpenMP threads (0: faiss's default)")
    args = parser.parse_args()
    if args.faiss_threads:
        faiss.omp_set_num_threads(args.faiss_threads)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), faiss {faiss.__version__}, "
          f"faiss threads {faiss.omp_get_max_threads()}\n")
    print("| data | method | MSE qetjax | MSE faiss | MSE ratio | fit ratio | encode ratio | decode ratio "
          "| fit s (qetjax / faiss) | encode s | decode s | qetjax compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    data = [d.strip() for d in args.data.split(",") if d.strip()]
    for dname, x in datasets(args.quick).items():
        if data and not any(dname.startswith(d) for d in data):
            continue
        done: dict[int, dict] = {}  # faiss results by faiss configuration
        for mname, (q, fq) in methods(x.shape[1], args.quick).items():
            if wanted and not any(mname.startswith(w) for w in wanted):
                continue
            a = run_qetjax(q, x)
            if id(fq) not in done:
                done[id(fq)] = run_faiss(*fq, x)
            b = done[id(fq)]
            print(
                f"| {dname} | {mname} | {a['mse']:.5g} | {b['mse']:.5g} | {a['mse'] / b['mse']:.3f} "
                f"| {a['fit'] / b['fit']:.2f} | {a['encode'] / b['encode']:.2f} | {a['decode'] / b['decode']:.2f} "
                f"| {a['fit']:.3f} / {b['fit']:.3f} | {a['encode']:.4f} / {b['encode']:.4f} "
                f"| {a['decode']:.4f} / {b['decode']:.4f} | {a['compile']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
