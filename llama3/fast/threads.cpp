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
constexpr int64_t FIRST_SOLO_NS = 50'000'000, LAST_SOLO_NS = 2'000'000'000;

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
    int64_t solo_until = 0, solo_for = FIRST_SOLO_NS, last_loss = 0;
    int restore_threads = 0;  // during a solo stretch: the thread count to set again after it
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

void run(int64_t n, int64_t grain, ChunkFn fn, void *context) {
    Pool *p = pool;
    p->jobs.fetch_add(1, std::memory_order_relaxed);
    if (!p->caller.try_lock()) {  // another thread's job is running: this one runs on its caller
        fn(context, 0, n);
        return;
    }
    std::lock_guard<std::mutex> held(p->caller, std::adopt_lock);
    const int64_t start = now_ns();
    if (p->restore_threads) {
        if (start < p->solo_until) {
            p->solo_jobs.fetch_add(1, std::memory_order_relaxed);
            fn(context, 0, n);
            return;
        }
        at::set_num_threads(p->restore_threads);  // the solo stretch is over: try the workers again
        p->restore_threads = 0;
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
    if (p->adapts && waited > LOSS_NS && 2 * waited > end - start) {  // a worker held a chunk while it was not running
        p->losses.fetch_add(1, std::memory_order_relaxed);
        p->lost_ns.fetch_add(waited, std::memory_order_relaxed);
        const bool again = end - p->last_loss < 2 * p->solo_for + FIRST_SOLO_NS;
        p->solo_for = again ? (2 * p->solo_for < LAST_SOLO_NS ? 2 * p->solo_for : LAST_SOLO_NS) : FIRST_SOLO_NS;
        p->last_loss = end;
        p->solo_until = end + p->solo_for;
        /* PyTorch's own OpenMP regions (argmax over the logits, prompts' matrix products) wait for
         * their threads at a barrier too: they run on the caller alone for the same stretch */
        p->restore_threads = threads;
        at::set_num_threads(1);
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
