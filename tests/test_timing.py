"""The shared timer: warm-up calls are not timed, the figure is the median, and it names the processor."""

from __future__ import annotations

import time

import pytest
import torch

from ofa_ufo.core import timing


class FakeClock:
    """A clock that only moves when a call under test 'takes' its next scripted duration."""

    def __init__(self, durations: list[float]):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def __call__(self) -> float:
        return self.now

    def work(self) -> None:
        self.calls += 1
        self.now += self.durations.pop(0)


def test_warmup_is_not_timed_and_the_median_is_reported():
    clock = FakeClock([50.0, 1.0, 9.0, 2.0, 100.0, 3.0])  # first call: warm-up; 100: a disturbed run
    assert timing.median_time(clock.work, repeats=5, warmup=1, clock=clock) == 3.0
    assert clock.calls == 6


def test_run_times_lists_each_timed_call():
    clock = FakeClock([7.0, 7.0, 0.25, 0.5])
    assert timing.run_times(clock.work, repeats=2, warmup=2, clock=clock) == [0.25, 0.5]


def test_without_warmup_the_first_call_counts():
    clock = FakeClock([4.0, 1.0, 2.0])
    assert timing.median_time(clock.work, repeats=3, warmup=0, clock=clock) == 2.0


def test_interleaved_times_rotate_the_order_and_skip_the_warmup():
    order = []
    clock = FakeClock([9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # two warm-ups, then rounds of (a, b), (b, a), ...

    def call(name):
        def work():
            order.append(name)
            clock.work()
        return work

    times = timing.interleaved_times({"a": call("a"), "b": call("b")}, rounds=3, warmup=1, clock=clock)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert times == {"a": [1.0, 4.0, 5.0], "b": [2.0, 3.0, 6.0]}
    with pytest.raises(ValueError, match="rounds"):
        timing.interleaved_times({"a": lambda: None}, rounds=0)


def test_no_timed_run_is_an_error():
    with pytest.raises(ValueError, match="repeats"):
        timing.median_time(lambda: None, repeats=0)


def test_real_clock_measures_a_sleep():
    seconds = timing.median_time(lambda: time.sleep(0.02), repeats=3)
    assert 0.02 <= seconds < 0.5


def test_cpu_name_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: Test\nmodel name\t: Test CPU 9000 @ 3.00GHz\n")
    assert timing.cpu_name(info) == "Test CPU 9000 @ 3.00GHz"
    assert timing.cpu_name(tmp_path / "missing")  # falls back to what platform knows


def test_device_name_names_cpu_and_gpu(monkeypatch):
    cpu = timing.device_name("cpu")
    assert cpu.startswith(f"CPU: {timing.cpu_name()}") and f"torch threads {torch.get_num_threads()}" in cpu
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 80GB")
    assert timing.device_name("cuda:0") == "GPU: Fake GPU 80GB"
