"""How a row-mode training step scales with the rows its residuals keep.

The time-weighted prediction of ``sdkernels.bench.droppath`` assumes that a residual
branch run on k of n rows costs k/n of its full time. This tool measures that
assumption on a converted timm model, with every residual keeping exactly k rows
(random ones, a fresh draw per residual and step; ``gather_min_drop`` set to 0 so that
every residual gathers; a branch with BatchNorm masks a step with one survivor, so keep
k >= 2 there):

* ``all``    every residual on all n rows (the active path);
* ``none``   every residual dropped (the fixed part of the step);
* ``k=K``    every residual on K rows: measured against ``none + K/n (all - none)``;
* ``all@K``, ``none@K`` (unless ``batch_of_k=False``): ``all`` and ``none`` on a batch of
  K samples. ``all@K - none@K`` is what the residuals cost on K rows with nothing of row
  mode around them, so the step over the linear prediction splits into two parts:

  - *branch scaling*: ``none + (all@K - none@K)`` (the ideal row step) over linear: a
    branch on K rows costs more than K/n of its time on n (weight-sized work, such as
    packing the weights and the optimizer's update of the branch's parameters, and
    per-operator costs do not shrink with the rows). No implementation of the gather
    and scatter can remove this part;
  - *row mode's own cost*: the step over the ideal row step: gather, scatter, the copy
    of the shortcut, the extra autograd nodes and the host-side draw.

With ``--profile`` it also runs the PyTorch profiler on ``all`` and on each ``k=K`` and
sums self CPU time per operator, split into the operators row mode's bookkeeping uses
(:data:`ROW_OPS`: gather, scatter, copies, fills; the network and the optimizer use some
of them too, which the linear interpolation of the all-rows and no-rows profiles
accounts for) and everything else, and per (operator, input shape) for the largest
compute operators, so that a gap can be told apart into gather/scatter cost and kernels
that do not scale linearly with their rows.

    python -m sdkernels.bench.rowscaling --model convnext_atto --keep 29,19 --profile
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

from ..convert import convert, gates_of, residual_blocks
from ..gates import FixedGates, GateGenerator
from ..measure.timing import interleaved_timing, make_inputs, make_train_step
from .compare import paired_centres
from .droppath import DropPathConfig, create_model, timm_kwargs
from .env import environment

__all__ = ["KeepK", "ROW_OPS", "measure", "main"]

#: operators of row mode's own bookkeeping (gather, scatter, the copy of the shortcut)
ROW_OPS = ("aten::index_select", "aten::index_add_", "aten::index_copy_", "aten::index",
           "aten::_index_put_impl_", "aten::scatter_add_", "aten::copy_", "aten::fill_",
           "aten::zero_", "aten::clone")


class KeepK(GateGenerator):
    """Row gates keeping exactly ``k`` random rows (batch gates: active)."""

    def __init__(self, k: int, seed: int = 0):
        super().__init__(seed=seed)
        self.k = k

    def __reduce__(self):  # not GateGenerator's state-only copy: stay a KeepK
        return (KeepK, (self.k, self.initial_seed))

    def __deepcopy__(self, memo):
        return KeepK(self.k, self.initial_seed)

    def batch(self, p):
        return True

    def rows(self, p, n):
        keep = torch.zeros(n, dtype=torch.bool, device="cpu")
        keep[torch.randperm(n, generator=self._gen, device="cpu")[:self.k]] = True
        return keep


def _with_gates(model, gen):
    m = copy.deepcopy(model)
    for _, b in residual_blocks(m):
        for g in gates_of(b):
            g.gate_generator = gen
            g.gather_min_drop = 0.0
    return m


def _profile(step, x, y, reps=2):
    from torch.profiler import profile
    step(x, y)
    with profile(record_shapes=True) as prof:
        for _ in range(reps):
            step(x, y)
    by_op, by_shape = {}, {}
    for e in prof.key_averages(group_by_input_shape=True):
        ms = e.self_cpu_time_total / 1e3 / reps
        by_op[e.key] = by_op.get(e.key, 0.0) + ms
        first = tuple(e.input_shapes[0]) if e.input_shapes and e.input_shapes[0] else ()
        by_shape[(e.key, first)] = by_shape.get((e.key, first), 0.0) + ms
    return by_op, by_shape


def _first_rows(step, k):
    """``step`` on the first ``k`` samples of each batch."""
    return lambda x, y: step(x[:k], y[:k])


def measure(name: str, keeps, *, batch=32, image_size=128, rounds=8, warmup=1, threads=2,
            seed=0, profile=False, depth=None, batch_of_k=True) -> dict:
    """Time (and with ``profile`` profile) the variants of the module docstring, with
    ``threads`` torch threads and denormals flushed, as sdkernels.bench.droppath does;
    both are restored on return."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        return _measure(name, keeps, batch, image_size, rounds, warmup, seed, profile, depth,
                        batch_of_k)
    finally:
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(False)  # torch's default


def _measure(name, keeps, batch, image_size, rounds, warmup, seed, profile, depth,
             batch_of_k):
    torch.manual_seed(seed)
    cfg = DropPathConfig(batch_size=batch, image_size=image_size, depth=depth)
    model = convert(create_model(name, 0.0, timm_kwargs(name, cfg)), mode="row",
                    schedule="uniform", p_last=0.5, seed=seed)
    variants = {"all": _with_gates(model, FixedGates(True)),
                "none": _with_gates(model, FixedGates(False))}
    for k in keeps:
        if not 0 < k < batch:
            raise ValueError(f"keep must be in (0, {batch}), got {k}")
        variants[f"k={k}"] = _with_gates(model, KeepK(k, seed))
    steps = {n: make_train_step(m) for n, m in variants.items()}
    if batch_of_k:
        for k in keeps:
            for v in ("all", "none"):
                m = variants[f"{v}@{k}"] = copy.deepcopy(variants[v])
                steps[f"{v}@{k}"] = _first_rows(make_train_step(m), k)
    inputs = make_inputs(batch, image_shape=(3, image_size, image_size), num_classes=1000,
                         seed=seed)
    kept = {}

    def read_gates(variant, _round, _seconds):
        kept[variant] = {int(g.last_gate.sum()) for _, b in residual_blocks(variants[variant])
                         for g in gates_of(b)}

    times = interleaved_timing(steps, inputs, rounds=rounds, warmup=warmup, on_step=read_gates)
    centre = paired_centres(times, reference="all")
    t_all, t_none = centre["all"], centre["none"]
    rows = []
    for k in keeps:
        t = centre[f"k={k}"]
        pred = t_none + k / batch * (t_all - t_none)
        row = {"keep": k, "ms": t * 1e3, "linear_ms": pred * 1e3,
               "over_linear": t / pred, "vs_all": t / t_all}
        if batch_of_k:
            ideal = t_none + centre[f"all@{k}"] - centre[f"none@{k}"]
            row.update(ideal_ms=ideal * 1e3, ideal_over_linear=ideal / pred,
                       over_ideal=t / ideal)
        rows.append(row)
    rec = {"model": name, "batch": batch, "image_size": image_size, "rounds": rounds,
           "all_ms": t_all * 1e3, "none_ms": t_none * 1e3, "rows": rows, "kept": kept,
           "env": {**environment("cpu"), "flush_denormal": True}}
    if profile:
        x, y = inputs[0]
        rec["profile"] = {"all": _profile(steps["all"], x, y),
                          "none": _profile(steps["none"], x, y)}
        for k in keeps:
            rec["profile"][k] = _profile(steps[f"k={k}"], x, y)
    return rec


def _split(by_op):
    row = sum(v for k, v in by_op.items() if k in ROW_OPS)
    return row, sum(by_op.values()) - row


def format_record(rec: dict) -> str:
    out = [f"{rec['model']}: batch {rec['batch']}, image {rec['image_size']}, "
           f"{rec['rounds']} rounds; all rows {rec['all_ms']:.1f} ms, every residual "
           f"dropped {rec['none_ms']:.1f} ms",
           "  keep  step ms  linear ms  step/linear  step/all"]
    split = any("ideal_ms" in r for r in rec["rows"])
    if split:
        out[-1] += "  ideal ms  ideal/linear  step/ideal"
    for r in rec["rows"]:
        line = (f"  {r['keep']:4d} {r['ms']:8.1f} {r['linear_ms']:10.1f} "
                f"{r['over_linear']:12.3f} {r['vs_all']:9.3f}")
        if split:
            line += (f" {r['ideal_ms']:9.1f} {r['ideal_over_linear']:13.3f} "
                     f"{r['over_ideal']:11.3f}")
        out.append(line)
    if split:
        out.append("  (ideal: every residual run on a batch of keep samples, nothing of row "
                   "mode around it; ideal/linear: branch scaling, step/ideal: row mode's "
                   "own cost)")
    n = rec["batch"]
    prof = rec.get("profile")
    if prof:
        out.append("  profile (self CPU ms per step; linear: none + keep/n x (all - none)):")
        out.append("  keep  bookkeeping ops (linear)  other ops (linear)")
    for k in (k for k in (prof or {}) if isinstance(k, int)):
        (a_op, a_shape), (k_op, k_shape) = prof["all"], prof[k]
        (a_row, a_rest), (k_row, k_rest) = _split(a_op), _split(k_op)
        z_row, z_rest = _split(prof["none"][0])
        lin_row = z_row + k / n * (a_row - z_row)
        lin_rest = z_rest + k / n * (a_rest - z_rest)
        out.append(f"  {k:4d} {k_row:16.1f} {lin_row:9.1f} {k_rest:11.1f} {lin_rest:9.1f}")
        # compute operators whose first input had n rows, against the same with k rows
        pairs = []
        for (op, first), ms in a_shape.items():
            if op in ROW_OPS or not first or first[0] != n or ms <= 0.5:
                continue
            twin = (op, (k,) + first[1:])
            if twin in k_shape:
                pairs.append((ms, op, first, k_shape[twin]))
        for ms, op, first, kms in sorted(pairs, reverse=True)[:8]:
            out.append(f"    {op[6:]:40s} {str(list(first)):20s} {ms:7.2f} -> {kms:6.2f} ms "
                       f"({kms / ms:.2f}; linear {k / n:.2f})")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convnext_atto")
    p.add_argument("--keep", default="29,24,16", help="comma-separated rows kept")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--depth", type=int, default=None,
                   help="fewer blocks, for a quick check (as sdkernels.bench.droppath)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--no-batch-of-k", dest="batch_of_k", action="store_false",
                   help="skip the all@K/none@K variants (the split into branch scaling "
                        "and row mode's own cost)")
    args = p.parse_args(argv)
    keeps = [int(k) for k in args.keep.split(",")]
    rec = measure(args.model, keeps, batch=args.batch, image_size=args.image_size,
                  rounds=args.rounds, threads=args.threads, profile=args.profile,
                  depth=args.depth, batch_of_k=args.batch_of_k)
    env = rec["env"]
    print(f"{env['device_name']}, {env['torch_threads']} threads, torch {env['torch']}")
    print(format_record(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
