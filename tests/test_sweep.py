"""`ttr sweep` / `ttr report`: validation before any run, atomic per-run results, resuming after a
SIGKILL, a finished sweep doing nothing, the report, and the frozen catalogue memories of the
online-regression catalogue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ttr import catalog
from ttr.cli import main
from ttr.experiments import leaderboard, leaderboard_plots
from ttr.experiments.mqar import evaluate
from ttr.experiments.online_regression import METHODS
from ttr.experiments.sweep_tasks import (
    MQARRun,
    RegressionRun,
    frozen_entry,
    regression_data,
    run_mqar,
)
from ttr.sweep import Checkpoint, finished, get_experiment, plan, run_sweep

TINY_MQAR = dict(task="mqar", d_model=8, n_heads=1, num_pairs=2, seq_len=16, vocab_size=16,
                 steps=3, batch_size=4, n_test=8)
TINY_REG = dict(task="online_regression", T=8, d=4, seeds=2)


def _experiment(tmp_path: Path, runs: list[dict], name: str = "exp") -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(f"RUNS = {runs!r}\n\ndef runs(quick):\n    return RUNS\n")
    return path


TINY_RUNS = ([dict(TINY_MQAR, layer=n, lr=lr) for n in ("linear_attention", "deltanet")
              for lr in (1e-3, 1e-2)]
             + [dict(TINY_MQAR, layer="mesa", variant="paper", n_layers=1, mlp=False, lr=1e-2)]
             + [dict(TINY_REG, method=m, source=s, variant=v)
                for s, m in (("paper", "rls"), ("catalog", "gated_deltanet"))
                for v in ("switch", "noisy")])


def test_the_sweep_bar_weighs_runs_by_cost_and_takes_a_resumed_runs_saved_part_off():
    """Work is counted in the experiment's run costs and credited as runs report steps; a
    run's first report is its baseline (a resumed run's saved part comes off the total, so
    the rate, and the ETA, count only this process's work); a late report after the finish
    credits nothing."""
    from ttr.sweep import Run, SweepProgress

    runs = [Run("mqar", None, name, name) for name in ("a", "b", "c")]
    bar = SweepProgress(runs, {"a"}, {"a": 1.0, "b": 3.0, "c": 6.0}, "sweep", enabled=False)
    assert (bar.n, bar.total, bar.runs_done) == (1.0, 10.0, 1)
    bar.step("b", 0, 10)
    bar.step("b", 5, 10)
    assert bar.n == 2.5
    bar.step("c", 50, 100)  # resumed half-way
    assert (bar.n, bar.total) == (2.5, 7.0)
    bar.step("c", 100, 100)
    bar.finish("c")
    assert (bar.n, bar.runs_done) == (5.5, 2)
    bar.finish("b")
    bar.step("b", 10, 10)
    assert (bar.n, bar.total, bar.runs_done) == (7.0, 7.0, 3)
    even = SweepProgress(runs, set(), None, "sweep", enabled=False)  # no costs: a run is 1
    even.finish("c")
    assert (even.n, even.total) == (1.0, 3.0)
    # costs credited in sevenths: summed, 1.1 against a total of 1.0999999999999999
    odd = SweepProgress(runs, set(), {"a": 0.1, "b": 0.7, "c": 0.3}, "sweep", enabled=False)
    for name in "abc":
        for done in range(8):
            odd.step(name, done, 7)
        odd.finish(name)
    assert odd.n == odd.total == odd.bar.n == odd.bar.total  # the finished bar is full


def test_fig3s_costs_put_local_linear_attention_at_t_1024_above_every_other_run():
    from ttr.sweep import estimated_costs

    runs = plan(get_experiment("fig3"), False)
    costs = estimated_costs(get_experiment("fig3"), runs)
    top = max(runs, key=lambda r: costs[r.id])
    assert (top.config.layer, top.config.seq_len) == ("local_linear", 1024)
    # one step of each layer at T = 128 and 1024 is the table's measurement
    for r in runs:
        at_128, at_1024 = get_experiment("fig3").STEP_SECONDS[r.config.layer]
        if r.config.seq_len in (128, 1024):
            step = at_128 if r.config.seq_len == 128 else at_1024
            assert costs[r.id] == pytest.approx(r.config.steps * step)


def test_a_sweep_with_costs_runs_and_a_bad_cost_is_refused_before_any_run(tmp_path):
    runs = [dict(TINY_REG, method="rls", source="paper", variant=v) for v in ("switch", "noisy")]
    path = _experiment(tmp_path, runs)
    path.write_text(path.read_text() + "\ndef cost(config):\n    return config['T'] * 2.0\n")
    summary = run_sweep(get_experiment(str(path)), tmp_path / "out", workers=2, progress=True,
                        log=lambda s: None, start_method="fork")
    assert summary["ran"] == 2
    bad = _experiment(tmp_path, runs, name="bad")
    bad.write_text(bad.read_text() + "\ndef cost(config):\n    return 0.0\n")
    with pytest.raises(ValueError, match=r"bad.cost: expected a positive finite number for "
                                         r"regression-.*, got 0.0"):
        run_sweep(get_experiment(str(bad)), tmp_path / "bad_out", progress=False,
                  log=lambda s: None)
    assert not (tmp_path / "bad_out").exists()  # refused before touching the directory


@pytest.mark.parametrize("bad, message", [
    (dict(TINY_MQAR, layer="nope"), "MQARRun.layer"),
    (dict(TINY_MQAR, layer="deltanet", lr=-1.0), "MQARRun.lr"),
    (dict(TINY_MQAR, layer="deltanet", seq_len=6), "MQARRun.seq_len"),
    (dict(TINY_MQAR, layer="deltanet", colour=1), "unknown keys ['colour']"),
    (dict(TINY_REG, method="rls", source="paper", variant="windy"), "RegressionRun.variant"),
    (dict(task="sing"), "'task' one of"),
])
def test_invalid_config_is_rejected_before_any_run(tmp_path, bad, message):
    exp = get_experiment(str(_experiment(tmp_path, [dict(TINY_MQAR, layer="deltanet"), bad])))
    with pytest.raises(ValueError, match="exp config 1") as info:
        run_sweep(exp, tmp_path / "out", progress=False, log=lambda s: None)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_duplicate_runs_and_unknown_experiments_are_errors(tmp_path):
    run = dict(TINY_MQAR, layer="deltanet")
    with pytest.raises(ValueError, match="config 1: the same run as config 0"):
        plan(get_experiment(str(_experiment(tmp_path, [run, dict(run)]))), False)
    with pytest.raises(ValueError, match="EXPERIMENT: expected one of"):
        get_experiment("no_such_experiment")


def test_shipped_experiments_are_valid():
    sizes = {name: (len(plan(get_experiment(name), True)), len(plan(get_experiment(name), False)))
             for name in ("mqar_catalogue", "online_regression_catalogue", "fig2", "fig3",
                          "fig3_rls")}
    n = len(catalog.names())
    assert sizes["mqar_catalogue"][0] == n * 2 * 2  # every entry, both variants, 2 lrs
    paper = sum(fn is not None for fn in METHODS.values())
    assert sizes["online_regression_catalogue"][0] == (n + paper) * 3
    assert sizes["fig2"] == (paper, paper)
    assert sizes["fig3_rls"] == (6, 6)


def test_sweep_runs_everything_once_and_a_rerun_does_nothing(tmp_path):
    exp = get_experiment(str(_experiment(tmp_path, TINY_RUNS)))
    out, said = tmp_path / "out", []
    summary = run_sweep(exp, out, workers=2, progress=False, log=said.append)
    assert summary["ran"] == len(TINY_RUNS) and summary["skipped"] == 0
    records = finished(out)
    assert len(records) == len(TINY_RUNS)
    assert not list((out / "runs").glob(".*"))  # no temporary files left
    again = run_sweep(exp, out, workers=2, progress=False, log=said.append)
    assert again["ran"] == 0 and "nothing to do" in said[-1]
    # A run's result depends on its config alone, not on the worker or the order.
    rec = next(r for r in records.values() if r["config"]["layer" if "layer" in r["config"]
                                                         else "method"] == "mesa")
    alone = run_mqar(MQARRun.from_dict(rec["config"]), lambda *a: None)
    assert alone["accuracy"] == rec["result"]["accuracy"]
    # The report: a leaderboard with every layer, CSVs and the plots.
    files = leaderboard.write(out)
    text = files["leaderboard"].read_text()
    for name in ("linear_attention", "deltanet", "mesa", "rls (paper)", "gated_deltanet"):
        assert name in text
    assert "Design axes" in text and "Partial" not in text
    for key in ("mqar_csv", "mqar_vs_state", "regression_switch", "regression_noisy"):
        assert files[key].stat().st_size > 0
    assert "mqar_vs_load" not in files  # one paper-variant point: no load axis to draw


def test_a_killed_sweep_resumes_losing_only_the_runs_in_flight(tmp_path):
    runs = [dict(TINY_MQAR, layer="deltanet", steps=40, lr=lr, seed=s)
            for lr in (1e-3, 3e-3) for s in range(4)]
    path = _experiment(tmp_path, runs)
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).with_name("ttr")), "sweep", str(path), "--out", str(out),
           "-j", "1", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((out / "runs").glob("*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers, mid-run
    proc.wait()
    before = finished(out)
    assert 2 <= len(before) < len(runs)
    for rec in before.values():  # every file present is a whole, readable record
        assert set(rec) >= {"config", "result", "seconds", "finished"}
    said = []
    summary = run_sweep(get_experiment(str(path)), out, workers=1, progress=False,
                        log=said.append)
    assert summary["skipped"] == len(before)
    assert summary["skipped"] + summary["ran"] == len(runs)
    after = finished(out)
    assert all(after[k] == v for k, v in before.items())  # finished runs were not redone


def test_cli_sweep_dry_run_report_and_errors(tmp_path, capsys):
    path = _experiment(tmp_path, TINY_RUNS[-2:])
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("todo") == 2
    assert main(["sweep", str(path), "--out", str(out), "-q", "-j", "1"]) == 0
    assert main(["report", str(out)]) == 0
    assert (out / "leaderboard.md").exists()
    assert main(["sweep", "fig9"]) == 1
    assert "EXPERIMENT: expected one of" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "no sweep.json" in capsys.readouterr().err
    other = _experiment(tmp_path, TINY_RUNS[:1], name="other")
    assert main(["sweep", str(other), "--out", str(out), "-q"]) == 1
    assert "not the full sweep of 'other'" in capsys.readouterr().err


@pytest.mark.parametrize("name", catalog.names())
def test_frozen_entries_see_the_data_and_constant_gates(name):
    """The frozen memory's inputs: q_t = k_{t+1}, k_t, v_t (before any normalization or feature
    map of the entry), and every gate value the same at every step."""
    run = RegressionRun(name, T=12, d=4, seeds=2)
    q, k, v, _ = regression_data(run)
    m = frozen_entry(name, run.d)
    x = torch.cat([k, v, q], dim=-1)[:, :, 0]
    assert torch.equal(m.q_proj(x), q[:, :, 0])
    assert torch.equal(m.v_proj(x)[..., :run.d], v[:, :, 0])
    if m.k_proj is not None:
        assert torch.equal(m.k_proj(x)[..., :run.d], k[:, :, 0])
    _, _, _, inputs, _, _ = m.memory_inputs(x)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[1] == run.T:
            assert torch.allclose(value, value[:, :1].expand_as(value)), key


def test_report_of_a_partial_sweep_says_so(tmp_path):
    path = _experiment(tmp_path, TINY_RUNS[-2:])
    out = tmp_path / "out"
    run_sweep(get_experiment(str(path)), out, progress=False, workers=1, log=lambda s: None)
    victim = next((out / "runs").glob("*.json"))
    victim.unlink()
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["experiment"] == "exp"
    text = leaderboard.write(out)["leaderboard"].read_text()
    assert "Runs finished: 1 of 2" in text and "Partial" in text
    path.unlink()  # the experiment file is gone: the report counts what it has
    assert "Runs finished: 1;" in leaderboard.write(out)["leaderboard"].read_text()


def test_report_shows_the_experiments_caveats(tmp_path):
    path = _experiment(tmp_path, TINY_RUNS[-1:])
    path.write_text(path.read_text() + "\nCAVEATS = ['the zoology table measures the conv']\n")
    out = tmp_path / "out"
    run_sweep(get_experiment(str(path)), out, progress=False, workers=1, log=lambda s: None)
    text = leaderboard.write(out)["leaderboard"].read_text()
    assert "**Caveats**" in text and "- the zoology table measures the conv" in text
    path.write_text(path.read_text().replace("CAVEATS", "NOT_CAVEATS"))
    assert "Caveats" not in leaderboard.write(out)["leaderboard"].read_text()


class _Killed(Exception):
    pass


def test_an_interrupted_mqar_run_continues_from_its_checkpoint_to_the_same_result(tmp_path):
    """A run stopped after step 4 of 10 continues from its last save (step 3) in a new call and
    ends exactly where the uninterrupted run does: the same losses, so the same model."""
    run = MQARRun.from_dict({**{k: v for k, v in TINY_MQAR.items() if k != "task"},
                             "layer": "deltanet", "steps": 10})
    whole = run_mqar(run, lambda *a: None)
    path = tmp_path / "run.pt"

    def stop_at_4(done, total):
        if done == 4:
            raise _Killed

    with pytest.raises(_Killed):
        run_mqar(run, stop_at_4, Checkpoint(path, every=1e-9))  # saves after every step
    assert torch.load(path, weights_only=True)["step"] == 3
    seen, ckpt = [], Checkpoint(path, every=1e-9)
    resumed = run_mqar(run, lambda done, total: seen.append(done), ckpt)
    assert ckpt.segments == 2 and seen[0] == 3 and seen[-1] == 10  # it went on from step 3
    for key in ("final_loss", "accuracy", "params", "state_floats"):
        assert resumed[key] == whole[key], key
    with pytest.raises(ValueError, match="checkpoint_every"):
        Checkpoint(path, every=0)
    path.write_bytes(b"not a checkpoint")  # unreadable (edited by hand): the run starts over
    assert Checkpoint(path, every=1).load() is None


def test_a_killed_sweep_continues_its_runs_in_flight(tmp_path, capsys):
    """SIGKILL mid-run: the rerun takes the run up from its saved state (recorded as two
    segments), gives the uninterrupted run's result and leaves no state behind."""
    runs = [dict(TINY_MQAR, layer="deltanet", steps=400, lr=3e-3)]
    path = _experiment(tmp_path, runs)
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).with_name("ttr")), "sweep", str(path), "--out", str(out),
           "-j", "1", "--threads", "1", "--checkpoint-every", "0.05", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "partial").glob("*.pt")) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not finished(out) and len(list((out / "partial").glob("*.pt"))) == 1
    assert main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    assert "part  mqar-deltanet" in capsys.readouterr().out
    assert main(["sweep", str(path), "--out", str(out), "--checkpoint-every", "-1"]) == 2
    assert "--checkpoint-every" in capsys.readouterr().err
    said = []
    summary = run_sweep(get_experiment(str(path)), out, workers=1, threads=1, progress=False,
                        checkpoint_every=0.05, log=said.append)
    assert summary["resumed"] == 1 and "continue from their saved state" in " ".join(said)
    (record,) = finished(out).values()
    assert record["segments"] == 2
    alone = run_mqar(MQARRun.from_dict(record["config"]), lambda *a: None)
    assert record["result"]["final_loss"] == alone["final_loss"]
    assert not list((out / "partial").glob("*.pt"))  # removed with the result written
    assert (out / "partial" / ".gitignore").read_text() == "*\n"


def _children(pid: int) -> list[str]:
    """Every child of `pid`, whichever of its threads started it."""
    return [c for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def _alive(pid: int) -> bool:
    try:  # a zombie (not reaped by a container's init) counts as gone
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_killing_the_sweep_process_alone_ends_its_workers(tmp_path):
    """`kill` of the sweep's own process (not its process group): its workers end within
    seconds instead of running on beside a restarted sweep, and so does every other process it
    started (with progress bars on: a multiprocessing Manager's server outlived it)."""
    path = _experiment(tmp_path, [dict(TINY_MQAR, layer="deltanet", steps=100000)])
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).with_name("ttr")), "sweep", str(path), "--out", str(out),
           "-j", "1", "--threads", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline, workers = time.time() + 120, []
        while time.time() < deadline and not workers:
            time.sleep(0.2)  # the worker: the child that has trained for 3 s (importing torch
            # took any child ~1.5 s of CPU time)
            children = [int(c) for c in _children(proc.pid)]
            workers = [c for c in children
                       if int(Path(f"/proc/{c}/stat").read_text().split()[13]) > 300]
        assert workers, "no worker started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 15
        while any(_alive(c) for c in children) and time.time() < deadline:
            time.sleep(0.1)
        left = [Path(f"/proc/{c}/cmdline").read_bytes()[:80] for c in children if _alive(c)]
        assert not left, left
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_second_sweep_on_the_same_directory_is_refused(tmp_path):
    """While one sweep holds DIR (its lock), another is refused before it touches any file;
    once the first ends, the directory is free again."""
    fcntl = pytest.importorskip("fcntl")
    path = _experiment(tmp_path, TINY_RUNS[-1:])
    out = tmp_path / "out"
    (out / "partial").mkdir(parents=True)
    with open(out / "partial" / ".lock", "w") as held:  # the first sweep, as the kernel sees it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242\n")
        held.flush()
        with pytest.raises(ValueError, match="another ttr sweep is running on .*pid 4242"):
            run_sweep(get_experiment(str(path)), out, workers=1, progress=False,
                      log=lambda s: None)
        assert not (out / "runs").exists()
    summary = run_sweep(get_experiment(str(path)), out, workers=1, progress=False,
                        log=lambda s: None)
    assert summary["ran"] == 1


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path, monkeypatch):
    """A run that raises leaves no result file and does not stop the others; the sweep ends
    with SweepFailed naming it, and a rerun retries only that run. (fork, so that the workers
    inherit the patched task.)"""
    import ttr.experiments.sweep_tasks as st
    from ttr import sweep
    from ttr.sweep import SweepFailed

    runs = [dict(TINY_REG, method=m, source="paper") for m in ("rls", "softmax", "naive")]
    path = _experiment(tmp_path, runs)
    out = tmp_path / "out"
    original = st.run_regression

    def flaky(run, progress):
        if run.method == "softmax":
            raise RuntimeError("boom")
        return original(run, progress)

    monkeypatch.setattr(st, "run_regression", flaky)
    said = []
    with pytest.raises(SweepFailed, match="1 of 3 runs failed.*softmax"):
        sweep.run_sweep(get_experiment(str(path)), out, workers=2, progress=False,
                        log=said.append, start_method="fork")
    assert len(finished(out)) == 2
    monkeypatch.setattr(st, "run_regression", original)
    summary = sweep.run_sweep(get_experiment(str(path)), out, workers=1, progress=False,
                              log=said.append, start_method="fork")
    assert (summary["ran"], summary["skipped"]) == (1, 2)


def test_a_diverging_mqar_run_is_a_result():
    run = MQARRun.from_dict({**{k: v for k, v in TINY_MQAR.items() if k != "task"},
                             "layer": "titans", "lr": 1e6, "steps": 20})
    result = run_mqar(run, lambda *a: None)
    assert result["diverged_at_step"] is not None and result["accuracy"] == 0.0
    assert result["final_loss"] is None


@pytest.mark.parametrize("variant", ["zoology", "paper"])
def test_entries_without_a_key_conv_get_one_in_both_variants(variant):
    """The length-2 key conv (Eq. 56-58) goes to every entry that has none (softmax attention),
    not over an entry's own (deltanet's 4), and key_conv=0 leaves it out."""
    from ttr.experiments.sweep_tasks import CatalogMQARModel

    model = dict(n_layers=1, mlp=False) if variant == "paper" else dict(n_layers=2, mlp=True)
    base = {**{k: v for k, v in TINY_MQAR.items() if k != "task"}, **model, "variant": variant}

    def conv_k(layer, **over):
        run = MQARRun.from_dict({**base, "layer": layer, **over})
        return {m.config.conv_k for m in CatalogMQARModel(run).mixers}

    assert conv_k("softmax_attention") == {2}
    assert conv_k("deltanet") == {4}
    assert conv_k("softmax_attention", key_conv=0) == {0}


def test_a_numerical_error_is_a_divergence_and_a_plain_value_error_is_a_crash(monkeypatch):
    """A singular Gram (NumericalError) mid-training is a result; any other ValueError is a
    bug and must reach the sweep, which reports the run as failed."""
    import ttr.experiments.mqar as mqar
    from ttr.ops import NumericalError

    run = MQARRun.from_dict({**{k: v for k, v in TINY_MQAR.items() if k != "task"},
                             "layer": "linear_attention", "steps": 6})
    original, calls = mqar.train_step, []
    singular = NumericalError("ridge: not positive definite")

    def blows_up_at_3(*args, exc=singular):
        calls.append(1)
        if len(calls) == 3:
            raise exc
        return original(*args)

    monkeypatch.setattr(mqar, "train_step", blows_up_at_3)
    result = run_mqar(run, lambda *a: None)
    assert result["diverged_at_step"] == 3 and result["accuracy"] == 0.0
    assert "not positive definite" in result["diverged_reason"]
    calls.clear()
    monkeypatch.setattr(mqar, "train_step",
                        lambda *a: blows_up_at_3(*a, exc=ValueError("q: expected 4 dims")))
    with pytest.raises(ValueError, match="expected 4 dims"):
        run_mqar(run, lambda *a: None)


def test_report_plots_accuracy_against_T_and_d_model(tmp_path):
    """Where T or d_model varies at a (variant, P) point, the report draws those plots."""
    runs = [dict(TINY_MQAR, source="recipe", layer=layer, variant="paper", n_layers=1,
                 mlp=False, seq_len=t, d_model=d)
            for layer in ("linear_attention", "rls") for t in (8, 16) for d in (8, 16)]
    out = tmp_path / "out"
    run_sweep(get_experiment(str(_experiment(tmp_path, runs))), out, workers=2,
              progress=False, log=lambda s: None, start_method="fork")
    files = leaderboard.write(out)
    for key in ("mqar_vs_T", "mqar_vs_d", "mqar_vs_state", "mqar_vs_load", "mqar_by_load"):
        assert files[key].stat().st_size > 0
    text = files["leaderboard"].read_text()
    assert "rls (recipe)" in text and "d=16 P=2 T=16" in text
    assert "Accuracy by memory load" in text and "by_load" not in files["mqar_csv"].read_text()


def test_the_by_load_table_merges_buckets_and_hides_thin_ones():
    """Recorded in buckets of 8 loads, shown in columns of 16; a column over fewer than 20
    queries is `-`, and a run without the split is left out of the table."""
    def record(layer, by_load, acc):
        config = dict(layer=layer, source="recipe", variant="paper", d_model=16, num_pairs=20,
                      seq_len=64, lr=1e-2)
        return {"config": config, "result": dict(accuracy=acc, state_floats=64, params=1,
                                                 chance=0.05, accuracy_by_load=by_load)}

    split = {"width": 8, "queries": [10, 30, 100], "correct": [10, 27, 50]}
    assert leaderboard.merged_loads(split, 16) == ([40, 100], [37, 50], 16)
    assert leaderboard.merged_loads(split, 12) == ([10, 30, 100], [10, 27, 50], 8)
    text = "\n".join(leaderboard._mqar_section(leaderboard.mqar_rows(
        [record("rls", split, 0.6), record("linear_attention", None, 0.5),
         record("delta_rule", {"width": 8, "queries": [5, 10, 100], "correct": [5, 10, 90]},
                0.9)])))
    table = text.split("Accuracy by memory load")[1]
    assert "| layer | 0-15 | 16-20 | all | queries |" in table
    assert "| rls (recipe) | 92.5% | 50.0% | 62.1% | 140 |" in table
    assert "| delta_rule (recipe) | - | 90.0% | 91.3% | 115 |" in table
    assert table.index("delta_rule") < table.index("rls")  # by accuracy
    assert "linear_attention" not in table.split("Design axes")[0]


def test_the_by_load_axis_table_averages_each_choice_per_load_column():
    """At a catalogue's point (over ten layers) the by-load table gets a companion: per design
    choice, the mean of its layers' accuracy per load column. A layer at 100% without the split
    counts as 100% in every column; one below 100% without it is left out; a column no query
    reached is dropped from both tables."""
    def record(layer, correct, acc):
        config = dict(layer=layer, source="catalog", variant="paper", d_model=16, num_pairs=40,
                      seq_len=128, lr=1e-2)
        split = None if correct is None else {"width": 8, "queries": [30, 30, 30, 30, 0, 0],
                                              "correct": [*correct, 0, 0]}
        return {"config": config, "result": dict(accuracy=acc, state_floats=64, params=1,
                                                 chance=0.05, accuracy_by_load=split)}

    exact, others = [30, 30, 30, 18], [30, 30, 15, 15]
    records = [record(n, exact, 0.9) for n in ("mesa", "mesanet")]
    records += [record(n, others, 0.75) for n in ("linear_attention", "deltanet", "retnet",
                                                  "mamba2", "longhorn", "nlms", "hedgehog")]
    records += [record("softmax_attention", None, 1.0), record("gla", None, 0.5)]
    text = "\n".join(leaderboard._mqar_section(leaderboard.mqar_rows(records)))
    axes = text.split("by design axis")[1].split("Design axes")[0]
    assert "| choice | 0-15 | 16-31 |\n" in axes  # loads 32-40: no query, no column
    assert "| optimizer: exact (3) | 100.0% | 86.7% |" in axes  # (80 + 80 + 100) / 3
    assert "| optimizer: online SGD (3) | 100.0% | 50.0% |" in axes
    assert "| weights: local (1) | 100.0% | 100.0% |" in axes
    assert "geometric per-dim" not in axes  # gla: below 100% and no split
    table = text.split("Accuracy by memory load")[1].split("by design axis")[0]
    assert "| layer | 0-15 | 16-31 | all | queries |" in table
    # a few layers: the per-layer table alone
    few = "\n".join(leaderboard._mqar_section(leaderboard.mqar_rows(records[:3])))
    assert "Accuracy by memory load" in few and "by design axis" not in few


def test_a_partial_leaderboard_ranks_on_the_points_every_layer_has_finished():
    """A layer missing a (harder) point must not rank on its easier points alone: the means
    are over the points every layer has finished (all its planned learning rates), a point
    with learning rates still to run is marked, and without a plan every point counts."""
    def record(layer, T, lr, acc):
        config = dict(layer=layer, source="recipe", variant="paper", d_model=8, num_pairs=2,
                      seq_len=T, lr=lr)
        return {"config": config, "result": dict(accuracy=acc, state_floats=64, params=1,
                                                 chance=0.5)}

    planned = [record(layer, T, lr, 0) for layer in ("linear_attention", "rls")
               for T in (16, 32) for lr in (1e-3, 1e-2)]
    done = [record("linear_attention", 16, lr, 1.0) for lr in (1e-3, 1e-2)] + [
        record("linear_attention", 32, lr, 0.2) for lr in (1e-3, 1e-2)] + [
        record("rls", 16, lr, 0.9) for lr in (1e-3, 1e-2)] + [record("rls", 32, 1e-3, 0.1)]
    text = "\n".join(leaderboard._mqar_section(leaderboard.mqar_rows(done, planned)))
    assert "mean over the 1 of 2 grid points that every layer has finished (d=8 P=2 T=16)" in text
    from ttr.tasks.mqar import paper_mqar_load

    assert f"d=8 P=2 T=32: {paper_mqar_load(32, 2):.1f}." in text  # the paper variant's load
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| linear_attention (recipe)") or line.startswith("| rls (recipe)")}
    assert rows["linear_attention (recipe)"].rstrip(" |").endswith("100.0%")
    assert rows["rls (recipe)"].rstrip(" |").endswith("90.0%")
    assert "| 10.0%* |" in rows["rls (recipe)"]
    # the first table ranks linear attention above RLS on the common point
    assert text.index("| linear_attention (recipe)") < text.index("| rls (recipe)")
    # without a plan every point counts: means over both
    text = "\n".join(leaderboard._mqar_section(leaderboard.mqar_rows(done)))
    assert "mean over the grid points;" in text and "*" not in text.split("Design axes")[0]
    assert "| 60.0% |" in text and "| 50.0% |" in text


def test_the_by_load_plot_of_a_catalogue_colours_families_and_names_the_low_layers(
        tmp_path, monkeypatch):
    """A few layers get a line style each (fig3); a catalogue's dozens get a colour per family
    in the legend, and only the layers below LABEL_BELOW are named, at their lowest point."""
    from matplotlib.figure import Figure

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    split = {"width": 8, "queries": [300, 300, 300], "correct": [300, 297, 150]}
    good = {"width": 8, "queries": [300, 300, 300], "correct": [300, 300, 299]}

    def rows(n):
        return [dict(layer=f"layer_{i}", family=("online SGD", "linear attention")[i % 2],
                     d_model=16, num_pairs=20, seq_len=64, by_load=split if i < 2 else good)
                for i in range(n)]

    leaderboard_plots._plot_by_load(rows(12), tmp_path)
    ax = figures[-1].axes[0]
    assert {t.get_text() for t in ax.texts} == {"layer_0", "layer_1"}
    legend = [t.get_text() for t in figures[-1].legends[0].get_texts()]
    assert sorted(legend) == ["linear attention", "load = d_model", "online SGD"]
    # the named point is the curve's lowest: the bucket of loads 16-20 at its middle, 18
    assert {a.xy for a in ax.texts} == {(18.0, 0.5)}
    leaderboard_plots._plot_by_load(rows(3), tmp_path)
    assert not figures[-1].axes[0].texts
    legend = [t.get_text() for t in figures[-1].legends[0].get_texts()]
    assert sorted(legend) == ["layer_0", "layer_1", "layer_2", "load = d_model"]


def test_plot_names_do_not_overprint():
    """A dozen layers failing at one point (as at d_model 32, P = 64) get their names one above
    the other, each joined to its point, instead of one overprinted block; the boxes of names
    at different x clear each other too."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    fig = Figure(figsize=(4.6, 3.6))
    ax = fig.subplots()
    labels = [(f"layer_{i}", 32.0, 0.02 + 0.004 * i) for i in range(12)]
    labels += [("neighbour", 34.0, 0.03), ("alone", 128.0, 0.5)]
    ax.scatter([x for _, x, _ in labels], [y for *_, y in labels])
    ax.set_xscale("log", base=2)
    ax.set(xlim=(24, 160), ylim=(-0.02, 1.02))
    leaderboard_plots._place_labels(ax, labels)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # places the names (an annotation resolves its position when drawn)
    renderer = canvas.get_renderer()
    texts = {t.get_text(): t for t in ax.texts}
    assert set(texts) == {name for name, *_ in labels}
    # the text alone (an annotation's own extent takes in its leader line)
    boxes = [Text.get_window_extent(t, renderer).shrunk(0.98, 0.85) for t in texts.values()]
    overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert not overlaps
    assert texts["alone"].arrow_patch is None  # a name with room stays at its point
    assert texts["layer_11"].arrow_patch is not None


def test_matched_pairs_compare_layers_that_differ_on_one_axis():
    """Only pairs differing on exactly one axis count, each read along AXIS_ORDER (the
    simpler choice first), with deltas per grid point over the points both have finished."""
    def row(w, o, acc, complete=True):
        return {"family": "f", "weights": w, "function class": "linear", "optimizer": o,
                "accuracy": acc, "complete": complete}

    p1, p2 = (32, 8, 64), (64, 8, 64)
    per_layer = {
        "zeta": {p1: row("uniform", "1 GD step from 0", 0.5), p2: row("uniform",
                                                                       "1 GD step from 0", 0.6)},
        "alpha": {p1: row("uniform", "exact", 0.9), p2: row("uniform", "exact", 1.0, False)},
        "mid": {p1: row("geometric", "exact", 0.7), p2: row("geometric", "exact", 0.7)},
    }
    summary, detail = leaderboard._matched_pairs(per_layer, [p1, p2])
    lines = [line for line in summary.splitlines()[2:]]
    assert lines == [
        "| weights | uniform -> geometric | 1 | -20.0 | - | -20.0 |",
        "| optimizer | 1 GD step from 0 -> exact | 1 | +40.0 | - | +40.0 |",
    ]
    assert "| optimizer | zeta -> alpha | +40.0 | - | +40.0 |" in detail  # zeta has the
    # simpler optimizer, so it comes first although its name sorts last
    assert "zeta -> mid" not in detail and "mid -> zeta" not in detail  # two axes differ
    assert leaderboard._matched_pairs({"a": per_layer["alpha"]}, [p1]) == ("", "")


def test_matched_pairs_of_losses_skip_diverged_runs():
    """The online-regression report compares whole-sequence losses the same way, per variant;
    a diverged run (loss None) leaves its cell out."""
    def row(o, loss):
        return {"family": "f", "weights": "uniform", "function class": "linear", "optimizer": o,
                "all": loss}

    per_layer = {"la": {"switch": row("1 GD step from 0", 0.5), "noisy": row("1 GD step from 0",
                                                                            0.7)},
                 "rls": {"switch": row("exact", 0.2), "noisy": row("exact", None)}}
    summary, detail = leaderboard._matched_pairs(per_layer, ["noisy", "switch"], "all",
                                                 lambda x: f"{x:+.3f}", str)
    assert "| optimizer | 1 GD step from 0 -> exact | 1 | - | -0.300 | -0.300 |" in summary
    assert "| optimizer | la -> rls | - | -0.300 | -0.300 |" in detail


def test_the_committed_results_keep_their_run_ids():
    """Every result file under docs/results/sweeps is a run its experiment still plans (same
    id): a config field added later (default None, left out of the id) must not orphan the
    recorded runs, which a restarted sweep would otherwise run again."""
    root = Path(__file__).resolve().parents[1] / "docs" / "results" / "sweeps"
    dirs = [d for d in sorted(root.iterdir()) if (d / "sweep.json").exists()]
    assert dirs
    for d in dirs:
        meta = json.loads((d / "sweep.json").read_text())
        planned = {r.file_name for r in plan(get_experiment(meta["experiment"]),
                                             meta["mode"] == "quick")}
        files = {f.name for f in (d / "runs").glob("*.json")}
        assert files and files <= planned, (d.name, sorted(files - planned)[:3])


RLS_RUN = {**{k: v for k, v in TINY_MQAR.items() if k != "task"}, "source": "recipe",
           "layer": "rls", "variant": "paper", "n_layers": 1, "mlp": False}


@pytest.mark.parametrize("over, message", [
    (dict(ridge=0.0), "MQARRun.ridge: expected a number > 0 or None, got 0.0"),
    (dict(ridge="1"), "MQARRun.ridge: expected a number > 0 or None, got '1'"),
    (dict(ridge=0.1, layer="linear_attention"), "only the 'rls' recipe layer"),
    (dict(ridge=0.1, source="catalog", layer="mesa"), "only the 'rls' recipe layer"),
])
def test_mqar_ridge_is_validated(over, message):
    with pytest.raises(ValueError, match=message):
        MQARRun.from_dict({**RLS_RUN, **over})


def test_mqar_ridge_reaches_the_rls_layer_and_none_is_fig3s(tmp_path):
    """ridge=None is fig3's 1.0, result for result; another ridge trains another model; and a
    set ridge is in the run's label and id, an unset one in neither."""
    result = {r: run_mqar(MQARRun.from_dict({**RLS_RUN, "ridge": r}), lambda *a: None)
              for r in (None, 1.0, 1e-3)}
    assert result[None]["final_loss"] == result[1.0]["final_loss"]
    assert result[1e-3]["final_loss"] != result[1.0]["final_loss"]
    none, one = (MQARRun.from_dict({**RLS_RUN, "ridge": r}) for r in (None, 1.0))
    assert none.label().endswith("-lr0.003") and one.label().endswith("-lr0.003-ridge1")
    runs = [{"task": "mqar", **RLS_RUN}, {"task": "mqar", **RLS_RUN, "ridge": 1.0}]
    ids = [r.id for r in plan(get_experiment(str(_experiment(tmp_path, runs))), False)]
    assert len(set(ids)) == 2


def test_an_ablations_settings_are_rows_of_their_own():
    """Runs of one layer at one grid point that differ in a field besides the learning rate
    (an ablation's ridge or steps) are separate rows, named by those fields, not one
    learning-rate sweep; a field that changes only between grid points names nothing."""
    def record(layer, lr, acc, **over):
        config = dict(dict(layer=layer, source="recipe", variant="paper", d_model=8,
                           num_pairs=2, seq_len=16, lr=lr, steps=100), **over)
        return {"config": config, "result": dict(accuracy=acc, state_floats=64, params=1,
                                                 chance=0.5)}

    done = [record("rls", 1e-3, 0.9, ridge=1.0), record("rls", 1e-2, 0.8, ridge=1.0),
            record("rls", 1e-3, 0.7, ridge=0.01), record("rls", 1e-3, 0.95),
            record("linear_attention", 1e-3, 0.6), record("linear_attention", 1e-3, 0.5,
                                                          steps=200)]
    rows = {r["layer"]: r["accuracy"] for r in leaderboard.mqar_rows(done)}
    assert rows == {"rls (recipe) ridge=1 steps=100": 0.9, "rls (recipe) ridge=0.01 steps=100":
                    0.7, "rls (recipe) steps=100": 0.95, "linear_attention (recipe) steps=100":
                    0.6, "linear_attention (recipe) steps=200": 0.5}
    # steps changing with T (as a catalogue grid might) is not an ablation
    grid = [record("rls", 1e-3, 0.9), record("rls", 1e-3, 0.8, seq_len=32, steps=200)]
    assert {r["layer"] for r in leaderboard.mqar_rows(grid)} == {"rls (recipe)"}


def test_the_load_numbers_quoted_in_the_experiments_are_the_closed_forms():
    """fig3's and the catalogue's caveats quote `paper_mqar_load`; they must say what it says."""
    from ttr.experiments.sweeps import fig3, mqar_catalogue
    from ttr.tasks.mqar import paper_mqar_load

    text = " ".join(fig3.CAVEATS)
    for P, Ts in ((64, (128, 256, 512, 1024)), (128, (256, 512, 1024))):
        assert " / ".join(f"{paper_mqar_load(T, P):.1f}" for T in Ts) in text
    text = " ".join(mqar_catalogue.CAVEATS)
    for P, T in ((32, 64), (64, 128)):
        assert f"{paper_mqar_load(T, P):.1f} at P = {P} (T = {T})" in text


@pytest.mark.parametrize("variant", ["paper", "zoology"])
def test_a_paper_mqar_run_records_its_accuracy_by_load(variant):
    """The paper variant draws its pairs with replacement, so its result splits the accuracy by
    the memory load of each query (`accuracy_by_load`); the zoology variant's P pairs are all
    stored before any query, and its result has no split."""
    run = MQARRun.from_dict({**{k: v for k, v in TINY_MQAR.items() if k != "task"},
                             "layer": "linear_attention", "lr": 1e-2, "variant": variant})
    models = []  # the `trained` hook receives the trained model, once
    result = run_mqar(run, lambda *a: None, trained=models.append)
    assert len(models) == 1 and isinstance(models[0], torch.nn.Module)
    if variant == "zoology":
        assert "accuracy_by_load" not in result
        return
    split = result["accuracy_by_load"]
    assert len(split["queries"]) == run.num_pairs // split["width"] + 1
    assert sum(split["correct"]) / sum(split["queries"]) == result["accuracy"]
    # the accuracy is read off the split; it is still `evaluate`'s on the run's test set
    assert result["accuracy"] == evaluate(models[0], *run.test_data())
