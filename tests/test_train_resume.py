"""sdkernels.train: checkpoints and an exact resume (CPU, float32, deterministic settings).

2 epochs in one go and 1 epoch + --resume + 1 epoch must give identical gates, losses
(every step), logged metrics and final weights, optimizer and gate-generator state.
"""
from __future__ import annotations

import json

import pytest
import torch

from sdkernels.train import main, parse_config, train
from sdkernels.train.checkpoint import CheckpointError, load_checkpoint

pytest.importorskip("tqdm")


def _args(out, mode="batch", *extra):
    return ["--depth", "20", "--synthetic-size", "80", "--val-size", "16", "--batch-size", "16",
            "--epochs", "2", "--seed", "3", "--mode", mode, "--out", str(out), "--log-steps",
            "--no-progress", "--deterministic", "--threads", "1", *extra]


def _run(argv):
    return train(parse_config(argv))


def _steps(out):
    return [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]


def _log(out):
    drop = ("train_time", "epoch_time", "eval_time", "images_per_s")
    return [{k: v for k, v in json.loads(l).items() if k not in drop}
            for l in (out / "log.jsonl").read_text().splitlines()]


def _assert_same_state(a, b):
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]), k
    assert a["scheduler"] == b["scheduler"]
    assert len(a["gates"]) == len(b["gates"]) == 1
    assert torch.equal(a["gates"][0]["state"], b["gates"][0]["state"])
    assert torch.equal(a["rng"]["augment"][0], b["rng"]["augment"][0])


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_resume_is_exact(tmp_path, mode):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(_args(a, mode))
    s1 = _run(_args(b, mode, "--stop-after", "1"))
    assert not s1["finished"] and load_checkpoint(b / "checkpoint.pt")["epoch"] == 1
    assert len(_steps(b)) == len(_steps(a)) // 2
    s2 = _run(_args(b, mode, "--resume"))
    assert s2["finished"]

    steps_a, steps_b = _steps(a), _steps(b)
    assert len(steps_a) == 8  # 64 training images / batch 16, 2 epochs
    assert steps_a == steps_b  # gates and losses of every step, bit for bit
    gates = "".join(s["gates"] if isinstance(s["gates"], str) else "" for s in steps_a)
    if mode == "batch":
        assert "0" in gates  # blocks were dropped: the gates matter
    else:
        assert any(min(s["gates"]) < 1.0 for s in steps_a)
    assert _log(a) == _log(b)  # train/val/test metrics of both epochs
    _assert_same_state(load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt"))


def test_baseline_and_prediction_do_not_change_the_run(tmp_path):
    a, c = tmp_path / "a", tmp_path / "c"
    _run(_args(a))
    s = _run(_args(c, "batch", "--baseline-epochs", "1", "--calib-rounds", "1"))
    assert _steps(a) == _steps(c)
    ck_a, ck_c = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(c / "checkpoint.pt")
    for k in ck_a["model"]:
        assert torch.equal(ck_a["model"][k], ck_c["model"][k]), k
    sv = s["saving"]
    assert sv["baseline_epochs"] == 1 and sv["stochastic_epochs"] == 2
    for k in ("measured", "predicted_time_weighted", "predicted_at_realized_gates"):
        assert isinstance(sv[k], float) and -1.0 < sv[k] < 1.0, (k, sv)
    phases = [json.loads(l)["phase"] for l in (c / "log.jsonl").read_text().splitlines()]
    assert phases == ["baseline", "stochastic", "stochastic"]
    summary = json.loads((c / "summary.json").read_text())
    assert summary["saving"]["within_tolerance"] in (True, False)


def test_resume_with_another_recipe_is_refused(tmp_path, capsys):
    a = tmp_path / "a"
    _run(_args(a, "batch", "--stop-after", "1"))
    argv = _args(a, "batch", "--resume")
    argv[argv.index("--depth") + 1] = "32"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: --resume" in err and "--depth: checkpoint 20, now 32" in err
    with pytest.raises(CheckpointError, match="--lr"):
        _run(_args(a, "batch", "--resume", "--lr", "0.05"))


def test_resume_without_checkpoint(tmp_path, capsys):
    assert main(_args(tmp_path / "none", "batch", "--resume")) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(_args(tmp_path / "x", "batch", "--resume", str(bad))) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
