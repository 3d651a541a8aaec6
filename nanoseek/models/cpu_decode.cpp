// One batch-1 decode step of a dense (Llama / Qwen2) decoder in a single OpenMP parallel region, for 1 to
// MAX_CHUNK consecutive tokens of one row (a speculative verify: the fed token and its drafts, causal within the
// chunk). Each matrix record is read from memory once per chunk and applied to every token's activations:
// reading the weights is most of a one-token step, so a chunk costs far less than its tokens' steps (SmolLM2-135M
// int4, 1 thread: 8 tokens ≈ 3.7 one-token steps; the rest is the arithmetic, 4 AVX-512 ops per 32 products).
// Per token the arithmetic (activation rounding, summation order) is exactly that of a one-token step.
//
// Why: at batch 1 a 135M model's step is ~200 tiny matrix-vector products plus norms, rotary and attention
// glue. Run op by op from Python, each op pays dispatch, an allocation and (for the matmuls) an OpenMP
// fork/join, which together cost more than the arithmetic. Here the whole step is one parallel region; the
// threads meet at a spin barrier between dependent stages (5 per layer) and pull matrix rows in chunks from
// a shared counter, so a thread that the OS preempts does not hold the others back.
//
// Weights: per output row, groups of 32 input columns; code u (4 or 8 bits, unsigned) dequantizes to
// (u - off)·s + z with s, z stored as bf16 (off = 8 for 4-bit, 128 for 8-bit codes, whose z is 0). 4-bit rows
// are stored per 64 columns as 32 bytes: low nibbles hold columns 0..31, high nibbles 32..63; see
// `record_bytes` for how rows are laid out.
// Activations: rounded to int16 per group of 32 (scale max|x|/32767) right before each matrix product, so that
// products run on AVX-512 VNNI (vpdpwssd: code × activation as int16, 2 per 32-bit lane):
//   y_n = Σ_g s_ng·d_g·Σ_{k∈g} u_nk·q_k + (z_ng - off·s_ng)·Σ_{k∈g} x_k      (d_g: activation scale)
// Everything else (norms, rotary, attention, residuals) is fp32, as in the PyTorch model.
//
// Built and loaded by nanoseek/models/cpu_decode.py (g++ -O3 -fopenmp -mavx512...); called through ctypes.

#include <immintrin.h>
#include <omp.h>
#include <sched.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" {

struct Lin {               // y[n] (+)= W x + b for W [n, k]
    const uint8_t* codes;  // records of 4 rows × 64 columns: codes, scales, zeros (see gemv_blocks)
    const float* bias;     // [n] or null
    int64_t n, k, bits;
};

struct Layer {
    const float* in_norm;
    const float* post_norm;
    Lin qkv, o, gate_up, down;
};

struct Model {
    int64_t n_layers, hidden, n_heads, n_kv, head_dim, inter;
    float eps;
    const float* embed;  // [vocab, hidden]
    const float* final_norm;
    const Layer* layers;
    Lin head;
};

enum { MAX_CHUNK = 8 };

struct Step {                 // per call: tokens at positions pos .. pos + n_tokens - 1
    const int64_t* tokens;    // [n_tokens], 1 <= n_tokens <= MAX_CHUNK
    int64_t n_tokens, pos;
    const float* cos;         // [n_tokens][head_dim/2] from pos on (rows of the rotary table)
    const float* sin;
    float* const* k_cache;    // per layer: row 0 of [H_kv, L, D] (strides below, in floats)
    float* const* v_cache;
    int64_t head_stride, pos_stride;
    float* logits;            // [n_tokens][vocab]
    float* work;              // shared scratch, see `scratch_floats`
    int64_t threads;
};

}  // extern "C"

namespace {

// Sense-free centralised barrier on a generation counter. Spins (the step is short), yielding the core
// after a while so a preempted partner on a busy machine gets to run.
struct Barrier {
    alignas(64) std::atomic<int> count{0};
    alignas(64) std::atomic<int> gen{0};
    void wait(int T) {
        if (T == 1) return;
        int g = gen.load(std::memory_order_acquire);
        if (count.fetch_add(1, std::memory_order_acq_rel) == T - 1) {
            count.store(0, std::memory_order_relaxed);
            gen.store(g + 1, std::memory_order_release);
        } else {
            int spins = 0;
            while (gen.load(std::memory_order_acquire) == g) {
                _mm_pause();
                if (++spins > 4000) { sched_yield(); spins = 0; }
            }
        }
    }
};

// Activations of one matrix product, int16 per group of 32 (scale max|x|/32767: 2^-15 of the group's largest
// value, finer than the bf16 rounding of PyTorch's int4 kernels; int8 here cost 20 points of top-1 agreement
// with fp32 on SmolLM2, whose activations have outlier channels).
struct QAct {
    std::vector<int16_t> q;  // [k]
    std::vector<float> dv;   // [k/32][16]: the group's scale d, over 16 lanes
    std::vector<float> xv;   // [k/64][16]: per 64 columns, (Σ x over group 0, Σ x over group 1) 8 times
    void set(const float* x, int64_t k) {
        q.resize(k); dv.resize(k / 2); xv.resize(k / 4);
        for (int64_t g = 0; g < k / 32; ++g) {
            __m512 a = _mm512_loadu_ps(x + 32 * g), b = _mm512_loadu_ps(x + 32 * g + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            float sum = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
            float dg = amax / 32767.0f, inv = amax > 0 ? 32767.0f / amax : 0.0f;
            __m512 vi = _mm512_set1_ps(inv);
            __m512i qa = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(a, vi), _MM_FROUND_TO_NEAREST_INT));
            __m512i qb = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(b, vi), _MM_FROUND_TO_NEAREST_INT));
            _mm256_storeu_si256((__m256i*)(q.data() + 32 * g), _mm512_cvtsepi32_epi16(qa));
            _mm256_storeu_si256((__m256i*)(q.data() + 32 * g + 16), _mm512_cvtsepi32_epi16(qb));
            _mm512_storeu_ps(dv.data() + 16 * g, _mm512_set1_ps(dg));
            for (int l = int(g % 2); l < 16; l += 2) xv[16 * (g / 2) + l] = sum;
        }
    }
};

// Rows of one matrix are packed in blocks of 4 and, within a block, per 64 input columns ("chunk"), as one
// record: the 4 rows' codes (32 bytes each for 4-bit, 64 for 8-bit), then their scales s as bf16
// [row][group 0, 1] (16 bytes), then, for 4-bit, their zeros z the same way (16 bytes). A thread's rows are thus
// one sequential stream that the hardware prefetcher follows, instead of 8 short streams per 4 rows.
inline int64_t record_bytes(int64_t bits) { return bits == 4 ? 4 * 32 + 16 + 16 : 4 * 64 + 16; }

// The chunk's codes as int16: group 0 (columns 0..31) and group 1 (32..63).
inline void codes16(const uint8_t* p, int64_t bits, __m512i& g0, __m512i& g1) {
    if (bits == 8) {
        g0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
        g1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(p + 32)));
    } else {
        __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
        g0 = _mm512_and_si512(w, _mm512_set1_epi16(0x0F));
        g1 = _mm512_srli_epi16(w, 4);
    }
}

inline __m512 bf16x8(const void* p) {  // 8 bf16 → fp32 in the low 8 lanes, zeros above
    __m256i v = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
    return _mm512_zextps256_ps512(_mm256_castsi256_ps(v));
}

// One block of 4 rows of W·x for NT activation vectors a[0..NT) (NT <= 4, so the accumulators stay in
// registers): y[t·ys + n] = result (+ that y when accumulate), rows >= L.n skipped (padding). With
// s, z the row's scale and zero and m = z - off·s, a group's term is s·d·Σ u·q + m·Σx:
//   * per chunk, row and group: p = Σ u·q per pair of columns (vpdpwssd), acc += (s·d) ⊙ p (16 lanes that sum
//     to the group's first term);
//   * per chunk: accm += m ⊙ X, lane 2i + g holding row i, group g (X: the two groups' Σx, see QAct), the
//     second terms of all 4 rows and both groups in one instruction.
// Each token's accumulators see the same operations in the same order whatever NT is, so a token's result
// does not depend on the tokens it is computed with.
template <int NT>
void block_rows(const Lin& L, const QAct* a, float* y, int64_t ys, int64_t blk, bool accumulate) {
    const int64_t C = L.k / 64, rec = record_bytes(L.bits), cb = L.bits == 4 ? 32 : 64;
    const __m512 off = _mm512_set1_ps(L.bits == 4 ? 8.0f : 128.0f);
    const uint8_t* r = L.codes + blk * C * rec;
    __m512 acc[NT][4], accm[NT];
    for (int t = 0; t < NT; ++t) {
        accm[t] = _mm512_setzero_ps();
        for (int i = 0; i < 4; ++i) acc[t][i] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < C; ++c, r += rec) {
        _mm_prefetch((const char*)r + 4 * rec, _MM_HINT_T0);
        _mm_prefetch((const char*)r + 4 * rec + 64, _MM_HINT_T0);
        _mm_prefetch((const char*)r + 4 * rec + 128, _MM_HINT_T0);
        if (L.bits == 8) _mm_prefetch((const char*)r + 4 * rec + 192, _MM_HINT_T0);
        const __m512 s8 = bf16x8(r + 4 * cb);
        const __m512 z8 = L.bits == 4 ? bf16x8(r + 4 * cb + 16) : _mm512_setzero_ps();
        const __m512 m8 = _mm512_fnmadd_ps(off, s8, z8);
        for (int t = 0; t < NT; ++t)
            accm[t] = _mm512_fmadd_ps(m8, _mm512_loadu_ps(a[t].xv.data() + 16 * c), accm[t]);
        for (int i = 0; i < 4; ++i) {
            __m512i w[2];
            codes16(r + i * cb, L.bits, w[0], w[1]);
            for (int g = 0; g < 2; ++g) {
                const __m512 sg = _mm512_permutexvar_ps(_mm512_set1_epi32(2 * i + g), s8);
                for (int t = 0; t < NT; ++t) {
                    const __m512i x = _mm512_loadu_si512(a[t].q.data() + 64 * c + 32 * g);
                    const __m512 sd = _mm512_mul_ps(sg, _mm512_loadu_ps(a[t].dv.data() + 16 * (2 * c + g)));
                    const __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w[g], x);
                    acc[t][i] = _mm512_fmadd_ps(sd, _mm512_cvtepi32_ps(p), acc[t][i]);
                }
            }
        }
    }
    for (int t = 0; t < NT; ++t) {
        alignas(64) float m[16];
        _mm512_store_ps(m, accm[t]);
        for (int i = 0; i < 4; ++i) {
            const int64_t n = 4 * blk + i;
            if (n >= L.n) break;
            float v = _mm512_reduce_add_ps(acc[t][i]) + (m[2 * i] + m[2 * i + 1]);
            if (L.bias) v += L.bias[n];
            float* o = y + t * ys + n;
            *o = accumulate ? *o + v : v;
        }
    }
}

// Row blocks [b0, b1) for nt tokens, 4 tokens at a time: a block's records (a few KB) are read from memory
// for the first 4 and from L1 for the rest.
void gemv_blocks(const Lin& L, const QAct* a, int64_t nt, float* y, int64_t ys, int64_t b0, int64_t b1,
                 bool accumulate) {
    for (int64_t blk = b0; blk < b1; ++blk) {
        for (int64_t t = 0; t < nt; t += 4) {
            switch (nt - t) {
                case 1: block_rows<1>(L, a + t, y + t * ys, ys, blk, accumulate); break;
                case 2: block_rows<2>(L, a + t, y + t * ys, ys, blk, accumulate); break;
                case 3: block_rows<3>(L, a + t, y + t * ys, ys, blk, accumulate); break;
                default: block_rows<4>(L, a + t, y + t * ys, ys, blk, accumulate); break;
            }
        }
    }
}

// All threads, nt tokens (y's rows ys floats apart): row blocks handed out in chunks from `next` (reset to 0
// before the preceding barrier).
void gemv(const Lin& L, const QAct* a, int64_t nt, float* y, int64_t ys, bool accumulate, std::atomic<int64_t>& next,
          int T) {
    const int64_t blocks = (L.n + 3) / 4;
    int64_t chunk = blocks / (8 * T);
    if (chunk < 4) chunk = 4;
    for (;;) {
        int64_t b0 = next.fetch_add(chunk, std::memory_order_relaxed);
        if (b0 >= blocks) break;
        gemv_blocks(L, a, nt, y, ys, b0, b0 + chunk < blocks ? b0 + chunk : blocks, accumulate);
    }
}

void rmsnorm(const float* x, const float* w, float* out, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
    float r = 1.0f / std::sqrt(float(ss / n) + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

inline float dot(const float* a, const float* b, int64_t n) {  // n % 16 == 0
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
}

void rotate(float* x, const float* cos, const float* sin, int64_t hd) {  // pairs (i, i + hd/2)
    const int64_t h = hd / 2;
    for (int64_t i = 0; i < h; ++i) {
        float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i] + a * sin[i];
    }
}

}  // namespace

extern "C" {

// Floats of shared scratch `Step.work` must hold, per token of a chunk.
int64_t scratch_floats(const Model* m) {
    return m->hidden + (m->n_heads + 2 * m->n_kv) * m->head_dim + m->n_heads * m->head_dim + 2 * m->inter;
}

// Returns 0, or -1 when n_tokens is out of range (nothing done).
int decode_step(const Model* m, const Step* st) {
    const int64_t H = m->hidden, hd = m->head_dim, nq = m->n_heads, nkv = m->n_kv, I = m->inter;
    const int64_t nt = st->n_tokens, QKV = (nq + 2 * nkv) * hd, A = nq * hd;
    if (nt < 1 || nt > MAX_CHUNK) return -1;
    const int64_t group = nq / nkv, pos0 = st->pos, len = pos0 + nt;
    float* x = st->work;            // [nt][H]
    float* qkv = x + nt * H;        // [nt][QKV]
    float* attn = qkv + nt * QKV;   // [nt][A]
    float* hbuf = attn + nt * A;    // [nt][2I]
    const int64_t n_ops = 4 * m->n_layers + 1;
    std::vector<std::atomic<int64_t>> next(n_ops);
    for (auto& c : next) c.store(0, std::memory_order_relaxed);
    Barrier bar;
    for (int64_t t = 0; t < nt; ++t) std::memcpy(x + t * H, m->embed + st->tokens[t] * H, H * sizeof(float));
    const float scale = 1.0f / std::sqrt(float(hd));
    const int64_t half = hd / 2;

#pragma omp parallel num_threads(int(st->threads))
    {
        const int T = omp_get_num_threads(), tid = omp_get_thread_num();
        thread_local QAct a[MAX_CHUNK];
        thread_local std::vector<float> buf, scores;
        buf.resize(H > I ? H : I);
        scores.resize(len);
        int op = 0;
        for (int64_t l = 0; l < m->n_layers; ++l) {
            const Layer& Ly = m->layers[l];
            for (int64_t t = 0; t < nt; ++t) {
                rmsnorm(x + t * H, Ly.in_norm, buf.data(), H, m->eps);
                a[t].set(buf.data(), H);
            }
            gemv(Ly.qkv, a, nt, qkv, QKV, false, next[op++], T);
            bar.wait(T);
            // Attention, one kv head (and its query heads) per thread at a time: first the chunk's keys and
            // values into the cache, then each token attends to the positions up to its own.
            for (int64_t j = tid; j < nkv; j += T) {
                float* kc = st->k_cache[l] + j * st->head_stride;
                float* vc = st->v_cache[l] + j * st->head_stride;
                for (int64_t t = 0; t < nt; ++t) {
                    float* k = qkv + t * QKV + (nq + j) * hd;
                    float* v = qkv + t * QKV + (nq + nkv + j) * hd;
                    rotate(k, st->cos + t * half, st->sin + t * half, hd);
                    std::memcpy(kc + (pos0 + t) * st->pos_stride, k, hd * sizeof(float));
                    std::memcpy(vc + (pos0 + t) * st->pos_stride, v, hd * sizeof(float));
                }
                for (int64_t t = 0; t < nt; ++t) {
                    const int64_t seen = pos0 + t + 1;  // causal: cached positions and the chunk up to t
                    for (int64_t h = j * group; h < (j + 1) * group; ++h) {
                        float* q = qkv + t * QKV + h * hd;
                        rotate(q, st->cos + t * half, st->sin + t * half, hd);
                        float mx = -INFINITY;
                        for (int64_t s = 0; s < seen; ++s) {
                            scores[s] = dot(q, kc + s * st->pos_stride, hd) * scale;
                            mx = scores[s] > mx ? scores[s] : mx;
                        }
                        float den = 0.0f;
                        for (int64_t s = 0; s < seen; ++s) den += (scores[s] = std::exp(scores[s] - mx));
                        float* o = attn + t * A + h * hd;
                        for (int64_t i = 0; i < hd; i += 16) {
                            __m512 acc = _mm512_setzero_ps();
                            for (int64_t s = 0; s < seen; ++s)
                                acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[s]), _mm512_loadu_ps(vc + s * st->pos_stride + i), acc);
                            _mm512_storeu_ps(o + i, _mm512_mul_ps(acc, _mm512_set1_ps(1.0f / den)));
                        }
                    }
                }
            }
            bar.wait(T);
            for (int64_t t = 0; t < nt; ++t) a[t].set(attn + t * A, A);
            gemv(Ly.o, a, nt, x, H, true, next[op++], T);
            bar.wait(T);
            for (int64_t t = 0; t < nt; ++t) {
                rmsnorm(x + t * H, Ly.post_norm, buf.data(), H, m->eps);
                a[t].set(buf.data(), H);
            }
            gemv(Ly.gate_up, a, nt, hbuf, 2 * I, false, next[op++], T);
            bar.wait(T);
            for (int64_t t = 0; t < nt; ++t) {
                const float* hb = hbuf + t * 2 * I;
                for (int64_t i = 0; i < I; ++i) {
                    float g = hb[i];
                    buf[i] = g / (1.0f + std::exp(-g)) * hb[I + i];
                }
                a[t].set(buf.data(), I);
            }
            gemv(Ly.down, a, nt, x, H, true, next[op++], T);
            bar.wait(T);
        }
        for (int64_t t = 0; t < nt; ++t) {
            rmsnorm(x + t * H, m->final_norm, buf.data(), H, m->eps);
            a[t].set(buf.data(), H);
        }
        gemv(m->head, a, nt, st->logits, m->head.n, false, next[op++], T);
    }
    return 0;
}

}  // extern "C"
