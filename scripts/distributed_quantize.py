"""Quantize one model together on several CPU processes (``jax.distributed``) and check the codes.

Starts ``--processes`` (default 2) copies of itself on localhost, each with one CPU device;
they join with ``jax.distributed.initialize`` (collectives over gloo, the CPU backend's), build
one mesh over all their devices and quantize the same leaves with :mod:`qetjax.sharding`, each
process working on its devices' share. The codes are gathered and compared with what one
process computes alone (``qetjax.quantize`` / ``qetjax.gptq.quantize`` on one device): every
stored array must be equal, bit for bit (exit status 1 otherwise).

``--bench`` also runs each method on one device and on 8 simulated devices in one process
(``--xla_force_host_platform_device_count=8``), each configuration in a fresh process, and
prints wall time (first pass, with compilation, and a second pass), peak resident memory per
process and the communication (collectives counted in the compiled programs), as a markdown
table for BENCHMARKS.md.

Examples::

    python scripts/distributed_quantize.py --quick                     # CI: synthetic leaves, 2 processes
    python scripts/distributed_quantize.py --model smollm2 --layers 2  # real leaves, check only
    nice -n 5 python scripts/distributed_quantize.py --bench --model smollm2 --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from typing import Any

METHODS = ("rtn", "pq", "pq-shared", "pvq", "gptq")


def _leaves(model: str, layers: int) -> list[tuple[str, Any]]:
    """``(path, w[out, in])`` of the model's linear layers (float32 numpy)."""
    import numpy as np

    if model == "synthetic":
        rng = np.random.default_rng(0)
        return [(f"layer_{i}/kernel", rng.standard_normal((64, 128)).astype(np.float32)) for i in range(layers)]
    if model == "minilm":
        import jax

        from qetjax.models import minilm
        from qetjax.tree import path_str

        flat = jax.tree_util.tree_flatten_with_path(minilm.load_params())[0]
        out = [(path_str(p), np.asarray(x).T) for p, x in flat if path_str(p).endswith("kernel") and np.ndim(x) == 2]
        return [(p, w) for p, w in out if p.startswith(tuple(f"encoder/layer_{i}/" for i in range(layers)))]
    from qetjax.models import llama

    params = llama.load_pretrained()[1]
    out = []
    for i in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            out.append((f"layers/{i}/{name}/kernel", np.asarray(params["layers"][name]["kernel"][i]).T))
    return out


def _quantizer(method: str, shape: tuple[int, int], quick: bool):
    import qetjax

    if method == "rtn":
        return qetjax.rtn(4, group_size=32)
    if method == "pq":
        return qetjax.pq(4, 16, iters=3) if quick else qetjax.pq(4, 128)
    if method == "pq-shared":
        return qetjax.pq(4, 16, shared_codebook=True, iters=3) if quick else qetjax.pq(4, 256, shared_codebook=True)
    if method == "pvq":
        return qetjax.pvq(8, 4, 2) if quick else qetjax.pvq(32, 34, 4)
    if method == "gptq":
        return qetjax.rtn(4, group_size=32 if quick else 64)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _calibration(path: str, width: int, samples: int):
    import numpy as np

    seed = sum(path.encode())
    return np.random.default_rng(seed).standard_normal((samples, width)).astype(np.float32)


def worker(args: argparse.Namespace) -> dict:
    """One process of a run: quantize every leaf with every method, time, gather, check."""
    import jax

    if args.role == "distributed":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{args.port}", num_processes=args.processes, process_id=args.process_id)
    import numpy as np
    from jax.experimental import multihost_utils

    import qetjax
    from qetjax import gptq, sharding
    from qetjax.tree import leaf_key

    leaves = _leaves(args.model, args.layers)[: args.leaves]
    key = jax.random.key(0)
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), devices=jax.devices())
    rank = jax.process_index()
    report: dict = {"role": args.role, "process": rank, "devices": len(jax.devices()), "methods": {}}

    def run(method: str, path: str, w: np.ndarray) -> qetjax.QuantizedArray:
        q = _quantizer(method, w.shape, args.quick)
        k = leaf_key(key, path)
        if method == "gptq":
            x = _calibration(path, w.shape[1], args.samples)
            if args.role == "single":
                return gptq.quantize(q, k, w, x)
            return sharding.gptq_leaf(q, k, w, x, mesh)
        if args.role == "single":
            return qetjax.quantize(q, k, w)
        return sharding.quantize_leaf(q, k, w, mesh)

    def one_pass(method: str) -> tuple[float, list]:
        start = time.perf_counter()
        out = [jax.block_until_ready(run(method, p, w)) for p, w in leaves]
        return time.perf_counter() - start, out

    for method in args.methods:
        first, out = one_pass(method)
        entry = {"first_s": first, "leaves": len(leaves),
                 "split": sum(sharding.splits(_quantizer(method, w.shape, args.quick), w.shape, mesh) for _, w in leaves)}
        if not args.check:  # benchmark: a second, compiled pass, then one that counts the collectives
            entry["second_s"], out = one_pass(method)
        if args.role != "single" and not args.check:
            with sharding.record_communication() as comm:
                out = [jax.block_until_ready(run(method, p, w)) for p, w in leaves]
            entry.update(comm_per_device=comm.per_device, comm_steps=comm.steps, comm_payload=comm.payload)
        if args.check:
            # Every process takes part in the gathers; process 0 compares with one device alone.
            gathered = [[multihost_utils.process_allgather(a, tiled=True) if not a.is_fully_addressable else np.asarray(a)
                         for a in jax.tree_util.tree_leaves((qa.params, qa.codes))] for qa in out]
            if rank == 0:
                equal = []
                with jax.default_device(jax.local_devices()[0]):
                    for (p, w), got, qa in zip(leaves, gathered, out):
                        q = _quantizer(method, w.shape, args.quick)
                        k = leaf_key(key, p)
                        ref = gptq.quantize(q, k, w, _calibration(p, w.shape[1], args.samples)) if method == "gptq" \
                            else qetjax.quantize(q, k, w)
                        want = [np.asarray(a) for a in jax.tree_util.tree_leaves((ref.params, ref.codes))]
                        same = (jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(qa) and len(got) == len(want)
                                and all(g.shape == r.shape and g.dtype == r.dtype and np.array_equal(g, r)
                                        for g, r in zip(got, want)))
                        equal.append(bool(same))
                entry["equal"] = equal
        report["methods"][method] = entry
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(args: argparse.Namespace, role: str, processes: int, devices: int) -> list[dict]:
    """Runs ``processes`` workers of ``role`` (each with ``devices`` CPU devices); their reports."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    port = _free_port()
    base = [sys.executable, os.path.abspath(__file__), "--worker", "--role", role, "--processes", str(processes),
            "--port", str(port), "--model", args.model, "--layers", str(args.layers), "--samples", str(args.samples),
            "--leaves", str(args.leaves or 0),
            "--methods", ",".join(args.methods)] + (["--quick"] if args.quick else []) + (["--check"] if args.check else [])
    procs = [subprocess.Popen(base + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE, text=True)
             for i in range(processes)]
    reports = []
    for p in procs:
        out, _ = p.communicate(timeout=args.timeout)
        if p.returncode:
            raise SystemExit(f"{role} worker failed with status {p.returncode}")
        reports += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return reports


def _bench_table(runs: dict[str, list[dict]], methods: list[str]) -> str:
    rows = ["| method | configuration | leaves split | first pass (s) | second pass (s) | peak RSS per process (MB) | "
            "communication per device per pass | collective steps |", "|---|---|---|---|---|---|---|---|"]
    for method in methods:
        for name, reports in runs.items():
            e = [r["methods"][method] for r in reports]
            comm = e[0].get("comm_per_device")
            rss = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in reports)
            rows.append(
                f"| {method} | {name} | {e[0]['split']}/{e[0]['leaves']} | {max(x['first_s'] for x in e):.2f} | "
                f"{max(x['second_s'] for x in e):.2f} | {rss} | "
                + ("-" if comm is None else f"{comm / 2**20:.2f} MiB") + f" | {e[0].get('comm_steps', '-')} |")
    return "\n".join(rows)


# Projection to real devices (see BENCHMARKS.md, "Sharding"): per device bandwidth (bytes/s) and
# per-hop latency (s) of a ring collective, for 8 devices on one host and 64 over 8 hosts.
LINKS = {8: (100e9, 5e-6), 64: (25e9, 10e-6)}


def replicated_seconds(method: str, leaves: list, quick: bool, samples: int) -> float:
    """One device's compiled time of the parts :mod:`qetjax.sharding` does not split: GPTQ's
    damped inverse Cholesky factor, shared-codebook PQ's subsample and k-means++ seeding."""
    import functools

    import jax

    from qetjax import gptq, kmeans
    from qetjax.codebooks import split

    total = 0.0
    for path, w in leaves:
        q = _quantizer(method, w.shape, quick)
        if method == "gptq":
            h = gptq.hessian(_calibration(path, w.shape[1], samples))
            fn, args = jax.jit(gptq.inverse_cholesky, static_argnums=1), (h, 0.01)
        elif method == "pq-shared":
            a = dict(q.spec.args)
            fn = jax.jit(functools.partial(kmeans.seed, k=a["num_centroids"], init=a["init"],
                                           max_points_per_centroid=a["max_points_per_centroid"]))
            args = (jax.random.key(0), split(jax.numpy.asarray(w), a["subvector_dim"]).reshape(1, -1, a["subvector_dim"]))
        else:
            continue
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        total += time.perf_counter() - start
    return total


def projections(runs: dict, methods: list[str], replicated: dict[str, float]) -> str:
    """Projected seconds on 8 and 64 real devices from one device's compiled time ``T1``, the
    unsplit part ``R``, and the collectives counted on 8 simulated devices (bytes ``C``, calls ``S``):
    ``(T1 - R) / N + R + C_N / bandwidth + S * 2 (N - 1) * hop latency``, ``C_64 = C_8 * (63/64) / (7/8)``."""
    one = runs["1 device"][0]["methods"]
    sim = runs["8 simulated devices, 1 process"][0]["methods"]
    rows = ["| method | T1, 1 device (s) | unsplit R (s) | C per device (MiB) | collective calls | "
            "projected 8 devices (s) | speedup | projected 64 devices (s) | speedup |", "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        t1, r = one[m]["second_s"], replicated.get(m, 0.0)
        c8, steps = sim[m]["comm_per_device"], sim[m]["comm_steps"]
        cells = []
        for n, (bandwidth, hop) in LINKS.items():
            c = c8 * ((n - 1) / n) / (7 / 8)
            t = (t1 - r) / n + r + c / bandwidth + steps * 2 * (n - 1) * hop
            cells += [f"{t:.3f}", f"{t1 / t:.1f}x"]
        rows.append(f"| {m} | {t1:.3f} | {r:.3f} | {c8 / 2**20:.2f} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--model", choices=("synthetic", "minilm", "smollm2"), default="synthetic")
    parser.add_argument("--layers", type=int, default=1, help="first layers of the model whose linear layers are quantized")
    parser.add_argument("--leaves", type=int, default=None, help="only the first this many of those leaves")
    parser.add_argument("--methods", default=None, help=f"comma-separated, from {METHODS}")
    parser.add_argument("--samples", type=int, default=256, help="calibration rows per GPTQ leaf (Gaussian)")
    parser.add_argument("--quick", action="store_true", help="small configurations (CI)")
    parser.add_argument("--bench", action="store_true", help="also one device and 8 simulated devices; a table")
    parser.add_argument("--timeout", type=float, default=3000)
    parser.add_argument("--project", metavar="JSON", help="print the projections from a saved --bench JSON line")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--role", default="distributed", help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.leaves = args.leaves or None
    args.methods = (args.methods or ("rtn,pq,pq-shared,gptq" if args.quick else "pq,pvq,gptq")).split(",")
    for m in args.methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {METHODS}")
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.project:
        with open(args.project) as f:
            runs = json.loads(f.read().splitlines()[-1])
        leaves = _leaves(args.model, args.layers)[: args.leaves]
        replicated = {m: replicated_seconds(m, leaves, args.quick, args.samples) for m in args.methods}
        print(projections(runs, args.methods, replicated))
        return
    args.check = not args.bench
    runs = {}
    if args.bench:
        runs["1 device"] = _launch(args, "single", 1, 1)
        runs["8 simulated devices, 1 process"] = _launch(args, "simulated", 1, 8)
    runs[f"{args.processes} processes x 1 device"] = _launch(args, "distributed", args.processes, 1)
    if args.bench:
        print(_bench_table(runs, args.methods))
        leaves = _leaves(args.model, args.layers)[: args.leaves]
        print(projections(runs, args.methods, {m: replicated_seconds(m, leaves, args.quick, args.samples)
                                               for m in args.methods}))
        print(json.dumps(runs))
        return
    reports = runs[f"{args.processes} processes x 1 device"]
    equal = {m: e["equal"] for r in reports if r["process"] == 0 for m, e in r["methods"].items()}
    for m, eq in equal.items():
        print(f"{m}: {sum(eq)}/{len(eq)} leaves equal to one process's codes; "
              f"{reports[0]['methods'][m]['split']} split over {args.processes} processes")
    if not all(all(eq) for eq in equal.values()):
        raise SystemExit("codes differ from one process's")
    print("codes equal one process's")


if __name__ == "__main__":
    main()
