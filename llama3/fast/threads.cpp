/* The kernels' thread pool: see threads.h for why and how it is used.
 *
 * One job at a time.  Its state is one 64-bit word, `ticket`: (generation: 24 bits, chunks: 20
 * bits, next chunk: 20 bits).  A thread claims chunk i by moving the word from (g, c, i) to
 * (g, c, i + 1) with a compare-and-swap, so a claim that succeeds is a claim in the job that is
 * running, whatever the claimer saw before; the job's function and range, written before the
 * word was published, cannot change while a chunk of it is unfinished.  `done` counts finished
 * chunks; the caller returns when it equals c.
 */
#include "threads.h"

#include <ATen/Parallel.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LLAMA3_PAUSE() _mm_pause()
#else
#define LLAMA3_PAUSE() std::this_thread::yield()
#endif

namespace LLAMA3_NS {
namespace threads {
namespace {

constexpr int MAX_WORKERS = 255;
constexpr int CHUNKS_PER_THREAD = 8;                   // small chunks: a pre-empted worker holds little
constexpr int64_t LOSS_NS = 100'000;                   // waiting this long, and half the job, is a loss
constexpr int64_t WINDOW_NS = 50'000'000;              // losses are summed over windows this long...
constexpr int64_t LOST_PER_WINDOW = 20;                // ... and a window losing 1/20 of its time starts a probe
constexpr int64_t TRY_NS = 20'000'000;                 // a probe (solo) or a trial (shared) lasts this long
constexpr int64_t TRY_JOBS = 64;                       // ... and compares at least this many jobs
constexpr int64_t FIRST_SOLO_NS = 50'000'000, LAST_SOLO_NS = 2'000'000'000;
constexpr int TIMES = 512;                             // entries of the table of typical job times

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

int64_t spin_ns() {  // LLAMA3_SPIN_US: how long an idle worker spins before it sleeps (default 50)
    const char *text = std::getenv("LLAMA3_SPIN_US");
    const long us = text ? std::atol(text) : 50;
    return (us < 0 ? 0 : us) * 1000;
}

bool adapt() {  // LLAMA3_ADAPT=0: never fall back to the caller alone (to measure what adapting gains)
    const char *text = std::getenv("LLAMA3_ADAPT");
    return !(text && text[0] == '0');
}

uint64_t make_ticket(uint64_t generation, uint64_t chunks, uint64_t next) {
    return (generation & 0xFFFFFF) << 40 | (chunks & 0xFFFFF) << 20 | (next & 0xFFFFF);
}
uint64_t generation_of(uint64_t t) { return t >> 40; }
uint64_t chunks_of(uint64_t t) { return (t >> 20) & 0xFFFFF; }
uint64_t next_of(uint64_t t) { return t & 0xFFFFF; }

/* How the pool runs jobs now.  shared: on the caller and the workers, losses summed per window;
 * probe: on the caller alone for TRY_NS, to see whether that is faster; solo: on the caller alone
 * for a stretch; trial: shared again for TRY_NS, to see whether that is faster now. */
enum class Mode { shared, probe, solo, trial };

/* A kind of job's typical time (ns, a running mean over the last few) run shared and run alone: a
 * probe's solo jobs are set against the shared time of the same kinds of job (and a trial's the
 * other way round), so a comparison does not depend on which of a step's jobs it happened to see.
 * A kind: the chunk function (one per kernel) and the job's size. */
struct JobTime {
    ChunkFn fn = nullptr;
    int64_t n = -1;
    int64_t shared = 0, solo = 0;  // 0: not seen that way yet
};

struct Pool {
    alignas(64) std::atomic<uint64_t> ticket{0};
    alignas(64) std::atomic<int64_t> done{0};
    alignas(64) std::atomic<ChunkFn> fn{nullptr};
    std::atomic<void *> context{nullptr};
    std::atomic<int64_t> items{0};
    std::atomic<int> helpers{0};  // workers with an index below this may claim chunks
    std::atomic<int> sleepers{0};
    std::mutex sleep_mutex;
    std::condition_variable wake;
    std::mutex caller;  // held by the thread whose job runs
    int workers = 0;
    int64_t spin = spin_ns();
    bool adapts = adapt();
    // adapting to the CPU the process gets (touched by the caller only, under `caller`)
    Mode mode = Mode::shared;
    int64_t window_start = 0, window_lost = 0;  // shared: this window's start and its time lost waiting
    int64_t mode_until = 0, solo_for = FIRST_SOLO_NS;
    int64_t compared = 0, shared_sum = 0, solo_sum = 0;  // a probe's or a trial's jobs, timed both ways
    int restore_threads = 0;  // while jobs run on the caller alone: the thread count to set again after
    JobTime times[TIMES];
    std::atomic<int64_t> jobs{0}, shared_jobs{0}, worker_chunks{0}, losses{0}, solo_jobs{0}, lost_ns{0};
};

Pool *pool = new Pool;  // never destroyed: workers may still be spinning when the process exits

void run_chunk(Pool *p, uint64_t chunks, uint64_t i) {
    const int64_t items = p->items.load(std::memory_order_relaxed);
    const int64_t begin = items * (int64_t)i / (int64_t)chunks, end = items * (int64_t)(i + 1) / (int64_t)chunks;
    p->fn.load(std::memory_order_relaxed)(p->context.load(std::memory_order_relaxed), begin, end);
    p->done.fetch_add(1, std::memory_order_acq_rel);
}

/* Claim and run chunks of the current job until none is left; returns how many this thread ran. */
int64_t work(Pool *p) {
    int64_t ran = 0;
    uint64_t t = p->ticket.load(std::memory_order_acquire);
    while (next_of(t) < chunks_of(t)) {
        if (p->ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
            run_chunk(p, chunks_of(t), next_of(t));
            ran++;
            t = p->ticket.load(std::memory_order_acquire);
        }
    }
    return ran;
}

void worker_loop(Pool *p, int index) {
    uint64_t seen = generation_of(p->ticket.load(std::memory_order_acquire));
    for (;;) {
        int64_t spun_since = now_ns();
        for (int spins = 0;; spins++) {
            const uint64_t t = p->ticket.load(std::memory_order_acquire);
            if (generation_of(t) != seen) {
                seen = generation_of(t);
                if (index < p->helpers.load(std::memory_order_relaxed)) {
                    const int64_t ran = work(p);
                    if (ran) p->worker_chunks.fetch_add(ran, std::memory_order_relaxed);
                }
                spun_since = now_ns();
                spins = 0;
                continue;
            }
            LLAMA3_PAUSE();
            if ((spins & 63) == 63 && now_ns() - spun_since > p->spin) break;
        }
        std::unique_lock<std::mutex> lock(p->sleep_mutex);
        p->sleepers.fetch_add(1, std::memory_order_seq_cst);
        p->wake.wait(lock, [&] { return generation_of(p->ticket.load(std::memory_order_seq_cst)) != seen; });
        p->sleepers.fetch_sub(1, std::memory_order_relaxed);
    }
}

void start_workers(Pool *p, int wanted) {
    for (; p->workers < wanted && p->workers < MAX_WORKERS; p->workers++) std::thread(worker_loop, p, p->workers).detach();
}

void after_fork_in_child() {  // the child has none of the parent's threads: start afresh
    pool = new Pool;
}

struct AtFork {
    AtFork() { pthread_atfork(nullptr, nullptr, after_fork_in_child); }
} at_fork;

}  // namespace

namespace {

JobTime &time_of(Pool *p, ChunkFn fn, int64_t n) {
    const uint64_t h = ((uint64_t)(uintptr_t)fn >> 4) * 0x9E3779B97F4A7C15ull ^ (uint64_t)n * 0xC2B2AE3D27D4EB4Full;
    JobTime &t = p->times[(h >> 32) % TIMES];
    if (t.fn != fn || t.n != n) t = JobTime{fn, n, 0, 0};  // a collision forgets the other kind
    return t;
}

void remember(int64_t &mean, int64_t took) { mean = mean ? mean + (took - mean) / 4 : took; }

void go_solo(Pool *p, int threads) {
    /* PyTorch's own OpenMP regions (argmax over the logits, prompts' matrix products) wait for their
     * threads at a barrier too: they run on the caller alone as well */
    p->restore_threads = threads;
    at::set_num_threads(1);
}

void go_shared(Pool *p) {
    /* set back only what going solo set: a thread count the user chose meanwhile stays */
    if (p->restore_threads && at::get_num_threads() == 1) at::set_num_threads(p->restore_threads);
    p->restore_threads = 0;
}

void begin(Pool *p, Mode mode, int64_t now, int64_t length) {
    p->mode = mode;
    p->mode_until = now + length;
    p->compared = p->shared_sum = p->solo_sum = 0;
    if (mode == Mode::shared) p->window_start = now, p->window_lost = 0;
}

/* A probe or a trial has run its time: which way was faster, on the same kinds of job? */
void decide(Pool *p, int64_t now) {
    if (p->compared < TRY_JOBS && now < p->mode_until + 10 * TRY_NS) return;  // too few jobs to tell yet
    const bool solo_wins = p->compared && p->solo_sum < p->shared_sum;
    if (!solo_wins) {
        go_shared(p);
        p->solo_for = FIRST_SOLO_NS;
        begin(p, Mode::shared, now, 0);
        return;
    }
    if (p->mode == Mode::trial) p->solo_for = 2 * p->solo_for < LAST_SOLO_NS ? 2 * p->solo_for : LAST_SOLO_NS;
    if (!p->restore_threads) go_solo(p, at::get_num_threads());
    begin(p, Mode::solo, now, p->solo_for);
}

void run_alone(Pool *p, int64_t n, ChunkFn fn, void *context, int64_t start) {
    p->solo_jobs.fetch_add(1, std::memory_order_relaxed);
    fn(context, 0, n);
    const int64_t end = now_ns();
    JobTime &t = time_of(p, fn, n);
    if (p->mode == Mode::probe && t.shared) p->compared++, p->solo_sum += end - start, p->shared_sum += t.shared;
    remember(t.solo, end - start);
    if (p->mode == Mode::probe && end >= p->mode_until) decide(p, end);
    else if (p->mode == Mode::solo && end >= p->mode_until) {  // the stretch is over: try the workers again
        const int threads = p->restore_threads;
        go_shared(p);
        begin(p, threads > 1 ? Mode::trial : Mode::shared, end, TRY_NS);
    }
}

}  // namespace

void run(int64_t n, int64_t grain, ChunkFn fn, void *context) {
    Pool *p = pool;
    p->jobs.fetch_add(1, std::memory_order_relaxed);
    if (!p->caller.try_lock()) {  // another thread's job is running: this one runs on its caller
        fn(context, 0, n);
        return;
    }
    std::lock_guard<std::mutex> held(p->caller, std::adopt_lock);
    const int64_t start = now_ns();
    if (p->mode == Mode::probe || p->mode == Mode::solo) {
        if (n > grain) return run_alone(p, n, fn, context, start);
        fn(context, 0, n);  // one chunk: alone either way
        return;
    }
    const int threads = at::get_num_threads();
    int64_t chunks = (n + grain - 1) / grain;
    if (chunks > (int64_t)threads * CHUNKS_PER_THREAD) chunks = (int64_t)threads * CHUNKS_PER_THREAD;
    if (threads <= 1 || chunks <= 1) {
        fn(context, 0, n);
        return;
    }
    start_workers(p, threads - 1);
    p->fn.store(fn, std::memory_order_relaxed);
    p->context.store(context, std::memory_order_relaxed);
    p->items.store(n, std::memory_order_relaxed);
    p->helpers.store(threads - 1, std::memory_order_relaxed);
    p->done.store(0, std::memory_order_relaxed);
    const uint64_t generation = generation_of(p->ticket.load(std::memory_order_relaxed)) + 1;
    p->ticket.store(make_ticket(generation, chunks, 0), std::memory_order_seq_cst);
    if (p->sleepers.load(std::memory_order_seq_cst) > 0) {
        std::lock_guard<std::mutex> lock(p->sleep_mutex);
        p->wake.notify_all();
    }
    p->shared_jobs.fetch_add(1, std::memory_order_relaxed);
    work(p);
    const int64_t mine_done = now_ns();
    while (p->done.load(std::memory_order_acquire) < chunks) LLAMA3_PAUSE();
    const int64_t end = now_ns(), waited = end - mine_done;
    const bool lost = waited > LOSS_NS && 2 * waited > end - start;  // a worker held a chunk while it was not running
    if (lost) {
        p->losses.fetch_add(1, std::memory_order_relaxed);
        p->lost_ns.fetch_add(waited, std::memory_order_relaxed);
    }
    if (!p->adapts) return;
    JobTime &t = time_of(p, fn, n);
    if (p->mode == Mode::trial && t.solo) p->compared++, p->shared_sum += end - start, p->solo_sum += t.solo;
    remember(t.shared, end - start);
    if (p->mode == Mode::trial) {
        if (end >= p->mode_until) decide(p, end);
        return;
    }
    if (lost) p->window_lost += waited;
    if (end - p->window_start >= WINDOW_NS) {  // a window is over: did it lose enough time to try alone?
        const bool probe = LOST_PER_WINDOW * p->window_lost > end - p->window_start;
        if (probe) go_solo(p, threads);
        begin(p, probe ? Mode::probe : Mode::shared, end, TRY_NS);
    }
}

Stats stats() {
    Pool *p = pool;
    return Stats{p->jobs.load(), p->shared_jobs.load(), p->worker_chunks.load(), p->losses.load(),
                 p->solo_jobs.load(), p->lost_ns.load() * 1e-9};
}

void reset_stats() {
    Pool *p = pool;
    for (auto *counter : {&p->jobs, &p->shared_jobs, &p->worker_chunks, &p->losses, &p->solo_jobs, &p->lost_ns})
        counter->store(0);
}

}  // namespace threads
}  // namespace LLAMA3_NS
