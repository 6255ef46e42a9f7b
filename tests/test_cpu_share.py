"""PyTorch's thread count for prompts on a busy machine (llama3/fast/cpu_share.py): other processes'
busy cores read from /proc/stat less this process's own CPU time, here from fake /proc contents and
fake clocks; the count chosen, and set back after the prompt.  (Speed is measured, not tested:
benchmarks/busy_machine.py.)"""

import pytest
import torch

from llama3.fast import cpu_share
from llama3.fast.cpu_share import CpuShare, busy_seconds, prompt_threads, threads_for


def stat(*cpus):
    """/proc/stat's text for per-CPU (user, system, idle) ticks."""
    lines = [f"cpu  {sum(c[0] for c in cpus)} 0 {sum(c[1] for c in cpus)} {sum(c[2] for c in cpus)} 0 0 0 0 0 0"]
    lines += [f"cpu{i} {u} 0 {s} {idle} 0 0 0 0 0 0" for i, (u, s, idle) in enumerate(cpus)]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 99", "cpufreq 5"]) + "\n"


def test_busy_seconds_sums_the_per_cpu_lines_of_the_allowed_cpus():
    text = stat((100, 50, 10), (30, 20, 200), (7, 3, 0))
    assert busy_seconds(text, None, tick=0.01) == pytest.approx((2.1, 3))
    assert busy_seconds(text, {0, 2}, tick=0.01) == pytest.approx((1.6, 2))
    assert busy_seconds("cpu  1 2 3 4\nintr 5\n") is None  # no per-CPU line


def test_irq_softirq_and_steal_count_as_busy_idle_and_iowait_do_not():
    text = "cpu0 1 2 3 1000 500 4 5 6 0 0\n"
    assert busy_seconds(text, None, tick=1.0) == (21.0, 1)


class Fake:
    """A machine whose /proc/stat, clock and this process's CPU time the test moves."""

    def __init__(self, cpus=2):
        self.ticks = [[0, 0, 0] for _ in range(cpus)]
        self.wall = self.own = 0.0

    def read(self):
        return stat(*self.ticks)

    def run(self, seconds, ours, others):
        """`seconds` pass with this process busy on `ours` cores and other processes on `others`."""
        busy = (ours + others) * seconds * 100  # ticks over all CPUs, spread evenly
        for cpu in self.ticks:
            cpu[0] += round(busy / len(self.ticks))
            cpu[2] += round((len(self.ticks) * seconds * 100 - busy) / len(self.ticks))
        self.wall += seconds
        self.own += ours * seconds

    def share(self):
        return CpuShare(read_stat=self.read, own_seconds=lambda: self.own, clock=lambda: self.wall,
                        cpus={0, 1})


def test_other_processes_cores_are_busy_time_less_our_own():
    machine = Fake()
    reading = machine.share()
    machine.run(1.0, ours=1.0, others=1.0)        # `yes` on one core, ours on the other
    assert reading.update() == pytest.approx(1.0, abs=0.02)
    machine.run(0.5, ours=1.33, others=0.67)      # two threads of ours beside `yes`
    assert reading.update() == pytest.approx(0.67, abs=0.02)
    machine.run(0.5, ours=2.0, others=0.0)        # an idle machine
    assert reading.update() == pytest.approx(0.0, abs=0.02)


def test_readings_closer_than_the_minimum_interval_keep_the_estimate():
    machine = Fake()
    reading = machine.share()
    machine.run(1.0, ours=1.0, others=1.0)
    assert reading.update() == pytest.approx(1.0, abs=0.02)
    machine.run(cpu_share.MIN_INTERVAL / 4, ours=2.0, others=0.0)
    assert reading.update() == pytest.approx(1.0, abs=0.02)   # too soon: the last estimate
    machine.run(cpu_share.MIN_INTERVAL, ours=2.0, others=0.0)  # the short stretch counts in the next one
    assert reading.update() == pytest.approx(0.0, abs=0.02)


def test_no_proc_stat_means_no_one_else_is_seen():
    reading = CpuShare(read_stat=lambda: None)
    assert reading.update() == 0.0
    assert reading.threads(2) == 2


def test_threads_for_drops_a_thread_per_core_taken():
    assert threads_for(2, 0.0, 2) == 2
    assert threads_for(2, 0.4, 2) == 2      # under half a core: keep them
    assert threads_for(2, 0.67, 2) == 1     # `yes` beside two threads of ours
    assert threads_for(2, 1.0, 2) == 1
    assert threads_for(2, 2.0, 2) == 1      # never fewer than one
    assert threads_for(8, 2.0, 8) == 6
    assert threads_for(4, 1.0, 8) == 4      # enough cores left for what was asked
    assert threads_for(1, 1.0, 2) == 1


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def busy_reading():
    machine = Fake()
    reading = machine.share()
    machine.run(1.0, ours=1.0, others=1.0)
    return reading


def test_a_prompt_on_a_busy_machine_gets_fewer_threads_set_back_after(two_threads):
    with prompt_threads(128, busy_reading()) as chosen:
        assert chosen == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_set_back_after_an_error_too(two_threads):
    with pytest.raises(RuntimeError):
        with prompt_threads(128, busy_reading()):
            raise RuntimeError("in the forward")
    assert torch.get_num_threads() == 2


def test_decoding_steps_and_an_idle_machine_keep_the_threads(two_threads):
    with prompt_threads(1, busy_reading()) as chosen:          # a decoding step: the pool adapts
        assert chosen == 2 and torch.get_num_threads() == 2
    machine = Fake()
    reading = machine.share()
    machine.run(1.0, ours=2.0, others=0.0)
    with prompt_threads(128, reading) as chosen:
        assert chosen == 2 and torch.get_num_threads() == 2


def test_llama3_adapt_0_turns_it_off(two_threads, monkeypatch):
    monkeypatch.setenv("LLAMA3_ADAPT", "0")
    with prompt_threads(128, busy_reading()) as chosen:
        assert chosen == 2 and torch.get_num_threads() == 2


def test_a_count_set_by_someone_else_meanwhile_is_kept(two_threads):
    with prompt_threads(128, busy_reading()):
        torch.set_num_threads(3)   # e.g. the user, from a hook
    assert torch.get_num_threads() == 3
