// CPU GEMV for packed group-wise codes (compress/format.py): y [M, N] = x [M, K] @ W_hatᵀ for a few rows
// of x (decode), reading the bit planes directly: the cost is the packed bytes, not a dense copy of W.
// Built and loaded by cpu_ext.py; tested against kernels/reference.py by tests/test_cpu_ext.py.
//
// Math (fp32 accumulation; codes are small integers, exact in fp32):
//   y[m, n] = Σ_g s[n, g] · (Σ_{k∈g} code[n, k] · x[m, k]  −  z[n, g] · X[m, g]),  X[m, g] = Σ_{k∈g} x[m, k]
// with X computed once per call (z = 2^(bits−1) for symmetric grids).
//
// AVX2 path (widths 1-4; group size a multiple of 32, or one group per row). The widest plane (width
// P = 4 for 4 bits, 2 for 2 and 3 bits, 1 for 1 bit) holds C = 32 / P codes per word; a *super-block* is 8 consecutive
// words of it, S = 8 C codes, loaded as one vector, lane l holding codes [C l, C l + C). Code j of every
// lane is masked in place, (words & ((2^P − 1) << P j)) = code · 2^(P j), converted to fp32 (exact) and
// FMA'd with x permuted and pre-scaled once per call, xp[S t + 8 j + l] = x[S t + C l + j] · 2^(−P j):
// one AND, one int -> float and one FMA per 8 codes, a contiguous load of x shared by the rows of W in the
// block (the last code of a word is a plain shift, unscaled). 3 bits add the 1-bit plane: its bits are
// spread next to the 2-bit plane's (one shift/mask sequence per super-block) and OR'd in before the
// conversion. The pre-scaling of x is exact unless |x| < 2^-98 (then x · 2^-28 loses bits as a subnormal).
// Scales and zero points: when a group spans whole super-blocks (a multiple of S, or one group per row),
// each lane of a group's accumulator takes off its share of the zero-point term, acc − z · XL (XL: that
// lane's sum of x over the group, computed once per call) and is scaled by s into the row's total;
// otherwise (group size 32 for 4 bits, 32 or 64 for 2 and 3 bits) the same is done per super-block with
// lane-wise scales and zero points (the lanes of one 32-code block share a group). The subtraction comes
// before the scaling, so x = e_k reads back exactly fl(s · (code − z)), the reference's Ŵ. The tail
// super-block of a row is a masked load (zero codes against zero-padded x). Rows of W go 4 at a time (one
// row of x) or 2 at a time against up to 4 rows of x; the rows 16 further on are prefetched, since rows
// are short (288 bytes for K = 576) and the block switches between them every 32 bytes.
//
// Zero points are uint8, or fp32 for a binary layer (PB-LLM) run as a 1-bit grid: mu + alpha (2 s - 1) =
// s' (s - z') with s' = 2 alpha and z' = (alpha - mu) / (2 alpha) (kernels/cpu.py makes them).
//
// Portable path (no AVX2 at build time, widths 5-8, or a group size that is not a multiple of 32): scalar decode of
// 32 codes at a time, any group size >= 1. Both paths split rows of W over threads with at::parallel_for.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

struct Problem {
  const float* x;     // [M, Kx] fp32, natural order, zero past K
  const float* xp;    // [M, Kx] permuted and pre-scaled to the super-block order (AVX2 path)
  int64_t Kx;         // padded row length of x / xp
  const float* xsum;  // [M, G] per-group sums of x (portable path)
  const float* xl;    // [M, xlq] per-lane sums of x: [G][8] per group (uniform) or [T][8] per super-block (lane)
  int64_t xlq;
  const int32_t* qw;  // qweight rows, `qstride` words apart
  int64_t qstride;
  const void* scale;  // [N, G] rows `sstride` apart, dtype sdtype
  int64_t sstride;
  at::ScalarType sdtype;
  const uint8_t* zero;  // [N, G] rows `zstride` apart, or null (symmetric: zsym, or zerof)
  const float* zerof;   // [N, G] fp32 zero points rows `zstride` apart (a binary layer's affine form), or null
  int64_t zstride;
  float zsym;
  int64_t N, K, KB, G, gsize;
  int bits, M;
  const void* bias;   // [N] or null, dtype bdtype, added in fp32 before the output's rounding
  at::ScalarType bdtype;
  float* yf;          // [M, N] output when x is fp32
  c10::BFloat16* yb;  // [M, N] output when x is bf16
};

constexpr int64_t CHUNK = 64;  // rows whose scales and zero points are converted to fp32 at a time

inline void to_float(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);  // a shift: bf16 is fp32's top half
}

inline void to_float(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

inline void to_float(const uint8_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Scales and zero points of rows [n0, n1) as fp32, G per row: one conversion loop over the whole range
// when the rows are contiguous, else one per row.
void row_params(const Problem& p, int64_t n0, int64_t n1, float* sf, float* zf) {
  const int64_t G = p.G;
  const bool flat = p.sstride == G && (!p.zero || p.zstride == G);
  const int64_t rows = flat ? 1 : n1 - n0, len = flat ? (n1 - n0) * G : G;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    float* s = sf + r * G;
    switch (p.sdtype) {
      case at::kHalf: to_float(static_cast<const c10::Half*>(p.scale) + n * p.sstride, s, len); break;
      case at::kBFloat16: to_float(static_cast<const c10::BFloat16*>(p.scale) + n * p.sstride, s, len); break;
      default: to_float(static_cast<const float*>(p.scale) + n * p.sstride, s, len);
    }
    if (p.zero)
      to_float(p.zero + n * p.zstride, zf + r * G, len);
    else if (p.zerof)
      to_float(p.zerof + n * p.zstride, zf + r * G, len);
    else
      std::fill(zf + r * G, zf + r * G + len, p.zsym);
  }
}

inline float bias_at(const Problem& p, int64_t n) {
  switch (p.bdtype) {
    case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(p.bias)[n]);
    case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p.bias)[n]);
    case at::kDouble: return static_cast<float>(static_cast<const double*>(p.bias)[n]);
    default: return static_cast<const float*>(p.bias)[n];
  }
}

inline void store(const Problem& p, int m, int64_t n, float v) {
  if (p.bias) v += bias_at(p, n);
  if (p.yf)
    p.yf[m * p.N + n] = v;
  else
    p.yb[m * p.N + n] = c10::BFloat16(v);
}

// ---- portable path -----------------------------------------------------------------------------------

// Codes [32 blk, 32 blk + 32) of one row (any width 1..8: the planes of format.PLANES).
inline void decode_block(const uint32_t* row, int64_t KB, int bits, int64_t blk, uint32_t* c) {
  for (int i = 0; i < 32; ++i) c[i] = 0;
  int shift = 0;
  for (int p = 8; p > 0; p >>= 1) {
    if (!(bits & p)) continue;
    const uint32_t* words = row + KB * shift + blk * p;  // the plane starts at word KB * shift
    const uint32_t mask = (1u << p) - 1u;
    for (int i = 0; i < 32; ++i) c[i] |= ((words[(i * p) >> 5] >> ((i * p) & 31)) & mask) << shift;
    shift += p;
  }
}

// Rows [n0, n1) of W one at a time, fn(n, s, z, row): the row's fp32 scales and zero points (G each, converted
// CHUNK rows at a time) and its packed words.
template <typename Fn>
void each_row(const Problem& p, int64_t n0, int64_t n1, Fn&& fn) {
  std::vector<float> sf(CHUNK * p.G), zf(CHUNK * p.G);
  for (int64_t c0 = n0; c0 < n1; c0 += CHUNK) {
    const int64_t c1 = std::min(n1, c0 + CHUNK);
    row_params(p, c0, c1, sf.data(), zf.data());
    for (int64_t n = c0; n < c1; ++n)
      fn(n, sf.data() + (n - c0) * p.G, zf.data() + (n - c0) * p.G,
         reinterpret_cast<const uint32_t*>(p.qw + n * p.qstride));
  }
}

// Any group size: y[m, n] = Σ_g s (Σ_{k∈g} code x − z X[m, g]), one row at a time.
void rows_portable(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t G = p.G;
  std::vector<float> acc(p.M), tot(p.M);
  uint32_t c[32];
  each_row(p, n0, n1, [&](int64_t n, const float* s, const float* z, const uint32_t* row) {
    std::fill(acc.begin(), acc.end(), 0.f);
    std::fill(tot.begin(), tot.end(), 0.f);
    int64_t g = 0, gend = std::min(p.gsize, p.K);
    auto flush = [&] {
      for (int m = 0; m < p.M; ++m) tot[m] += s[g] * (acc[m] - z[g] * p.xsum[m * G + g]), acc[m] = 0.f;
    };
    for (int64_t blk = 0; blk < p.KB; ++blk) {
      decode_block(row, p.KB, p.bits, blk, c);
      const int64_t k0 = blk * 32, kn = std::min<int64_t>(32, p.K - k0);
      for (int64_t i = 0; i < kn; ++i) {
        const int64_t k = k0 + i;
        if (k == gend) {
          flush();
          ++g;
          gend = std::min(gend + p.gsize, p.K);
        }
        const float cf = static_cast<float>(c[i]);
        for (int m = 0; m < p.M; ++m) acc[m] += cf * p.x[m * p.Kx + k];
      }
    }
    flush();
    for (int m = 0; m < p.M; ++m) store(p, m, n, tot[m]);
  });
}

// ---- AVX2 path ---------------------------------------------------------------------------------------

#ifdef __AVX2__

#define WQ_UNROLL _Pragma("GCC unroll 16")
#define WQ_INLINE inline __attribute__((always_inline))  // the whole super-block step must fold into one body

constexpr int64_t PF_ROWS = 16;  // software prefetch distance, in rows of W

template <int BITS>
struct Geo {
  static constexpr int P = BITS == 3 ? 2 : BITS;  // width of the widest plane
  static constexpr int C = 32 / P;                 // codes per word of it
  static constexpr int S = 8 * C;                  // codes per super-block (8 words)
};

WQ_INLINE __m256i load_words(const int32_t* w, int64_t n) {
  if (n >= 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_epi32(w, mask);
}

// 3 bits: the 1-bit plane of super-block t, lane l holding the bits of codes [16 l, 16 l + 16) spread to
// every other position: code j's bit at bit 2 j + 2, just above its two low bits in the 2-bit plane, except
// the last code's (j = 15), which would fall off the word and sits at bit 0 instead.
WQ_INLINE __m256i load_hi(const int32_t* row, int64_t KB, int64_t t) {
  const int64_t n = std::min<int64_t>(4, KB - 4 * t);
  const int32_t* w = row + 2 * KB + 4 * t;  // the 1-bit plane starts at word 2 KB
  const __m128i mask = _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(n)), _mm_setr_epi32(0, 1, 2, 3));
  const __m128i q = n >= 4 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(w)) : _mm_maskload_epi32(w, mask);
  const __m256i d = _mm256_permutevar8x32_epi32(_mm256_castsi128_si256(q), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  __m256i v = _mm256_and_si256(_mm256_srlv_epi32(d, _mm256_setr_epi32(0, 16, 0, 16, 0, 16, 0, 16)),
                               _mm256_set1_epi32(0xFFFF));
  v = _mm256_and_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 8)), _mm256_set1_epi32(0x00FF00FF));
  v = _mm256_and_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 4)), _mm256_set1_epi32(0x0F0F0F0F));
  v = _mm256_and_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 2)), _mm256_set1_epi32(0x33333333));
  v = _mm256_and_si256(_mm256_or_si256(v, _mm256_slli_epi32(v, 1)), _mm256_set1_epi32(0x55555555));
  return _mm256_or_si256(_mm256_slli_epi32(v, 2), _mm256_srli_epi32(v, 30));
}

// Code j of every lane as fp32, times 2^(P j) for j < C - 1 (x is pre-scaled by 2^(-P j) to match): the
// code is masked in place, so one AND and one int -> float per 8 codes (the top code is a plain shift).
// Exact: at most 3 significant bits below 2^31.
template <int BITS, int J>
WQ_INLINE __m256 decode(__m256i w, __m256i hi) {
  constexpr int P = Geo<BITS>::P, C = Geo<BITS>::C;
  __m256i v;
  if constexpr (J == C - 1) {
    v = _mm256_srli_epi32(w, 32 - P);
    if constexpr (BITS == 3) v = _mm256_or_si256(v, _mm256_slli_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)), 2));
  } else if constexpr (BITS == 3) {
    v = _mm256_or_si256(_mm256_and_si256(w, _mm256_set1_epi32(3 << (2 * J))),
                        _mm256_and_si256(hi, _mm256_set1_epi32(static_cast<int>(4u << (2 * J)))));
  } else {
    v = _mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(((1u << P) - 1u) << (P * J))));
  }
  return _mm256_cvtepi32_ps(v);
}

WQ_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One super-block: acc[J % A][r][m] += decoded codes of row r · x row m, code positions J..C-1 (unrolled).
// A accumulator sets split each row's chain of C dependent FMAs (their latency, not their throughput,
// would bound the loop otherwise).
template <int BITS, int R, int MB, int A, int J = 0>
WQ_INLINE void steps(const __m256i* w, const __m256i* hi, const float* xt, int64_t Kx, __m256 (&acc)[A][R][MB]) {
  if constexpr (J < Geo<BITS>::C) {
    __m256 d[R];
    WQ_UNROLL
    for (int r = 0; r < R; ++r) d[r] = decode<BITS, J>(w[r], hi[r]);
    WQ_UNROLL
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(xt + m * Kx + 8 * J);
      WQ_UNROLL
      for (int r = 0; r < R; ++r) acc[J % A][r][m] = _mm256_fmadd_ps(d[r], xv, acc[J % A][r][m]);
    }
    steps<BITS, R, MB, A, J + 1>(w, hi, xt, Kx, acc);
  }
}

template <int A, int R, int MB>
WQ_INLINE void zero_acc(__m256 (&acc)[A][R][MB]) {
  WQ_UNROLL
  for (int a = 0; a < A; ++a)
    WQ_UNROLL
    for (int r = 0; r < R; ++r)
      WQ_UNROLL
      for (int m = 0; m < MB; ++m) acc[a][r][m] = _mm256_setzero_ps();
}

template <int A, int R, int MB>
WQ_INLINE __m256 acc_sum(const __m256 (&acc)[A][R][MB], int r, int m) {
  __m256 v = acc[0][r][m];
  WQ_UNROLL
  for (int a = 1; a < A; ++a) v = _mm256_add_ps(v, acc[a][r][m]);
  return v;
}

// R rows of W (from row n) against MB rows of x (from m0): dot[r][m] = y[m0 + m, n + r]. sf / zf: R rows
// of G scales / zero points as fp32, G apart. Uniform (!LANE): a group is `spg` whole super-blocks (all T
// for one group per row); at its end each lane takes off its share of the zero-point term,
// acc − z · (lane sum of x over the group), and is scaled into the row's total. LANE: the same per
// super-block with lane-wise scales and zero points (s32 / z32 rows: one per 32-code block, S / 32 blocks
// per super-block). Either way the identity x reads back s · (code − z) with one rounding. Out of line and
// small, so the accumulators stay in registers; the masked tail super-block (the row ends in it) takes
// the slow load.
template <int BITS, int R, int MB, bool LANE>
__attribute__((noinline)) void row_block(const Problem& p, int64_t n, int m0, const float* sf, const float* zf,
                                         const float* const* s32, const float* const* z32, float (&dot)[4][4]) {
  constexpr int S = Geo<BITS>::S, P = Geo<BITS>::P, A = (BITS <= 2 && R * MB <= 4) ? 2 : 1;
  const int64_t KB = p.KB, W0 = KB * P, T = (W0 + 7) / 8, full = W0 / 8, G = p.G, Kx = p.Kx, xlq = p.xlq;
  const int64_t spg = LANE ? 1 : (p.gsize >= p.K ? T : p.gsize / S);  // super-blocks per group
  const float* x = p.xp + m0 * Kx;
  const float* xl = p.xl + m0 * xlq;
  const int64_t pf = PF_ROWS * p.qstride;
  const int32_t* rows[R];
  WQ_UNROLL
  for (int r = 0; r < R; ++r) rows[r] = p.qw + (n + r) * p.qstride;
  __m256 acc[A][R][MB], tot[R][MB];
  WQ_UNROLL
  for (int r = 0; r < R; ++r)
    WQ_UNROLL
    for (int m = 0; m < MB; ++m) tot[r][m] = _mm256_setzero_ps();
  __m256i w[R], hi[R];
  WQ_UNROLL
  for (int r = 0; r < R; ++r) hi[r] = _mm256_setzero_si256();
  // LANE: lane l of super-block t belongs to 32-code block (S / 32) t + l / (8 / (S / 32))
  // (1 bit: S = 256, one 32-code block per lane, so the 8 per-block values load as they are)
  const __m256i lanes = P == 4 ? _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1) : _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  for (int64_t t0 = 0, g = 0; t0 < T; t0 += spg, ++g) {
    zero_acc(acc);
    const int64_t t1 = std::min(T, t0 + spg);
    for (int64_t t = t0; t < t1; ++t) {
      WQ_UNROLL
      for (int r = 0; r < R; ++r) {
        // the same words PF_ROWS rows further on: a block's rows are short, too short for the hardware
        // prefetcher to run ahead of a stream that keeps switching rows (a no-op past the matrix)
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + pf + 8 * t), _MM_HINT_T0);
        if constexpr (BITS == 3) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + pf + 2 * KB + 4 * t), _MM_HINT_T0);
        w[r] = t < full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + 8 * t))
                        : load_words(rows[r] + 8 * t, W0 - 8 * t);
        if constexpr (BITS == 3) hi[r] = load_hi(rows[r], KB, t);
      }
      steps<BITS, R, MB, A>(w, hi, x + t * S, Kx, acc);
    }
    WQ_UNROLL
    for (int r = 0; r < R; ++r) {
      __m256 sv, zv;
      if constexpr (LANE && S / 32 == 8) {
        sv = _mm256_loadu_ps(s32[r] + t0 * 8);
        zv = _mm256_loadu_ps(z32[r] + t0 * 8);
      } else if constexpr (LANE) {
        sv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s32[r] + t0 * (S / 32))), lanes);
        zv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(z32[r] + t0 * (S / 32))), lanes);
      } else {
        sv = _mm256_set1_ps(sf[r * G + g]);
        zv = _mm256_set1_ps(zf[r * G + g]);
      }
      WQ_UNROLL
      for (int m = 0; m < MB; ++m) {
        const __m256 a = _mm256_fnmadd_ps(zv, _mm256_loadu_ps(xl + m * xlq + 8 * g), acc_sum(acc, r, m));
        tot[r][m] = _mm256_fmadd_ps(sv, a, tot[r][m]);
      }
    }
  }
  WQ_UNROLL
  for (int r = 0; r < R; ++r)
    WQ_UNROLL
    for (int m = 0; m < MB; ++m) dot[r][m] = hsum(tot[r][m]);
}

// With one row of x, 4 rows of W share each x load; with several, 2 rows of W and up to 4 rows of x
// (the accumulators stay in the 16 ymm registers).
template <int BITS, bool LANE>
void row_chunk(const Problem& p, int64_t n, int rows, int m0, int mb, const float* sf, const float* zf,
               const float* const* s32, const float* const* z32, float (&dot)[4][4]) {
  if (rows == 4) return row_block<BITS, 4, 1, LANE>(p, n, m0, sf, zf, s32, z32, dot);
  if (rows == 2) {
    switch (mb) {
      case 1: return row_block<BITS, 2, 1, LANE>(p, n, m0, sf, zf, s32, z32, dot);
      case 2: return row_block<BITS, 2, 2, LANE>(p, n, m0, sf, zf, s32, z32, dot);
      case 3: return row_block<BITS, 2, 3, LANE>(p, n, m0, sf, zf, s32, z32, dot);
      default: return row_block<BITS, 2, 4, LANE>(p, n, m0, sf, zf, s32, z32, dot);
    }
  }
  switch (mb) {
    case 1: return row_block<BITS, 1, 1, LANE>(p, n, m0, sf, zf, s32, z32, dot);
    case 2: return row_block<BITS, 1, 2, LANE>(p, n, m0, sf, zf, s32, z32, dot);
    case 3: return row_block<BITS, 1, 3, LANE>(p, n, m0, sf, zf, s32, z32, dot);
    default: return row_block<BITS, 1, 4, LANE>(p, n, m0, sf, zf, s32, z32, dot);
  }
}

// Rows [n0, n1) in chunks of CHUNK (their scales and zero points converted up front): blocks of 4 rows
// of W when x has one row, of 2 otherwise, single rows at the end.
template <int BITS, bool LANE>
void rows_avx2(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t G = p.G, ld32 = p.KB + 8;  // LANE: per-32-block rows, zero-padded past KB
  std::vector<float> sf(CHUNK * G), zf(CHUNK * G), sz32(LANE ? 8 * ld32 : 0, 0.f);
  const float *s32[4], *z32[4];
  for (int r = 0; r < 4; ++r) {
    s32[r] = LANE ? sz32.data() + r * ld32 : nullptr;
    z32[r] = LANE ? sz32.data() + (4 + r) * ld32 : nullptr;
  }
  float dot[4][4];
  const int R = p.M == 1 ? 4 : 2;
  for (int64_t c0 = n0; c0 < n1; c0 += CHUNK) {
    const int64_t c1 = std::min(n1, c0 + CHUNK);
    row_params(p, c0, c1, sf.data(), zf.data());
    for (int64_t n = c0; n < c1;) {
      const int rows = n + R <= c1 ? R : 1;
      const float* s = sf.data() + (n - c0) * G;
      const float* z = zf.data() + (n - c0) * G;
      if (LANE)  // the group's scale and zero point for each 32-code block (LANE: 32 divides the group size)
        for (int r = 0; r < rows; ++r)
          for (int64_t g = 0, b = 0; g < G; ++g)
            for (const int64_t end = std::min(p.KB, b + p.gsize / 32); b < end; ++b) {
              sz32[r * ld32 + b] = s[r * G + g];
              sz32[(4 + r) * ld32 + b] = z[r * G + g];
            }
      for (int m0 = 0; m0 < p.M; m0 += 4) {
        const int mb = std::min(4, p.M - m0);
        row_chunk<BITS, LANE>(p, n, rows, m0, mb, s, z, s32, z32, dot);
        for (int r = 0; r < rows; ++r)
          for (int m = 0; m < mb; ++m) store(p, m0 + m, n + r, dot[r][m]);
      }
      n += rows;
    }
  }
}

#endif  // __AVX2__

// The weight side of a Problem: packed rows, scales and zero points (uint8, fp32 or symmetric) and the sizes.
void set_weights(Problem& p, const torch::Tensor& qweight, const torch::Tensor& scale, const torch::Tensor& zero,
                 bool asym, bool zfloat, int64_t bits, int64_t group_size, int64_t K) {
  p.qw = qweight.data_ptr<int32_t>();
  p.qstride = qweight.stride(0);
  p.scale = scale.data_ptr();
  p.sstride = scale.stride(0);
  p.sdtype = scale.scalar_type();
  p.zero = asym && !zfloat ? zero.data_ptr<uint8_t>() : nullptr;
  p.zerof = zfloat ? zero.data_ptr<float>() : nullptr;
  p.zstride = asym ? zero.stride(0) : 0;
  p.zsym = static_cast<float>(1 << (bits - 1));
  p.N = qweight.size(0), p.K = K, p.KB = (K + 31) / 32, p.G = (K + group_size - 1) / group_size;
  p.gsize = group_size, p.bits = static_cast<int>(bits);
}

}  // namespace

torch::Tensor wq_gemv(const torch::Tensor& x_in, const torch::Tensor& qweight_in, const torch::Tensor& scale_in,
                      const torch::Tensor& zero_in, int64_t bits, int64_t group_size,
                      const c10::optional<torch::Tensor>& bias_in) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "cpu wq_gemv: widths 1 to 8 only, got ", bits);
  TORCH_CHECK(x_in.device().is_cpu() && qweight_in.device().is_cpu() && scale_in.device().is_cpu() &&
                  zero_in.device().is_cpu(),
              "cpu wq_gemv: tensors must be on the CPU");
  TORCH_CHECK(x_in.dim() >= 1, "cpu wq_gemv: x must be [..., K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "cpu wq_gemv: x must be float32 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(qweight_in.scalar_type() == at::kInt && qweight_in.dim() == 2, "cpu wq_gemv: qweight must be int32 [N, W]");
  const auto sdt = scale_in.scalar_type();
  TORCH_CHECK(sdt == at::kFloat || sdt == at::kHalf || sdt == at::kBFloat16,
              "cpu wq_gemv: scale must be float16, bfloat16 or float32, got ", sdt);
  TORCH_CHECK(group_size >= 1, "cpu wq_gemv: group_size must be >= 1, got ", group_size);
  const int64_t K = x_in.size(-1), M = K > 0 ? x_in.numel() / K : 0, N = qweight_in.size(0), KB = (K + 31) / 32;
  const int64_t G = (K + group_size - 1) / group_size;
  TORCH_CHECK(qweight_in.size(1) == KB * bits, "cpu wq_gemv: qweight has ", qweight_in.size(1), " words per row; K = ",
              K, " at ", bits, " bits needs ", KB * bits);
  TORCH_CHECK(scale_in.dim() == 2 && scale_in.size(0) == N && scale_in.size(1) == G, "cpu wq_gemv: scale must be [",
              N, ", ", G, "], got ", scale_in.sizes());
  const bool asym = zero_in.numel() > 0, zfloat = asym && zero_in.scalar_type() == at::kFloat;
  if (asym)
    TORCH_CHECK((zfloat || zero_in.scalar_type() == at::kByte) && zero_in.dim() == 2 && zero_in.size(0) == N &&
                    zero_in.size(1) == G,
                "cpu wq_gemv: zero must be uint8 (or float32, a binary layer's affine form) [", N, ", ", G,
                "] or empty (symmetric)");
  TORCH_CHECK(M < (int64_t(1) << 31), "cpu wq_gemv: too many rows");
  torch::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    const auto bdt = bias.scalar_type();
    TORCH_CHECK(bias.device().is_cpu() && bias.numel() == N &&
                    (bdt == at::kFloat || bdt == at::kHalf || bdt == at::kBFloat16 || bdt == at::kDouble),
                "cpu wq_gemv: bias must be a float64/32/16 or bfloat16 CPU tensor of ", N, " elements");
  }

  // Rows of qweight / scale / zero may be strided (a width part of a mixed layer is a column slice).
  const torch::Tensor qweight = qweight_in.stride(1) == 1 ? qweight_in : qweight_in.contiguous();
  const torch::Tensor scale = scale_in.stride(1) == 1 ? scale_in : scale_in.contiguous();
  const torch::Tensor zero = !asym || zero_in.stride(1) == 1 ? zero_in : zero_in.contiguous();
  const torch::Tensor x = x_in.contiguous();
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = N;
  torch::Tensor y = torch::empty(out_sizes, x.options());
  if (N == 0 || M == 0) return y;
  if (K == 0) return bias.defined() ? y.copy_(bias.expand_as(y)) : y.zero_();

#ifdef __AVX2__
  const bool fast = bits <= 4 && (group_size % 32 == 0 || group_size >= K);  // widths 5-8: the portable path
#else
  const bool fast = false;
#endif
  const int P = bits == 3 ? 2 : static_cast<int>(bits), C = 32 / P, S = 8 * C;  // Geo<BITS>
  const int64_t T = (KB * P + 7) / 8;                       // super-blocks per row
  const bool lane = fast && group_size < K && group_size % S != 0;
  const int64_t Kx = fast ? T * S : KB * 32, xlq = 8 * (lane ? T : G);
  std::vector<float> xf(M * Kx, 0.f), xsum(M * G), xp(fast ? M * Kx : 0), xl(fast ? M * xlq : 0, 0.f);
  float pscale[32];  // 2^(-P j) for j < C - 1, 1 for the last code of a word (see decode): exact
  for (int j = 0; j < C; ++j) pscale[j] = j == C - 1 ? 1.f : std::ldexp(1.f, -P * j);
  for (int64_t m = 0; m < M; ++m) {
    float* dst = xf.data() + m * Kx;
    if (x.scalar_type() == at::kFloat) {
      const float* src = x.data_ptr<float>() + m * K;
      std::copy(src, src + K, dst);
    } else {
      const c10::BFloat16* src = x.data_ptr<c10::BFloat16>() + m * K;
      for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(src[k]);
    }
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int64_t k = g * group_size, end = std::min(K, k + group_size); k < end; ++k) acc += dst[k];
      xsum[m * G + g] = acc;
    }
    if (fast) {  // xp[S t + 8 j + l] = x[S t + C l + j] · pscale[j]; xl: lane sums of x, per group or super-block
      float* out = xp.data() + m * Kx;
      float* lsum = xl.data() + m * xlq;
      const int64_t spg = group_size >= K ? T : group_size / S;
      for (int64_t t = 0; t < T; ++t) {
        const float* xt = dst + t * S;
        float* ls = lsum + 8 * (lane ? t : t / spg);
        for (int l = 0; l < 8; ++l) {
          float acc = 0.f;
          for (int j = 0; j < C; ++j) acc += xt[C * l + j];
          ls[l] += acc;
        }
        for (int j = 0; j < C; ++j)
          for (int l = 0; l < 8; ++l) out[t * S + 8 * j + l] = xt[C * l + j] * pscale[j];
      }
    }
  }

  Problem p{};
  p.x = xf.data();
  p.xp = xp.data();
  p.Kx = Kx;
  p.xsum = xsum.data();
  p.xl = xl.data();
  p.xlq = xlq;
  set_weights(p, qweight, scale, zero, asym, zfloat, bits, group_size, K);
  p.M = static_cast<int>(M);
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.bdtype = bias.defined() ? bias.scalar_type() : at::kFloat;
  p.yf = x.scalar_type() == at::kFloat ? y.data_ptr<float>() : nullptr;
  p.yb = x.scalar_type() == at::kBFloat16 ? y.data_ptr<c10::BFloat16>() : nullptr;

  // Blocks of 4 rows; a task gets at least ~32k codes, so a 192-row layer still splits over two threads
  // while a tiny one runs inline (no thread wake-up).
  const int64_t blocks = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 32768 / (4 * K));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * 4, n1 = std::min(N, b1 * 4);
#ifdef __AVX2__
    if (fast) {
      switch (bits) {
        case 1: return lane ? rows_avx2<1, true>(p, n0, n1) : rows_avx2<1, false>(p, n0, n1);
        case 2: return lane ? rows_avx2<2, true>(p, n0, n1) : rows_avx2<2, false>(p, n0, n1);
        case 3: return lane ? rows_avx2<3, true>(p, n0, n1) : rows_avx2<3, false>(p, n0, n1);
        default: return lane ? rows_avx2<4, true>(p, n0, n1) : rows_avx2<4, false>(p, n0, n1);
      }
    }
#endif
    rows_portable(p, n0, n1);
  });
  return y;
}

// W_hat [N, K] = s[n, g] · (code[n, k] − z[n, g]) in fp32 (the reference's operations, bit for bit), stored in
// `dtype` (float32, bfloat16 or float16: one rounding of the fp32 value). Any width 1..8 and group size; zero
// uint8, fp32 or empty (symmetric). Rows split over threads. The prefill path of kernels/cpu.py decodes a layer
// with it for one matmul instead of the reference's tensor-by-tensor decode.
torch::Tensor wq_dequant(const torch::Tensor& qweight_in, const torch::Tensor& scale_in, const torch::Tensor& zero_in,
                         int64_t bits, int64_t group_size, int64_t K, at::ScalarType dtype) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "cpu wq_dequant: widths 1 to 8 only, got ", bits);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "cpu wq_dequant: dtype must be float32, bfloat16 or float16");
  TORCH_CHECK(qweight_in.device().is_cpu() && scale_in.device().is_cpu() && zero_in.device().is_cpu(),
              "cpu wq_dequant: tensors must be on the CPU");
  TORCH_CHECK(qweight_in.scalar_type() == at::kInt && qweight_in.dim() == 2, "cpu wq_dequant: qweight must be int32 [N, W]");
  TORCH_CHECK(group_size >= 1 && K >= 0, "cpu wq_dequant: group_size >= 1 and K >= 0");
  const int64_t N = qweight_in.size(0), KB = (K + 31) / 32, G = (K + group_size - 1) / group_size;
  TORCH_CHECK(qweight_in.size(1) == KB * bits, "cpu wq_dequant: qweight has ", qweight_in.size(1),
              " words per row; K = ", K, " at ", bits, " bits needs ", KB * bits);
  const auto sdt = scale_in.scalar_type();
  TORCH_CHECK((sdt == at::kFloat || sdt == at::kHalf || sdt == at::kBFloat16) && scale_in.dim() == 2 &&
                  scale_in.size(0) == N && scale_in.size(1) == G,
              "cpu wq_dequant: scale must be float16, bfloat16 or float32 [", N, ", ", G, "]");
  const bool asym = zero_in.numel() > 0, zfloat = asym && zero_in.scalar_type() == at::kFloat;
  if (asym)
    TORCH_CHECK((zfloat || zero_in.scalar_type() == at::kByte) && zero_in.dim() == 2 && zero_in.size(0) == N &&
                    zero_in.size(1) == G,
                "cpu wq_dequant: zero must be uint8 or float32 [", N, ", ", G, "] or empty (symmetric)");
  const torch::Tensor qweight = qweight_in.stride(1) == 1 ? qweight_in : qweight_in.contiguous();
  const torch::Tensor scale = scale_in.stride(1) == 1 ? scale_in : scale_in.contiguous();
  const torch::Tensor zero = !asym || zero_in.stride(1) == 1 ? zero_in : zero_in.contiguous();
  torch::Tensor W = torch::empty({N, K}, qweight.options().dtype(dtype));
  if (N == 0 || K == 0) return W;
  Problem p{};
  set_weights(p, qweight, scale, zero, asym, zfloat, bits, group_size, K);
  const int64_t grain = std::max<int64_t>(1, 65536 / K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(KB * 32);
    uint32_t c[32];
    each_row(p, n0, n1, [&](int64_t n, const float* s, const float* z, const uint32_t* q) {
      for (int64_t blk = 0; blk < KB; ++blk) {
        decode_block(q, KB, p.bits, blk, c);
        for (int i = 0; i < 32; ++i) w[blk * 32 + i] = static_cast<float>(c[i]);
      }
      for (int64_t k = 0; k < K; ++k) w[k] = s[k / group_size] * (w[k] - z[k / group_size]);
      switch (dtype) {
        case at::kFloat: std::copy(w.begin(), w.begin() + K, W.data_ptr<float>() + n * K); break;
        case at::kBFloat16: std::transform(w.begin(), w.begin() + K, W.data_ptr<c10::BFloat16>() + n * K,
                                           [](float v) { return c10::BFloat16(v); }); break;
        default: std::transform(w.begin(), w.begin() + K, W.data_ptr<c10::Half>() + n * K,
                                [](float v) { return c10::Half(v); });
      }
    });
  });
  return W;
}

// The salient correction of a binary (PB-LLM) layer, y [M, N] += x [M, K] · Dᵀ for a CSR matrix D
// (rowptr int32 [N + 1], col uint16 stored as int16 or int32 [nnz], delta fp32 [nnz]): row n of y gathers
// the x at its columns. fp32 throughout; rows of D split over threads. 6 bytes a salient weight with
// 16-bit columns, read once per call for up to 8 rows of x (the AVX2 path gathers 8 entries at a time).
namespace {

template <typename Col>
inline int64_t col_at(const Col* col, int64_t j) {
  if constexpr (std::is_same_v<Col, int16_t>) return static_cast<uint16_t>(col[j]);
  else return col[j];
}

template <typename Col>
void csr_rows(float* y, const float* x, int64_t M, int64_t N, int64_t K, const int32_t* rowptr, const Col* col,
              const float* delta, int64_t n0, int64_t n1) {
  constexpr int MB = 8;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t a = rowptr[n], b = rowptr[n + 1];
    if (a == b) continue;
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const int mb = static_cast<int>(std::min<int64_t>(MB, M - m0));
      float acc[MB] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t j = a;
#ifdef __AVX2__
      __m256 v[MB];
      for (int m = 0; m < mb; ++m) v[m] = _mm256_setzero_ps();
      for (; j + 8 <= b; j += 8) {
        __m256i idx;
        if constexpr (std::is_same_v<Col, int16_t>)
          idx = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(col + j)));
        else
          idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + j));
        const __m256 d = _mm256_loadu_ps(delta + j);
        for (int m = 0; m < mb; ++m)
          v[m] = _mm256_fmadd_ps(_mm256_i32gather_ps(x + (m0 + m) * K, idx, 4), d, v[m]);
      }
      for (int m = 0; m < mb; ++m) acc[m] = hsum(v[m]);
#endif
      for (; j < b; ++j) {
        const int64_t k = col_at(col, j);
        const float d = delta[j];
        for (int m = 0; m < mb; ++m) acc[m] += x[(m0 + m) * K + k] * d;
      }
      for (int m = 0; m < mb; ++m) y[(m0 + m) * N + n] += acc[m];
    }
  }
}

}  // namespace

void csr_add_(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& rowptr, const torch::Tensor& col,
              const torch::Tensor& delta) {
  TORCH_CHECK(y.device().is_cpu() && x.device().is_cpu() && rowptr.device().is_cpu() && col.device().is_cpu() &&
                  delta.device().is_cpu(),
              "cpu csr_add_: tensors must be on the CPU");
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && y.dim() == 2 && x.dim() == 2 &&
                  y.is_contiguous() && x.is_contiguous() && x.size(0) == y.size(0),
              "cpu csr_add_: y and x must be contiguous float32 [M, N] and [M, K]");
  const int64_t M = y.size(0), N = y.size(1), K = x.size(1), nnz = col.numel();
  TORCH_CHECK(rowptr.scalar_type() == at::kInt && rowptr.numel() == N + 1 && rowptr.is_contiguous(),
              "cpu csr_add_: rowptr must be contiguous int32 [", N + 1, "]");
  TORCH_CHECK((col.scalar_type() == at::kShort || col.scalar_type() == at::kInt) && col.is_contiguous() &&
                  delta.scalar_type() == at::kFloat && delta.is_contiguous() && delta.numel() == nnz,
              "cpu csr_add_: col must be int16 (read as uint16) or int32, delta float32, both contiguous [nnz]");
  TORCH_CHECK(col.scalar_type() == at::kInt || K <= 65536, "cpu csr_add_: 16-bit columns need K <= 65536");
  if (M == 0 || N == 0 || nnz == 0) return;
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0 && rp[N] == nnz, "cpu csr_add_: rowptr must run from 0 to nnz = ", nnz);
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, N * 4096 / std::max<int64_t>(nnz, 1));  // ~4k entries a task
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    if (col.scalar_type() == at::kShort)
      csr_rows(yp, xp, M, N, K, rp, col.data_ptr<int16_t>(), dp, n0, n1);
    else
      csr_rows(yp, xp, M, N, K, rp, col.data_ptr<int32_t>(), dp, n0, n1);
  });
}

bool has_avx2() {
#ifdef __AVX2__
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wq_gemv", &wq_gemv,
        "y [..., N] = x [..., K] @ W_hat^T (+ bias) for packed 1-8-bit group-wise codes, fp32 accumulation, "
        "in x's dtype",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("bits"), py::arg("group_size"),
        py::arg("bias") = py::none());
  m.def("csr_add_", &csr_add_, "y [M, N] += x [M, K] @ D^T for a CSR D (rowptr int32, col int16/int32, delta fp32)",
        py::arg("y"), py::arg("x"), py::arg("rowptr"), py::arg("col"), py::arg("delta"));
  m.def("wq_dequant", &wq_dequant, "W_hat [N, K] in dtype for packed 1-8-bit group-wise codes (the reference decode)",
        py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("bits"), py::arg("group_size"), py::arg("K"),
        py::arg("dtype"));
  m.def("has_avx2", &has_avx2, "whether the extension was built with the AVX2/FMA path");
}
