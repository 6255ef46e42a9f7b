/* The kernels' thread pool: see threads.h for why and how it is used.
 *
 * One job at a time, announced by one 64-bit word, `ticket`: (generation: 24 bits, chunks: 20 bits,
 * 0).  Its chunks are dealt out in contiguous shares, one a thread (the caller's is share 0, worker
 * w's share w + 1), each share one word of its own cache line: (generation, end, next chunk).  A
 * thread claims chunk i of a share by moving its word from (g, e, i) to (g, e, i + 1) with a
 * compare-and-swap, so a claim that succeeds is a claim in the job that is running, whatever the
 * claimer saw before; the job's function and range, written before the ticket was published,
 * cannot change while a chunk of it is unfinished.  A thread claims from its own share first (a
 * word no other thread touches while that thread keeps up: no cache line moves between cores a
 * chunk), then takes what is left of the others' shares, chunk by chunk: a worker the OS does not
 * run claims nothing, and the others do its share.  `done` counts the workers' finished chunks,
 * each worker adding its count once, when it finds nothing left to claim (not once a chunk); the
 * caller returns when it equals the chunks it did not run itself.
 */
#include "threads.h"

#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>
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

struct alignas(64) Share {
    std::atomic<uint64_t> word{0};  // (generation, end, next chunk), as make_ticket packs them
};

struct Pool {
    alignas(64) std::atomic<uint64_t> ticket{0};
    Share shares[MAX_WORKERS + 1];
    std::atomic<int> absent{0};  // testing: this many of the highest workers claim nothing (absent_workers)
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
    /* counters: written by the caller under `caller` only (a relaxed load and store, no locked
     * instruction), but `jobs_busy`, jobs whose caller found another job running */
    std::atomic<int64_t> jobs{0}, shared_jobs{0}, worker_chunks{0}, losses{0}, solo_jobs{0}, lost_ns{0};
    std::atomic<int64_t> jobs_busy{0};
};

void bump(std::atomic<int64_t> &counter, int64_t by = 1) {  // the caller's counters (under `caller`)
    counter.store(counter.load(std::memory_order_relaxed) + by, std::memory_order_relaxed);
}

Pool *pool = new Pool;  // never destroyed: workers may still be spinning when the process exits

/* Claim one chunk of share `s` of job `generation`: its index, or -1 if none is left there. */
int64_t claim(Pool *p, int s, uint64_t generation) {
    std::atomic<uint64_t> &word = p->shares[s].word;
    uint64_t t = word.load(std::memory_order_acquire);
    while (generation_of(t) == generation && next_of(t) < chunks_of(t)) {
        if (word.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire))
            return (int64_t)next_of(t);
    }
    return -1;
}

/* Run chunks of job `generation` (`chunks` of them, `shares` shares) until none is left, own share
 * `self` first, then the others' from the next one on; returns how many this thread ran. */
int64_t work(Pool *p, uint64_t generation, uint64_t chunks, int shares, int self) {
    const int64_t items = p->items.load(std::memory_order_relaxed);
    ChunkFn fn = nullptr;
    void *context = nullptr;
    int64_t ran = 0;
    for (int k = 0; k < shares; k++) {
        const int s = self + k < shares ? self + k : self + k - shares;
        for (int64_t i; (i = claim(p, s, generation)) >= 0; ran++) {
            if (!fn) fn = p->fn.load(std::memory_order_relaxed), context = p->context.load(std::memory_order_relaxed);
            fn(context, items * i / (int64_t)chunks, items * (i + 1) / (int64_t)chunks);
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
                const int helpers = p->helpers.load(std::memory_order_relaxed);
                if (index < helpers - p->absent.load(std::memory_order_relaxed)) {
                    const int64_t ran = work(p, seen, chunks_of(t), helpers + 1, index + 1);
                    if (ran) p->done.fetch_add(ran, std::memory_order_release);
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
    bump(p->solo_jobs);
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
    if (!p->caller.try_lock()) {  // another thread's job is running: this one runs on its caller
        p->jobs_busy.fetch_add(1, std::memory_order_relaxed);
        fn(context, 0, n);
        return;
    }
    std::lock_guard<std::mutex> held(p->caller, std::adopt_lock);
    bump(p->jobs);
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
    const int shares = chunks < threads ? (int)chunks : threads;  // a share holds one chunk at least
    p->fn.store(fn, std::memory_order_relaxed);
    p->context.store(context, std::memory_order_relaxed);
    p->items.store(n, std::memory_order_relaxed);
    p->helpers.store(shares - 1, std::memory_order_relaxed);
    p->done.store(0, std::memory_order_relaxed);
    const uint64_t generation = (generation_of(p->ticket.load(std::memory_order_relaxed)) + 1) & 0xFFFFFF;
    for (int s = 0; s < shares; s++)
        p->shares[s].word.store(make_ticket(generation, chunks * (s + 1) / shares, chunks * s / shares),
                                std::memory_order_relaxed);
    p->ticket.store(make_ticket(generation, chunks, 0), std::memory_order_seq_cst);
    if (p->sleepers.load(std::memory_order_seq_cst) > 0) {
        std::lock_guard<std::mutex> lock(p->sleep_mutex);
        p->wake.notify_all();
    }
    bump(p->shared_jobs);
    const int64_t theirs = chunks - work(p, generation, chunks, shares, 0);
    bump(p->worker_chunks, theirs);
    int64_t end, waited = 0;
    if (p->done.load(std::memory_order_acquire) < theirs) {  // wait for workers' chunks (clocked)
        const int64_t mine_done = now_ns();
        while (p->done.load(std::memory_order_acquire) < theirs) LLAMA3_PAUSE();
        end = now_ns(), waited = end - mine_done;
    } else {
        end = now_ns();
    }
    const bool lost = waited > LOSS_NS && 2 * waited > end - start;  // a worker held a chunk while it was not running
    if (lost) {
        bump(p->losses);
        bump(p->lost_ns, waited);
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

void absent_workers(int count) { pool->absent.store(count < 0 ? 0 : count, std::memory_order_relaxed); }

Stats stats() {
    Pool *p = pool;
    return Stats{p->jobs.load() + p->jobs_busy.load(), p->shared_jobs.load(), p->worker_chunks.load(), p->losses.load(),
                 p->solo_jobs.load(), p->lost_ns.load() * 1e-9};
}

void reset_stats() {
    Pool *p = pool;
    for (auto *counter : {&p->jobs, &p->jobs_busy, &p->shared_jobs, &p->worker_chunks, &p->losses, &p->solo_jobs,
                          &p->lost_ns})
        counter->store(0);
}

}  // namespace threads
}  // namespace LLAMA3_NS

namespace {

/* Testing (tests/test_fast_threads.py): run a job of n items in chunks of `grain` on `threads`
 * threads, `absent` of its workers claiming nothing, each item spinning `spin_ns`; returns how many
 * times each item was run (all ones when every item is covered exactly once). */
at::Tensor pool_cover(int64_t n, int64_t grain, int64_t threads, int64_t absent, int64_t spin_ns) {
    TORCH_CHECK(n >= 0 && grain >= 1 && threads >= 1 && absent >= 0, "pool_cover: bad arguments");
    at::Tensor counts = at::zeros({n}, at::kInt);
    int32_t *data = counts.data_ptr<int32_t>();
    const int before = at::get_num_threads();
    at::set_num_threads((int)threads);
    LLAMA3_NS::threads::absent_workers((int)absent);
    LLAMA3_NS::threads::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; i++) {
            const int64_t until = LLAMA3_NS::threads::now_ns() + spin_ns;
            while (spin_ns && LLAMA3_NS::threads::now_ns() < until) LLAMA3_PAUSE();
            __atomic_fetch_add(data + i, 1, __ATOMIC_RELAXED);
        }
    });
    LLAMA3_NS::threads::absent_workers(0);
    at::set_num_threads(before);
    return counts;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(LLAMA3_NS, m) {
    m.def("pool_cover(int n, int grain, int threads, int absent=0, int spin_ns=0) -> Tensor", TORCH_FN(pool_cover));
}
