"""Gate sampling on the host, from a generator the library owns.

Gates decide which residual blocks (batch mode) or which samples of a block (row mode)
run in a training step. They are drawn on the CPU from a ``torch.Generator`` held by a
:class:`GateGenerator`, never from the global RNG and never on the device, so that

* drawing costs no device synchronisation (the decision to skip a block must be known
  on the host before any kernel of that block is launched);
* the sequence is reproducible from a seed and does not shift when user code consumes
  the global RNG (data augmentation, dropout elsewhere);
* every rank of a distributed job that uses the same seed draws the same gates;
* the state can be saved and restored for an exact resume.

A model made by :func:`sdkernels.convert` or :func:`sdkernels.models.cifar_resnet`
shares one generator between all of its blocks; blocks built by hand use the library's
default generator unless given one (see :func:`manual_seed`).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "GateGenerator",
    "FixedGates",
    "default_generator",
    "manual_seed",
    "generators_of",
    "gate_state",
    "load_gate_state",
]


class GateGenerator:
    """A seedable host-side source of Bernoulli gates."""

    def __init__(self, seed: int | None = None):
        self._gen = torch.Generator(device="cpu")
        if seed is None:
            self.initial_seed = self._gen.seed()  # non-deterministic seed from the OS
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                warnings.warn("sdkernels: gate generator without a seed under "
                              "torch.distributed: every rank draws different gates; pass "
                              "the same seed= on every rank", RuntimeWarning, stacklevel=2)
        else:
            self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "GateGenerator":
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self._gen.manual_seed(seed)
        self.initial_seed = seed
        return self

    # The draws are kept out of torch.compile graphs: traced, they would become
    # constants and every step would reuse the gates of the step that was traced.
    @torch.compiler.disable
    def batch(self, p: float) -> bool:
        """One gate for the whole mini-batch: True with probability p."""
        return bool(torch.rand((), generator=self._gen).item() < p)

    @torch.compiler.disable
    def rows(self, p: float, n: int) -> torch.Tensor:
        """One gate per sample: a CPU bool tensor of shape [n]."""
        return torch.rand((n,), generator=self._gen) < p

    def state_dict(self) -> dict:
        return {"initial_seed": self.initial_seed, "state": self._gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        try:
            rng_state = state["state"]
        except (TypeError, KeyError):
            raise ValueError("not a GateGenerator state_dict: expected a dict with 'state'") from None
        self._gen.set_state(rng_state)
        self.initial_seed = state.get("initial_seed", self.initial_seed)

    # torch.Generator cannot be deep-copied or pickled itself; copies of a model
    # (convert(inplace=False), torch.save of a whole model) carry the state instead.
    def __getstate__(self):
        return self.state_dict()

    def __setstate__(self, state):
        self._gen = torch.Generator(device="cpu")
        self.initial_seed = None
        self.load_state_dict(state)

    def __deepcopy__(self, memo):
        new = GateGenerator.__new__(GateGenerator)
        new.__setstate__(self.__getstate__())
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
        return torch.full((n,), self.active, dtype=torch.bool)

    def __reduce__(self):
        return (FixedGates, (self.active,))

    def __deepcopy__(self, memo):
        return FixedGates(self.active)

    def __repr__(self):
        return f"FixedGates(active={self.active})"


_default = GateGenerator()


def default_generator() -> GateGenerator:
    """The generator used by blocks that were not given one."""
    return _default


def manual_seed(seed: int) -> GateGenerator:
    """Seed the library's default gate generator (not torch's global RNG)."""
    return _default.manual_seed(seed)


def generators_of(model: nn.Module) -> list[GateGenerator]:
    """The distinct gate generators used by the stochastic-depth blocks of ``model``,
    in the order their first block appears."""
    from .blocks import StochasticDepthBlock

    seen: dict[int, GateGenerator] = {}
    for m in model.modules():
        if isinstance(m, StochasticDepthBlock):
            g = m.gate_generator or _default
            seen.setdefault(id(g), g)
    return list(seen.values())


def gate_state(model: nn.Module) -> list[dict]:
    """Everything needed to resume the gate sequence of ``model`` exactly."""
    return [g.state_dict() for g in generators_of(model)]


def load_gate_state(model: nn.Module, state: list[dict]) -> None:
    """Restore what :func:`gate_state` returned (on the same model architecture)."""
    gens = generators_of(model)
    if len(gens) != len(state):
        raise ValueError(f"gate state holds {len(state)} generators, model uses {len(gens)}")
    for g, s in zip(gens, state):
        g.load_state_dict(s)
