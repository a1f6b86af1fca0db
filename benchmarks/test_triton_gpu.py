"""GPU suite of the Triton fused-conv blocks (``sdkernels.ops.triton``), CUDA only.

Per block shape (CIFAR stage BasicBlocks 16ch@32, 32ch@16, 64ch@8; ResNet-50
Bottlenecks 64@56, 128@28, 256@14, 512@7; identity shortcut; batch 128, channels_last)
and dtype (bf16, fp16), side by side in one test (design §7: ratios from one process,
variants interleaved round by round so a slow spell of the GPU hits all alike):

``eval``  eager      torchvision-style block, cuDNN convs, BN (eval) unfolded
          folded     eager with BN folded into conv weight and bias (conv+bias, ReLU, add)
          compiled   ``torch.compile`` of ``folded``
          triton     ``block_eval``: one fused kernel per conv, shortcut in the epilogue
``train`` eager      conv -> BN(train) -> ReLU -> ... -> BN(train) -> + x -> ReLU
(forward) triton     ``conv_bn_stats`` chain: BN statistics from each conv's epilogue, the
                     next conv applies BN + ReLU in its prologue, a final
                     scale-bias-add-ReLU (``sdkernels.ops``) and running-stat updates

Times are medians of ``triton.testing.do_bench`` (warm-up, L2 flushed between calls)
over R interleaved rounds. TFLOP/s counts the convolutions' 2*MACs; GB/s is the
minimum traffic of the block (block input read once, weights, each conv output written
once and each intermediate read once more) divided by time, the same numerator for every
variant: it says how close a variant is to the memory floor. The device's measured peaks
(a large bf16 matmul, a large device copy) are printed next to the results. Everything
is recorded in ``extra_info`` with the device, dtype, shapes and torch/triton versions.

``--benchmark-disable`` (CPU smoke runs) collects the file and skips it without CUDA.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _common import extra_info

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BATCH = 128
BASIC_SHAPES = [(16, 32), (32, 16), (64, 8)]                    # channels, spatial
BOTTLENECK_SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]   # planes, spatial
DTYPES = ["bfloat16", "float16"]
EVAL_VARIANTS = ["eager", "folded", "compiled", "triton"]
TRAIN_VARIANTS = ["eager", "triton"]
EPS = 1e-5
MOMENTUM = 0.1
RESULTS: list[dict] = []


def _triton_or_skip():
    from sdkernels.ops import triton as sdtriton

    if not sdtriton.is_available("cuda"):
        pytest.skip(f"Triton kernels unavailable: {sdtriton.unavailable_reason('cuda')}")
    from sdkernels.ops.triton import block
    return block


def _do_bench():
    import triton.testing
    return triton.testing.do_bench


# ---------------------------------------------------------------------------------------
# Device peaks, measured once.

def _matmul_tflops(do_bench, dev, n=8192):
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def _copy_gbs(do_bench, dev, numel=2 ** 28):
    src = torch.empty(numel, device=dev, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    return 2 * numel * 4 / (ms * 1e-3) / 1e9                 # read + write


@pytest.fixture(scope="module")
def peaks():
    do_bench = _do_bench()
    dev = torch.device("cuda")
    out = {"bf16_matmul_tflops": _matmul_tflops(do_bench, dev),
           "copy_gbs": _copy_gbs(do_bench, dev), "device": torch.cuda.get_device_name(dev)}
    torch.cuda.empty_cache()
    return out


@pytest.fixture(scope="module", autouse=True)
def _print_table(request):
    yield
    if not RESULTS:
        return
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    write = tr.write_line if tr is not None else print
    pk = RESULTS[0]["peaks"]
    write("")
    write(f"Triton fused-conv blocks on {pk['device']}: measured peaks "
          f"{pk['bf16_matmul_tflops']:.0f} TFLOP/s (bf16 matmul 8192^3), "
          f"{pk['copy_gbs']:.0f} GB/s (device copy)")
    write(f"{'block':<22}{'dtype':<10}{'phase':<7}{'variant':<10}{'ms':>9}{'TFLOP/s':>9}"
          f"{'GB/s':>8}{'x eager':>9}")
    for r in RESULTS:
        for v, t in r["median_ms"].items():
            write(f"{r['block']:<22}{r['dtype']:<10}{r['phase']:<7}{v:<10}{t:>9.4f}"
                  f"{r['tflops'][v]:>9.1f}{r['gbs'][v]:>8.0f}"
                  f"{r['median_ms']['eager'] / t:>9.2f}")


# ---------------------------------------------------------------------------------------
# Blocks: parameters, eager / folded / Triton forms.

def _conv_w(cin, cout, k, dev, dtype):
    return (torch.randn(cout, cin, k, k, device=dev) * (2.0 / (cin * k * k)) ** 0.5
            ).to(dtype).contiguous(memory_format=torch.channels_last)


def _bn(c, dev):
    return {"weight": torch.rand(c, device=dev) + 0.5, "bias": torch.randn(c, device=dev) * 0.1,
            "running_mean": torch.randn(c, device=dev) * 0.1,
            "running_var": torch.rand(c, device=dev) + 0.5}


def _make_block(kind, c, dev, dtype):
    """[(weight, bn, stride, padding)] of the residual branch and the input channels."""
    if kind == "basic":
        specs, cin = [(c, c, 3, 1), (c, c, 3, 1)], c
    else:
        specs, cin = [(4 * c, c, 1, 0), (c, c, 3, 1), (c, 4 * c, 1, 0)], 4 * c
    layers = [(_conv_w(i, o, k, dev, dtype), _bn(o, dev), 1, p) for i, o, k, p in specs]
    return layers, cin


def _fold(layers, dtype):
    out = []
    for w, bn, s, p in layers:
        scale = bn["weight"] * torch.rsqrt(bn["running_var"] + EPS)
        wf = (w.float() * scale.view(-1, 1, 1, 1)).to(dtype).contiguous(
            memory_format=torch.channels_last)
        b = bn["bias"] - bn["running_mean"] * scale
        out.append((wf, b, s, p))
    return out


def _in_dtype(layers, dtype):
    """The eager block as ``model.to(dtype)`` has it: BN parameters and buffers in dtype."""
    return [(w, {k: v.to(dtype, copy=True) for k, v in bn.items()}, s, p)
            for w, bn, s, p in layers]


def _eager_eval(x, layers):
    h = x
    for i, (w, bn, s, p) in enumerate(layers):
        h = F.conv2d(h, w, None, s, p)
        h = F.batch_norm(h, bn["running_mean"], bn["running_var"], bn["weight"],
                         bn["bias"], False, 0.0, EPS)
        if i < len(layers) - 1:
            h = F.relu(h)
    return F.relu(h + x)


def _folded_eval(x, folded):
    h = x
    for i, (w, b, s, p) in enumerate(folded):
        h = F.conv2d(h, w, b, s, p)
        if i < len(folded) - 1:
            h = F.relu(h)
    return F.relu(h + x)


def _eager_train(x, layers):
    h = x
    for i, (w, bn, s, p) in enumerate(layers):
        h = F.conv2d(h, w, None, s, p)
        h = F.batch_norm(h, bn["running_mean"], bn["running_var"], bn["weight"],
                         bn["bias"], True, MOMENTUM, EPS)
        if i < len(layers) - 1:
            h = F.relu(h)
    return F.relu(h + x)


def _triton_train(block, x, layers):
    from sdkernels import ops

    h, pro = x, None
    n_last = len(layers) - 1
    for i, (w, bn, s, p) in enumerate(layers):
        y, mean, var = block.conv_bn_stats(h, w, s, p, prologue=pro)
        m = y.numel() // y.shape[1]
        with torch.no_grad():  # running statistics, as F.batch_norm(training=True) does
            bn["running_mean"].mul_(1 - MOMENTUM).add_(mean, alpha=MOMENTUM)
            bn["running_var"].mul_(1 - MOMENTUM).add_(var * (m / max(m - 1, 1)), alpha=MOMENTUM)
        scale = bn["weight"] * torch.rsqrt(var + EPS)
        shift = bn["bias"] - mean * scale
        if i < n_last:
            h, pro = y, (scale, shift)
        else:
            return ops.scale_bias_add_relu(y, scale, shift, x)


def _flops(layers, n, hw):
    total = 0
    for w, _, s, _ in layers:
        cout, cin, kh, kw = w.shape
        ho = (hw - 1) // s + 1
        total += 2 * n * ho * ho * cout * cin * kh * kw
    return total


def _min_bytes(layers, n, hw, cin, elsize):
    """Block input read once, weights, every conv output written once and every
    intermediate one read once more (stride-1 blocks: spatial size stays hw)."""
    total = n * cin * hw * hw * elsize
    for i, (w, _, s, _) in enumerate(layers):
        out = n * w.shape[0] * hw * hw * elsize
        total += w.numel() * elsize + out * (2 if i < len(layers) - 1 else 1)
    return total


def _cases():
    for kind, shapes in (("basic", BASIC_SHAPES), ("bottleneck", BOTTLENECK_SHAPES)):
        for c, hw in shapes:
            for dtype in DTYPES:
                yield pytest.param(kind, c, hw, dtype, id=f"{kind}-{c}ch@{hw}-{dtype}")


def _interleaved(fns: dict, rounds: int) -> dict:
    """Median over ``rounds`` of do_bench medians, variants rotated each round."""
    do_bench = _do_bench()
    names = list(fns)
    samples = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            samples[k].append(do_bench(fns[k], warmup=10, rep=50, return_mode="median"))
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


@pytest.mark.parametrize("phase", ["eval", "train"])
@pytest.mark.parametrize("kind,c,hw,dtype", list(_cases()))
def test_triton_block(benchmark, peaks, kind, c, hw, dtype, phase):
    block = _triton_or_skip()
    dev = torch.device("cuda")
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    layers, cin = _make_block(kind, c, dev, dt)
    eager_layers = _in_dtype(layers, dt)
    x = torch.relu(torch.randn(BATCH, cin, hw, hw, device=dev)).to(dt).contiguous(
        memory_format=torch.channels_last)
    prev_bench = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        if phase == "eval":
            folded = _fold(layers, dt)
            compiled = torch.compile(_folded_eval)
            shortcut = ("identity",)
            fns = {
                "eager": lambda: _eager_eval(x, eager_layers),
                "folded": lambda: _folded_eval(x, folded),
                "compiled": lambda: compiled(x, folded),
                "triton": lambda: block.block_eval(x, folded, shortcut),
            }
            with torch.no_grad():
                ref = _eager_eval(x, eager_layers).float()
                for name in ("folded", "compiled", "triton"):
                    err = (fns[name]().float() - ref).abs().max().item()
                    assert err <= 0.1 * (1 + ref.abs().max().item()), (name, err)
        else:
            fns = {
                "eager": lambda: _eager_train(x, eager_layers),
                "triton": lambda: _triton_train(block, x, layers),
            }
        with torch.no_grad():
            for f in fns.values():  # warm-up: compile, autotune, cuDNN algorithm search
                f()
            torch.cuda.synchronize()
            rounds = 5 if benchmark.disabled else 9
            med = _interleaved(fns, rounds)

            def run_triton():
                fns["triton"]()
                torch.cuda.synchronize()

            benchmark.group = f"triton-{kind}-{c}ch@{hw}-{dtype}-{phase}"
            benchmark.pedantic(run_triton, rounds=20, iterations=1, warmup_rounds=3)
    finally:
        torch.backends.cudnn.benchmark = prev_bench

    flops = _flops(layers, BATCH, hw)
    nbytes = _min_bytes(layers, BATCH, hw, cin, x.element_size())
    rec = {
        "block": f"{kind}-{c}ch@{hw}", "dtype": dtype, "phase": phase,
        "median_ms": med,
        "tflops": {k: flops / (t * 1e-3) / 1e12 for k, t in med.items()},
        "gbs": {k: nbytes / (t * 1e-3) / 1e9 for k, t in med.items()},
        "speedup_vs_eager": {k: med["eager"] / t for k, t in med.items()},
        "peaks": peaks,
    }
    RESULTS.append(rec)
    import triton
    benchmark.extra_info.update(extra_info(
        dev, dtype=dtype, kind=kind, phase=phase, batch=BATCH, channels=c, spatial=hw,
        input_shape=[BATCH, cin, hw, hw], memory_format="channels_last",
        conv_shapes=[list(w.shape) for w, *_ in layers], flops=flops, min_bytes=nbytes,
        median_ms=med, tflops=rec["tflops"], gbs=rec["gbs"],
        speedup_vs_eager=rec["speedup_vs_eager"], peak_bf16_tflops=peaks["bf16_matmul_tflops"],
        peak_copy_gbs=peaks["copy_gbs"], triton_version=triton.__version__,
        torch_version=torch.__version__, timer="triton.testing.do_bench median, interleaved"))
    assert all(math.isfinite(t) and t > 0 for t in med.values())
