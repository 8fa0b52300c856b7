"""Reproduces the PVQ measurements: SQNR vs bounds and baselines, ablations, MiniLM + GPTQ, speed.

Run ``python scripts/reproduce_pvq.py`` (``--quick`` for a small, fast version;
``--only sqnr,gains,projection,hadamard,minilm,speed`` to select parts). Prints
markdown tables.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import qetjax
from qetjax import gptq, metrics
from qetjax.methods.pvq import enumeration, projection
from qetjax.methods.pvq import gains as gain_lib
from qetjax.methods.pvq.quantizer import _normalized, _scales, _shapes_and_gains

SLB_OFFSET_DB = {"gaussian": 0.0, "laplacian": 10 * math.log10(math.pi / math.e)}  # Shannon lower bound


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def data(kind: str, shape: tuple[int, int], seed: int = 0) -> jax.Array:
    key = jax.random.key(seed)
    if kind == "gaussian":
        return jax.random.normal(key, shape)
    if kind == "laplacian":
        return jax.random.laplace(key, shape) / math.sqrt(2.0)
    if kind == "student-t3":
        return jax.random.t(key, 3.0, shape)
    raise ValueError(kind)


def sqnr(q: qetjax.Quantizer, x: jax.Array) -> tuple[float, float]:
    qa = qetjax.quantize(q, jax.random.key(1), x)
    return metrics.sqnr_db(x, qetjax.dequantize(qa)), qa.bits_per_element


def part_sqnr(quick: bool) -> None:
    shape = (256, 256) if quick else (1024, 1024)
    dims = (8, 32, 128) if quick else (8, 16, 32, 64, 128, 256)
    for kind in ("gaussian", "laplacian"):
        x = data(kind, shape)
        rows = []
        for b in (2, 3, 4):
            lm, lm_bpe = sqnr(qetjax.for_budget("lloyd_max", shape, b), x)
            rtn, rtn_bpe = sqnr(qetjax.for_budget("rtn", shape, b), x)
            row = [b, 6.02 * b + SLB_OFFSET_DB[kind], f"{lm:.2f} ({lm_bpe:.3f})", f"{rtn:.2f} ({rtn_bpe:.3f})"]
            for d in dims:
                q = qetjax.for_budget("pvq", shape, b, group_size=d, rotate=False, gain_scale="tensor")
                s, bpe = sqnr(q, x)
                a = dict(q.spec.args)
                row.append(f"{s:.2f} (K={a['pulses']}, b_g={a['gain_bits']}, {bpe:.3f})")
            rows.append(row)
            print(f"  [{kind} {b} bits done]", flush=True)
        print(f"\n### SQNR (dB) on {shape[0] * shape[1]} iid {kind} samples; (stored bits/element)\n")
        print(table(["bits", "Shannon bound", "Lloyd-Max scalar", "RTN (budget)"] + [f"PVQ D={d}" for d in dims], rows))


def part_gains(quick: bool) -> None:
    shape = (256, 512) if quick else (1024, 1024)
    x = data("gaussian", shape)
    rows = []
    for d, b_total in ((32, 3), (128, 3)):
        q0 = qetjax.for_budget("pvq", shape, b_total, group_size=d, rotate=False, gain_scale="tensor")
        k = dict(q0.spec.args)["pulses"]
        _, g = _shapes_and_gains(x, d, k, "best")
        t = _normalized(g, _scales(g, "tensor").astype(jnp.float32)).reshape(-1)
        for b in (2, 3, 4):
            for m in gain_lib.METHODS:
                levels = jnp.sort(gain_lib.fit_levels(t, b, m).astype(jnp.float16)).astype(jnp.float32)
                mse = float(jnp.mean(jnp.square(t - levels[gain_lib.assign(t, levels)])))
                s, _ = sqnr(qetjax.pvq(d, k, b, rotate=False, gains=m, gain_scale="tensor"), x)
                rows.append([d, k, b, m, f"{mse:.3e}", s])
    print("\n### Gain quantizers: normalised-gain MSE and SQNR (Gaussian)\n")
    print(table(["D", "K", "gain bits", "levels", "gain MSE", "SQNR dB"], rows))
    # norm vs projection: quantizing ||x|| instead of <x, u>
    rows = []
    for d, k in ((32, 45), (128, 182)):
        xg = x.reshape(-1, d)
        y = projection.project(xg, k, "best")
        u = y / jnp.linalg.norm(y.astype(jnp.float32), axis=-1, keepdims=True)
        for name, g in (("projection <x,u>", projection.correlation(xg, y)), ("norm ||x||", jnp.linalg.norm(xg, axis=-1))):
            s = g.max()
            levels = gain_lib.fit_levels(g / s, 3, "lloyd")
            gh = levels[gain_lib.assign(g / s, levels)] * s
            rows.append([d, k, name, metrics.sqnr_db(xg, gh[:, None] * u)])
    print("\n### Gain target: projection vs norm (3 gain bits, Lloyd), Gaussian\n")
    print(table(["D", "K", "gain quantizes", "SQNR dB"], rows))


def part_projection(quick: bool) -> None:
    shape = (256, 512) if quick else (1024, 1024)
    x = data("gaussian", shape)
    rows = []
    for d in (32, 128):
        q0 = qetjax.for_budget("pvq", shape, 3.0, group_size=d, rotate=False, gain_scale="tensor")
        k, gb = dict(q0.spec.args)["pulses"], dict(q0.spec.args)["gain_bits"]
        xg = x.reshape(-1, d)
        for m in projection.METHODS:
            fn = jax.jit(lambda v, m=m: projection.project(v, k, m))
            y, t = metrics.time_fn(fn, xg)
            c = projection.correlation(xg, y) / jnp.linalg.norm(xg, axis=-1)
            s, _ = sqnr(qetjax.pvq(d, k, gb, rotate=False, projection_method=m, gain_scale="tensor"), x)
            rows.append([d, k, m, f"{float(jnp.mean(1 - c * c)):.5f}", s, t.run_s, t.compile_s])
    print("\n### Projection: greedy vs Fischer round-and-fix vs best-of-both (Gaussian, 3 bits/element)\n")
    print(table(["D", "K", "projection", "mean sin^2(angle)", "SQNR dB", "project s", "compile s"], rows))


def part_hadamard(quick: bool) -> None:
    shape = (256, 512) if quick else (1024, 1024)
    rows = []
    for kind in ("gaussian", "laplacian", "student-t3"):
        x = data(kind, shape)
        for d in (32, 128):
            for b in (3,):
                base = qetjax.for_budget("pvq", shape, b, group_size=d, rotate=False, gain_scale="tensor")
                a = dict(base.spec.args)
                s0, _ = sqnr(base, x)
                s1, bpe = sqnr(qetjax.pvq(d, a["pulses"], a["gain_bits"], rotate=True, gain_scale="tensor"), x)
                rows.append([kind, d, b, s0, s1, s1 - s0])
    print("\n### Randomized Hadamard rotation (inside groups): SQNR dB without / with\n")
    print(table(["data", "D", "bits", "no rotation", "rotation", "gain dB"], rows))


def _minilm_layers(quick: bool):
    from qetjax.bench import corpus
    from qetjax.models import minilm

    _, params, tok = minilm.load_pretrained()
    calib = corpus.stdlib_sentences(32 if quick else 128)
    held = corpus.stdlib_sentences(16 if quick else 64, exclude=calib)

    def inputs(sentences):
        b = minilm.tokenize(tok, sentences, max_length=64)
        _, state = minilm._MODEL.apply(
            {"params": params}, b["input_ids"], b["attention_mask"], b["token_type_ids"], None,
            capture_intermediates=True, mutable=["intermediates"],
        )
        inter = state["intermediates"]
        mask = b["attention_mask"].reshape(-1) != 0
        flat = lambda a: np.asarray(a).reshape(-1, a.shape[-1])[mask]
        enc = inter["encoder"]
        return {
            "layer_0/attention/query": flat(inter["embeddings"]["__call__"][0]),
            "layer_2/mlp/intermediate": flat(enc["layer_2"]["attention"]["__call__"][0][0]),
            "layer_4/mlp/output": flat(jax.nn.gelu(enc["layer_4"]["mlp"]["intermediate"]["__call__"][0], approximate=False)),
        }

    cal, ev = inputs(calib), inputs(held)
    for name in cal:
        node = params["encoder"]
        for part in name.split("/"):
            node = node[part]
        yield name, jnp.asarray(node["kernel"]).T, jnp.asarray(cal[name]), jnp.asarray(ev[name])


def part_minilm(quick: bool) -> None:
    rows = []
    for name, w, xc, xe in _minilm_layers(quick):
        shape = tuple(w.shape)
        for b in (3, 4):
            configs = []
            for d in (32, 128):
                configs.append((f"PVQ D={d}", qetjax.for_budget("pvq", shape, b, group_size=d), d))
            configs.append((f"RTN {b}b g=128", qetjax.rtn(b, group_size=128), 128))
            configs.append((f"RTN {b - 1}b g=32", qetjax.rtn(b - 1, group_size=32), 32))
            for label, q, g in configs:
                plain = qetjax.quantize(q, jax.random.key(0), w)
                comp = gptq.quantize(q, jax.random.key(0), w, xc, g)
                wp, wc = qetjax.dequantize(plain), qetjax.dequantize(comp)
                rows.append([
                    name, b, label, f"{plain.bits_per_element:.3f}",
                    metrics.sqnr_db(w, wp), metrics.sqnr_db(w, wc),
                    f"{gptq.output_error(w, wp, xe):.4f}", f"{gptq.output_error(w, wc, xe):.4f}",
                ])
            print(f"  [{name} {b} bits done]", flush=True)
    print("\n### MiniLM-L6 weights: SQNR and held-out layer-output relative error, plain vs GPTQ\n")
    print(table(["layer [out,in]", "budget", "method", "bits/elem", "SQNR plain", "SQNR GPTQ",
                 "out err plain", "out err GPTQ"], rows))


def part_speed(quick: bool) -> None:
    n = 1 << (16 if quick else 20)
    rows = []
    for d in (32, 128):
        shape = (n // 1024, 1024)
        x = data("gaussian", shape)
        q = qetjax.for_budget("pvq", shape, 3.0, group_size=d)
        params = qetjax.fit(q, jax.random.key(0), x)
        enc = jax.jit(q.encode)
        codes, te = metrics.time_fn(enc, params, x)
        dec = jax.jit(q.decode)
        _, td = metrics.time_fn(dec, params, codes)
        # enumeration alone (index <-> point), the part specific to PVQ
        k = dict(q.spec.args)["pulses"]
        tabs = enumeration.host_tables(d, k)
        y = projection.project(x.reshape(-1, d), k, "best")
        idx, ti = metrics.time_fn(jax.jit(enumeration.encode_limbs), y, tabs)
        _, tj = metrics.time_fn(jax.jit(enumeration.decode_limbs), idx, tabs)
        rows.append([d, k, n, f"{n / te.run_s / 1e6:.2f}", f"{te.run_s:.3f}", f"{te.compile_s:.1f}",
                     f"{n / td.run_s / 1e6:.2f}", f"{td.run_s:.3f}", f"{td.compile_s:.1f}",
                     f"{ti.run_s:.3f}", f"{tj.run_s:.3f}"])
    print(f"\n### Speed (CPU, {jax.device_count()} device(s)), 3 bits/element, rotation on\n")
    print(table(["D", "K", "weights", "encode Mw/s", "encode s", "encode compile s", "decode Mw/s",
                 "decode s", "decode compile s", "index enc s", "index dec s"], rows))


PARTS = {"sqnr": part_sqnr, "gains": part_gains, "projection": part_projection,
         "hadamard": part_hadamard, "minilm": part_minilm, "speed": part_speed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer configurations")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ",".join(PARTS))
    args = parser.parse_args()
    for part in args.only.split(","):
        t0 = time.perf_counter()
        PARTS[part](args.quick)
        print(f"\n({part}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
