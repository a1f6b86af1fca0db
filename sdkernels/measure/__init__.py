"""Measuring a network: the timer, the expected-depth predictions and the calibration
gates, shared by the benchmark harness (``sdkernels.bench``) and the training CLI
(``sdkernels.train``), which stay independent of each other (design §3, §7).

* :mod:`.timing`       the training step and the interleaved step timer;
* :mod:`.predict`      FLOP-weighted and time-weighted expected-depth predictions;
* :mod:`.calibration`  stages of a network and FixedGates per stage;
* :mod:`.record`       JSON-ready result records.
"""
from .calibration import fix_gates, stages_of
from .predict import count_flops, flop_prediction, realized_time_ratio, time_prediction
from .record import jsonable
from .timing import interleaved_timing, make_inputs, make_train_step, summarize, time_step

__all__ = [
    "count_flops", "flop_prediction", "time_prediction", "realized_time_ratio",
    "interleaved_timing", "make_inputs", "make_train_step", "summarize", "time_step",
    "fix_gates", "stages_of", "jsonable",
]
