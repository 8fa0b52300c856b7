"""Result rows (dicts) as markdown tables and CSV files, for ``qetjax-bench`` and the model benchmarks.

* :func:`markdown_table`: one table, given columns in a given order;
* :func:`markdown_by_part`: one table per ``(part, target)`` of the rows, each with the columns
  its rows have (the model benchmarks' weights / KV-cache / memory rows);
* :func:`write_csv`: the rows as a CSV file, columns in first-seen order unless given.

Floats are written with a fixed number of digits; missing cells are empty.

Example:
    >>> rows = [{"method": "pq", "mse": 0.0123456}, {"method": "rtn", "mse": 0.05}]
    >>> print(markdown_table(rows, ["method", "mse"]))
    | method | mse |
    |---|---|
    | pq | 0.01235 |
    | rtn | 0.05 |
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any


def _cell(v: Any, float_format: str) -> str:
    if isinstance(v, float):
        return format(v, float_format)
    return "" if v is None else str(v)


def columns_of(rows: Sequence[dict]) -> list[str]:
    """Every key of ``rows``, in the order first seen."""
    return list(dict.fromkeys(k for r in rows for k in r))


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, float_format: str = ".4g") -> str:
    """``rows`` as one markdown table with ``columns`` (default: :func:`columns_of`).

    Example:
        >>> markdown_table([{"a": 1.0, "b": "x"}])
        '| a | b |\\n|---|---|\\n| 1 | x |'
    """
    columns = columns_of(rows) if columns is None else list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c), float_format) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def markdown_by_part(rows: Sequence[dict], float_format: str = ".4f") -> str:
    """One markdown table per ``(part, target)`` of ``rows`` under a ``### part target`` heading.

    Example:
        >>> print(markdown_by_part([{"part": "kv", "config": "rtn", "cos_mean": 0.99}]))
        <BLANKLINE>
        ### kv
        <BLANKLINE>
        | config | cos_mean |
        |---|---|
        | rtn | 0.9900 |
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["part"], r.get("target", "")), []).append(r)
    out = []
    for (part, target), rs in groups.items():
        cols = [c for c in columns_of(rs) if c not in ("part", "target")]
        out += [f"\n### {part} {target}".rstrip(), "", markdown_table(rs, cols, float_format)]
    return "\n".join(out)


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """Writes ``rows`` to the CSV file ``path`` with a header of ``columns`` (default: :func:`columns_of`;
    keys outside given ``columns`` are left out)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns_of(rows) if columns is None else list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
