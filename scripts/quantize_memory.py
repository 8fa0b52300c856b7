"""Peak extra memory of quantizing one matrix, per method, each in its own process.

For every method (default: every registered method with a budget solver), a fresh Python
process builds a float32 Gaussian matrix, measures its resident set size (the baseline:
interpreter, JAX, the matrix), runs ``qetjax.quantize(for_budget(method, shape, bits), key, x)``
to completion and reads the peak resident set size (``ru_maxrss``): the first call's peak above
the baseline includes XLA's compilation. The compiled program's own working set is reported too:
the temporary buffers XLA plans for fit + encode (``compiled.memory_analysis()``, inputs and
outputs not included), which, unlike the RSS of a second call, is not hidden by memory the first
call freed but the process kept. Both in MiB and as a multiple of the matrix's own size, with the
first call's wall time (compilation included).

Usage::

    JAX_PLATFORMS=cpu nice -n 5 python scripts/quantize_memory.py --rows 4096 --cols 4096 --bits 3
    python scripts/quantize_memory.py --methods pq pvq --rows 1024 --cols 1024   # quick
    python scripts/quantize_memory.py --xla-only                                 # compile only, no run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def probe(method: str, rows: int, cols: int, bits: float) -> dict:
    """Runs in the child process: quantizes once and reports the memory it took."""
    import resource
    import time

    import jax
    import numpy as np

    import qetjax
    from qetjax.bench.memory import rss_bytes

    x = jax.device_put(np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32))
    q = qetjax.for_budget(method, (rows, cols), bits)
    jax.block_until_ready(x)
    baseline = rss_bytes()
    start = time.perf_counter()
    qa = jax.block_until_ready(qetjax.quantize(q, jax.random.key(0), x))
    seconds = time.perf_counter() - start
    first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    temp = qetjax.core._fit_encode.lower(qa.quantizer, jax.random.key(0), x).compile().memory_analysis().temp_size_in_bytes
    return {
        "method": method,
        "spec": str(dict(q.spec.args)),
        "bits_per_element": qa.bits_per_element,
        "first_mib": first / 2**20,
        "temp_mib": temp / 2**20,
        "matrix_mib": x.nbytes / 2**20,
        "seconds": seconds,
    }


def xla_only(methods: list[str] | None, rows: int, cols: int, bits: float) -> None:
    """Prints, per method, the temporary buffers XLA plans for fit + encode, without running them."""
    import jax
    import jax.numpy as jnp

    import qetjax
    from qetjax.core import METHODS

    matrix_mib = rows * cols * 4 / 2**20
    print(f"{rows}x{cols} float32 at {bits} bits per element: XLA temporary buffers of fit + encode\n")
    print("| method | MiB | x matrix |\n|---|---:|---:|")
    for method in methods or sorted(n for n, m in METHODS.items() if m.budget is not None):
        try:
            q = qetjax.for_budget(method, (rows, cols), bits)
        except ValueError as err:  # e.g. LOPQ's per-cell rotations alone exceed 3 bits per element at 4096 wide
            print(f"| {method} | does not fit: {str(err)[:90]} | |", flush=True)
            continue
        x = jax.ShapeDtypeStruct((rows, cols), jnp.float32)
        temp = qetjax.core._fit_encode.lower(q, jax.random.key(0), x).compile().memory_analysis().temp_size_in_bytes
        print(f"| {method} | {temp / 2**20:.0f} | {temp / 2**20 / matrix_mib:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", help="methods (default: every registered method with a budget solver)")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per method")
    parser.add_argument("--xla-only", action="store_true", help="only compile and report XLA's temporary buffers (fast)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(probe(args.child, args.rows, args.cols, args.bits)))
        return
    if args.xla_only:
        xla_only(args.methods, args.rows, args.cols, args.bits)
        return
    if args.methods:
        methods = args.methods
    else:
        import qetjax  # noqa: F401  (registers the methods)
        from qetjax.core import METHODS

        methods = sorted(n for n, m in METHODS.items() if m.budget is not None)
    print(f"{args.rows}x{args.cols} float32 at {args.bits} bits per element\n")
    print(
        "| method | bits/element | peak RSS above baseline, MiB (x matrix) | XLA temp buffers, MiB (x matrix) "
        "| first call s |\n"
        "|---|---:|---:|---:|---:|"
    )
    for method in methods:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            method,
            "--rows",
            str(args.rows),
            "--cols",
            str(args.cols),
            "--bits",
            str(args.bits),
        ]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"| {method} | | timeout after {args.timeout:.0f} s | | |", flush=True)
            continue
        if out.returncode != 0:
            print(f"| {method} | | failed: {out.stderr.strip().splitlines()[-1][:120]} | | |", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mib = r["matrix_mib"]
        print(
            f"| {method} | {r['bits_per_element']:.3f} | {r['first_mib']:.0f} ({r['first_mib'] / mib:.2f}) | "
            f"{r['temp_mib']:.0f} ({r['temp_mib'] / mib:.2f}) | {r['seconds']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
