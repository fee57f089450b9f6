// Unpack and dequantize helpers for the packed group-wise layout of compress/format.py.
//
// Every function here is `__host__ __device__` under nvcc and plain `inline` C++ under g++, so the
// same code runs in the CUDA kernel (wq_gemv_kernels.cuh) and in the host test driver
// (unpack_host_test.cpp, built by tests/test_cuda.py), which checks it bit for bit against
// format.unpack and reference.dequantize. No CUDA or torch header is needed.
//
// The layout (format.py is the spec). One row of qweight holds K codes of `bits` bits:
//   * `bits` is split into power-of-two bit planes, widest first: the set bits of `bits` in decreasing
//     order (1 = [1], 2 = [2], 3 = [2, 1], 4 = [4], 5 = [4, 1], 6 = [4, 2], 7 = [4, 2, 1], 8 = [8]).
//     Plane j of width p_j holds bits [s_j, s_j + p_j) of every code, s_j = sum of the widths before it.
//   * A plane of width p packs 32/p codes per 32-bit word along K, LSB first: code k sits in word
//     k / (32/p) of the plane at bit offset p * (k % (32/p)). K is padded with zero codes to KB * 32,
//     KB = ceil(K/32), so plane j is KB * p_j consecutive words and starts at word KB * s_j of the row.
//
// The kernel walk. The widest plane (width P0) decides the unit of work, a *chunk* of C = 32/P0
// consecutive codes: chunk q covers codes [q*C, q*C + C) and is exactly word q of plane 0. In every
// narrower plane of width p the chunk's C*p bits sit inside one word, word q*p/P0 of that plane, at bit
// offset C * ((q*p) % P0). `load_chunk` fetches these NP words (one per plane) and shifts each so the
// chunk's bits start at bit 0; `chunk_code` / `chunk_code_f1p` then decode code i of the chunk with
// compile-time shifts only. Consecutive lanes of a warp take consecutive chunks, so the plane-0 loads
// of a warp are 32 consecutive words (one 128-byte transaction) and the narrower planes' words are
// shared by neighbouring lanes (broadcast within the same transaction).
//
// Indices along K are `int` (K < 2^31): 64-bit integer division is a software routine on the GPU.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define WQ_HD __host__ __device__ __forceinline__
#define WQ_UNROLL _Pragma("unroll")
#else
#define WQ_HD inline
#define WQ_UNROLL
#endif

namespace wq {

// ---- the plane table of format.PLANES, as compile-time functions ------------------------------------

// Plain loops, not recursion: nvcc emits a recursive constexpr function as a real call (with a stack
// frame) wherever an argument is not a constant; these inline and fold to constants in the kernel.

// Number of planes of a `bits`-bit code (its population count).
WQ_HD constexpr int n_planes(int bits) {
  int n = 0;
  for (int p = 8; p > 0; p >>= 1) n += (bits & p) ? 1 : 0;
  return n;
}

// Width of plane j: the j-th highest set bit of `bits` (the widest plane is j = 0).
WQ_HD constexpr int plane_width(int bits, int j) {
  for (int p = 8; p > 0; p >>= 1) {
    if (bits & p) {
      if (j == 0) return p;
      --j;
    }
  }
  return 0;
}

// Bit position in the code of plane j's lowest bit: the sum of the wider planes' widths.
WQ_HD constexpr int plane_shift(int bits, int j) {
  int s = 0;
  for (int i = 0; i < j; ++i) s += plane_width(bits, i);
  return s;
}

// Codes per chunk: the codes held by one word of the widest plane.
WQ_HD constexpr int chunk_codes(int bits) { return 32 / plane_width(bits, 0); }

// 32-bit words per row of qweight: ceil(K/32) * bits (format.packed_words).
WQ_HD constexpr int row_words(int K, int bits) { return (K + 31) / 32 * bits; }

// ---- generic access: code k of a row (any width 1..8, runtime) --------------------------------------

// Code k of one row: gather its bits plane by plane. Slow but obviously right: the reference the
// chunk decoders below are tested against (and the host driver's `codes` output).
WQ_HD uint32_t code_at(const uint32_t* row, int K, int bits, int k) {
  const int KB = (K + 31) / 32;
  uint32_t code = 0;
  for (int j = 0; j < n_planes(bits); ++j) {
    const int p = plane_width(bits, j), per_word = 32 / p;
    const uint32_t word = row[KB * plane_shift(bits, j) + k / per_word];
    code |= ((word >> (p * (k % per_word))) & ((1u << p) - 1u)) << plane_shift(bits, j);
  }
  return code;
}

// W_hat = scale * (code - zero): the exact fp32 expression of grid.dequantize (code - zero is exact).
WQ_HD float dequant(uint32_t code, float scale, float zero) { return scale * (static_cast<float>(code) - zero); }

// The zero point of a symmetric grid (not stored): 2^(bits-1).
WQ_HD constexpr float symmetric_zero(int bits) { return static_cast<float>(1 << (bits - 1)); }

// ---- chunk access (compile-time width, what the kernel uses) ----------------------------------------

// Shift a value left by (to - from) bits, or right when negative; folds to one shift for constant args.
WQ_HD uint32_t move_bits(uint32_t v, int from, int to) { return to >= from ? v << (to - from) : v >> (from - to); }

// One packed word. On the GPU a streaming load (ld.global.cs): every weight word is read exactly once,
// so it should not evict x and the scales, which every warp re-reads, from L1.
WQ_HD uint32_t load_word(const uint32_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldcs(p);
#else
  return *p;
#endif
}

// The NP words of chunk q (one per plane), each shifted so the chunk's bits start at bit 0.
// `row` is the row's first word, KB = ceil(K/32). Reads exactly NP words, all inside the row.
template <int BITS>
WQ_HD void load_chunk(const uint32_t* row, int KB, int q, uint32_t (&sub)[n_planes(BITS)]) {
  constexpr int P0 = plane_width(BITS, 0), C = chunk_codes(BITS);
WQ_UNROLL
  for (int j = 0; j < n_planes(BITS); ++j) {
    const int p = plane_width(BITS, j);
    const int word = KB * plane_shift(BITS, j) + q * p / P0;
    const int off = C * ((q * p) % P0);
    sub[j] = load_word(row + word) >> off;  // j = 0: off = 0, the chunk is the whole word
  }
}

// Code i (0 <= i < C, a compile-time constant after unrolling) of a loaded chunk.
template <int BITS>
WQ_HD uint32_t chunk_code(const uint32_t (&sub)[n_planes(BITS)], int i) {
  uint32_t code = 0;
WQ_UNROLL
  for (int j = 0; j < n_planes(BITS); ++j) {
    const int p = plane_width(BITS, j);
    code |= ((sub[j] >> (i * p)) & ((1u << p) - 1u)) << plane_shift(BITS, j);
  }
  return code;
}

// 1 + code_i / 2^BITS as an fp32, built by writing the code into the top BITS bits of the mantissa of
// 1.0f (0x3F800000): one shift and one mask-and-or (LOP3) per plane, no int->float conversion (I2F runs
// at a quarter of the FMA rate). Exact: the value has at most 8 significant bits after the leading 1.
template <int BITS>
WQ_HD float chunk_code_f1p(const uint32_t (&sub)[n_planes(BITS)], int i) {
  uint32_t bits = 0x3F800000u;
WQ_UNROLL
  for (int j = 0; j < n_planes(BITS); ++j) {
    const int p = plane_width(BITS, j), to = 23 - BITS + plane_shift(BITS, j);
    bits |= move_bits(sub[j], i * p, to) & (((1u << p) - 1u) << to);
  }
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  union { uint32_t u; float f; } v{bits};  // g++ defines type punning through a union
  return v.f;
#endif
}

struct ScaleZeroPair {
  float scale, zero;
};

// The group of column k, k / size, as a shift whenever possible: the group sizes in use are powers of
// two (32..256) or the whole row (size >= K: every k < K is in group 0, and k >> 31 == 0). Integer
// division costs about as much as the arithmetic of a whole chunk, so it is left to odd sizes only.
struct Groups {
  int size, shift;  // shift < 0: divide

  WQ_HD Groups(int size_, int K) : size(size_), shift(-1) {
    if (size >= K) {
      shift = 31;
    } else if ((size & (size - 1)) == 0) {
      shift = 0;
      while ((1 << shift) < size) ++shift;
    }
  }
  WQ_HD int of(int k) const { return shift >= 0 ? k >> shift : k / size; }
};

// Dot product of codes [lo, hi) of a chunk, all in one group (scale s, zero z), with xs[lo..hi):
//   sum_i xs_i * s * (c_i - z) = s * (2^B * A - (2^B + z) * X),  A = sum_i xs_i * (1 + c_i / 2^B),  X = sum_i xs_i
// so each code costs one shift, one LOP3 and one FMA. The loop is unrolled over the whole chunk with
// i outside [lo, hi) masked to 0 (never a dynamically indexed xs, which would go to local memory).
// xs must be 0 past K (the padding codes are 0 too).
template <int BITS>
WQ_HD float chunk_dot(const uint32_t (&sub)[n_planes(BITS)], const float* xs, int lo, int hi, float s, float z) {
  constexpr int C = chunk_codes(BITS);
  constexpr float two_b = static_cast<float>(1 << BITS);
  float A = 0.f, X = 0.f;
WQ_UNROLL
  for (int i = 0; i < C; ++i) {
    const float xi = (i >= lo && i < hi) ? xs[i] : 0.f;
    A += xi * chunk_code_f1p<BITS>(sub, i);  // contracted to an FMA
    X += xi;
  }
  return s * (two_b * A - (two_b + z) * X);
}

// The same over the whole chunk, with X = sum of xs[0..C) given: the caller computes it once per
// chunk and shares it between the rows it processes with the same activations.
template <int BITS>
WQ_HD float chunk_dot(const uint32_t (&sub)[n_planes(BITS)], const float* xs, float X, float s, float z) {
  constexpr int C = chunk_codes(BITS);
  constexpr float two_b = static_cast<float>(1 << BITS);
  float A = 0.f;
WQ_UNROLL
  for (int i = 0; i < C; ++i) A += xs[i] * chunk_code_f1p<BITS>(sub, i);
  return s * (two_b * A - (two_b + z) * X);
}

// ---- binary layers (PB-LLM, format.py "Binary layers") ---------------------------------------------
//
// W_hat = mu + alpha * (2 * sign - 1) per group, signs a 1-bit plane (a chunk = one word of 32 signs).
// With A = sum_i xs_i * (1 + sign_i / 2) (chunk_code_f1p<1>: one LOP3 and one FMA per sign) and X = sum xs_i,
// the signs' sum S = sum_i xs_i * sign_i = 2 * (A - X), so
//   sum_i xs_i * W_hat_i = 2 * alpha * S + (mu - alpha) * X = 4 * alpha * (A - X) + (mu - alpha) * X.

struct AlphaMuPair {
  float alpha, mu;
};

// The group dot of codes [lo, hi) of a chunk: quantized (scale, zero) or binary (alpha, mu), by pair type.
template <int BITS>
WQ_HD float group_dot(const uint32_t (&sub)[n_planes(BITS)], const float* xs, int lo, int hi,
                      const ScaleZeroPair& p) {
  return chunk_dot<BITS>(sub, xs, lo, hi, p.scale, p.zero);
}

template <int BITS>
WQ_HD float group_dot(const uint32_t (&sub)[n_planes(BITS)], const float* xs, float X, const ScaleZeroPair& p) {
  return chunk_dot<BITS>(sub, xs, X, p.scale, p.zero);
}

template <int BITS>
WQ_HD float group_dot(const uint32_t (&sub)[n_planes(BITS)], const float* xs, float X, const AlphaMuPair& p) {
  static_assert(BITS == 1, "binary layers hold one sign bit per weight");
  float A = 0.f;
WQ_UNROLL
  for (int i = 0; i < 32; ++i) A += xs[i] * chunk_code_f1p<1>(sub, i);
  return 4.f * p.alpha * (A - X) + (p.mu - p.alpha) * X;
}

template <int BITS>
WQ_HD float group_dot(const uint32_t (&sub)[n_planes(BITS)], const float* xs, int lo, int hi,
                      const AlphaMuPair& p) {
  static_assert(BITS == 1, "binary layers hold one sign bit per weight");
  float A = 0.f, X = 0.f;
WQ_UNROLL
  for (int i = 0; i < 32; ++i) {
    const float xi = (i >= lo && i < hi) ? xs[i] : 0.f;
    A += xi * chunk_code_f1p<1>(sub, i);
    X += xi;
  }
  return 4.f * p.alpha * (A - X) + (p.mu - p.alpha) * X;
}

// The salient correction of one row, as lane `lane` of a warp computes it: the entries j = begin + lane,
// begin + lane + 32, ... < end of the row's CSR range, sum of x(col[j]) * delta[j] (delta = W_salient −
// the binary value at that position; kernels.binary_operands). `x(k)` returns activation k as fp32.
template <typename XAt>
WQ_HD float salient_lane_sum(const int32_t* col, const float* delta, int begin, int end, int lane, const XAt& x) {
  float acc = 0.f;
  for (int j = begin + lane; j < end; j += 32) acc += x(col[j]) * delta[j];
  return acc;
}

// The contribution of chunk q of one row to y (X = sum of the chunk's xs). `sz(group)` returns the
// group's {scale, zero} (or, for a binary layer, its {alpha, mu}) as fp32. A chunk inside one group (always so when C divides group_size, and
// for per-row grids) takes one chunk_dot; a chunk that straddles groups takes one masked chunk_dot
// per group it touches. Codes at k >= K are never looked at (their group may not exist).
// Shared by the kernel and the host driver.
template <int BITS, typename ScaleZero>
WQ_HD float chunk_contribution(const uint32_t (&sub)[n_planes(BITS)], const float* xs, float X, int q, int K,
                               const Groups& groups, const ScaleZero& sz) {
  constexpr int C = chunk_codes(BITS);
  const int k0 = q * C, end = k0 + C < K ? k0 + C : K;
  int g = groups.of(k0);
  if (groups.size % C == 0 || groups.of(end - 1) == g) {
    return group_dot<BITS>(sub, xs, X, sz(g));
  }
  float acc = 0.f;
  for (int lo = k0; lo < end; ++g) {
    const int hi = (g + 1) * groups.size < end ? (g + 1) * groups.size : end;
    acc += group_dot<BITS>(sub, xs, lo - k0, hi - k0, sz(g));
    lo = hi;
  }
  return acc;
}

}  // namespace wq
