"""The `ttr` command: help, one-line errors with the right exit codes, tiny end-to-end runs."""

import subprocess
import sys

import pytest

from ttr.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help(capsys):
    code, out, err = _run(capsys, "--help")
    assert code == 0 and err == ""
    for command in ("reproduce", "online-regression", "mqar"):
        assert command in out
    code, out, _ = _run(capsys, "reproduce", "--help")
    assert code == 0
    for option in ("--out", "--full", "--seed", "--variant", "--quiet", "paper|zoology"):
        assert option in out
    assert "╭" not in out  # plain help, no rich box


def test_bare_command_shows_help(capsys):
    code, out, _ = _run(capsys)
    assert code == 0 and "Usage: ttr" in out


@pytest.mark.parametrize("argv, code", [
    (["--nope"], 2),
    (["reproduce", "--nope"], 2),
    (["no-such-command"], 2),
    (["reproduce", "--variant", "nope"], 2),
    (["reproduce", "--seed", "abc"], 2),
    (["online-regression", "--T", "0"], 1),
    (["online-regression", "--method", "nope"], 1),
    (["reproduce", "--seed", "-1"], 1),
])
def test_errors_are_one_line(capsys, argv, code, tmp_path):
    got, out, err = _run(capsys, *argv, "--out", str(tmp_path)) if argv[0] != "--nope" \
        else _run(capsys, *argv)
    assert got == code
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ttr: error: "), err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())  # validation happens before any work


def test_error_in_a_real_process():
    """The console entry in its own process: exit status and stderr as a shell sees them."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from ttr.cli import main; sys.exit(main())",
         "mqar", "--bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ttr: error: No such option: --bogus")


def test_online_regression_command(capsys, tmp_path):
    code, out, err = _run(capsys, "online-regression", "--out", str(tmp_path), "--T", "16",
                          "--d", "4", "--seeds", "2", "--quiet")
    assert code == 0, err
    assert "| method |" in out and "| local_linear (p=1) |" in out
    for name in ("online_regression.csv", "online_regression_summary.csv",
                 "online_regression.png"):
        assert (tmp_path / name).exists()


def test_reproduce_end_to_end(capsys, tmp_path, monkeypatch):
    from ttr.experiments.mqar import MQARConfig
    from ttr.experiments.online_regression import OnlineRegressionConfig

    # Tiny stand-ins for the quick configurations: the wiring is under test, not the paper.
    monkeypatch.setattr(OnlineRegressionConfig, "quick",
                        classmethod(lambda cls: cls(T=16, d=4, seeds=2)))
    monkeypatch.setattr(MQARConfig, "quick", classmethod(lambda cls, variant="paper": cls(
        num_pairs=(4,), seq_lens=(16, 32), train_seq_len=16, d_model=16, steps=5,
        batch_size=4, n_test=4)))
    code, out, err = _run(capsys, "reproduce", "--out", str(tmp_path), "--seed", "3",
                          "--variant", "paper", "--quiet")
    assert code == 0, err
    report = (tmp_path / "report.md").read_text()
    assert "report.md" in out
    for name in ("online_regression.png", "mqar.png"):
        assert f"]({name})" in report and (tmp_path / name).exists()
    assert f"ttr reproduce --out {tmp_path} --seed 3 --variant paper" in report
    assert "mode: quick" in report and "seed: 3" in report
    assert "| local_linear (p=1) |" in report
    assert "| layer | P | T = 16 | T = 32 |" in report
    for verdict in ("agrees", "disagrees", "inconclusive", "not measured"):
        report = report.replace(f"**{verdict}**", "")
    assert "**" not in report  # every claim got one of the three verdicts
