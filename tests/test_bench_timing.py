"""The interleaved step timer's bookkeeping: times, last outputs, page faults."""
from __future__ import annotations

import mmap
import sys

import pytest

from sdkernels.bench import environment
from sdkernels.bench.timing import interleaved_timing, minor_faults, summarize

PAGE = mmap.PAGESIZE


def _touch_fresh(nbytes: int):
    # A fresh anonymous mapping, written once per page: every page is a first touch, so
    # the step faults at least nbytes / PAGE times whatever malloc would have done.
    def step(*_):
        m = mmap.mmap(-1, nbytes)
        for off in range(0, nbytes, PAGE):
            m[off] = 1
        m.close()
        return "touched"
    return step


def test_interleaved_timing_records_times_outputs_and_rotation():
    order = []
    steps = {n: (lambda n: lambda x, y: order.append(n) or (n, x, y))(n) for n in "abc"}
    last, faults = {}, {}
    times = interleaved_timing(steps, [(1, 2), (3, 4)], rounds=3, warmup=1, last=last,
                               faults=faults)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)
    assert last == {"a": ("a", 1, 2), "b": ("b", 1, 2), "c": ("c", 1, 2)}  # round 2: batch 0
    # warm-up a b c, then rounds rotated by one each
    assert order == list("abc") + list("abc") + list("bca") + list("cab")
    assert set(faults) == set(steps)


@pytest.mark.skipif(minor_faults() is None, reason="no resource module on this platform")
def test_interleaved_timing_counts_page_faults_per_variant():
    nbytes = 256 * PAGE
    faults = {}
    interleaved_timing({"touch": _touch_fresh(nbytes), "idle": lambda *_: None},
                       [(None, None)], rounds=3, warmup=0, faults=faults)
    assert len(faults["touch"]) == 3 and len(faults["idle"]) == 3
    assert min(faults["touch"]) >= nbytes // PAGE
    assert max(faults["idle"]) < nbytes // PAGE // 4


def test_interleaved_timing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rounds"):
        interleaved_timing({"a": lambda *_: None}, [(None, None)], rounds=0)
    with pytest.raises(ValueError, match="input"):
        interleaved_timing({"a": lambda *_: None}, [], rounds=1)


def test_summarize_median_and_quartiles():
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert s["median"] == 2.5 and s["q25"] == 1.75 and s["q75"] == 3.25 and s["n"] == 4
    with pytest.raises(ValueError):
        summarize([])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_environment_records_allocator_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000000")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env = environment("cpu")
    assert env["allocator_env"]["MALLOC_TRIM_THRESHOLD_"] == "1000000000"
    assert "LD_PRELOAD" not in env["allocator_env"]
