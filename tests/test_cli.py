"""The qetjax-bench command: a quick run prints a full table and writes the CSV."""

import csv

import pytest

from qetjax import cli


def test_quick_bench_table_and_csv(tmp_path, capsys):
    out = tmp_path / "rows.csv"
    argv = ["--quick", "--data", "gaussian", "qet_paper", "--methods", "pq", "rtn", "--bits", "2", "4"]
    assert cli.main(argv + ["--csv", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| data | shape | method")
    rows = list(csv.DictReader(out.open()))
    datasets = {r["data"] for r in rows}
    assert datasets == {"gaussian", "qet_paper"}
    assert len(rows) == len(datasets) * 2 * 2
    for r in rows:
        if r["bits_per_element"]:  # a method that met the budget reports it, within the budget
            assert 0 < float(r["bits_per_element"]) <= float(r["budget"])
            assert float(r["mse"]) >= 0 and float(r["decode_s"]) >= 0
    # 4 bits must beat 2 bits for the same method and data.
    by = {(r["data"], r["method"], float(r["budget"])): r for r in rows if r["mse"]}
    for (d, m, b), r in by.items():
        if b == 2.0 and (d, m, 4.0) in by:
            assert float(by[(d, m, 4.0)]["mse"]) < float(r["mse"])


def test_unknown_method_is_rejected():
    with pytest.raises(SystemExit):
        cli.main(["--methods", "no-such-method"])


@pytest.mark.slow  # 30 s: OPQ on the quick bench shapes; the contract tests cover OPQ's budget fit
def test_taller_matrices_let_opq_rotation_fit(tmp_path, capsys):
    # OPQ's 128x128 float32 rotation is 16 bits/element of a 256-row matrix, 2 of a 2048-row one.
    out = tmp_path / "rows.csv"
    for rows, fits in ((None, False), (2048, True)):
        argv = ["--quick", "--data", "gaussian", "--methods", "opq", "--bits", "4", "--csv", str(out), "--no-progress"]
        assert cli.main(argv + (["--rows", str(rows)] if rows else [])) == 0
        (row,) = csv.DictReader(out.open())
        assert row["shape"] == f"{rows or 256}x128"
        assert bool(row["bits_per_element"]) == fits
        if fits:
            assert 2.0 < float(row["bits_per_element"]) <= 4.0
    with pytest.raises(SystemExit):
        cli.main(["--rows", "0"])
