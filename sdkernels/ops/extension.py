"""The compiled ops (``torch.ops.sdkernels.*``): loading, fake kernels and autograd.

Importing this module loads ``sdkernels._C`` (through :mod:`sdkernels.availability`). Loading the library registers the
ops' schemas and their CPU (and, when built, CUDA) kernels with the dispatcher; this
module then registers, in Python, a fake kernel for every op (so ``torch.compile`` and
``torch.library.opcheck`` can trace them) and the autograd formula of the forward op.

When the library cannot be loaded (not built, built against another torch, ...) nothing
is registered, ``is_available()`` is False and ``unavailable_reason()`` says why; the
import of ``sdkernels`` itself never fails because of it.

Autograd: scale_bias_add_relu and scale_bias_relu are differentiable (first order; the
backward op has a formula that raises, so double backward is a clear error). The
training-BN ops bn_stats, relu_bn_backward_reduce and bn_backward_apply are building
blocks of a hand-written backward and are not differentiable: they run with inputs that
require grad, but backpropagating through them raises (their Autograd kernel is
registered in C++, see csrc/cpu/batch_norm.cpp).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import availability as _availability
from .reference import layout_of

__all__ = [
    "is_available",
    "unavailable_reason",
    "built_with_cuda",
    "library_path",
    "scale_bias_add_relu",
    "scale_bias_add_relu_backward",
    "bn_stats",
    "scale_bias_relu",
    "relu_bn_backward_reduce",
    "bn_backward_apply",
    "scale_bias_relu_",
    "has_branch_ops",
    "residual_branch_forward",
    "residual_branch_backward",
]

_FWD = "sdkernels::scale_bias_add_relu"
_BWD = "sdkernels::scale_bias_add_relu_backward"
_STATS = "sdkernels::bn_stats"
_SBR = "sdkernels::scale_bias_relu"
_REDUCE = "sdkernels::relu_bn_backward_reduce"
_APPLY = "sdkernels::bn_backward_apply"
_RELAYOUT = "sdkernels::relayout"
_SBR_INPLACE = "sdkernels::scale_bias_relu_"
_BRANCH_FWD = "sdkernels::residual_branch_forward"
_BRANCH_BWD = "sdkernels::residual_branch_backward"
_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
                torch.float16: "Half", torch.int32: "Int", torch.int64: "Long",
                torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
                torch.bool: "Bool", torch.complex64: "ComplexFloat",
                torch.complex128: "ComplexDouble"}

# Loading the library is sdkernels.availability's (below backends, design §3).
unavailable_reason = _availability.extension_missing
built_with_cuda = _availability.extension_has_cuda


def is_available() -> bool:
    """True when the compiled library loaded and its ops are registered."""
    return _availability.extension_library() is not None


def library_path() -> Optional[str]:
    """File path of the loaded ``sdkernels._C`` library, or None."""
    lib = _availability.extension_library()
    return getattr(lib, "__file__", None) if lib is not None else None


def _require() -> None:
    if _availability.extension_library() is None:
        raise RuntimeError(f"sdkernels compiled extension is not available: "
                           f"{_availability.extension_missing()}")


def scale_bias_add_relu(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                        residual: torch.Tensor) -> torch.Tensor:
    """relu(x * scale[c] + bias[c] + residual), x of shape [N, C, *] (compiled op).

    Differentiable in all four inputs (first order only). The output has x's suggested
    memory format (channels_last in, channels_last out).
    """
    _require()
    return torch.ops.sdkernels.scale_bias_add_relu(x, scale, bias, residual)


def scale_bias_add_relu_backward(grad_out: torch.Tensor, out: torch.Tensor,
                                 x: torch.Tensor, scale: torch.Tensor):
    """(grad_x, grad_scale, grad_bias, grad_residual) of :func:`scale_bias_add_relu`."""
    _require()
    return torch.ops.sdkernels.scale_bias_add_relu_backward(grad_out, out, x, scale)


def bn_stats(x: torch.Tensor, running_mean: Optional[torch.Tensor],
             running_var: Optional[torch.Tensor], momentum: float, eps: float):
    """(mean, invstd) of x [N, C, *] per channel; updates the running statistics in place.

    As ``F.batch_norm(training=True)``: biased variance for invstd, unbiased for
    running_var. Statistics are float32 (float64 for float64 x). Not differentiable.
    """
    _require()
    return torch.ops.sdkernels.bn_stats(x, running_mean, running_var, momentum, eps)


def scale_bias_relu(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """relu(x * scale[c] + bias[c]) (compiled op); differentiable in x, scale and bias."""
    _require()
    return torch.ops.sdkernels.scale_bias_relu(x, scale, bias)


def relu_bn_backward_reduce(grad_out: torch.Tensor, out: Optional[torch.Tensor],
                            y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                            want_dy: bool):
    """(sum_dy, sum_dy_xhat, dy or an empty tensor): BN-backward sums behind a ReLU.

    dy = grad_out where out > 0 (all of grad_out when out is None). Not differentiable.
    """
    _require()
    return torch.ops.sdkernels.relu_bn_backward_reduce(grad_out, out, y, mean, invstd,
                                                       want_dy)


def bn_backward_apply(grad_out: torch.Tensor, out: Optional[torch.Tensor], y: torch.Tensor,
                      mean: torch.Tensor, invstd: torch.Tensor,
                      weight: Optional[torch.Tensor], sum_dy: torch.Tensor,
                      sum_dy_xhat: torch.Tensor) -> torch.Tensor:
    """grad_y = weight * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M).

    Not differentiable.
    """
    _require()
    return torch.ops.sdkernels.bn_backward_apply(grad_out, out, y, mean, invstd, weight,
                                                 sum_dy, sum_dy_xhat)


def scale_bias_relu_(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                     residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu(x * scale[c] + bias[c] (+ residual)) written into x; returns x. Not
    differentiable (the folded eval epilogue, design §5)."""
    _require()
    torch.ops.sdkernels.scale_bias_relu_(x, scale, bias, residual)
    return x


def has_branch_ops() -> bool:
    """True when the loaded library has the whole-branch training ops (CPU builds since
    they were added; an older build lacks them)."""
    return is_available() and hasattr(torch.ops.sdkernels, "residual_branch_forward")


def residual_branch_forward(x, residual, weights, bn_weights, bn_biases, running_means,
                            running_vars, strides, paddings, dilations, groups, momentums,
                            eps, gate_scale):
    """(out, saved) of a whole residual branch in training (csrc/cpu/residual_branch.cpp).

    Not differentiable: ``ops.fused_block`` is its autograd. Conv settings are flattened
    per stage (two values each for stride, padding, dilation).
    """
    _require()
    return torch.ops.sdkernels.residual_branch_forward(
        x, residual, weights, bn_weights, bn_biases, running_means, running_vars, strides,
        paddings, dilations, groups, momentums, eps, gate_scale)


def residual_branch_backward(grad_out, x, out, saved, weights, bn_weights, bn_biases,
                             strides, paddings, dilations, groups, gate_scale,
                             identity_residual, output_mask):
    """(grad_x, grad_residual, grad_weights, grad_gammas, grad_betas) of
    :func:`residual_branch_forward`; entries not asked for in ``output_mask`` are empty."""
    _require()
    return torch.ops.sdkernels.residual_branch_backward(
        grad_out, x, out, saved, weights, bn_weights, bn_biases, strides, paddings,
        dilations, groups, gate_scale, identity_residual, output_mask)


# ---------------------------------------------------------------------------------------
# Shape/dtype checks of the fake kernels: the same conditions and messages as the C++
# checks (csrc/sdkernels.cpp), so traced code fails the way eager code does.

def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _check(cond, op: str, msg) -> None:
    torch._check(cond, lambda: f"{op}: {msg()}")


def _check_x(op: str, x: torch.Tensor) -> None:
    _check(x.layout == torch.strided, op,
           lambda: f"expected x to be a strided (dense) tensor, got layout {x.layout}")
    _check(x.dtype in _SUPPORTED, op,
           lambda: "expected x to be float32, float64, bfloat16 or float16, got "
                   f"{_dtype_name(x.dtype)}")
    _check(x.dim() >= 2, op,
           lambda: f"expected x of shape [N, C, *] (at least 2-D), got a {x.dim()}-D "
                   f"tensor of shape {list(x.shape)}")


def _check_like_x(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    _check(t.device == x.device, op,
           lambda: f"expected {name} on the same device as x ({x.device}), got {t.device}")
    _check(t.dtype == x.dtype, op,
           lambda: f"expected {name} to have x's dtype ({_dtype_name(x.dtype)}), got "
                   f"{_dtype_name(t.dtype)}")
    _check(t.dim() == x.dim() and all(a == b for a, b in zip(t.shape, x.shape)), op,
           lambda: f"expected {name} to have x's shape {list(x.shape)}, got {list(t.shape)}")


def _check_per_channel(op: str, name: str, v: torch.Tensor, x: torch.Tensor) -> None:
    _check(v.device == x.device, op,
           lambda: f"expected {name} on the same device as x ({x.device}), got {v.device}")
    _check(v.dim() == 1, op,
           lambda: f"expected {name} to be 1-D of length C = {x.shape[1]}, got a "
                   f"{v.dim()}-D tensor of shape {list(v.shape)}")
    _check(v.shape[0] == x.shape[1], op,
           lambda: f"expected {name} of length C = {x.shape[1]} (x.shape[1]), got length "
                   f"{v.shape[0]}")
    _check(v.dtype == x.dtype or v.dtype == torch.float32, op,
           lambda: f"expected {name} to have x's dtype ({_dtype_name(x.dtype)}) or "
                   f"float32, got {_dtype_name(v.dtype)}")


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_stat(op: str, name: str, v: torch.Tensor, x: torch.Tensor) -> None:
    _check_per_channel(op, name, v, x)
    want = _stats_dtype(x)
    _check(v.dtype == want, op,
           lambda: f"expected {name} to be {_dtype_name(want)} (the statistics dtype for "
                   f"{_dtype_name(x.dtype)} x), got {_dtype_name(v.dtype)}")


def _check_scale_bias(op: str, scale: torch.Tensor, bias: torch.Tensor,
                      x: torch.Tensor) -> None:
    _check_per_channel(op, "scale", scale, x)
    _check_per_channel(op, "bias", bias, x)
    _check(bias.dtype == scale.dtype, op,
           lambda: "expected scale and bias to have the same dtype, got "
                   f"{_dtype_name(scale.dtype)} and {_dtype_name(bias.dtype)}")


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # Mirrors at::Tensor::suggest_memory_format() used by the kernels.
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(x)


# ---------------------------------------------------------------------------------------
# Registration (only when the library loaded).

def _register() -> None:
    @torch.library.register_fake(_FWD)
    def _scale_bias_add_relu_fake(x, scale, bias, residual):
        _check_x(_FWD, x)
        _check_like_x(_FWD, "residual", residual, x)
        _check_per_channel(_FWD, "scale", scale, x)
        _check_per_channel(_FWD, "bias", bias, x)
        _check(bias.dtype == scale.dtype, _FWD,
               lambda: "expected scale and bias to have the same dtype, got "
                       f"{_dtype_name(scale.dtype)} and {_dtype_name(bias.dtype)}")
        return torch.empty_like(x, memory_format=_memory_format(x))

    @torch.library.register_fake(_BWD)
    def _scale_bias_add_relu_backward_fake(grad_out, out, x, scale):
        _check_x(_BWD, x)
        _check_like_x(_BWD, "grad_out", grad_out, x)
        _check_like_x(_BWD, "out", out, x)
        _check_per_channel(_BWD, "scale", scale, x)
        fmt = _memory_format(x)
        return (torch.empty_like(x, memory_format=fmt), scale.new_empty(scale.shape),
                scale.new_empty(scale.shape), torch.empty_like(x, memory_format=fmt))

    def _setup_context(ctx, inputs, output):
        x, scale, bias, residual = inputs
        # The backward op needs out (ReLU mask), x (grad_scale) and scale (grad_x).
        ctx.save_for_backward(output, x, scale)

    def _backward(ctx, grad):
        out, x, scale = ctx.saved_tensors
        grad_x, grad_scale, grad_bias, grad_residual = (
            torch.ops.sdkernels.scale_bias_add_relu_backward(grad, out, x, scale))
        need = ctx.needs_input_grad
        return (grad_x if need[0] else None,
                grad_scale if need[1] else None,
                grad_bias if need[2] else None,
                grad_residual if need[3] else None)

    torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)

    def _no_double_backward(ctx, *grads):
        raise RuntimeError(
            f"{_BWD}: double backward (differentiating the gradient of "
            f"{_FWD}) is not supported")

    def _setup_backward_context(ctx, inputs, output):
        pass

    torch.library.register_autograd(_BWD, _no_double_backward,
                                    setup_context=_setup_backward_context)

    _register_bn_ops()


def _register_bn_ops() -> None:
    """Fake kernels and autograd of bn_stats, scale_bias_relu and the BN-backward ops."""

    @torch.library.register_fake(_STATS)
    def _bn_stats_fake(x, running_mean, running_var, momentum, eps):
        _check_x(_STATS, x)
        _check((running_mean is None) == (running_var is None), _STATS,
               lambda: "expected running_mean and running_var to be both given or both None")
        if running_mean is not None:
            _check_per_channel(_STATS, "running_mean", running_mean, x)
            _check_per_channel(_STATS, "running_var", running_var, x)
            _check(running_mean.is_contiguous() and running_var.is_contiguous(), _STATS,
                   lambda: "expected contiguous running_mean and running_var (updated in "
                           "place)")
        _check(0.0 <= momentum <= 1.0, _STATS,
               lambda: f"expected momentum in [0, 1], got {momentum:g}")
        _check(eps > 0.0, _STATS, lambda: f"expected eps > 0, got {eps:g}")
        c = x.shape[1]
        dt = _stats_dtype(x)
        return x.new_empty((c,), dtype=dt), x.new_empty((c,), dtype=dt)

    @torch.library.register_fake(_SBR)
    def _scale_bias_relu_fake(x, scale, bias):
        _check_x(_SBR, x)
        _check_scale_bias(_SBR, scale, bias, x)
        return torch.empty_like(x, memory_format=_memory_format(x))

    def _check_backward_inputs(op, grad_out, out, y, mean, invstd):
        _check_x(op, y)
        _check_like_x(op, "grad_out", grad_out, y)
        if out is not None:
            _check_like_x(op, "out", out, y)
        _check_stat(op, "mean", mean, y)
        _check_stat(op, "invstd", invstd, y)

    @torch.library.register_fake(_REDUCE)
    def _relu_bn_backward_reduce_fake(grad_out, out, y, mean, invstd, want_dy):
        _check_backward_inputs(_REDUCE, grad_out, out, y, mean, invstd)
        c = y.shape[1]
        dy = (torch.empty_like(y, memory_format=_memory_format(y)) if want_dy
              else y.new_empty((0,)))
        return mean.new_empty((c,)), mean.new_empty((c,)), dy

    @torch.library.register_fake(_APPLY)
    def _bn_backward_apply_fake(grad_out, out, y, mean, invstd, weight, sum_dy,
                                sum_dy_xhat):
        _check_backward_inputs(_APPLY, grad_out, out, y, mean, invstd)
        if weight is not None:
            _check_stat(_APPLY, "weight", weight, y)
        _check_stat(_APPLY, "sum_dy", sum_dy, y)
        _check_stat(_APPLY, "sum_dy_xhat", sum_dy_xhat, y)
        return torch.empty_like(y, memory_format=_memory_format(y))

    # scale_bias_relu: the gradient is scale_bias_add_relu's without grad_residual.
    def _sbr_setup_context(ctx, inputs, output):
        x, scale, bias = inputs
        ctx.save_for_backward(output, x, scale)

    def _sbr_backward(ctx, grad):
        out, x, scale = ctx.saved_tensors
        grad_x, grad_scale, grad_bias, _ = (
            torch.ops.sdkernels.scale_bias_add_relu_backward(grad, out, x, scale))
        need = ctx.needs_input_grad
        return (grad_x if need[0] else None,
                grad_scale if need[1] else None,
                grad_bias if need[2] else None)

    torch.library.register_autograd(_SBR, _sbr_backward, setup_context=_sbr_setup_context)

    # bn_stats, relu_bn_backward_reduce and bn_backward_apply get their (raising)
    # Autograd kernel in C++ (csrc/cpu/batch_norm.cpp): no Python cost per call.

    _register_branch_ops()


def _register_branch_ops() -> None:
    """Fake kernels of relayout and the whole-branch training ops (CPU kernels only).

    Their Autograd kernels (not differentiable) are registered in C++.
    """

    @torch.library.register_fake(_SBR_INPLACE)
    def _scale_bias_relu_inplace_fake(x, scale, bias, residual=None):
        _check_x(_SBR_INPLACE, x)
        _check_scale_bias(_SBR_INPLACE, scale, bias, x)
        if residual is not None:
            _check_like_x(_SBR_INPLACE, "residual", residual, x)

    @torch.library.register_fake(_RELAYOUT)
    def _relayout_fake(x, channels_last):
        _check(x.dim() == 4, _RELAYOUT,
               lambda: f"expected a 4-D tensor [N, C, H, W], got a {x.dim()}-D tensor of "
                       f"shape {list(x.shape)}")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty_like(x, memory_format=fmt)

    def _conv_out(h, w, stride, padding, dilation):
        sizes = [h.shape[0], w.shape[0]]
        for d in range(2):
            k = dilation[d] * (w.shape[2 + d] - 1) + 1
            sizes.append((h.shape[2 + d] + 2 * padding[d] - k) // stride[d] + 1)
        return sizes

    @torch.library.register_fake(_BRANCH_FWD)
    def _branch_forward_fake(x, residual, weights, bn_weights, bn_biases, running_means,
                             running_vars, strides, paddings, dilations, groups, momentums,
                             eps, gate_scale):
        _check_x(_BRANCH_FWD, x)
        _check(x.dim() == 4, _BRANCH_FWD,
               lambda: f"expected a 4-D input [N, C, H, W], got a {x.dim()}-D tensor")
        n = len(weights)
        _check(n > 0 and len(strides) == 2 * n and len(paddings) == 2 * n
               and len(dilations) == 2 * n and len(groups) == n, _BRANCH_FWD,
               lambda: "expected one weight and conv setting per stage")
        ys, h = [], x
        for i, w in enumerate(weights):
            shape = _conv_out(h, w, strides[2 * i:2 * i + 2], paddings[2 * i:2 * i + 2],
                              dilations[2 * i:2 * i + 2])
            h = x.new_empty(shape).contiguous(memory_format=torch.channels_last)
            ys.append(h)
        dt = _stats_dtype(x)
        stats = [x.new_empty((y.shape[1],), dtype=dt) for y in ys]
        out = torch.empty_like(ys[-1], memory_format=_branch_layout(x))
        return out, ys + stats + [s.clone() for s in stats]

    @torch.library.register_fake(_BRANCH_BWD)
    def _branch_backward_fake(grad_out, x, out, saved, weights, bn_weights, bn_biases,
                              strides, paddings, dilations, groups, gate_scale,
                              identity_residual, output_mask):
        _check_x(_BRANCH_BWD, x)
        n = len(weights)
        _check(len(saved) == 3 * n and len(output_mask) == 2 + 3 * n, _BRANCH_BWD,
               lambda: "expected 3 saved tensors and 3 output_mask entries per stage")
        def none():  # a gradient not asked for: a fresh empty tensor each
            return x.new_empty((0,))
        gx = torch.empty_like(x, memory_format=_branch_layout(x)) if output_mask[0] else none()
        gres = (torch.empty_like(out, memory_format=torch.channels_last)
                if output_mask[1] and not identity_residual else none())
        gws, ggs, gbs = [], [], []
        for i in range(n):
            gws.append(torch.empty_like(weights[i]) if output_mask[2 + 3 * i] else none())
            g, b = bn_weights[i], bn_biases[i]
            ggs.append(torch.empty_like(g) if g is not None and output_mask[3 + 3 * i]
                       else none())
            gbs.append(torch.empty_like(b) if b is not None and output_mask[4 + 3 * i]
                       else none())
        return gx, gres, gws, ggs, gbs


def _branch_layout(x: torch.Tensor) -> torch.memory_format:
    # as csrc/cpu/residual_branch.cpp and the Python branch: channels_last only when not
    # also NCHW-contiguous
    return layout_of(x)


_C = _availability.extension_library()
if _C is not None and not getattr(_C, "_sdkernels_python_registered", False):
    # (The marker lives on the extension module, so re-importing or reloading this
    # file does not register twice.)
    try:
        _register()
        _C._sdkernels_python_registered = True
    except Exception as exc:  # e.g. a torch too old for torch.library.register_fake
        _availability.extension_failed(
            f"sdkernels._C loaded but registering its fake/autograd kernels failed: "
            f"{type(exc).__name__}: {exc}")
del _C
