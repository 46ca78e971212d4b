"""ttr.train and ttr.tasks.text: determinism, crash safety (SIGKILL, SIGTERM, corrupt files),
data parallelism under torchrun, and the `ttr train` command. Tiny model, 20 steps."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ttr.cli import main
from ttr.tasks.text import load_text, sample_windows
from ttr.train import TrainConfig, read_log, run

TINY = dict(model=dict(d_model=16, n_layers=2, n_heads=2, pattern=("gated_deltanet",)),
            steps=20, batch_size=4, seq_len=32, warmup=5, eval_every=10, eval_batches=2,
            ckpt_every=5, max_bytes=200_000)
# Subprocesses use one thread like this process (tests/conftest.py): CPU results are
# bit-identical only for the same thread count.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# A run in a subprocess, slowed by a callback so that a signal lands mid-run.
SLOW_RUN = """
import json, sys, time
from ttr.train import TrainConfig, run
run(TrainConfig.from_dict(json.loads(sys.argv[1])), progress=False,
    callback=lambda step, row: time.sleep(0.1))
"""


def config(out, **kw):
    return TrainConfig.from_dict({**TINY, "out_dir": str(out), **kw})


def losses(out):
    return [r["train_loss"] for r in read_log(out / "log.csv")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: (out_dir, result)."""
    out = tmp_path_factory.mktemp("reference")
    return out, run(config(out), progress=False)


def checkpoint_step(out):
    try:
        return torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def start_slow_run(tmp_path, out):
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN)
    cfg = {**TINY, "out_dir": str(out)}
    return subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], env=ENV)


def wait_for_checkpoint(proc, out, step, timeout=60.0):
    t0 = time.monotonic()
    while checkpoint_step(out) < step:
        assert proc.poll() is None, f"the run exited with {proc.returncode} before step {step}"
        assert time.monotonic() - t0 < timeout, "no checkpoint in time"
        time.sleep(0.02)


# -- data ----------------------------------------------------------------------------------------

def test_sampler_worked_example_and_rank_slices():
    data = torch.frombuffer(bytearray(b"def f(x):\n"), dtype=torch.uint8)
    x = sample_windows(data, 4, 3, torch.Generator().manual_seed(0))  # [4, 4]
    for row in x:  # every row is a contiguous window of the data
        s = bytes(row.tolist())
        assert s in b"def f(x):\n" and len(s) == 4
    halves = [sample_windows(data, 4, 3, torch.Generator().manual_seed(0), slice(i, i + 2))
              for i in (0, 2)]
    assert torch.equal(torch.cat(halves), x)
    with pytest.raises(ValueError, match="seq_len"):
        sample_windows(data, 1, 10, torch.Generator())


def test_corpus_split_by_file(tmp_path):
    for i in range(40):
        (tmp_path / f"f{i:02d}.txt").write_text(f"<{i:02d}>" * 10)
    (tmp_path / "skip.bin").write_text("ignored")
    d = load_text(str(tmp_path), max_bytes=10**6)
    assert d.n_files == (38, 2)
    train, val = bytes(d.train.tolist()).decode(), bytes(d.val.tolist()).decode()
    assert len(train) + len(val) == 40 * 40 and "ignored" not in train + val
    assert not {val[i:i + 4] for i in range(0, len(val), 4)} & set(train.split(">"))
    single = load_text(str(tmp_path / "f00.txt"), max_bytes=10**6)  # one file: split by bytes
    assert (single.train.numel(), single.val.numel()) == (38, 2)
    std = load_text(None, max_bytes=10_000)  # the stdlib corpus
    assert std.train.numel() + std.val.numel() == 10_000 and std.n_files[1] > 0
    with pytest.raises(ValueError, match="data"):
        load_text(str(tmp_path / "missing"))


# -- configuration and determinism --------------------------------------------------------------

def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="LMConfig: unknown keys"):
        TrainConfig(model={"width": 3})
    with pytest.raises(ValueError, match="vocab_size"):
        TrainConfig(model={"vocab_size": 100})
    with pytest.raises(ValueError, match="TrainConfig.steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        TrainConfig(lr=-1.0)


def test_same_seed_same_losses(tmp_path, reference):
    out, result = reference
    again = run(config(tmp_path / "a"), progress=False)
    assert losses(tmp_path / "a") == losses(out) and len(losses(out)) == 20
    assert again["train_loss"] == result["train_loss"] and again["val_bpb"] == result["val_bpb"]
    other = run(config(tmp_path / "b", seed=1, steps=3), progress=False)
    assert other["train_loss"] != losses(out)[2]


# -- crash safety --------------------------------------------------------------------------------

def test_sigkill_then_resume_is_bit_identical(tmp_path, reference):
    out = tmp_path / "killed"
    proc = start_slow_run(tmp_path, out)
    try:
        wait_for_checkpoint(proc, out, 10)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = checkpoint_step(out)
    assert 10 <= killed_at < 20
    result = run(config(out), resume=True, progress=False)
    assert result["train_loss"] == reference[1]["train_loss"]  # bit-identical
    assert losses(out) == losses(reference[0])  # the log was rewound to the checkpoint


def test_sigterm_checkpoints_and_exits_zero(tmp_path, reference):
    out = tmp_path / "terminated"
    proc = start_slow_run(tmp_path, out)
    try:
        wait_for_checkpoint(proc, out, 5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    stopped_at = checkpoint_step(out)
    assert 5 <= stopped_at < 20 and len(losses(out)) == stopped_at  # checkpoint = last row
    assert run(config(out), resume=True, progress=False)["train_loss"] == \
        reference[1]["train_loss"]


def test_corrupt_or_incompatible_checkpoint_is_refused(tmp_path, reference):
    def copy(name):
        shutil.copytree(reference[0], tmp_path / name)
        return tmp_path / name

    out = copy("truncated")
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        run(config(out), resume=True, progress=False)
    out = copy("weights")
    (w,) = out.glob("model-*.safetensors")
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="sha256"):
        run(config(out), resume=True, progress=False)
    out = copy("incompatible")
    with pytest.raises(ValueError, match="incompatible: it was trained with model"):
        run(config(out, model={**TINY["model"], "d_model": 32}), resume=True, progress=False)
    with pytest.raises(ValueError, match="incompatible: lr="):
        run(config(out, lr=1e-2), resume=True, progress=False)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        run(config(out), progress=False)


# -- data parallel and the command line ---------------------------------------------------------

def test_ddp_two_ranks_equal_one_process(tmp_path):
    """torchrun, 2 CPU ranks (gloo), each with 2 of the 4 rows: the logged loss matches one
    process on all 4 rows to 1e-6 relative (not bitwise: per-rank forward passes on 2 rows and
    the all-reduce of gradients change the float32 summation order)."""
    args = ["--steps", "6", "--d-model", "16", "--n-layers", "2", "--n-heads", "2", "--seq-len",
            "32", "--batch-size", "4", "--max-bytes", "200000", "--eval-every", "3",
            "--eval-batches", "2", "--ckpt-every", "3", "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ttr.train", "--out", str(tmp_path / "ddp"), *args]
    subprocess.run(cmd, env=ENV, check=True, timeout=120, capture_output=True)
    assert main(["train", "--out", str(tmp_path / "one"), *args]) == 0
    ddp, one = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert len(ddp) == len(one) == 6
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(one), rtol=1e-6, atol=0)
    assert checkpoint_step(tmp_path / "ddp") == 6


def test_cli_train(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--out", str(out), "--steps", "2", "--d-model", "16", "--n-layers", "2",
            "--pattern", "deltanet", "--pattern", "gated_deltanet", "--seq-len", "16",
            "--batch-size", "2", "--max-bytes", "20000", "--quiet"]
    assert main(args) == 0
    assert "step 2/2" in capsys.readouterr().out
    assert main([*args, "--steps", "3", "--resume"]) == 1  # steps differ
    assert "incompatible: steps=2 there, 3 here" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "--pattern", "nope"]) == 1
    assert "LMConfig.pattern" in capsys.readouterr().err
    rope = tmp_path / "rope"
    assert main([*args[:2], str(rope), *args[3:], "--mixer", "rope=10000"]) == 0
    saved = torch.load(rope / "checkpoint.pt", weights_only=True)["config"]["model"]
    assert saved["mixer_overrides"] == {"rope": 10000}
    capsys.readouterr()
    assert main([*args[:2], str(tmp_path / "y"), *args[3:], "--mixer", "rope"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_compare_runs_table_and_curves(tmp_path, reference, capsys):
    out_dir, result = reference
    other = tmp_path / "other"
    run(config(other, model={**TINY["model"], "pattern": ("mesa",)}), progress=False)
    report = tmp_path / "report"
    assert main(["compare-runs", str(out_dir), str(other), "--out", str(report)]) == 0
    text = (report / "lm.md").read_text()
    assert "| gated_deltanet |" in text and "| mesa |" in text
    assert f"{result['val_bpb']:.3f}" in text  # the reference run's final validation bpb
    assert (report / "lm_curves.png").stat().st_size > 0
    assert main(["compare-runs", str(tmp_path / "nothing"), "--out", str(report)]) == 1
    assert "RUN_DIR" in capsys.readouterr().err


def test_tensorboard_scalars_equal_the_csv(tmp_path):
    """With the `tb` extra installed, out_dir/tb holds the same scalars as log.csv."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb_run"
    run(config(out, steps=6, eval_every=3), progress=False)
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    rows = read_log(out / "log.csv")
    loss = {e.step: e.value for e in acc.Scalars("train_loss")}
    assert sorted(loss) == [int(r["step"]) for r in rows]
    assert all(loss[int(r["step"])] == pytest.approx(r["train_loss"], rel=1e-6) for r in rows)
    bpb = {e.step: e.value for e in acc.Scalars("val_bpb")}
    assert bpb == pytest.approx({int(r["step"]): r["val_bpb"] for r in rows
                                 if r["val_bpb"] is not None}, rel=1e-6)
