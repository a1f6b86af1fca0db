"""sdkernels against timm's own DropPath: a training step of timm models at the same
per-block drop rates, side by side (issue 15, part 4).

For each timm model (default ViT-Tiny ``vit_tiny_patch16_224`` and ConvNeXt-Atto
``convnext_atto``) and each ``drop_path_rate`` r, three variants start from the same
initial weights:

* ``timm@r``   ``timm.create_model(name, drop_path_rate=r)``: timm's DropPath, which
  computes every residual branch and multiplies it by a per-sample 0/1 mask;
* ``batch@r``  a deep copy converted with ``sdkernels.convert(schedule="keep",
  mode="batch")``: one gate per residual and step, a dropped branch does not run;
* ``row@r``    the same with ``mode="row"``: each residual's branch runs on its surviving
  samples only.

``schedule="keep"`` keeps timm's per-block rates (survival 1 - d_l) and its 1/p scaling;
the run checks that every gate's rate is the timm DropPath's in the same slot.

**Calibration** (for the time-weighted prediction). Residuals of the same shape cost the
same, so they are calibrated per group: a group is one slot of the blocks of one stage
(ViT: every attention residual, every MLP residual; ConvNeXt: the blocks of each stage).
Batch-mode copies with fixed gates (:class:`sdkernels.gates.FixedGates`) give
``T_all`` (every gate on) and ``T_off[g]`` (group g off, the rest on); then
``t_g = (T_all - T_off[g]) / n_g`` is one residual's time in group g and
``fixed = T_all - sum_l t_l`` the rest of the step (stem, head, loss, optimizer,
shortcuts). The prediction for rate r is ``(fixed + sum_l (1 - d_l) t_l) / T_timm(r)``,
d_l the rates of the model at r. It is the same for both modes: it does not include the
gather/scatter of row mode, which the measurement does.

**Timing.** Every variant of a model (all rates, both modes, the calibration copies) is
timed in one process with :func:`sdkernels.measure.timing.interleaved_timing`: warm-up
rounds, then timed rounds that each run every variant in turn (rotating order). A round
times ``steps_per_round`` consecutive training steps of a variant (forward,
cross-entropy, backward, SGD; :func:`~sdkernels.measure.timing.make_train_step`): the
number of dropped residuals in one step is a small count whose median is not its mean
(at r = 0.1 a ConvNeXt-Atto step drops no block more often than not), while a sum over
several steps is near-symmetric, so that the median over rounds estimates the expected
step time that the prediction gives.

Step times are paired medians (:func:`sdkernels.bench.compare.paired_centres`, with the
constant-cost all-on calibration copy as reference): every step time is divided by the
reference's time in the same round, so a slow spell of a shared machine cancels.
Ratios are those centres over the timm variant's at the same rate. Per sdkernels variant
the record also keeps the prediction evaluated at the gates actually drawn in the timed
steps (median over rounds), which separates the luck of the draw from the rest.

**Break-even rate** of a mode: where its step time equals timm's. When the ratio at the
smallest measured rate > 0 is already <= 1 it is reported as "<= that rate"; otherwise
a least-squares line of ratio against rate through the measured rates > 0 is solved for
ratio = 1 (rate 0 is left out of the fit: there timm has no DropPath at all, so its step
is cheaper by the mask multiply; its ratio is the wrapper's overhead).

    python -m sdkernels.bench.droppath --help

The must-show targets (:data:`TARGETS`) are checked by :func:`check_targets`;
``benchmarks/test_drop_path_families.py`` asserts them.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ..convert import convert, gates_of, residual_blocks
from ..gates import FixedGates
from ..measure.predict import gate_fraction
from ..measure.timing import (interleaved_timing, make_inputs, make_train_step, median_faults,
                              summarize)
from .compare import TOLERANCE, paired_centres
from .env import environment

__all__ = ["DropPathConfig", "run", "run_model", "check_targets", "format_table", "break_even",
           "time_weighted", "residual_groups", "create_model", "TARGETS", "DEFAULT_MODELS",
           "DEFAULT_RATES", "main"]

DEFAULT_MODELS = ("vit_tiny_patch16_224", "convnext_atto")
DEFAULT_RATES = (0.0, 0.05, 0.1, 0.2, 0.4)
MODES = ("batch", "row")

#: The must-show, per model and mode: no slower than timm at this rate ...
BREAK_EVEN_RATE = 0.05
#: ... and within TOLERANCE of the time-weighted prediction at these.
PREDICTION_RATES = (0.1, 0.2, 0.4)
TARGETS = (
    f"ratio at drop_path_rate {BREAK_EVEN_RATE:g} <= 1 (break-even at {BREAK_EVEN_RATE:g} "
    "or below)",
    f"|ratio - time-weighted prediction| <= {TOLERANCE} at drop_path_rate "
    + ", ".join(f"{r:g}" for r in PREDICTION_RATES),
)

REFERENCE = "all-on"  # the constant-cost calibration copy every round is paired with
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Keyword arguments of timm's model classes for a smaller input or a shallower model
# (smoke runs), by the module that defines the model. Fully convolutional models take
# any image size and have no img_size argument.
_IMG_SIZE = {"vision_transformer": lambda s: {"img_size": s}}
_DEPTH = {"vision_transformer": lambda d: {"depth": d},
          "convnext": lambda d: {"depths": (d,) * 4}}


@dataclass
class DropPathConfig:
    models: tuple = DEFAULT_MODELS
    rates: tuple = DEFAULT_RATES
    modes: tuple = MODES
    batch_size: int = 32
    image_size: int = 128
    rounds: int = 16             # timed rounds
    steps_per_round: int = 4     # consecutive steps of a variant timed as one unit
    warmup: int = 1              # untimed rounds first (of steps_per_round steps each)
    depth: int | None = None     # fewer blocks (smoke runs); None: the model's own
    num_classes: int = 1000
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = 2      # torch CPU threads during the run; None: leave as is
    seed: int = 0
    input_sets: int = 2
    model_kwargs: dict = field(default_factory=dict)  # extra timm kwargs, per model name

    def check(self) -> None:
        if self.rounds < 1 or self.steps_per_round < 1 or self.warmup < 0:
            raise ValueError("rounds and steps_per_round must be >= 1, warmup >= 0")
        if self.batch_size < 1 or self.image_size < 1:
            raise ValueError("batch_size and image_size must be >= 1")
        if not self.rates or any(not 0.0 <= r < 1.0 for r in self.rates):
            raise ValueError(f"rates must be in [0, 1), got {self.rates}")
        if not self.modes or set(self.modes) - set(MODES):
            raise ValueError(f"modes must be among {MODES}, got {self.modes}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")


# -- models ------------------------------------------------------------------------------

def _family_module(name: str) -> str:
    from timm.models import model_entrypoint
    return model_entrypoint(name).__module__.rpartition(".")[2]


def timm_kwargs(name: str, cfg: DropPathConfig) -> dict:
    """timm keyword arguments of ``name`` for ``cfg`` (image size, depth, extras)."""
    fam = _family_module(name)
    kw = {"num_classes": cfg.num_classes}
    if fam in _IMG_SIZE:
        kw.update(_IMG_SIZE[fam](cfg.image_size))
    if cfg.depth is not None:
        if fam not in _DEPTH:
            raise ValueError(f"depth= is not supported for {name} (timm module {fam}); "
                             f"known: {sorted(_DEPTH)}")
        kw.update(_DEPTH[fam](cfg.depth))
    kw.update(cfg.model_kwargs.get(name, {}))
    return kw


def create_model(name: str, rate: float, kwargs: dict) -> nn.Module:
    import timm
    return timm.create_model(name, pretrained=False, drop_path_rate=rate, **kwargs)


@dataclass
class ResidualInfo:
    block: str   # qualified name of the block
    slot: str    # the block's child that holds this residual's gate (its drop path slot)
    group: str   # residuals of one group have the same shape (calibrated together)


def residual_groups(model: nn.Module) -> list[ResidualInfo]:
    """Every residual of a converted model in forward order, with its slot and group.

    The group of a residual is its stage (the block's qualified name without the block
    index) and its slot: ``blocks:drop_path1`` holds every attention residual of a ViT,
    ``stages.2.blocks:drop_path`` the residuals of ConvNeXt's third stage.
    """
    out = []
    for qual, block in residual_blocks(model):
        stage = qual.rpartition(".")[0] if qual.rpartition(".")[2].isdigit() else qual
        slots = {id(m): n for n, m in block._modules.items() if m is not None}
        for g in gates_of(block):
            slot = slots.get(id(g), "")
            out.append(ResidualInfo(qual, slot, f"{stage or '<root>'}:{slot}"))
    return out


def _gates(model: nn.Module) -> list:
    return [g for _, b in residual_blocks(model) for g in gates_of(b)]


def _timm_rate(baseline: nn.Module, r: ResidualInfo) -> float:
    m = baseline.get_submodule(f"{r.block}.{r.slot}")
    return float(getattr(m, "drop_prob", 0.0))  # nn.Identity where timm's rate is 0


def _check_same_rates(name: str, rate: float, baseline: nn.Module, converted: nn.Module,
                      residuals: list[ResidualInfo]) -> list[float]:
    """The converted model's per-residual drop rates, checked against timm's own."""
    drops = [1.0 - g.survival_prob for g in _gates(converted)]
    timm_drops = [_timm_rate(baseline, r) for r in residuals]
    bad = [(r.block, r.slot, d, t) for r, d, t in zip(residuals, drops, timm_drops)
           if abs(d - t) > 1e-6]
    if len(drops) != len(timm_drops) or bad:
        raise RuntimeError(f"{name} at drop_path_rate {rate}: converted drop rates differ "
                           f"from timm's: {bad[:3]}")
    return drops


@dataclass
class ModelVariants:
    models: dict            # variant name -> model (train mode, on the device)
    residuals: list         # ResidualInfo per residual, forward order
    drop_rates: dict        # rate -> per-residual drop rates d_l
    groups: dict            # group -> indices of its residuals
    kwargs: dict            # timm kwargs


def variant_name(kind: str, rate: float) -> str:
    return f"{kind}@{rate:g}"


def off_name(group: str) -> str:
    return f"off:{group}"


def build_variants(name: str, cfg: DropPathConfig) -> ModelVariants:
    """timm baselines, converted copies and calibration copies of ``name``, all with the
    weights of one seeded initialisation."""
    kw = timm_kwargs(name, cfg)
    torch.manual_seed(cfg.seed)
    weights = create_model(name, 0.0, kw).state_dict()
    models, drop_rates, residuals = {}, {}, None
    for rate in cfg.rates:
        base = create_model(name, rate, kw)
        base.load_state_dict(weights)
        models[variant_name("timm", rate)] = base
        for mode in cfg.modes:
            conv = convert(copy.deepcopy(base), schedule="keep", mode=mode, seed=cfg.seed)
            if residuals is None:
                residuals = residual_groups(conv)
            drop_rates[rate] = _check_same_rates(name, rate, base, conv, residuals)
            models[variant_name(mode, rate)] = conv
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(residuals):
        groups.setdefault(r.group, []).append(i)
    # Calibration copies: batch mode, every gate fixed (a fixed gate's cost does not
    # depend on its survival probability: an active residual is scaled either way).
    calib = convert(copy.deepcopy(models[variant_name("timm", max(cfg.rates))]),
                    schedule="keep", mode="batch", seed=cfg.seed)
    models[REFERENCE] = _fixed(calib, off=())
    for g, idx in groups.items():
        models[off_name(g)] = _fixed(copy.deepcopy(calib), off=idx)
    device = torch.device(cfg.device)
    for m in models.values():
        m.to(device).train()
    return ModelVariants(models, residuals, drop_rates, groups, kw)


def _fixed(model: nn.Module, off) -> nn.Module:
    off = set(off)
    for i, g in enumerate(_gates(model)):
        g.gate_generator = FixedGates(i not in off)
    return model


# -- predictions -------------------------------------------------------------------------

def time_weighted(t_all: float, t_off: dict, groups: dict, n_residuals: int) -> dict:
    """Per-residual times t_l and the fixed part from the calibration times (seconds)."""
    t_group = {g: (t_all - t_off[g]) / len(idx) for g, idx in groups.items()}
    t_res = [0.0] * n_residuals
    for g, idx in groups.items():
        for i in idx:
            t_res[i] = t_group[g]
    fixed = t_all - sum(t_res)
    return {"t_all": t_all, "t_off": dict(t_off), "t_residual_per_group": t_group,
            "group_sizes": {g: len(i) for g, i in groups.items()},
            "t_residual": t_res, "fixed": fixed,
            "fixed_fraction": fixed / t_all if t_all else float("nan")}


def predicted_time(calib: dict, keep: list[float]) -> float:
    """fixed + sum_l keep_l t_l: keep_l the survival probability (expected) or the
    fraction of rows that ran (at drawn gates)."""
    return calib["fixed"] + sum(k * t for k, t in zip(keep, calib["t_residual"]))


def _fit_line(pts):
    """Least-squares (slope, intercept) through (x, y) points; None for < 2 distinct x."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def break_even(rates, ratios) -> dict:
    """The drop rate at which a ratio (sdkernels / timm step time) reaches 1.

    ``text`` is "<= r0" when the ratio at the smallest rate r0 > 0 is already <= 1, else
    the least-squares line's crossing through the rates > 0 (``fit_rate`` always holds
    that crossing, None when the line does not fall).
    """
    pts = sorted((float(r), float(q)) for r, q in zip(rates, ratios)
                 if r > 0 and q is not None and math.isfinite(q))
    out = {"rate": None, "bound": "none", "text": "n/a", "fit": None, "fit_rate": None}
    if not pts:
        return out
    fit = _fit_line(pts)
    if fit is not None:
        out["fit"] = {"slope": fit[0], "intercept": fit[1]}
        if fit[0] < 0:
            out["fit_rate"] = (1.0 - fit[1]) / fit[0]
    r0, q0 = pts[0]
    if q0 <= 1.0:
        out.update(rate=r0, bound="at_or_below", text=f"<= {r0:g}")
    elif out["fit_rate"] is not None:
        r = out["fit_rate"]
        extra = " (extrapolated)" if r > pts[-1][0] else ""
        out.update(rate=r, bound="fit", text=f"{r:.3f}{extra}")
    else:
        out["text"] = f"none up to {pts[-1][0]:g}"
    return out


# -- the run -----------------------------------------------------------------------------

def _unit(step: Callable, k: int, gates: list | None, drawn: dict, name: str) -> Callable:
    """``k`` consecutive training steps as one timed unit. For sdkernels variants the
    gates each step drew are kept (references only: the timed work stays the step's)."""
    def run_unit(x, y):
        draws = []
        for _ in range(k):
            loss = step(x, y)
            if gates is not None:
                draws.append([g.last_gate for g in gates])
        drawn[name] = draws
        return loss
    return run_unit


def run_model(name: str, cfg: DropPathConfig, log: Callable[[str], object] = lambda s: None
              ) -> dict:
    """Build, time and predict one model; its part of the result record."""
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    log(f"{name}: building {len(cfg.rates) * (1 + len(cfg.modes))} variants + calibration")
    mv = build_variants(name, cfg)
    k = cfg.steps_per_round
    last_draw: dict = {}
    steps = {}
    sd = {variant_name(m, r) for r in cfg.rates for m in cfg.modes}
    for n, m in mv.models.items():
        step = make_train_step(m, dtype=_DTYPES[cfg.dtype])
        steps[n] = _unit(step, k, _gates(m) if n in sd else None, last_draw, n)
    inputs = make_inputs(cfg.batch_size, num_sets=cfg.input_sets,
                         image_shape=(3, cfg.image_size, cfg.image_size),
                         num_classes=cfg.num_classes, device=device, seed=cfg.seed + 1)

    drawn: dict[str, list] = {n: [] for n in sd}

    def on_step(n, r, t):
        if n == REFERENCE and r + 1 < cfg.rounds and (r + 1) % max(1, cfg.rounds // 4) == 0:
            log(f"{name}: round {r + 1}/{cfg.rounds}")
        if n in drawn:  # per residual, the fraction of rows that ran, averaged over the unit
            per_step = [[gate_fraction(g) for g in step] for step in last_draw[n]]
            drawn[n].append([statistics.fmean(col) for col in zip(*per_step)])

    log(f"{name}: timing {len(steps)} variants, {cfg.warmup} warm-up + {cfg.rounds} rounds "
        f"of {k} step(s)")
    last, faults = {}, {}
    times = interleaved_timing(steps, inputs, rounds=cfg.rounds, warmup=cfg.warmup,
                               device=device, on_step=on_step, last=last, faults=faults)
    times = {n: [t / k for t in ts] for n, ts in times.items()}  # seconds per step
    variants = {n: dict(summarize(ts), times=ts) for n, ts in times.items()}
    for n, f in median_faults(faults).items():
        variants[n]["faults_per_step"] = f / k
    for n, loss in last.items():
        variants[n]["final_loss"] = float(loss)
    centre = paired_centres(times, reference=REFERENCE)
    for n, c in centre.items():
        variants[n]["paired_centre"] = c

    calib = time_weighted(centre[REFERENCE], {g: centre[off_name(g)] for g in mv.groups},
                          mv.groups, len(mv.residuals))
    per_rate = [_rate_row(r, cfg.modes, centre, calib, mv.drop_rates[r], drawn)
                for r in cfg.rates]
    be = {m: break_even([p["rate"] for p in per_rate], [p["ratio"][m] for p in per_rate])
          for m in cfg.modes}
    be["predicted"] = break_even([p["rate"] for p in per_rate],
                                 [p["predicted"] for p in per_rate])
    return {
        "timm_kwargs": mv.kwargs,
        "shape": {"batch": cfg.batch_size, "image": [3, cfg.image_size, cfg.image_size],
                  "num_classes": cfg.num_classes},
        "num_blocks": len({r.block for r in mv.residuals}),
        "residuals": [asdict(r) for r in mv.residuals],
        "groups": mv.groups,
        "variants": variants,
        "calibration": calib,
        "rates": per_rate,
        "break_even": be,
        "wall_time_s": time.perf_counter() - t0,
    }


def _rate_row(rate, modes, centre, calib, drops, drawn) -> dict:
    t_timm = centre[variant_name("timm", rate)]
    pred = predicted_time(calib, [1.0 - d for d in drops]) / t_timm
    row = {"rate": rate, "drop_rates": drops, "mean_drop": statistics.fmean(drops),
           "timm": t_timm, "predicted": pred, "ratio": {}, "abs_diff": {}, "time": {},
           "predicted_drawn": {}}
    for m in modes:
        n = variant_name(m, rate)
        row["time"][m] = centre[n]
        row["ratio"][m] = centre[n] / t_timm
        row["abs_diff"][m] = abs(row["ratio"][m] - pred)
        units = drawn.get(n) or []
        row["predicted_drawn"][m] = (statistics.median(
            predicted_time(calib, keep) for keep in units) / t_timm if units else None)
    return row


def check_targets(rec: dict) -> list[dict]:
    """The must-show checks of every model and mode: one dict per check (``ok``); a
    rate that was not measured gives no check."""
    out = []
    for name, res in rec["models"].items():
        by_rate = {round(p["rate"], 6): p for p in res["rates"]}
        for mode in rec["config"]["modes"]:
            p = by_rate.get(round(BREAK_EVEN_RATE, 6))
            if p is not None:
                q = p["ratio"][mode]
                out.append({"model": name, "mode": mode, "rate": BREAK_EVEN_RATE,
                            "what": "ratio <= 1", "value": q, "ok": q <= 1.0})
            for r in PREDICTION_RATES:
                p = by_rate.get(round(r, 6))
                if p is not None:
                    d = p["abs_diff"][mode]
                    out.append({"model": name, "mode": mode, "rate": r,
                                "what": f"|ratio - predicted| <= {TOLERANCE}", "value": d,
                                "ok": d <= TOLERANCE})
    return out


def _versions(device) -> dict:
    import timm

    import sdkernels
    env = environment(device)
    env.update(timm=timm.__version__, sdkernels=sdkernels.__version__)
    return env


def run(cfg: DropPathConfig, log: Callable[[str], object] = lambda s: None) -> dict:
    """The whole measurement: every model of ``cfg``, one after the other, as a record."""
    cfg.check()
    old_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    # Denormals make CPU arithmetic slow in data-dependent ways that would differ between
    # variants whose weights drift apart.
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    try:
        rec = {
            "benchmark": "drop_path_vs_timm_train_step",
            "config": {**asdict(cfg), "reference": REFERENCE,
                       "optimizer": "SGD lr=0.1 momentum=0.9 weight_decay=1e-4"},
            "environment": {**_versions(cfg.device), "flush_denormal": True},
            "models": {},
        }
        for name in cfg.models:
            rec["models"][name] = run_model(name, cfg, log)
    finally:
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(False)  # torch's default; not left on for the caller
    rec["targets"] = check_targets(rec)
    rec["wall_time_s"] = time.perf_counter() - t0
    rec["notes"] = [
        "ratio = paired centre of the sdkernels variant / that of timm at the same rate; "
        f"paired centres: median over rounds of t / t_{REFERENCE} (same round) times the "
        f"median of t_{REFERENCE}.",
        "predicted = (fixed + sum_l (1 - d_l) t_l) / T_timm(r), t_l and fixed from the "
        "FixedGates calibration copies of the same run; the same for batch and row mode "
        "(it leaves out row mode's gather/scatter).",
        "predicted_drawn: the same formula at the gates drawn in each timed round (row "
        "mode: fraction of rows that ran), median over rounds.",
        f"each timed round runs {cfg.steps_per_round} consecutive steps of a variant; "
        "times are per step.",
    ]
    return rec


# -- report ------------------------------------------------------------------------------

def _ms(s) -> str:
    return "      -" if s is None else f"{s * 1e3:7.1f}"


def _r(x) -> str:
    return "    -" if x is None or not math.isfinite(x) else f"{x:5.3f}"


def format_table(rec: dict) -> str:
    cfg, env = rec["config"], rec["environment"]
    modes = cfg["modes"]
    lines = [
        f"training step (forward + cross-entropy + backward + SGD), sdkernels vs timm "
        f"DropPath; {cfg['dtype']}, {env['device_name']} ({env['torch_threads']} threads)",
        f"torch {env['torch']}, timm {env['timm']}, sdkernels {env['sdkernels']}; "
        f"{cfg['warmup']} warm-up + {cfg['rounds']} timed rounds x "
        f"{cfg['steps_per_round']} step(s), paired medians",
    ]
    for name, res in rec["models"].items():
        lines += ["", _model_header(name, res)]
        head = "  rate  timm ms" + "".join(f" {m:>5} ms" for m in modes)
        head += "".join(f" {m + '/timm':>10}" for m in modes) + "  predicted"
        head += "".join(f" |{m[0]}-p|" for m in modes)
        head += "".join(f" {'drawn ' + m[0]:>7}" for m in modes)
        head += "  faults t" + "".join(f"/{m[0]}" for m in modes)
        lines.append(head)
        for p in res["rates"]:
            var = res["variants"]
            f = [var[variant_name(k, p["rate"])].get("faults_per_step") for k in ("timm", *modes)]
            line = f"  {p['rate']:4.2f} {_ms(p['timm'])}"
            line += "".join(f" {_ms(p['time'][m])}" for m in modes)
            line += "".join(f" {_r(p['ratio'][m]):>10}" for m in modes)
            line += f"  {_r(p['predicted']):>9}"
            line += "".join(f" {_r(p['abs_diff'][m])}" for m in modes)
            line += "".join(f" {_r(p['predicted_drawn'][m]):>7}" for m in modes)
            line += "  " + "/".join("-" if x is None else f"{x:.0f}" for x in f)
            lines.append(line)
        be = res["break_even"]
        lines.append("  break-even rate: " + ", ".join(
            f"{m} {be[m]['text']}" for m in (*modes, "predicted")))
    lines += ["", "ratio: step time over timm's at the same rate; predicted: time-weighted, "
              "expected gates; drawn: the same formula at the gates drawn in the timed "
              "steps; faults: minor page faults per step", "", "targets:"]
    for t in rec.get("targets", []):
        lines.append(f"  {'ok  ' if t['ok'] else 'FAIL'} {t['model']} {t['mode']:5} "
                     f"rate {t['rate']:g}: {t['what']} ({t['value']:.3f})")
    return "\n".join(lines)


def _model_header(name, res) -> str:
    c, s = res["calibration"], res["shape"]
    per = ", ".join(f"{g} {t * 1e3:.1f} ms x{c['group_sizes'][g]}"
                    for g, t in c["t_residual_per_group"].items())
    return (f"{name}: batch {s['batch']}, image {'x'.join(map(str, s['image']))}, "
            f"{res['num_blocks']} blocks, {len(res['residuals'])} residuals\n"
            f"  calibration: all on {c['t_all'] * 1e3:.1f} ms, fixed {c['fixed'] * 1e3:.1f} ms "
            f"({c['fixed_fraction']:.0%}); per residual: {per}")


# -- command line ------------------------------------------------------------------------

def _floats(s: str) -> tuple:
    return tuple(float(v) for v in s.split(",") if v.strip())


def _names(s: str) -> tuple:
    return tuple(v.strip() for v in s.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    d = DropPathConfig()
    p = argparse.ArgumentParser(
        prog="python -m sdkernels.bench.droppath",
        description=(__doc__.split("\n\n")[0] + "\n\nTimes timm's DropPath and sdkernels "
                     "batch/row mode at each drop_path_rate, interleaved in one process, "
                     "with the time-weighted prediction and the break-even rate; prints a "
                     "table. Needs timm."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_names, default=d.models,
                   help=f"comma-separated timm model names; default {','.join(d.models)}")
    p.add_argument("--rates", type=_floats, default=d.rates,
                   help="comma-separated drop_path_rate values; default "
                        + ",".join(f"{r:g}" for r in d.rates))
    p.add_argument("--modes", type=_names, default=d.modes,
                   help="sdkernels modes, comma-separated; default batch,row")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help=f"timed rounds; default {d.rounds}")
    p.add_argument("--steps-per-round", type=int, default=d.steps_per_round,
                   help="consecutive training steps of a variant per round; default "
                        f"{d.steps_per_round}")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"untimed warm-up rounds; default {d.warmup}")
    p.add_argument("--batch", type=int, default=d.batch_size,
                   help=f"mini-batch size; default {d.batch_size}")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help=f"square image size (ViT: a multiple of its patch); default "
                        f"{d.image_size}")
    p.add_argument("--depth", type=int, default=None,
                   help="fewer blocks, for a quick check (ViT: depth; ConvNeXt: blocks per "
                        "stage); default the model's own")
    p.add_argument("--num-classes", type=int, default=d.num_classes,
                   help=f"classifier outputs; default {d.num_classes}")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=d.dtype,
                   help="float32, or bfloat16 via torch.autocast; default float32")
    p.add_argument("--threads", type=int, default=d.threads,
                   help=f"torch CPU threads; default {d.threads}")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the weights, the gates and the synthetic data")
    p.add_argument("--json", default=None, metavar="OUT", help="write the record to OUT")
    return p


def _cpu_warnings(cfg: DropPathConfig) -> list[str]:
    """What makes a CPU timing run unreliable, seen before it starts."""
    if torch.device(cfg.device).type != "cpu":
        return []
    out = []
    if hasattr(os, "getloadavg") and os.getloadavg()[0] >= 0.75 * (os.cpu_count() or 1):
        out.append(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs before "
                   "the run: other processes compete for the cores, CPU timings will be noisy")
    if not any(k.startswith("MALLOC_") for k in os.environ):
        # benchmarks/RESULTS.md: fresh pages cost ~2 us each on these VMs, and glibc's
        # defaults hand freed activations back to the OS every step
        out.append("glibc returns freed memory to the OS between steps (see the faults "
                   "column); MALLOC_TRIM_THRESHOLD_=1000000000 MALLOC_MMAP_THRESHOLD_=33554432 "
                   "keep it")
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = DropPathConfig(models=args.models, rates=args.rates, modes=args.modes,
                         batch_size=args.batch, image_size=args.image_size,
                         rounds=args.rounds, steps_per_round=args.steps_per_round,
                         warmup=args.warmup, depth=args.depth, num_classes=args.num_classes,
                         dtype=args.dtype, threads=args.threads, seed=args.seed)
    try:
        cfg.check()
        if cfg.threads is not None and cfg.threads < 1:
            raise ValueError("--threads must be >= 1")
        if importlib.util.find_spec("timm") is None:
            raise ValueError("this benchmark needs timm (pip install timm)")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for warning in _cpu_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    rec = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_table(rec))
    if args.json:
        from .report import write_json
        print(f"\nresult: {write_json(rec, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
