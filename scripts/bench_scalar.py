"""SQNR and speed of RTN and Lloyd-Max on a Gaussian matrix (run from /work/main with PYTHONPATH=.)."""
import argparse

import jax
import jax.numpy as jnp

import qetjax
from qetjax.core import stored_bits
from qetjax.metrics import sqnr_db, time_fn

p = argparse.ArgumentParser()
p.add_argument("--quick", action="store_true")
a = p.parse_args()
n = 512 if a.quick else 4096
shape = (n, n)
x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
key = jax.random.key(1)

METHODS = {
    "rtn per-row (asym)": ("rtn", dict(granularity="row"), lambda b: qetjax.rtn(b)),
    "rtn g128 asym": ("rtn", dict(group_size=128), lambda b: qetjax.rtn(b, 128)),
    "rtn g128 sym": ("rtn", dict(group_size=128, symmetric=True), lambda b: qetjax.rtn(b, 128, True)),
    "rtn auto (for_budget default)": ("rtn", {}, None),
    "lloyd_max (per tensor)": ("lloyd_max", {}, lambda b: qetjax.lloyd_max(b)),
}


def row(name, label, q):
    fe = jax.jit(lambda k, x: (lambda p: (p, q.encode(p, x)))(q.fit(k, x)))
    (params, codes), t_enc = time_fn(fe, key, x)
    y, t_dec = time_fn(jax.jit(q.decode), params, codes)
    bpe = stored_bits(q, shape) / (n * n)
    args = ", ".join(f"{k}={v}" for k, v in q.spec.args if k in ("bits", "group_size", "symmetric", "granularity"))
    mb = n * n * 4 / 1e6
    print(f"| {name} | {label} | {args} | {bpe:.4f} | {sqnr_db(x, y):.2f} | {t_enc.run_s*1e3:.1f} ({t_enc.compile_s:.2f}) "
          f"| {t_dec.run_s*1e3:.1f} ({t_dec.compile_s:.2f}) | {mb/t_enc.run_s:.0f} / {mb/t_dec.run_s:.0f} |", flush=True)


hdr = ("| method | {} | config | stored bits/elem | SQNR dB | fit+encode ms (compile s) | decode ms (compile s) "
       "| MB/s f32 in/out |")
sep = "|---|---|---|---|---|---|---|---|"
print(f"Gaussian N(0,1) {shape}, device {jax.devices()[0].device_kind}\n")
print(hdr.format("budget bits/elem"))
print(sep)
for budget in (2, 3, 4):
    for name, (method, opts, _) in METHODS.items():
        row(name, str(budget), qetjax.for_budget(method, shape, budget, **opts))
print()
print(hdr.format("nominal bits"))
print(sep)
for b in (2, 3, 4):
    for name, (_, _, make) in METHODS.items():
        if make is not None:
            row(name, str(b), make(b))
