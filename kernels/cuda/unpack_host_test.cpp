// Host test driver for unpack.cuh (built with g++ by tests/test_cuda.py; no CUDA needed).
//
// Reads whitespace-separated integers from stdin:
//   bits N K group_size symmetric
//   qweight   N * ceil(K/32) * bits words (uint32, row-major)
//   scale     N * G fp32 bit patterns (uint32), G = ceil(K / group_size)
//   zero      N * G integers (only when symmetric == 0)
//   x         K fp32 bit patterns (uint32)
// and prints five lines, each a tag followed by values:
//   codes  N * K   code_at (the generic, runtime-width accessor)
//   chunk  N * K   load_chunk + chunk_code (the kernel's compile-time decoder)
//   f1p    N * K   (chunk_code_f1p - 1) * 2^bits (the kernel's mantissa decoder)
//   deq    N * K   dequant(code, scale, zero) as fp32 bit patterns
//   y      N       the GEMV y = W_hat x as fp32 bit patterns, computed by the kernel's walk: lane l of a
//                  warp sums chunk_contribution over chunks q = l, l + 32, ... of the row, then the 32
//                  lane sums are reduced by the same xor butterfly as __shfl_xor_sync.
// The word "binary" instead of `bits` selects the binary-layer mode (see run_binary).
// Exit status 2 on malformed input.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "unpack.cuh"

namespace {

float f32(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

struct HostScaleZero {
  const float* scale;  // this row's scales
  const float* zero;   // this row's zeros (already the symmetric 2^(bits-1) when not stored)
  wq::ScaleZeroPair operator()(int g) const { return {scale[g], zero[g]}; }
};

struct HostAlphaMu {
  const float* alpha;  // this row's alphas
  const float* mu;     // this row's mus
  wq::AlphaMuPair operator()(int g) const { return {alpha[g], mu[g]}; }
};

void lane_reduce(float (&lane_acc)[32]) {  // v += __shfl_xor_sync(~0u, v, o) on every lane at once
  for (int o = 16; o > 0; o >>= 1) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = lane_acc[l] + lane_acc[l ^ o];
    std::memcpy(lane_acc, next, sizeof next);
  }
}

bool read_f32(std::vector<float>& v) {
  for (auto& e : v) {
    uint32_t u;
    if (!(std::cin >> u)) return false;
    e = f32(u);
  }
  return true;
}

struct Problem {
  int bits, N, K, group_size, G;
  std::vector<uint32_t> qweight;
  std::vector<float> scale, zero, x;
};

template <int BITS>
void run(const Problem& p) {
  constexpr int NP = wq::n_planes(BITS), C = wq::chunk_codes(BITS);
  const int W = wq::row_words(p.K, BITS), KB = (p.K + 31) / 32, n_chunks = (p.K + C - 1) / C;
  const wq::Groups groups(p.group_size, p.K);

  std::printf("codes");
  for (int n = 0; n < p.N; ++n)
    for (int k = 0; k < p.K; ++k) std::printf(" %u", wq::code_at(&p.qweight[size_t(n) * W], p.K, BITS, k));
  std::printf("\nchunk");
  for (int n = 0; n < p.N; ++n)
    for (int q = 0; q < n_chunks; ++q) {
      uint32_t sub[NP];
      wq::load_chunk<BITS>(&p.qweight[size_t(n) * W], KB, q, sub);
      for (int i = 0; i < C && q * C + i < p.K; ++i) std::printf(" %u", wq::chunk_code<BITS>(sub, i));
    }
  std::printf("\nf1p");
  for (int n = 0; n < p.N; ++n)
    for (int q = 0; q < n_chunks; ++q) {
      uint32_t sub[NP];
      wq::load_chunk<BITS>(&p.qweight[size_t(n) * W], KB, q, sub);
      for (int i = 0; i < C && q * C + i < p.K; ++i)
        std::printf(" %.0f", (wq::chunk_code_f1p<BITS>(sub, i) - 1.f) * float(1 << BITS));
    }
  std::printf("\ndeq");
  for (int n = 0; n < p.N; ++n)
    for (int k = 0; k < p.K; ++k) {
      const int g = k / p.group_size;
      const uint32_t code = wq::code_at(&p.qweight[size_t(n) * W], p.K, BITS, k);
      std::printf(" %u", bits_of(wq::dequant(code, p.scale[size_t(n) * p.G + g], p.zero[size_t(n) * p.G + g])));
    }
  std::printf("\ny");
  for (int n = 0; n < p.N; ++n) {
    const HostScaleZero sz{&p.scale[size_t(n) * p.G], &p.zero[size_t(n) * p.G]};
    float lane_acc[32] = {};
    for (int q = 0; q < n_chunks; ++q) {  // chunk q belongs to lane q % 32, visited in increasing q
      uint32_t sub[NP];
      wq::load_chunk<BITS>(&p.qweight[size_t(n) * W], KB, q, sub);
      float xs[C], X = 0.f;
      for (int i = 0; i < C; ++i) xs[i] = q * C + i < p.K ? p.x[q * C + i] : 0.f;
      for (int i = 0; i < C; ++i) X += xs[i];
      lane_acc[q % 32] += wq::chunk_contribution<BITS>(sub, xs, X, q, p.K, groups, sz);
    }
    lane_reduce(lane_acc);
    std::printf(" %u", bits_of(lane_acc[0]));
  }
  std::printf("\n");
}

// Binary mode (after the word "binary"): N K group_size nnz, then signs N * ceil(K/32) words, alpha and
// mu N * G fp32 bit patterns each, rowptr N + 1 and col nnz integers, delta nnz and x K fp32 bit patterns.
// Prints "y" and N fp32 bit patterns: the binary kernel's walk (lane l sums chunk_contribution<1> with the
// row's (alpha, mu) over chunks l, l + 32, ..., plus salient_lane_sum of its CSR entries; xor butterfly).
int run_binary() {
  int N = 0, K = 0, group_size = 0, nnz = 0;
  if (!(std::cin >> N >> K >> group_size >> nnz) || N < 1 || K < 1 || group_size < 1 || nnz < 0) return 2;
  const int G = (K + group_size - 1) / group_size, KB = (K + 31) / 32, n_chunks = KB;
  std::vector<uint32_t> signs(size_t(N) * KB);
  std::vector<float> alpha(size_t(N) * G), mu(size_t(N) * G), delta(nnz), x(K);
  std::vector<int32_t> rowptr(N + 1), col(nnz);
  for (auto& w : signs)
    if (!(std::cin >> w)) return 2;
  if (!read_f32(alpha) || !read_f32(mu)) return 2;
  for (auto& r : rowptr)
    if (!(std::cin >> r)) return 2;
  for (auto& c : col)
    if (!(std::cin >> c)) return 2;
  if (!read_f32(delta) || !read_f32(x)) return 2;
  const wq::Groups groups(group_size < K ? group_size : K, K);
  const auto x_at = [&x](int k) { return x[k]; };
  std::printf("y");
  for (int n = 0; n < N; ++n) {
    const HostAlphaMu am{&alpha[size_t(n) * G], &mu[size_t(n) * G]};
    float lane_acc[32] = {};
    for (int q = 0; q < n_chunks; ++q) {
      uint32_t sub[1];
      wq::load_chunk<1>(&signs[size_t(n) * KB], KB, q, sub);
      float xs[32], X = 0.f;
      for (int i = 0; i < 32; ++i) xs[i] = q * 32 + i < K ? x[q * 32 + i] : 0.f;
      for (int i = 0; i < 32; ++i) X += xs[i];
      lane_acc[q % 32] += wq::chunk_contribution<1>(sub, xs, X, q, K, groups, am);
    }
    for (int l = 0; l < 32; ++l) lane_acc[l] += wq::salient_lane_sum(col.data(), delta.data(), rowptr[n], rowptr[n + 1], l, x_at);
    lane_reduce(lane_acc);
    std::printf(" %u", bits_of(lane_acc[0]));
  }
  std::printf("\n");
  return 0;
}

}  // namespace

int main() {
  Problem p{};
  int symmetric = 0;
  std::string first;
  if (!(std::cin >> first)) return 2;
  if (first == "binary") return run_binary();
  p.bits = std::atoi(first.c_str());
  if (!(std::cin >> p.N >> p.K >> p.group_size >> symmetric) || p.bits < 1 || p.bits > 8 || p.N < 1 ||
      p.K < 1 || p.group_size < 1) {
    std::fprintf(stderr, "bad header\n");
    return 2;
  }
  p.G = (p.K + p.group_size - 1) / p.group_size;
  const size_t W = wq::row_words(p.K, p.bits), NG = size_t(p.N) * p.G;
  p.qweight.resize(size_t(p.N) * W);
  p.scale.resize(NG);
  p.zero.assign(NG, wq::symmetric_zero(p.bits));
  p.x.resize(p.K);
  for (auto& w : p.qweight)
    if (!(std::cin >> w)) return 2;
  for (auto& s : p.scale) {
    uint32_t u;
    if (!(std::cin >> u)) return 2;
    s = f32(u);
  }
  if (!symmetric)
    for (auto& z : p.zero) {
      unsigned z8;
      if (!(std::cin >> z8)) return 2;
      z = static_cast<float>(z8);
    }
  for (auto& v : p.x) {
    uint32_t u;
    if (!(std::cin >> u)) return 2;
    v = f32(u);
  }
  switch (p.bits) {
    case 1: run<1>(p); break;
    case 2: run<2>(p); break;
    case 3: run<3>(p); break;
    case 4: run<4>(p); break;
    case 5: run<5>(p); break;
    case 6: run<6>(p); break;
    case 7: run<7>(p); break;
    case 8: run<8>(p); break;
  }
  return 0;
}
