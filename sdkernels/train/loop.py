"""The training run behind ``python -m sdkernels.train``: :func:`train` with a :class:`TrainConfig`.

One epoch: the data order comes from ``DistributedSampler(seed=seed).set_epoch(epoch)``
(a pure function of the seed and the epoch, so it needs no saved state; with one process
it is the same sampler with one replica); every rank takes its shard, in batches of
``batch_size / world_size`` (``--batch-size`` is the global batch, as in the paper's
recipe), augments it on the device (:class:`~.data.Augmenter`), normalises it and takes
an SGD step. Gates come from the model's own generator, seeded with ``--seed`` on every
rank, so every rank drops the same blocks. After the epoch: validation and test error of
the full-depth network in eval mode (eval scaling), metrics summed over ranks, one JSON
line in ``log.jsonl`` and a checkpoint (rank 0 only).

``--baseline-epochs K`` first measures the time-weighted expected-depth prediction of
the benchmark harness shares (:mod:`sdkernels.measure.predict`: FixedGates copies of the model
with all blocks dropped, one stage active, all active, timed interleaved with
:func:`sdkernels.measure.timing.interleaved_timing`), then trains a copy of the model with
every gate fixed on (constant depth) for K timed epochs. At the end the measured
per-epoch saving is reported next to that prediction. The copies use their own
optimizer and augmentation generator: the real run is the same with or without them.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import use_backend
from ..measure import predict
from ..measure.calibration import fix_gates, stages_of
from ..measure.predict import gate_fraction
from ..measure.record import jsonable
from ..measure.timing import interleaved_timing, summarize, synchronize
from ..convert import residual_blocks
from ..gates import gate_state, load_gate_state
from ..models import cifar_resnet
from ..schedule import expected_depth
from . import checkpoint as ckpt
from . import data as D
from . import dist as tdist

__all__ = ["TrainConfig", "train", "SAVING_TOLERANCE", "resolve_val_size"]

#: The must-show tolerance between measured per-epoch saving and the prediction.
SAVING_TOLERANCE = 0.05

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Every option of the training CLI; the defaults are the paper's recipe."""

    dataset: str = "cifar10"
    depth: int = 110
    p_last: float = 0.5
    schedule: str = "linear"
    mode: str = "batch"
    scaling: str = "test"
    epochs: int = 500
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    val_size: int | None = None       # None: 5000 (a tenth of a small synthetic set)
    data_dir: str | None = None       # None: synthetic data
    synthetic_size: int = 50000
    backend: str = "auto"
    amp: str | None = None            # None (float32), "bf16", "fp16"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    out: str = "train-out"
    resume: str | None = None         # checkpoint path
    baseline_epochs: int = 0
    calib_rounds: int = 4
    steps_per_epoch: int | None = None
    stop_after: int | None = None
    device: str = "auto"
    threads: int | None = None
    deterministic: bool = False
    log_steps: bool = False
    progress: bool = True

    def recipe(self, val_size: int) -> dict:
        """What a resume must match (see :data:`.checkpoint.RECIPE_KEYS`)."""
        d = asdict(self)
        d["val_size"] = val_size
        d["data_source"] = "synthetic" if self.data_dir is None else "cifar-files"
        if self.data_dir is not None:
            d["synthetic_size"] = None
        return {k: d[k] for k in ckpt.RECIPE_KEYS}


def resolve_val_size(cfg: TrainConfig, n_train_archive: int) -> int:
    if cfg.val_size is not None:
        return cfg.val_size
    if cfg.data_dir is None and n_train_archive < 50000:
        return n_train_archive // 10
    return 5000


def _say(env, *msg):
    if env.is_main:
        print(*msg, flush=True)


def _gate_str(gates) -> str | list:
    if all(isinstance(g, bool) or g is None for g in gates):
        return "".join("1" if g else "0" for g in gates)
    return [round(gate_fraction(g), 6) for g in gates]


# --- the pieces of a run ------------------------------------------------------------------

class _Runner:
    """Model, optimizer and step function of one network (the real one or a timing copy)."""

    def __init__(self, cfg: TrainConfig, env: tdist.DistEnv, model: nn.Module):
        self.cfg, self.env, self.model = cfg, env, model
        self.blocks = [b for _, b in residual_blocks(model)]
        self.device = env.device
        self.amp_dtype = _AMP.get(cfg.amp)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        fwd = model
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # DDP's defaults: no find_unused_parameters; dropped blocks give zero grads
            fwd = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if cfg.compile:
            fwd = torch.compile(fwd)
        self.forward = fwd
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.momentum > 0,
                                         weight_decay=cfg.weight_decay)
        self.scaler = (torch.amp.GradScaler(env.device.type) if cfg.amp == "fp16" else None)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def prepare(self, x_u8: torch.Tensor, y: torch.Tensor, aug: D.Augmenter | None, stats):
        if self.device.type == "cuda":
            x_u8 = x_u8.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        if aug is not None:
            x_u8 = aug(x_u8)
        return D.normalize(x_u8, stats[0], stats[1], memory_format=self.memory_format), y

    def step(self, x: torch.Tensor, y: torch.Tensor):
        """One SGD step; returns (loss, number correct) as device tensors (no sync)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.forward(x)
            loss = F.cross_entropy(out, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        correct = (out.detach().argmax(1) == y).sum()
        return loss.detach(), correct

    def gates(self) -> list:
        return [b.last_gate for b in self.blocks]


class _Data:
    def __init__(self, cfg: TrainConfig, env: tdist.DistEnv):
        if cfg.data_dir is None:
            num_classes = 100 if cfg.dataset == "cifar100" else 10
            raw = D.synthetic_cifar(cfg.synthetic_size, num_classes)
        else:
            raw = D.load_cifar(cfg.data_dir, cfg.dataset)
        self.source = raw.source
        self.num_classes = raw.num_classes
        self.val_size = resolve_val_size(cfg, raw.train_x.shape[0])
        (self.train_x, self.train_y), (self.val_x, self.val_y) = D.split_train_val(
            raw.train_x, raw.train_y, self.val_size)
        self.test_x, self.test_y = raw.test_x, raw.test_y
        self.stats = D.channel_stats(self.train_x)  # normalisation from the training split
        n = self.train_x.shape[0]
        if cfg.batch_size % env.world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be a "
                             f"multiple of the number of processes ({env.world_size})")
        self.local_batch = cfg.batch_size // env.world_size
        from torch.utils.data import DistributedSampler
        self.sampler = DistributedSampler(range(n), num_replicas=env.world_size, rank=env.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=False)
        steps = math.ceil(len(self.sampler) / self.local_batch)
        if cfg.steps_per_epoch is not None:
            steps = min(steps, cfg.steps_per_epoch)
        self.steps = steps

    def epoch_batches(self, epoch: int):
        """This rank's (uint8 images, labels) batches of ``epoch`` (CPU tensors)."""
        self.sampler.set_epoch(epoch)
        idx = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        for s in range(self.steps):
            i = idx[s * self.local_batch:(s + 1) * self.local_batch]
            yield self.train_x[i], self.train_y[i]


def _evaluate(runner: _Runner, x_u8: torch.Tensor, y: torch.Tensor, stats, env) -> dict:
    """Loss and error of the full-depth network in eval mode; the set is split over ranks."""
    if x_u8.shape[0] == 0:
        return {"loss": None, "error": None, "n": 0}
    model = runner.model
    was_training = model.training
    model.eval()
    idx = torch.arange(env.rank, x_u8.shape[0], env.world_size)
    bs = max(1, runner.cfg.batch_size // env.world_size) * 2
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    correct = torch.zeros((), dtype=torch.int64, device=env.device)
    with torch.no_grad():
        for s in range(0, idx.numel(), bs):
            i = idx[s:s + bs]
            x, t = runner.prepare(x_u8[i], y[i], None, stats)
            with runner.autocast():
                out = model(x)
            loss_sum += F.cross_entropy(out.float(), t, reduction="sum").double()
            correct += (out.argmax(1) == t).sum()
    model.train(was_training)
    tot_loss, tot_correct, n = tdist.all_reduce_sum(
        env, [loss_sum.item(), correct.item(), float(idx.numel())])
    return {"loss": tot_loss / n, "error": 1.0 - tot_correct / n, "n": int(n)}


def _bars(cfg, env) -> bool:
    """Progress bars only on a terminal: in a log file they are hundreds of \\r updates."""
    return bool(cfg.progress and env.is_main and sys.stderr.isatty())


def _run_epoch(runner: _Runner, data: _Data, epoch: int, aug: D.Augmenter, desc: str,
               env, cfg, e_depth: float, step_log=None) -> dict:
    """Train one epoch; returns its (all-reduced) metrics and timing."""
    from tqdm import tqdm

    runner.model.train()
    n_blocks = len(runner.blocks)
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    correct = torch.zeros((), dtype=torch.int64, device=env.device)
    seen = 0
    depth_sum = 0.0
    block_sums = [0.0] * n_blocks
    bar = tqdm(total=data.steps, desc=desc, unit="batch", dynamic_ncols=True, file=sys.stderr,
               disable=not _bars(cfg, env), leave=True)
    synchronize(env.device)
    t0 = time.perf_counter()
    last_refresh = t0
    for step, (xb, yb) in enumerate(data.epoch_batches(epoch)):
        x, y = runner.prepare(xb, yb, aug, data.stats)
        loss, corr = runner.step(x, y)
        loss_sum += loss.double() * y.shape[0]
        correct += corr
        seen += y.shape[0]
        gates = runner.gates()
        vals = [gate_fraction(g) for g in gates]
        depth_sum += sum(vals)
        for l, v in enumerate(vals):
            block_sums[l] += v
        if step_log is not None:
            step_log.append({"epoch": epoch + 1, "step": step + 1, "loss": loss.item(),
                             "gates": _gate_str(gates)})
        bar.update(1)
        now = time.perf_counter()
        if bar.disable is False and (now - last_refresh >= 0.5 or step + 1 == data.steps):
            last_refresh = now
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                            acc=f"{correct.item() / seen:.1%}",
                            img_s=f"{seen * env.world_size / (now - t0):.0f}",
                            depth=f"{depth_sum / (step + 1):.1f}/{e_depth:.2f}", refresh=False)
    synchronize(env.device)
    train_time = time.perf_counter() - t0
    bar.close()
    if cfg.progress and env.is_main and bar.disable:
        # a log file gets one line per epoch instead of a bar's carriage-return updates
        print(f"{desc}: {data.steps} batches in {train_time:.1f} s", file=sys.stderr)
    steps = data.steps
    tot_loss, tot_correct, tot_seen = tdist.all_reduce_sum(
        env, [loss_sum.item(), correct.item(), float(seen)])
    # every rank measured its own time; the epoch takes as long as the slowest rank
    times = tdist.gather_objects(env, train_time)
    return {
        "train_loss": tot_loss / tot_seen,
        "train_error": 1.0 - tot_correct / tot_seen,
        "train_images": int(tot_seen),
        "steps": steps,
        "train_time": max(times),
        "images_per_s": tot_seen / max(times),
        "realized_depth": depth_sum / steps,
        "expected_depth": e_depth,
        "block_active": [s / steps for s in block_sums],
    }


# --- baseline and prediction ---------------------------------------------------------------

def _fixed_copy(model: nn.Module, active_stage: int | None, all_active: bool) -> nn.Module:
    m = copy.deepcopy(model)
    fix_gates(m, active_stage, all_active)
    return m


def _time_prediction(cfg, env, model, data: _Data, probs) -> dict:
    """The bench harness's time-weighted prediction, calibrated on this run's setup.

    FixedGates copies (all dropped, one stage active, all active) each get a full
    training step (data preparation included) on batches of this run, timed interleaved
    for ``calib_rounds`` rounds after one warm-up round; per-rank means are averaged.
    """
    stages, stage_of = stages_of(model)
    plans = [("calib:none", None, False)] + [(f"calib:{s}", k, False) for k, s in enumerate(stages)] \
        + [("calib:all", None, True)]
    g = torch.Generator().manual_seed(cfg.seed + 7919)  # throwaway augmentation
    aug = D.Augmenter(g)
    batches = []
    for i, (xb, yb) in enumerate(data.epoch_batches(0)):
        batches.append((xb, yb))
        if i + 1 >= 4:
            break
    steps = {}
    runners = {}
    for name, stage, all_active in plans:
        r = _Runner(cfg, env, _fixed_copy(model, stage, all_active))
        runners[name] = r

        def fn(xb, yb, r=r):
            x, y = r.prepare(xb, yb, aug, data.stats)
            return r.step(x, y)[0]
        steps[name] = fn
    from tqdm import tqdm
    total = len(plans) * (cfg.calib_rounds + 1)
    with tqdm(total=total, desc="calibration", unit="step", dynamic_ncols=True, file=sys.stderr,
              disable=not _bars(cfg, env)) as bar:
        times = interleaved_timing(steps, batches, rounds=cfg.calib_rounds, warmup=1,
                                   device=env.device, progress=lambda n: bar.update(1))
    means = {n: statistics.fmean(ts) for n, ts in times.items()}
    if env.distributed:
        names = list(means)
        summed = tdist.all_reduce_sum(env, [means[n] for n in names])
        means = {n: v / env.world_size for n, v in zip(names, summed)}
    tp = predict.time_prediction(means["calib:none"],
                                       [means[f"calib:{s}"] for s in stages],
                                       means["calib:all"], probs, stage_of)
    tp["calib_rounds"] = cfg.calib_rounds
    tp["step_stats"] = {n: summarize(ts) for n, ts in times.items()}
    tp["stage_of"] = stage_of
    tp["stages"] = stages
    return tp, runners["calib:all"]


def _baseline(cfg, env, runner: _Runner, data: _Data, e_depth_full: int, log) -> list[dict]:
    """K timed epochs of the constant-depth copy (every gate fixed on).

    ``runner`` is the calibration's all-active copy: already warmed up (and compiled,
    with --compile), so the baseline epochs time training, not start-up.
    """
    aug = D.Augmenter(torch.Generator().manual_seed(cfg.seed + 104729 + env.rank))
    recs = []
    for k in range(cfg.baseline_epochs):
        r = _run_epoch(runner, data, k, aug, f"baseline {k + 1}/{cfg.baseline_epochs}",
                       env, cfg, float(e_depth_full))
        r.pop("block_active")
        rec = {"phase": "baseline", "epoch": k + 1, **r}
        recs.append(rec)
        log(rec)
    return recs


# --- the run --------------------------------------------------------------------------------

def _rng_state(env, aug: D.Augmenter, seed: int, epoch: int) -> dict:
    cuda = torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None
    return {
        "torch": torch.get_rng_state(),
        "cuda": tdist.gather_objects(env, cuda),
        "augment": tdist.gather_objects(env, aug.generator.get_state()),
        # DistributedSampler's order is a function of (seed, epoch): nothing else to keep
        "data_order": {"sampler": "DistributedSampler", "seed": seed, "next_epoch": epoch},
        "world_size": env.world_size,
    }


def _aug_seed(seed: int, rank: int, epoch: int = 0) -> int:
    return (seed * 1000003 + 7919 * epoch + 1 + rank) % (2**63)


def _restore_rng(env, state: dict, aug: D.Augmenter, seed: int, epoch: int) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("world_size") != env.world_size:
        warnings.warn(f"checkpoint was written by {state.get('world_size')} processes, this run "
                      f"has {env.world_size}: the augmentation generators are reseeded, so the "
                      "continuation is not bit-identical to an uninterrupted run", RuntimeWarning)
        aug.generator.manual_seed(_aug_seed(seed, env.rank, epoch))
        return
    aug.generator.set_state(state["augment"][env.rank])
    cuda = state["cuda"][env.rank]
    if cuda is not None and env.device.type == "cuda":
        torch.cuda.set_rng_state(cuda, env.device)


def _sync_buffers(env, model: nn.Module) -> None:
    """Rank 0's BatchNorm running statistics on every rank.

    DDP broadcasts buffers at the start of each forward, then every rank updates them
    with its own batch: after the last step they differ. Eval, checkpoint and the final
    weights use rank 0's, as DDP's next forward would.
    """
    if env.distributed:
        import torch.distributed as dist
        for b in model.buffers():
            dist.broadcast(b, 0)


def _summary(cfg, env, history, baseline, tp, flop, e_depth, n_blocks, digests) -> dict:
    sd = [h for h in history if h.get("phase") == "stochastic"]
    last = sd[-1] if sd else {}
    s = {
        "epochs_done": len(sd),
        "final": {k: last.get(k) for k in ("epoch", "train_error", "val_error", "test_error",
                                           "train_loss", "val_loss", "test_loss")},
        "best_val_error": min((h["val_error"] for h in sd if h.get("val_error") is not None),
                              default=None),
        "expected_depth": e_depth,
        "num_blocks": n_blocks,
        "mean_realized_depth": statistics.fmean(h["realized_depth"] for h in sd) if sd else None,
        "world_size": env.world_size,
        "replica_digests": digests,
        "replicas_identical": len(set(digests)) == 1,
        "predictions": {"flop_ratio": flop["ratio"], "flop_saving": 1 - flop["ratio"]},
    }
    if baseline and sd:
        timed = sd
        if cfg.compile and len(sd) > 1 and sd[0]["epoch"] == 1:
            timed = sd[1:]  # the first epoch compiles the graphs of both gate values
        t_base = statistics.fmean(b["train_time"] for b in baseline)
        t_sd = statistics.fmean(h["train_time"] for h in timed)
        measured = 1.0 - t_sd / t_base
        s["saving"] = {"baseline_epochs": len(baseline), "stochastic_epochs": len(timed),
                       "baseline_epoch_time": t_base, "stochastic_epoch_time": t_sd,
                       "measured": measured}
        if len(timed) < len(sd):
            s["saving"]["note"] = "with --compile the first epoch (compilation) is not timed"
        if tp is not None:
            predicted = 1.0 - tp["ratio"]
            active = [statistics.fmean(h["block_active"][l] for h in timed)
                      for l in range(n_blocks)] if all("block_active" in h for h in timed) else None
            realized = None
            if active is not None:
                realized = 1.0 - predict.realized_time_ratio(
                    tp, tp["stage_of"], [[torch.tensor(a) for a in active]])
            s["saving"].update({
                "predicted_time_weighted": predicted,
                "predicted_at_realized_gates": realized,
                "difference_points": 100 * (measured - predicted),
                "tolerance_points": 100 * SAVING_TOLERANCE,
                "within_tolerance": abs(measured - predicted) <= SAVING_TOLERANCE,
                "calibration": {k: tp[k] for k in ("t_none", "t_stage", "t_all", "fixed_fraction",
                                                   "additivity", "calib_rounds")},
            })
    return s


def _format_summary(cfg, s: dict, data_source: str) -> str:
    f = s["final"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    lines = [
        f"done: {s['epochs_done']} epoch(s) of CIFAR ResNet-{cfg.depth}, stochastic depth "
        f"{cfg.schedule} p_L={cfg.p_last}, {cfg.mode} gates, {cfg.scaling} scaling; data: "
        f"{data_source}",
        f"final test error (full depth, eval scaling): {pct(f.get('test_error'))}; "
        f"val error {pct(f.get('val_error'))} (best {pct(s['best_val_error'])}); "
        f"train error {pct(f.get('train_error'))}",
    ]
    if s["mean_realized_depth"] is not None:
        lines.append(f"realized depth {s['mean_realized_depth']:.2f} vs expected "
                     f"{s['expected_depth']:.2f} of {s['num_blocks']} blocks")
    sv = s.get("saving")
    if sv:
        lines.append(f"per-epoch training time: constant depth {sv['baseline_epoch_time']:.2f} s "
                     f"(mean of {sv['baseline_epochs']} baseline epoch(s)), stochastic depth "
                     f"{sv['stochastic_epoch_time']:.2f} s (mean of {sv['stochastic_epochs']})")
        lines.append(f"measured per-epoch saving:          {100 * sv['measured']:6.2f}%")
        if "predicted_time_weighted" in sv:
            ok = "within" if sv["within_tolerance"] else "NOT within"
            lines.append(f"time-weighted prediction (bench):   {100 * sv['predicted_time_weighted']:6.2f}%"
                         f"   difference {sv['difference_points']:+.2f} points ({ok} "
                         f"{sv['tolerance_points']:.0f})")
            if sv.get("predicted_at_realized_gates") is not None:
                lines.append(f"  same formula at the realized gates: "
                             f"{100 * sv['predicted_at_realized_gates']:6.2f}%")
        lines.append(f"FLOP-weighted prediction:           "
                     f"{100 * s['predictions']['flop_saving']:6.2f}%")
    if s["world_size"] > 1:
        lines.append(f"weights identical on all {s['world_size']} ranks: "
                     f"{'yes' if s['replicas_identical'] else 'NO'}")
    return "\n".join(lines)


def _log_line(rec: dict) -> str:
    return json.dumps(jsonable({k: v for k, v in rec.items() if k != "block_active"}))


def train(cfg: TrainConfig) -> dict:
    """Run the training described by ``cfg``; returns the summary (on every rank).

    Seeds torch's global RNG with ``cfg.seed`` (the initial weights); the thread count,
    deterministic-algorithms flag and cuDNN autotuning it sets are restored on return.
    """
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.benchmark)
    env = tdist.setup(cfg.device)
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        ctx = contextlib.nullcontext() if cfg.backend == "auto" else use_backend(cfg.backend)
        with ctx:
            return _train(cfg, env)
    finally:
        tdist.cleanup(env)
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.benchmark = saved[2]


def _train(cfg: TrainConfig, env: tdist.DistEnv) -> dict:

    out = Path(cfg.out)
    data = _Data(cfg, env)
    recipe = cfg.recipe(data.val_size)

    torch.manual_seed(cfg.seed)  # initial weights
    model = cifar_resnet(cfg.depth, num_classes=data.num_classes, p_last=cfg.p_last,
                         schedule=cfg.schedule, mode=cfg.mode, scaling=cfg.scaling,
                         seed=cfg.seed)
    model = model.to(env.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    probs = [b.survival_prob for _, b in residual_blocks(model)]
    e_depth = expected_depth(probs)
    n_blocks = len(probs)
    runner = _Runner(cfg, env, model)
    milestones = [round(0.5 * cfg.epochs), round(0.75 * cfg.epochs)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(runner.optimizer, milestones, gamma=0.1)
    aug = D.Augmenter(torch.Generator().manual_seed(_aug_seed(cfg.seed, env.rank)))

    start_epoch, history, baseline, tp = 0, [], None, None
    if cfg.resume is not None:
        state = ckpt.load_checkpoint(cfg.resume)
        ckpt.check_recipe(state["config"], recipe)
        model.load_state_dict(state["model"])
        runner.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if runner.scaler is not None and state.get("scaler"):
            runner.scaler.load_state_dict(state["scaler"])
        load_gate_state(model, state["gates"])
        start_epoch = int(state["epoch"])
        _restore_rng(env, state["rng"], aug, cfg.seed, start_epoch)
        history = list(state["history"])
        baseline = state.get("baseline")
        tp = state.get("prediction")
        _say(env, f"resumed from {cfg.resume} after epoch {start_epoch}")

    log_path, steps_path = out / "log.jsonl", out / "steps.jsonl"
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # the log is rewritten from the checkpoint's history: never a line the
        # checkpoint does not know of, nor a missing one
        log_path.write_text("".join(_log_line(h) + "\n" for h in history))
        if cfg.log_steps:
            keep = []
            if cfg.resume is not None and steps_path.is_file():
                keep = [l for l in steps_path.read_text().splitlines()
                        if l and json.loads(l)["epoch"] <= start_epoch]
            steps_path.write_text("".join(l + "\n" for l in keep))

    def log(rec):
        if env.is_main:
            with open(log_path, "a") as f:
                f.write(_log_line(rec) + "\n")

    _say(env, f"sdkernels.train: CIFAR ResNet-{cfg.depth} ({n_blocks} blocks, expected depth "
              f"{e_depth:.2f}), {cfg.dataset} from {data.source}; {data.train_x.shape[0]} train / "
              f"{data.val_size} val / {data.test_x.shape[0]} test images; batch {cfg.batch_size} "
              f"on {env.world_size} process(es), {data.steps} steps/epoch; device {env.device}")

    flop = predict.flop_prediction(*predict.count_flops(model), probs)
    if cfg.baseline_epochs > 0 and baseline is None:
        # the timing copies draw nothing from the global RNG; fork it all the same
        devs = [torch.cuda.current_device()] if env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devs):
            tp, all_active = _time_prediction(cfg, env, model, data, probs)
            _say(env, f"time-weighted prediction of the saving: {100 * (1 - tp['ratio']):.2f}% "
                      f"(fixed part {tp['fixed_fraction']:.1%} of an all-active step)")
            baseline = _baseline(cfg, env, all_active, data, n_blocks, log)
            del all_active

    done_now = 0
    for epoch in range(start_epoch, cfg.epochs):
        step_log = [] if cfg.log_steps else None
        lr = runner.optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        rec = _run_epoch(runner, data, epoch, aug, f"epoch {epoch + 1}/{cfg.epochs}", env, cfg,
                         e_depth, step_log)
        scheduler.step()
        _sync_buffers(env, model)
        t_eval = time.perf_counter()
        val = _evaluate(runner, data.val_x, data.val_y, data.stats, env)
        test = _evaluate(runner, data.test_x, data.test_y, data.stats, env)
        rec = {"phase": "stochastic", "epoch": epoch + 1, "lr": lr, **rec,
               "val_loss": val["loss"], "val_error": val["error"],
               "test_loss": test["loss"], "test_error": test["error"],
               "eval_time": time.perf_counter() - t_eval,
               "epoch_time": time.perf_counter() - t0}
        history.append(rec)
        state = {
            "config": recipe, "options": asdict(cfg), "epoch": epoch + 1,
            "model": model.state_dict(), "optimizer": runner.optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": runner.scaler.state_dict() if runner.scaler is not None else None,
            "gates": gate_state(model), "rng": _rng_state(env, aug, cfg.seed, epoch + 1), "history": history,
            "baseline": baseline, "prediction": tp, "norm": data.stats,
        }
        if env.is_main:
            ckpt.save_checkpoint(state, out / ckpt.CHECKPOINT_NAME)
            log(rec)
            if step_log:
                with open(steps_path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in step_log)
            val_s = "n/a" if rec["val_error"] is None else f"{100 * rec['val_error']:.2f}%"
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {rec['train_loss']:.4f} err "
                  f"{100 * rec['train_error']:.2f}% | val err {val_s} | test err "
                  f"{100 * rec['test_error']:.2f}% | depth {rec['realized_depth']:.2f}/"
                  f"{e_depth:.2f} | {rec['train_time']:.1f} s train, {rec['epoch_time']:.1f} s "
                  f"epoch, {rec['images_per_s']:.0f} img/s", flush=True)
        done_now += 1
        if cfg.stop_after is not None and done_now >= cfg.stop_after and epoch + 1 < cfg.epochs:
            _say(env, f"stopping after {done_now} epoch(s) as asked (--stop-after); continue with "
                      f"--resume {out / ckpt.CHECKPOINT_NAME}")
            break

    digests = tdist.replica_digests(env, model)
    summary = _summary(cfg, env, history, baseline, tp, flop, e_depth, n_blocks, digests)
    summary["finished"] = len([h for h in history if h.get("phase") == "stochastic"]) >= cfg.epochs
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=2))
        print(_format_summary(cfg, summary, data.source), flush=True)
    tdist.barrier(env)
    return summary
