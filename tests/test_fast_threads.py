"""The kernels' thread pool (llama3/fast/threads.h): any split of the work gives the same numbers,
and concurrent callers, a forked child and a lone thread all get whole, correct answers.

(Whether a busy machine keeps its speed is measured, not tested: benchmarks/busy_machine.py.)"""

import os
import threading

import pytest
import torch

from llama3.fast import kernels


@pytest.fixture
def lib():
    built = kernels.library()
    if built is None:
        pytest.skip(f"no C++ kernels here: {kernels.build_error()}")
    return built


def test_any_number_of_threads_gives_the_same_bits(lib):
    """Each output row is one thread's dot product whatever the split: 1, 2 and 3 threads agree
    exactly, on sizes that do and do not divide into the pool's chunks."""
    before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.randn(n, k, generator=gen), torch.randn(b, k, generator=gen))
             for n, k, b in ((1000, 64, 1), (37, 32, 3), (4096, 48, 2))]
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append([lib.matvec(x, w, None, kernels.F32, w.shape[0]) for w, x in cases])
        for other in results[1:]:
            for got, want in zip(other, results[0]):
                assert torch.equal(got, want)
        for (w, x), got in zip(cases, results[0]):
            torch.testing.assert_close(got, x @ w.t(), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_counters_count_jobs(lib):
    kernels.thread_stats(reset=True)
    w, x = torch.randn(512, 64), torch.randn(1, 64)
    for _ in range(5):
        lib.matvec(x, w, None, kernels.F32, 512)
    stats = kernels.thread_stats()
    assert stats["jobs"] == 5
    assert stats["shared_jobs"] + stats["solo_jobs"] <= 5


def test_callers_from_several_python_threads_each_get_their_answer(lib):
    """One job at a time runs on the pool; a second caller meanwhile runs its job alone."""
    gen = torch.Generator().manual_seed(1)
    work = [(torch.randn(2048, 64, generator=gen), torch.randn(1, 64, generator=gen)) for _ in range(4)]
    want = [lib.matvec(x, w, None, kernels.F32, 2048) for w, x in work]
    wrong = []

    def caller(i):
        w, x = work[i]
        for _ in range(50):
            if not torch.equal(lib.matvec(x, w, None, kernels.F32, 2048), want[i]):
                wrong.append(i)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_gets_a_pool_of_its_own(lib):
    """After fork the child has none of the parent's worker threads; its pool starts afresh
    (without that, its first parallel job would wait for threads that do not exist)."""
    w, x = torch.randn(4096, 64), torch.randn(1, 64)
    want = lib.matvec(x, w, None, kernels.F32, 4096)  # the parent's workers exist now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, then leave at once
        ok = all(torch.equal(lib.matvec(x, w, None, kernels.F32, 4096), want) for _ in range(20))
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"


def test_import_llama3_shortens_openmps_spinning_unless_told_otherwise():
    """`import llama3` before torch sets GOMP_SPINCOUNT=10000 (libgomp's default spins ~8 ms after each
    region on the core the kernels' pool needs); a user's GOMP_SPINCOUNT or OMP_WAIT_POLICY stays, and
    nothing is set once torch is imported (libgomp has read its settings then)."""
    import os
    import subprocess
    import sys

    code = "import os, sys; {}; import llama3, torch; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}

    runs = [("pass", {}), ("pass", {"GOMP_SPINCOUNT": "5"}), ("pass", {"OMP_WAIT_POLICY": "active"}),
            ("import torch", {})]
    # four fresh interpreters at once (each pays a torch import; one at a time left a core idle)
    procs = [subprocess.Popen([sys.executable, "-c", code.format(pre)], env={**env, **extra}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for pre, extra in runs]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        outs.append(out.strip())
    assert outs == ["10000", "5", "None", "None"]


def test_import_llama3_puts_big_tensors_in_huge_pages_unless_told_otherwise():
    """`import llama3` before torch sets THP_MEM_ALLOC_ENABLE=1: a 64 MiB tensor then lies (mostly) in
    2 MiB pages (/proc/self/smaps' AnonHugePages of its mapping); with the user's =0 it does not."""
    import os
    import subprocess
    import sys

    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        mode = ""
    if "[never]" in mode or not mode:
        pytest.skip("this kernel gives no transparent huge pages")
    code = """if True:
        import os, llama3, torch
        x = torch.empty(64 << 20, dtype=torch.uint8); x.fill_(1)
        start = x.data_ptr()
        huge, inside = 0, False
        for line in open("/proc/self/smaps"):
            if "-" in line.split()[0] and not line.startswith(("Anon", "Size")):
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                inside = lo <= start < hi
            elif inside and line.startswith("AnonHugePages:"):
                huge = int(line.split()[1])
        print(os.environ.get("THP_MEM_ALLOC_ENABLE"), huge)"""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}

    # both interpreters at once (each pays a torch import)
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, **extra}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for extra in ({}, {"THP_MEM_ALLOC_ENABLE": "0"})]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        flag, huge_kib = out.split()
        results.append((flag, int(huge_kib)))
    (flag, huge), (flag0, huge0) = results
    assert flag == "1" and huge >= 32 << 10, huge      # at least half of the 64 MiB in huge pages
    assert flag0 == "0" and huge0 < 32 << 10, huge0

@pytest.mark.parametrize("threads", range(1, 9))
def test_every_item_of_a_job_runs_exactly_once_however_shares_are_taken(lib, threads):
    """Each thread takes its own share of a job's chunks, then what is left of the others': on odd
    sizes and grains, with items slow enough that threads take from each other's shares, every item
    runs once."""
    for n, grain, spin_ns in ((1, 1, 0), (7, 1, 2000), (37, 3, 1000), (1000, 1, 200), (4099, 16, 0)):
        counts = lib.pool_cover(n, grain, threads, 0, spin_ns)
        assert counts.shape == (n,) and bool((counts == 1).all()), (n, grain, threads)


def test_a_worker_that_never_runs_does_not_stall_a_job(lib):
    """Workers that claim nothing (as ones the OS does not run) leave their shares to the caller:
    the job still finishes, every item once, and no worker chunk is counted.  In a child process
    with a time limit: the call holds the GIL, so a job that stalls would hang this process
    (a thread's join(timeout) never gets to run), not fail."""
    import subprocess
    import sys

    code = ("import llama3, torch; from llama3.fast import kernels; lib = kernels.library(); "
            "kernels.thread_stats(reset=True); counts = lib.pool_cover(999, 1, 4, 3, 100); "
            "print(bool((counts == 1).all()), int(kernels.thread_stats()['worker_chunks']))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the job waited for workers that never ran")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "0"]
