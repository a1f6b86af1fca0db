"""sdkernels.train command line: --help, the recipe defaults, clear errors, a smoke run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import sdkernels
from sdkernels.train import TrainConfig, build_parser, main, parse_config

# Subprocesses import the same sdkernels as this process (the installed package in CI,
# the source tree in an editable install), and run outside the repository root so the
# uncompiled source tree cannot shadow an installed package.
PKG_PARENT = str(Path(sdkernels.__file__).resolve().parent.parent)

ISSUE_FLAGS = ["--depth", "--p-last", "--schedule", "--mode", "--scaling", "--epochs", "--lr",
               "--batch-size", "--val-size", "--dataset", "--backend", "--amp",
               "--channels-last", "--compile", "--seed", "--out", "--data-dir", "--resume",
               "--baseline-epochs", "--synthetic-size", "--steps-per-epoch", "--device"]


def test_help_as_module():
    p = subprocess.run([sys.executable, "-m", "sdkernels.train", "--help"], cwd=str(Path(__file__).resolve().parent),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for flag in ISSUE_FLAGS:
        assert flag in p.stdout, flag
    assert "cifar-10-python.tar.gz" in p.stdout and "torchrun" in p.stdout


def test_defaults_are_the_papers_recipe():
    cfg = parse_config([])
    assert cfg == TrainConfig()
    assert (cfg.depth, cfg.p_last, cfg.schedule, cfg.mode, cfg.scaling) == \
        (110, 0.5, "linear", "batch", "test")
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.epochs) == \
        (0.1, 0.9, 1e-4, 128, 500)
    assert cfg.data_dir is None and cfg.synthetic_size == 50000 and cfg.dataset == "cifar10"
    assert parse_config(["--resume", "--out", "o"]).resume == str(Path("o") / "checkpoint.pt")
    assert parse_config(["--resume", "x.pt"]).resume == "x.pt"


@pytest.mark.parametrize("argv, message", [
    (["--depth", "21"], "6n+2"),
    (["--depth", "abc"], "6n+2"),
    (["--p-last", "0"], "(0, 1]"),
    (["--p-last", "1.5"], "(0, 1]"),
    (["--amp", "fp8"], "invalid choice: 'fp8'"),
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--schedule", "cosine"], "invalid choice"),
    (["--batch-size", "0"], "positive integer"),
    (["--epochs", "-3"], "positive integer"),
    (["--lr", "nan"], "positive number"),
    (["--val-size", "-1"], ">= 0"),
    (["--backend", "cudnn"], "invalid choice"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--data-dir", "/definitely/not/here"], "no such directory"),
])
def test_bad_flags_are_clear_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "usage: python -m sdkernels.train" in err


@pytest.mark.parametrize("argv, message", [
    (["--synthetic-size", "100", "--val-size", "100"], "--val-size must be in [0, 99]"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "bogus:x"], "--device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_values_found_at_run_time(tmp_path, argv, message, capsys):
    assert main(argv + ["--out", str(tmp_path), "--no-progress", "--depth", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_missing_cifar_says_what_to_put_where(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--depth", "8"]) == 2
    err = capsys.readouterr().err
    assert "error: CIFAR-10 not found" in err and "cifar-10-python.tar.gz" in err
    assert main(["--data-dir", str(tmp_path), "--dataset", "cifar100", "--depth", "8"]) == 2
    assert "cifar-100-python.tar.gz" in capsys.readouterr().err


def test_unavailable_backend_is_a_clear_error(tmp_path, capsys):
    import sdkernels

    if sdkernels.backend_info().available["triton"]["cpu"] == "":
        pytest.skip("triton backend available here")
    assert main(["--backend", "triton", "--out", str(tmp_path), "--depth", "8",
                 "--synthetic-size", "40", "--epochs", "1", "--no-progress"]) == 2
    assert "error: sdkernels backend 'triton'" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [
    ["--amp", "bf16", "--channels-last"],
    ["--mode", "row", "--scaling", "train", "--schedule", "uniform", "--dataset", "cifar100",
     "--backend", "reference"],
], ids=["bf16-channels-last", "row-train-uniform-cifar100-reference"])
def test_smoke_run(tmp_path, extra, capsys):
    out = tmp_path / "o"
    rc = main(["--depth", "8", "--synthetic-size", "48", "--batch-size", "16", "--epochs", "2",
               "--steps-per-epoch", "2", "--out", str(out), "--threads", "1", *extra])
    assert rc == 0
    captured = capsys.readouterr()
    assert "final test error (full depth, eval scaling)" in captured.out
    assert "epoch 1/2" in captured.err  # the progress bar
    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2] and all(r["steps"] == 2 for r in recs)
    for r in recs:
        for k in ("train_error", "val_error", "test_error", "train_loss", "epoch_time",
                  "train_time", "realized_depth", "expected_depth", "lr"):
            assert r[k] is not None, k
    assert recs[0]["lr"] == 0.1 and recs[1]["lr"] == pytest.approx(0.01)  # /10 at 50%


def test_parser_is_reusable():
    assert build_parser().parse_args(["--depth", "20"]).depth == 20


def test_trains_from_a_cifar_archive(tmp_path, capsys):
    """End to end on a small archive in CIFAR-10's python-pickle format."""
    import io
    import pickle
    import tarfile

    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, n in [(f"data_batch_{k}", 12) for k in range(1, 6)] + [("test_batch", 10)]:
            raw = pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                b"labels": rng.integers(0, 10, n).tolist()}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    out = tmp_path / "o"
    assert main(["--data-dir", str(tmp_path), "--val-size", "12", "--depth", "8",
                 "--batch-size", "16", "--epochs", "1", "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0
    assert "48 train / 12 val / 10 test images" in capsys.readouterr().out
    rec = json.loads((out / "log.jsonl").read_text())
    assert rec["steps"] == 3 and rec["train_images"] == 48


def test_progress_bars_only_on_a_terminal(tmp_path):
    # In a log file a bar is hundreds of carriage-return updates; there the training CLI
    # writes one line per epoch and the benchmark none.
    log = tmp_path / "train.err"
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "sdkernels.train", "--depth", "8",
                            "--synthetic-size", "48", "--batch-size", "16", "--epochs", "1",
                            "--out", str(tmp_path / "o"), "--threads", "1"],
                           cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=f, text=True,
                           timeout=300, env={**__import__("os").environ,
                                             "PYTHONPATH": PKG_PARENT})
    err = log.read_text()
    assert p.returncode == 0, err
    assert "\r" not in err and "epoch 1/1: " in err, err
    log = tmp_path / "bench.err"
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", "sdkernels.bench", "--depth", "8",
                            "--batch-size", "4", "--steps", "1", "--warmup", "0",
                            "--sweep", "", "--no-plot", "--threads", "1",
                            "--out", str(tmp_path / "b")],
                           cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=f, text=True,
                           timeout=300, env={**__import__("os").environ,
                                             "PYTHONPATH": PKG_PARENT})
    err = log.read_text()
    assert p.returncode == 0, err + p.stdout
    assert "\r" not in err, err
