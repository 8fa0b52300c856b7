"""Quantize one model together on several CPU processes (``jax.distributed``) and check the codes.

Starts ``--processes`` (default 2) copies of itself on localhost, each with one CPU device;
they join with ``jax.distributed.initialize`` (collectives over gloo, the CPU backend's), build
one mesh over all their devices and quantize the same leaves with :mod:`qetjax.sharding`, each
process working on its devices' share. The codes are gathered and compared with what one
process computes alone (``qetjax.quantize`` / ``qetjax.gptq.quantize`` on one device): every
stored array must be equal, bit for bit (exit status 1 otherwise).

``--bench`` also runs each method on one device and on 8 simulated devices in one process
(``--xla_force_host_platform_device_count=8``), each configuration in a fresh process, one
after the other (``--configs`` picks some), and prints, per method: the wall time of a first
pass over the first layer's leaves (compiling every program: all layers have the same
shapes), of a compiled pass over all leaves (each leaf timed), the peak resident memory per
process and the communication (collectives counted in the compiled programs of the first
layer's leaves, times the layers), as markdown tables for BENCHMARKS.md, with the time
projected for 8 and 64 real devices (:func:`projections`). Each configuration's measurements
are printed as a ``RUN`` JSON line as soon as it ends; ``--project LOG...`` prints the
tables again from such lines.

Examples::

    python scripts/distributed_quantize.py --quick                     # CI: synthetic leaves, 2 processes
    python scripts/distributed_quantize.py --model smollm2 --layers 2  # real leaves, check only
    nice -n 5 python scripts/distributed_quantize.py --bench --model smollm2 --layers 4 > run.log
    python scripts/distributed_quantize.py --project run.log --model smollm2 --layers 4
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
CONFIGS = {"single": "1 device", "simulated": "8 simulated devices, 1 process", "distributed": "2 processes x 1 device"}


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


def _calibration(path: str, width: int, samples: int, exact: bool = False):
    """Gaussian calibration rows of a GPTQ leaf; ``exact``: rounded to integers, so that ``X^T X``
    sums exactly in any order (the Hessian psum-reduced over processes equals one process's, and
    so do the codes)."""
    import numpy as np

    seed = sum(path.encode())
    x = np.random.default_rng(seed).standard_normal((samples, width)).astype(np.float32)
    return np.round(3 * x) if exact else x


def _leaf_comm(logs: list, per_layer: int, count: int) -> tuple[list[float], list[int]]:
    """Bytes per device and collective calls of each of ``count`` leaves, from those of the first
    layer's ``per_layer`` leaves (every layer's leaves have the same shapes: the same programs)."""
    return [logs[i % per_layer][0] for i in range(count)], [logs[i % per_layer][1] for i in range(count)]


def worker(args: argparse.Namespace) -> dict:
    """One process of a run: quantize every leaf with every method, time, gather, check.

    Per method: a first pass over the first layer's leaves (compiling every program, since
    all layers have the same shapes), a timed compiled pass over all leaves (each leaf timed),
    and, on several devices, the collectives of each of the first layer's leaves.
    """
    import jax

    if args.role == "distributed":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{args.port}", num_processes=args.processes, process_id=args.process_id)
    import numpy as np
    from jax.experimental import multihost_utils

    import qetjax
    from qetjax import gptq, sharding
    from qetjax.tree import leaf_key

    every = _leaves(args.model, args.layers)
    per_layer = len(every) // args.layers
    leaves = every[: args.leaves]
    warm = leaves[:per_layer]
    key = jax.random.key(0)
    if args.role == "plan":  # which leaves split on meshes of 8 and of all devices (e.g. 64)
        return {"splits": {str(n): {m: [sharding.splits(_quantizer(m, w.shape, args.quick), w.shape,
                                                        jax.make_mesh((n,), ("data",), devices=jax.devices()[:n]))
                                        for _, w in leaves] for m in args.methods}
                           for n in sorted({8, len(jax.devices())})}}
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), devices=jax.devices())
    rank = jax.process_index()
    report: dict = {"role": args.role, "process": rank, "devices": len(jax.devices()), "per_layer": per_layer,
                    "paths": [p for p, _ in leaves], "methods": {}}

    def run(method: str, path: str, w: np.ndarray) -> qetjax.QuantizedArray:
        q = _quantizer(method, w.shape, args.quick)
        k = leaf_key(key, path)
        if method == "gptq":
            x = _calibration(path, w.shape[1], args.samples, args.check)
            if args.role == "single":
                return gptq.quantize(q, k, w, x)
            return sharding.gptq_leaf(q, k, w, x, mesh)
        if args.role == "single":
            return qetjax.quantize(q, k, w)
        return sharding.quantize_leaf(q, k, w, mesh)

    def timed(method: str, path: str, w: np.ndarray) -> tuple[float, qetjax.QuantizedArray]:
        start = time.perf_counter()
        qa = jax.block_until_ready(run(method, path, w))
        return time.perf_counter() - start, qa

    for method in args.methods:
        start = time.perf_counter()
        out = [timed(method, p, w)[1] for p, w in warm]
        entry = {"first_s": time.perf_counter() - start, "first_leaves": len(warm), "leaves": len(leaves),
                 "split": sum(sharding.splits(_quantizer(method, w.shape, args.quick), w.shape, mesh) for _, w in leaves)}
        if not args.check or len(warm) < len(leaves):
            times, out = zip(*[timed(method, p, w) for p, w in leaves])
            entry["leaf_s"], entry["second_s"], out = list(times), sum(times), list(out)
        if args.role != "single" and not args.check:
            logs = []
            for p, w in warm:
                with sharding.record_communication() as comm:
                    jax.block_until_ready(run(method, p, w))
                logs.append((comm.per_device, comm.steps))
            entry["leaf_comm"], entry["leaf_steps"] = _leaf_comm(logs, per_layer, len(leaves))
            entry["comm_per_device"], entry["comm_steps"] = sum(entry["leaf_comm"]), sum(entry["leaf_steps"])
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
                        ref = gptq.quantize(q, k, w, _calibration(p, w.shape[1], args.samples, True)) if method == "gptq" \
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
    rows = ["| method | configuration | leaves split | first layer, compiling (s) | all leaves, compiled (s) | "
            "peak RSS per process (MB) | communication per device | collective calls |", "|---|---|---|---|---|---|---|---|"]
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


def replicated_seconds(method: str, leaves: list, quick: bool, samples: int) -> list[float]:
    """Per leaf, one device's compiled time of the parts :mod:`qetjax.sharding` does not split:
    GPTQ's damped inverse Cholesky factor, shared-codebook PQ's subsample and k-means++ seeding
    (measured once per leaf shape: the same program on the same shape)."""
    import functools

    import jax

    from qetjax import gptq, kmeans
    from qetjax.codebooks import split

    seconds: dict[tuple, float] = {}
    out = []
    for path, w in leaves:
        if method not in ("gptq", "pq-shared"):
            out.append(0.0)
            continue
        if w.shape not in seconds:
            q = _quantizer(method, w.shape, quick)
            if method == "gptq":
                h = gptq.hessian(_calibration(path, w.shape[1], samples))
                fn, args = jax.jit(gptq.inverse_cholesky, static_argnums=1), (h, 0.01)
            else:
                a = dict(q.spec.args)
                fn = jax.jit(functools.partial(kmeans.seed, k=a["num_centroids"], init=a["init"],
                                               max_points_per_centroid=a["max_points_per_centroid"]))
                args = (jax.random.key(0), split(jax.numpy.asarray(w), a["subvector_dim"]).reshape(1, -1, a["subvector_dim"]))
            jax.block_until_ready(fn(*args))
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            seconds[w.shape] = time.perf_counter() - start
        out.append(seconds[w.shape])
    return out


def project(t: list[float], r: list[float], comm: list[float], steps: list[int], split: list[bool], n: int) -> float:
    """Projected seconds on ``n`` real devices: a leaf that splits costs ``(t - r) / n + r`` plus
    its collectives (bytes per device measured on 8 devices, scaled by ``((n-1)/n) / (7/8)``, at
    :data:`LINKS`' bandwidth, and ``2 (n - 1)`` hops per collective call); a leaf that does not
    split is quantized whole on one device, ``t`` (``quantize_tree`` runs one leaf at a time)."""
    bandwidth, hop = LINKS[n]
    total = 0.0
    for ti, ri, ci, si, ok in zip(t, r, comm, steps, split):
        total += (ti - ri) / n + ri + ci * ((n - 1) / n) / (7 / 8) / bandwidth + si * 2 * (n - 1) * hop if ok else ti
    return total


def round_robin(t: list[float], n: int) -> float:
    """Seconds if every leaf were quantized whole on one device, leaves dealt to ``n`` devices in
    turn and run concurrently (no communication): the busiest device's sum."""
    return max(sum(t[i::n]) for i in range(n))


def projections(runs: dict, methods: list[str], replicated: dict[str, list[float]], splits: dict, layers: int) -> str:
    """The projection table (see :func:`project`) for a model of ``layers`` layers like the first.

    Every layer holds the same leaf shapes, so a leaf's one-device compiled time is taken as the
    least measured over the layers for its position in the layer (single timings on a shared
    machine are inflated by other jobs), its unsplit part ``r``, its collectives (counted on 8
    simulated devices) and whether it splits on 8 and 64 devices as those of the first layer's leaf;
    ``r`` is capped at ``t`` (both measured under load, apart).
    """
    one = runs["1 device"][0]
    sim = runs["8 simulated devices, 1 process"][0]["methods"]
    rows = ["| method | T1, 1 device (s) | unsplit R (s) | C per device (MiB) | collective calls | leaves split on 8 / 64 | "
            "projected 8 devices (s) | speedup | projected 64 devices (s) | speedup | whole leaves in turn, 8 / 64 (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        measured = one["methods"][m]["leaf_s"]
        per_layer = min(one["per_layer"], len(measured))
        expand = lambda per_leaf, k=per_layer: [per_leaf[i % k] for i in range(k * layers)]  # noqa: E731
        t = expand([min(measured[j::per_layer]) for j in range(per_layer)])
        comm, steps = (expand(v[:per_layer]) for v in (sim[m]["leaf_comm"], sim[m]["leaf_steps"]))
        r = [min(ri, ti) for ri, ti in zip(expand(replicated[m][:per_layer]), t)]  # a part is at most the whole
        split = {n: expand(splits[str(n)][m][:per_layer]) for n in LINKS}
        cells = []
        for n in LINKS:
            p = project(t, r, comm, steps, split[n], n)
            cells += [f"{p:.2f}", f"{sum(t) / p:.1f}x"]
        ok = " / ".join(f"{sum(split[n])}" for n in LINKS)
        rows.append(f"| {m} | {sum(t):.2f} | {sum(r):.2f} | {sum(comm) / 2**20:.2f} | {sum(steps)} | {ok} of {len(t)} | "
                    + " | ".join(cells) + f" | {round_robin(t, 8):.2f} / {round_robin(t, 64):.2f} |")
    return "\n".join(rows)


def _project(args: argparse.Namespace, runs: dict) -> None:
    """Prints the projection table: which leaves split on 8 and 64 devices (a worker with 64
    simulated devices plans them), the unsplit parts measured here, :func:`projections`."""
    splits = _launch(args, "plan", 1, 64)[0]["splits"]
    leaves = _leaves(args.model, args.layers)[: args.leaves]
    replicated = {m: replicated_seconds(m, leaves, args.quick, args.samples) for m in args.methods}
    print(projections(runs, args.methods, replicated, splits, args.project_layers or args.layers))


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
    parser.add_argument("--timeout", type=float, default=14400, help="seconds per configuration")
    parser.add_argument("--configs", default="single,simulated,distributed",
                        help="with --bench: which of single (1 device), simulated (8 devices, 1 process), distributed")
    parser.add_argument("--project", metavar="LOG", nargs="+", help="print the tables again from saved --bench output")
    parser.add_argument("--project-layers", type=int, default=None,
                        help="project for a model of this many layers like the first (default: --layers)")
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
    if args.project:  # the tables again from saved --bench output (RUN lines), e.g. one file per configuration
        runs = {}
        for name in args.project:
            with open(name) as f:
                runs.update(json.loads(line[4:]) for line in f if line.startswith("RUN "))
        runs = {name: runs[name] for name in CONFIGS.values() if name in runs}
        print(_bench_table(runs, args.methods))
        if "1 device" in runs and "8 simulated devices, 1 process" in runs:
            _project(args, runs)
        return
    args.check = not args.bench
    configs = args.configs.split(",") if args.bench else ["distributed"]
    runs = {}
    for config in configs:
        if config not in CONFIGS:
            parser.error(f"unknown configuration {config!r}; choose from {sorted(CONFIGS)}")
        name = CONFIGS[config].replace("2 processes", f"{args.processes} processes")
        runs[name] = _launch(args, config, args.processes if config == "distributed" else 1, 8 if config == "simulated" else 1)
        if args.bench:  # each configuration's reports as soon as measured: --project reprints the tables from them
            print("RUN " + json.dumps([name, runs[name]]), flush=True)
    if args.bench:
        print(_bench_table(runs, args.methods))
        if "1 device" in runs and "8 simulated devices, 1 process" in runs:
            _project(args, runs)
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
