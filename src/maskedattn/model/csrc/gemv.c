/* y (M, N) = x (M, K) . W (N, K)^T + b (N), for a few rows of x.
 *
 * Decoding one token multiplies a single activation row by every weight matrix: a
 * matrix-vector product, bound by how fast the weights stream from memory (each weight is used
 * once per row of x). BLAS libraries tune for matrix-matrix products; this kernel only streams.
 * Threads take contiguous ranges of weight rows; each row is read front to back once (one
 * sequential stream the hardware prefetcher follows) and serves all M rows of x while it sits
 * in the L1 cache. Between calls a helper thread warms the shared cache with the weights the
 * next calls will read (learned from the order of the calls, see warm()).
 *
 * Each output element is computed by the same instruction sequence whatever M, the thread
 * count or the split between threads, so a row's result does not depend on its batch.
 * No PyTorch headers: Python passes pointers to contiguous tensors (maskedattn/model/gemv.py).
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#ifdef __AVX512F__
/* 16 weights as float32: loaded as they are, or bfloat16 widened (it is a float32's top half). */
static inline __m512 load_f32(const float *w, __mmask16 m) { return _mm512_maskz_loadu_ps(m, w); }
static inline __m512 load_bf16(const uint16_t *w, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, w);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#define FULL ((__mmask16)0xffff)

/* Dot product of one weight row with x. Four accumulators keep four FMAs in flight. */
#define DOT(NAME, T, LOAD)                                                                     \
    static float NAME(const T *w, const float *x, int64_t K) {                                 \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                            \
        int64_t k = 0;                                                                         \
        for (; k + 64 <= K; k += 64) {                                                         \
            a0 = _mm512_fmadd_ps(LOAD(w + k, FULL), _mm512_loadu_ps(x + k), a0);               \
            a1 = _mm512_fmadd_ps(LOAD(w + k + 16, FULL), _mm512_loadu_ps(x + k + 16), a1);     \
            a2 = _mm512_fmadd_ps(LOAD(w + k + 32, FULL), _mm512_loadu_ps(x + k + 32), a2);     \
            a3 = _mm512_fmadd_ps(LOAD(w + k + 48, FULL), _mm512_loadu_ps(x + k + 48), a3);     \
        }                                                                                      \
        for (; k < K; k += 16) {                                                               \
            __mmask16 m = K - k >= 16 ? FULL : (__mmask16)((1u << (K - k)) - 1);               \
            a0 = _mm512_fmadd_ps(LOAD(w + k, m), _mm512_maskz_loadu_ps(m, x + k), a0);         \
        }                                                                                      \
        return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))); \
    }
DOT(dot_f32, float, load_f32)
DOT(dot_bf16, uint16_t, load_bf16)
#else
/* Portable twin: 16 partial sums, a shape compilers vectorise for the CPU at hand. */
#define DOT(NAME, T, CONVERT)                                                                  \
    static float NAME(const T *w, const float *x, int64_t K) {                                 \
        float acc[16] = {0};                                                                   \
        int64_t k = 0;                                                                         \
        for (; k + 16 <= K; k += 16)                                                           \
            for (int j = 0; j < 16; j++) acc[j] += CONVERT(w[k + j]) * x[k + j];               \
        for (int j = 0; k + j < K; j++) acc[j] += CONVERT(w[k + j]) * x[k + j];                \
        float s = 0.0f;                                                                        \
        for (int j = 0; j < 16; j++) s += acc[j];                                              \
        return s;                                                                              \
    }
#define AS_IS(v) (v)
DOT(dot_f32, float, AS_IS)
DOT(dot_bf16, uint16_t, bf16_to_f32)
#endif

/* -- the thread pool ------------------------------------------------------------------------ */

typedef struct {
    void (*run)(const void *args, int64_t lo, int64_t hi); /* compute rows [lo, hi) */
    const void *args;
    int64_t rows, chunk, chunks;
} Task;

#define AHEAD_SEGS 4 /* how many of the next calls' weights are warmed */
#define CLOSED 0xffffffffu /* ticket index while the next task is being written */

static struct {
    pthread_mutex_t caller; /* held by the thread whose task the pool runs */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    Task task;
    _Atomic uint64_t ticket;    /* generation << 32 | next unclaimed chunk */
    _Atomic uint32_t generation; /* what helpers wait on */
    _Atomic int64_t unfinished; /* chunks of the task not yet computed */
    _Atomic int helpers;        /* how many helpers may join the task */
    _Atomic int sleeping;
    /* the weights the next calls will likely read, in call order: written before the
     * generation is published, read by helpers after they see it */
    struct { _Atomic(const char *) p; _Atomic int64_t bytes; } ahead[AHEAD_SEGS];
    _Atomic int n_ahead;
    int threads;                /* helpers started */
} pool = {.caller = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER};

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claim and compute chunks of the task of generation `gen` until none is left. The task is
 * read only after a successful claim: the caller cannot post the next task while a claimed
 * chunk is unfinished, so what we read is the task we claimed from. */
static void work(uint32_t gen) {
    for (;;) {
        uint64_t t = atomic_load(&pool.ticket);
        if ((uint32_t)(t >> 32) != gen) return;
        uint32_t i = (uint32_t)t;
        if (i == CLOSED || i >= pool.task.chunks) return;
        if (!atomic_compare_exchange_weak(&pool.ticket, &t, t + 1)) continue;
        int64_t lo = (int64_t)i * pool.task.chunk;
        int64_t hi = lo + pool.task.chunk < pool.task.rows ? lo + pool.task.chunk : pool.task.rows;
        pool.task.run(pool.task.args, lo, hi);
        atomic_fetch_sub(&pool.unfinished, 1);
    }
}

/* Between two products the caller computes norms, attention, residuals: the memory bus idles.
 * A helper done with its share streams (its slice of) the weights the next calls will read
 * into the shared L3 cache, in call order, until the next call arrives: a long gap (attention)
 * then warms the products after the next one too. Prefetch instructions never fault, so a
 * stale guess (weights freed since) costs nothing but bandwidth. */
#define AHEAD_MAX ((int64_t)24 << 20) /* stay well inside a 32 MiB L3 */
static void warm(uint32_t gen, int id, int helpers) {
    if (helpers <= 0) return;
    for (int s = 0; s < atomic_load(&pool.n_ahead); s++) {
        const char *p = atomic_load(&pool.ahead[s].p);
        int64_t bytes = atomic_load(&pool.ahead[s].bytes);
        int64_t lo = bytes / helpers * id, hi = id == helpers - 1 ? bytes : lo + bytes / helpers;
        for (int64_t off = lo; off < hi; off += 64) {
            if ((off & 4095) == 0 && atomic_load(&pool.generation) != gen) return;
            __builtin_prefetch(p + off, 0, 3);
        }
    }
}

/* Which weights followed which: a decode step calls its products in the same order every
 * token, so the last successor of a weight is the next call's. Written by the caller only. */
#define SUCCESSOR_BITS 9 /* 512 entries: a 12-layer model calls 49 weights */
static struct { const void *w, *next; int64_t next_bytes; } successor[1 << SUCCESSOR_BITS];
static const void *last_w;

static size_t slot(const void *w) { /* Fibonacci hashing of the 64-byte line address */
    return (uint64_t)((uintptr_t)w >> 6) * 0x9E3779B97F4A7C15ull >> (64 - SUCCESSOR_BITS);
}

static void *helper(void *arg) {
    int id = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&pool.generation);
    for (;;) {
        /* Spin a little (decode calls follow each other within microseconds), then sleep. */
        uint32_t gen = seen;
        for (int spin = 0; spin < 2000 && gen == seen; spin++) {
            relax();
            gen = atomic_load(&pool.generation);
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool.lock);
            atomic_fetch_add(&pool.sleeping, 1);
            while ((gen = atomic_load(&pool.generation)) == seen)
                pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = gen;
        if (id < atomic_load(&pool.helpers)) {
            work(gen);
            warm(gen, id, atomic_load(&pool.helpers));
        }
    }
    return NULL;
}

static void forget_threads(void) { pool.threads = 0; } /* a forked child has none */

static void parallel_rows(void (*run)(const void *, int64_t, int64_t), const void *args,
                          int64_t rows, int64_t row_bytes, int threads, const void *w) {
    /* ~256 KiB of weights per chunk: few claims, and even shares on two threads or more. */
    int64_t chunk = row_bytes >= (256 << 10) ? 1 : (256 << 10) / row_bytes;
    int64_t chunks = (rows + chunk - 1) / chunk;
    if (threads > chunks) threads = (int)chunks;
    /* ctypes releases the GIL: another Python thread may be using the pool; then go alone. */
    if (threads <= 1 || pthread_mutex_trylock(&pool.caller) != 0) {
        run(args, 0, rows);
        return;
    }
    if (pool.threads == 0) pthread_atfork(NULL, NULL, forget_threads);
    while (pool.threads < threads - 1) {
        pthread_t t;
        if (pthread_create(&t, NULL, helper, (void *)(intptr_t)pool.threads) != 0) break;
        pthread_detach(t);
        pool.threads++;
    }
    /* Close the ticket before rewriting the task: a late helper of the previous task must
     * never read the new task's chunk count against the old ticket. */
    uint32_t gen = atomic_load(&pool.generation) + 1;
    atomic_store(&pool.ticket, (uint64_t)gen << 32 | CLOSED);
    pool.task = (Task){run, args, rows, chunk, chunks};
    if (last_w) {
        size_t i = slot(last_w);
        successor[i].w = last_w, successor[i].next = w, successor[i].next_bytes = rows * row_bytes;
    }
    last_w = w;
    /* The chain of successors from w, AHEAD_MAX bytes of it, stopping where it comes back. */
    int n = 0;
    int64_t room = AHEAD_MAX;
    for (const void *at = w; n < AHEAD_SEGS && room > 0; n++) {
        size_t j = slot(at);
        if (successor[j].w != at || successor[j].next == w) break;
        int64_t bytes = successor[j].next_bytes < room ? successor[j].next_bytes : room;
        atomic_store(&pool.ahead[n].p, (const char *)successor[j].next);
        atomic_store(&pool.ahead[n].bytes, bytes);
        room -= bytes;
        at = successor[j].next;
    }
    atomic_store(&pool.n_ahead, n);
    atomic_store(&pool.helpers, threads - 1);
    atomic_store(&pool.unfinished, chunks);
    atomic_store(&pool.ticket, (uint64_t)gen << 32);
    atomic_store(&pool.generation, gen);
    /* Wake sleeping helpers, but never wait for the lock: a helper holding it is awake and
     * will see the new generation, or misses this task, which the caller does alone. */
    if (atomic_load(&pool.sleeping) > 0 && pthread_mutex_trylock(&pool.lock) == 0) {
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    work(gen);
    /* Only chunks a helper is computing remain; if it was preempted, give it the core. */
    for (int spin = 0; atomic_load(&pool.unfinished) > 0; spin++) {
        if (spin < 4096) relax();
        else sched_yield();
    }
    pthread_mutex_unlock(&pool.caller);
}

/* -- entry points ------------------------------------------------------------------------------ */

typedef struct {
    const void *x, *w, *b;
    void *y;
    int64_t M, N, K;
} Args;

static void rows_f32(const void *p, int64_t lo, int64_t hi) {
    const Args *a = p;
    const float *x = a->x, *w = a->w, *b = a->b;
    float *y = a->y;
    for (int64_t n = lo; n < hi; n++)
        for (int64_t m = 0; m < a->M; m++)
            y[m * a->N + n] = dot_f32(w + n * a->K, x + m * a->K, a->K) + (b ? b[n] : 0.0f);
}

static void rows_bf16(const void *p, int64_t lo, int64_t hi) {
    const Args *a = p;
    const float *x = a->x, *b = a->b; /* widened to float32 by gemv_bf16 */
    const uint16_t *w = a->w;
    uint16_t *y = a->y;
    for (int64_t n = lo; n < hi; n++)
        for (int64_t m = 0; m < a->M; m++)
            y[m * a->N + n] = f32_to_bf16(dot_bf16(w + n * a->K, x + m * a->K, a->K) +
                                          (b ? b[n] : 0.0f));
}

void gemv_f32(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t N,
              int64_t K, int threads) {
    Args a = {x, w, b, y, M, N, K};
    parallel_rows(rows_f32, &a, N, K * (int64_t)sizeof(float), threads, w);
}

/* bfloat16 in and out, float32 accumulation; x and b are widened once per call.
 * Returns -1 if the float32 copies cannot be allocated. */
int gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t M,
              int64_t N, int64_t K, int threads) {
    float *xf = malloc(sizeof(float) * (size_t)(M * K + (b ? N : 0)));
    if (!xf) return -1;
    float *bf = b ? xf + M * K : NULL;
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(x[i]);
    for (int64_t i = 0; b && i < N; i++) bf[i] = bf16_to_f32(b[i]);
    Args a = {xf, w, bf, y, M, N, K};
    parallel_rows(rows_bf16, &a, N, K * (int64_t)sizeof(uint16_t), threads, w);
    free(xf);
    return 0;
}
