"""Dry run of every CUDA code path on a CPU, with counts of what a GPU would do.

No GPU needed (design §8). Each variant (model x backend x layout x dtype) runs, through
the library's ordinary Python:

* ``forward``  a training forward + loss on fake CUDA tensors (``FakeTensorMode``);
* ``train``    a whole training step (forward, cross-entropy, backward, SGD) on ``meta``
               tensors inside the testing seam :func:`sdkernels.backends.dry_run_cuda`,
               where the library treats meta as CUDA: the autograd engine cannot run a
               backward on fake CUDA tensors without a CUDA context (pytorch #92627);
* ``eval1``, ``eval2``  two eval forwards (``torch.no_grad``) on fake CUDA tensors: the
               second shows what the folded-weight cache of ``sdkernels.ops.folding`` saves.

A ``TorchDispatchMode`` records every op that reaches the dispatcher (aten ops,
``torch.ops.sdkernels.*``, ``torch.ops.sdkernels_triton.*``) and counts per step:

launches   device ops that launch work: 1 per op, except view/metadata ops and
           allocations (0), ``convolution_backward`` (1 per gradient asked for), the
           sdkernels reduction ops (2: reduce + finalize kernels, csrc/cuda) and
           ``_foreach_*`` (multi_tensor_apply: max(ceil(tensors / 110), ceil(64 Ki-element
           chunks / 320)) per list). A cuDNN convolution counts 1 whatever it launches
           inside; host->device copies count 1 each (and are listed as h2d).
bytes      read: the sizes (numel x element size) of an op's distinct tensor inputs;
           written: of its outputs and of the inputs it mutates. An upper bound of DRAM
           traffic for elementwise ops, a lower bound for convolutions with re-reads.
flops      of convolutions and matrix products (torch.utils.flop_counter's formulas;
           Triton convs 2 N Cout Ho Wo Cin kh kw).
syncs      host syncs on device tensors: ``_local_scalar_dense`` (``.item()``,
           ``bool()``), ``nonzero``, ``masked_select``, ``unique``, ``equal``, device->host
           copies. Zero is the target: each one stalls the host until the GPU catches up.
           On fake/meta tensors data-dependent ops cannot even run, so a sync ends the
           variant with an error that names the op (``DryRunSync``).

Limits: with a CPU-only torch every step runs on meta tensors (``FAKE_CUDA`` False): such
a torch breaks on fake CUDA tensors. bf16 steps on meta use bf16 parameters and inputs (autocast has no
meta kernels), so the ``train`` step lacks autocast's per-step weight casts that the
fake-CUDA ``forward`` step (autocast on) shows; host time (Python, dispatch) is not
measured, only launches counted. ``python3 -m sdkernels.bench.dryrun --help``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import traceback
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .. import backends
from ..convert import convert
from ..gates import gate_state, load_gate_state
from ..models import cifar_resnet

__all__ = ["Counts", "Recorder", "DryRunSync", "VariantResult", "run_variant", "run",
           "format_table", "main", "BACKENDS", "MODELS"]

BACKENDS = ("reference", "extension", "triton")  # every backend that claims CUDA
MODELS = ("resnet110", "resnet50")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STEPS = ("forward", "train", "eval1", "eval2")

_aten = torch.ops.aten
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
             "aten::unique_dim", "aten::_unique", "aten::_unique2", "aten::unique_consecutive",
             "aten::equal", "aten::is_nonzero", "aten::repeat_interleave", "aten::allclose"}
# ops that allocate or only change metadata: no kernel
_NO_KERNEL = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
              "aten::new_empty_strided", "aten::empty_permuted", "aten::resize_",
              "aten::set_", "aten::lift_fresh", "aten::_has_compatible_shallow_copy_type",
              "aten::is_pinned", "aten::size", "aten::stride", "aten::sym_size",
              "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset", "aten::dim",
              "prim::device", "prim::layout"}
_TWO_KERNELS = {"sdkernels::bn_stats", "sdkernels::relu_bn_backward_reduce",
                "sdkernels::scale_bias_add_relu_backward"}
_CONV_OPS = {"sdkernels_triton::conv2d_fused"}


# Fake CUDA tensors need a CUDA build of torch (no GPU): a CPU-only torch fails on them in
# BatchNorm's decomposition and aborts when autograd meets one. There every step runs on
# meta tensors inside the seam instead (same library branches, no autocast).
FAKE_CUDA = torch.backends.cuda.is_built()


class DryRunSync(RuntimeError):
    """A host sync on a device tensor was met (the op could not run on fake tensors)."""


@dataclass
class Counts:
    launches: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flops: float = 0.0
    syncs: int = 0
    h2d: int = 0
    ops: dict = field(default_factory=dict)   # op name -> launches
    by_family: dict = field(default_factory=dict)  # aten / sdkernels / sdkernels_triton

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def add(self, other: "Counts") -> None:
        for k in ("launches", "bytes_read", "bytes_written", "flops", "syncs", "h2d"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for d, o in ((self.ops, other.ops), (self.by_family, other.by_family)):
            for k, v in o.items():
                d[k] = d.get(k, 0) + v

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bytes"] = self.bytes
        return d


@dataclass
class OpRecord:
    name: str
    phase: str
    launches: int
    bytes_read: int
    bytes_written: int
    flops: float
    sync: bool
    h2d: bool


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _foreach_launches(tensor_lists) -> int:
    # multi_tensor_apply (ATen/native/cuda/MultiTensorApply.cuh): a launch per 110
    # tensors (depth 1; fewer for deeper lists, ignored) or per 320 chunks of 64 Ki
    # elements, whichever fills first.
    lists = [l for l in tensor_lists if isinstance(l, (list, tuple)) and l
             and isinstance(l[0], torch.Tensor)]
    if not lists:
        return 1
    ts = lists[0]
    chunks = sum(max(1, math.ceil(t.numel() / 65536)) for t in ts)
    return max(1, math.ceil(len(ts) / 110), math.ceil(chunks / 320))


class Recorder(TorchDispatchMode):
    """Records every dispatched op on device tensors (``device_types``) as an OpRecord.

    Ops on host tensors only are host work and are not recorded; a host->device copy is
    recorded as one launch and flagged h2d, a device->host copy as a sync.
    """

    def __init__(self, device_types=("cuda", "meta")):
        super().__init__()
        self.device_types = set(device_types)
        self.records: list[OpRecord] = []
        self.phase = "forward"
        self.syncs: list[str] = []

    def _on_device(self, t) -> bool:
        return t.device.type in self.device_types

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        ins = list(_tensors((args, kwargs)))
        dev_in = [t for t in ins if self._on_device(t)]
        if name in _SYNC_OPS and dev_in:
            where = _library_frame()
            self.syncs.append(f"{name} in {where}")
            self.records.append(OpRecord(name, self.phase, 0, 0, 0, 0.0, True, False))
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                raise DryRunSync(f"host sync {name} on a device tensor, called from {where}: "
                                 f"{type(exc).__name__}") from exc
        out = func(*args, **kwargs)
        outs = list(_tensors(out))
        dev_out = [t for t in outs if self._on_device(t)]
        if not dev_in and not dev_out:
            return out  # host work
        self.records.append(self._record(func, name, args, kwargs, ins, outs, dev_in, dev_out))
        return out

    def _record(self, func, name, args, kwargs, ins, outs, dev_in, dev_out) -> OpRecord:
        sync = h2d = False
        if name in ("aten::copy_", "aten::_to_copy", "aten::to", "aten::_copy_from"):
            src = ins[1] if name == "aten::copy_" and len(ins) > 1 else ins[0]
            dst = ins[0] if name == "aten::copy_" else (outs[0] if outs else None)
            if dst is not None and src.device.type == "cpu" and self._on_device(dst):
                h2d = True
            elif dst is not None and self._on_device(src) and dst.device.type == "cpu":
                sync = True
                self.syncs.append(f"{name} (device->host copy) in {_library_frame()}")
        if func.is_view or name in _NO_KERNEL:
            return OpRecord(name, self.phase, 0, 0, 0, 0.0, sync, h2d)
        if name == "aten::convolution_backward":
            mask = args[-1] if args and isinstance(args[-1], (list, tuple)) else kwargs.get(
                "output_mask", [True, True, True])
            launches = max(1, sum(bool(m) for m in mask))
        elif name.startswith("aten::_foreach_"):
            launches = _foreach_launches(args)
        elif name in _TWO_KERNELS:
            launches = 2
        else:
            launches = 1
        seen, read = set(), 0
        for t in ins:
            if id(t) not in seen:
                seen.add(id(t))
                read += _nbytes(t)
        written = sum(_nbytes(t) for t in outs)
        for a, v in zip(func._schema.arguments, args):  # mutated inputs
            if a.alias_info is not None and a.alias_info.is_write:
                written += sum(_nbytes(t) for t in _tensors(v) if not any(t is o for o in outs))
        return OpRecord(name, self.phase, launches, read, written,
                        _flops(func, name, args, kwargs, outs), sync, h2d)

    def counts(self, phase: str | None = None) -> Counts:
        c = Counts()
        for r in self.records:
            if phase is not None and r.phase != phase:
                continue
            c.launches += r.launches
            c.bytes_read += r.bytes_read
            c.bytes_written += r.bytes_written
            c.flops += r.flops
            c.syncs += int(r.sync)
            c.h2d += int(r.h2d)
            if r.launches:
                c.ops[r.name] = c.ops.get(r.name, 0) + r.launches
                fam = r.name.split("::")[0]
                c.by_family[fam] = c.by_family.get(fam, 0) + r.launches
        return c


def _flops(func, name, args, kwargs, outs) -> float:
    if name in _CONV_OPS:
        x, w, y = args[0], args[1], outs[0]
        return 2.0 * y.numel() * w.shape[1] * w.shape[2] * w.shape[3]
    from torch.utils.flop_counter import flop_registry

    f = flop_registry.get(func._overloadpacket)
    if f is None:
        return 0.0
    out = outs[0] if len(outs) == 1 else tuple(outs)
    try:
        return float(f(*args, **kwargs, out_val=out))
    except Exception:  # a formula that wants another signature: count nothing
        return 0.0


def _library_frame() -> str:
    """The innermost sdkernels frame of the current Python stack (where a sync came from)."""
    for fr in reversed(traceback.extract_stack()):
        if "/sdkernels/" in fr.filename and "/bench/dryrun.py" not in fr.filename:
            return f"{fr.filename.rsplit('/sdkernels/', 1)[-1]}:{fr.lineno} ({fr.name})"
    return "<outside sdkernels>"


# ---------------------------------------------------------------------------------------
# Building the models on fake CUDA / meta tensors.

def build_model(model: str, *, depth: int = 110, p_last: float = 0.5, mode: str = "batch",
                seed: int = 0) -> nn.Module:
    """The real (CPU) model: a CIFAR ResNet of ``depth`` or a converted torchvision
    ResNet-50 (``ImportError`` where torchvision is missing)."""
    if model == "resnet110":
        return cifar_resnet(depth, p_last=p_last, mode=mode, seed=seed)
    if model == "resnet50":
        import torchvision  # only in environments that have it

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = torchvision.models.resnet50()
        return convert(net, p_last, mode=mode, seed=seed)
    raise ValueError(f"unknown model {model!r}: expected one of {MODELS}")


def image_shape(model: str) -> tuple:
    return (3, 224, 224) if model == "resnet50" else (3, 32, 32)


def num_classes(model: str) -> int:
    return 1000 if model == "resnet50" else 10


def _to_fake_cuda(model: nn.Module, mode) -> nn.Module:
    # .to("cuda") is refused by a CPU-only torch even under FakeTensorMode; empty_like
    # with a device is not, and keeps each tensor's strides (channels_last weights).
    with mode:
        return model._apply(lambda t: torch.empty_like(t, device="cuda"))


@contextlib.contextmanager
def _cuda_autocast(dtype: torch.dtype):
    """``torch.autocast("cuda", dtype)`` that also works without a GPU (fake tensors).

    torch.autocast switches itself off when no CUDA device is present; the low-level
    switches do not, and fake CUDA tensors carry the AutocastCUDA key.
    """
    if dtype == torch.float32:
        yield
        return
    prev = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])


@dataclass
class VariantResult:
    model: str
    backend: str
    layout: str
    dtype: str
    batch: int
    steps: dict = field(default_factory=dict)     # step -> Counts.as_dict()
    phases: dict = field(default_factory=dict)    # train phase -> Counts.as_dict()
    error: str | None = None
    syncs: list = field(default_factory=list)
    cuda_branch: dict = field(default_factory=dict)  # step -> which op families ran
    tensors: str = ""   # forward/eval on "fake-cuda" or "meta" (train is always meta)

    @property
    def name(self) -> str:
        return f"{self.model}/{self.backend}/{self.layout}/{self.dtype}/b{self.batch}"


def _backend_ctx(backend: str):
    return backends.use_backend(backend) if backend != "reference" else contextlib.nullcontext()


def run_variant(model: str, backend: str, layout: str, dtype: str, batch: int, *,
                depth: int = 110, mode: str = "batch", steps=STEPS,
                base: nn.Module | None = None) -> VariantResult:
    """Run ``steps`` of one variant on fake CUDA / meta tensors and count them.

    The result says which (``tensors``).

    ``reference`` is the automatic choice on CUDA (the module path), so it runs without
    forcing; the others are forced with :func:`sdkernels.use_backend`.
    """
    label = f"resnet{depth}" if model == "resnet110" and depth != 110 else model
    res = VariantResult(label, backend, layout, dtype, batch)
    res.tensors = "fake-cuda" if FAKE_CUDA else "meta"
    res.records = {}  # step -> [OpRecord] (not a field: kept out of the JSON)
    fmt, dt = LAYOUTS[layout], DTYPES[dtype]
    shape, ncls = (batch, *image_shape(model)), num_classes(model)
    if base is None:
        base = build_model(model, depth=depth, mode=mode)
    try:
        with warnings.catch_warnings():
            # torch.autocast("cuda", enabled=False) inside the library warns that CUDA is
            # missing: true here, and harmless (it only switches autocast off)
            warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
            with backends.dry_run_cuda(), _backend_ctx(backend):
                for step in steps:
                    if step == "eval2":
                        continue  # runs with eval1 (same model, warm cache)
                    # a copy of base: every step starts from the same gate state, so
                    # forward and train draw the same gates (counts comparable)
                    net = copy.deepcopy(base).to(memory_format=fmt)
                    if step == "train":
                        rec = _train_step_meta(net, shape, ncls, fmt, dt)
                        for ph in ("forward", "backward", "optimizer"):
                            res.phases[ph] = rec.counts(ph).as_dict()
                        done = {"train": rec}
                    elif step == "forward":
                        net, x, y, ctx = _placed(net.train(), shape, fmt, dt)
                        rec = Recorder()
                        with ctx(rec):
                            F.cross_entropy(net(x), y)
                        done = {"forward": rec}
                    else:
                        net, x, _, ctx = _placed(net.eval(), shape, fmt, dt)
                        done = {}
                        for k in ("eval1", "eval2"):
                            if k in steps:
                                rec = done[k] = Recorder()
                                with ctx(rec), torch.no_grad():
                                    net(x)
                    for k, rec in done.items():
                        res.steps[k] = rec.counts().as_dict()
                        res.records[k] = rec.records
                        res.syncs += rec.syncs
    except backends.BackendUnavailableError as exc:
        # e.g. an environment without the compiled extension: reported, not a failure,
        # unless SDKERNELS_REQUIRE_EXTENSION=1 says it must be there
        res.error = f"skipped: {exc}"
        if os.environ.get("SDKERNELS_REQUIRE_EXTENSION", "0") == "1":
            res.error = f"BackendUnavailableError (SDKERNELS_REQUIRE_EXTENSION=1): {exc}"
    except Exception as exc:  # reported per variant; the caller decides what fails
        res.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
        res.error += "\n" + "".join(traceback.format_exception(exc)[-6:])
    res.cuda_branch = {k: v.get("by_family", {}) for k, v in res.steps.items()}
    return res


def _placed(net: nn.Module, shape, fmt, dt):
    """(net, x, labels, ctx) on fake CUDA tensors (a CUDA build of torch) or on meta
    tensors (a CPU-only torch, whose fake CUDA tensors break in BN and autograd);
    ``ctx(recorder)`` enters what the forward must run under."""
    if FAKE_CUDA:
        from torch._subclasses.fake_tensor import FakeTensorMode

        # real host tensors (the gates) may meet fake ones: they are converted, and
        # device mismatches still raise
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        net = _to_fake_cuda(net, fake)
        with fake:
            x = torch.empty(shape, device="cuda").contiguous(memory_format=fmt)
            y = torch.empty((shape[0],), dtype=torch.long, device="cuda")

        @contextlib.contextmanager
        def ctx(rec):
            with fake, rec, _cuda_autocast(dt):
                yield
        return net, x, y, ctx
    net = net.to("meta")
    if dt != torch.float32:
        net = net.to(dt)  # autocast has no meta kernels: bf16 parameters instead
    x = torch.empty(shape, device="meta", dtype=dt).contiguous(memory_format=fmt)
    y = torch.empty((shape[0],), dtype=torch.long, device="meta")

    @contextlib.contextmanager
    def ctx(rec):
        with rec:
            yield
    return net, x, y, ctx


def _train_step_meta(net: nn.Module, shape, ncls, fmt, dt) -> Recorder:
    """Forward, loss, backward and SGD on meta tensors (the seam makes them CUDA).

    SGD as on CUDA: ``foreach=True`` is what torch picks for CUDA parameters (for meta
    ones it would fall back to a per-parameter loop that no GPU run executes).
    """
    net = net.to("meta").train()
    if dt != torch.float32:
        net = net.to(dt)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                          foreach=True)
    x = torch.empty(shape, device="meta", dtype=dt).contiguous(memory_format=fmt)
    y = torch.empty((shape[0],), dtype=torch.long, device="meta")
    # The momentum buffers are created by the first step: run one untimed step first so
    # the recorded one is a steady-state step.
    gates = gate_state(net)
    for _ in range(2):  # a dispatch mode always on: no op takes its unobserved eager path
        load_gate_state(net, gates)  # the recorded step draws the forward step's gates
        rec = Recorder()
        with rec:
            opt.zero_grad(set_to_none=True)
            rec.phase = "forward"
            loss = F.cross_entropy(net(x), y)
            rec.phase = "backward"
            loss.backward()
            rec.phase = "optimizer"
            opt.step()
    return rec


def run(models=("resnet110",), backends_=BACKENDS, layouts=tuple(LAYOUTS),
        dtypes=tuple(DTYPES), batch: int = 128, *, depth: int = 110, steps=STEPS,
        progress=None) -> list[VariantResult]:
    """Every variant of ``models x backends_ x layouts x dtypes``; a model whose
    dependencies are missing (torchvision for resnet50) is skipped with a message."""
    out = []
    for model in models:
        try:
            base = build_model(model, depth=depth)
        except ImportError as exc:
            msg = f"skipping {model}: {exc} (torchvision is needed for it)"
            if progress:
                progress(msg)
            out.append(VariantResult(model, "-", "-", "-", batch, error="skipped: " + msg))
            continue
        for backend in backends_:
            for layout in layouts:
                for dtype in dtypes:
                    r = run_variant(model, backend, layout, dtype, batch, depth=depth,
                                    steps=steps, base=base)
                    if progress:
                        progress(f"{r.name}: " + ("ok" if r.error is None else "ERROR"))
                    out.append(r)
    return out


# ---------------------------------------------------------------------------------------
# Report.

def _mb(b) -> str:
    return f"{b / 2**20:,.1f}"


def format_table(results: list[VariantResult], predictions: dict | None = None) -> str:
    """A readable table: one row per variant and step."""
    hdr = (f"{'variant':<42} {'step':<8} {'launches':>8} {'read MiB':>10} {'write MiB':>10} "
           f"{'GFLOP':>9} {'syncs':>5} {'h2d':>4}  families")
    if predictions:
        hdr += "   predicted H100 / H200 ms (bound)"
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<42} ERROR {r.error.splitlines()[0]}")
            continue
        for step in STEPS:
            c = r.steps.get(step)
            if c is None:
                continue
            fams = ",".join(f"{k}:{v}" for k, v in sorted(c["by_family"].items()))
            line = (f"{r.name:<42} {step:<8} {c['launches']:>8} {_mb(c['bytes_read']):>10} "
                    f"{_mb(c['bytes_written']):>10} {c['flops'] / 1e9:>9.1f} {c['syncs']:>5} "
                    f"{c['h2d']:>4}  {fams}")
            p = (predictions or {}).get((r.name, step))
            if p:
                line += (f"   {p['H100']['ms']:.2f} / {p['H200']['ms']:.2f} "
                         f"({p['H200']['dominant']})")
            lines.append(line)
        if "train" in r.steps:
            ph = " | ".join(f"{k} {v['launches']}" for k, v in r.phases.items())
            lines.append(f"{'':<42} {'':<8} train launches by phase: {ph}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m sdkernels.bench.dryrun",
        description="Dry run of the CUDA code paths on a CPU (fake CUDA and meta tensors): "
                    "per variant and step, kernel launches, bytes read/written, conv FLOPs "
                    "and host syncs, plus the cost model's predicted H100/H200 times "
                    "(predictions, not measurements). Exit status 1 if a variant fails or "
                    "syncs.")
    p.add_argument("--model", choices=MODELS + ("all",), default="resnet110")
    p.add_argument("--backend", choices=BACKENDS + ("all",), default="all")
    p.add_argument("--layout", choices=tuple(LAYOUTS) + ("all",), default="all")
    p.add_argument("--dtype", choices=tuple(DTYPES) + ("all",), default="all")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--depth", type=int, default=110, help="CIFAR ResNet depth (resnet110)")
    p.add_argument("--json", default=None, help="write every count and prediction here")
    p.add_argument("--no-predict", action="store_true", help="counts only, no cost model")
    a = p.parse_args(argv)
    pick = lambda v, allv: allv if v == "all" else (v,)  # noqa: E731
    results = run(pick(a.model, MODELS), pick(a.backend, BACKENDS), pick(a.layout, tuple(LAYOUTS)),
                  pick(a.dtype, tuple(DTYPES)), a.batch, depth=a.depth,
                  progress=lambda m: print(m, file=sys.stderr, flush=True))
    preds = None
    if not a.no_predict:
        from .costmodel import predict_results
        preds = predict_results(results)
    print(format_table(results, preds))
    if preds:
        from .costmodel import CEILINGS_NOTE
        print(CEILINGS_NOTE)
    failed = [r for r in results if r.error and not r.error.startswith("skipped")]
    syncs = [s for r in results for s in r.syncs]
    for r in results:
        if r.error:
            print(f"\n{r.name}: {r.error}")
    if syncs:
        print("\nhost syncs:\n  " + "\n  ".join(sorted(set(syncs))))
    if a.json:
        from .env import environment

        doc = {"environment": environment(torch.device("cpu")),
               "note": "counts from a dry run on fake CUDA / meta tensors; times are "
                       "cost-model predictions, not measurements",
               "results": [asdict(r) for r in results]}
        if preds:
            doc["predictions"] = [dict(variant=k[0], step=k[1], **v) for k, v in preds.items()]
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return 1 if failed or syncs else 0


if __name__ == "__main__":
    sys.exit(main())
