"""Command line of ``python -m sdkernels.train`` (also ``sdkernels-train``)."""
from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "parse_config", "main"]

DESCRIPTION = """\
Train a CIFAR ResNet with stochastic depth (Huang et al., ECCV 2016) whose dropped
blocks are really skipped. The defaults are the paper's recipe: ResNet-110, linear
decay of the survival probability to p_L = 0.5, one gate per mini-batch, "test"
scaling; SGD lr 0.1, Nesterov momentum 0.9, weight decay 1e-4, batch 128, 500 epochs,
lr divided by 10 at 50% and 75% of the epochs; 45k/5k train/validation split; 4-pixel
padding + random 32x32 crop and horizontal flip; per-channel normalisation.

Data: --data-dir DIR holding CIFAR's python version (cifar-10-python.tar.gz or the
folder cifar-10-batches-py/ it extracts to; for --dataset cifar100,
cifar-100-python.tar.gz or cifar-100-python/). Nothing is downloaded. Without
--data-dir the run uses synthetic CIFAR-shaped data (--synthetic-size images plus a
fifth as many test images), so the command runs anywhere.

Every epoch writes <out>/checkpoint.pt and a JSON line to <out>/log.jsonl (train,
validation and test error, epoch time, realized depth); test error is that of the
full-depth network in eval mode. --resume continues exactly where a run stopped.
--baseline-epochs K first times K epochs of constant depth and reports the measured
per-epoch saving next to the time-weighted expected-depth prediction.

Several processes / machines: torchrun --nproc-per-node N -m sdkernels.train ...
(DDP with default settings, gloo on CPU, NCCL on CUDA; --batch-size stays the global
batch).
"""

EPILOG = """\
examples:
  python -m sdkernels.train --data-dir ~/data                 # the paper's CIFAR-10 run
  python -m sdkernels.train --synthetic-size 2048 --epochs 2 --depth 20
  python -m sdkernels.train --synthetic-size 2048 --epochs 1 --baseline-epochs 1
  torchrun --nproc-per-node 4 -m sdkernels.train --data-dir ~/data --amp bf16 --channels-last
  python -m sdkernels.train --data-dir ~/data --resume train-out/checkpoint.pt
"""


def _number(kind, *, positive: bool):
    """argparse type: an int or finite float, > 0 (``positive``) or >= 0."""
    what = ("a positive integer" if positive else "an integer >= 0") if kind is int else \
        ("a positive number" if positive else "a number >= 0")

    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if (v <= 0 if positive else v < 0) or v != v or v == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


_positive_int = _number(int, positive=True)
_nonneg_int = _number(int, positive=False)
_positive_float = _number(float, positive=True)
_nonneg_float = _number(float, positive=False)


def _depth(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = None
    if v is None or v < 8 or (v - 2) % 6:
        raise argparse.ArgumentTypeError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 20, 32, 44, 56, 110, 1202, ...), "
            f"got {s!r}")
    return v


def _prob(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a survival probability in (0, 1], got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdkernels.train", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model and stochastic depth")
    m.add_argument("--depth", type=_depth, default=110,
                   help="CIFAR ResNet depth 6n+2 (20, 56, 110, 1202, ...); default 110")
    m.add_argument("--p-last", type=_prob, default=0.5,
                   help="survival probability p_L of the last block (1 = constant depth); "
                        "default 0.5")
    m.add_argument("--schedule", choices=("linear", "uniform"), default="linear",
                   help="linear decay from 1 to p_L (the paper) or uniform p_L; default linear")
    m.add_argument("--mode", choices=("batch", "row"), default="batch",
                   help="one gate per mini-batch (the paper) or per sample; default batch")
    m.add_argument("--scaling", choices=("test", "train"), default="test",
                   help="'test': eval multiplies each branch by p_l (the paper); 'train': "
                        "training divides by p_l (torchvision/timm); default test")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=_positive_int, default=500, help="default 500")
    o.add_argument("--lr", type=_positive_float, default=0.1,
                   help="initial learning rate, divided by 10 at 50%% and 75%% of the "
                        "epochs; default 0.1")
    o.add_argument("--momentum", type=_nonneg_float, default=0.9,
                   help="Nesterov momentum (0: plain SGD); default 0.9")
    o.add_argument("--weight-decay", type=_nonneg_float, default=1e-4, help="default 1e-4")
    o.add_argument("--batch-size", type=_positive_int, default=128,
                   help="global mini-batch size (split over the processes); default 128")
    o.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                   help="cap on the training steps of an epoch (quick runs); default: all")

    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10",
                   help="default cifar10")
    d.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-python.tar.gz / cifar-10-batches-py/ "
                        "(cifar-100-python.tar.gz / cifar-100-python/); default: synthetic data")
    d.add_argument("--synthetic-size", type=_positive_int, default=50000,
                   help="training images of the synthetic data set used without --data-dir "
                        "(plus a fifth as many test images); default 50000, CIFAR's size")
    d.add_argument("--val-size", type=_nonneg_int, default=None,
                   help="validation images held out of the training set (the last ones); "
                        "default 5000 (a tenth for synthetic sets under 50000 images)")

    r = p.add_argument_group("execution")
    r.add_argument("--device", default="auto",
                   help="auto (CUDA if available), cpu, cuda, cuda:N; under torchrun with "
                        "CUDA each process takes cuda:LOCAL_RANK; default auto")
    r.add_argument("--backend", choices=("auto", "extension", "triton", "reference"),
                   default="auto", help="sdkernels backend (default: the automatic choice)")
    r.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="mixed precision with torch.autocast (fp16 adds a GradScaler); "
                        "default float32")
    r.add_argument("--channels-last", action="store_true",
                   help="channels_last memory format for the model and the inputs")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (on a busy machine, 1 is often fastest)")
    r.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True), no cuDNN autotuning")
    r.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seed of the initial weights, the gates (the same on every rank), the "
                        "data order and the augmentation; default 0")

    w = p.add_argument_group("output, resume, timing")
    w.add_argument("--out", default="train-out",
                   help="folder for checkpoint.pt, log.jsonl and summary.json; default "
                        "./train-out")
    w.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default <out>/checkpoint.pt); the recipe "
                        "options must be those of the interrupted run")
    w.add_argument("--stop-after", type=_positive_int, default=None, metavar="N",
                   help="stop after N epochs of this invocation (continue with --resume)")
    w.add_argument("--baseline-epochs", type=_nonneg_int, default=0, metavar="K",
                   help="first time K epochs of constant depth (a copy of the model with every "
                        "block on) and report the per-epoch saving next to the time-weighted "
                        "prediction; default 0")
    w.add_argument("--calib-rounds", type=_positive_int, default=4,
                   help="timed rounds of the FixedGates calibration behind the time-weighted "
                        "prediction (with --baseline-epochs); default 4")
    w.add_argument("--log-steps", action="store_true",
                   help="also write every step's loss and gates to <out>/steps.jsonl")
    w.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_config(argv=None):
    """Parse ``argv`` into a :class:`~sdkernels.train.loop.TrainConfig` (argparse errors exit 2)."""
    from pathlib import Path

    from .loop import TrainConfig

    parser = build_parser()
    a = parser.parse_args(argv)
    if a.data_dir is not None and not Path(a.data_dir).expanduser().is_dir():
        parser.error(f"--data-dir {a.data_dir}: no such directory (it should hold "
                     f"{'cifar-100-python.tar.gz' if a.dataset == 'cifar100' else 'cifar-10-python.tar.gz'}"
                     " or its extracted folder)")
    resume = a.resume
    if resume == "":
        resume = str(Path(a.out) / "checkpoint.pt")
    return TrainConfig(
        dataset=a.dataset, depth=a.depth, p_last=a.p_last, schedule=a.schedule, mode=a.mode,
        scaling=a.scaling, epochs=a.epochs, lr=a.lr, momentum=a.momentum,
        weight_decay=a.weight_decay, batch_size=a.batch_size, val_size=a.val_size,
        data_dir=a.data_dir, synthetic_size=a.synthetic_size, backend=a.backend, amp=a.amp,
        channels_last=a.channels_last, compile=a.compile, seed=a.seed, out=a.out,
        resume=resume, baseline_epochs=a.baseline_epochs, calib_rounds=a.calib_rounds,
        steps_per_epoch=a.steps_per_epoch, stop_after=a.stop_after, device=a.device,
        threads=a.threads, deterministic=a.deterministic, log_steps=a.log_steps,
        progress=not a.no_progress)


def main(argv=None) -> int:
    cfg = parse_config(argv)
    from ..backends import BackendUnavailableError
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .loop import train

    import torch

    # Denormal floats make CPU steps slow in data-dependent ways (and timings noisy):
    # flushed during the run (as sdkernels.bench does), back to torch's default after.
    torch.set_flush_denormal(True)
    try:
        train(cfg)
    except (DatasetError, CheckpointError, BackendUnavailableError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_flush_denormal(False)
    return 0
