"""`ttr bench`: a tiny real run (each case in its own process), the Markdown and CSV writers,
the FLOP table's coverage of the registry, and one-line CLI errors. Speed is not asserted."""

import csv
import dataclasses

import pytest
import torch

from ttr import bench, bench_cases
from ttr.cli import main


@pytest.fixture(scope="module")
def tiny():
    config = bench.BenchConfig(ops=("linear_attention", "delta_rule"),
                               forms=("recurrent", "chunk"), Ts=(32,), d=8, heads=2,
                               repeats=1, threads=1, matmul_size=128)
    return bench.run(config, command="ttr bench --tiny", progress=False)


def test_tiny_run_rows(tiny):
    rows = tiny["rows"]
    assert [(r.op, r.form) for r in rows] == [
        ("linear_attention", "recurrent"), ("linear_attention", "chunk"),
        ("delta_rule", "recurrent"), ("delta_rule", "chunk")]
    for r in rows:
        assert isinstance(r, bench.Row) and r.note == "", r.note
        assert r.T == 32 and r.dtype == "fp32" and r.repeats == 1 and not r.compiled
        for name in ("fwd_ms", "fwd_min_ms", "fwd_max_ms", "fwd_bwd_ms", "gflops_fwd",
                     "gflops_fwd_bwd", "pct_matmul_fwd", "gflop"):
            assert getattr(r, name) > 0, name
        assert r.fwd_min_ms <= r.fwd_ms <= r.fwd_max_ms
        assert r.peak_mb >= 0
        assert (r.speedup_fwd is None) == (r.form == "recurrent")
    assert tiny["header"]["matmul_gflops"]["fp32"] > 0


def test_markdown_and_csv(tiny, tmp_path):
    text = bench.to_markdown(tiny)
    assert text.startswith("Command: `ttr bench --tiny`")
    for needed in ("torch ", "CPU: ", "CPU capability", "torch threads: 1", "matmul rate",
                   "load average (1 min) at start", "ru_maxrss", "- peers: ",
                   "| op | form | T | dtype |", "| delta_rule | chunk | 32 |"):
        assert needed in text, needed
    assert "bf16 rel err" not in text  # the bf16 columns appear only with bf16 rows
    busy = {**tiny, "header": {**tiny["header"], "load_at_start": 3.5}}
    assert "WARNING" in bench.to_markdown(busy) and "WARNING" not in bench.to_markdown(
        {**tiny, "header": {**tiny["header"], "load_at_start": 0.2}})
    bench.write_csv(tiny, tmp_path / "b.csv")
    with open(tmp_path / "b.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 4 and set(got[0]) == {x.name for x in dataclasses.fields(bench.Row)}


def test_matmul_rate_shrinks_its_size_to_the_time_budget(tiny):
    """A matmul too slow for the budget (bf16 on a CPU without native bf16) is measured at a
    smaller size, and the header says at which."""
    rate, n = bench.matmul_gflops(1024, torch.float32, repeats=1, budget_s=0.0)
    assert rate > 0 and n == 256
    assert bench.matmul_gflops(256, torch.float32, repeats=1, budget_s=0.0)[1] == 256
    assert tiny["header"]["matmul_sizes"] == {"fp32": 128}
    shrunk = {**tiny, "header": {**tiny["header"], "matmul_sizes": {"fp32": 64}}}
    assert "(at 64x64: slow on this CPU" in bench.to_markdown(shrunk)
    assert "slow on this CPU" not in bench.to_markdown(tiny)


def test_flop_table_covers_the_registry():
    pairs = {(name, form) for name, op in bench_cases.OPS.items() for form in op.forms}
    assert pairs - set(bench_cases.FLOPS) == set(), "add a FLOP formula for every new form"
    assert set(bench_cases.FLOPS) - pairs == set(), "FLOP formulas for forms that no longer exist"
    for name, form in pairs:
        flops = bench_cases.flops
        assert 0 < flops(name, form, 512, 64, 16) < flops(name, form, 2048, 64, 16)


def test_cases_and_caps():
    config = bench.BenchConfig(ops=("rls",), Ts=(512, 8192), dtypes=("fp32", "bf16"),
                               compile=True)
    cases = config.cases()
    assert ("rls", "chunk", 8192, "bf16", True) in cases
    assert len(cases) == 2 * (3 + 1) * 2  # T x (forms + compiled chunk) x dtypes
    cap = bench_cases.cap
    assert cap("rls", "recurrent")[0] == 2048 and cap("rls", "chunk") is None
    assert bench_cases.cap("momentum_delta_rule", "chunk_recurrent") is not None


@pytest.mark.parametrize("argv, code", [
    (["bench", "--op", "nope"], 1),
    (["bench", "--form", "nope"], 1),
    (["bench", "--op", "rls", "--form", "fused"], 1),
    (["bench", "--T", "0"], 1),
    (["bench", "--dtype", "fp16"], 2),
])
def test_cli_errors_are_one_line(capsys, argv, code):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("ttr: error: "), err


def test_cli_help(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--op", "--form", "--T", "--d", "--heads", "--bh", "--repeats", "--dtype",
                   "--compile", "--threads", "--out", "--csv", "fp32|bf16"):
        assert option in out, option
