// The whole one-token decode step of GPT-2 in one call: token ids in, logits out.
//
// Why C++: at batch 1 a step streams every weight once (about 500 MB for GPT-2 small in float32), and the time to do
// that is the floor. Through PyTorch the step is ~300 small operations, each paying Python and dispatch overhead,
// and the matrix-vector products go through GEMM kernels built for bigger matrices. Here the step is one function:
// one OpenMP parallel region, the rows of each weight matrix split between the threads, every small operation
// (bias, residual add, activation) fused into the product that makes its input, the new key and value written into
// the cache by the attention that reads them, and the threads meeting only where one operation needs all of the
// previous one's output.
//
// The arithmetic is GPT.forward's at T = 1 (tests compare the two): the token's row of the tied table (widened from
// its precision) plus the position's, pre-LayerNorm blocks, fused QKV, causal attention over the KV cache, a
// tanh-GELU (or exact GELU, or ReLU) MLP, the final LayerNorm, the tied head.
// A prompt goes through the same functions in one call too (gpt2lab_prefill): every token of it as a row of the
// products, each weight streamed once for all of them, and each token's attention over the columns up to its own.
// Built at first use by gpt2lab/native.py for the CPU at hand; loaded after torch, so it shares torch's OpenMP
// runtime and thread count.
//
// Instruction sets: the base is AVX2 with FMA and F16C, which every path below can run on. Built for a CPU with
// AVX-512 (F, BW and VL), the low-precision products take wider paths where the CPU has the instructions that change
// their arithmetic cost, not just their width: bf16 weights with AVX-512-BF16 multiply bf16 activations with
// VDPBF16PS (32 products in one instruction instead of widening 8 weights to float per FMA), int8 weights with
// AVX-512-VNNI use VPDPBUSD (64 byte products summed into 32 bits in one instruction), and int4 weights use
// AVX-512BW's 64-byte multiply-adds. float32 stays on the AVX2 path: its products wait for memory, not arithmetic.
// GPT2LAB_EMULATE_* (tests only) compile those paths against SIMDe's portable AVX-512 intrinsics instead, so a
// machine without AVX-512 can check their arithmetic (slowly) against the same oracles.
// Narrow int8 and int4 rows (a small model's, `narrow` below) take the AVX2 four-rows-at-a-time kernels in every
// build, the same integers; on AVX-512 CPUs that choice is not yet measured against the wide one-row paths.

#if defined(GPT2LAB_EMULATE_AVX512)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define USE_AVX512 1
#if defined(GPT2LAB_EMULATE_AVX512_BF16)
#define USE_BF16_DOT 1
#endif
#if defined(GPT2LAB_EMULATE_AVX512_VNNI)
#define USE_VNNI 1
#endif
#else
#include <immintrin.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define USE_AVX512 1
#if defined(__AVX512BF16__)
#define USE_BF16_DOT 1
#endif
#if defined(__AVX512VNNI__)
#define USE_VNNI 1
#endif
#endif
#endif
#include <cpuid.h>
#include <linux/futex.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <vector>

// A linear layer y = x W^T + b with W (N, K) row-major, as nn.Linear stores it. `kind` says what the weight holds.
enum WeightKind : int32_t { F32 = 0, BF16 = 1, INT8 = 2, INT4 = 3 };

struct Linear {
    const void* weight;   // (N, K): float, bf16 bits, or int8; int4: (N, K / 2) bytes, two weights each (below)
    const float* scale;   // int8 and int4: (N,) per output channel; else null
    const int16_t* group_scale;  // int4: (N, K / 32) integer scale of each group of 32; else null
    const float* bias;    // (N,) or null
    int64_t n, k;
    int32_t kind;
};

struct Layer {
    const float *ln1_w, *ln1_b;  // (C,), bias may be null
    Linear attn, attn_proj;      // C -> 3C, C -> C
    const float *ln2_w, *ln2_b;
    Linear fc, mlp_proj;         // C -> F, F -> C
};

enum Activation : int32_t { GELU_TANH = 0, GELU = 1, RELU = 2 };

struct Model {
    int64_t n_layer, n_embd, n_head, ffn;
    float eps;
    int32_t activation;
    const Layer* layers;         // (n_layer,)
    const float *lnf_w, *lnf_b;
    Linear head;                 // C -> V, its weight also the token embedding table (tied, as GPT-2's)
    const float* wpe;            // (n_ctx, C) position embeddings
    int64_t n_ctx;
};

// One call's state: the residual stream x, the KV cache, and scratch memory, all owned by the caller (torch tensors).
struct Step {
    float* x;                    // (B, C) the residual stream: the embeddings, then each block adds its output
    float* logits;               // (B, V)
    float *k_cache, *v_cache;    // (L, B_max, H, S_max, D)
    int64_t batch, batch_max, s_max, pos;  // B active rows; this token's keys and values go to column pos
    const uint8_t* mask;         // (B, pos + 1) 1 = attend, 0 = padding; null: every column
    float* qkv;                  // (B, 3C)
    float* att;                  // (B, C)
    float* hidden;               // (B, F)
    float* norm;                 // (threads, B, C): each thread's own LayerNorm output
    float* scores;               // (threads, S_max)
    int8_t* xq;                  // (threads, B, max(C, F)) int8 activations
    float* xq_scale;             // (threads, B)
    int16_t* xq_sums;            // (threads, B, max(C, F) / 32) 8 x each group's sum (int4's correction)
    uint16_t* xb;                // (threads, B, max(C, F)) bf16 activations (the bf16 dot-product path)
    int32_t threads;
    const int64_t* tokens;       // (B,) this step's token ids
    const int64_t* positions;    // (B,) each row's position (padded batches); null: every row at pos
};

// A prompt's encoding: B rows of T new tokens each after `past` cached ones, all B x T tokens through the blocks at
// once (M = B x T rows of activations), the logits of each row's last token. Scratch shared by the threads.
struct Prefill {
    float* x;                    // (M, C) the residual stream
    float* logits;               // (B, V)
    float *k_cache, *v_cache;    // (L, B_max, H, S_max, D)
    int64_t batch, batch_max, s_max, past, length;  // B rows of T = length tokens; they go to columns past + t
    const uint8_t* mask;         // (B, past + T) 1 = attend, 0 = padding; null: every column
    const int64_t* tokens;       // (M,) row b's token t at b * T + t
    const int64_t* positions;    // (M,) each token's position in wpe
    float *qkv, *att, *hidden, *norm;  // (M, 3C), (M, C), (M, F), (M, C)
    float* scores;               // (threads, past + T)
    int8_t* xq;                  // (M, max(C, F)) the rows rounded for the next product, shared
    float* xq_scale;             // (M,)
    int16_t* xq_sums;            // (M, max(C, F) / 32)
    uint16_t* xb;                // (M, max(C, F))
    int32_t threads;
};

// ------------------------------------------------------------------------------------------------ small helpers
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

// e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^n through the exponent bits.
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts keeps r exact
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float exp1(float x) {  // the same function for one value, so masked tails agree with the vector body
    float in[8] = {x}, out[8];
    _mm256_storeu_ps(out, exp256(_mm256_loadu_ps(in)));
    return out[0];
}

// tanh-GELU 0.5 x (1 + tanh(y)) written as x sigmoid(2y) = x / (1 + e^(-2y)), y = sqrt(2/pi) (x + 0.044715 x^3).
static inline __m256 gelu_tanh256(__m256 x) {
    __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
    __m256 e = exp256(_mm256_mul_ps(_mm256_set1_ps(-2.0f), y));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

static inline float activate(float v, int32_t activation) {
    if (activation == RELU) return v > 0.0f ? v : 0.0f;
    if (activation == GELU) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    float in[8] = {v}, out[8];
    _mm256_storeu_ps(out, gelu_tanh256(_mm256_loadu_ps(in)));
    return out[0];
}

static void activate_row(float* y, int64_t n, int32_t activation) {
    int64_t i = 0;
    if (activation == GELU_TANH)
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, gelu_tanh256(_mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] = activate(y[i], activation);
}

// LayerNorm of B rows of width C into out (the step: every thread its own copy, C is small; a prefill: each thread
// its share of the rows). Mean, then the variance about it, 8 lanes at a time (a scalar sum waits on each add).
static void layer_norm(const float* x, const float* w, const float* b, float eps, int64_t B, int64_t C, float* out) {
    for (int64_t r = 0; r < B; r++) {
        const float* xr = x + r * C;
        float* o = out + r * C;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= C; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(xr + i));
        float mean = hsum(acc);
        for (; i < C; i++) mean += xr[i];
        mean /= C;
        const __m256 vmean = _mm256_set1_ps(mean);
        acc = _mm256_setzero_ps();
        for (i = 0; i + 8 <= C; i += 8) {
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xr + i), vmean);
            acc = _mm256_fmadd_ps(d, d, acc);
        }
        float var = hsum(acc);
        for (; i < C; i++) var += (xr[i] - mean) * (xr[i] - mean);
        const float inv = 1.0f / sqrtf(var / C + eps);
        const __m256 vinv = _mm256_set1_ps(inv);
        for (i = 0; i + 8 <= C; i += 8) {
            const __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), vmean), vinv),
                                           _mm256_loadu_ps(w + i));
            _mm256_storeu_ps(o + i, b ? _mm256_add_ps(y, _mm256_loadu_ps(b + i)) : y);
        }
        for (; i < C; i++) o[i] = (xr[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
    }
}

// ------------------------------------------------------------------------------------- matrix-vector products
// One dot product of a weight row with an input row. A thread walks its weight rows one after the other: a single
// sequential stream is what the hardware prefetcher follows best (interleaving four rows streamed far slower;
// docs/benchmarks.md). Four accumulators keep four FMAs in flight per row.

static inline __m256 load_bf16(const uint16_t* p) {  // 8 bf16 -> 8 float: bf16 is the top half of a float
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

// How each kind of float weight is read: 8 at a time as floats, or one at a time. The kernels below are written
// once over these (fp32 and bf16 differ only in the load).
struct F32Weights {
    using T = float;
    static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
    static inline float one(float v) { return v; }
};

struct BF16Weights {
    using T = uint16_t;
    static inline __m256 load8(const uint16_t* p) { return load_bf16(p); }
    static inline float one(uint16_t v) { return bf16_to_float(v); }
};

template <typename W>
static float dot(const typename W::T* w, const float* x, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(W::load8(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(W::load8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(W::load8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(W::load8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(W::load8(w + k), _mm256_loadu_ps(x + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += W::one(w[k]) * x[k];
    return s;
}

// int8 x int8 -> int32 for 32 values. AVX2 multiplies unsigned by signed bytes, so the sign of w moves onto x:
// |w| * (x sign(w)) = w x. |w| of -128 reads as the unsigned byte 128, and x is in [-127, 127] (quantize_rows), so
// every product is exact and a pair of them (at most 2 * 128 * 127) fits the 16-bit sum without saturating.
static inline __m256i dot32_i8(__m256i abs_w, __m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}

[[maybe_unused]] static int32_t dot_i8(const int8_t* w, const int8_t* x, int64_t K) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i*)(w + k));
        const __m256i w1 = _mm256_loadu_si256((const __m256i*)(w + k + 32));
        a0 = _mm256_add_epi32(a0, dot32_i8(_mm256_sign_epi8(w0, w0), w0, _mm256_loadu_si256((const __m256i*)(x + k))));
        a1 = _mm256_add_epi32(a1, dot32_i8(_mm256_sign_epi8(w1, w1), w1,
                                           _mm256_loadu_si256((const __m256i*)(x + k + 32))));
    }
    int32_t s = hsum_i32(_mm256_add_epi32(a0, a1));
    for (; k < K; k++) s += (int32_t)w[k] * x[k];
    return s;
}

// int4 weights (quantize_int.quantize_int4): each weight stored as q = w + 8 in [0, 15], four bits, each group of 32
// with an integer scale s in [-255, 255] and each row with a float scale D: weight = (q - 8) s D. A row is blocks
// of 64 weights in 32 bytes, byte j holding weight j in its low four bits and weight j + 32 in its high four, so one
// mask gives a whole group in order and one shift the next; a row whose width is not a multiple of 64 ends with one
// group of 32 in 16 bytes (byte j: weights j and j + 16).
// Per group of 32, three instructions: AVX2's unsigned x signed byte product with q as the unsigned operand (pairs
// |q x| <= 2 * 15 * 127 fit 16 bits), the 16-bit pair sums times s into 32 bits (vpmaddwd, the scale a broadcast),
// and the add; the sums stay integers to the end of the row (exact), and the 8 comes back out once per row from
// the activations' group sums, which every weight row shares: sum_g s_g (w_g . x_g) = sum_g s_g (q_g . x_g) -
// sum_g s_g * 8 sum(x_g).
static inline __m256i low4(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
static inline __m256i high4(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }

static inline __m256i last_group_i4(const uint8_t* p) {  // 16 bytes -> 32 values in order
    const __m128i b = _mm_loadu_si128((const __m128i*)p), m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

// s * (q . x) for 32 values, as 8 int32 partial sums
static inline __m256i group_i4(__m256i q, const int8_t* x, int16_t s) {
    const __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i*)x));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(s));
}

static inline int64_t hsum_i64(__m256i v) {  // the 8 int32 lanes, summed without overflow
    const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                          _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
    const __m128i two = _mm_add_epi64(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
    return _mm_cvtsi128_si64(two) + _mm_extract_epi64(two, 1);
}

// sum_g s_g * sums8_g, what one weight row's product takes back out, as 8 int32 lanes to subtract from the
// product's lanes before their one horizontal sum (plus, in *rest, the products of the groups left over). Both
// are 16-bit, so vpmaddwd multiplies 16 pairs at a time, then 8 in the lower half (a row of fewer than 8 groups:
// 4 in the lower quarter). A lane adds at most K / 512 + 1 pair products of 2 * 255 * 32512; with the product's
// lanes (dot_i4) the difference stays under 2^31 for rows of up to 22,800 weights (native_step refuses int4 rows
// wider than 22,000).
static inline __m256i correction_lanes_i4(const int16_t* s, const int16_t* sums8, int64_t G, int64_t* rest) {
    __m256i acc = _mm256_setzero_si256();
    int64_t g = 0;
    for (; g + 16 <= G; g += 16)
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(s + g)),
                                                      _mm256_loadu_si256((const __m256i*)(sums8 + g))));
    if (g + 8 <= G) {
        const __m128i half = _mm_madd_epi16(_mm_loadu_si128((const __m128i*)(s + g)),
                                            _mm_loadu_si128((const __m128i*)(sums8 + g)));
        acc = _mm256_add_epi32(acc, _mm256_inserti128_si256(_mm256_setzero_si256(), half, 0));
        g += 8;
    }
    if (G < 8 && g + 4 <= G) {  // a narrow row's 4 to 7 groups: 4 of them in one 64-bit multiply-add
        const __m128i quarter = _mm_madd_epi16(_mm_loadl_epi64((const __m128i*)(s + g)),
                                               _mm_loadl_epi64((const __m128i*)(sums8 + g)));
        acc = _mm256_add_epi32(acc, _mm256_inserti128_si256(_mm256_setzero_si256(), quarter, 0));
        g += 4;
    }
    int64_t c = 0;
    for (; g < G; g++) c += (int32_t)s[g] * sums8[g];
    *rest = c;
    return acc;
}

// A row's product lanes less its correction lanes, summed: sum_g s_g (w_g . x_g). Rows of at most 16 groups sum
// their lanes in 32 bits (exact: dot4rows_i4's bound), wider ones in 64.
static inline int64_t finish_i4(__m256i product, const int16_t* s, const int16_t* sums8, int64_t G) {
    int64_t rest;
    const __m256i difference = _mm256_sub_epi32(product, correction_lanes_i4(s, sums8, G, &rest));
    return (G <= 16 ? (int64_t)hsum_i32(difference) : hsum_i64(difference)) - rest;
}

// One int4 weight row times one int8 activation row (its group sums in sums8): sum_g s_g (w_g . x_g), an integer.
// Each lane of a0 + a1 adds at most K / 32 groups of 2 * 3810 * 255 (the bound with the correction: finish_i4).
[[maybe_unused]] static int64_t dot_i4(const uint8_t* w, const int16_t* s, const int8_t* x, const int16_t* sums8, int64_t K) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const __m256i b = _mm256_loadu_si256((const __m256i*)(w + k / 2));
        a0 = _mm256_add_epi32(a0, group_i4(low4(b), x + k, s[k / 32]));
        a1 = _mm256_add_epi32(a1, group_i4(high4(b), x + k + 32, s[k / 32 + 1]));
    }
    if (k < K) a0 = _mm256_add_epi32(a0, group_i4(last_group_i4(w + k / 2), x + k, s[k / 32]));
    return finish_i4(_mm256_add_epi32(a0, a1), s, sums8, K / 32);
}

// One int4 weight row against four activation rows: each block unpacked, and its scales broadcast, once for the four.
[[maybe_unused]] static void dot4_i4(const uint8_t* w, const int16_t* s, const int8_t* x, const int16_t* sums8, int64_t K,
                    int64_t* out) {
    const int64_t G = K / 32;
    __m256i lo[4], hi[4];
    for (int r = 0; r < 4; r++) lo[r] = hi[r] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const __m256i b = _mm256_loadu_si256((const __m256i*)(w + k / 2)), ql = low4(b), qh = high4(b);
        for (int r = 0; r < 4; r++) {  // the compiler broadcasts each scale once for the four rows
            lo[r] = _mm256_add_epi32(lo[r], group_i4(ql, x + r * K + k, s[k / 32]));
            hi[r] = _mm256_add_epi32(hi[r], group_i4(qh, x + r * K + k + 32, s[k / 32 + 1]));
        }
    }
    if (k < K) {
        const __m256i q = last_group_i4(w + k / 2);
        for (int r = 0; r < 4; r++) lo[r] = _mm256_add_epi32(lo[r], group_i4(q, x + r * K + k, s[k / 32]));
    }
    for (int r = 0; r < 4; r++) out[r] = finish_i4(_mm256_add_epi32(lo[r], hi[r]), s, sums8 + r * G, G);
}

// How many rows ahead the batched kernels prefetch: with several input rows a pass computes long enough that the
// hardware prefetcher alone falls behind (the distance is chosen in docs/benchmarks.md). A prefetch never faults,
// so asking for rows past the matrix's end is harmless.
static constexpr int64_t PREFETCH_ROWS = 2;
// Where the float kernels' prefetch puts the rows ahead: rows of at least this many bytes (GPT-2's) into L2, shorter
// ones into L1. Long rows stream from memory, and L1's few miss buffers filled with prefetches stall the loads the
// products wait on. A small model's 128-wide rows, whose weights the last-level cache may hold, come from it faster
// into L1; its 512-wide MLP rows (1-2 KiB) go to L2 by this rule. The measurements are in docs/benchmarks.md.
static constexpr int64_t FAR_ROW_BYTES = 1024;

template <bool TO_L2>
static inline void prefetch_row(const void* p) {
    if constexpr (TO_L2) _mm_prefetch((const char*)p, _MM_HINT_T1);
    else _mm_prefetch((const char*)p, _MM_HINT_T0);
}

// Four weight rows against three input rows: twelve accumulators (with the three input vectors and one weight vector,
// all sixteen registers), seven loads per twelve FMAs. The input rows, read again for every four weight rows (from
// L2 in a long batch), take three of the seven, where two weight rows against four input rows take four of six:
// from sixteen input rows on this is the faster of the two (docs/benchmarks.md). `fetch`: the first pass over these
// weight rows prefetches the next four; the passes after it find them in L1.
template <bool TO_L2>
static void dot4x3(const float* w, const float* x, int64_t K, float* out /* (4, 3) */, bool fetch) {
    const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K;
    __m256 a[4][3];
    for (int j = 0; j < 4; j++)
        for (int r = 0; r < 3; r++) a[j][r] = _mm256_setzero_ps();
    const int64_t k_end = K / 8 * 8;
    for (int64_t k = 0; k < k_end; k += 8) {
        __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k), v2 = _mm256_loadu_ps(x2 + k);
        asm("" : "+x"(v0), "+x"(v1), "+x"(v2));  // keep them in registers: one load each
        if (fetch)
            for (int j = 0; j < 4; j++) prefetch_row<TO_L2>(w + (4 + j) * K + k);
        for (int j = 0; j < 4; j++) {
            const __m256 wj = _mm256_loadu_ps(w + j * K + k);
            a[j][0] = _mm256_fmadd_ps(wj, v0, a[j][0]);
            a[j][1] = _mm256_fmadd_ps(wj, v1, a[j][1]);
            a[j][2] = _mm256_fmadd_ps(wj, v2, a[j][2]);
        }
    }
    for (int j = 0; j < 4; j++)
        for (int r = 0; r < 3; r++) out[j * 3 + r] = hsum(a[j][r]);
    for (int64_t k = k_end; k < K; k++)
        for (int j = 0; j < 4; j++)
            for (int r = 0; r < 3; r++) out[j * 3 + r] += w[j * K + k] * x[r * K + k];
}

// Two weight rows against four input rows: eight accumulators, six loads per eight FMAs (one row against four needs
// five per four). Once a batch makes the products compute-bound, loads are what bound them.
template <typename W, bool TO_L2>
static void dot2x4(const typename W::T* w, const float* x, int64_t K, float* out /* (2, 4) */) {
    const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    const int64_t k_end = K / 8 * 8;
    for (int64_t k = 0; k < k_end; k += 8) {
        __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k);
        __m256 v2 = _mm256_loadu_ps(x2 + k), v3 = _mm256_loadu_ps(x3 + k);
        asm("" : "+x"(v0), "+x"(v1), "+x"(v2), "+x"(v3));  // keep them in registers: one load each, not two
        prefetch_row<TO_L2>(w + PREFETCH_ROWS * K + k);
        prefetch_row<TO_L2>(w + (PREFETCH_ROWS + 1) * K + k);
        const __m256 w0 = W::load8(w + k), w1 = W::load8(w + K + k);
        a00 = _mm256_fmadd_ps(w0, v0, a00); a01 = _mm256_fmadd_ps(w0, v1, a01);
        a02 = _mm256_fmadd_ps(w0, v2, a02); a03 = _mm256_fmadd_ps(w0, v3, a03);
        a10 = _mm256_fmadd_ps(w1, v0, a10); a11 = _mm256_fmadd_ps(w1, v1, a11);
        a12 = _mm256_fmadd_ps(w1, v2, a12); a13 = _mm256_fmadd_ps(w1, v3, a13);
    }
    out[0] = hsum(a00); out[1] = hsum(a01); out[2] = hsum(a02); out[3] = hsum(a03);
    out[4] = hsum(a10); out[5] = hsum(a11); out[6] = hsum(a12); out[7] = hsum(a13);
    for (int64_t k = k_end; k < K; k++)
        for (int j = 0; j < 2; j++)
            for (int r = 0; r < 4; r++) out[j * 4 + r] += W::one(w[j * K + k]) * x[r * K + k];
}

// One int8 weight row against four input rows: the row is loaded, and |w| computed, once for the four.
[[maybe_unused]] static void dot4_i8(const int8_t* w, const int8_t* x, int64_t K, int32_t* out) {
    const int8_t *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + k)), aw = _mm256_sign_epi8(wv, wv);
        _mm_prefetch((const char*)(w + PREFETCH_ROWS * K + k), _MM_HINT_T0);
        a0 = _mm256_add_epi32(a0, dot32_i8(aw, wv, _mm256_loadu_si256((const __m256i*)(x0 + k))));
        a1 = _mm256_add_epi32(a1, dot32_i8(aw, wv, _mm256_loadu_si256((const __m256i*)(x1 + k))));
        a2 = _mm256_add_epi32(a2, dot32_i8(aw, wv, _mm256_loadu_si256((const __m256i*)(x2 + k))));
        a3 = _mm256_add_epi32(a3, dot32_i8(aw, wv, _mm256_loadu_si256((const __m256i*)(x3 + k))));
    }
    out[0] = hsum_i32(a0); out[1] = hsum_i32(a1); out[2] = hsum_i32(a2); out[3] = hsum_i32(a3);
    for (; k < K; k++) {
        out[0] += (int32_t)w[k] * x0[k]; out[1] += (int32_t)w[k] * x1[k];
        out[2] += (int32_t)w[k] * x2[k]; out[3] += (int32_t)w[k] * x3[k];
    }
}

// B activation rows rounded to the precision a product multiplies in: int8 for the integer products, bf16 for the
// bf16 dot-product path (each thread's own copy in the step; one copy the threads share in a prefill).
struct QuantRows {
    int8_t* q;      // (B, K) in [-127, 127] (so |q| * |w| pairs fit in 16 bits)
    float* scale;   // (B,) x ~ q * scale
    int16_t* sums8;  // (B, K / 32) 8 x the sum of q over each group of 32 (int4's correction; |8 * 32 * 127| fits)
    uint16_t* bf16;  // (B, K) x rounded to bf16
};

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

// Symmetric int8 of each of B rows of width K, and the group sums int4's products take back out. 32 values at a
// time: |x| max, then x * (127 / max) rounded to nearest even (as lrintf) and packed to bytes; scalar for the rest.
static void quantize_rows(const float* x, int64_t B, int64_t K, const QuantRows& out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' per-lane interleave
    for (int64_t r = 0; r < B; r++) {
        const float* xr = x + r * K;
        int8_t* q = out.q + r * K;
        __m256 vmax = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + k)));
        float amax = hmax(vmax);
        for (; k < K; k++) amax = amax > fabsf(xr[k]) ? amax : fabsf(xr[k]);
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        const __m256 vinv = _mm256_set1_ps(inv);
        for (k = 0; k + 32 <= K; k += 32) {
            __m256i v[4];
            for (int j = 0; j < 4; j++) v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8 * j), vinv));
            const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
            _mm256_storeu_si256((__m256i*)(q + k), _mm256_permutevar8x32_epi32(bytes, order));
        }
        for (; k < K; k++) q[k] = (int8_t)lrintf(xr[k] * inv);
        out.scale[r] = amax / 127.0f;
        for (int64_t g = 0; g < K / 32; g++) {
            const __m256i b = _mm256_loadu_si256((const __m256i*)(q + 32 * g));
            const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), b);
            out.sums8[r * (K / 32) + g] = (int16_t)(8 * hsum_i32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1))));
        }
    }
}

// ------------------------------------------------------------------------------------------------ AVX-512 paths
#if defined(USE_AVX512)
static inline float hsum512(__m512 v) {
    return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

static inline int32_t hsum512_i32(__m512i v) {
    return hsum_i32(_mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)));
}

static inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }

// int4 at 64 weights a step: the 32 bytes of a block hold group g in their low four bits and g + 1 in their high
// four, so one 64-byte vector of both groups in order is the block broadcast to both halves, shifted right by 0 in
// the low half and 4 in the high one, and masked. Each group's scale goes to its half of the 16-bit lanes.
static inline __m512i block_i4(const uint8_t* p) {
    const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p));
    const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    return _mm512_and_si512(_mm512_srlv_epi16(both, shifts), _mm512_set1_epi8(0x0F));
}

static inline __m512i block_scales_i4(const int16_t* s) {  // s[0] in lanes 0-15, s[1] in lanes 16-31
    return _mm512_inserti64x4(_mm512_set1_epi16(s[0]), _mm256_set1_epi16(s[1]), 1);
}

// s_g * (q . x) for the two groups of a block, as 16 int32 partial sums (the bounds are the AVX2 path's)
static inline __m512i block_dot_i4(__m512i q, const int8_t* x, __m512i scales) {
    return _mm512_madd_epi16(_mm512_maddubs_epi16(q, load512(x)), scales);
}

static inline __m256i halves_added(__m512i v) {  // 16 int32 lanes -> 8 (the bounds of AVX2's a0 + a1)
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

static int64_t dot_i4_512(const uint8_t* w, const int16_t* s, const int8_t* x, const int16_t* sums8, int64_t K) {
    __m512i acc = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) acc = _mm512_add_epi32(acc, block_dot_i4(block_i4(w + k / 2), x + k, block_scales_i4(s + k / 32)));
    __m256i lanes = halves_added(acc);
    if (k < K) lanes = _mm256_add_epi32(lanes, group_i4(last_group_i4(w + k / 2), x + k, s[k / 32]));
    return finish_i4(lanes, s, sums8, K / 32);
}

static void dot4_i4_512(const uint8_t* w, const int16_t* s, const int8_t* x, const int16_t* sums8, int64_t K,
                        int64_t* out) {
    const int64_t G = K / 32;
    __m512i acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const __m512i q = block_i4(w + k / 2), scales = block_scales_i4(s + k / 32);
        for (int r = 0; r < 4; r++) acc[r] = _mm512_add_epi32(acc[r], block_dot_i4(q, x + r * K + k, scales));
    }
    __m256i lanes[4];
    for (int r = 0; r < 4; r++) lanes[r] = halves_added(acc[r]);
    if (k < K) {
        const __m256i q = last_group_i4(w + k / 2);
        for (int r = 0; r < 4; r++) lanes[r] = _mm256_add_epi32(lanes[r], group_i4(q, x + r * K + k, s[k / 32]));
    }
    for (int r = 0; r < 4; r++) out[r] = finish_i4(lanes[r], s, sums8 + r * G, G);
}
#endif

#if defined(USE_VNNI)
// int8 with VPDPBUSD, which multiplies unsigned bytes by signed ones and adds each four products into a 32-bit lane
// with no 16-bit step to saturate. The activations are made unsigned by adding 128 (a flip of the top bit), and the
// 128 comes back out through the weight row's sum, which a second VPDPBUSD against ones gathers from the same
// loaded weights: w . x = w . (x + 128) - 128 sum(w). The biased sum is at most 255 * 128 * K, inside 32 bits for
// rows of up to 65,000 weights.
static inline __m512i biased_i8(const int8_t* x) { return _mm512_xor_si512(load512(x), _mm512_set1_epi8(-128)); }

static int32_t dot_i8_vnni(const int8_t* w, const int8_t* x, int64_t K) {
    const __m512i ones = _mm512_set1_epi8(1);
    // two chains of each sum: VPDPBUSD's latency is several cycles, so one chain would wait on itself
    __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, wsum0 = acc0, wsum1 = acc0;
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        const __m512i w0 = load512(w + k), w1 = load512(w + k + 64);
        acc0 = _mm512_dpbusd_epi32(acc0, biased_i8(x + k), w0);
        acc1 = _mm512_dpbusd_epi32(acc1, biased_i8(x + k + 64), w1);
        wsum0 = _mm512_dpbusd_epi32(wsum0, ones, w0);
        wsum1 = _mm512_dpbusd_epi32(wsum1, ones, w1);
    }
    for (; k + 64 <= K; k += 64) {
        const __m512i wv = load512(w + k);
        acc0 = _mm512_dpbusd_epi32(acc0, biased_i8(x + k), wv);
        wsum0 = _mm512_dpbusd_epi32(wsum0, ones, wv);
    }
    int32_t s = hsum512_i32(_mm512_add_epi32(acc0, acc1)) - 128 * hsum512_i32(_mm512_add_epi32(wsum0, wsum1));
    for (; k < K; k++) s += (int32_t)w[k] * x[k];
    return s;
}

static void dot4_i8_vnni(const int8_t* w, const int8_t* x, int64_t K, int32_t* out) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i acc[4], wsum = _mm512_setzero_si512();
    for (int r = 0; r < 4; r++) acc[r] = wsum;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const __m512i wv = load512(w + k);
        _mm_prefetch((const char*)(w + PREFETCH_ROWS * K + k), _MM_HINT_T0);
        wsum = _mm512_dpbusd_epi32(wsum, ones, wv);
        for (int r = 0; r < 4; r++) acc[r] = _mm512_dpbusd_epi32(acc[r], biased_i8(x + r * K + k), wv);
    }
    const int32_t bias = 128 * hsum512_i32(wsum);
    for (int r = 0; r < 4; r++) {
        out[r] = hsum512_i32(acc[r]) - bias;
        for (int64_t j = k; j < K; j++) out[r] += (int32_t)w[j] * x[r * K + j];
    }
}
#endif

#if defined(USE_BF16_DOT)
// Activations rounded to bf16 (to nearest, ties to even, as torch's .to(torch.bfloat16) for finite values; a NaN
// may become an infinity here, where torch keeps it a NaN): the bf16 dot-product path multiplies bf16 by bf16, as
// BF16Linear's small-batch forward does.
static inline uint32_t bf16_round_bits(uint32_t u) { return (u + 0x7FFF + ((u >> 16) & 1)) >> 16; }

static void round_rows_bf16(const float* x, int64_t B, int64_t K, uint16_t* out) {
    const int64_t n = B * K;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(x + i));
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
        _mm_storeu_si128((__m128i*)(out + i), _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
    }
    for (; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, 4);
        out[i] = (uint16_t)bf16_round_bits(u);
    }
}

static inline __m512bh as_bf16(__m512i v) {  // the same 64 bytes, typed as 32 bf16 values
    __m512bh b;
    memcpy(&b, &v, sizeof b);
    return b;
}

static inline __m512bh load_bh(const uint16_t* p) { return as_bf16(load512(p)); }

// One bf16 weight row times one bf16 activation row: 32 products per VDPBF16PS, four in flight.
static float dot_bf16_dp(const uint16_t* w, const uint16_t* x, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        a0 = _mm512_dpbf16_ps(a0, load_bh(w + k), load_bh(x + k));
        a1 = _mm512_dpbf16_ps(a1, load_bh(w + k + 32), load_bh(x + k + 32));
        a2 = _mm512_dpbf16_ps(a2, load_bh(w + k + 64), load_bh(x + k + 64));
        a3 = _mm512_dpbf16_ps(a3, load_bh(w + k + 96), load_bh(x + k + 96));
    }
    for (; k + 32 <= K; k += 32) a0 = _mm512_dpbf16_ps(a0, load_bh(w + k), load_bh(x + k));
    float s = hsum512(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; k < K; k++) s += bf16_to_float(w[k]) * bf16_to_float(x[k]);
    return s;
}

// Two bf16 weight rows against four bf16 activation rows (the float kernels' 2 x 4 shape).
template <bool TO_L2>
static void dot2x4_bf16_dp(const uint16_t* w, const uint16_t* x, int64_t K, float* out /* (2, 4) */) {
    __m512 acc[2][4];
    for (int j = 0; j < 2; j++)
        for (int r = 0; r < 4; r++) acc[j][r] = _mm512_setzero_ps();
    const int64_t k_end = K / 32 * 32;
    for (int64_t k = 0; k < k_end; k += 32) {
        prefetch_row<TO_L2>(w + PREFETCH_ROWS * K + k);
        prefetch_row<TO_L2>(w + (PREFETCH_ROWS + 1) * K + k);
        const __m512bh w0 = load_bh(w + k), w1 = load_bh(w + K + k);
        for (int r = 0; r < 4; r++) {
            const __m512bh v = load_bh(x + r * K + k);
            acc[0][r] = _mm512_dpbf16_ps(acc[0][r], w0, v);
            acc[1][r] = _mm512_dpbf16_ps(acc[1][r], w1, v);
        }
    }
    for (int j = 0; j < 2; j++)
        for (int r = 0; r < 4; r++) {
            float s = hsum512(acc[j][r]);
            for (int64_t k = k_end; k < K; k++) s += bf16_to_float(w[j * K + k]) * bf16_to_float(x[r * K + k]);
            out[j * 4 + r] = s;
        }
}
#endif

// Which kernel computes each kind of product: the AVX-512 ones where this build has them (the header comment), else
// AVX2's. bf16 with dot products reads the bf16 copy of the activations; without, the float32 activations.
static inline float row_bf16(const uint16_t* w, const float* x, const uint16_t* xb, int64_t K) {
#if defined(USE_BF16_DOT)
    (void)x;
    return dot_bf16_dp(w, xb, K);
#else
    (void)xb;
    return dot<BF16Weights>(w, x, K);
#endif
}

template <bool TO_L2>
static inline void rows2x4_bf16(const uint16_t* w, const float* x, const uint16_t* xb, int64_t K, float* out) {
#if defined(USE_BF16_DOT)
    (void)x;
    dot2x4_bf16_dp<TO_L2>(w, xb, K, out);
#else
    (void)xb;
    dot2x4<BF16Weights, TO_L2>(w, x, K, out);
#endif
}

static inline int32_t row_i8(const int8_t* w, const int8_t* x, int64_t K) {
#if defined(USE_VNNI)
    return dot_i8_vnni(w, x, K);
#else
    return dot_i8(w, x, K);
#endif
}

static inline void rows4_i8(const int8_t* w, const int8_t* x, int64_t K, int32_t* out) {
#if defined(USE_VNNI)
    dot4_i8_vnni(w, x, K, out);
#else
    dot4_i8(w, x, K, out);
#endif
}

static inline int64_t row_i4(const uint8_t* w, const int16_t* s, const int8_t* x, const int16_t* sums8, int64_t K) {
#if defined(USE_AVX512)
    return dot_i4_512(w, s, x, sums8, K);
#else
    return dot_i4(w, s, x, sums8, K);
#endif
}

static inline void rows4_i4(const uint8_t* w, const int16_t* s, const int8_t* x, const int16_t* sums8, int64_t K,
                            int64_t* out) {
#if defined(USE_AVX512)
    dot4_i4_512(w, s, x, sums8, K, out);
#else
    dot4_i4(w, s, x, sums8, K, out);
#endif
}

// ------------------------------------------------------------------------------------------------ narrow rows
// A row of a few hundred bytes (a small model's 128-wide layers and head) costs more in its own overhead (the call,
// the horizontal sum, the epilogue) than in its products (several times more for a 128-wide int8 head, measured in
// docs/benchmarks.md). So rows this narrow go four at a time (`narrow` says at which batch sizes): one activation
// load feeds four rows' products and one shuffle tree sums all four. Four consecutive narrow rows are one
// contiguous stretch of memory, so the walk stays a single stream (wide rows walked four at a time are four streams,
// which the prefetcher does not keep up with; docs/benchmarks.md). Float sums come out in another order than the
// one-row kernels' (both within float32's error); integer sums are the same integers.
static constexpr int64_t NARROW_ROW_BYTES = 256;
// From how many input rows float32 rows go four at a time against three input rows (dot4x3), not two against four;
// bf16 rows on the widening path from more, each four widened into float32 once for all the input rows (the
// widening then costs a pass of its own).
static constexpr int64_t FOUR_BY_THREE_ROWS = 16;
static constexpr int64_t WIDENED_FOUR_BY_THREE_ROWS = 48;

static bool four_by_three(const Linear& L, int64_t B) {
    if (L.kind == F32) return B >= FOUR_BY_THREE_ROWS;
#if !defined(USE_BF16_DOT)
    if (L.kind == BF16) return B >= WIDENED_FOUR_BY_THREE_ROWS;
#endif
    return false;
}

// n bf16 values from w as float32 into out (exact), prefetching the n values after them into L1 (a few KiB at a
// time, which the passes over these rows then read from there).
static void widen_rows_bf16(const uint16_t* w, int64_t n, float* out) {
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        if (k % 32 == 0) _mm_prefetch((const char*)(w + n + k), _MM_HINT_T0);
        _mm256_storeu_ps(out + k, load_bf16(w + k));
    }
    for (; k < n; k++) out[k] = bf16_to_float(w[k]);
}

static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {  // (sum a, sum b, sum c, sum d)
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

static inline __m128i hsum4_i32(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

// Rows [0, 4) of w (4, K) times x (K,), K a multiple of 8, into out[0..3].
template <typename W>
static void dot4rows(const typename W::T* w, const float* x, int64_t K, float* out) {
    __m256 a[4];
    for (int r = 0; r < 4; r++) a[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        const __m256 xv = _mm256_loadu_ps(x + k);
        for (int r = 0; r < 4; r++) a[r] = _mm256_fmadd_ps(W::load8(w + r * K + k), xv, a[r]);
    }
    _mm_storeu_ps(out, hsum4(a[0], a[1], a[2], a[3]));
}

// The same for int8 rows and int8 activations, K a multiple of 32: exact int32 sums, as dot_i8's.
static void dot4rows_i8(const int8_t* w, const int8_t* x, int64_t K, int32_t* out) {
    __m256i a[4];
    for (int r = 0; r < 4; r++) a[r] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 32) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + k));
        for (int r = 0; r < 4; r++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + r * K + k));
            a[r] = _mm256_add_epi32(a[r], dot32_i8(_mm256_sign_epi8(wv, wv), wv, xv));
        }
    }
    _mm_storeu_si128((__m128i*)out, hsum4_i32(a[0], a[1], a[2], a[3]));
}

// Four int4 rows' product lanes less their correction lanes (as finish_i4), summed by one shuffle tree, as floats.
template <int G>
static inline __m128 finish4rows_i4(__m256i a0, __m256i a1, __m256i a2, __m256i a3, const int16_t* s,
                                    const int16_t* sums8) {
    __m256i a[4] = {a0, a1, a2, a3};
    int64_t rest[4];
    for (int j = 0; j < 4; j++) a[j] = _mm256_sub_epi32(a[j], correction_lanes_i4(s + j * G, sums8, G, &rest[j]));
    const __m128i sums = hsum4_i32(a[0], a[1], a[2], a[3]);
    return _mm_cvtepi32_ps(_mm_sub_epi32(sums, _mm_setr_epi32((int32_t)rest[0], (int32_t)rest[1], (int32_t)rest[2],
                                                              (int32_t)rest[3])));
}

// The same for int4 rows of G groups (K = 32 G, G even, at most 16: narrow rows), against `rows` input rows. G is
// a compile-time constant so the group loops unroll and the accumulators stay in registers (with a run-time G they
// spilled to the stack: docs/benchmarks.md). With more than one input row the four weight rows are unpacked to
// bytes, and their scales broadcast, once for all of them (at most 2 KiB and 2 KiB, in L1). Exact in int32: every
// sum above is integer arithmetic that wraps modulo 2^32, and what it computes, sum_g s_g (w_g . x_g), is at most
// 16 x 32 x 8 x 127 x 255 < 2^27 in magnitude, so the wrapped result is the true one.
template <int G>
static void dot4rows_i4(const uint8_t* w, const int16_t* s, const int8_t* x, const int16_t* sums8, int64_t rows,
                        float* out /* (rows, 4) */) {
    constexpr int64_t K = 32 * G;
    if (rows == 1) {  // each block unpacked as it is used
        __m256i a[4];
        for (int j = 0; j < 4; j++) a[j] = _mm256_setzero_si256();
        for (int64_t k = 0; k < K; k += 64)
            for (int j = 0; j < 4; j++) {
                const __m256i b = _mm256_loadu_si256((const __m256i*)(w + j * (K / 2) + k / 2));
                a[j] = _mm256_add_epi32(a[j], _mm256_add_epi32(group_i4(low4(b), x + k, s[j * G + k / 32]),
                                                               group_i4(high4(b), x + k + 32, s[j * G + k / 32 + 1])));
            }
        _mm_storeu_ps(out, finish4rows_i4<G>(a[0], a[1], a[2], a[3], s, sums8));
        return;
    }
    alignas(32) uint8_t q[4 * K];
    __m256i scales[4 * G];
    for (int j = 0; j < 4; j++) {
        for (int64_t k = 0; k < K; k += 64) {
            const __m256i b = _mm256_loadu_si256((const __m256i*)(w + j * (K / 2) + k / 2));
            _mm256_store_si256((__m256i*)(q + j * K + k), low4(b));
            _mm256_store_si256((__m256i*)(q + j * K + k + 32), high4(b));
        }
        for (int g = 0; g < G; g++) scales[j * G + g] = _mm256_set1_epi16(s[j * G + g]);
    }
    for (int64_t r = 0; r < rows; r++) {
        const int8_t* xr = x + r * K;
        __m256i a[4];
        for (int j = 0; j < 4; j++) a[j] = _mm256_setzero_si256();
        for (int g = 0; g < G; g++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i*)(xr + 32 * g));
            for (int j = 0; j < 4; j++) {
                const __m256i p = _mm256_maddubs_epi16(_mm256_load_si256((const __m256i*)(q + j * K + 32 * g)), xv);
                a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(p, scales[j * G + g]));
            }
        }
        _mm_storeu_ps(out + 4 * r, finish4rows_i4<G>(a[0], a[1], a[2], a[3], s, sums8 + r * G));
    }
}

// Whether L's rows go four at a time for B input rows: narrow, of a width the kernels above take whole, and not bf16
// on the bf16 dot-product path (whose products round the activations: it keeps its one-row kernel). float32 rows
// keep theirs too: they wait on memory either way. From four input rows on, bf16 does better with its batched
// kernel (each weight row against four input rows), int8 and int4 with these (four weight rows stay in L1 while
// each input row passes). The measurements behind each choice are in docs/benchmarks.md.
static bool narrow(const Linear& L, int64_t B) {
#if !defined(USE_BF16_DOT)
    if (L.kind == BF16) return B < 4 && L.k * 2 <= NARROW_ROW_BYTES && L.k % 8 == 0;
#else
    (void)B;
#endif
    if (L.kind == INT8) return L.k <= NARROW_ROW_BYTES && L.k % 32 == 0;
    if (L.kind == INT4) return L.k >= 64 && L.k / 2 <= NARROW_ROW_BYTES && L.k % 64 == 0;
    return false;
}

// How many input rows one call of the narrow kernels takes: an int4 call unpacks its four weight rows once for
// them, so a batch of B rows unpacks them ceil(B / 16) times; the results sit on the stack, 4 floats a row.
static constexpr int64_t NARROW_INPUT_ROWS = 16;
static_assert(NARROW_ROW_BYTES == 256, "narrow int4 rows have 2 to 16 groups: products4rows has a kernel for each");

template <int G>
static void products4rows_i4(const Linear& L, const QuantRows& Q, int64_t n, int64_t r0, int64_t rows, float* v) {
    dot4rows_i4<G>((const uint8_t*)L.weight + n * (16 * G), L.group_scale + n * G, Q.q + r0 * 32 * G,
                   Q.sums8 + r0 * G, rows, v);
}

// Four narrow weight rows [n, n + 4) against input rows [r0, r0 + rows) into v (rows, 4).
static void products4rows(const Linear& L, const float* x, const QuantRows& Q, int64_t n, int64_t r0, int64_t rows,
                          float* v) {
    const int64_t K = L.k;
    if (L.kind == INT4) {
        switch (K / 32) {  // narrow int4 rows have 2 to 16 groups, an even number
            case 2: return products4rows_i4<2>(L, Q, n, r0, rows, v);
            case 4: return products4rows_i4<4>(L, Q, n, r0, rows, v);
            case 6: return products4rows_i4<6>(L, Q, n, r0, rows, v);
            case 8: return products4rows_i4<8>(L, Q, n, r0, rows, v);
            case 10: return products4rows_i4<10>(L, Q, n, r0, rows, v);
            case 12: return products4rows_i4<12>(L, Q, n, r0, rows, v);
            case 14: return products4rows_i4<14>(L, Q, n, r0, rows, v);
            case 16: return products4rows_i4<16>(L, Q, n, r0, rows, v);
            default: __builtin_trap();  // narrow() admits no other count
        }
    }
    for (int64_t j = 0; j < rows; j++) {
        const int64_t r = r0 + j;
        if (L.kind == BF16) {
            dot4rows<BF16Weights>((const uint16_t*)L.weight + n * K, x + r * K, K, v + 4 * j);
        } else {
            alignas(16) int32_t iv[4];
            dot4rows_i8((const int8_t*)L.weight + n * K, Q.q + r * K, K, iv);
            _mm_storeu_ps(v + 4 * j, _mm_cvtepi32_ps(_mm_load_si128((const __m128i*)iv)));
        }
    }
}

// What each output row of a product becomes.
enum Epilogue { STORE = 0, ADD_TO = 1, ACTIVATE = 2 };

static bool integer(const Linear& L) { return L.kind == INT8 || L.kind == INT4; }

// The dot product of weight row m with input row r, by the one-row kernel of L's kind.
static inline float row_product(const Linear& L, const float* x, const QuantRows& Q, int64_t m, int64_t r) {
    const int64_t K = L.k, G = K / 32;
    switch (L.kind) {
        case F32: return dot<F32Weights>((const float*)L.weight + m * K, x + r * K, K);
        case BF16: return row_bf16((const uint16_t*)L.weight + m * K, x + r * K, Q.bf16 + r * K, K);
        case INT8: return (float)row_i8((const int8_t*)L.weight + m * K, Q.q + r * K, K);
        default: return (float)row_i4((const uint8_t*)L.weight + m * (K / 2), L.group_scale + m * G, Q.q + r * K,
                                      Q.sums8 + r * G, K);
    }
}

// The dot products of weight rows [n, n + rows_w) with input rows [r0, r0 + rows) into v (rows_w, 4): the batched
// kernels where a whole group fits (two float rows x four inputs; one integer row x four inputs), else one by one.
static void products(const Linear& L, const float* x, const QuantRows& Q, int64_t n, int64_t r0, int64_t rows,
                     int64_t rows_w, float* v) {
    const int64_t K = L.k, G = K / 32;
    const int8_t* xq = Q.q;
    if (rows == 4 && rows_w == 2) {
        if (L.kind == F32) {
            const float* w = (const float*)L.weight + n * K;
            if (K * 4 >= FAR_ROW_BYTES) dot2x4<F32Weights, true>(w, x + r0 * K, K, v);
            else dot2x4<F32Weights, false>(w, x + r0 * K, K, v);
        } else {
            const uint16_t* w = (const uint16_t*)L.weight + n * K;
            if (K * 2 >= FAR_ROW_BYTES) rows2x4_bf16<true>(w, x + r0 * K, Q.bf16 + r0 * K, K, v);
            else rows2x4_bf16<false>(w, x + r0 * K, Q.bf16 + r0 * K, K, v);
        }
        return;
    }
    if (rows == 4 && L.kind == INT8) {
        int32_t iv[4];
        rows4_i8((const int8_t*)L.weight + n * K, xq + r0 * K, K, iv);
        for (int j = 0; j < 4; j++) v[j] = (float)iv[j];
        return;
    }
    if (rows == 4 && L.kind == INT4) {
        int64_t iv[4];
        rows4_i4((const uint8_t*)L.weight + n * (K / 2), L.group_scale + n * G, xq + r0 * K, Q.sums8 + r0 * G, K, iv);
        for (int j = 0; j < 4; j++) v[j] = (float)iv[j];
        return;
    }
    for (int64_t i = 0; i < rows_w; i++)
        for (int64_t j = 0; j < rows; j++) v[i * 4 + j] = row_product(L, x, Q, n + i, r0 + j);
}

// Output (r, m) from its dot product y: the integer layers' two scales, the bias, then stored or added.
// The scales and the bias in one fused multiply-add, as finish4_outputs does, so every path rounds an output alike
// and an integer layer's row comes out the same at any batch size.
static inline void finish_output(const Linear& L, const QuantRows& Q, int64_t r, int64_t m, float y, float* out,
                                 int64_t ld_out, Epilogue how) {
    const float scale = integer(L) ? L.scale[m] * Q.scale[r] : 1.0f;
    if (L.bias) y = fmaf(y, scale, L.bias[m]);
    else if (integer(L)) y *= scale;
    float* o = out + r * ld_out + m;
    if (how == ADD_TO) *o += y;
    else *o = y;
}

// finish_output for outputs (r, m) to (r, m + 3) at once.
static inline void finish4_outputs(const Linear& L, const QuantRows& Q, int64_t r, int64_t m, const float* v,
                                   float* out, int64_t ld_out, Epilogue how) {
    __m128 y = _mm_loadu_ps(v);
    const __m128 scale = integer(L) ? _mm_mul_ps(_mm_loadu_ps(L.scale + m), _mm_set1_ps(Q.scale[r])) : _mm_set1_ps(1.0f);
    if (L.bias) y = _mm_fmadd_ps(y, scale, _mm_loadu_ps(L.bias + m));
    else if (integer(L)) y = _mm_mul_ps(y, scale);
    float* o = out + r * ld_out + m;
    if (how == ADD_TO) y = _mm_add_ps(y, _mm_loadu_ps(o));
    _mm_storeu_ps(o, y);
}

// out (B, N) = x (B, K) W^T + b, for weight rows [lo, hi) of this thread's chunk; integer layers read x rounded to
// int8 in Q. ADD_TO adds into out (the residual stream); ACTIVATE applies the MLP's non-linearity. For
// B > 1 each weight row stays in L1 while every input row passes, so the weights still come from memory once.
// Below four input rows the rows' outputs are finished four at a time, each weight row's product computed inline:
// through the general `products` (a call and its branches per row) a 384-byte int4 row spent more time around its
// product than in it (docs/benchmarks.md).
static void linear_block(const Linear& L, const float* x, const QuantRows& Q, int64_t B,
                         float* out, int64_t ld_out, Epilogue how, int32_t activation, int64_t lo, int64_t hi) {
    int64_t n = lo;
    if (narrow(L, B)) {  // four narrow rows at a time (above), then the rest one by one
        for (; n + 4 <= hi; n += 4)
            for (int64_t r0 = 0; r0 < B; r0 += NARROW_INPUT_ROWS) {
                const int64_t rows = B - r0 < NARROW_INPUT_ROWS ? B - r0 : NARROW_INPUT_ROWS;
                float v[4 * NARROW_INPUT_ROWS];  // (rows, 4)
                products4rows(L, x, Q, n, r0, rows, v);
                for (int64_t j = 0; j < rows; j++) finish4_outputs(L, Q, r0 + j, n, v + 4 * j, out, ld_out, how);
            }
    } else if (B < 4) {  // four weight rows one by one, each against every input row, then four outputs at once
        for (; n + 4 <= hi; n += 4) {
            float v[3 * 4];  // (B, 4)
            for (int j = 0; j < 4; j++)
                for (int64_t r = 0; r < B; r++) v[r * 4 + j] = row_product(L, x, Q, n + j, r);
            for (int64_t r = 0; r < B; r++) finish4_outputs(L, Q, r, n, v + 4 * r, out, ld_out, how);
        }
    }
    if (four_by_three(L, B)) {  // four weight rows against three input rows at a time
        const int64_t K = L.k;
        const bool in_place = L.kind == F32;
        thread_local std::vector<float> widened;  // (4, K): a bf16 layer's four rows as float32
        if (!in_place && (int64_t)widened.size() < 4 * K) widened.resize(4 * K);
        for (; n + 4 <= hi; n += 4) {
            const float* w = in_place ? (const float*)L.weight + n * K : widened.data();
            if (!in_place) widen_rows_bf16((const uint16_t*)L.weight + n * K, 4 * K, widened.data());
            for (int64_t r0 = 0; r0 < B; r0 += 3) {
                const int64_t rows = B - r0 < 3 ? B - r0 : 3;  // three input rows at a time, then the rest
                float v[12];  // (4, 3) dot products
                const bool fetch = in_place && r0 == 0;  // the next four rows, on the first pass over these
                if (rows < 3) {
                    for (int j = 0; j < 4; j++)
                        for (int64_t r = 0; r < rows; r++)
                            v[j * 3 + r] = dot<F32Weights>(w + j * K, x + (r0 + r) * K, K);
                } else if (K * 4 >= FAR_ROW_BYTES) {
                    dot4x3<true>(w, x + r0 * K, K, v, fetch);
                } else {
                    dot4x3<false>(w, x + r0 * K, K, v, fetch);
                }
                for (int j = 0; j < 4; j++)
                    for (int64_t r = 0; r < rows; r++)
                        finish_output(L, Q, r0 + r, n + j, v[j * 3 + r], out, ld_out, how);
            }
        }
    }
    while (n < hi) {
        // float weights with four or more input rows: two weight rows per pass (compute-bound); else one
        const int64_t rows_w = ((L.kind == F32 || L.kind == BF16) && B >= 4 && n + 1 < hi) ? 2 : 1;
        for (int64_t r0 = 0; r0 < B; r0 += 4) {
            const int64_t rows = B - r0 < 4 ? B - r0 : 4;  // four input rows at a time, then the rest
            float v[8];  // (rows_w, 4) dot products
            products(L, x, Q, n, r0, rows, rows_w, v);
            for (int64_t i = 0; i < rows_w; i++)
                for (int64_t j = 0; j < rows; j++) finish_output(L, Q, r0 + j, n + i, v[i * 4 + j], out, ld_out, how);
        }
        n += rows_w;
    }
    if (how == ACTIVATE)  // the whole share at once: 8 values per vector
        for (int64_t r = 0; r < B; r++) activate_row(out + r * ld_out + lo, hi - lo, activation);
}

// The rows of one product are split between the threads in chunks handed out as threads ask for them (OpenMP's
// dynamic schedule): on a shared machine a thread that loses its core for a moment leaves its chunks to the others
// instead of holding every thread at the next barrier. Chunks are about an eighth of a thread's share (at least 16
// rows), so each is still one long sequential read.
static void linear_rows(const Linear& L, const float* x, const QuantRows& Q, int64_t B,
                        float* out, int64_t ld_out, Epilogue how, int32_t activation, int nth) {
    int64_t chunk = L.n / (8 * (int64_t)nth);  // about eight chunks per thread
    chunk = chunk < 16 ? 16 : (chunk + 15) / 16 * 16;
    const int64_t chunks = (L.n + chunk - 1) / chunk;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t lo = c * chunk, hi = lo + chunk < L.n ? lo + chunk : L.n;
        linear_block(L, x, Q, B, out, ld_out, how, activation, lo, hi);
    }
}

// ------------------------------------------------------------------------------------------------ the barrier
// Where the threads meet between products. OpenMP's own barrier spins for milliseconds before it sleeps, so on a
// machine where another program holds a core, a thread that has lost its core keeps its partner spinning on the
// other one, the core the lost thread could have run on, and two threads decode slower than one. This one spins
// about as long as threads wait for each other on a quiet machine (20 us), then sleeps on a futex, which frees the
// core for the late thread (measured in docs/benchmarks.md, threads under load). Two threads on a loaded machine
// can still lose to one: the thread tuner in native_step.py then picks one. Linux only (the futex): elsewhere the
// kernel does not build and decoding uses the PyTorch step.
static std::atomic<int64_t> SPIN_NS{20000};  // see gpt2lab_set_spin_ns

struct Barrier {
    std::atomic<int32_t> arrived{0};
    std::atomic<uint32_t> phase{0};    // the futex word: bumped each time every thread has arrived
    std::atomic<int32_t> sleepers{0};  // threads asleep on `phase`; the last to arrive wakes them only if any
    int64_t spin_ns;
};

static inline int64_t now_ns() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline long futex(std::atomic<uint32_t>* word, int op, uint32_t value) {
    return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, nullptr, nullptr, 0);
}

static void barrier_wait(Barrier& b, int nth) {
    if (nth == 1) return;
    const uint32_t phase = b.phase.load(std::memory_order_acquire);
    if (b.arrived.fetch_add(1, std::memory_order_acq_rel) == nth - 1) {  // the last one in opens the barrier
        b.arrived.store(0, std::memory_order_relaxed);
        b.phase.fetch_add(1, std::memory_order_seq_cst);
        if (b.sleepers.load(std::memory_order_seq_cst) > 0) futex(&b.phase, FUTEX_WAKE_PRIVATE, INT_MAX);
        return;
    }
    const int64_t until = now_ns() + b.spin_ns;
    for (int i = 1;; i++) {
        if (b.phase.load(std::memory_order_acquire) != phase) return;
        _mm_pause();
        if (i % 64 == 0 && now_ns() > until) break;
    }
    b.sleepers.fetch_add(1, std::memory_order_seq_cst);
    while (b.phase.load(std::memory_order_seq_cst) == phase) futex(&b.phase, FUTEX_WAIT_PRIVATE, phase);
    b.sleepers.fetch_sub(1, std::memory_order_relaxed);
}

// ------------------------------------------------------------------------------------------------- attention
// q . k for four keys at once (four chains of FMAs in flight, one horizontal sum for the four), over the 8-lane
// chunks of D, then its scalar tail.
static inline __m128 dot4keys(const float* q, const float* k, int64_t D) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + D + i), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * D + i), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * D + i), a3);
    }
    __m128 s = hsum4(a0, a1, a2, a3);
    if (i < D) {
        float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int j = 0; j < 4; j++)
            for (int64_t m = i; m < D; m++) tail[j] += q[m] * k[j * D + m];
        s = _mm_add_ps(s, _mm_loadu_ps(tail));
    }
    return s;
}

// out[i0, i0 + 8 NV) = sum over the n columns of p[t] * inv * V[t, i0 + ...], held in NV registers while the columns
// pass.
template <int NV>
static void weigh_values(const float* p, float inv, const float* V, int64_t n, int64_t D, int64_t i0, float* out) {
    __m256 acc[NV];
    for (int j = 0; j < NV; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; t++) {
        const __m256 w = _mm256_set1_ps(p[t] * inv);  // a masked column's weight is 0: no branch per column
        const float* vt = V + t * D + i0;
        for (int j = 0; j < NV; j++) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8 * j), acc[j]);
    }
    for (int j = 0; j < NV; j++) _mm256_storeu_ps(out + i0 + 8 * j, acc[j]);
}

// softmax(q K^T / sqrt(D)) V for one query of one head over the first n columns of its cache (K, V: (S_max, D)),
// leaving out the columns `keep` (null: none) marks 0, except `own`, the query's own column (-1: none), which a
// padding query still attends to, as the modules do (attention_mask_for). out (D,). Scores four keys at a time;
// the weighted sum of values in registers, up to 64 of out's values per pass over the columns.
static void attend(const float* q, const float* K, const float* V, int64_t n, int64_t D, const uint8_t* keep,
                   int64_t own, float* scores, float* out) {
    const float scale = 1.0f / sqrtf((float)D);
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) _mm_storeu_ps(scores + t, _mm_mul_ps(dot4keys(q, K + t * D, D), _mm_set1_ps(scale)));
    for (; t < n; t++) {
        float s = 0.0f;
        for (int64_t i = 0; i < D; i++) s += q[i] * K[t * D + i];
        scores[t] = s * scale;
    }
    if (keep)
        for (t = 0; t < n; t++)
            if (!keep[t] && t != own) scores[t] = -INFINITY;
    // eight maxima at a time (fmaxf's NaN rules make a chain of dependent calls); max_ps returns its second operand
    // where either is NaN, so with the running maximum second a NaN score is passed over, as fmaxf passes it
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (t = 0; t + 8 <= n; t += 8) vmax = _mm256_max_ps(_mm256_loadu_ps(scores + t), vmax);
    float mx = hmax(vmax);
    for (; t < n; t++) mx = scores[t] > mx ? scores[t] : mx;
    if (mx == -INFINITY) {  // every column masked: SDPA would give NaN; the caller never asks for this row
        for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
        return;
    }
    // softmax numerators e^(s - max), 8 at a time; a masked column (-inf) gets exactly 0
    const __m256 vmx = _mm256_set1_ps(mx), masked = _mm256_set1_ps(-INFINITY);
    __m256 sum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        const __m256 sv = _mm256_loadu_ps(scores + t);
        const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(sv, vmx)), _mm256_cmp_ps(sv, masked, _CMP_NEQ_OQ));
        _mm256_storeu_ps(scores + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum(sum);
    for (; t < n; t++) {
        scores[t] = scores[t] == -INFINITY ? 0.0f : exp1(scores[t] - mx);
        total += scores[t];
    }
    const float inv = 1.0f / total;
    int64_t i0 = 0;
    for (; i0 + 64 <= D; i0 += 64) weigh_values<8>(scores, inv, V, n, D, i0, out);
    switch ((D - i0) / 8) {
        case 7: weigh_values<7>(scores, inv, V, n, D, i0, out); break;
        case 6: weigh_values<6>(scores, inv, V, n, D, i0, out); break;
        case 5: weigh_values<5>(scores, inv, V, n, D, i0, out); break;
        case 4: weigh_values<4>(scores, inv, V, n, D, i0, out); break;
        case 3: weigh_values<3>(scores, inv, V, n, D, i0, out); break;
        case 2: weigh_values<2>(scores, inv, V, n, D, i0, out); break;
        case 1: weigh_values<1>(scores, inv, V, n, D, i0, out); break;
        default: break;
    }
    for (int64_t i = D - D % 8; i < D; i++) {  // the scalar tail of D
        float o = 0.0f;
        for (t = 0; t < n; t++) o += scores[t] * inv * V[t * D + i];
        out[i] = o;
    }
}

// Where head h of cache row b of one layer lies: (S_max, D) keys, the values at the same offset of the v cache.
static inline int64_t cache_offset(int64_t layer, int64_t batch_max, int64_t b, int64_t H, int64_t h, int64_t s_max,
                                   int64_t D) {
    return (((layer * batch_max) + b) * H + h) * s_max * D;
}

// One head of one row of the step: write this token's key and value into cache column pos, then attend over
// columns [0, pos] that the mask keeps.
static void attend_head(const Model& M, const Step& S, int64_t layer, int64_t b, int64_t h, float* scores) {
    const int64_t C = M.n_embd, H = M.n_head, D = C / H;
    const float* q = S.qkv + b * 3 * C + h * D;
    const float* k_new = q + C;
    const float* v_new = q + 2 * C;
    const int64_t head_off = cache_offset(layer, S.batch_max, b, H, h, S.s_max, D);
    float* K = S.k_cache + head_off;  // (S_max, D)
    float* V = S.v_cache + head_off;
    for (int64_t i = 0; i < D; i++) { K[S.pos * D + i] = k_new[i]; V[S.pos * D + i] = v_new[i]; }
    attend(q, K, V, S.pos + 1, D, S.mask ? S.mask + b * (S.pos + 1) : nullptr, -1, scores, S.att + b * C + h * D);
}

// ------------------------------------------------------------------------------------------------ embeddings
// 32 stored values q + 8 in [0, 15] -> q * step as float, in order (the same float product torch's dequantize makes)
static inline void widen_group(__m256i stored, float step, float* out) {
    const __m256i q = _mm256_sub_epi8(stored, _mm256_set1_epi8(8));
    const __m256 st = _mm256_set1_ps(step);
    const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
    for (int h = 0; h < 2; h++) {
        const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(halves[h]));
        const __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(halves[h], 8)));
        _mm256_storeu_ps(out + 16 * h, _mm256_mul_ps(a, st));
        _mm256_storeu_ps(out + 16 * h + 8, _mm256_mul_ps(b, st));
    }
}

// One int4 row widened to float32, K weights from K / 2 bytes: one mask and one shift per 64 weights, then bytes ->
// int32 -> float times the group's step s * D.
static void widen_row_i4(const uint8_t* w, const int16_t* group_scale, float row_scale, int64_t K, float* o) {
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const __m256i b = _mm256_loadu_si256((const __m256i*)(w + k / 2));
        widen_group(low4(b), (float)group_scale[k / 32] * row_scale, o + k);
        widen_group(high4(b), (float)group_scale[k / 32 + 1] * row_scale, o + k + 32);
    }
    if (k < K) widen_group(last_group_i4(w + k / 2), (float)group_scale[k / 32] * row_scale, o + k);
}

// Row r of x (rows, C) = token r's row of the tied table, widened as its layer stores it (the same float products as
// the embedding modules: a copy, bf16 bits shifted, int8 times the row's scale, int4 as widen_row_i4), plus the row
// of wpe at its position (positions[r], or pos for every row where positions is null). Returns 1 if a token id is
// outside [0, V), 2 if a position is outside [0, n_ctx), 0 when every row was written; nothing is written unless all
// are valid.
static int embed_rows(const Model& M, int64_t rows, const int64_t* tokens, const int64_t* positions, int64_t pos,
                      float* x) {
    const Linear& E = M.head;
    const int64_t C = M.n_embd;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t p = positions ? positions[r] : pos;
        if (tokens[r] < 0 || tokens[r] >= E.n) return 1;
        if (p < 0 || p >= M.n_ctx) return 2;
    }
    for (int64_t r = 0; r < rows; r++) {
        const int64_t t = tokens[r], p = positions ? positions[r] : pos;
        float* xr = x + r * C;
        if (E.kind == F32) memcpy(xr, (const float*)E.weight + t * C, C * sizeof(float));
        else if (E.kind == BF16)
            for (int64_t i = 0; i < C; i++) xr[i] = bf16_to_float(((const uint16_t*)E.weight)[t * C + i]);
        else if (E.kind == INT8)
            for (int64_t i = 0; i < C; i++) xr[i] = (float)((const int8_t*)E.weight)[t * C + i] * E.scale[t];
        else widen_row_i4((const uint8_t*)E.weight + t * (C / 2), E.group_scale + t * (C / 32), E.scale[t], C, xr);
        const float* pe = M.wpe + p * C;
        for (int64_t i = 0; i < C; i++) xr[i] += pe[i];
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------------- the step
// B rows of x (width L.k) rounded to what L's products multiply: int8 for an integer layer, bf16 for a bf16 one on
// the dot-product path; others read x itself.
static void round_rows_for(const Linear& L, const float* x, int64_t B, const QuantRows& q) {
    if (integer(L)) quantize_rows(x, B, L.k, q);
#if defined(USE_BF16_DOT)
    else if (L.kind == BF16) round_rows_bf16(x, B, L.k, q.bf16);
#endif
}

// One product, out = x L^T (+ epilogue), over the team: each thread first rounds its own copy of x (round_rows_for).
static void project(const Linear& L, const float* x, const QuantRows& xq, int64_t B, float* out, int64_t ld_out,
                    Epilogue how, int32_t activation, int nth) {
    round_rows_for(L, x, B, xq);
    linear_rows(L, x, xq, B, out, ld_out, how, activation, nth);
}

// Embeds the tokens into x (B, C); on return logits (B, V) hold the next-token logits and the cache holds this
// token's keys and values at column pos (the caller advances the cache). Returns embed_rows' refusal (1: a token id,
// 2: a position out of range; nothing computed), else 0.
extern "C" int gpt2lab_decode_step(const Model* model, const Step* step) {
    const Model& M = *model;
    const Step& S = *step;
    if (const int bad = embed_rows(M, S.batch, S.tokens, S.positions, S.pos, S.x)) return bad;
    const int64_t B = S.batch, C = M.n_embd, F = M.ffn, H = M.n_head;
    const int64_t widest = C > F ? C : F;
    Barrier meet;
    meet.spin_ns = SPIN_NS.load(std::memory_order_relaxed);
#pragma omp parallel num_threads(S.threads)
    {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        float* norm = S.norm + tid * B * C;               // (B, C) this thread's LayerNorm output
        float* scores = S.scores + tid * S.s_max;         // (S_max,)
        const QuantRows xq{S.xq + tid * B * widest,          // (B, max(C, F))
                           S.xq_scale + tid * B,             // (B,)
                           S.xq_sums + tid * B * (widest / 32),  // (B, max(C, F) / 32)
                           S.xb + tid * B * widest};         // (B, max(C, F))
        for (int64_t l = 0; l < M.n_layer; l++) {
            const Layer& L = M.layers[l];
            layer_norm(S.x, L.ln1_w, L.ln1_b, M.eps, B, C, norm);
            project(L.attn, norm, xq, B, S.qkv, 3 * C, STORE, M.activation, nth);
            barrier_wait(meet, nth);
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t bh = 0; bh < B * H; bh++) attend_head(M, S, l, bh / H, bh % H, scores);
            barrier_wait(meet, nth);
            project(L.attn_proj, S.att, xq, B, S.x, C, ADD_TO, M.activation, nth);
            barrier_wait(meet, nth);
            layer_norm(S.x, L.ln2_w, L.ln2_b, M.eps, B, C, norm);
            project(L.fc, norm, xq, B, S.hidden, F, ACTIVATE, M.activation, nth);
            barrier_wait(meet, nth);
            project(L.mlp_proj, S.hidden, xq, B, S.x, C, ADD_TO, M.activation, nth);
            barrier_wait(meet, nth);
        }
        layer_norm(S.x, M.lnf_w, M.lnf_b, M.eps, B, C, norm);
        project(M.head, norm, xq, B, S.logits, M.head.n, STORE, M.activation, nth);
        barrier_wait(meet, nth);  // so OpenMP's own barrier at the end of the region finds everyone there
    }
    return 0;
}

// Rows [lo, hi) of n split evenly between the team: this thread's share of the elementwise work of a prefill.
static inline void share(int64_t n, int tid, int nth, int64_t* lo, int64_t* hi) {
    *lo = n * tid / nth;
    *hi = n * (tid + 1) / nth;
}

// One product of a prefill over all M rows, out = x L^T (+ epilogue): each thread rounds its share of the rows into
// the shared q, then every thread reads all of them (each weight row streamed once for all M).
static void project_rows(const Linear& L, const float* x, const QuantRows& q, int64_t M, float* out, int64_t ld_out,
                         Epilogue how, int32_t activation, Barrier& meet, int tid, int nth) {
    int64_t lo, hi;
    share(M, tid, nth, &lo, &hi);
    const int64_t K = L.k;
    round_rows_for(L, x + lo * K, hi - lo, QuantRows{q.q + lo * K, q.scale + lo, q.sums8 + lo * (K / 32),
                                                     q.bf16 + lo * K});
    barrier_wait(meet, nth);
    linear_rows(L, x, q, M, out, ld_out, how, activation, nth);
    barrier_wait(meet, nth);
}

// Encodes a prompt: every token of every row through the blocks, its keys and values into the cache at columns
// [past, past + T), and the logits of each row's last token. The products are the step's (each weight streamed
// once for all M = B x T rows), and so is the attention: each token attends to the columns up to its own (causal)
// that the mask keeps. Returns embed_rows' refusal (1: a token id, 2: a position; nothing computed), else 0.
extern "C" int gpt2lab_prefill(const Model* model, const Prefill* prefill) {
    const Model& M = *model;
    const Prefill& P = *prefill;
    const int64_t B = P.batch, T = P.length, R = B * T, C = M.n_embd, F = M.ffn, H = M.n_head, D = C / H;
    const int64_t S = P.past + T;  // columns after this prompt
    if (const int bad = embed_rows(M, R, P.tokens, P.positions, 0, P.x)) return bad;
    const QuantRows q{P.xq, P.xq_scale, P.xq_sums, P.xb};
    Barrier meet;
    meet.spin_ns = SPIN_NS.load(std::memory_order_relaxed);
#pragma omp parallel num_threads(P.threads)
    {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        float* scores = P.scores + tid * S;  // (S,)
        int64_t lo, hi;
        share(R, tid, nth, &lo, &hi);  // this thread's rows of the LayerNorms and of the cache writes
        for (int64_t l = 0; l < M.n_layer; l++) {
            const Layer& L = M.layers[l];
            layer_norm(P.x + lo * C, L.ln1_w, L.ln1_b, M.eps, hi - lo, C, P.norm + lo * C);
            project_rows(L.attn, P.norm, q, R, P.qkv, 3 * C, STORE, M.activation, meet, tid, nth);
            for (int64_t r = lo; r < hi; r++) {  // keys and values into their columns, before anyone reads them
                const int64_t b = r / T, col = P.past + r % T;
                for (int64_t h = 0; h < H; h++) {
                    const int64_t at = cache_offset(l, P.batch_max, b, H, h, P.s_max, D) + col * D;
                    memcpy(P.k_cache + at, P.qkv + r * 3 * C + C + h * D, D * sizeof(float));
                    memcpy(P.v_cache + at, P.qkv + r * 3 * C + 2 * C + h * D, D * sizeof(float));
                }
            }
            barrier_wait(meet, nth);
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t rh = 0; rh < R * H; rh++) {
                const int64_t r = rh / H, h = rh % H, b = r / T, col = P.past + r % T;
                const int64_t at = cache_offset(l, P.batch_max, b, H, h, P.s_max, D);
                attend(P.qkv + r * 3 * C + h * D, P.k_cache + at, P.v_cache + at, col + 1, D,
                       P.mask ? P.mask + b * S : nullptr, col, scores, P.att + r * C + h * D);
            }
            barrier_wait(meet, nth);
            project_rows(L.attn_proj, P.att, q, R, P.x, C, ADD_TO, M.activation, meet, tid, nth);
            layer_norm(P.x + lo * C, L.ln2_w, L.ln2_b, M.eps, hi - lo, C, P.norm + lo * C);
            project_rows(L.fc, P.norm, q, R, P.hidden, F, ACTIVATE, M.activation, meet, tid, nth);
            project_rows(L.mlp_proj, P.hidden, q, R, P.x, C, ADD_TO, M.activation, meet, tid, nth);
        }
        int64_t b0, b1;
        share(B, tid, nth, &b0, &b1);  // each row's last token through the final LayerNorm into norm rows [0, B)
        for (int64_t b = b0; b < b1; b++)  // project_rows' barrier after its rounding waits for these rows too
            layer_norm(P.x + (b * T + T - 1) * C, M.lnf_w, M.lnf_b, M.eps, 1, C, P.norm + b * C);
        project_rows(M.head, P.norm, q, B, P.logits, M.head.n, STORE, M.activation, meet, tid, nth);
    }
    return 0;
}

// int4 weights widened to float32, (N, K / 2) bytes -> (N, K): what a prefill multiplies by (Int4Linear.dequantized),
// rows split between the threads.
extern "C" void gpt2lab_dequantize_int4(const uint8_t* packed, const int16_t* group_scale, const float* row_scale,
                                        int64_t N, int64_t K, float* out) {
    const int64_t G = K / 32;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        widen_row_i4(packed + n * (K / 2), group_scale + n * G, row_scale[n], K, out + n * K);
}

// Whether this CPU runs what this build was compiled for, asked of the CPU itself (CPUID, and the OS's saving of the
// AVX-512 registers) rather than of /proc/cpuinfo: a build whose instructions would fault is not used
// (gpt2lab/native.py falls back to the AVX2 build). An emulated build needs only AVX2, FMA and F16C.
extern "C" int gpt2lab_cpu_ok(void) {
    __builtin_cpu_init();
    unsigned eax, ebx, ecx, edx;  // F16C from CPUID leaf 1 itself: not every compiler's __builtin_cpu_supports knows it
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
    int ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
#if defined(USE_AVX512) && !defined(GPT2LAB_EMULATE_AVX512)
    ok = ok && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#endif
#if defined(USE_BF16_DOT) && !defined(GPT2LAB_EMULATE_AVX512)
    ok = ok && __builtin_cpu_supports("avx512bf16");
#endif
#if defined(USE_VNNI) && !defined(GPT2LAB_EMULATE_AVX512)
    ok = ok && __builtin_cpu_supports("avx512vnni");
#endif
    return ok;
}

// Which wider paths this build took (the header comment): 1 AVX-512 (int4), 2 bf16 dot products, 4 VNNI (int8),
// 8 emulated by SIMDe (tests).
extern "C" int gpt2lab_kernel_paths(void) {
    int paths = 0;
#if defined(USE_AVX512)
    paths |= 1;
#endif
#if defined(USE_BF16_DOT)
    paths |= 2;
#endif
#if defined(USE_VNNI)
    paths |= 4;
#endif
#if defined(GPT2LAB_EMULATE_AVX512)
    paths |= 8;
#endif
    return paths;
}

// The index of each row's largest value, the first where several tie (torch.argmax's answer), for greedy decoding:
// (B, V) -> (B,). One vector pass finds the maximum, a second the first index holding it. Returns 1
// without answering where a row holds a NaN (torch calls NaN the largest; the caller asks torch), else 0.
extern "C" int gpt2lab_argmax_rows(const float* x, int64_t B, int64_t V, int64_t* out) {
    for (int64_t r = 0; r < B; r++) {
        const float* row = x + r * V;
        __m256 m[4], nan = _mm256_setzero_ps();  // four maxima in flight: max's latency, not its rate, bounds one
        for (int j = 0; j < 4; j++) m[j] = _mm256_set1_ps(-INFINITY);
        int64_t i = 0;
        for (; i + 32 <= V; i += 32)
            for (int j = 0; j < 4; j++) {
                const __m256 v = _mm256_loadu_ps(row + i + 8 * j);
                m[j] = _mm256_max_ps(m[j], v);
                nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            }
        for (; i + 8 <= V; i += 8) {
            const __m256 v = _mm256_loadu_ps(row + i);
            m[0] = _mm256_max_ps(m[0], v);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float best = hmax(_mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
        bool has_nan = _mm256_movemask_ps(nan) != 0;
        for (; i < V; i++) {
            has_nan = has_nan || row[i] != row[i];
            best = row[i] > best ? row[i] : best;
        }
        if (has_nan) return 1;
        const __m256 vbest = _mm256_set1_ps(best);
        int64_t at = 0;
        for (; at + 8 <= V; at += 8) {
            const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + at), vbest, _CMP_EQ_OQ));
            if (hits) {
                at += __builtin_ctz(hits);
                break;
            }
        }
        while (row[at] != best) at++;  // best is one of the row's values (V >= 1), so this stops
        out[r] = at;
    }
    return 0;
}

// How long a thread spins at a barrier before it sleeps (benchmarks/threads_under_load.py --spin-us).
extern "C" void gpt2lab_set_spin_ns(int64_t ns) { SPIN_NS.store(ns < 0 ? 0 : ns, std::memory_order_relaxed); }

// The OpenMP runtime's thread count as this library sees it (a test checks it is torch's).
extern "C" int gpt2lab_omp_max_threads(void) { return omp_get_max_threads(); }

