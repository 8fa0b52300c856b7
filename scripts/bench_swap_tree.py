"""Swap-tree speed: forward + inverse throughput beside the machine's memory bandwidth.

Throughput is bytes of the matrix per second (``n * w * itemsize / seconds``); the
copies are measured the same way (bytes copied per second), in the same run:
a numpy copy into a preallocated buffer, a jitted ``x * 1`` writing a fresh buffer,
and the same with the input buffer donated. Compile time is reported separately
(``qetjax.metrics.time_fn``).

Usage:
    python scripts/bench_swap_tree.py            # 4096 x 4096 float32, levels 1..4
    python scripts/bench_swap_tree.py --quick    # 1024 x 1024, levels 1..2
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from qetjax import swap_tree
from qetjax.metrics import time_fn


def best_of(fn, repeats: int) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` calls (each blocked on)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def donated_loop(step, x, repeats: int) -> float:
    """Best time of ``x = step(x)`` (the input buffer is donated and reused)."""
    x = jax.block_until_ready(step(jnp.array(x)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = jax.block_until_ready(step(x))
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1024 x 1024, levels 1..2")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    n = w = 1024 if args.quick else 4096
    levels_list = [1, 2] if args.quick else [1, 2, 3, 4]
    x = jax.random.normal(jax.random.key(0), (n, w), jnp.float32)
    nbytes = x.size * x.dtype.itemsize
    gbs = lambda s: nbytes / s / 1e9  # noqa: E731

    xn, buf = np.asarray(x), np.empty((n, w), np.float32)
    t_np = best_of(lambda: np.copyto(buf, xn), args.repeats)
    scale = jax.jit(lambda a: a * 1)
    t_jit = best_of(lambda: scale(x), args.repeats)
    # x * 1 on a donated buffer is elided entirely by XLA, so the donated copy is x * 2.
    t_don = donated_loop(jax.jit(lambda a: a * 2, donate_argnums=0), x, args.repeats)
    print(f"# swap tree on a {n} x {w} float32 matrix ({nbytes / 2**20:.0f} MiB), {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start\n")
    print("| memory copy | ms | GB/s |")
    print("|---|---:|---:|")
    copies = [("numpy copyto (preallocated)", t_np), ("jit x*1 (fresh buffer)", t_jit), ("jit x*2 (donated, in place)", t_don)]
    for name, t in copies:
        print(f"| {name} | {t * 1e3:.1f} | {gbs(t):.2f} |")

    fwd = jax.jit(swap_tree.forward, static_argnums=1)
    inv = jax.jit(swap_tree.inverse, static_argnums=2)
    print("\n| levels | compile fwd s | compile inv s | fwd ms | inv ms | fwd GB/s | inv GB/s "
          "| fwd+inv GB/s | fwd+inv / jit copy | fwd+inv / numpy copy | fwd+inv donated GB/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for levels in levels_list:
        (y, ind), tf = time_fn(fwd, x, levels)
        back, ti = time_fn(inv, y, ind, levels)
        assert bool((back == x).all()), "inverse is not exact"
        t_f = best_of(lambda: fwd(x, levels), args.repeats)
        t_i = best_of(lambda: inv(y, ind, levels), args.repeats)
        fwd_d = jax.jit(swap_tree.forward, static_argnums=1, donate_argnums=0)
        inv_d = jax.jit(swap_tree.inverse, static_argnums=2, donate_argnums=0)
        t_rt = donated_loop(lambda a: inv_d(*fwd_d(a, levels), levels), x, args.repeats)
        both = t_f + t_i
        print(f"| {levels} | {tf.compile_s:.2f} | {ti.compile_s:.2f} | {t_f * 1e3:.1f} | {t_i * 1e3:.1f} "
              f"| {gbs(t_f):.2f} | {gbs(t_i):.2f} | {gbs(both):.2f} | {both / t_jit:.1f}x "
              f"| {both / t_np:.1f}x | {gbs(t_rt):.2f} |")


if __name__ == "__main__":
    main()
