/* The kernels' own thread pool (threads.cpp): work split into chunks that threads claim one at a
 * time, so a thread the operating system did not run costs nothing.
 *
 * Why not at::parallel_for (OpenMP): an OpenMP region waits at its closing barrier for every thread
 * it started.  On a 2-core machine with one core taken by another process, the second thread is
 * often not running when a region opens, and the region waits milliseconds for it; decoding one
 * token opens ~200 of them, and the old C step fell from 52 to 3.3 tokens/s.  Here the calling
 * thread claims chunks as well and only waits for chunks another thread has claimed and not
 * finished; a worker that has not woken yet claims nothing.  When the caller still loses time
 * waiting (a worker pre-empted halfway through a chunk) for more than 1/20 of a 50 ms window, the
 * pool tries running jobs on the caller alone for 20 ms and compares, kind of job by kind of job
 * (kernel and size), with the same jobs' recent shared times: alone wins only when it is faster.
 * Then it stays alone for a stretch (50 ms, doubling while alone keeps winning, up to 2 s) and
 * tries its workers again for 20 ms the same way.  A quiet machine's rare pre-emptions (a
 * hypervisor's) start no probe, or one that shared wins; the single-loss trigger used before ran
 * 36-69% of an idle benchmark's jobs alone (fp32 decode 27.6 against 36.0 tok/s without adapting).
 * LLAMA3_ADAPT=0 turns adapting off, to measure what it gains.  While alone it also sets PyTorch's
 * thread count to 1 (at::set_num_threads: its OpenMP regions wait at the same kind of barrier) and
 * sets it back after, unless the thread count was changed meanwhile.
 *
 * Threads: `at::get_num_threads()` (torch.set_num_threads, `--threads`), read at every call.
 * Workers spin ~50 us after a job (a replayed decoding step calls a kernel every few microseconds),
 * then sleep, leaving the cores to PyTorch's own OpenMP threads (prompts' matrix products).  One
 * job at a time: a call made while another thread's job
 * runs (a second Python thread) runs on its caller alone.
 *
 * Usage, from any kernel source built into the same extension (kernels.py's SOURCES):
 *     llama3_threads::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { ... });
 */
#pragma once

#include <cstdint>

#ifndef LLAMA3_NS
#define LLAMA3_NS llama3
#endif

namespace LLAMA3_NS {
namespace threads {

using ChunkFn = void (*)(void *context, int64_t begin, int64_t end);

/* Runs fn(context, begin, end) over [0, n) in chunks of at least `grain` items, on the caller and
 * the pool's workers; returns when all of [0, n) is done. */
void run(int64_t n, int64_t grain, ChunkFn fn, void *context);

struct Stats {
    int64_t jobs;          // calls of run()
    int64_t shared_jobs;   // ... that workers were offered
    int64_t worker_chunks; // chunks workers ran
    int64_t losses;        // shared jobs whose caller waited long for a worker's chunk
    int64_t solo_jobs;     // jobs run on the caller alone because of recent losses
    double lost_seconds;   // the caller's time waiting for workers' chunks, over losses
};
Stats stats();
void reset_stats();

/* Testing: the `count` highest-numbered workers claim nothing from now on (as workers the OS never
 * runs), so their shares are left to the others to take; 0 (the default) undoes it. */
void absent_workers(int count);

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F &f) {
    if (end <= begin) return;
    struct Context {
        const F *f;
        int64_t begin;
    } context{&f, begin};
    run(end - begin, grain < 1 ? 1 : grain,
        [](void *c, int64_t b, int64_t e) {
            const Context *ctx = (const Context *)c;
            (*ctx->f)(ctx->begin + b, ctx->begin + e);
        },
        &context);
}

}  // namespace threads
}  // namespace LLAMA3_NS

namespace llama3_threads = LLAMA3_NS::threads;
