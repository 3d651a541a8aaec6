// One batch-1 decode step of a dense (Llama / Qwen2) decoder in a single OpenMP parallel region.
//
// Why: at batch 1 a 135M model's step is ~200 tiny matrix-vector products plus norms, rotary and attention
// glue. Run op by op from Python, each op pays dispatch, an allocation and (for the matmuls) an OpenMP
// fork/join, which together cost more than the arithmetic. Here the whole step is one parallel region; the
// threads meet at a spin barrier between dependent stages (5 per layer) and pull matrix rows in chunks from
// a shared counter, so a thread that the OS preempts does not hold the others back.
//
// Weights: per output row, groups of 32 input columns; code u (4 or 8 bits, unsigned) dequantizes to
// (u - off)·s + z with s, z stored as bf16 (off = 8 for 4-bit, 128 for 8-bit codes, whose z is 0). 4-bit rows
// are stored per 64 columns as 32 bytes: low nibbles hold columns 0..31, high nibbles 32..63.
// Activations: rounded to int8 per group of 32 (scale max|x|/127) right before each matrix product, so that
// products run on AVX-512 VNNI (vpdpbusd: unsigned code × signed activation, 4 per 32-bit lane):
//   y_n = Σ_g s_ng·d_g·Σ_{k∈g} u_nk·q_k + Σ_g (z_ng - off·s_ng)·Σ_{k∈g} x_k      (d_g: activation scale)
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
    const uint8_t* codes;  // bits 4: [n][k/2] as above; bits 8: [n][k]
    const uint16_t* s;     // bf16 [n][k/32]
    const uint16_t* z;     // bf16 [n][k/32], or null (all zero)
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

struct Step {                 // per call
    int64_t token, pos;
    const float* cos;         // [head_dim/2] at pos
    const float* sin;
    float* const* k_cache;    // per layer: row 0 of [H_kv, L, D] (strides below, in floats)
    float* const* v_cache;
    int64_t head_stride, pos_stride;
    float* logits;            // [vocab]
    float* work;              // shared scratch, see `scratch_floats`
    int64_t threads;
};

}  // extern "C"

namespace {

inline float bf16(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

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

// Activations of one matrix product, int8 per group of 32.
struct QAct {
    std::vector<int8_t> q;   // [k]
    std::vector<float> d;    // [k/32] scale
    std::vector<float> sum;  // [k/32] Σ x over the group (exact, for the z terms)
    std::vector<float> dv;   // [k/64][16]: d of the chunk's two groups, each repeated over 8 lanes
    void set(const float* x, int64_t k) {
        q.resize(k); d.resize(k / 32); sum.resize(k / 32); dv.resize(k / 64 * 16);
        for (int64_t g = 0; g < k / 32; ++g) {
            __m512 a = _mm512_loadu_ps(x + 32 * g), b = _mm512_loadu_ps(x + 32 * g + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            sum[g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
            float dg = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
            d[g] = dg;
            __m512 vi = _mm512_set1_ps(inv);
            __m512i qa = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(a, vi), _MM_FROUND_TO_NEAREST_INT));
            __m512i qb = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(b, vi), _MM_FROUND_TO_NEAREST_INT));
            _mm_storeu_si128((__m128i*)(q.data() + 32 * g), _mm512_cvtsepi32_epi8(qa));
            _mm_storeu_si128((__m128i*)(q.data() + 32 * g + 16), _mm512_cvtsepi32_epi8(qb));
        }
        for (int64_t c = 0; c < k / 64; ++c)
            for (int l = 0; l < 16; ++l) dv[16 * c + l] = d[2 * c + l / 8];
    }
};

// Two bf16 scales (groups 2c, 2c+1) → 16 lanes, 8 each.
inline __m512 expand2(const uint16_t* s) {
    uint32_t pair;
    std::memcpy(&pair, s, 4);
    __m512i v = _mm512_set1_epi32(int(pair));  // lanes: [s1:s0] each
    __m512i lo = _mm512_slli_epi32(v, 16);     // s0 as fp32
    __m512i hi = _mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u)));  // s1 as fp32
    return _mm512_castsi512_ps(_mm512_mask_blend_epi32(0xFF00, lo, hi));
}

inline __m512i codes64(const uint8_t* p, int bits) {
    if (bits == 8) return _mm512_loadu_si512(p);
    __m256i raw = _mm256_loadu_si256((const __m256i*)p);
    __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
    return _mm512_and_si512(w, _mm512_set1_epi8(0x0F));
}

// Rows [r0, r1) of W·x: y[n] = result (+ y[n] when accumulate), 4 rows per pass so their chains overlap.
void gemv_rows(const Lin& L, const QAct& a, float* y, int64_t r0, int64_t r1, bool accumulate) {
    const int64_t k = L.k, G = k / 32, C = k / 64;
    const int64_t row_bytes = L.bits == 4 ? k / 2 : k;
    const float off = L.bits == 4 ? 8.0f : 128.0f;
    auto finish = [&](int64_t n, __m512 acc) {
        float v = _mm512_reduce_add_ps(acc);
        const uint16_t* s = L.s + n * G;
        const uint16_t* z = L.z ? L.z + n * G : nullptr;
        float t = 0.0f;
        for (int64_t g = 0; g < G; ++g) t += ((z ? bf16(z[g]) : 0.0f) - off * bf16(s[g])) * a.sum[g];
        v += t;
        if (L.bias) v += L.bias[n];
        y[n] = accumulate ? y[n] + v : v;
    };
    int64_t n = r0;
    for (; n + 4 <= r1; n += 4) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
        const uint8_t* w = L.codes + n * row_bytes;
        const uint16_t* s = L.s + n * G;
        for (int64_t c = 0; c < C; ++c) {
            __m512i x = _mm512_loadu_si512(a.q.data() + 64 * c);
            __m512 dv = _mm512_loadu_ps(a.dv.data() + 16 * c);
            const int64_t cb = L.bits == 4 ? 32 * c : 64 * c;
#define NS_ROW(i, acc)                                                                                   \
    {                                                                                                    \
        __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes64(w + i * row_bytes + cb, L.bits), x); \
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dv, expand2(s + i * G + 2 * c)), acc); \
    }
            NS_ROW(0, acc0) NS_ROW(1, acc1) NS_ROW(2, acc2) NS_ROW(3, acc3)
#undef NS_ROW
        }
        finish(n, acc0); finish(n + 1, acc1); finish(n + 2, acc2); finish(n + 3, acc3);
    }
    for (; n < r1; ++n) {
        __m512 acc = _mm512_setzero_ps();
        const uint8_t* w = L.codes + n * row_bytes;
        for (int64_t c = 0; c < C; ++c) {
            __m512i x = _mm512_loadu_si512(a.q.data() + 64 * c);
            __m512 dv = _mm512_loadu_ps(a.dv.data() + 16 * c);
            __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes64(w + (L.bits == 4 ? 32 : 64) * c, L.bits), x);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dv, expand2(L.s + n * G + 2 * c)), acc);
        }
        finish(n, acc);
    }
}

// All threads: rows handed out in chunks from `next` (reset to 0 before the preceding barrier).
void gemv(const Lin& L, const QAct& a, float* y, bool accumulate, std::atomic<int64_t>& next, int T) {
    int64_t chunk = (L.n / (8 * T) + 3) / 4 * 4;
    if (chunk < 16) chunk = 16;
    for (;;) {
        int64_t r0 = next.fetch_add(chunk, std::memory_order_relaxed);
        if (r0 >= L.n) break;
        gemv_rows(L, a, y, r0, r0 + chunk < L.n ? r0 + chunk : L.n, accumulate);
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

// Floats of shared scratch `Step.work` must hold.
int64_t scratch_floats(const Model* m) {
    return m->hidden + (m->n_heads + 2 * m->n_kv) * m->head_dim + m->n_heads * m->head_dim + 2 * m->inter;
}

void decode_step(const Model* m, const Step* st) {
    const int64_t H = m->hidden, hd = m->head_dim, nq = m->n_heads, nkv = m->n_kv, I = m->inter;
    const int64_t group = nq / nkv, pos = st->pos, len = pos + 1;
    float* x = st->work;
    float* qkv = x + H;
    float* attn = qkv + (nq + 2 * nkv) * hd;
    float* hbuf = attn + nq * hd;
    const int64_t n_ops = 4 * m->n_layers + 1;
    std::vector<std::atomic<int64_t>> next(n_ops);
    for (auto& c : next) c.store(0, std::memory_order_relaxed);
    Barrier bar;
    std::memcpy(x, m->embed + st->token * H, H * sizeof(float));
    const float scale = 1.0f / std::sqrt(float(hd));

#pragma omp parallel num_threads(int(st->threads))
    {
        const int T = omp_get_num_threads(), tid = omp_get_thread_num();
        thread_local QAct a;
        thread_local std::vector<float> buf, scores;
        buf.resize(H > I ? H : I);
        scores.resize(len);
        int op = 0;
        for (int64_t l = 0; l < m->n_layers; ++l) {
            const Layer& Ly = m->layers[l];
            rmsnorm(x, Ly.in_norm, buf.data(), H, m->eps);
            a.set(buf.data(), H);
            gemv(Ly.qkv, a, qkv, false, next[op++], T);
            bar.wait(T);
            // Attention, one kv head (and its query heads) per thread at a time.
            for (int64_t j = tid; j < nkv; j += T) {
                float* k = qkv + (nq + j) * hd;
                float* v = qkv + (nq + nkv + j) * hd;
                rotate(k, st->cos, st->sin, hd);
                float* kc = st->k_cache[l] + j * st->head_stride;
                float* vc = st->v_cache[l] + j * st->head_stride;
                std::memcpy(kc + pos * st->pos_stride, k, hd * sizeof(float));
                std::memcpy(vc + pos * st->pos_stride, v, hd * sizeof(float));
                for (int64_t h = j * group; h < (j + 1) * group; ++h) {
                    float* q = qkv + h * hd;
                    rotate(q, st->cos, st->sin, hd);
                    float mx = -INFINITY;
                    for (int64_t t = 0; t < len; ++t) {
                        scores[t] = dot(q, kc + t * st->pos_stride, hd) * scale;
                        mx = scores[t] > mx ? scores[t] : mx;
                    }
                    float den = 0.0f;
                    for (int64_t t = 0; t < len; ++t) den += (scores[t] = std::exp(scores[t] - mx));
                    float* o = attn + h * hd;
                    for (int64_t i = 0; i < hd; i += 16) {
                        __m512 acc = _mm512_setzero_ps();
                        for (int64_t t = 0; t < len; ++t)
                            acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[t]), _mm512_loadu_ps(vc + t * st->pos_stride + i), acc);
                        _mm512_storeu_ps(o + i, _mm512_mul_ps(acc, _mm512_set1_ps(1.0f / den)));
                    }
                }
            }
            bar.wait(T);
            a.set(attn, nq * hd);
            gemv(Ly.o, a, x, true, next[op++], T);
            bar.wait(T);
            rmsnorm(x, Ly.post_norm, buf.data(), H, m->eps);
            a.set(buf.data(), H);
            gemv(Ly.gate_up, a, hbuf, false, next[op++], T);
            bar.wait(T);
            for (int64_t i = 0; i < I; ++i) {
                float g = hbuf[i];
                buf[i] = g / (1.0f + std::exp(-g)) * hbuf[I + i];
            }
            a.set(buf.data(), I);
            gemv(Ly.down, a, x, true, next[op++], T);
            bar.wait(T);
        }
        rmsnorm(x, m->final_norm, buf.data(), H, m->eps);
        a.set(buf.data(), H);
        gemv(m->head, a, st->logits, false, next[op++], T);
    }
}

}  // extern "C"
