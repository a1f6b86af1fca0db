"""A roofline cost model over the dry run's op records: PREDICTED step times, not measured.

For every recorded kernel launch of a step (``sdkernels.bench.dryrun``):

    t_op = launches * max(bytes / bandwidth, FLOPs / peak, launch floor)

and a step's predicted time is the sum over its ops. Each op's time is attributed to the
bound that gave the max ("memory", "compute" or "launch"), so a step shows which bound
dominates: the basis for choosing between more fusion (memory-bound steps) and CUDA
graphs (launch-bound steps). An op counted as several launches (a foreach list, a
convolution backward with two gradients) splits its bytes and FLOPs evenly over them.

Ceilings (``CEILINGS``):
* H200: 4.3 TB/s device-to-device copy and 790 TFLOP/s bf16 dense matmul, both
  *measured* on an H200 of these machines (figures handed to this module, not rerun here).
* H100 SXM: 3.35 TB/s HBM3 and ~990 TFLOP/s bf16 dense: *nominal datasheet* figures,
  not measured; scaled to achievable with the H200's measured/nominal ratios
  (4.3 / 4.8 TB/s, 790 / 989 TFLOP/s), i.e. an estimate of what a copy and a matmul
  would reach.
* fp32 FLOPs run at the TF32 tensor-core rate (cuDNN's default for convolutions),
  taken as half the bf16 rate.
* launch floor: 4 us per kernel launch issued from Python eager (an assumption: host
  time of Python + dispatcher + launch, which bounds a small kernel's throughput when
  the GPU runs ahead of nothing).

Limits: no overlap between ops, no caches (the bytes rule of the dry run counts every
operand once per op), no efficiency below the ceilings for small convolutions. A
prediction of which bound dominates is more trustworthy than its absolute time.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Ceilings", "CEILINGS", "CEILINGS_NOTE", "LAUNCH_FLOOR_S", "predict_records", "predict_results"]

LAUNCH_FLOOR_S = 4e-6  # assumption: per launch from Python eager


@dataclass(frozen=True)
class Ceilings:
    name: str
    bandwidth: float          # bytes / s
    bf16_flops: float         # FLOP / s, dense
    source: str

    def peak(self, dtype: str) -> float:
        return self.bf16_flops if dtype == "bf16" else self.bf16_flops / 2  # TF32


_H200_BW, _H200_BF16 = 4.3e12, 790e12                   # measured (copy, bf16 dense)
_H100_BW_NOM, _H100_BF16_NOM = 3.35e12, 989e12          # datasheet, nominal
_H200_BW_NOM, _H200_BF16_NOM = 4.8e12, 989e12           # datasheet, nominal

CEILINGS = {
    "H200": Ceilings("H200", _H200_BW, _H200_BF16, "measured on an H200 (copy, bf16 matmul)"),
    "H100": Ceilings("H100", _H100_BW_NOM * _H200_BW / _H200_BW_NOM,
                     _H100_BF16_NOM * _H200_BF16 / _H200_BF16_NOM,
                     "nominal H100 SXM datasheet (3.35 TB/s, 989 TFLOP/s bf16) scaled by the "
                     "H200's measured/nominal ratios; not measured"),
}

CEILINGS_NOTE = (
    "All times above are PREDICTIONS of a roofline cost model (sdkernels.bench.costmodel), "
    "not measurements: sum over launches of max(bytes/BW, FLOPs/peak, 4 us launch floor). "
    f"H200: {_H200_BW / 1e12:.2f} TB/s, {_H200_BF16 / 1e12:.0f} TFLOP/s bf16 (measured on an "
    f"H200); H100: {CEILINGS['H100'].bandwidth / 1e12:.2f} TB/s, "
    f"{CEILINGS['H100'].bf16_flops / 1e12:.0f} TFLOP/s bf16 (nominal datasheet, scaled; not "
    "measured); fp32 at half the bf16 rate (TF32); 4 us per launch is an assumption.")


def _op_time(launches, nbytes, flops, c: Ceilings, dtype: str, floor: float):
    if launches <= 0:
        return 0.0, None
    per = (nbytes / launches / c.bandwidth, flops / launches / c.peak(dtype), floor)
    t = max(per)
    bound = ("memory", "compute", "launch")[per.index(t)]
    return launches * t, bound


def predict_records(records, dtype: str, chip: str = "H200",
                    floor: float = LAUNCH_FLOOR_S) -> dict:
    """Predicted time of a list of ``dryrun.OpRecord``s, and its split by bound."""
    c = CEILINGS[chip]
    split = {"memory": 0.0, "compute": 0.0, "launch": 0.0}
    for r in records:
        t, bound = _op_time(r.launches, r.bytes_read + r.bytes_written, r.flops, c, dtype,
                            floor)
        if bound:
            split[bound] += t
    total = sum(split.values())
    return {"s": total, "ms": total * 1e3, "by_bound_ms": {k: v * 1e3 for k, v in split.items()},
            "dominant": max(split, key=split.get) if total else "-",
            "ceilings": c.source, "label": "prediction"}


def predict_results(results) -> dict:
    """{(variant name, step): {"H100": ..., "H200": ...}} for dry-run results that kept
    their op records (``VariantResult.records``)."""
    out = {}
    for r in results:
        for step, recs in getattr(r, "records", {}).items():
            out[(r.name, step)] = {chip: predict_records(recs, r.dtype, chip)
                                   for chip in CEILINGS}
    return out
