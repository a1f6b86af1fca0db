"""Readable table, JSON file and plot of a :func:`~sdkernels.bench.compare.run_comparison` record."""
from __future__ import annotations

import json
from pathlib import Path

from ..measure.record import jsonable

__all__ = ["format_table", "write_json", "plot"]

_LABELS = {
    "constant": "constant depth",
    "naive": "naive SD (mask multiply)",
    "sdkernels": "sdkernels",
    "calib:none": "calib: all dropped",
    "calib:all": "calib: all active",
}


def _label(name: str) -> str:
    if name in _LABELS:
        return _LABELS[name]
    if name.startswith("calib:"):
        return f"calib: only {name[6:]}"
    return name


def _ms(s: float) -> str:
    return f"{s * 1e3:9.1f}"


def format_table(rec: dict) -> str:
    cfg, env, var = rec["config"], rec["environment"], rec["variants"]
    meas, pred = rec["measured"], rec["predictions"]
    flop = pred["flop"]
    lines = [
        f"CIFAR ResNet-{cfg['depth']} training step, batch {cfg['batch_size']}, "
        f"{cfg['dtype']}, {env['device_name']} ({env['torch_threads']} threads)",
        f"stochastic depth: {cfg['schedule']} p_L={cfg['p_last']}, mode={cfg['mode']} "
        f"(naive: {cfg['naive_mode']}); sdkernels backend: {env['backend']}; "
        f"torch {env['torch']}, python {env['python']}",
        f"{cfg['steps']} timed interleaved rounds after {cfg['warmup']} warm-up rounds",
        "",
        f"{'variant':<26}{'median ms':>10}{'IQR ms':>10}{'mean ms':>10}{'n':>5}"
        f"{'paired/const':>14}"
        + (f"{'faults/step':>13}" if any("faults_per_step" in s for s in var.values()) else ""),
    ]
    const = var.get("constant", {}).get("paired_centre")
    for name, s in var.items():
        rel = f"{s['paired_centre'] / const:14.3f}" if const else " " * 14
        # minor page faults (median per step): ~2 us each on VMs, and unevenly shared
        # between variants, so a time is read together with them
        flt = f"{s['faults_per_step']:13.0f}" if "faults_per_step" in s else ""
        lines.append(f"{_label(name):<26}{_ms(s['median']):>10}{_ms(s['iqr']):>10}"
                     f"{_ms(s['mean']):>10}{s['n']:>5}{rel}{flt}")
    lines.append("")
    if "saving_vs_constant" in meas:
        lines.append(f"measured saving vs constant depth: {meas['saving_vs_constant']:6.1%}"
                     f"   (ratio {meas['sdkernels_vs_constant']:.3f} "
                     f"+- {meas['stderr_vs_constant']:.3f} s.e., paired medians over rounds)")
    if "saving_vs_naive" in meas:
        lines.append(f"measured saving vs naive SD:       {meas['saving_vs_naive']:6.1%}"
                     f"   (ratio {meas['sdkernels_vs_naive']:.3f})")
    lines.append(f"predicted, FLOP-weighted:          {1 - flop['ratio']:6.1%}"
                 f"   (ratio {flop['ratio']:.3f}; residual work saved "
                 f"{flop['residual_saved_depth']:.1%} by depth = 1 - "
                 f"{flop['expected_depth']:.2f}/{flop['num_blocks']}, "
                 f"{flop['residual_saved_flops']:.1%} by FLOPs)")
    if "time" in pred:
        tp = pred["time"]
        vs_const = (f"; ratio {tp['ratio_vs_constant']:.3f} of the constant-depth step"
                    if "ratio_vs_constant" in tp else "")
        lines.append(f"predicted, time-weighted:          {1 - tp['ratio']:6.1%}"
                     f"   (of the sdkernels all-active step: ratio {tp['ratio']:.3f}{vs_const};"
                     f" fixed part {tp['fixed_fraction']:.1%} of T_all; additivity "
                     f"{tp['additivity']:.3f})")
        if "time_realized_gates" in pred:
            lines.append(f"  same formula at the gates drawn: ratio "
                         f"{pred['time_realized_gates']:.3f} (mean active blocks "
                         f"{meas.get('mean_active_blocks', float('nan')):.2f} vs expected "
                         f"{meas['expected_active_blocks']:.2f})")
        if "sdkernels_vs_all_active" in meas:
            lines.append(f"  measured vs sdkernels all-active (the prediction's own baseline): "
                         f"{meas['sdkernels_vs_all_active']:.3f}")
        if "all_active_vs_constant" in meas:
            lines.append(f"  sdkernels all-active / constant: {meas['all_active_vs_constant']:.3f}"
                         f" (surviving blocks' cost against plain ones: fused kernels < 1)")
    if "comparison" in rec:
        c = rec["comparison"]
        ok = "within" if c["within_tolerance"] else "NOT within"
        lines.append(f"measured ratio {c['measured']:.3f} vs time-weighted prediction "
                     f"{c['predicted']:.3f} (predicted step / constant step): "
                     f"|diff| = {c['abs_diff']:.3f}, {ok} {c['tolerance']}")
    if rec.get("noise_warning"):
        lines.append(f"WARNING: {rec['noise_warning']}")
    if rec.get("sweep"):
        lines.append("")
        lines.append(f"{'p_L':>6}{'E[depth]':>10}{'measured':>10}{'time-wtd':>10}{'FLOP-wtd':>10}"
                     "   (step time / constant depth)")
        for row in rec["sweep"]:
            lines.append(f"{row['p_last']:>6.2f}{row['expected_depth']:>10.2f}"
                         f"{row['measured']:>10.3f}{row['predicted_time_vs_constant']:>10.3f}"
                         f"{row['predicted_flop']:>10.3f}")
    return "\n".join(lines)


def write_json(rec: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(rec), indent=2))
    return path


def plot(rec: dict, path) -> Path:
    """Bar chart of step times (median bar, IQR whisker, mean dot), predictions marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    var, pred, cfg = rec["variants"], rec["predictions"], rec["config"]
    main = [n for n in ("constant", "naive", "sdkernels") if n in var]
    calib = [n for n in var if n.startswith("calib:")]
    sweep = rec.get("sweep") or []
    ncols = 1 + bool(calib) + bool(sweep)
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.8), squeeze=False)

    def bars(ax, names, colors):
        xs = range(len(names))
        med = [var[n]["median"] * 1e3 for n in names]
        err = [[(var[n]["median"] - var[n]["q25"]) * 1e3 for n in names],
               [(var[n]["q75"] - var[n]["median"]) * 1e3 for n in names]]
        ax.bar(xs, med, color=colors, yerr=err, capsize=4, label="median (whisker: IQR)")
        ax.plot(xs, [var[n]["mean"] * 1e3 for n in names], "o", color="black", label="mean")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([_label(n) for n in names], rotation=15, ha="right")
        ax.set_ylabel("training step time (ms)")
        return xs

    ax = axes[0][0]
    palette = {"constant": "#7f7f7f", "naive": "#d62728", "sdkernels": "#1f77b4"}
    bars(ax, main, [palette[n] for n in main])
    if "sdkernels" in main:
        i = main.index("sdkernels")
        ref = var["calib:all"]["median"] if "calib:all" in var else var.get("constant", {}).get("median")
        if ref:
            if "time" in pred:
                y = pred["time"]["predicted_time"] * 1e3
                ax.hlines(y, i - 0.4, i + 0.4, colors="orange", linestyles="--", linewidth=2,
                          label=f"predicted, time-weighted ({pred['time']['ratio']:.3f})")
            y = pred["flop"]["ratio"] * ref * 1e3
            ax.hlines(y, i - 0.4, i + 0.4, colors="green", linestyles=":", linewidth=2,
                      label=f"predicted, FLOP-weighted ({pred['flop']['ratio']:.3f})")
    ax.set_title(f"ResNet-{cfg['depth']}, batch {cfg['batch_size']}, {cfg['dtype']}, "
                 f"{rec['environment']['device']}, backend {rec['environment']['backend']}",
                 fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    if calib:
        ax2 = axes[0][1]
        bars(ax2, calib, ["#bcbd22"] * len(calib))
        ax2.set_title("FixedGates calibration (time-weighted prediction)")
        ax2.legend(loc="upper left", fontsize=8)
    if sweep:
        ax3 = axes[0][ncols - 1]
        ps = [r["p_last"] for r in sweep]
        ax3.plot(ps, [r["measured"] for r in sweep], "o-", color="#1f77b4", label="measured")
        ax3.plot(ps, [r["predicted_time_vs_constant"] for r in sweep], "s--", color="orange",
                 label="predicted, time-weighted")
        ax3.plot(ps, [r["predicted_flop"] for r in sweep], "^:", color="green",
                 label="predicted, FLOP-weighted")
        ax3.axhline(1.0, color="#7f7f7f", linewidth=1, label="constant depth")
        ax3.set_xlabel("p_L (survival probability of the last block)")
        ax3.set_ylabel("step time / constant-depth step time")
        ax3.set_title(f"sdkernels step time vs p_L ({cfg['schedule']} schedule)", fontsize=10)
        ax3.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
