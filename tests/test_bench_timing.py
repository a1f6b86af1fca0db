"""The interleaved step timer's bookkeeping: times, last outputs, page faults."""
from __future__ import annotations

import mmap

import pytest

from sdkernels.bench import environment
from sdkernels.measure.timing import interleaved_timing, median_faults, minor_faults, summarize

PAGE = mmap.PAGESIZE


def _touch(nbytes: int) -> None:
    # A fresh private anonymous mapping written once per page: every page is a first
    # touch, whatever malloc would have done.
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, nbytes, PAGE):
        m[off] = 1
    m.close()


def _faults_are_counted() -> bool:
    """Whether this kernel reports first touches as minor faults (gVisor, for one, does not)."""
    f0 = minor_faults()
    if f0 is None:
        return False
    _touch(64 * PAGE)
    return minor_faults() - f0 >= 4  # one per page, or per large folio with mTHP


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
    if minor_faults() is not None:
        assert {k: len(v) for k, v in faults.items()} == {"a": 3, "b": 3, "c": 3}
    else:
        assert faults == {"a": [], "b": [], "c": []}


@pytest.mark.skipif(not _faults_are_counted(), reason="this platform does not count page faults")
def test_interleaved_timing_counts_page_faults_per_variant():
    pages = 256
    faults = {}
    interleaved_timing({"touch": lambda *_: _touch(pages * PAGE), "idle": lambda *_: None},
                       [(None, None)], rounds=3, warmup=0, faults=faults)
    assert len(faults["touch"]) == 3 and len(faults["idle"]) == 3
    # one fault per page, or one per folio where the kernel maps large folios (mTHP):
    # pages // 16 allows folios of up to 64 KiB
    assert min(faults["touch"]) >= pages // 16
    assert min(faults["touch"]) > max(faults["idle"])
    med = median_faults(faults)
    assert med["touch"] == sorted(faults["touch"])[1] and set(med) == {"touch", "idle"}
    assert median_faults({"a": [], "b": [3, 1]}) == {"b": 2}


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


def test_environment_records_allocator_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000000")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env = environment("cpu")
    assert env["allocator_env"]["MALLOC_TRIM_THRESHOLD_"] == "1000000000"
    assert "LD_PRELOAD" not in env["allocator_env"]
