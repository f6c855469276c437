/* kvtier's CPU kernels: what the Triton kernels do on a GPU, for a CPU (see native.py).
 *
 * Each function equals a PyTorch reference (named beside it) up to float rounding. Pointers are to the first
 * element; strides are in elements. Sums over channels run in eight-float vectors (v8, below) reduced at the end,
 * so they vectorize without the compiler reassociating a float sum.
 */
#define _POSIX_C_SOURCE 199309L  /* clock_gettime under -std=c11 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_ROWS 64  /* query rows (group x query tokens) one call handles; native.py checks it */
#define MAX_DIM 512  /* channels; native.py checks it */
/* Below this much work (query rows x tokens, about a head_dim of multiply-adds each: some microseconds)
 * a kernel runs on one thread: waking the others would cost more than they save. Built
 * with OpenMP (native.py tries that first), the loops marked `omp parallel` run on torch's own thread pool (the
 * process's one libgomp), as many threads as torch.get_num_threads(). */
#define PARALLEL_WORK 2048
#define PROBS_CHUNK 256  /* pages one work item of kvt_page_probs_f32 sums */
#define MIX_CHUNK 512    /* columns one work item of kvt_attention_f32 attends */
#define MAX_TOKENS 8     /* query tokens of one kvt_attention_f32 call (a decode step has one or two) */

/* Threads pay only while the cores are ours. Where another process competes for them, a thread of a parallel
 * loop can start a scheduler slice (milliseconds) after the others, and the loop waits for it at its end: a step
 * of a few dozen such loops grows many times slower. So each worker notes, at its first item, how late it
 * started; after two loops within LATE_WINDOW_NS with a late worker (one could be a stray wake-up) the loops take
 * half as many threads for contention_hold_ns, then try all of torch's threads again. */
#define LATE_WINDOW_NS 100000000
static int64_t contention_lag_ns = 1000000, contention_hold_ns = 2000000000;
static int64_t reduced_until_ns, parallel_loops, contended_loops, last_late_loop;
static int reduced_team;
static _Thread_local int64_t noted_loop;

static inline int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline int most_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* The threads a loop runs on: 1 unless it has enough work to share (`big`), else torch's, or fewer during a
 * spell of contention. Its start time goes to *loop (see note_start). */
static inline int team_for(int big, int64_t *loop) {
    *loop = now_ns();
    if (!big) return 1;
    int team = most_threads();
    if (*loop < __atomic_load_n(&reduced_until_ns, __ATOMIC_RELAXED)) {
        int reduced = __atomic_load_n(&reduced_team, __ATOMIC_RELAXED);
        team = reduced < team ? reduced : team;
    }
    if (team > 1) __atomic_fetch_add(&parallel_loops, 1, __ATOMIC_RELAXED);
    return team;
}

/* Called at every item of a parallel loop; acts once per worker thread and loop (the master is never late). */
static inline void note_start(int64_t loop) {
#ifdef _OPENMP
    if (noted_loop == loop) return;
    noted_loop = loop;
    if (omp_get_thread_num() == 0) return;
    int64_t now = now_ns();
    if (now - loop <= contention_lag_ns) return;
    /* one late worker speaks for its loop; the loop before with a late worker must be recent */
    int64_t previous = __atomic_exchange_n(&last_late_loop, loop, __ATOMIC_RELAXED);
    if (previous == loop || loop - previous > LATE_WINDOW_NS) return;
    __atomic_fetch_add(&contended_loops, 1, __ATOMIC_RELAXED);
    int team = omp_get_num_threads() / 2;
    __atomic_store_n(&reduced_team, team > 1 ? team : 1, __ATOMIC_RELAXED);
    __atomic_store_n(&reduced_until_ns, now + contention_hold_ns, __ATOMIC_RELAXED);
#else
    (void)loop;
#endif
}

/* The counters ([loops run on several threads, contention spells begun, ns the current spell lasts from now,
 * threads the loops take now]), and, where lag_ns >= 0, new limits (tests shorten them; the spell ends). */
void kvt_contention(int64_t *out, int64_t lag_ns, int64_t hold_ns) {
    if (lag_ns >= 0) {
        contention_lag_ns = lag_ns;
        contention_hold_ns = hold_ns;
        __atomic_store_n(&reduced_until_ns, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&last_late_loop, 0, __ATOMIC_RELAXED);
    }
    int64_t left = __atomic_load_n(&reduced_until_ns, __ATOMIC_RELAXED) - now_ns();
    int team = most_threads(), reduced = __atomic_load_n(&reduced_team, __ATOMIC_RELAXED);
    out[0] = __atomic_load_n(&parallel_loops, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&contended_loops, __ATOMIC_RELAXED);
    out[2] = left > 0 ? left : 0;
    out[3] = left > 0 && reduced < team ? reduced : team;
}

/* retrieval.recall.recall_pages_reference: for each (sequence, KV head) pair r (skipped where heads is not NULL
 * and heads[r] is 0) and each plan entry i with page = pages[r * k + i] >= 0, copy the host pool's row
 * page * pairs + r (keys then values, [rows][2][row_bytes]) into buffer row r * rows_per_pair + first_slot +
 * slots[r * k + i] of keys and values, and write that row's token positions page * page_size + j. */
void kvt_recall_pages(const char *host, char *keys, char *values, int64_t *positions, const int64_t *pages,
                      const int64_t *slots, const uint8_t *heads, int64_t pairs, int64_t k, int64_t rows_per_pair,
                      int64_t first_slot, int64_t page_size, int64_t row_bytes) {
    /* two threads move more bytes than one where a plan copies much (a memory-bound loop) */
    int64_t started;
    const int team = team_for(pairs * k * row_bytes >= 64 * PARALLEL_WORK, &started);
    #pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (int64_t e = 0; e < pairs * k; e++) {
        note_start(started);
        int64_t r = e / k, page = pages[e];
        if (page < 0 || (heads && !heads[r])) continue;
        int64_t src = page * pairs + r, dst = r * rows_per_pair + first_slot + slots[e];
        memcpy(keys + dst * row_bytes, host + 2 * src * row_bytes, (size_t)row_bytes);
        memcpy(values + dst * row_bytes, host + (2 * src + 1) * row_bytes, (size_t)row_bytes);
        for (int64_t j = 0; j < page_size; j++) positions[dst * page_size + j] = page * page_size + j;
    }
}

/* retrieval.engine's ring writes: for every (sequence, KV head) pair r, rows row0 .. row0 + count - 1 of keys and
 * values [pairs][L][d] (contiguous) take tokens first .. first + count - 1 of k_new and v_new (pair r at
 * sk_r / sv_r, token at sk_t / sv_t, channels contiguous), and pos [pairs][L] their positions position0 + i. */
void kvt_store_rows(const float *k_new, const float *v_new, int64_t sk_r, int64_t sk_t, int64_t sv_r,
                    int64_t sv_t, float *keys, float *values, int64_t *pos, int64_t pairs, int64_t L, int64_t d,
                    int64_t row0, int64_t first, int64_t count, int64_t position0) {
    for (int64_t r = 0; r < pairs; r++) {
        for (int64_t i = 0; i < count; i++) {
            memcpy(keys + (r * L + row0 + i) * d, k_new + r * sk_r + (first + i) * sk_t, sizeof(float) * (size_t)d);
            memcpy(values + (r * L + row0 + i) * d, v_new + r * sv_r + (first + i) * sv_t, sizeof(float) * (size_t)d);
            pos[r * L + row0 + i] = position0 + i;
        }
    }
}

/* A slot's place in the eviction order: (key, slot) ascending, key -1 for an empty slot, the page's score for
 * an unwanted resident one. */
typedef struct { float key; int64_t slot; } candidate;

static int before(const candidate *a, const candidate *b) {
    return a->key < b->key || (a->key == b->key && a->slot < b->slot);
}

static int compare_candidates(const void *a, const void *b) {
    return before(a, b) ? -1 : before(b, a) ? 1 : 0;
}

static float clean_score(float s) {  /* torch.nan_to_num(s, 0, 1, 0): the scores are probabilities */
    return s != s ? 0.0f : s == __builtin_inff() ? 1.0f : s == -__builtin_inff() ? 0.0f : s;
}

/* retrieval.recall.plan_pages_reference, row by row: slot_page [pairs][n_slots] and page_slot (int32) [pairs][map_width]
 * (the table, updated), wanted [pairs][k], scores (NULL: all 0) at strides (ss_r per pair, 1 per page), pages
 * and slots [pairs][k] written, *recalled (if not NULL) increased by the pages to copy. Returns 0, or -1 where
 * memory for its scratch could not be had (nothing is changed then). */
int kvt_plan_pages(int64_t *slot_page, int32_t *page_slot, const int64_t *wanted, const float *scores,
                   int64_t ss_r, int64_t pairs, int64_t n_slots, int64_t k, int64_t map_width, int64_t *out_pages,
                   int64_t *out_slots, int64_t *recalled) {
    static _Thread_local candidate *cand;
    static _Thread_local int64_t *miss;
    static _Thread_local uint8_t *taken;
    static _Thread_local int64_t room;
    if (n_slots > room) {  /* grown, never shrunk: one table's size from the first step on */
        candidate *c = realloc(cand, sizeof *cand * (size_t)n_slots);
        if (c) cand = c;
        int64_t *m = realloc(miss, sizeof *miss * (size_t)n_slots);
        if (m) miss = m;
        uint8_t *t = realloc(taken, (size_t)n_slots);
        if (t) taken = t;
        if (!c || !m || !t) return -1;
        room = n_slots;
    }
    int64_t total = 0;
    for (int64_t r = 0; r < pairs; r++) {
        int64_t *resident = slot_page + r * n_slots;
        int32_t *where = page_slot + r * map_width;
        const int64_t *want = wanted + r * k;
        int64_t misses = 0, count = 0;
        memset(taken, 0, (size_t)n_slots);
        for (int64_t i = 0; i < k; i++) {
            int64_t held = where[want[i]];
            if (held >= 0) taken[held] = 1;
            else miss[misses++] = want[i];
        }
        for (int64_t j = 0; j < n_slots; j++) {
            if (taken[j]) continue;
            int64_t page = resident[j];
            cand[count].key = page < 0 ? -1.0f : scores ? clean_score(scores[r * ss_r + page]) : 0.0f;
            cand[count++].slot = j;
        }
        if (misses > count) misses = count;  /* only with repeated wanted pages, which the plan's callers never pass */
        if (misses > 16) {
            qsort(cand, (size_t)count, sizeof *cand, compare_candidates);
        } else {  /* a few misses: pick the cheapest slots one by one */
            for (int64_t t = 0; t < misses; t++) {
                int64_t best = t;
                for (int64_t j = t + 1; j < count; j++)
                    if (before(&cand[j], &cand[best])) best = j;
                candidate c = cand[t]; cand[t] = cand[best]; cand[best] = c;
            }
        }
        int64_t *pages_row = out_pages + r * k, *slots_row = out_slots + r * k;
        for (int64_t t = 0; t < misses; t++) {
            int64_t slot = cand[t].slot, old = resident[slot];
            if (old >= 0) where[old] = -1;
            where[miss[t]] = (int32_t)slot;
            resident[slot] = miss[t];
            pages_row[t] = miss[t];
            slots_row[t] = slot;
        }
        for (int64_t t = misses; t < k; t++) pages_row[t] = slots_row[t] = -1;
        total += misses;
    }
    if (recalled) *recalled += total;
    return 0;
}

/* The codes of every byte value, for 1, 2 and 4 bits (quant.unpack's order: code j at bit j * bits). */
static float code_table[3][256][8];

__attribute__((constructor)) static void fill_tables(void) {
    const int widths[3] = {1, 2, 4};
    for (int w = 0; w < 3; w++) {
        int bits = widths[w], per_byte = 8 / bits;
        for (int v = 0; v < 256; v++)
            for (int j = 0; j < per_byte; j++) code_table[w][v][j] = (float)((v >> (j * bits)) & ((1 << bits) - 1));
    }
}

static const float (*table_for(int bits))[8] {
    return code_table[bits == 1 ? 0 : bits == 2 ? 1 : 2];
}

/* Codes of one token's packed row as floats (codes has room for every code its bytes hold). The copy loop is
 * written once per width so that it unrolls into plain moves. */
#define UNPACK(PER)                                                                                             \
    for (int64_t i = 0; i < bytes; i++) {                                                                     \
        const float *e = table[packed[i]];                                                                    \
        for (int j = 0; j < PER; j++) codes[i * PER + j] = e[j];                                              \
    }
static inline void unpack_row(const uint8_t *packed, int64_t d, int bits, const float (*table)[8], float *codes) {
    int64_t bytes = (d * bits + 7) / 8;
    if (bits == 2) { UNPACK(4) } else if (bits == 4) { UNPACK(2) } else { UNPACK(8) }
}

#define BLOCK 64  /* tokens of one work item of kvt_dequant_scores_f32 */

/* Eight floats in one vector register (GCC and Clang vector extension: AVX where the CPU has it, else pairs of
 * SSE registers); memcpy loads and stores carry no alignment assumption and compile to single moves. */
typedef float v8 __attribute__((vector_size(32)));
static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }
typedef int32_t v8i __attribute__((vector_size(32)));

/* e^x for eight floats, to about 2 ulp (x = k ln2 + r, |r| <= ln2 / 2; a degree-6 polynomial in r; 2^k through the
 * exponent bits); 0 below -87.3 (so -inf and float32 min give 0). Softmax arguments are <= 0. */
static inline v8 exp8(v8 x) {
    const v8 magic = (v8){0} + 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer in the low bits */
    v8 t = x * 1.44269504088896341f + magic;
    v8 k = t - magic;
    v8 r = x - k * 0.693359375f + k * 2.12194440e-4f;
    v8 y = (v8){0} + 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    v8i keep = x >= -87.3f;  /* all ones where kept */
    v8 scale = (v8)((((v8i)t - 0x4B400000) + 127) << 23);
    return (v8)((v8i)(y * scale) & keep);
}

static inline float exp1(float x) {
    v8 v = (v8){0} + x;
    return exp8(v)[0];
}

/* Eight floats from p[0, count), the rest `fill`. */
static inline v8 load_part(const float *p, int64_t count, float fill) {
    if (count >= 8) return load8(p);
    float tmp[8];
    for (int j = 0; j < 8; j++) tmp[j] = j < count ? p[j] : fill;
    return load8(tmp);
}

static inline float vmax(v8 v) {
    float best = v[0];
    for (int j = 1; j < 8; j++) best = v[j] > best ? v[j] : best;
    return best;
}

static inline float vsum(v8 v) {
    float total = 0.0f;
    for (int j = 0; j < 8; j++) total += v[j];
    return total;
}

static inline v8 vmax8(v8 a, v8 b) {
    v8i greater = a > b;
    return (v8)(((v8i)a & greater) | ((v8i)b & ~greater));
}

/* The eight sums of eight vectors, as one vector: [sum(x[0]), ..., sum(x[7])] (a tree of pairwise adds). */
static inline v8 sums8(const v8 *x) {
    v8 pair[4], quad[2];
    for (int i = 0; i < 4; i++)
        pair[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14)
                  + __builtin_shufflevector(x[2 * i], x[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; i++)
        quad[i] = __builtin_shufflevector(pair[2 * i], pair[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13)
                  + __builtin_shufflevector(pair[2 * i], pair[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return __builtin_shufflevector(quad[0], quad[1], 0, 1, 2, 3, 8, 9, 10, 11)
           + __builtin_shufflevector(quad[0], quad[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

typedef uint32_t v8u __attribute__((vector_size(32)));

/* The codes of channels [c, c + 8) of one packed row (c a multiple of 8) as floats: the `bits` bytes that hold
 * them, read as one little-endian word and shifted apart in the lanes (code j sits at bit j * bits). */
static inline __attribute__((always_inline)) v8 codes8(const uint8_t *row, int64_t c, const int bits) {
    uint32_t word;
    if (bits == 1) {
        word = row[c / 8];
    } else if (bits == 2) {
        uint16_t half;
        memcpy(&half, row + c / 4, sizeof half);
        word = half;
    } else {
        memcpy(&word, row + c / 2, sizeof word);
    }
    const v8u lane = {0, 1, 2, 3, 4, 5, 6, 7};
    v8u spread = ((v8u){0} + word) >> (lane * (uint32_t)bits);
    return __builtin_convertvector(spread & (uint32_t)((1 << bits) - 1), v8);
}

#define SCORE_TOKENS 8  /* tokens scored together: one vector of their sums per query row */
#define SCORE_ROWS 3    /* query rows scored together: 8 x 3 accumulators stay in the vector registers */

/* Scores of R query rows (from m0) for `count` tokens (all 8 where FULL) at `rows_at` (stride sp_n): per token
 * and row, q_scaled . codes in eight lanes over the channels, summed across lanes eight tokens at once. */
static inline __attribute__((always_inline)) void score_tokens(const uint8_t *rows_at, int64_t sp_n, int64_t count,
                                                               const float (*qs)[MAX_DIM], const float *qz,
                                                               int64_t m0, const int R, int64_t d, const int bits,
                                                               float scaling, float *out, int64_t n) {
    v8 acc[SCORE_ROWS][SCORE_TOKENS];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < SCORE_TOKENS; j++) acc[r][j] = (v8){0};
    for (int64_t c = 0; c < d; c += 8) {
        v8 qv[SCORE_ROWS];
        for (int r = 0; r < R; r++) qv[r] = load8(qs[m0 + r] + c);
        for (int j = 0; j < SCORE_TOKENS; j++) {
            if (j >= count) break;
            v8 code = codes8(rows_at + j * sp_n, c, bits);
            for (int r = 0; r < R; r++) acc[r][j] += qv[r] * code;
        }
    }
    for (int r = 0; r < R; r++) {
        v8 sums = (sums8(acc[r]) + qz[m0 + r]) * scaling;
        float *o = out + (m0 + r) * n;
        if (count == SCORE_TOKENS) store8(o, sums);
        else for (int64_t j = 0; j < count; j++) o[j] = sums[j];
    }
}

/* One block of tokens of one head, for a constant code width (so codes8 compiles to a few vector operations). */
static inline __attribute__((always_inline)) void score_block(const float *qh, const uint8_t *packed_h,
                                                              const float *scale_h, const float *zero_h,
                                                              float *oh, int64_t t0, int64_t width, int64_t rows,
                                                              int64_t n, int64_t d, int64_t group, const int bits,
                                                              float scaling, int64_t sp_n, int64_t sz_g) {
    static _Thread_local float qs[MAX_ROWS][MAX_DIM], qz[MAX_ROWS];
    for (int64_t j0 = 0; j0 < width;) {  /* the tokens of one key group at a time */
        int64_t g = (t0 + j0) / group;
        int64_t j1 = (g + 1) * group - t0;
        if (j1 > width) j1 = width;
        const float *s = scale_h + g * sz_g, *z = zero_h + g * sz_g;
        for (int64_t m = 0; m < rows; m++) {
            v8 part = (v8){0};
            for (int64_t c = 0; c < d; c += 8) {
                v8 qc = load8(qh + m * d + c);
                store8(qs[m] + c, qc * load8(s + c));
                part += qc * load8(z + c);
            }
            qz[m] = vsum(part);
        }
        for (int64_t j = j0; j < j1; j += SCORE_TOKENS) {
            int64_t count = j1 - j < SCORE_TOKENS ? j1 - j : SCORE_TOKENS;
            const uint8_t *at = packed_h + (t0 + j) * sp_n;
            float *o = oh + t0 + j;
            for (int64_t m0 = 0; m0 < rows; m0 += SCORE_ROWS) {  /* a constant row count unrolls */
                int64_t left = rows - m0;
                if (count == SCORE_TOKENS) {
                    if (left >= 3) score_tokens(at, sp_n, SCORE_TOKENS, qs, qz, m0, 3, d, bits, scaling, o, n);
                    else if (left == 2) score_tokens(at, sp_n, SCORE_TOKENS, qs, qz, m0, 2, d, bits, scaling, o, n);
                    else score_tokens(at, sp_n, SCORE_TOKENS, qs, qz, m0, 1, d, bits, scaling, o, n);
                } else {
                    int R = left >= 3 ? 3 : (int)left;
                    for (int r = 0; r < R; r++)
                        score_tokens(at, sp_n, count, qs, qz, m0 + r, 1, d, bits, scaling, o, n);
                }
            }
        }
        j0 = j1;
    }
}

/* kernels.dequant_score.dequant_scores_reference, float32: scores of query rows against keys quantized per
 * channel in groups of `group` tokens. q [heads][rows][d] (contiguous, d a multiple of 8); packed
 * [heads][n][bytes] at strides (sp_h, sp_n); scale, zero [heads][n / group][d] at strides (sz_h, sz_g); out
 * [heads][rows][n] (contiguous). q . (code * scale + zero) = (q * scale) . code + q . zero: per group the query
 * is scaled once, and codes are unpacked in registers, each used by three query rows. */
void kvt_dequant_scores_f32(const float *q, const uint8_t *packed, const float *scale, const float *zero,
                            float *out, int64_t heads, int64_t rows, int64_t n, int64_t d, int64_t group,
                            int bits, float scaling, int64_t sp_h, int64_t sp_n, int64_t sz_h, int64_t sz_g) {
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    /* a block of tokens of one head per work item: threads split the tokens evenly whatever the head count */
    int64_t started;
    const int team = team_for(heads * n * rows >= PARALLEL_WORK, &started);
    #pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (int64_t w = 0; w < heads * blocks; w++) {
        note_start(started);
        int64_t h = w / blocks, t0 = (w % blocks) * BLOCK;
        int64_t width = n - t0 < BLOCK ? n - t0 : BLOCK;
        const float *qh = q + h * rows * d, *sh = scale + h * sz_h, *zh = zero + h * sz_h;
        const uint8_t *ph = packed + h * sp_h;
        float *oh = out + h * rows * n;
        if (bits == 1) score_block(qh, ph, sh, zh, oh, t0, width, rows, n, d, group, 1, scaling, sp_n, sz_g);
        else if (bits == 2) score_block(qh, ph, sh, zh, oh, t0, width, rows, n, d, group, 2, scaling, sp_n, sz_g);
        else score_block(qh, ph, sh, zh, oh, t0, width, rows, n, d, group, 4, scaling, sp_n, sz_g);
    }
}


/* selection.digest_page_probs: per KV head and query token, each query row's softmax over pages [lo, hi) of the
 * upper bound sum_c max(q_c max_pc, q_c min_pc) * scaling, averaged over the `group` rows; other pages get 0.
 * q [pairs / kv_heads][kv_heads * group][tokens][d] (contiguous); dmax, dmin [pairs][>= hi][d] at strides
 * (sd_h, sd_p) (channels contiguous); out [pairs][tokens][pages] (contiguous). Returns 0, or -1 where memory
 * for the scores could not be had (nothing written). */
int kvt_digest_probs_f32(const float *q, const float *dmax, const float *dmin, float *out, int64_t pairs,
                         int64_t kv_heads, int64_t group, int64_t tokens, int64_t pages, int64_t d, int64_t lo,
                         int64_t hi, float scaling, int64_t sd_h, int64_t sd_p) {
    const float NEG_INF = -__builtin_inff();
    const int64_t n = hi - lo, stride = n + 8, rows = pairs * tokens * group;
    float *probs = malloc(sizeof(float) * (size_t)(rows * stride));  /* each query row's share of its group mean */
    if (!probs) return -1;
    /* a row (pair, token, head in group) per work item: its scores, then its softmax over the range */
    int64_t started;
    const int team = team_for(rows * n * d / 64 >= PARALLEL_WORK, &started);
    #pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (int64_t x = 0; x < rows; x++) {
        note_start(started);
        int64_t pair = x / (tokens * group), tok = x / group % tokens, g = x % group;
        int64_t h = pair % kv_heads, bi = pair / kv_heads;
        const float *qr = q + (((bi * kv_heads + h) * group + g) * tokens + tok) * d;
        const float *mx = dmax + pair * sd_h + lo * sd_p, *mn = dmin + pair * sd_h + lo * sd_p;
        float *s = probs + x * stride;
        for (int64_t p = 0; p < n; p++) {
            v8 acc = (v8){0};
            int64_t c = 0;
            for (; c + 8 <= d; c += 8) {
                v8 qv = load8(qr + c);
                acc += vmax8(qv * load8(mx + p * sd_p + c), qv * load8(mn + p * sd_p + c));
            }
            float tail = 0.0f;
            for (; c < d; c++) {
                float a = qr[c] * mx[p * sd_p + c], b = qr[c] * mn[p * sd_p + c];
                tail += a > b ? a : b;
            }
            s[p] = (vsum(acc) + tail) * scaling;
        }
        v8 best = (v8){0} + NEG_INF, total = (v8){0};
        for (int64_t i = 0; i < n; i += 8) best = vmax8(best, load_part(s + i, n - i, NEG_INF));
        float top = vmax(best);
        for (int64_t i = 0; i < n; i += 8) total += exp8(load_part(s + i, n - i, NEG_INF) - top);
        float w = 1.0f / (vsum(total) * (float)group);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) store8(s + i, exp8(load8(s + i) - top) * w);
        for (; i < n; i++) s[i] = exp8(load_part(s + i, 1, NEG_INF) - top)[0] * w;
    }
    /* the group mean per (pair, token), the rows added in order; 0 outside the range */
    int64_t started_means;
    const int team_means = team_for(rows * n >= PARALLEL_WORK, &started_means);
    #pragma omp parallel for schedule(static) num_threads(team_means) if (team_means > 1)
    for (int64_t item = 0; item < pairs * tokens; item++) {
        note_start(started_means);
        float *o = out + item * pages;
        memset(o, 0, sizeof(float) * (size_t)pages);
        for (int64_t g = 0; g < group; g++) {
            const float *s = probs + (item * group + g) * stride;
            for (int64_t i = 0; i < n; i++) o[lo + i] += s[i];
        }
    }
    free(probs);
    return 0;
}

/* retrieval.scorer.LowBitScorer.page_probs from raw token scores: per KV head and query token, the softmax of
 * each query row over tokens [lo, hi), summed per page of `page` tokens and averaged over the `group` rows of
 * that token; pages outside [lo / page, hi / page) get 0. raw [heads][group * tokens][>= hi] at strides
 * (sr_h, sr_m) (row = head in group * tokens + token); out [heads][tokens][pages] (contiguous). */
void kvt_page_probs_f32(const float *raw, float *out, int64_t heads, int64_t group, int64_t tokens,
                        int64_t pages, int64_t lo, int64_t hi, int64_t page, int64_t sr_h, int64_t sr_m) {
    const float NEG_INF = -__builtin_inff();
    const int64_t n = hi - lo, rows = heads * tokens * group;
    const int64_t first = lo / page, last = hi / page, chunks = (last - first + PROBS_CHUNK - 1) / PROBS_CHUNK;
    float top[rows], weight[rows];
    /* each row's largest score and normalizer, then the pages in chunks: both split evenly over threads */
    int64_t started;
    const int team = team_for(rows * n >= PARALLEL_WORK, &started);
    #pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (int64_t x = 0; x < rows; x++) {
        note_start(started);
        int64_t h = x / (tokens * group), tok = x / group % tokens, gi = x % group;
        const float *s = raw + h * sr_h + (gi * tokens + tok) * sr_m + lo;
        v8 best = (v8){0} + NEG_INF, total = (v8){0};
        for (int64_t i = 0; i < n; i += 8) best = vmax8(best, load_part(s + i, n - i, NEG_INF));
        top[x] = vmax(best);
        for (int64_t i = 0; i < n; i += 8) total += exp8(load_part(s + i, n - i, NEG_INF) - top[x]);
        weight[x] = 1.0f / (vsum(total) * (float)group);
    }
    int64_t started_pages;
    const int team_pages = team_for(rows * n >= PARALLEL_WORK, &started_pages);
    #pragma omp parallel for schedule(static) num_threads(team_pages) if (team_pages > 1)
    for (int64_t item = 0; item < heads * tokens * chunks; item++) {
        note_start(started_pages);
        int64_t h = item / (tokens * chunks), tok = item / chunks % tokens, c = item % chunks;
        float *o = out + (h * tokens + tok) * pages;
        int64_t p0 = first + c * PROBS_CHUNK, p1 = p0 + PROBS_CHUNK < last ? p0 + PROBS_CHUNK : last;
        if (c == 0) {  /* the pages outside the range */
            memset(o, 0, sizeof(float) * (size_t)first);
            memset(o + last, 0, sizeof(float) * (size_t)(pages - last));
        }
        memset(o + p0, 0, sizeof(float) * (size_t)(p1 - p0));
        for (int64_t gi = 0; gi < group; gi++) {
            int64_t x = (h * tokens + tok) * group + gi;
            const float *s = raw + h * sr_h + (gi * tokens + tok) * sr_m;
            float t = top[x], w = weight[x];
            if (page == 1) {
                int64_t i = p0;
                for (; i + 8 <= p1; i += 8) store8(o + i, load8(o + i) + exp8(load8(s + i) - t) * w);
                for (; i < p1; i++) o[i] += exp8(load_part(s + i, 1, NEG_INF) - t)[0] * w;
            } else {
                for (int64_t pg = p0; pg < p1; pg++) {
                    v8 sum = (v8){0};
                    for (int64_t i = pg * page; i < (pg + 1) * page; i += 8)
                        sum += exp8(load_part(s + i, (pg + 1) * page - i, NEG_INF) - t);
                    o[pg] += vsum(sum) * w;
                }
            }
        }
    }
}

/* What kvt_attention_f32 attends (the layout of attention.AttentionArgs in native.py). Query rows are
 * (head in group, query token): row m is token m % tokens. Full-precision keys and values [heads][L][d]; a key
 * column is visible to a row where mask (bytes at strides (sm_h, sm_t) per head and token; sm_h 0: shared by the
 * heads of a sequence, h / kv_heads) says so, else, with no mask, where its position (pos [heads][L]) is >= 0,
 * at most past + token, and valid (bytes [batch][positions] at stride sv_b, or NULL). Masked columns score
 * float32 min, as in attention.attend. The low-bit rest: tokens t in [lo, hi) on no resident page (resident
 * [heads][pages] bytes at stride srs_h; NULL: the pages whose first token the buffer's rows slot_start,
 * slot_start + page, ... < slot_stop hold), valid,
 * scored by raw [heads][rows][>= hi] at strides (sr_h, sr_m), values quantized per token (codes at strides
 * (sp_h, sp_n), scale and zero [heads][N][d / group] at strides (sz_h, sz_n)); lo >= hi: none. */
typedef struct {
    const float *q, *k, *v;
    const int64_t *pos;
    const uint8_t *mask;
    int64_t sm_h, sm_t, sm_b;
    int64_t L, past, tokens;
    const uint8_t *valid;
    int64_t sv_b, kv_heads;
    float scaling;
    const float *raw;
    int64_t sr_h, sr_m, lo, hi;
    const uint8_t *resident;
    int64_t srs_h, page, slot_start, slot_stop;
    const uint8_t *packed;
    const float *scale, *zero;
    int64_t sp_h, sp_n, sz_h, sz_n, group, bits;
    int64_t heads, rows, d;
    float *out;
} attention_args;

/* q . k for eight consecutive rows of k (d a multiple of 8): one accumulator per row, reduced together. */
static inline v8 dot8(const float *q, const float *k, int64_t d) {
    v8 acc[8] = {0};
    for (int64_t c = 0; c < d; c += 8) {
        v8 qv = load8(q + c);
        for (int j = 0; j < 8; j++) acc[j] += qv * load8(k + j * d + c);
    }
    return sums8(acc);
}

static inline float dot(const float *a, const float *b, int64_t d) {
    v8 acc = (v8){0};
    int64_t c = 0;
    for (; c + 8 <= d; c += 8) acc += load8(a + c) * load8(b + c);
    float tail = 0.0f;
    for (; c < d; c++) tail += a[c] * b[c];
    return vsum(acc) + tail;
}

/* torch.topk(x, k, dim=-1, sorted=True).indices + offset for rows of n floats, `stride` apart: out [rows][k] holds
 * each row's k largest, best first; equal values go lowest index first (torch leaves their order open). Each
 * row is read in blocks of 32: the k-th largest of the blocks' maxima is a floor no kept value lies below (k
 * blocks reach it), so only the few blocks whose maximum reaches it are read one by one, into a min-heap of the
 * k best so far (its worst at the root, displaced only by a strictly larger later value). Returns 0, or -1 at a
 * NaN (which torch ranks above every number), for rows of fewer than k blocks, or where memory could not be had:
 * out is then not to be read. */
typedef struct { float value; int64_t index; } ranked;

static int worse(const ranked *a, const ranked *b) {
    return a->value < b->value || (a->value == b->value && a->index > b->index);
}

static int best_first(const void *a, const void *b) {
    return worse(b, a) ? -1 : worse(a, b) ? 1 : 0;
}

static void sift_down(ranked *heap, int64_t k, int64_t i) {
    for (;;) {
        int64_t low = i, l = 2 * i + 1, r = l + 1;
        if (l < k && worse(&heap[l], &heap[low])) low = l;
        if (r < k && worse(&heap[r], &heap[low])) low = r;
        if (low == i) return;
        ranked t = heap[i]; heap[i] = heap[low]; heap[low] = t;
        i = low;
    }
}

static float kth_largest(float *x, int64_t n, int64_t k) {  /* quickselect; reorders x */
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float pivot = x[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (x[i] > pivot) i++;
            while (x[j] < pivot) j--;
            if (i <= j) { float t = x[i]; x[i] = x[j]; x[j] = t; i++; j--; }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return x[want];
    }
    return x[want];
}

static inline void offer(ranked *heap, int64_t k, int64_t *held, float value, int64_t index) {
    if (*held < k) {
        heap[(*held)++] = (ranked){value, index};
        if (*held == k)
            for (int64_t i = k / 2 - 1; i >= 0; i--) sift_down(heap, k, i);
    } else if (value > heap[0].value) {
        heap[0] = (ranked){value, index};
        sift_down(heap, k, 0);
    }
}

int kvt_topk_f32(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t k, int64_t offset, int64_t *out) {
    enum { RUN = 32 };  /* values per block */
    const int64_t blocks = n / RUN, scratch = 2 * blocks;
    if (k < 1 || blocks < k) return -1;
    ranked *heaps = malloc(sizeof *heaps * (size_t)(rows * k));
    float *peak_rows = malloc(sizeof *peak_rows * (size_t)(rows * scratch));
    if (!heaps || !peak_rows) { free(heaps); free(peak_rows); return -1; }
    int failed = 0;
    int64_t started;
    const int team = team_for(rows > 1 && rows * n >= 4 * PARALLEL_WORK, &started);
    #pragma omp parallel for schedule(static) num_threads(team) if (team > 1) reduction(|: failed)
    for (int64_t r = 0; r < rows; r++) {
        note_start(started);
        const float *row = x + r * stride;
        ranked *heap = heaps + r * k;
        float *peaks = peak_rows + r * scratch;
        v8i nan = (v8i){0};
        for (int64_t b = 0; b < blocks; b++) {
            const float *at = row + b * RUN;
            v8 a = load8(at), c = load8(at + 8), e = load8(at + 16), g = load8(at + 24);
            nan |= (a != a) | (c != c) | (e != e) | (g != g);
            peaks[b] = vmax(vmax8(vmax8(a, c), vmax8(e, g)));
        }
        int bad = 0;
        for (int64_t i = blocks * RUN; i < n; i++) bad |= row[i] != row[i];
        for (int j = 0; j < 8; j++) bad |= nan[j] != 0;
        if (bad) { failed = 1; continue; }
        memcpy(peaks + blocks, peaks, sizeof *peaks * (size_t)blocks);
        const float floor = kth_largest(peaks + blocks, blocks, k);
        int64_t held = 0;
        for (int64_t b = 0; b < blocks; b++) {
            if (peaks[b] < floor) continue;
            for (int64_t i = b * RUN; i < (b + 1) * RUN; i++)
                if (row[i] >= floor) offer(heap, k, &held, row[i], i);
        }
        for (int64_t i = blocks * RUN; i < n; i++)
            if (row[i] >= floor) offer(heap, k, &held, row[i], i);
        qsort(heap, (size_t)k, sizeof *heap, best_first);
        for (int64_t j = 0; j < k; j++) out[r * k + j] = heap[j].index + offset;
    }
    free(heaps);
    free(peak_rows);
    return failed ? -1 : 0;
}

/* selection.query_drift: per sequence and KV head, whether the mean over its `group` query heads of the cosine
 * similarity of q and prev (x . y / sqrt(max(|x|^2 |y|^2, 1e-16)), as torch.nn.functional.cosine_similarity) is
 * below tau. q and prev: [batch][kv_heads * group] rows of d floats at strides (sq_b, sq_h) and (sp_b, sp_h);
 * out: [batch][kv_heads] bytes (bool). */
void kvt_query_drift(const float *q, const float *prev, uint8_t *out, int64_t batch, int64_t kv_heads,
                     int64_t group, int64_t d, float tau, int64_t sq_b, int64_t sq_h, int64_t sp_b, int64_t sp_h) {
    for (int64_t bi = 0; bi < batch; bi++) {
        for (int64_t h = 0; h < kv_heads; h++) {
            float sum = 0.0f;
            for (int64_t g = 0; g < group; g++) {
                const float *x = q + bi * sq_b + (h * group + g) * sq_h, *y = prev + bi * sp_b + (h * group + g) * sp_h;
                float xy = dot(x, y, d), xx = dot(x, x, d), yy = dot(y, y, d), norms = xx * yy;
                sum += xy / __builtin_sqrtf(norms > 1e-16f ? norms : 1e-16f);
            }
            out[bi * kv_heads + h] = sum / (float)group < tau;
        }
    }
}

/* Eight channels [c, c + 8) of one value row: float32 (bits 32) or codes (see codes8). */
static inline __attribute__((always_inline)) v8 values8(const uint8_t *row, int64_t c, const int bits) {
    if (bits == 32) return load8((const float *)row + c);
    return codes8(row, c, bits);
}

/* Value rows of `tw` tokens (at `at`, sp_n bytes apart) into R query rows' sums acc[m0 + r][c0, c1): row m weighs
 * token j by sw[m * sws + j] (its softmax weight, times the token's scale for codes) and adds shift[m] (the
 * zeros' share; NULL: none) to every channel. Each row of values is read (or unpacked in registers) eight
 * channels at a time, once for the R query rows. */
static inline __attribute__((always_inline)) void accumulate_rows(float *acc, int64_t d, const float *sw, int64_t sws,
                                                                  const float *shift, int64_t m0, const int R,
                                                                  const uint8_t *at, int64_t sp_n, int64_t tw,
                                                                  int64_t c0, int64_t c1, const int bits) {
    for (int64_t c = c0; c < c1; c += 8) {
        v8 sum[8];
        for (int r = 0; r < R; r++) sum[r] = load8(acc + (m0 + r) * d + c) + (shift ? shift[m0 + r] : 0.0f);
        if (tw == 8) {
            for (int j = 0; j < 8; j++) {
                v8 value = values8(at + j * sp_n, c, bits);
                for (int r = 0; r < R; r++) sum[r] += sw[(m0 + r) * sws + j] * value;
            }
        } else {
            for (int64_t j = 0; j < tw; j++) {
                v8 value = values8(at + j * sp_n, c, bits);
                for (int r = 0; r < R; r++) sum[r] += sw[(m0 + r) * sws + j] * value;
            }
        }
        for (int r = 0; r < R; r++) store8(acc + (m0 + r) * d + c, sum[r]);
    }
}

static inline __attribute__((always_inline)) void accumulate_values(float *acc, int64_t d, const float *sw,
                                                                    int64_t sws, const float *shift, int64_t rows,
                                                                    const uint8_t *at, int64_t sp_n, int64_t tw,
                                                                    int64_t c0, int64_t c1, const int bits) {
    for (int64_t m0 = 0; m0 < rows; m0 += 8) {  /* up to eight rows at a time: a constant count unrolls */
        switch (rows - m0 < 8 ? rows - m0 : 8) {
            case 1: accumulate_rows(acc, d, sw, sws, shift, m0, 1, at, sp_n, tw, c0, c1, bits); break;
            case 2: accumulate_rows(acc, d, sw, sws, shift, m0, 2, at, sp_n, tw, c0, c1, bits); break;
            case 3: accumulate_rows(acc, d, sw, sws, shift, m0, 3, at, sp_n, tw, c0, c1, bits); break;
            case 4: accumulate_rows(acc, d, sw, sws, shift, m0, 4, at, sp_n, tw, c0, c1, bits); break;
            case 5: accumulate_rows(acc, d, sw, sws, shift, m0, 5, at, sp_n, tw, c0, c1, bits); break;
            case 6: accumulate_rows(acc, d, sw, sws, shift, m0, 6, at, sp_n, tw, c0, c1, bits); break;
            case 7: accumulate_rows(acc, d, sw, sws, shift, m0, 7, at, sp_n, tw, c0, c1, bits); break;
            default: accumulate_rows(acc, d, sw, sws, shift, m0, 8, at, sp_n, tw, c0, c1, bits); break;
        }
    }
}

/* One work item of kvt_attention_f32: per query row, the largest score, the sum of exponentials against it, and
 * the weighted sum of values, over columns [c0, c1) of the full-precision part or tokens [t0, t1) of the low-bit
 * part (written to top, total and acc[rows][d]); combined across items by the caller. */
static void attend_full_part(const attention_args *a, int64_t h, int64_t c0, int64_t c1, float *top, float *total,
                             float *acc) {
    static _Thread_local float w[MAX_ROWS][MIX_CHUNK];  /* per row: scores, then their exponentials */
    static _Thread_local uint8_t seen[MAX_TOKENS][MIX_CHUNK];  /* visibility per query token */
    const float NEG_INF = -__builtin_inff(), MIN = -3.40282346638528859812e+38f;
    const int64_t L = a->L, d = a->d, n = c1 - c0, tokens = a->tokens;
    const int64_t seq = h / a->kv_heads;
    for (int64_t tok = 0; tok < tokens; tok++) {
        uint8_t *see = seen[tok];
        if (a->mask) {
            const uint8_t *mrow = a->mask + seq * a->sm_b + (h % a->kv_heads) * a->sm_h + tok * a->sm_t + c0;
            for (int64_t c = 0; c < n; c++) see[c] = mrow[c] != 0;
        } else if (a->pos) {
            const int64_t *p = a->pos + h * L + c0, limit = a->past + tok;
            const uint8_t *ok = a->valid ? a->valid + seq * a->sv_b : NULL;
            for (int64_t c = 0; c < n; c++) see[c] = p[c] >= 0 && p[c] <= limit && (!ok || ok[p[c]]);
        } else {
            memset(see, 1, (size_t)n);
        }
    }
    const float *kh = a->k + (h * L + c0) * d;
    for (int64_t m = 0; m < a->rows; m++) {  /* scores, masked, then their exponentials against the row's max */
        const float *qm = a->q + (h * a->rows + m) * d;
        const uint8_t *see = seen[m % tokens];
        float *s = w[m];
        int64_t c = 0;
        if (d % 8 == 0)  /* eight keys at a time */
            for (; c + 8 <= n; c += 8) store8(s + c, dot8(qm, kh + c * d, d) * a->scaling);
        for (; c < n; c++) s[c] = dot(qm, kh + c * d, d) * a->scaling;
        for (c = 0; c < n; c++) s[c] = see[c] ? s[c] : MIN;
        v8 best = (v8){0} + NEG_INF, sum = (v8){0};
        for (int64_t l = 0; l < n; l += 8) best = vmax8(best, load_part(s + l, n - l, NEG_INF));
        float t = vmax(best);
        for (int64_t l = 0; l < n; l += 8) {
            v8 e = exp8(load_part(s + l, n - l, NEG_INF) - t);
            sum += e;
            if (l + 8 <= n) store8(s + l, e);
            else for (int64_t j = 0; l + j < n; j++) s[l + j] = e[j];
        }
        top[m] = t;
        total[m] = vsum(sum);
        memset(acc + m * d, 0, sizeof(float) * (size_t)d);
    }
    const uint8_t *vh = (const uint8_t *)(a->v + (h * L + c0) * d);
    const int64_t row_bytes = d * (int64_t)sizeof(float);
    for (int64_t l0 = 0; l0 < n; l0 += 8) {  /* values, eight keys at a time, each read once for every row */
        int64_t tw = n - l0 < 8 ? n - l0 : 8;
        v8 any = (v8){0};
        for (int64_t m = 0; m < a->rows; m++) any += load_part(w[m] + l0, tw, 0.0f);
        if (vsum(any) == 0.0f) continue;  /* rows no query sees (empty slots, the trash page) */
        if (d % 8 == 0) {
            accumulate_values(acc, d, w[0] + l0, MIX_CHUNK, NULL, a->rows, vh + l0 * row_bytes, row_bytes, tw, 0, d,
                              32);
            continue;
        }
        for (int64_t m = 0; m < a->rows; m++)
            for (int64_t j = 0; j < tw; j++) {
                const float weight = w[m][l0 + j], *vl = a->v + (h * L + c0 + l0 + j) * d;
                for (int64_t c = 0; c < d; c++) acc[m * d + c] += weight * vl[c];
            }
    }
}

static void attend_lowbit_part(const attention_args *a, int64_t h, int64_t t0, int64_t t1, float *top,
                               float *total, float *acc) {
    static _Thread_local float codes[8][MAX_DIM + 8], weight[MAX_ROWS][8], sw[MAX_ROWS][8], shift[MAX_ROWS];
    static _Thread_local float skip[MIX_CHUNK];
    static _Thread_local v8 sums[MAX_ROWS];  /* per row, the exponentials' sum in eight lanes */
    static _Thread_local uint8_t slot_held[MIX_CHUNK + 1];
    const float NEG_INF = -__builtin_inff();
    const float (*table)[8] = table_for((int)a->bits);
    const int64_t n = t1 - t0, d = a->d, rows = a->rows, group = a->group, page = a->page;
    const int vector = group % 8 == 0;
    const uint8_t *held = a->resident ? a->resident + h * a->srs_h : NULL;
    const uint8_t *ok = a->valid ? a->valid + (h / a->kv_heads) * a->sv_b : NULL;
    const int64_t first_page = t0 / page, pages = (t1 - 1) / page - first_page + 1;
    if (!held) {  /* the chunk's pages that some slot holds, from the slots' first positions */
        memset(slot_held, 0, (size_t)pages);
        for (int64_t r = a->slot_start; r < a->slot_stop; r += page) {
            int64_t p = a->pos[h * a->L + r];
            if (p >= 0 && p / page >= first_page && p / page < first_page + pages) slot_held[p / page - first_page] = 1;
        }
    }
    /* 0 for a token that counts, -inf for one on a resident page or in padding */
    for (int64_t t = t0; t < t1; t++) {
        int on_slot = held ? held[t / page] : slot_held[t / page - first_page];
        skip[t - t0] = on_slot || (ok && !ok[t]) ? NEG_INF : 0.0f;
    }
    for (int64_t m = 0; m < rows; m++) {
        const float *sr = a->raw + h * a->sr_h + m * a->sr_m + t0;
        v8 best = (v8){0} + NEG_INF;
        for (int64_t i = 0; i < n; i += 8)
            best = vmax8(best, load_part(sr + i, n - i, NEG_INF) + load_part(skip + i, n - i, NEG_INF));
        top[m] = vmax(best);
        sums[m] = (v8){0};
        memset(acc + m * d, 0, sizeof(float) * (size_t)d);
    }
    /* eight tokens at a time: p * scale per token and group, the zeros' share at once */
    for (int64_t i0 = 0; i0 < n; i0 += 8) {
        int64_t tw = n - i0 < 8 ? n - i0 : 8, tok = t0 + i0;
        v8 any = (v8){0};
        v8 mask = load_part(skip + i0, tw, NEG_INF);
        for (int64_t m = 0; m < rows; m++) {
            v8 w = top[m] == NEG_INF ? (v8){0} : exp8(load_part(a->raw + h * a->sr_h + m * a->sr_m + tok, tw, NEG_INF)
                                                       + mask - top[m]);
            store8(weight[m], w);
            sums[m] += w;
            any += w;
        }
        if (vsum(any) == 0.0f) continue;
        const uint8_t *at = a->packed + h * a->sp_h + tok * a->sp_n;
        if (!vector)
            for (int64_t j = 0; j < tw; j++) unpack_row(at + j * a->sp_n, d, (int)a->bits, table, codes[j]);
        for (int64_t c0 = 0, g = 0; c0 < d; c0 += group, g++) {
            v8 token_scale = (v8){0}, token_zero = (v8){0};  /* lanes past tw weigh 0 */
            for (int64_t j = 0; j < tw; j++) {
                token_scale[j] = a->scale[h * a->sz_h + (tok + j) * a->sz_n + g];
                token_zero[j] = a->zero[h * a->sz_h + (tok + j) * a->sz_n + g];
            }
            for (int64_t m = 0; m < rows; m++) {
                v8 w = load8(weight[m]);
                store8(sw[m], w * token_scale);
                shift[m] = vsum(w * token_zero);
            }
            if (vector) {
                const float *w = sw[0];
                if (a->bits == 1) accumulate_values(acc, d, w, 8, shift, rows, at, a->sp_n, tw, c0, c0 + group, 1);
                else if (a->bits == 2) accumulate_values(acc, d, w, 8, shift, rows, at, a->sp_n, tw, c0, c0 + group, 2);
                else accumulate_values(acc, d, w, 8, shift, rows, at, a->sp_n, tw, c0, c0 + group, 4);
                continue;
            }
            for (int64_t m = 0; m < rows; m++) {
                float *o = acc + m * d;
                for (int64_t c = c0; c < c0 + group; c++) o[c] += shift[m];
                for (int64_t j = 0; j < tw; j++) {
                    const float *code = codes[j], w = sw[m][j];
                    for (int64_t c = c0; c < c0 + group; c++) o[c] += w * code[c];
                }
            }
        }
    }
    for (int64_t m = 0; m < rows; m++) total[m] = vsum(sums[m]);
}

/* attention.attend_buffer / attend / attend_mixed for float32 decode steps: one softmax over the full-precision
 * keys (scored here) and the low-bit rest (see attention_args), out [heads][rows][d] written. The columns are
 * cut into chunks (work items, run in parallel), each with its own running maximum; the chunks of a head are
 * then combined, as split-K decode attention does on a GPU. Returns 0, or -1 where memory for the chunks'
 * partial sums could not be had (nothing written). */
int kvt_attention_f32(const attention_args *a) {
    const int64_t L = a->L, rows = a->rows, d = a->d, heads = a->heads;
    const int64_t rest = a->hi > a->lo ? a->hi - a->lo : 0;
    const int64_t full_items = (L + MIX_CHUNK - 1) / MIX_CHUNK;
    const int64_t per_head = full_items + (rest + MIX_CHUNK - 1) / MIX_CHUNK, items = heads * per_head;
    const int64_t stride = rows * (d + 2);  /* one item's top[rows], total[rows], acc[rows][d] */
    if (a->tokens > MAX_TOKENS || a->tokens < 1) return -1;
    float *part = malloc(sizeof(float) * (size_t)(items * stride));
    if (!part) return -1;
    int64_t started;
    const int team = team_for(heads * rows * (L + rest) >= PARALLEL_WORK, &started);
    #pragma omp parallel for schedule(static, 1) num_threads(team) if (team > 1)
    for (int64_t item = 0; item < items; item++) {
        note_start(started);
        int64_t h = item / per_head, c = item % per_head;
        float *top = part + item * stride, *total = top + rows, *acc = total + rows;
        if (c < full_items) {
            int64_t c0 = c * MIX_CHUNK;
            attend_full_part(a, h, c0, c0 + MIX_CHUNK < L ? c0 + MIX_CHUNK : L, top, total, acc);
        } else {
            int64_t t0 = a->lo + (c - full_items) * MIX_CHUNK;
            attend_lowbit_part(a, h, t0, t0 + MIX_CHUNK < a->hi ? t0 + MIX_CHUNK : a->hi, top, total, acc);
        }
    }
    const float NEG_INF = -__builtin_inff();
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t m = 0; m < rows; m++) {
            float best = NEG_INF, sum = 0.0f, *o = a->out + (h * rows + m) * d;
            for (int64_t c = 0; c < per_head; c++) {
                float t = part[(h * per_head + c) * stride + m];
                best = t > best ? t : best;
            }
            memset(o, 0, sizeof(float) * (size_t)d);
            if (best == NEG_INF) continue;  /* nothing to attend: zeros, not NaN */
            for (int64_t c = 0; c < per_head; c++) {
                const float *top = part + (h * per_head + c) * stride, *total = top + rows, *acc = total + rows;
                if (top[m] == NEG_INF) continue;
                float f = exp1(top[m] - best);
                sum += total[m] * f;
                for (int64_t i = 0; i < d; i++) o[i] += acc[m * d + i] * f;
            }
            for (int64_t i = 0; i < d; i++) o[i] /= sum;
        }
    }
    free(part);
    return 0;
}
