"""Frozen corpora of real English text (Python standard-library docstrings), read from package data.

Text read live from the running Python's docstrings changes with the Python version, and so
would every table computed on it; these corpora were extracted once (Python 3.11.7, by
``scripts/freeze_corpora.py``) and are shipped in ``qetjax/bench/corpora/``:

* :func:`stdlib_sentences`: the MiniLM benchmark's prose sentences (2105, in their original order);
* :func:`llm_text`: the causal-LM perplexity text (``"eval"``, ~58k SmolLM2 tokens) and the
  disjoint calibration text (``"calib"``, ~52k tokens; other modules, no docstring in both).

Example:
    >>> sentences = stdlib_sentences(256)
    >>> len(sentences), sentences[0][:30]
    >>> llm_text("eval")[:40]
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from collections.abc import Iterable

_FILES = {"eval": "stdlib_eval.txt", "calib": "stdlib_calib.txt"}


def _data(name: str) -> str:
    return (importlib.resources.files("qetjax.bench") / "corpora" / name).read_text("utf-8")


@functools.lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    return tuple(json.loads(_data("minilm_sentences.json"))["sentences"])


def stdlib_sentences(count: int, exclude: Iterable[str] = ()) -> list[str]:
    """The first ``count`` sentences of the frozen corpus not in ``exclude``, in a fixed order.

    Args:
      count: number of sentences wanted (fewer are returned if the corpus runs out).
      exclude: sentences to leave out (e.g. a held-out evaluation set).

    Returns:
      A list of at most ``count`` distinct sentences.

    Example:
        >>> stdlib_sentences(2)
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    skip = set(exclude)
    out = [s for s in _all_sentences() if s not in skip]
    return out[:count]


@functools.lru_cache(maxsize=2)
def llm_text(split: str = "eval") -> str:
    """The frozen causal-LM text: ``"eval"`` (perplexity) or ``"calib"`` (calibration), disjoint.

    Example:
        >>> len(llm_text("eval")) > 200_000
        True
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    return _data(_FILES[split])
