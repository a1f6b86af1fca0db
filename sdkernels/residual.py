"""The stochastic-depth rule around one residual, for any residual branch (design §2).

:class:`GatedResidual` holds what a gated residual keeps between calls (survival
probability, mode, scaling, generator, last gate) and applies the rule to a
:class:`Residual`, the description of one call: ``out = post(shortcut(x) + s * f(x))``.

* training, ``mode="batch"``: one gate per forward; a dropped residual runs its shortcut
  (and ``post``) only: nothing of the branch runs, no autograd node is made for it.
* training, ``mode="row"``: one gate per sample; the branch runs on the surviving rows
  only (gathered in the input's memory layout) and its output is added into theirs with
  ``index_add_`` on a copy of the shortcut. A per-sample branch (no BatchNorm) with
  fewer than ``gather_min_drop`` of its rows dropped is multiplied by the mask instead:
  the same result, cheaper than gathering (:func:`sdkernels.ops.row_path` chooses). A
  BatchNorm inside the branch therefore normalises with the survivors' statistics;
  LayerNorm and GroupNorm are per sample and give exactly what a full batch gives on
  those rows.
* eval: ``post(shortcut(x) + p * f(x))`` for ``scaling="test"`` (the paper),
  ``post(shortcut(x) + f(x))`` for ``scaling="train"`` (torchvision/timm, whose training
  scale is 1/p).

The row result is written into a copy of the shortcut, never into ``x``: the block's
input may still be needed as it is by its caller (timm's ``forward_intermediates``
keeps block outputs, activation checkpointing recomputes from them), and an in-place
add would change it silently. The one copy of ``x`` this costs is what ``x + f`` costs in any
residual network.

:class:`StochasticDepth` is the public wrapper (a branch module, a shortcut, an
activation). The drop-in ResNet blocks (``sdkernels.blocks``) are the special case whose
branch is Conv-BN-ReLU-Conv-BN and whose active path is fused; converted transformer and
ConvNeXt blocks (``sdkernels.families``) hold one :class:`ResidualGate` per residual.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .gates import GateGenerator, default_generator, recomputing, survivors
from .ops import reference, row_path
from .schedule import check_prob

__all__ = ["GatedResidual", "Residual", "decide", "StochasticDepth", "ResidualGate", "MODES",
           "SCALINGS", "DROPPED_GRADS", "DROP_IMPLS"]

MODES = ("batch", "row")
#: Default ``gather_min_drop``: the dropped fraction of a mini-batch from which row mode
#: gathers the survivors of a per-sample branch. On the 2-core CPU (batch 32,
#: ``python -m sdkernels.bench.rowscaling``, benchmarks/RESULTS.md) row mode's own cost
#: is about 0.35-0.65 ms per ViT-Tiny residual and 1.1-1.5 ms per ConvNeXt-Atto one
#: (residuals average 16 and 25 ms there): what one row of 32 saves on the ViT, 1.5 to 2
#: rows on the ConvNeXt. 1/16 keeps the one-row drops of a batch of 32 (the common case
#: at drop rates <= 0.1) masked; on the ConvNeXt two-row drops are about break-even.
GATHER_MIN_DROP = 1 / 16
SCALINGS = ("test", "train")
DROPPED_GRADS = ("auto", "zeros", "none")
DROP_IMPLS = ("skip", "mask")


def _choice(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}: expected one of {allowed}")
    return value


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-drawn gate tensor on ``device``: a host->device copy, never a sync."""
    if device.type == "cpu":
        return t
    # From pinned memory a non_blocking copy neither blocks the host nor waits for the
    # stream (from pageable memory CUDA would). Pinning needs a real CUDA runtime: a dry
    # run on fake tensors has none, and only records the copy. empty + copy_ rather than
    # .to(): a CPU-only torch refuses .to("cuda") even for fake tensors.
    if device.type == "cuda" and torch.cuda.is_available():
        t = t.pin_memory()
    return torch.empty(t.shape, dtype=t.dtype, device=device).copy_(t, non_blocking=True)


_WARNED_MASKED = set()


def _warn_masked_once(gate):
    kind = type(gate).__name__
    if kind not in _WARNED_MASKED:
        _WARNED_MASKED.add(kind)
        warnings.warn(f"sdkernels: a row-mode residual ({kind}) whose branch has BatchNorm "
                      "drew a single survivor; that step runs its branch on the whole "
                      "batch, masked (BatchNorm needs two samples). Warned once.",
                      RuntimeWarning, stacklevel=3)


def branch_has_batchnorm(modules) -> bool:
    """Whether any of ``modules`` (or their submodules) is a BatchNorm."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm)
               for mod in modules if isinstance(mod, nn.Module) for m in mod.modules())


class _ZeroGradTie(torch.autograd.Function):
    """Identity on ``out`` that gives each of ``params`` a zero gradient.

    DDP with its defaults (no ``find_unused_parameters``) waits for a gradient of every
    parameter; a dropped residual's parameters would never get one. Tying them to the
    output costs one small zeros tensor per parameter in backward, no compute.
    """

    @staticmethod
    def forward(ctx, out, *params):
        ctx.meta = [(p.shape, p.dtype, p.device) for p in params]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.meta])


def decide(gate: "GatedResidual", x: torch.Tensor):
    """``gate``'s decision for this forward (None in eval): call it at the call site,
    ``gate(x, decide(gate, x), residual)``, so that under torch.compile the graph break
    of the draw resumes in the caller's own frame (see :meth:`GatedResidual.draw`)."""
    return gate.draw(x) if gate.training else None


# channels-last layouts: the permutation that makes the tensor contiguous, and back
_CHANNELS_LAST = {4: (torch.channels_last, (0, 2, 3, 1), (0, 3, 1, 2)),
                  5: (torch.channels_last_3d, (0, 2, 3, 4, 1), (0, 4, 1, 2, 3))}


def _row_order(t: torch.Tensor):
    """``(order, inverse)`` in which ``t``'s rows are dense blocks: ``((), ())`` when
    ``t`` is contiguous, the channels-last permutation and its inverse, None for any
    other layout (rows need not be blocks: plain indexing). Named layouts rather than a
    sort of the strides: under torch.compile strides are symbolic, and a sort on them is
    a graph break."""
    if t.is_contiguous():
        return (), ()
    fmt = _CHANNELS_LAST.get(t.dim())
    if fmt is not None and t.is_contiguous(memory_format=fmt[0]):
        return fmt[1], fmt[2]
    return None


# Row mode works on a tensor's rows as the dense blocks they are in memory: a
# channels-last [N, C, H, W] tensor is handled as its contiguous [N, H, W, C]
# permutation. index_select and index_add_ on that view keep the layout (index_select
# on the tensor itself returns NCHW, which makes every convolution after it reorder its
# data) and take the contiguous kernels; advanced indexing on the channels-last tensor
# keeps its layout too, but its backward is index_put_ with accumulation, the slower
# path (ConvNeXt-Atto row mode, benchmarks/RESULTS.md). Other layouts take plain
# indexing.

def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t``'s rows ``idx``, in ``t``'s memory layout."""
    layout = _row_order(t)
    if layout is None:
        return t[idx]
    order, inverse = layout
    if not order:
        return t.index_select(0, idx)
    return t.permute(order).index_select(0, idx).permute(inverse)


def _rows_into(base: torch.Tensor, idx: torch.Tensor, f: torch.Tensor, s, add: bool):
    out = base.clone()  # same memory layout; a tensor of our own to write into
    layout = _row_order(out)  # None (rows not blocks, e.g. a transposed [L, N, C]): as is
    order = () if layout is None else layout[0]
    view, f = (out, f) if not order else (out.permute(order), f.permute(order))
    if not add:
        view.index_copy_(0, idx, f)
    else:
        f, alpha = _with_alpha(f, s)
        view.index_add_(0, idx, f, alpha=alpha)
    return out


def _broadcast_rows(f: torch.Tensor, sc: torch.Tensor, k: int) -> torch.Tensor:
    """The branch's output on ``k`` rows expanded to the shortcut's row shape, as the
    full batch adds them (a branch giving one token per sample, [N, 1, C], against
    [N, L, C]); an output the shortcut cannot take is a ValueError, not a wrong add."""
    shape = (k,) + tuple(sc.shape[1:])
    try:
        if torch.broadcast_shapes(f.shape, shape) == torch.Size(shape):
            return f.expand(shape)
    except RuntimeError:
        pass
    raise ValueError(f"row mode: the branch's output on {k} rows has shape {tuple(f.shape)}, "
                     f"which does not broadcast to the shortcut's rows {shape}")


def add_rows(base: torch.Tensor, idx: torch.Tensor, f: torch.Tensor, s) -> torch.Tensor:
    """A copy of ``base`` (same memory layout) with ``s * f`` added to its rows ``idx``
    (``s`` None: ``f``)."""
    return _rows_into(base, idx, f, s, add=True)


def copy_rows(base: torch.Tensor, idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A copy of ``base`` (same memory layout) whose rows ``idx`` are ``t``."""
    return _rows_into(base, idx, t, None, add=False)


class Residual:
    """One residual call: ``post(shortcut(h_s) + s * branch(h, *row_args))``.

    * ``branch``: the residual branch f, called on ``h = pre(x)`` (or x);
    * ``shortcut``: a callable, or None for the identity;
    * ``post``: the activation after the add, or None (pre-activation and transformer
      blocks add only);
    * ``pre``: an optional first step shared by the branch and, when ``pre_shortcut``,
      the shortcut (``h_s = pre(x)``, else ``h_s = x``): ResNetV2's pre-activation;
    * ``params``: a callable giving the parameters the branch (and ``pre``) uses, for
      DDP's zero gradients;
    * ``row_args``: extra per-sample tensors of the branch (an attention mask of shape
      [N, ...]); row mode gathers their survivors' rows with the input's.
    """

    __slots__ = ("branch", "shortcut", "post", "pre", "pre_shortcut", "params", "row_args")

    def __init__(self, branch: Callable, shortcut: Optional[Callable] = None,
                 post: Optional[Callable] = None, *, pre: Optional[Callable] = None,
                 pre_shortcut: bool = False,
                 params: Callable[[], Iterable[torch.Tensor]] = tuple, row_args=()):
        self.branch, self.shortcut, self.post = branch, shortcut, post
        self.pre, self.pre_shortcut = pre, pre_shortcut
        self.params, self.row_args = params, tuple(row_args)

    def inputs(self, x):
        """(branch input, shortcut output) on all rows of x."""
        h = x if self.pre is None else self.pre(x)
        hs = h if self.pre_shortcut else x
        return h, (hs if self.shortcut is None else self.shortcut(hs))

    def combine(self, sc, f, s: Optional[float]):
        # s None: exactly `x + f` as the block it replaces writes it
        out = sc + f if s is None else _add_scaled(sc, f, s)
        return out if self.post is None else self.post(out)


def _with_alpha(f, s):
    """(f', alpha) with alpha * f' = s * f (s None: 1). Eager: the op's alpha, no extra
    pass. Under torch.compile a multiply, because Dynamo specialises a Python float
    passed as alpha (one compile per distinct p) but makes one that is multiplied a
    graph input; Inductor fuses it anyway."""
    if s is None:
        return f, 1
    if torch.compiler.is_compiling():
        return f * s, 1
    return f, s


def _add_scaled(sc, f, s: float):
    """sc + s * f (see _with_alpha)."""
    f, alpha = _with_alpha(f, s)
    return torch.add(sc, f, alpha=alpha)


def _post_of_input(post, out, x):
    """post(out) where out may be the residual's input itself: an in-place activation
    (timm's ReLU(inplace=True)) must not write into the caller's tensor."""
    if out is x and getattr(post, "inplace", False):
        out = out.clone()
    return post(out)


class _Setting:
    """A gate setting stored as ``_<name>`` and validated by ``check`` on every set:
    users set them on live models (annealing p, switching mode) and a wrong value must
    fail there, not steps later inside a forward."""

    def __init__(self, check: Callable):
        self.check = check

    def __set_name__(self, owner, name):
        self.attr = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        try:
            return obj.__dict__[self.attr]
        except KeyError:  # not set yet (a module being built): what hasattr expects
            raise AttributeError(self.attr[1:]) from None

    def __set__(self, obj, value):
        obj.__dict__[self.attr] = self.check(value)


def _check_generator(g):
    if g is not None and not isinstance(g, GateGenerator):
        raise TypeError(f"gate_generator must be a sdkernels GateGenerator, got {type(g)}")
    return g


def _check_int(v, what, least):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {v!r}")
    if v < least:
        raise ValueError(f"{what} must be >= {least}, got {v!r}")
    return int(v)


def _check_bool(v, what):
    if not isinstance(v, bool):
        raise TypeError(f"{what} must be a bool, got {v!r}")
    return v


def _check_fraction(v, what):
    if (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
            or not 0 <= v <= 1):
        raise ValueError(f"{what} must be a number in [0, 1], got {v!r}")
    return float(v)


class GatedResidual(nn.Module):
    """Gate state and the stochastic-depth rule of one or more residual calls.

    Subclasses call :meth:`gated` with a :class:`Residual`; the ResNet blocks override
    ``_active``/``_active_rows``/``_dropped`` with their fused paths.
    """

    def _init_gate(self, survival_prob=1.0, mode="batch", scaling="test",
                   gate_generator=None, dropped_grads="auto", drop_impl="skip"):
        self.survival_prob = survival_prob
        self.mode = mode
        self.scaling = scaling
        self.gate_generator = gate_generator
        self.dropped_grads = dropped_grads
        self.drop_impl = drop_impl
        self.last_gate = None
        self._gate_key = None  # position in the generator's step draw (GateGenerator.bind)
        # Row mode runs the branch on at least this many rows (2 for a branch with
        # BatchNorm, see draw); with fewer survivors the step is computed masked.
        self.min_rows = 1
        # Whether the branch treats every sample on its own (no BatchNorm): then row mode
        # may multiply by the mask instead of gathering, with the same result, when fewer
        # than gather_min_drop of the rows are dropped (the gather and scatter would cost
        # more than the rows they save, design §2). A branch with BatchNorm always
        # gathers: its statistics must be the survivors'.
        self.per_sample_branch = False
        self.gather_min_drop = GATHER_MIN_DROP

    def __setstate__(self, state):
        # whole-model pickles from before per-step gates and row-mode settings (which
        # were plain attributes, stored under their own names)
        state = dict(state)
        for name, default in (("min_rows", 1), ("per_sample_branch", False),
                              ("gather_min_drop", GATHER_MIN_DROP)):
            state.setdefault("_" + name, state.pop(name, default))
        state.setdefault("_gate_key", None)
        super().__setstate__(state)

    # -- settable, validated attributes (users inspect and anneal them) ---------------
    survival_prob = _Setting(check_prob)
    mode = _Setting(lambda v: _choice(v, MODES, "mode"))
    scaling = _Setting(lambda v: _choice(v, SCALINGS, "scaling"))
    dropped_grads = _Setting(lambda v: _choice(v, DROPPED_GRADS, "dropped_grads"))
    drop_impl = _Setting(lambda v: _choice(v, DROP_IMPLS, "drop_impl"))
    gate_generator = _Setting(_check_generator)
    # row mode (see _init_gate)
    min_rows = _Setting(lambda v: _check_int(v, "min_rows", 1))
    per_sample_branch = _Setting(lambda v: _check_bool(v, "per_sample_branch"))
    gather_min_drop = _Setting(lambda v: _check_fraction(v, "gather_min_drop"))

    def extra_repr(self) -> str:
        return (f"survival_prob={self.survival_prob:.4g}, mode={self.mode!r}, "
                f"scaling={self.scaling!r}")

    def _generator(self) -> GateGenerator:
        return self._gate_generator or default_generator()

    def _want_zero_grads(self) -> bool:
        if self._dropped_grads == "zeros":
            return True
        if self._dropped_grads == "none":
            return False
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _tie_zero_grads(self, out, params: Callable[[], Iterable[torch.Tensor]]):
        if torch.is_grad_enabled() and self._want_zero_grads():
            ps = [p for p in params() if p.requires_grad]
            if ps:
                out = _ZeroGradTie.apply(out, *ps)
        return out

    # -- the rule ---------------------------------------------------------------------
    @torch.compiler.disable  # host work (one graph break per residual under compile)
    def draw(self, x: torch.Tensor) -> tuple:
        """This training forward's decision: ``(path, s, t)`` with path "active",
        "dropped", "rows" (t: the survivors' indices, a CPU tensor) or "mask" (t: the
        CPU keep mask of the naive implementation), and s the training scale (None for
        ``scaling="test"``: 1, and no multiply).

        Everything that differs between residuals (generator key, p, s, survivors) is
        decided here, on the host side of the graph break: under torch.compile a module
        attribute read after the break would be a guard that compiles the code after it
        once per residual. Callers call :func:`decide` at their own call site, so each
        call site resumes in its own compiled frame (design §2). Whether a row-mode
        residual gathers or masks is :func:`sdkernels.ops.row_path`'s choice.
        """
        p = self._survival_prob
        rows = None if self._mode == "batch" else x.shape[0]
        key = self._gate_key if self._gate_key is not None else ("residual", id(self))
        # design §2: the whole step's gates come from one draw, and a recomputation
        # (activation checkpointing) gets this residual's gate of the forward again
        g = self._generator().gate(key, p, rows)
        if not recomputing():
            self.last_gate = g
        s = None if self._scaling == "test" else 1.0 / p  # None: no multiply at all
        if self._drop_impl == "mask":
            return "mask", s, (torch.full((1,), g) if rows is None else g)
        if rows is None:
            return ("active" if g else "dropped"), s, None
        n, idx = survivors(g)
        path, why = row_path(n, rows, min_rows=self._min_rows,
                             per_sample_branch=self._per_sample_branch,
                             gather_min_drop=self._gather_min_drop)
        if path != "rows":
            if why == "min_rows":
                # BatchNorm over one sample: degenerate statistics, and an error where
                # that is one value per channel (SelectiveKernel's attention pools to
                # 1x1). This step runs the branch on the whole batch, masked.
                _warn_masked_once(self)
            return path, s, (g if path == "mask" else None)
        # a new survivor count reuses the compiled graph instead of compiling one per count
        torch._dynamo.decorators.mark_unbacked(idx, 0)
        return "rows", s, idx

    def gated(self, x: torch.Tensor, r: Residual, decision: tuple | None = None):
        """Apply the stochastic-depth rule (module docstring) to the residual ``r``;
        ``decision`` from :func:`decide` (drawn here when None in training)."""
        if not self.training:
            return self._active(x, r, self._survival_prob if self._scaling == "test" else None)
        path, s, t = self.draw(x) if decision is None else decision
        if path == "active":
            return self._active(x, r, s)
        if path == "dropped":
            return self._dropped(x, r)
        t = _to_device(t, x.device)
        if path == "mask":
            return self._mask_forward(x, r, t, s)
        return self._active_rows(x, r, t, s)

    def _active(self, x, r: Residual, s: Optional[float]):
        h, sc = r.inputs(x)
        return r.combine(sc, r.branch(h, *r.row_args), s)

    def _dropped(self, x, r: Residual):
        hs = r.pre(x) if r.pre is not None and r.pre_shortcut else x
        out = hs if r.shortcut is None else r.shortcut(hs)
        if r.post is not None:
            out = _post_of_input(r.post, out, x)
        if out is x and torch.compiler.is_compiling():
            out = out.view_as(out)
        return self._tie_zero_grads(out, r.params)

    def _active_rows(self, x, r: Residual, idx: torch.Tensor, s: Optional[float]):
        # idx: the survivors' rows, known on the host without a device sync (design §2)
        if torch.compiler.is_compiling():
            # row_path chose "rows": at least min_rows survivors. Unbounded, the unbacked
            # count times the spatial sizes might be 1 to Dynamo, and BatchNorm's check of
            # its batch size becomes a graph break inside the branch.
            torch._check(idx.shape[0] >= self._min_rows)
        if r.pre is not None and r.pre_shortcut:
            h, sc = r.inputs(x)
            hk = gather_rows(h, idx)
        else:
            sc = x if r.shortcut is None else r.shortcut(x)
            xk = gather_rows(x, idx)
            hk = xk if r.pre is None else r.pre(xk)
        f = r.branch(hk, *[gather_rows(a, idx) for a in r.row_args])
        # under compile dim 0 is the unbacked survivor count: compared from dim 1 there
        if (f.dim() != sc.dim() or f.shape[1:] != sc.shape[1:]
                or (not torch.compiler.is_compiling() and f.shape[0] != idx.shape[0])):
            f = _broadcast_rows(f, sc, idx.shape[0])
        dt = torch.promote_types(sc.dtype, f.dtype)
        out = add_rows(sc.to(dt), idx, f.to(dt), s)
        return out if r.post is None else r.post(out)

    def _mask_forward(self, x, r: Residual, keep: torch.Tensor, s: Optional[float]):
        # torchvision / timm: compute everything, then multiply by the mask.
        h, sc = r.inputs(x)
        f = reference.mask_multiply(r.branch(h, *r.row_args), keep, 1.0 if s is None else s)
        return r.combine(sc, f, None)


class StochasticDepth(GatedResidual):
    """Real stochastic depth around any residual branch:
    ``activation(shortcut(x) + s * branch(x))``.

    ``branch``: the residual branch module; ``shortcut``: a module or None (identity);
    ``activation``: applied after the add, or None (pre-activation ResNets and
    transformer blocks add only). Dropped residuals (batch mode) and dropped rows (row
    mode) run the shortcut only; see :mod:`sdkernels.residual` for the rule::

        block = sdkernels.StochasticDepth(nn.Sequential(norm, attn), survival_prob=0.9,
                                          mode="row", scaling="train")
    """

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None,
                 activation: nn.Module | None = None, *, survival_prob: float = 1.0,
                 mode: str = "batch", scaling: str = "test",
                 gate_generator: GateGenerator | None = None, dropped_grads: str = "auto",
                 drop_impl: str = "skip"):
        super().__init__()
        for what, m in (("branch", branch), ("shortcut", shortcut),
                        ("activation", activation)):
            if m is not None and not callable(m):
                raise TypeError(f"StochasticDepth: {what} must be a module or callable, "
                                f"got {type(m).__name__}")
        if branch is None:
            raise TypeError("StochasticDepth: branch is required")
        self.branch = branch
        self.shortcut = shortcut
        self.activation = activation
        self._init_gate(survival_prob, mode, scaling, gate_generator, dropped_grads, drop_impl)
        bn = branch_has_batchnorm([branch])
        self.min_rows, self.per_sample_branch = (2, False) if bn else (1, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sc = self.shortcut
        return self.gated(x, Residual(
            self.branch, None if isinstance(sc, nn.Identity) else sc, self.activation,
            params=self.branch.parameters if isinstance(self.branch, nn.Module) else tuple),
            decide(self, x))


class ResidualGate(GatedResidual):
    """The gate of one residual inside a converted block (``sdkernels.families``).

    It sits where the block's drop path sat (``drop_path1``, ``stochastic_depth``...),
    has no parameters (the state_dict keeps its keys) and is called by the block's
    forward as ``gate(x, decide(gate, x), Residual(...))``.
    """

    def __init__(self, survival_prob: float = 1.0, mode: str = "batch",
                 scaling: str = "test", gate_generator: GateGenerator | None = None,
                 dropped_grads: str = "auto", drop_impl: str = "skip"):
        super().__init__()
        self._init_gate(survival_prob, mode, scaling, gate_generator, dropped_grads, drop_impl)

    def forward(self, x: torch.Tensor, decision: tuple | None,
                residual: Residual) -> torch.Tensor:
        return self.gated(x, residual, decision)
