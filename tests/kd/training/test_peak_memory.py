"""PeakMemory reports the kernel's high-water mark: a peak inside a step, freed before the step ends, is caught."""

import mmap

import psutil

from kd.training.metrics import MIB, PeakMemory


def _transient_allocation(mib: int) -> None:
    """Fresh pages, touched (resident), freed at return: an anonymous mapping, so no allocator can serve it from
    memory that is already resident (a malloc'ed buffer may reuse freed pages and never raise the RSS)."""
    buffer = mmap.mmap(-1, mib * MIB)
    for offset in range(0, mib * MIB, mmap.PAGESIZE):
        buffer[offset] = 1
    buffer.close()


def test_peak_catches_a_transient_allocation_that_a_sample_misses():
    peak = PeakMemory()
    _transient_allocation(300)
    sampled_between_steps = psutil.Process().memory_info().rss  # the buffer is freed: a sample misses it
    record = peak.record()
    assert peak.reset_ok  # Linux: each run's peak is its own
    assert record["peak_rss_over_start_mb"] >= 290
    assert peak.peak_bytes - sampled_between_steps >= 250 * MIB
    assert peak.process_peak_bytes() >= peak.peak_bytes
    assert record["cuda_peak_allocated_mb"] is None or record["cuda_peak_allocated_mb"] >= 0


def test_each_run_gets_its_own_peak_after_a_larger_one():
    PeakMemory()
    _transient_allocation(400)
    small = PeakMemory()
    _transient_allocation(50)
    assert 40 <= small.record()["peak_rss_over_start_mb"] < 200
