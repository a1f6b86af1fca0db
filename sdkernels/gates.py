"""Gate sampling on the host, from a generator the library owns.

Gates decide which residual blocks (batch mode) or which samples of a block (row mode)
run in a training step. They are drawn on the CPU from a ``torch.Generator`` held by a
:class:`GateGenerator`, never from the global RNG and never on the device, so that

* drawing costs no device synchronisation (the decision to skip a block must be known
  on the host before any kernel of that block is launched);
* the sequence is reproducible from a seed and does not shift when user code consumes
  the global RNG (data augmentation, dropout elsewhere);
* every rank of a data-parallel job that uses the same seed draws the same step: the
  same batch gates, and row gates for the global batch, of which each rank takes its own
  rows (ranks train different samples, and a sample's gate must not repeat on every
  rank). This holds while the ranks' local batches are equal (``DistributedSampler``
  pads them so): a rank with another row count consumes the generator differently and
  draws its own batch gates from then on;
* the state can be saved and restored for an exact resume.

Draws and the host arithmetic on drawn gates (:func:`survivors`) run with PyTorch's
dispatch modes switched off: under ``FakeTensorMode`` (the dry run of the CUDA paths,
``sdkernels.bench.dryrun``) or any other mode they still consume the real generator
exactly as an ordinary step does, and return real host values, so a dry run neither
fails on ``.item()`` nor shifts the gate sequence.

A model made by :func:`sdkernels.convert` or :func:`sdkernels.models.cifar_resnet`
shares one generator between all of its blocks; blocks built by hand use the library's
default generator unless given one (see :func:`manual_seed`).

Gates per step (design §2). Blocks ask :meth:`GateGenerator.gate` for their gate. All
the gates of one training forward are drawn at once, with one host draw, when the first
block of that forward asks (a model whose blocks were bound with :meth:`GateGenerator.bind`
gets a [blocks, rows x data-parallel world size] uniform matrix; each block compares
its row, or this rank's columns of it, with its own p_l). A
block that asks again while autograd is running a backward pass is being recomputed
(activation checkpointing: ``torch.utils.checkpoint`` reentrant or not,
``checkpoint_sequential``, timm's ``set_grad_checkpointing``) and gets the gate it had in
the forward, so the recomputation runs the same network. A block that asks again outside
a backward pass starts the next step. The last step's gates stay readable
(:func:`gate_record`).

Several forwards before one backward (two views through one encoder, a gradient
penalty): the generator keeps the last steps, each with the autograd sequence number at
which every block asked for its gate. A recomputation runs while the engine executes a
node that the forward created next to that ask (the reentrant checkpoint's own node,
numbered just before it; or, without reentrance, a node of the block whose saved tensor
is being unpacked, numbered after it), so the step whose ask is nearest that node's
number is the forward being replayed; other forwards' asks are a whole forward away.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch._ops import _len_torch_dispatch_stack_pre_dispatch
from torch.utils._python_dispatch import _disable_current_modes

__all__ = [
    "GateGenerator",
    "FixedGates",
    "default_generator",
    "manual_seed",
    "generators_of",
    "gate_state",
    "load_gate_state",
    "survivors",
    "gate_record",
    "recomputing",
]


def recomputing() -> bool:
    """True while the autograd engine runs a backward pass: a block's forward there is a
    recomputation (activation checkpointing)."""
    return torch._C._current_graph_task_id() != -1


_in_backward = recomputing


class _Step:
    """The gates of one training forward: a uniform matrix drawn once, and what each
    block took from it."""

    __slots__ = ("uniforms", "gates", "asks", "rows", "shard")

    def __init__(self, uniforms, rows=1, shard=(0, 1)):
        # [bound blocks, rows x world size] CPU float tensor, or None; rank r's row gates
        # are the columns r * rows : (r + 1) * rows
        self.uniforms = uniforms
        self.rows, self.shard = rows, shard
        self.gates: dict = {}     # block key -> bool (batch) or CPU bool tensor (rows)
        self.asks: dict = {}      # block key -> autograd sequence number at its ask


# Steps kept for recomputation: forwards that may still be waiting for their backward.
_STEPS_KEPT = 16


def _recomputed_step(steps, key):
    """The step whose forward a recomputation inside a backward pass replays."""
    having = [s for s in steps if key in s.gates]
    if not having:
        return None
    node = torch._C._current_autograd_node()
    if node is None:  # no node to go by: the latest forward
        return having[-1]
    t = node._sequence_nr() + 0.5  # + 0.5: no ties between an ask before and one after
    return min(reversed(having), key=lambda s: abs(t - s.asks[key]))


def _host():
    """No dispatch mode (FakeTensorMode, a recorder...) sees host-side gate work: gates
    are real host values whatever mode the model runs under. With no mode active (the
    common case) there is nothing to switch off: popping and restoring the mode stacks
    costs a few microseconds on every gate, host time between the step's kernels."""
    if not torch._C._len_torch_dispatch_stack() and not _len_torch_dispatch_stack_pre_dispatch():
        return contextlib.nullcontext()
    return _disable_current_modes()


class GateGenerator:
    """A seedable host-side source of Bernoulli gates."""

    def __init__(self, seed: int | None = None, shard: tuple[int, int] | None = None):
        self._gen = torch.Generator(device="cpu")
        self.shard = shard
        if seed is None:
            self.initial_seed = self._gen.seed()  # non-deterministic seed from the OS
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                warnings.warn("sdkernels: gate generator without a seed under "
                              "torch.distributed: every rank draws different gates; pass "
                              "the same seed= on every rank", RuntimeWarning, stacklevel=2)
        else:
            self.manual_seed(seed)
        self._bound = 0
        self._steps: list[_Step] = []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a subclass that draws its own way (overrides batch/rows, as FixedGates does)
        # keeps being asked through them
        cls._own_draws = (cls.batch is not GateGenerator.batch
                          or cls.rows is not GateGenerator.rows)

    _own_draws = False

    @property
    def shard(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` of this process in data parallelism: its row gates are
        that rank's rows of the step's draw. None (the default): the default process
        group's rank and size, ``(0, 1)`` without one. Set it where those are not the
        data-parallel ones (tensor or context parallel peers see the same samples and
        must draw the same rows: give them their data-parallel rank), or to reproduce a
        rank's gates in one process. It belongs to the process: copies in the same
        process keep it, pickles do not."""
        return self._shard

    @shard.setter
    def shard(self, value):
        if value is not None:
            ok = (isinstance(value, tuple) and len(value) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                  and 0 <= value[0] < value[1])
            if not ok:
                raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < "
                                 f"world_size, got {value!r}")
        self._shard = value

    def _rank_world(self) -> tuple[int, int]:
        if self._shard is not None:
            return self._shard
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def manual_seed(self, seed: int) -> "GateGenerator":
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self._gen.manual_seed(seed)
        self.initial_seed = seed
        self._steps = []
        return self

    def bind(self, blocks) -> None:
        """Number ``blocks`` (in forward order) so that a step draws all their gates at
        once; each block's key becomes its position. Called by ``convert`` and the
        model builders; blocks left unbound draw their own gate when they first ask."""
        blocks = list(blocks)
        for i, b in enumerate(blocks):
            b._gate_key = i
        self._bound = len(blocks)
        self._steps = []

    @torch.compiler.disable
    def gate(self, key, p: float, rows: int | None = None):
        """The gate of block ``key`` in the current training forward.

        ``rows=None``: one gate for the mini-batch (a bool); else a CPU bool tensor with
        one gate per row. The first ask of a forward draws the whole step; an ask from a
        block that already has its gate is a recomputation inside a backward pass (the
        same gate again) or else the start of the next step.
        """
        if self._own_draws:
            return self.batch(p) if rows is None else self.rows(p, rows)
        with _host():
            if _in_backward():
                # a recomputation (activation checkpointing): the forward's own gate
                step = _recomputed_step(self._steps, key)
                if step is not None:
                    return step.gates[key]
                # a block first run inside a backward pass: an ordinary ask
            step = self._steps[-1] if self._steps else None
            if step is None or key in step.gates:
                n, shard = 1, (0, 1)
                if rows is not None:
                    n, shard = max(int(rows), 1), self._rank_world()
                u = self._rand(self._bound, n * shard[1]) if self._bound else None
                step = _Step(u, n, shard)
                self._steps = self._steps[-(_STEPS_KEPT - 1):] + [step]
            g = step.gates.get(key)
            if g is None:
                g = step.gates[key] = self._decide(step, key, p, rows)
                step.asks[key] = torch._C._autograd._get_sequence_nr()
            return g

    def _rand(self, *shape) -> torch.Tensor:
        # device="cpu" whatever the default device (a ``with torch.device(...)`` block):
        # gates are host values, drawn from this CPU generator
        return torch.rand(shape, generator=self._gen, device="cpu")

    def _decide(self, step, key, p, rows):
        u = step.uniforms
        shard = None if rows is None else self._rank_world()
        if isinstance(key, int) and u is not None and key < u.shape[0]:
            if rows is None:
                return bool(u[key, 0].item() < p)  # the same on every rank
            # drawn for these rows on this shard (a step first asked by a batch gate
            # was drawn for one row and no shard)
            if rows == step.rows and shard == step.shard:
                return u[key, shard[0] * rows:(shard[0] + 1) * rows] < p
        # unbound block, or a row count the step was not drawn for: a draw of its own
        if rows is None:
            return bool(self._rand().item() < p)
        rank, world = shard
        u = self._rand(rows * world)
        return u[rank * rows:(rank + 1) * rows] < p

    def last_step(self) -> dict:
        """Block key -> gate of the latest training forward (empty before the first)."""
        return dict(self._steps[-1].gates) if self._steps else {}

    # The draws are kept out of torch.compile graphs: traced, they would become
    # constants and every step would reuse the gates of the step that was traced.
    @torch.compiler.disable
    def batch(self, p: float) -> bool:
        """One gate for the whole mini-batch: True with probability p."""
        with _host():
            return bool(self._rand().item() < p)

    @torch.compiler.disable
    def rows(self, p: float, n: int) -> torch.Tensor:
        """One gate per sample: a CPU bool tensor of shape [n]."""
        with _host():
            return self._rand(n) < p

    def state_dict(self) -> dict:
        return {"initial_seed": self.initial_seed, "state": self._gen.get_state(),
                "bound": self._bound}

    def load_state_dict(self, state: dict) -> None:
        try:
            rng_state = state["state"]
        except (TypeError, KeyError):
            raise ValueError("not a GateGenerator state_dict: expected a dict with 'state'") from None
        self._gen.set_state(rng_state)
        self.initial_seed = state.get("initial_seed", self.initial_seed)
        self._steps = []  # a resumed run starts a fresh step

    # torch.Generator cannot be deep-copied or pickled itself; copies of a model
    # (convert(inplace=False), torch.save of a whole model) carry the state instead.
    def __getstate__(self):
        return self.state_dict()

    def __setstate__(self, state):
        self._gen = torch.Generator(device="cpu")
        self._shard = None
        self.initial_seed = None
        self._bound = state.get("bound", 0) if isinstance(state, dict) else 0
        self._steps = []
        self.load_state_dict(state)

    def __deepcopy__(self, memo):
        new = GateGenerator.__new__(GateGenerator)
        new.__setstate__(self.__getstate__())
        new._shard = self._shard  # same process
        memo[id(self)] = new
        return new

    def __repr__(self):
        return f"GateGenerator(initial_seed={self.initial_seed})"


class FixedGates(GateGenerator):
    """Gates that are always ``active`` (True) or always dropped (False).

    For calibration and tests: e.g. timing a network with chosen blocks forced off.
    """

    def __init__(self, active: bool):
        super().__init__(seed=0)
        self.active = bool(active)

    @torch.compiler.disable
    def batch(self, p: float) -> bool:
        return self.active

    @torch.compiler.disable
    def rows(self, p: float, n: int) -> torch.Tensor:
        with _host():
            return torch.full((n,), self.active, dtype=torch.bool, device="cpu")

    def __reduce__(self):
        return (FixedGates, (self.active,))

    def __deepcopy__(self, memo):
        return FixedGates(self.active)

    def __repr__(self):
        return f"FixedGates(active={self.active})"


@torch.compiler.disable
def survivors(keep: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(number of surviving rows, their indices as a CPU int64 tensor) of row gates.

    ``keep`` is a host (CPU) bool tensor from :meth:`GateGenerator.rows`: both answers
    are known on the host without touching the device.
    """
    with _host():
        if keep.device.type != "cpu":
            raise ValueError(f"row gates must be a CPU tensor (drawn on the host), got "
                             f"one on {keep.device}")
        # a tensor of its own, not a view of nonzero's [n, 1] result: torch.compile
        # marks the indices' size unbacked, and a view's base would still be guarded on
        # (a one-survivor step then compiled a graph of its own)
        idx = keep.nonzero().squeeze(1).clone()
        return idx.numel(), idx


_default = GateGenerator()


def default_generator() -> GateGenerator:
    """The generator used by blocks that were not given one."""
    return _default


def manual_seed(seed: int) -> GateGenerator:
    """Seed the library's default gate generator (not torch's global RNG)."""
    return _default.manual_seed(seed)


def _gated(model: nn.Module):
    """The modules of ``model`` that draw gates: those with ``gate_generator`` and
    ``last_gate`` (the stochastic-depth blocks). Checked by attribute, so that this
    module stays below ``blocks`` (design §3)."""
    return [m for m in model.modules()
            if hasattr(m, "gate_generator") and hasattr(m, "last_gate")]


def generators_of(model: nn.Module) -> list[GateGenerator]:
    """The distinct gate generators used by the stochastic-depth blocks of ``model``,
    in the order their first block appears."""
    seen: dict[int, GateGenerator] = {}
    for m in _gated(model):
        g = m.gate_generator or _default
        seen.setdefault(id(g), g)
    return list(seen.values())


def gate_state(model: nn.Module) -> list[dict]:
    """Everything needed to resume the gate sequence of ``model`` exactly."""
    return [g.state_dict() for g in generators_of(model)]


def load_gate_state(model: nn.Module, state: list[dict]) -> None:
    """Restore what :func:`gate_state` returned (on the same model architecture)."""
    if not isinstance(state, (list, tuple)):
        raise TypeError(f"load_gate_state expects the list that gate_state(model) returned, "
                        f"got {type(state).__name__}")
    gens = generators_of(model)
    if len(gens) != len(state):
        raise ValueError(f"gate state holds {len(state)} generators, model uses {len(gens)}")
    for g, s in zip(gens, state):
        g.load_state_dict(s)


def gate_record(model: nn.Module) -> list:
    """The gates of ``model``'s latest training forward, one per stochastic-depth block in
    module order (forward order for ResNets): a bool (batch mode: did the block run), a CPU bool tensor (row mode:
    which rows ran) or None (the block has not trained yet). For logging."""
    return [m.last_gate for m in _gated(model)]
