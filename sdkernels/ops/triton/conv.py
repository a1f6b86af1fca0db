"""Fused implicit-GEMM conv2d (NHWC) with a BN-apply prologue and a fused epilogue.

What it fuses (all optional; PROLOGUE is a compile-time flag, the epilogue flags are
runtime arguments: a uniform branch per tile should cost little next to the tile's MMAs
(not yet measured on a GPU), and one compiled variant per dtype x PROLOGUE keeps JIT
time and the static resource check small)::

    x'  = relu(x * pscale[ci] + pshift[ci])          PROLOGUE, on in-bounds inputs only
    acc = conv2d(x', W)                               fp32 accumulation
    sum[co], m2[co] over acc                          STATS (before bias / relu)
    y   = acc + bias[co]                              HAS_BIAS (folded BN bias)
        + residual                                    RES_MODE 1: NHWC tensor, y's shape
        + x0[n, co, oh*rs, ow*rs] if co < C0 else 0   RES_MODE 2: option-A shortcut
    y   = relu(y)                                     RELU

The GEMM view: rows m = (n, oh, ow) over N*Ho*Wo output pixels, columns = output
channels, reduction k = (r, s, ci) over kh*kw*Cin. Each program owns a BLOCK_M x BLOCK_N
output tile and runs ONE flattened loop over the kh*kw*ceil(Cin/BLOCK_K) reduction steps
(so software pipelining spans the whole reduction even when Cin fits one step); per step
it gathers a BLOCK_M x BLOCK_K input tile (one filter tap, a slice of channels) straight
from the NHWC activation with bounds masks (no im2col buffer) and a BLOCK_K x BLOCK_N
weight tile, then ``tl.dot``-accumulates in fp32 (wgmma on sm_90a, mma.sync on sm_80 for
fp16/bf16/tf32). Addresses: one 64-bit base per output row is built before the loop;
each step adds 32-bit scalars and the channel vector (a per-step tile of 64-bit pointers
spilled registers). Programs are numbered column-fastest, so the programs that share an
input tile run together and hit L2. Geometry (kh, kw, stride, padding) is runtime.

Padding: out-of-bounds taps are masked loads (0) and the prologue result is forced back
to 0 there, so padding applies to the post-prologue activation, exactly like
``F.conv2d(relu(bn(x)), padding=...)``. Channels that are not a multiple of 16 (the stem's
Cin = 3, CIFAR's 16 channels at BLOCK 32...) are handled by channel masks.

STATS: the epilogue reduces the fp32 accumulator per output channel over its tile's
rows, writing one partial per tile: the sum, the sum of squares centred on the tile's
mean (``m2 = sum((acc - tile_mean)^2)``) and the tile's row count (the host does not know
the autotuned BLOCK_M; the buffer has ceil(M / smallest BLOCK_M) rows, unused rows have
count 0). A tiny PyTorch step merges them with Chan's parallel formula, counting in
int64. No atomics: for a given config the result is bitwise deterministic, and merging
centred partials avoids most of the cancellation of a plain ``sumsq - sum^2/M``. The
statistics are those of the exact fp32 conv output, not of y after rounding to
fp16/bf16 (PyTorch's BN sees the rounded tensor: the difference is at the rounding
level).

Determinism across processes: the autotuner picks a config by timing, so two processes
(ranks) may pick different configs, i.e. different summation orders (K split, stats
tiles): results then agree to rounding, not bitwise. ``SDKERNELS_TRITON_DETERMINISTIC=1``
or ``torch.use_deterministic_algorithms(True)`` pins the config by a heuristic of the
shape and device (no timing): bitwise reproducible across processes on the same GPU
model, at some speed cost.

dtypes: fp16 and bf16 (fp32 accumulation, output rounded once at the end, so the fused
bias/residual/ReLU round once where eager PyTorch rounds after every op), and fp32.
fp32 on a GPU: ``tl.dot`` runs in TF32 when ``allow_tf32`` is true, which by default
follows ``torch.backends.cudnn.allow_tf32`` (True by default: what ``F.conv2d`` does
on cuDNN); ``allow_tf32=False`` gives IEEE fp32 ("ieee" input precision). Under the
Triton interpreter every dtype is computed exactly in fp32 (numpy).

Limits: groups = 1, dilation = 1, 2-D only; any kh, kw, stride, padding (per axis);
the residual of option A is read, never materialised. Offsets inside one image (x, y,
residual), in the weight and N*Ho*Wo must stay below 2^31 elements (32-bit; checked,
ValueError); offsets between images and into y are 64-bit.

Resources: every config of the GPU list compiles for sm_90a and sm_80 without register
spills and within shared memory, for every variant the launcher compiles:
``tools/gpu_static_report.py`` checks this without a GPU. Configs are pruned per call by
the device's opt-in shared memory per block (read from the device).

Layout: activations are NHWC (``torch.channels_last``); any input layout is accepted
and converted (also the residual: the kernel reads channels with stride 1, so an NCHW
residual costs a copy); the output is channels_last. The weight is used as channels_last
([Cout, kh, kw, Cin] in memory), a no-op copy for 1x1 convs.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

import triton
import triton.language as tl

__all__ = ["conv2d_fused", "conv2d_fused_reference", "check_autotune_configs",
           "AUTOTUNE_CONFIGS", "INTERPRET", "OP_NAME", "aot_variants", "config_selectable",
           "smem_estimate", "deterministic_mode"]

OP_NAME = "sdkernels_triton::conv2d_fused"
_FN = "sdkernels.ops.triton.conv2d_fused"
RESIDUAL_MODES = {"none": 0, "add": 1, "option_a": 2}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------
# Pure-PyTorch reference: the oracle of the kernel.

def conv2d_fused_reference(x, weight, bias=None, stride=1, padding=0, *,
                           prologue_scale=None, prologue_shift=None, residual=None,
                           residual_mode="none", res_stride=1, relu=False, stats=False):
    """What :func:`conv2d_fused` computes, in plain PyTorch.

    Computed in ``promote(x.dtype, float32)`` (pass float64 tensors for an fp64 oracle),
    returned in x's dtype, channels_last. With ``stats`` returns (y, sum, sumsq) of the
    conv output before bias and ReLU, in the compute dtype.
    """
    cd = torch.promote_types(x.dtype, torch.float32)
    h = x.to(cd)
    if prologue_scale is not None:
        h = torch.relu(h * prologue_scale.to(cd).view(1, -1, 1, 1)
                       + prologue_shift.to(cd).view(1, -1, 1, 1))
    y = F.conv2d(h, weight.to(cd), None, stride, padding)
    out = y
    if bias is not None:
        out = out + bias.to(cd).view(1, -1, 1, 1)
    if residual_mode == "add":
        out = out + residual.to(cd)
    elif residual_mode == "option_a":
        r = residual[:, :, ::res_stride, ::res_stride].to(cd)
        out = out + F.pad(r, (0, 0, 0, 0, 0, out.shape[1] - r.shape[1]))
    if relu:
        out = torch.relu(out)
    out = out.to(x.dtype).contiguous(memory_format=torch.channels_last)
    if stats:
        return out, y.sum((0, 2, 3)), (y * y).sum((0, 2, 3))
    return out


# ---------------------------------------------------------------------------------------
# The kernel.

# Argument types of _conv_fwd_kernel for ahead-of-time compiles ({t}: the activation
# dtype). The order is the kernel's; aot_variants() and the test that compares this
# table with the kernel's arg names keep the tool and the launcher in step.
_KERNEL_ARG_TYPES = {
    "x_ptr": "*{t}", "w_ptr": "*{t}", "y_ptr": "*{t}", "bias_ptr": "*fp32",
    "pscale_ptr": "*fp32", "pshift_ptr": "*fp32", "res_ptr": "*{t}", "psum_ptr": "*fp32",
    "pm2_ptr": "*fp32", "pcnt_ptr": "*i32",
    "M": "i32", "M_BUCKET": "i32", "H": "i32", "W": "i32", "CIN": "i32", "HO": "i32",
    "WO": "i32", "COUT": "i32", "CRES": "i32", "srn": "i32", "srh": "i32", "srw": "i32",
    "KH": "i32", "KW": "i32", "SH": "i32", "SW": "i32", "PH": "i32", "PW": "i32",
    "RES_STRIDE": "i32", "HAS_BIAS": "i32", "RES_MODE": "i32", "RELU": "i32",
    "STATS": "i32",
    "PROLOGUE": "constexpr", "DOT_PRECISION": "constexpr",
    "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
}
# Integer args whose divisibility by 16 Triton may specialize on (it matters for
# vectorised loads); every other int is marked do_not_specialize so that the set of
# compiled variants stays small and is exactly what aot_variants() lists.
_SPECIALIZED_INTS = ("CIN", "COUT", "srn", "srh", "srw")
# Pointers whose 16-byte alignment is specialized: the tiles. The fp32 per-channel
# vectors and the stats buffers are read/written once per program: not worth variants.
_ALIGNED_PTRS = ("x_ptr", "w_ptr", "y_ptr", "res_ptr")
_NO_SPECIALIZE = [a for a, t in _KERNEL_ARG_TYPES.items()
                  if t == "i32" and a not in _SPECIALIZED_INTS]
_NO_ALIGN = [a for a, t in _KERNEL_ARG_TYPES.items()
             if t.startswith("*") and a not in _ALIGNED_PTRS]


@triton.jit(do_not_specialize=_NO_SPECIALIZE, do_not_specialize_on_alignment=_NO_ALIGN)
def _conv_fwd_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr, pscale_ptr, pshift_ptr, res_ptr, psum_ptr, pm2_ptr,
    pcnt_ptr,
    M, M_BUCKET, H, W, CIN, HO, WO, COUT, CRES,
    srn, srh, srw,                 # residual strides (channel stride is 1)
    KH, KW, SH, SW, PH, PW, RES_STRIDE,
    HAS_BIAS, RES_MODE, RELU, STATS,
    PROLOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Geometry and the epilogue flags are runtime scalars: they cost a few uniform
    # scalar ops per K step / a uniform branch in the epilogue, and keep the number of
    # compiled variants (JIT time, and what the static resource gate must cover) at
    # dtype x PROLOGUE. M_BUCKET is only an autotune key.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(COUT, BLOCK_N)
    pid_m = pid // num_pid_n          # column-fastest: neighbours share the input tile
    pid_n = pid % num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    ow = offs_m % WO
    t = offs_m // WO
    oh = t % HO
    img = t // HO
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    # One 64-bit base per output row, built once: the image offset may pass 2^31, the
    # offsets inside an image may not (the launcher checks). The K loop then only adds
    # 32-bit scalars and the 32-bit channel vector: rebuilding a BLOCK_M x BLOCK_K tile
    # of 64-bit pointers from strides every step is what made the kernel spill.
    x_rows = x_ptr + img.to(tl.int64) * (H * W * CIN) + (ih0 * W + iw0) * CIN
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < COUT
    offs_k = tl.arange(0, BLOCK_K)
    # weight as [Cout, kh, kw, Cin] (channels_last), K contiguous: wgmma's B operand
    w_cols = w_ptr + offs_n * (KH * KW * CIN)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_steps = tl.cdiv(CIN, BLOCK_K)
    for step in range(0, KH * KW * c_steps):
        tap = step // c_steps
        c0 = (step - tap * c_steps) * BLOCK_K
        r = tap // KW
        s = tap - r * KW
        ih = ih0 + r
        iw = iw0 + s
        ok_m = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ck = c0 + offs_k
        ok_k = ck < CIN
        ok = ok_m[:, None] & ok_k[None, :]
        a = tl.load(x_rows[:, None] + ((r * W + s) * CIN + ck)[None, :], mask=ok, other=0.0)
        if PROLOGUE:
            sc = tl.load(pscale_ptr + ck, mask=ok_k, other=0.0)
            sf = tl.load(pshift_ptr + ck, mask=ok_k, other=0.0)
            af = tl.maximum(a.to(tl.float32) * sc[None, :] + sf[None, :], 0.0)
            # padding is applied to the post-ReLU activation: keep it exactly 0
            a = tl.where(ok, af, 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(w_cols[None, :] + (tap * CIN + ck)[:, None],
                    mask=ok_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_PRECISION == 1:
            acc = tl.dot(a, b, acc, input_precision="tf32")
        elif DOT_PRECISION == 2:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        elif DOT_PRECISION == 3:
            # interpreter only: its bf16 tl.dot multiplies the raw bit patterns (triton
            # 3.9); bf16 products are exact in fp32, so upcasting computes the same thing
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:  # fp16 / bf16: tensor cores, precision argument irrelevant
            acc = tl.dot(a, b, acc)

    if STATS != 0:
        # One partial per tile: column sums and sums of squares centred on the tile's
        # own mean, plus the tile's row count (the host does not know which BLOCK_M the
        # autotuner chose). Two column reductions of the accumulator, no per-slice
        # passes. Rows past M are exactly 0 in acc (masked loads), so they add nothing
        # to the sum; they are masked out of the centred squares.
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M)
        s1 = tl.sum(acc, axis=0)
        mean_t = s1 / cnt.to(tl.float32)
        d = tl.where(mask_m[:, None], acc - mean_t[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        prow = pid_m.to(tl.int64) * COUT
        tl.store(psum_ptr + prow + offs_n, s1, mask=mask_n)
        tl.store(pm2_ptr + prow + offs_n, m2, mask=mask_n)
        tl.store(pcnt_ptr + pid_m, cnt, mask=pid_n == 0)

    out = acc
    if HAS_BIAS != 0:
        bv = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        out = out + bv[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    if RES_MODE != 0:
        # 1: a tensor of y's shape (RES_STRIDE 1, CRES = Cout); 2: option A,
        # x0[:, :, ::RES_STRIDE, ::RES_STRIDE] with zero channels past CRES
        r_rows = (res_ptr + img.to(tl.int64) * srn + (oh * RES_STRIDE) * srh
                  + (ow * RES_STRIDE) * srw)
        rmask = mask_m[:, None] & (offs_n < CRES)[None, :]
        rv = tl.load(r_rows[:, None] + offs_n[None, :], mask=rmask, other=0.0)
        out = out + rv.to(tl.float32)
    if RELU != 0:
        out = tl.maximum(out, 0.0)
    y_rows = y_ptr + offs_m.to(tl.int64) * COUT
    tl.store(y_rows[:, None] + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=mask_out)


def _is_interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(fn, InterpretedFunction)


#: True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU).
INTERPRET = _is_interpreted(_conv_fwd_kernel)


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                         num_warps=warps, num_stages=stages)


# GPU candidates (H100 / A100), one list per dot precision class: a config's register
# need depends on how tl.dot is lowered (wgmma / mma.sync for fp16, bf16 and tf32; FMAs
# for IEEE fp32). Tiles cover Cout from 16 (CIFAR stage 1) to 2048 and Cin*kh*kw from 27
# (stem) to 4608; configs too wide for the problem or too big for the device's shared
# memory are pruned per call (_prune_configs). Every config of a class passes
# tools/gpu_static_report.py (no spills, fits shared memory) on sm_90a and sm_80 for
# every variant of that class the launcher compiles. Dropped after the static report:
# 128x256 and 256x128 with 8 warps, 128x128x32 with 4 warps (128 accumulators per
# thread spill everywhere); 128x64x64/4 warps (spills with the prologue on sm_90a);
# 128x32x16/4 warps (spills on sm_80); 256x32x32/8 warps (fp16 with the prologue on
# sm_80 under triton 3.6.0); for tf32 also 64x64x64/4 warps (sm_80).
_TC_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 3),
    _cfg(256, 64, 32, 8, 3),
    _cfg(128, 32, 32, 4, 4),
    _cfg(64, 32, 32, 4, 4),
    _cfg(128, 16, 16, 4, 4),
    _cfg(256, 16, 16, 8, 3),
    _cfg(64, 16, 16, 2, 4),
    # Cin <= 16 (CIFAR stage 1, the stem) with wider Cout: BLOCK_K 16, wider BLOCK_N
    _cfg(128, 64, 16, 4, 4),
    _cfg(64, 64, 16, 4, 4),
]
# IEEE fp32 has no tensor-core path: the FMA lowering keeps operand fragments in
# registers, so small K tiles and at most 32 accumulators per thread; with the prologue
# on unaligned data 16 A elements per thread spilled (static report), these keep <= 8.
_IEEE_CONFIGS = [
    _cfg(128, 64, 16, 8, 2),
    _cfg(64, 32, 16, 4, 3),
    _cfg(32, 32, 16, 4, 2),
    _cfg(64, 16, 16, 4, 2),
    _cfg(32, 16, 16, 2, 2),
]


def _key(cfg):
    return (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages)


_TF32_EXCLUDED = {_key(_cfg(64, 64, 64, 4, 3))}
_CLASS_KEYS = {
    0: {_key(c) for c in _TC_CONFIGS},                       # fp16 / bf16
    1: {_key(c) for c in _TC_CONFIGS} - _TF32_EXCLUDED,      # tf32
    2: {_key(c) for c in _IEEE_CONFIGS},                     # IEEE fp32
}
# One autotuner over the union; _prune_configs keeps the call's class.
_GPU_CONFIGS = _TC_CONFIGS + [c for c in _IEEE_CONFIGS
                              if _key(c) not in {_key(t) for t in _TC_CONFIGS}]
# Interpreter: one small config (autotuning there is slow and means nothing). BLOCK_N/K
# = 16 exercise multi-tile channel masks at test shapes with 20 channels.
_INTERP_CONFIGS = [_cfg(32, 16, 16, 1, 1)]

AUTOTUNE_CONFIGS = _INTERP_CONFIGS if INTERPRET else _GPU_CONFIGS
# Rows of the stats partial buffer: one per BLOCK_M tile, so sized for the smallest
# BLOCK_M any config may use.
STAT_ROWS_MIN_BM = min(c.kwargs["BLOCK_M"] for c in (_INTERP_CONFIGS + _GPU_CONFIGS))

# Shared memory per block (opt-in maximum) where the device cannot be asked (fake
# tensors on a machine without a GPU): an A100's (sm_80) 163 KiB.
_SMEM_FALLBACK = 166912


def _next_pow2(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


def smem_estimate(cfg, elsize: int) -> int:
    """Bytes of shared memory Triton allocates for ``cfg``: ``num_stages`` buffers of
    the A (BLOCK_M x BLOCK_K) and B (BLOCK_K x BLOCK_N) tiles. The epilogue's layout
    conversions reuse that space. tools/gpu_static_report.py compares this estimate
    with what the compiler reports for every row (it must never be below it)."""
    kw = cfg.kwargs
    stages = max(cfg.num_stages, 1)
    # + 4 KiB: the prologue's operand staging and the epilogue's reduction scratch
    # (measured: at most 1 KiB over the tiles in the static report)
    return (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * elsize * stages \
        + 4096


def config_selectable(cfg, elsize: int, dot_precision: int, smem_limit: int,
                      aligned: bool = True) -> bool:
    """Whether the autotuner may pick ``cfg`` on a device with ``smem_limit`` bytes of
    shared memory per block (for some problem shape), for the aligned or the unaligned
    specialization (see :func:`_is_aligned_call`)."""
    return (smem_estimate(cfg, elsize) <= smem_limit
            and _config_allowed(cfg, dot_precision, aligned))


def _config_allowed(cfg, dot_precision, aligned=True) -> bool:
    kw = cfg.kwargs
    # the interpreter computes every class in fp32 numpy (DOT_PRECISION 3 is its bf16)
    if not INTERPRET and _key(cfg) not in _CLASS_KEYS.get(dot_precision, _CLASS_KEYS[0]):
        return False
    if not aligned:
        # Without 16-byte alignment the tile loads are scalar: one 64-bit address per
        # element, and the software pipeline keeps num_stages tiles of them in registers
        # (no cp.async). Past ~20 A+B elements per thread per stage that spills (static
        # report: 64x64x16/4 warps fits, 128x64x16/4 warps spills), so unaligned problems
        # (Cin = 3 stems, odd channel counts) get the small-K tiles only.
        per_thread = ((kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"]) // (32 * cfg.num_warps)
        if per_thread > 20:
            return False
    return True


def _is_aligned_call(named_args, by_offset=False) -> bool:
    """Whether Triton compiles the "aligned" specialization for these arguments: every
    alignment-specialized pointer 16-byte aligned and every specialized int a multiple of
    16 (the rule of triton's get_int/tensor_specialization). Anything less counts as
    unaligned (mixed cases get the unaligned class's configs)."""
    for a in _ALIGNED_PTRS:
        t = named_args.get(a)
        if not isinstance(t, torch.Tensor):
            continue
        # fake and meta tensors have no address: allocations are 16-byte aligned, so the
        # storage offset decides
        offset_only = by_offset or t.device.type == "meta" or is_fake(t)
        addr = t.storage_offset() * t.element_size() if offset_only else t.data_ptr()
        if addr % 16 != 0:
            return False
    return all(int(named_args.get(a, 0)) % 16 == 0 for a in _SPECIALIZED_INTS)


_smem_cache: dict = {}


def _smem_limit(device) -> int:
    """Opt-in shared memory per block of ``device`` (163 KiB on A100, 227 KiB on H100,
    99 KiB on sm_86/89 parts)."""
    device = torch.device(device)
    if device.type != "cuda":
        return _SMEM_FALLBACK
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _smem_cache:
        try:
            props = torch.cuda.get_device_properties(idx)
            _smem_cache[idx] = int(getattr(props, "shared_memory_per_block_optin", 0)
                                   or _SMEM_FALLBACK)
        except Exception:  # no driver (fake tensors on a CPU machine)
            return _SMEM_FALLBACK
    return _smem_cache[idx]


def _config_fits(cfg, cin, cout, elsize, dot_precision, smem_limit, aligned=True) -> bool:
    kw = cfg.kwargs
    if kw["BLOCK_N"] > max(16, _next_pow2(cout)) or kw["BLOCK_K"] > max(16, _next_pow2(cin)):
        return False
    return config_selectable(cfg, elsize, dot_precision, smem_limit, aligned)


def _fitting_configs(configs, cin, cout, elsize, dot_precision, smem_limit, aligned=True):
    kept = [c for c in configs
            if _config_fits(c, cin, cout, elsize, dot_precision, smem_limit, aligned)]
    if kept:
        return kept
    # nothing narrow enough (tiny channel counts): the smallest allowed tile
    ok = [c for c in configs
          if config_selectable(c, elsize, dot_precision, smem_limit, aligned)]
    return [min(ok or configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"],
                                              c.kwargs["BLOCK_K"]))]


def _prune_configs(configs, named_args, **kwargs):
    x = named_args["x_ptr"]
    elsize = x.element_size() if hasattr(x, "element_size") else 2
    device = x.device if hasattr(x, "device") else "cuda"
    return _fitting_configs(configs, int(named_args["CIN"]), int(named_args["COUT"]), elsize,
                            int(kwargs.get("DOT_PRECISION", named_args.get("DOT_PRECISION", 0))),
                            _smem_limit(device), _is_aligned_call(named_args))


def _heuristic_config(cin, cout, m, elsize, dot_precision, smem_limit, configs=None,
                      aligned=True):
    """The config of deterministic mode: a function of the shape, the device and the
    alignment class only, so every process picks the same one (same summation order)."""
    configs = AUTOTUNE_CONFIGS if configs is None else configs
    cands = _fitting_configs(configs, cin, cout, elsize, dot_precision, smem_limit, aligned)
    want_n = min(128, max(16, _next_pow2(cout)))
    want_k = min(64, max(16, _next_pow2(cin)))
    want_m = 64 if m <= 64 * 132 else 128   # small problems: more programs

    def dist(c):
        kw = c.kwargs
        return (abs(kw["BLOCK_N"].bit_length() - want_n.bit_length()),
                abs(kw["BLOCK_K"].bit_length() - want_k.bit_length()),
                abs(kw["BLOCK_M"].bit_length() - want_m.bit_length()),
                c.num_warps)
    return min(cands, key=dist)  # min() keeps the first of equals: list order decides


#: Autotune key. M enters bucketed (next power of two): a new batch size does not
#: re-tune. Residual layout is not in it: the launcher always passes a channels_last
#: residual. Tensor dtypes are added by triton's autotuner itself.
_AUTOTUNE_KEY = ["M_BUCKET", "CIN", "COUT", "KH", "KW", "SH", "SW", "PH", "PW", "PROLOGUE",
                 "DOT_PRECISION", "HAS_BIAS", "RES_MODE", "RELU", "STATS"]

_conv_fwd_autotuned = triton.autotune(
    configs=AUTOTUNE_CONFIGS,
    key=_AUTOTUNE_KEY,
    # Benchmarking runs every candidate on the same buffers; a config with a smaller
    # BLOCK_M writes more stats rows than the chosen one, and the merge would count those
    # stale rows. Zeroed counts exclude them (the merge skips rows of count 0).
    reset_to_zero=["pcnt_ptr"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_configs},
)(_conv_fwd_kernel)


def deterministic_mode() -> bool:
    """True when configs are pinned by :func:`_heuristic_config` instead of autotuned:
    ``SDKERNELS_TRITON_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``.
    Autotuning picks the fastest config by timing, which can differ between processes
    (ranks); the stats partials and the K order depend on the config, so results are
    then bitwise reproducible only within a process."""
    return (os.environ.get("SDKERNELS_TRITON_DETERMINISTIC", "0") not in ("", "0")
            or torch.are_deterministic_algorithms_enabled())


def aot_variants():
    """Every variant of ``_conv_fwd_kernel`` the launcher can compile on a GPU, for
    ahead-of-time checks (tools/gpu_static_report.py).

    Returns dicts with ``name``, ``signature`` (arg -> triton type string, constexprs
    as "constexpr"), ``constexprs`` (without the autotune config keys BLOCK_M/N/K),
    ``divisible_by_16`` (args Triton specializes as 16-divisible / 16-byte aligned),
    ``elsize`` and ``dot_precision`` (for :func:`config_selectable`). Geometry and
    epilogue flags are runtime arguments, so each variant covers all of them; the
    remaining specialization is on alignment: "aligned" (every specializable pointer
    16-byte aligned and every specializable int a multiple of 16: channel counts
    multiple of 16) and "unaligned" (none: Cin = 3...). Mixed cases are not compiled.
    """
    out = []
    for dname, ty, prec in (("bf16", "bf16", 0), ("fp16", "fp16", 0),
                            ("fp32-tf32", "fp32", 1), ("fp32-ieee", "fp32", 2)):
        for prologue in (False, True):
            for aligned in (True, False):
                sig = {a: t.format(t=ty) for a, t in _KERNEL_ARG_TYPES.items()}
                out.append(dict(
                    name=f"{dname}{'-prologue' if prologue else ''}"
                         f"-{'aligned' if aligned else 'unaligned'}",
                    signature=sig,
                    constexprs={"PROLOGUE": prologue, "DOT_PRECISION": prec},
                    divisible_by_16=(list(_ALIGNED_PTRS) + list(_SPECIALIZED_INTS)
                                     if aligned else []),
                    aligned=aligned, elsize=4 if ty == "fp32" else 2, dot_precision=prec))
    return out


# ---------------------------------------------------------------------------------------
# Launcher and the torch.library op.

def _out_hw(h, w, kh, kw, sh, sw, ph, pw):
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def _dot_precision(dtype, allow_tf32):
    if dtype == torch.float32:
        return 1 if allow_tf32 else 2
    if dtype == torch.bfloat16 and INTERPRET:
        return 3
    return 0


_I32_MAX = 2 ** 31 - 1


def _check_index_range(n, cin, h, w, cout, kh, kw, ho, wo, residual_shape=None):
    """The kernel's 32-bit offsets: inside one image of x and of the residual (read
    channels_last), the weight, and the output row index. Offsets between images and
    into y are 64-bit. Takes shapes only (no tensor is needed to test it)."""
    # N*Ho*Wo plus the widest tile: the last tile's row indices (pid_m * BLOCK_M + arange)
    # must not wrap before the mask compares them with M
    max_bm = max(c.kwargs["BLOCK_M"] for c in _INTERP_CONFIGS + _GPU_CONFIGS)
    checks = [("one input image H*W*Cin", h * w * cin), ("the weight", cout * kh * kw * cin),
              ("N*Ho*Wo plus one tile", n * ho * wo + max_bm)]
    if residual_shape is not None:
        _, rc, rh, rw = residual_shape
        checks.append(("one residual image", rc * rh * rw))
    for what, v in checks:
        if v > _I32_MAX:
            raise ValueError(f"{_FN}: {what} has {v} elements, more than the kernel's 32-bit "
                             f"offsets allow (2^31 - 1); split the batch or the channels")


def _device_guard(device):
    """Launch on ``device``'s GPU, not the current one (Triton launches on the current
    device). Not while tracing (fake tensors; inductor emits its own guard)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None:
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _launch(kernel, x, weight, bias, pscale, pshift, residual, sh, sw, ph, pw,
            residual_mode, res_stride, relu, stats, allow_tf32, y, psum, pm2, pcnt, dummy,
            **meta):
    """Launch ``kernel`` (the autotuner or, with ``meta`` configs, the raw kernel).

    x, weight, y and residual must be channels_last-contiguous (channel stride 1).
    ``dummy``: a tensor passed in the pointer slots the flags switch off; it is never
    read or written (a separate tensor, so that no output aliases a dead slot).
    """
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    _, _, ho, wo = y.shape
    m = n * ho * wo
    res = residual if residual is not None else dummy
    rstrides = ((res.stride(0), res.stride(2), res.stride(3))
                if residual is not None else (0, 0, 0))
    cres = residual.shape[1] if residual is not None else 0

    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(cout, meta_["BLOCK_N"]),)

    with _device_guard(x.device):
        kernel[grid](
            x, weight, y,
            bias if bias is not None else dummy,
            pscale if pscale is not None else dummy,
            pshift if pshift is not None else dummy,
            res,
            psum if stats else dummy, pm2 if stats else dummy, pcnt if stats else dummy,
            m, _next_pow2(m), h, w, cin, ho, wo, cout, cres,
            *rstrides,
            kh, kw, sh, sw, ph, pw, res_stride,
            int(bias is not None), residual_mode, int(relu), int(stats),
            PROLOGUE=pscale is not None,
            DOT_PRECISION=_dot_precision(x.dtype, allow_tf32),
            **meta,
        )


def _merge_stats(psum, pm2, pcnt, m: int):
    """(sum, m2) per channel from per-tile partials (Chan et al.'s parallel merge).

    Row i of ``psum``/``pm2`` holds tile i's column sum and centred sum of squares,
    ``pcnt[i]`` its row count (0: an unused row, its psum/pm2 are garbage). Counts are
    integers in int64: float32 counts lose exactness past 2^24 rows. Fixed summation
    order: deterministic.
    """
    cnt = pcnt.to(torch.int64)
    valid = (cnt > 0)[:, None]
    total = torch.where(valid, psum, 0.0).sum(0)
    mean = total / m
    cntf = cnt.clamp(min=1).to(psum.dtype)[:, None]   # per-tile counts <= BLOCK_M: exact
    dev = psum / cntf - mean
    m2 = torch.where(valid, pm2 + cntf * dev * dev, 0.0).sum(0)
    return total, m2


def _stat_buffers(m, cout, device):
    f32 = dict(device=device, dtype=torch.float32)
    p = triton.cdiv(m, STAT_ROWS_MIN_BM)
    # only the counts need zeros: rows past the chosen config's tile count stay 0
    return (torch.empty((p, cout), **f32), torch.empty((p, cout), **f32),
            torch.zeros((p,), device=device, dtype=torch.int32))


def _conv2d_fused_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       prologue_scale: Optional[torch.Tensor],
                       prologue_shift: Optional[torch.Tensor],
                       residual: Optional[torch.Tensor], stride_h: int, stride_w: int,
                       pad_h: int, pad_w: int, residual_mode: int, res_stride: int,
                       relu: bool, stats: bool, allow_tf32: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The op's body. Traceable by make_fx (on GPU it is also the op's fake kernel):
    # torch ops and the wrap_triton launch only. Arguments are validated by conv2d_fused.
    from torch.library import wrap_triton

    return _conv2d_fused_body(wrap_triton, x, weight, bias,
                              prologue_scale, prologue_shift, residual, stride_h, stride_w,
                              pad_h, pad_w, residual_mode, res_stride, relu, stats, allow_tf32)


def _no_wrap(kernel):
    return kernel


def _conv2d_fused_body(wrap, x, weight, bias, prologue_scale, prologue_shift, residual,
                       stride_h, stride_w, pad_h, pad_w, residual_mode, res_stride, relu,
                       stats, allow_tf32):
    cl = torch.channels_last
    x = x.contiguous(memory_format=cl)
    weight = weight.contiguous(memory_format=cl)
    if residual is not None:
        # the kernel reads channels with stride 1 (vector loads); no-op when already NHWC
        residual = residual.contiguous(memory_format=cl)
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = _out_hw(h, w, kh, kw, stride_h, stride_w, pad_h, pad_w)
    y = torch.empty((n, cout, ho, wo), device=x.device, dtype=x.dtype, memory_format=cl)
    m = n * ho * wo
    f32 = dict(device=x.device, dtype=torch.float32)
    if stats:
        psum, pm2, pcnt = _stat_buffers(m, cout, x.device)
    else:  # must not alias
        psum, pm2 = torch.empty((0,), **f32), torch.empty((0,), **f32)
        pcnt = torch.empty((0,), device=x.device, dtype=torch.int32)
    if m > 0 and cout > 0:
        meta = {}
        kernel = _conv_fwd_autotuned
        if deterministic_mode():
            dp = _dot_precision(x.dtype, allow_tf32)
            # alignment from storage offsets (allocations are 16-byte aligned): also
            # known for fake tensors, so a compiled graph picks what eager picks
            named = dict(x_ptr=x, w_ptr=weight, y_ptr=y, res_ptr=residual, CIN=cin, COUT=cout)
            if residual is not None:
                named.update(srn=residual.stride(0), srh=residual.stride(2),
                             srw=residual.stride(3))
            cfg = _heuristic_config(cin, cout, m, x.element_size(), dp, _smem_limit(x.device),
                                    aligned=_is_aligned_call(named, by_offset=True))
            kernel = _conv_fwd_kernel
            meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _launch(wrap(kernel), x, weight, bias, prologue_scale, prologue_shift, residual,
                stride_h, stride_w, pad_h, pad_w, residual_mode, res_stride, relu, stats,
                allow_tf32, y, psum, pm2, pcnt, torch.empty((1,), **f32), **meta)
    if not stats:
        return y, psum, pm2
    if m == 0:
        return y, torch.zeros((cout,), **f32), torch.zeros((cout,), **f32)
    total, m2 = _merge_stats(psum, pm2, pcnt, m)
    return y, total, m2


def _conv2d_fused_fake(x, weight, bias, prologue_scale, prologue_shift, residual,
                       stride_h, stride_w, pad_h, pad_w, residual_mode, res_stride, relu,
                       stats, allow_tf32):
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = _out_hw(h, w, kh, kw, stride_h, stride_w, pad_h, pad_w)
    y = torch.empty((n, cout, ho, wo), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    c = cout if stats else 0
    f32 = dict(device=x.device, dtype=torch.float32)
    return y, torch.empty((c,), **f32), torch.empty((c,), **f32)


_op = None


def _get_op():
    """The ``sdkernels_triton::conv2d_fused`` op (registered on first use).

    On GPU a ``torch.library.triton_op``: torch.compile sees the kernel launch itself.
    Under the Triton interpreter ``wrap_triton`` cannot trace the interpreted kernel, so
    the op is a plain ``custom_op`` with a fake kernel: opaque to torch.compile, but
    compilable with ``fullgraph=True`` all the same.
    """
    global _op
    if _op is None:
        if INTERPRET:
            _op = torch.library.custom_op(OP_NAME, mutates_args=())(_conv2d_fused_impl)
            _op.register_fake(_conv2d_fused_fake)
        else:
            _op = torch.library.triton_op(OP_NAME, mutates_args=())(_conv2d_fused_impl)
    return _op


_get_op()


# ---------------------------------------------------------------------------------------
# Public function.

def _pair(v, what):
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return int(v[0]), int(v[1])
    if isinstance(v, (tuple, list)) and len(v) == 1 and isinstance(v[0], int):
        return int(v[0]), int(v[0])
    raise TypeError(f"{_FN}: {what} must be an int or a pair of ints, got {v!r}")


def _check_device(t, name, device):
    if t.device != device:
        raise ValueError(f"{_FN}: {name} is on {t.device}, x is on {device}")


def _per_channel(v, name, c, device):
    if v is None:
        return None
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{_FN}: {name} must be a tensor, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != c:
        raise ValueError(f"{_FN}: {name} must have shape [{c}], got {list(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{_FN}: {name} must be floating point, got {v.dtype}")
    _check_device(v, name, device)
    return v.to(torch.float32).contiguous()


def conv2d_fused(x, weight, bias=None, stride=1, padding=0, *, prologue_scale=None,
                 prologue_shift=None, residual=None, residual_mode="none", res_stride=1,
                 relu=False, stats=False, allow_tf32=None):
    """conv2d (groups 1, dilation 1) with a fused prologue and epilogue, NHWC.

    ``y = relu?(conv2d(x', weight) + bias + residual')`` where
    ``x' = relu(x * prologue_scale[c] + prologue_shift[c])`` if the prologue is given
    (applied on in-bounds positions; padding is zero *after* it), and ``residual'`` is

    * ``residual_mode="none"``: nothing;
    * ``"add"``: ``residual``, a tensor of y's shape [N, Cout, Ho, Wo] (any layout;
      channels_last reads fastest);
    * ``"option_a"``: the paper's CIFAR shortcut built on the fly from the block input
      ``residual`` [N, C0, H0, W0] with C0 <= Cout:
      ``pad(residual[:, :, ::res_stride, ::res_stride], zero channels C0..Cout)``.

    Args:
        x: [N, Cin, H, W], fp16/bf16/fp32, any layout (converted to channels_last).
        weight: [Cout, Cin, kh, kw], x's dtype.
        bias, prologue_scale, prologue_shift: per-channel vectors (used in fp32).
        stride, padding: int or (h, w).
        stats: also return per-output-channel ``sum`` and ``sumsq`` (fp32) of the conv
            output before bias/residual/ReLU: the training-mode BN statistics. They are
            merged from centred per-tile partials (see the module doc); ``sumsq`` is
            reconstructed as ``m2 + sum^2 / M``.
        allow_tf32: fp32 only: TF32 tensor-core dot on GPU. None follows
            ``torch.backends.cudnn.allow_tf32`` (what ``F.conv2d`` does).

    Returns:
        y ([N, Cout, Ho, Wo], x's dtype, channels_last), or (y, sum, sumsq) with stats.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. Through
    ``torch.ops.sdkernels_triton.conv2d_fused`` (a ``torch.library.triton_op``)
    ``torch.compile`` traces into the kernel. No autograd (forward kernels only).
    """
    y, total, m2 = _conv2d_fused_checked(x, weight, bias, stride, padding, prologue_scale,
                                         prologue_shift, residual, residual_mode,
                                         res_stride, relu, stats, allow_tf32)
    if not stats:
        return y
    m = y.shape[0] * y.shape[2] * y.shape[3]
    sumsq = m2 + total * (total / m) if m > 0 else m2
    return y, total, sumsq


def _conv2d_fused_checked(x, weight, bias, stride, padding, prologue_scale, prologue_shift,
                          residual, residual_mode, res_stride, relu, stats, allow_tf32):
    """Validate, normalise and call the op; returns (y, sum, m2)."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{_FN}: x and weight must be tensors")
    if x.dim() != 4:
        raise ValueError(f"{_FN}: x must be 4-D [N, C, H, W], got shape {list(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{_FN}: weight must be 4-D [Cout, Cin, kh, kw], got shape "
                         f"{list(weight.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{_FN}: unsupported dtype {x.dtype} (float16, bfloat16, float32)")
    if weight.dtype != x.dtype:
        raise TypeError(f"{_FN}: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    dev = x.device
    from ...backends import effective_device_type  # meta stands for cuda in a dry run

    dev_type = effective_device_type(dev)
    if dev_type != "cuda" and not (dev_type == "cpu" and INTERPRET):
        raise RuntimeError(
            f"{_FN}: tensors on {dev} are not supported: Triton kernels need a CUDA device "
            f"(or CPU tensors under TRITON_INTERPRET=1 set before sdkernels.ops.triton "
            f"is imported)")
    _check_device(weight, "weight", dev)
    n, cin, h, w = x.shape
    cout, wcin, kh, kw = weight.shape
    if wcin != cin:
        if wcin > 0 and cin % wcin == 0:
            raise ValueError(f"{_FN}: grouped convolution is not supported (x has {cin} "
                             f"channels, weight expects {wcin} per group); groups must be 1")
        raise ValueError(f"{_FN}: weight expects {wcin} input channels, x has {cin}")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    if sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(f"{_FN}: stride must be >= 1 and padding >= 0, got stride "
                         f"{stride!r}, padding {padding!r}")
    if kh < 1 or kw < 1:
        raise ValueError(f"{_FN}: empty kernel {list(weight.shape)}")
    ho, wo = _out_hw(h, w, kh, kw, sh, sw, ph, pw)
    if ho < 1 or wo < 1:
        raise ValueError(f"{_FN}: input {h}x{w} is smaller than the kernel {kh}x{kw} with "
                         f"padding {(ph, pw)}")
    bias = _per_channel(bias, "bias", cout, dev)
    if (prologue_scale is None) != (prologue_shift is None):
        raise ValueError(f"{_FN}: give both prologue_scale and prologue_shift, or neither")
    prologue_scale = _per_channel(prologue_scale, "prologue_scale", cin, dev)
    prologue_shift = _per_channel(prologue_shift, "prologue_shift", cin, dev)
    if residual_mode not in RESIDUAL_MODES:
        raise ValueError(f"{_FN}: residual_mode must be one of {tuple(RESIDUAL_MODES)}, "
                         f"got {residual_mode!r}")
    mode = RESIDUAL_MODES[residual_mode]
    if mode == 0:
        if residual is not None:
            raise ValueError(f"{_FN}: residual given but residual_mode='none'")
        res_stride = 1
    else:
        if not isinstance(residual, torch.Tensor):
            raise ValueError(f"{_FN}: residual_mode={residual_mode!r} needs a residual tensor")
        _check_device(residual, "residual", dev)
        if residual.dtype != x.dtype:
            raise TypeError(f"{_FN}: residual dtype {residual.dtype} differs from x dtype "
                            f"{x.dtype}")
        if residual.dim() != 4:
            raise ValueError(f"{_FN}: residual must be 4-D, got shape {list(residual.shape)}")
        if mode == 1:
            if tuple(residual.shape) != (n, cout, ho, wo):
                raise ValueError(f"{_FN}: residual shape {list(residual.shape)} differs from "
                                 f"the output shape {[n, cout, ho, wo]}")
            res_stride = 1
        else:
            if not isinstance(res_stride, int) or res_stride < 1:
                raise ValueError(f"{_FN}: res_stride must be an int >= 1, got {res_stride!r}")
            rn, rc, rh, rw = residual.shape
            sub = (-(-rh // res_stride), -(-rw // res_stride))
            if rn != n or rc > cout or sub != (ho, wo):
                raise ValueError(
                    f"{_FN}: option-A residual {list(residual.shape)} with res_stride "
                    f"{res_stride} gives [{rn}, {rc}, {sub[0]}, {sub[1]}], which does not fit "
                    f"the output {[n, cout, ho, wo]} (needs same N, spatial size, and at "
                    f"most {cout} channels)")
    _check_index_range(n, cin, h, w, cout, kh, kw, ho, wo,
                       None if residual is None else tuple(residual.shape))
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
    allow_tf32 = bool(allow_tf32) and x.dtype == torch.float32
    args = (x, weight, bias, prologue_scale, prologue_shift, residual, sh, sw, ph, pw, mode,
            int(res_stride), bool(relu), bool(stats), allow_tf32)
    if _eager_fast_path_ok(x, weight, bias, prologue_scale, prologue_shift, residual):
        return _conv2d_fused_body(_no_wrap, *args)
    return _get_op()(*args)


def _eager_fast_path_ok(*tensors) -> bool:
    """Plain eager call: launch directly instead of through the op's dispatcher.

    The custom-op dispatch costs ~10 us of host time per call, as much as a small CIFAR
    conv takes on the GPU. It is skipped only when nothing could observe the op: not
    under torch.compile, no dispatch mode (make_fx, FakeTensorMode, FlopCounterMode...),
    plain tensors only, and no autograd graph to build (which the op would reject).
    """
    if torch.compiler.is_compiling():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return True


# ---------------------------------------------------------------------------------------
# Every autotune config against the reference ("no miscompiled variants").

_CHECK_SHAPES = [
    # (N, Cin, H, W, Cout, k, stride): odd sizes, channel counts off the tile grid
    (3, 5, 9, 11, 20, 3, 1),
    (2, 19, 13, 7, 33, 3, 2),
    (2, 40, 10, 10, 72, 1, 1),
    (3, 3, 17, 15, 16, 3, 2),
    (2, 70, 7, 9, 130, 1, 2),
]


def check_autotune_configs(device="cuda", dtypes=(torch.bfloat16, torch.float16, torch.float32),
                           shapes=None, configs=None, verbose=False):
    """Run every config on every shape and dtype against the fp64 reference.

    Two flag sets per case: prologue + bias + option-A residual + ReLU + stats, and bias
    + residual add. Configs that do not fit the hardware (out of shared memory) are
    reported as skipped, not failed. Returns a list of failure strings (empty: all good).
    """
    device = torch.device(device)
    configs = AUTOTUNE_CONFIGS if configs is None else configs
    shapes = _CHECK_SHAPES if shapes is None else shapes
    failures = []
    g = torch.Generator().manual_seed(1234)
    for (n, cin, h, w, cout, k, s) in shapes:
        pad = k // 2
        for dtype in dtypes:
            def rnd(*shape, scale=1.0):
                return (torch.randn(shape, generator=g) * scale).to(device)
            x = rnd(n, cin, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
            wt = rnd(cout, cin, k, k, scale=(cin * k * k) ** -0.5).to(dtype)
            bias, ps, pb = rnd(cout), rnd(cin).abs() + 0.5, rnd(cin)
            ho, wo = _out_hw(h, w, k, k, s, s, pad, pad)
            res_add = rnd(n, cout, ho, wo).to(dtype)
            c0 = max(1, cout // 2)
            x0 = rnd(n, c0, (ho - 1) * s + 1, (wo - 1) * s + 1).to(dtype)
            cases = [
                ("prologue+bias+option_a+relu+stats",
                 dict(bias=bias, prologue_scale=ps, prologue_shift=pb, residual=x0,
                      residual_mode="option_a", res_stride=s, relu=True, stats=True)),
                ("bias+add", dict(bias=bias, residual=res_add, residual_mode="add")),
            ]
            for name, kw in cases:
                want = conv2d_fused_reference(
                    x.double(), wt.double(), kw.get("bias"), s, pad,
                    prologue_scale=kw.get("prologue_scale"),
                    prologue_shift=kw.get("prologue_shift"),
                    residual=None if kw.get("residual") is None else kw["residual"].double(),
                    residual_mode=kw.get("residual_mode", "none"),
                    res_stride=kw.get("res_stride", 1), relu=kw.get("relu", False),
                    stats=kw.get("stats", False))
                want_y = want[0] if isinstance(want, tuple) else want
                tol = {torch.float32: 2e-2, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
                for cfg in configs:
                    tag = (f"config {cfg} shape N={n} Cin={cin} {h}x{w} Cout={cout} k={k} "
                           f"s={s} {dtype} [{name}]")
                    y, psum, pm2, pcnt = _run_config(cfg, x, wt, s, pad, kw)
                    if y is None:
                        if verbose:
                            print("skipped (does not fit):", tag)
                        continue
                    err = (y.double() - want_y).abs().max().item()
                    scale = want_y.abs().max().item() + 1.0
                    if not err <= tol * scale:
                        failures.append(f"{tag}: max |y - ref| = {err:.3g}")
                    if kw.get("stats"):
                        total, m2 = _merge_stats(psum, pm2, pcnt, n * ho * wo)
                        mt = n * ho * wo
                        ref_mean = want[1] / mt
                        ref_var = want[2] / mt - ref_mean ** 2
                        e1 = (total.double() / mt - ref_mean).abs().max().item()
                        e2 = (m2.double() / mt - ref_var).abs().max().item()
                        st = tol * (1.0 + ref_var.abs().max().item())
                        if not (e1 <= st and e2 <= st):
                            failures.append(f"{tag}: stats err mean {e1:.3g} var {e2:.3g}")
                    if verbose:
                        print("ok:", tag, f"err {err:.3g}")
    return failures


def _run_config(cfg, x, weight, s, pad, kw):
    """One raw-kernel launch with a fixed config; Nones if it cannot fit."""
    n, _, h, w = x.shape
    cout, _, k, _ = weight.shape
    ho, wo = _out_hw(h, w, k, k, s, s, pad, pad)
    m = n * ho * wo
    cl = torch.channels_last
    y = torch.empty((n, cout, ho, wo), device=x.device, dtype=x.dtype, memory_format=cl)
    stats = kw.get("stats", False)
    psum, pm2, pcnt = _stat_buffers(m, cout, x.device)
    res = kw.get("residual")
    f32 = lambda v: None if v is None else v.float().contiguous()  # noqa: E731
    mode = RESIDUAL_MODES[kw.get("residual_mode", "none")]
    if not INTERPRET and not config_selectable(cfg, x.element_size(), _dot_precision(
            x.dtype, False), _smem_limit(x.device)):
        return None, None, None, None
    try:
        _launch(_conv_fwd_kernel, x, weight.contiguous(memory_format=cl), f32(kw.get("bias")),
                f32(kw.get("prologue_scale")), f32(kw.get("prologue_shift")),
                None if res is None else res.contiguous(memory_format=cl), s, s, pad, pad,
                mode, kw.get("res_stride", 1), kw.get("relu", False), stats, False, y, psum,
                pm2, pcnt,
                torch.empty((1,), device=x.device, dtype=torch.float32),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs)
    except triton.runtime.errors.OutOfResources:
        return None, None, None, None
    return y, psum, pm2, pcnt
