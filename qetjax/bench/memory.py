"""Peak host memory of a computation: resident-set polling, in this process or in a fresh one.

* :func:`rss_bytes`: this process's resident set size now;
* :class:`RssPeak`: the peak RSS of a ``with`` body, polled by a background thread;
* :func:`peak_rss`: runs a function several times (the first compiles, later ones reuse the
  compiled code) and reports, per run, the RSS before, the peak above it and the seconds;
* :func:`fresh_process`: calls ``module:function(*args)`` in a new Python process (so nothing
  this process holds or has compiled counts) and returns the dict it returns.

Linux only (``/proc/self/status``).

Example:
    >>> with RssPeak() as m:
    ...     x = np.ones(2**25)
    >>> m.delta > 2**27
    True
    >>> row = fresh_process("qetjax.bench.minilm:memory_row", "rtn", "4")
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

MiB = 2**20


def rss_bytes() -> int:
    """The resident set size of this process now (``VmRSS`` of ``/proc/self/status``), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmRSS line")


class RssPeak:
    """Context manager recording the peak RSS of its body, polled in a background thread.

    ``before`` is the RSS on entry, ``peak`` the largest RSS seen (every ``interval`` seconds,
    and on entry and exit); ``delta`` = ``peak - before`` is the body's own working set above
    what the process already held (a peak shorter than ``interval`` can be missed).

    Example:
        >>> with RssPeak() as m:
        ...     x = np.ones(2**25)
        >>> m.delta > 2**27
        True
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssPeak:
        self.before = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        """Peak RSS during the body minus RSS on entry, in bytes."""
        return self.peak - self.before


def peak_rss(fn: Callable[[], Any], runs: Sequence[str] = ("first", "cached"), label: str = "run") -> dict[str, float]:
    """Calls ``fn()`` once per name in ``runs`` (its result waited for, then freed) under :class:`RssPeak`.

    Returns:
      For each run ``name``: ``rss_before_{name}_MiB``, ``peak_delta_{name}_MiB`` (the peak above
      the RSS before) and ``{label}_{name}_s`` (seconds).

    Example:
        >>> peak_rss(lambda: qetjax.quantize(q, key, x))["peak_delta_first_MiB"]
    """
    row = {}
    for name in runs:
        t0 = time.perf_counter()
        with RssPeak() as m:
            out = jax.block_until_ready(fn())
        row |= {f"rss_before_{name}_MiB": m.before / MiB, f"peak_delta_{name}_MiB": m.delta / MiB,
                f"{label}_{name}_s": time.perf_counter() - t0}
        del out
    return row


def fresh_process(target: str, *args: str, timeout: float | None = None) -> dict:
    """``module:function(*args)`` called in a new Python process; the dict it returns (JSON round trip).

    The child imports this ``qetjax`` (same package directory first on its path), so a
    function measuring memory sees only what it allocates itself.

    Raises:
      ValueError: ``target`` is not ``module:function``.
      subprocess.CalledProcessError: the child failed (its stderr is attached).

    Example:
        >>> fresh_process("qetjax.bench.minilm:memory_row", "rtn", "4.25")["peak_delta_first_MiB"]
    """
    module, colon, function = target.partition(":")
    if not colon or not module or not function.isidentifier():
        raise ValueError(f"target must be 'module:function', got {target!r}")
    root = str(Path(__file__).resolve().parents[2])  # the directory holding this qetjax package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        subprocess.run([sys.executable, "-m", __name__, target, out, *map(str, args)], env=env, check=True,
                       capture_output=True, text=True, timeout=timeout)
        with open(out) as f:
            return json.load(f)


def _child(argv: Sequence[str]) -> None:
    """The process :func:`fresh_process` starts: ``TARGET OUT [ARGS...]``; writes TARGET's dict to OUT as JSON."""
    target, out, *args = argv
    module, _, function = target.partition(":")
    row = getattr(importlib.import_module(module), function)(*args)
    with open(out, "w") as f:
        json.dump(row, f)


if __name__ == "__main__":
    _child(sys.argv[1:])
