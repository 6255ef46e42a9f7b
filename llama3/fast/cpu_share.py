"""How many cores other processes keep busy, and PyTorch's thread count for a prompt from it.

    with prompt_threads(tokens.numel()):   # around a forward over a prompt (generate, the engine, bench)
        logits = model(tokens, ...)

Why: a prompt's matrix products, attention and norms are PyTorch's own kernels, parallel through
OpenMP regions that wait at a barrier for every thread they started.  With one of two cores taken
by another process, the thread sharing that core is often not running, and every region waits for
it: prefill fell to 0.30x of one thread's speed on an idle machine (benchmarks/busy_machine.py,
`yes > /dev/null` on one core).  The kernels' own pool (threads.h) notices such losses while
decoding and drops PyTorch's count to 1 for a while, but a prompt usually comes first.

So before a prompt's forward this reads the CPU time the machine spent since the last reading
(/proc/stat, the CPUs this process may run on: `os.sched_getaffinity`) less this process's own
(`time.process_time`): what is left is other processes' work, in cores.  When that rounds to one
core or more, PyTorch gets that many threads fewer (at least one) for the forward, and its count
is set back after.  Readings less than 0.1 s apart keep the last estimate (/proc/stat counts in
1/100 s ticks).  No /proc/stat (not Linux): nothing changes.  LLAMA3_ADAPT=0 turns it off, as it
turns off the pool's own adapting.  Decoding steps (few rows) are left to the pool.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import torch

PROMPT_ROWS = 32        # forwards over more token rows than this are prompts (decoding: the pool adapts)
MIN_INTERVAL = 0.1      # s between readings that update the estimate
TICK = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system (idle iowait) irq softirq steal; guest is in user


def busy_seconds(stat: str, cpus: set[int] | None = None, tick: float = TICK) -> tuple[float, int] | None:
    """(CPU seconds spent busy, number of CPUs counted) from /proc/stat's text, summed over the
    per-CPU lines of `cpus` (every CPU if None); None where the text has no per-CPU line."""
    total, counted = 0, 0
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in rest.split()]
        total += sum(values[i] for i in BUSY_FIELDS if i < len(values))
        counted += 1
    return (total * tick, counted) if counted else None


def threads_for(requested: int, others: float, cpus: int) -> int:
    """PyTorch's thread count for a prompt when other processes keep `others` of `cpus` cores busy:
    `requested` while they take less than half a core, else one fewer per core taken (at least 1)."""
    taken = int(others + 0.5)
    if taken <= 0 or requested <= 1:
        return requested
    return max(1, min(requested, cpus - taken))


class CpuShare:
    """Other processes' busy cores, measured between readings (`update`); see the module docstring.
    `read_stat`, `own_seconds`, `clock` and `cpus` are there for tests (fake /proc contents)."""

    def __init__(self, read_stat=None, own_seconds=time.process_time, clock=time.monotonic, cpus=None):
        self.read_stat = read_stat or _read_proc_stat
        self.own_seconds, self.clock = own_seconds, clock
        self.cpus = cpus if cpus is not None else _allowed_cpus()
        self.others = 0.0           # cores other processes kept busy over the last interval
        self.lock = threading.Lock()
        self.last = self._sample()  # (wall s, busy CPU s, own CPU s, CPUs) or None: nothing to read

    def _sample(self):
        text = self.read_stat()
        busy = busy_seconds(text, self.cpus) if text else None
        return None if busy is None else (self.clock(), busy[0], self.own_seconds(), busy[1])

    def update(self) -> float:
        """Cores other processes kept busy since the last reading that counted (the last estimate
        where that was under MIN_INTERVAL ago, 0.0 where /proc/stat cannot be read)."""
        with self.lock:
            if self.last is None:
                return self.others
            now = self.clock()
            if now - self.last[0] < MIN_INTERVAL:
                return self.others
            sample = self._sample()
            if sample is None:
                return self.others
            wall, busy, own = (sample[i] - self.last[i] for i in range(3))
            self.last = sample
            if wall <= 0 or own < 0 or busy < 0:  # a clock or counter started again: a new baseline
                return self.others
            self.others = min(float(sample[3]), max(0.0, (busy - own) / wall))
            return self.others

    def threads(self, requested: int) -> int:
        """PyTorch's thread count for a prompt now (`threads_for` over a fresh reading)."""
        others = self.update()
        return threads_for(requested, others, self.last[3] if self.last else requested)


def _read_proc_stat() -> str | None:
    try:
        with open("/proc/stat") as f:
            return f.read()
    except OSError:
        return None


def _allowed_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def adapting() -> bool:
    """LLAMA3_ADAPT=0 turns adapting to a busy machine off (here and in the kernels' pool)."""
    return not os.environ.get("LLAMA3_ADAPT", "1").startswith("0")


_share: CpuShare | None = None
_share_lock = threading.Lock()


def share() -> CpuShare:
    """This process's reading (the first is taken at import, so the first prompt already has an
    interval behind it: loading the model)."""
    global _share
    with _share_lock:
        if _share is None:
            _share = CpuShare()
        return _share


def _fresh_in_child() -> None:  # a forked child's own CPU time starts again from zero
    global _share, _share_lock
    _share_lock = threading.Lock()  # (another thread may have held the old one at the fork)
    _share = CpuShare()


share()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_in_child)


@contextmanager
def prompt_threads(rows: int, reading: CpuShare | None = None):
    """Around a forward over `rows` token rows: for a prompt (more than PROMPT_ROWS), PyTorch's
    thread count lowered by the cores other processes keep busy, set back after."""
    before = torch.get_num_threads()
    if rows <= PROMPT_ROWS or before <= 1 or not adapting():
        yield before
        return
    chosen = (reading or share()).threads(before)
    if chosen == before:
        yield before
        return
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        if torch.get_num_threads() == chosen:  # unless something else set it meanwhile
            torch.set_num_threads(before)
