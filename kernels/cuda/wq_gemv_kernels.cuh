// Batch-1 GEMV for packed group-wise layers of width 2, 3 or 4 bits: y[n] = sum_k x[k] * W_hat[n, k],
// W_hat[n, k] = scale[n, k / g] * (code[n, k] - zero[n, k / g]) (compress/format.py, grid.py), and for
// binary layers (PB-LLM): W_hat = mu + alpha * (2 * sign - 1) per group, plus the salient weights as a
// CSR correction that each row's warp adds after its sign sum (unpack.cuh, "binary layers").
//
// No torch header: wq_gemv.cu (the torch extension) includes this file, and build.nvcc_check compiles
// it alone (`nvcc -x cu`) for sm_80 / sm_90, so the compile check covers every kernel the extension
// launches without needing a CUDA build of torch. `wq::gemv_launch` and `wq::binary_gemv_launch` are the
// entry points.
//
// Launch configuration. Blocks of kWarps = 4 warps (128 threads); each warp owns kRows = 2 consecutive
// output rows, so a block computes 8 rows and the grid is ceil(N / 8) blocks. Within a warp, lane l
// takes the chunks q = l, l + 32, l + 64, ... of its rows (a chunk = the codes of one word of the
// widest plane: 8 codes at 4 bits, 16 at 2 and 3 bits; see unpack.cuh for the layout walk), so
// every load of the widest plane is 32 consecutive words of a row: one fully used 128-byte
// transaction. kUnroll = 4 chunks per lane are loaded before any is decoded, so each lane has
// kUnroll * kRows * planes words in flight. The chunk's activations are loaded once (16-byte vector
// loads through the read-only cache, converted to fp32) and reused for both rows. Each row
// accumulates in fp32 per lane; a butterfly of __shfl_xor_sync sums the 32 lanes and lane 0 stores
// y[n] in x's dtype. No shared memory, no atomics, no block-level synchronisation.
//
// Binary layers run the same walk with BITS = 1 (a chunk = 32 signs, one word), one row per warp and 2
// chunks in flight per lane: 32 activations per chunk in registers would otherwise push the kernel past
// 96 registers. After its sign sum, each row's warp adds the salient CSR correction, lane l taking the
// entries l, l + 32, ... of the row (x gathered at their columns through the read-only cache).
//
// Supported: x fp16 / bf16 / fp32 (contiguous, 16-byte aligned: the extension copies otherwise),
// scale fp16 / bf16 / fp32 (a runtime switch, uniform across the warp), zero uint8 or none
// (symmetric: 2^(bits-1)), any group size >= 1 (a chunk that straddles two groups takes the per-code
// path of unpack.cuh), any K >= 1 (the tail chunk's activations are loaded with bounds checks).
// Row strides of qweight / scale / zero are parameters, so column slices of a mixed-width layer
// (kernels.parts) need no copy.
#ifndef COMPRESS_WQ_GEMV_KERNELS_CUH
#define COMPRESS_WQ_GEMV_KERNELS_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "unpack.cuh"

namespace wq {

constexpr int kWarps = 4;   // warps per block
constexpr int kRows = 2;    // output rows per warp (they share the activation loads); 1 for binary layers

__host__ __device__ constexpr int rows_per_warp(bool binary) { return binary ? 1 : kRows; }
constexpr int kUnroll = 4;  // chunks per lane loaded ahead of use

enum Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// ---- dtype conversion ------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// xs[0..C) = x[k0 .. k0 + C) as fp32, 0 past K. Full chunks use 16-byte loads: k0 * sizeof(T) is a
// multiple of 16 because C * sizeof(T) is (C = 8 or 16 halves, 16 floats), and x is 16-byte aligned.
template <typename T, int C>
__device__ __forceinline__ void load_x(const T* __restrict__ x, int k0, int K, float (&xs)[C]) {
  static_assert(C * sizeof(T) % 16 == 0, "a chunk of activations is a whole number of 16-byte vectors");
  if (k0 + C <= K) {
    constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < C / kPerVec; ++v) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x + k0) + v);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerVec; ++i) xs[v * kPerVec + i] = to_float(e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < C; ++i) xs[i] = k0 + i < K ? to_float(__ldg(x + k0 + i)) : 0.f;
  }
}

// Element g of a row of scales (or mu) as fp32; the dtype is a runtime (warp-uniform) switch.
__device__ __forceinline__ float load_scale(const void* row, int dtype, int g) {
  if (dtype == kF16) return __half2float(__ldg(static_cast<const __half*>(row) + g));
  if (dtype == kBF16) return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(row) + g));
  return __ldg(static_cast<const float*>(row) + g);
}

// (scale, zero) of group g of one row, as fp32.
struct RowScaleZero {
  const void* scale;    // this row's scales
  const uint8_t* zero;  // this row's zero points, or nullptr for the symmetric grid
  int dtype;
  float zsym;           // 2^(bits-1)

  __device__ __forceinline__ ScaleZeroPair operator()(int g) const {
    return {load_scale(scale, dtype, g), zero ? static_cast<float>(__ldg(zero + g)) : zsym};
  }
};

// (alpha, mu) of group g of one row of a binary layer, as fp32 (alpha and mu share the scale dtype).
struct RowAlphaMu {
  const void* alpha;
  const void* mu;
  int dtype;

  __device__ __forceinline__ AlphaMuPair operator()(int g) const {
    return {load_scale(alpha, dtype, g), load_scale(mu, dtype, g)};
  }
};

// BINARY: a binary layer (BITS = 1), `zero` is mu [N, G] in the scale dtype with row stride z_stride, and
// rowptr / col / delta (or nullptr) the salient CSR correction, added by the row's warp after its sign sum.
template <typename T, int BITS, bool BINARY>
__global__ void __launch_bounds__(kWarps * 32)
gemv_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight, int64_t qw_stride,
            const void* __restrict__ scale, int scale_dtype, int64_t s_stride,
            const void* __restrict__ zero, int64_t z_stride, const int32_t* __restrict__ rowptr,
            const int32_t* __restrict__ col, const float* __restrict__ delta, T* __restrict__ y, int N, int K,
            int group_size) {
  constexpr int NP = n_planes(BITS), C = chunk_codes(BITS);
  // 1-bit chunks hold 32 codes (32 activations in registers per chunk): fewer chunks in flight
  constexpr int U = BITS == 1 ? 2 : kUnroll;
  constexpr int R = rows_per_warp(BINARY);
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kWarps + threadIdx.x / 32) * R;
  if (row0 >= N) return;  // uniform over the warp: the shuffles below see all 32 lanes
  const int KB = (K + 31) / 32, n_chunks = (K + C - 1) / C;
  const Groups groups(group_size, K);
  const int scale_bytes = scale_dtype == kF32 ? 4 : 2;

  const uint32_t* rows[R];
  using RowParams = typename std::conditional<BINARY, RowAlphaMu, RowScaleZero>::type;
  RowParams sz[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = row0 + r < N ? row0 + r : N - 1;  // a missing last row re-reads row N-1, never stored
    rows[r] = qweight + n * qw_stride;
    const void* srow = static_cast<const char*>(scale) + n * s_stride * scale_bytes;
    if constexpr (BINARY) {
      sz[r] = {srow, static_cast<const char*>(zero) + n * z_stride * scale_bytes, scale_dtype};
    } else {
      sz[r] = {srow, zero ? static_cast<const uint8_t*>(zero) + n * z_stride : nullptr, scale_dtype,
               symmetric_zero(BITS)};
    }
  }

  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;

  for (int q0 = lane; q0 < n_chunks; q0 += 32 * U) {
    // 1. issue the weight loads of U chunks x R rows (NP words each)
    uint32_t sub[U][R][NP];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int q = q0 + 32 * u;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (q < n_chunks) {
          load_chunk<BITS>(rows[r], KB, q, sub[u][r]);
        } else {
#pragma unroll
          for (int j = 0; j < NP; ++j) sub[u][r][j] = 0u;
        }
      }
    }
    // 2. decode and accumulate; the chunk's activations are shared by the R rows
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int q = q0 + 32 * u;
      if (q < n_chunks) {
        float xs[C];
        load_x<T, C>(x, q * C, K, xs);
        float X = 0.f;
#pragma unroll
        for (int i = 0; i < C; ++i) X += xs[i];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += chunk_contribution<BITS>(sub[u][r], xs, X, q, K, groups, sz[r]);
      }
    }
  }

  if constexpr (BINARY) {
    if (rowptr != nullptr) {
      const auto x_at = [x](int k) { return to_float(__ldg(x + k)); };
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (row0 + r < N) acc[r] += salient_lane_sum(col, delta, __ldg(rowptr + row0 + r), __ldg(rowptr + row0 + r + 1),
                                                     lane, x_at);
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    float v = acc[r];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0 && row0 + r < N) y[row0 + r] = from_float<T>(v);
  }
}

template <typename T>
cudaError_t launch_typed(const void* x, const int32_t* qweight, int64_t qw_stride, const void* scale, int scale_dtype,
                         int64_t s_stride, const void* zero, int64_t z_stride, const int32_t* rowptr,
                         const int32_t* col, const float* delta, void* y, int N, int K, int group_size, int bits,
                         bool binary, cudaStream_t stream) {
  const int rows_per_block = kWarps * rows_per_warp(binary);
  const dim3 block(kWarps * 32), grid((N + rows_per_block - 1) / rows_per_block);
  const T* xt = static_cast<const T*>(x);
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(qweight);
  T* yt = static_cast<T*>(y);
#define WQ_LAUNCH(B, BIN) \
  gemv_kernel<T, B, BIN><<<grid, block, 0, stream>>>(xt, qw, qw_stride, scale, scale_dtype, s_stride, zero, z_stride, \
                                                     rowptr, col, delta, yt, N, K, group_size)
  if (binary) {
    if (bits != 1) return cudaErrorInvalidValue;
    WQ_LAUNCH(1, true);
  } else {
    switch (bits) {
      case 2: WQ_LAUNCH(2, false); break;
      case 3: WQ_LAUNCH(3, false); break;
      case 4: WQ_LAUNCH(4, false); break;
      default: return cudaErrorInvalidValue;
    }
  }
#undef WQ_LAUNCH
  return cudaGetLastError();
}

inline cudaError_t launch_any(const void* x, int x_dtype, const int32_t* qweight, int64_t qw_stride, const void* scale,
                              int scale_dtype, int64_t s_stride, const void* zero, int64_t z_stride,
                              const int32_t* rowptr, const int32_t* col, const float* delta, void* y, int N, int K,
                              int group_size, int bits, bool binary, cudaStream_t stream) {
  if (N <= 0 || K <= 0 || group_size <= 0 || scale_dtype < kF32 || scale_dtype > kBF16) return cudaErrorInvalidValue;
  switch (x_dtype) {
    case kF32: return launch_typed<float>(x, qweight, qw_stride, scale, scale_dtype, s_stride, zero, z_stride, rowptr, col, delta, y, N, K, group_size, bits, binary, stream);
    case kF16: return launch_typed<__half>(x, qweight, qw_stride, scale, scale_dtype, s_stride, zero, z_stride, rowptr, col, delta, y, N, K, group_size, bits, binary, stream);
    case kBF16: return launch_typed<__nv_bfloat16>(x, qweight, qw_stride, scale, scale_dtype, s_stride, zero, z_stride, rowptr, col, delta, y, N, K, group_size, bits, binary, stream);
    default: return cudaErrorInvalidValue;
  }
}

// y [N] = W_hat x for one activation row x [K]. x and y share `x_dtype`; qweight is int32 with
// row stride qw_stride words (unit column stride); scale [N, G] with row stride s_stride elements;
// zero uint8 [N, G] with row stride z_stride, or nullptr (symmetric). x must be 16-byte aligned.
// Returns cudaErrorInvalidValue for an unsupported width or dtype, else the launch status.
inline cudaError_t gemv_launch(const void* x, int x_dtype, const int32_t* qweight, int64_t qw_stride,
                               const void* scale, int scale_dtype, int64_t s_stride, const uint8_t* zero,
                               int64_t z_stride, void* y, int N, int K, int group_size, int bits,
                               cudaStream_t stream) {
  return launch_any(x, x_dtype, qweight, qw_stride, scale, scale_dtype, s_stride, zero, z_stride, nullptr, nullptr,
                    nullptr, y, N, K, group_size, bits, false, stream);
}

// The same for a binary layer: signs int32 [N, ceil(K/32)] (row stride s_words), alpha and mu [N, G] in
// `scale_dtype` (row stride a_stride elements, both), and the salient correction as CSR rowptr int32 [N + 1],
// col int32 [nnz], delta fp32 [nnz] (all three nullptr when there is none).
inline cudaError_t binary_gemv_launch(const void* x, int x_dtype, const int32_t* signs, int64_t s_words,
                                      const void* alpha, const void* mu, int scale_dtype, int64_t a_stride,
                                      const int32_t* rowptr, const int32_t* col, const float* delta, void* y, int N,
                                      int K, int group_size, cudaStream_t stream) {
  return launch_any(x, x_dtype, signs, s_words, alpha, scale_dtype, a_stride, mu, a_stride, rowptr, col, delta, y, N,
                    K, group_size, 1, true, stream);
}

#ifdef WQ_GEMV_COMPILE_CHECK
// build.nvcc_check compiles this header on its own: instantiate every kernel gemv_launch can launch.
#define WQ_INSTANTIATE(T)                                                                                   \
  template cudaError_t launch_typed<T>(const void*, const int32_t*, int64_t, const void*, int, int64_t,   \
                                       const void*, int64_t, const int32_t*, const int32_t*, const float*,  \
                                       void*, int, int, int, int, bool, cudaStream_t);
WQ_INSTANTIATE(float)
WQ_INSTANTIATE(__half)
WQ_INSTANTIATE(__nv_bfloat16)
#undef WQ_INSTANTIATE
#endif

}  // namespace wq

#endif  // COMPRESS_WQ_GEMV_KERNELS_CUH
