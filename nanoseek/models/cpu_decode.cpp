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
// are stored per 64 columns as 32 bytes: low nibbles hold columns 0..31, high nibbles 32..63; see
// `record_bytes` for how rows are laid out.
// Activations: rounded to int8 per group of 32 (scale max|x|/127) right before each matrix product, so that
// products run on AVX-512 VNNI (vpdpbusd: unsigned code × signed activation, 4 per 32-bit lane):
//   y_n = Σ_g s_ng·(d_g·Σ_{k∈g} u_nk·q_k - off·Σ_{k∈g} x_k) + z_ng·Σ_{k∈g} x_k      (d_g: activation scale)
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
    std::vector<float> xv;   // [k/64][16]: the same for sum / 8
    void set(const float* x, int64_t k) {
        q.resize(k); d.resize(k / 32); sum.resize(k / 32); dv.resize(k / 64 * 16); xv.resize(k / 64 * 16);
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
            for (int l = 0; l < 16; ++l) {
                dv[16 * c + l] = d[2 * c + l / 8];
                xv[16 * c + l] = sum[2 * c + l / 8] * 0.125f;
            }
    }
};

// Rows of one matrix are packed in blocks of 4 and, within a block, per 64 input columns ("chunk"), as one
// record: the 4 rows' codes (32 bytes each for 4-bit, 64 for 8-bit), then their scales s as bf16
// [row][group 0, 1] (16 bytes), then, for 4-bit, their zeros z the same way (16 bytes). A thread's rows are thus
// one sequential stream that the hardware prefetcher follows, instead of 8 short streams per 4 rows.
inline int64_t record_bytes(int64_t bits) { return bits == 4 ? 4 * 32 + 16 + 16 : 4 * 64 + 16; }

inline __m512i codes64(const uint8_t* p, int64_t bits) {
    if (bits == 8) return _mm512_loadu_si512(p);
    __m256i raw = _mm256_loadu_si256((const __m256i*)p);
    __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
    return _mm512_and_si512(w, _mm512_set1_epi8(0x0F));
}

inline __m512 bf16x8(const void* p) {  // 8 bf16 → fp32 in the low 8 lanes
    __m256i v = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
    return _mm512_castps256_ps512(_mm256_castsi256_ps(v));
}

// Row blocks [b0, b1) of W·x: y[n] = result (+ y[n] when accumulate), rows >= L.n skipped (padding).
// Per chunk and row: p = Σ u·q per 4 bytes (vpdpbusd), then acc += s ⊙ (d ⊙ p - off·X) + z ⊙ X, where the
// 16 lanes hold the chunk's two groups 8 lanes each and X = Σx of the lane's group / 8.
void gemv_blocks(const Lin& L, const QAct& a, float* y, int64_t b0, int64_t b1, bool accumulate) {
    const int64_t C = L.k / 64, rec = record_bytes(L.bits), cb = L.bits == 4 ? 32 : 64;
    const __m512 off = _mm512_set1_ps(L.bits == 4 ? 8.0f : 128.0f);
    const __m512i lane_idx[4] = {  // row r's two groups: lanes 0-7 ← group 0 (2r), 8-15 ← group 1 (2r + 1)
        _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
        _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2),
        _mm512_set_epi32(5, 5, 5, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4),
        _mm512_set_epi32(7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6)};
    for (int64_t blk = b0; blk < b1; ++blk) {
        const uint8_t* r = L.codes + blk * C * rec;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t c = 0; c < C; ++c, r += rec) {
            _mm_prefetch((const char*)r + 4 * rec, _MM_HINT_T0);
            _mm_prefetch((const char*)r + 4 * rec + 64, _MM_HINT_T0);
            _mm_prefetch((const char*)r + 4 * rec + 128, _MM_HINT_T0);
            if (L.bits == 8) _mm_prefetch((const char*)r + 4 * rec + 192, _MM_HINT_T0);
            const __m512i x = _mm512_loadu_si512(a.q.data() + 64 * c);
            const __m512 dv = _mm512_loadu_ps(a.dv.data() + 16 * c);
            const __m512 X = _mm512_loadu_ps(a.xv.data() + 16 * c);
            const __m512 offX = _mm512_mul_ps(off, X);
            const __m512 s8 = bf16x8(r + 4 * cb);
            for (int i = 0; i < 4; ++i) {
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes64(r + i * cb, L.bits), x);
                __m512 t = _mm512_fmsub_ps(dv, _mm512_cvtepi32_ps(p), offX);
                acc[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lane_idx[i], s8), t, acc[i]);
            }
            if (L.bits == 4) {
                const __m512 z8 = bf16x8(r + 4 * cb + 16);
                for (int i = 0; i < 4; ++i) acc[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lane_idx[i], z8), X, acc[i]);
            }
        }
        for (int i = 0; i < 4; ++i) {
            const int64_t n = 4 * blk + i;
            if (n >= L.n) break;
            float v = _mm512_reduce_add_ps(acc[i]);
            if (L.bias) v += L.bias[n];
            y[n] = accumulate ? y[n] + v : v;
        }
    }
}

// All threads: row blocks handed out in chunks from `next` (reset to 0 before the preceding barrier).
void gemv(const Lin& L, const QAct& a, float* y, bool accumulate, std::atomic<int64_t>& next, int T) {
    const int64_t blocks = (L.n + 3) / 4;
    int64_t chunk = blocks / (8 * T);
    if (chunk < 4) chunk = 4;
    for (;;) {
        int64_t b0 = next.fetch_add(chunk, std::memory_order_relaxed);
        if (b0 >= blocks) break;
        gemv_blocks(L, a, y, b0, b0 + chunk < blocks ? b0 + chunk : blocks, accumulate);
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
