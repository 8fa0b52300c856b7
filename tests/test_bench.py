"""Tests of the benchmark helpers: the configuration mini-language, reports, memory probes."""

import csv
import platform
import time

import numpy as np
import pytest

from qetjax.bench import memory, report
from qetjax.bench.config import Config, parse_config, registered_methods
from qetjax.core import METHODS


def test_registered_methods_are_the_budgeted_ones():
    names = registered_methods()
    assert names == sorted(names) and {"rtn", "pq", "pvq", "qet"} <= set(names)
    assert all(METHODS[n].budget is not None for n in names)
    assert "transposed" in METHODS and "transposed" not in names  # a combinator, no budget solver


def test_parse_config():
    assert parse_config("rtn") == Config("rtn")
    c = parse_config('rtn:group_size=128:granularity="group"+gptq')
    assert c == Config("rtn", (("group_size", 128), ("granularity", "group")), True)
    assert parse_config(c.label) == c
    assert parse_config("pvq:gain_scale=row").options == (("gain_scale", "row"),)
    for bad in ("nope", "rtn+awq", "rtn:128", "rtn:=3", "transposed"):
        with pytest.raises(ValueError, match="config"):
            parse_config(bad)
    with pytest.raises(TypeError, match="string"):
        parse_config(3)


def test_parse_config_mixed():
    c = parse_config("pvq:group_size=64+gptq+mixed")
    assert c == Config("pvq", (("group_size", 64),), True, True) and parse_config(c.label) == c
    assert parse_config("rtn+mixed") == Config("rtn", (), False, True)
    for bad in ("rtn+mixed+mixed", "rtn+gptq+awq"):
        with pytest.raises(ValueError, match="suffixes"):
            parse_config(bad)


ROWS = [{"part": "weights", "target": "linear", "config": "rtn", "cos_mean": 0.98765, "status": "ok"},
        {"part": "weights", "target": "linear", "config": "pq", "status": "n/a (too small)"},
        {"part": "memory", "config": "rtn", "peak_delta_first_MiB": 12.5}]


def test_markdown_table_formats_floats_and_missing_cells():
    text = report.markdown_table([{"a": 1 / 3, "b": None}, {"a": 2, "c": "x"}], ["a", "b", "c"])
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| 0.3333 |  |  |", "| 2 |  | x |"]
    assert report.markdown_table([{"z": 1.0, "y": 2.0}]).splitlines()[0] == "| z | y |"  # first-seen order


def test_markdown_by_part_one_table_per_part_and_target():
    lines = report.markdown_by_part(ROWS).splitlines()
    assert [line for line in lines if line.startswith("###")] == ["### weights linear", "### memory"]
    i = lines.index("### weights linear")
    assert lines[i + 2] == "| config | cos_mean | status |"
    assert lines[i + 4] == "| rtn | 0.9877 | ok |" and lines[i + 5] == "| pq |  | n/a (too small) |"
    assert "| rtn | 12.5000 |" in lines


def test_write_csv_round_trips(tmp_path):
    path = tmp_path / "rows.csv"
    report.write_csv(path, ROWS)
    back = list(csv.DictReader(path.open()))
    assert list(back[0]) == report.columns_of(ROWS) and len(back) == 3
    assert back[0]["cos_mean"] == "0.98765" and back[2]["cos_mean"] == ""
    report.write_csv(path, ROWS[:1], ["config", "status"])
    assert path.read_text().splitlines() == ["config,status", "rtn,ok"]


def test_rss_peak_sees_a_transient_allocation():
    assert memory.rss_bytes() > 0
    with memory.RssPeak() as m:
        x = np.ones(2**25)  # 256 MiB, touched
        time.sleep(0.05)
        del x
    assert m.delta > 200 * 2**20 and m.peak >= m.before
    assert memory.rss_bytes() < m.peak


def test_peak_rss_per_run():
    row = memory.peak_rss(lambda: np.ones(2**24), runs=("a", "b"), label="alloc")  # 128 MiB each
    assert set(row) == {f"{k}_{r}_MiB" for r in ("a", "b") for k in ("rss_before", "peak_delta")} | {"alloc_a_s", "alloc_b_s"}
    assert row["peak_delta_a_MiB"] > 100 and row["alloc_a_s"] >= 0


def test_fresh_process_returns_the_function_result():
    assert memory.fresh_process("platform:python_version") == platform.python_version()
    assert memory.fresh_process("os.path:join", "a", "b") == "a/b"
    with pytest.raises(ValueError, match="module:function"):
        memory.fresh_process("platform.python_version")
