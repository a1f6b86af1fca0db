"""Library code behind the benchmarks and ``python -m sdkernels.bench``.

* :mod:`.variants`  constant / naive / sdkernels CIFAR ResNets (and FixedGates
  calibration copies) built from the same initial weights;
* :mod:`.compare`   the whole side-by-side run and its result record;
* :mod:`.report`    table, JSON and plot.

The timer and the predictions live one layer down, in :mod:`sdkernels.measure`
(shared with the training CLI); they are re-exported here.
"""
from .compare import TOLERANCE, BenchConfig, run_comparison, total_steps
from .env import environment
from ..measure.predict import count_flops, flop_prediction, realized_time_ratio, time_prediction
from ..measure.timing import interleaved_timing, make_inputs, make_train_step, summarize, time_step
from .variants import VARIANTS, BenchModels, build_variants

__all__ = [
    "BenchConfig", "run_comparison", "total_steps", "TOLERANCE", "environment",
    "count_flops", "flop_prediction", "time_prediction", "realized_time_ratio",
    "interleaved_timing", "make_inputs", "make_train_step", "summarize", "time_step",
    "VARIANTS", "BenchModels", "build_variants",
]
