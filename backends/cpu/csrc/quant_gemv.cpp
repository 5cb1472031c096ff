// Weight-only int8 / int4 linear layers for few rows (decode): y = x @ W.T with W decoded in
// registers while it streams from memory, so a step reads 1 (int8) or ~0.53 (int4) byte per weight.
//
// Built at first use by textgen.backends.cpu.quant_gemv with -march=native (the machine that runs
// it is the machine that compiled it), registered as torch.ops.textgen_quant.*.
//
// Layouts (packed by textgen.backends.cpu.quant_gemv.pack_int4 at load):
// - int8: codes int8 [N, K] row-major (the layout the tied int8 embedding reads too), scales [N];
//   W[n, k] = codes[n, k] * scales[n].
// - int4: uint8 [N, K / 2]; each row is a run of blocks of B weights (B = 64 when the group size is
//   a multiple of 64, else 32), byte j of a block holding code j in its low nibble and code j + B/2
//   in its high one, so one zero-extending load and one shift give the block's two halves in order.
//   scales_zeros [N, G, 2] (bf16 or fp32); W[n, k] = (codes[n, k] - 8) * s[n, g] + z[n, g].
//
// Per group the kernels compute D = sum_k c_k x_k from the raw codes and add the scale and zero
// once: y = sum_g s_g * D_g + (z_g - c0 * s_g) * sum_{k in g} x_k. The bf16 path (AVX512-BF16)
// turns each code c into the bf16 number 128 + c (bit pattern 0x4300 | c, exact), so one
// _mm512_dpbf16_ps multiplies 32 weights by 32 bf16 activations with exact products and fp32 sums
// (c0 = 136). The fp32 path converts codes to fp32 and uses FMA (c0 = 8). int8 converts codes to
// fp32 and uses FMA for both activation dtypes (bf16 activations are widened once per call).
// Without AVX512 the same arithmetic runs as plain loops.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define TEXTGEN_AVX512 1
#endif

namespace {

constexpr int64_t kMaxChunk = 4;  // activation rows that share one decoded weight row

inline int64_t int4_block(int64_t group_size) { return group_size % 64 == 0 ? 64 : 32; }

template <typename S>
inline float as_float(S v) { return static_cast<float>(v); }

// ---------------------------------------------------------------- int4, plain loops (any CPU)

template <typename S, typename O>
void int4_row_plain(const uint8_t* w, const S* sz, const float* x, int64_t ldx, const float* xsum, int64_t m_rows,
                    int64_t k_size, int64_t group, O* out, int64_t ldo) {
  const int64_t block = int4_block(group), half = block / 2, groups = k_size / group;
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* xm = x + m * ldx;
    float y = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      float d = 0.f;
      for (int64_t b = g * group; b < (g + 1) * group; b += block) {
        const uint8_t* bytes = w + b / 2;
        for (int64_t j = 0; j < half; ++j) {
          d += static_cast<float>(bytes[j] & 0xF) * xm[b + j];
          d += static_cast<float>(bytes[j] >> 4) * xm[b + half + j];
        }
      }
      const float s = as_float(sz[2 * g]), z = as_float(sz[2 * g + 1]);
      y += s * d + (z - 8.f * s) * xsum[m * groups + g];
    }
    out[m * ldo] = static_cast<O>(y);
  }
}

#ifdef TEXTGEN_AVX512
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// fp32 activations: codes to fp32, FMA. MB activation rows share each decoded block.
template <int MB, typename S, typename O>
void int4_row_f32(const uint8_t* w, const S* sz, const float* x, int64_t ldx, const float* xsum, int64_t k_size,
                  int64_t group, O* out, int64_t ldo) {
  const int64_t block = int4_block(group), half = block / 2, groups = k_size / group;
  const __m512i low = _mm512_set1_epi32(0xF);
  float y[MB] = {};
  __m512 total[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = g * group; b < (g + 1) * group; b += block) {
      for (int64_t j = 0; j < half; j += 16) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b / 2 + j)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        for (int m = 0; m < MB; ++m) {
          acc[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + m * ldx + b + j), acc[m]);
          acc[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + m * ldx + b + half + j), acc[m]);
        }
      }
    }
    const float s = as_float(sz[2 * g]), z = as_float(sz[2 * g + 1]);
    const __m512 scale = _mm512_set1_ps(s);
    for (int m = 0; m < MB; ++m) {
      total[m] = _mm512_fmadd_ps(acc[m], scale, total[m]);
      y[m] += (z - 8.f * s) * xsum[m * groups + g];
    }
  }
  for (int m = 0; m < MB; ++m) out[m * ldo] = static_cast<O>(y[m] + hsum(total[m]));
}

#ifdef __AVX512BF16__
// bf16 activations: each code c becomes the bf16 number 128 + c, one dpbf16 per 32 weights.
// BPG: blocks of 64 codes per group when known at compile time (group 64, 128, 256: the block
// loop unrolls and the per-group work is all that remains between blocks), 0 = from `group`;
// block size 32 (group 32, 96, 160, ...) runs the second loop.
template <int MB, int BPG, typename S>
void int4_row_bf16(const uint8_t* w, const S* sz, const c10::BFloat16* x, int64_t ldx, const float* xsum,
                   int64_t k_size, int64_t group, c10::BFloat16* out, int64_t ldo) {
  const int64_t groups = k_size / group;
  const bool block64 = BPG > 0 || int4_block(group) == 64;
  const int64_t blocks = BPG > 0 ? BPG : (block64 ? group / 64 : group / 32);
  const auto* xb = reinterpret_cast<const uint16_t*>(x);
  const __m512i low = _mm512_set1_epi16(0xF), magic = _mm512_set1_epi16(0x4300);
  float y[MB] = {};
  __m512 total[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MB], acc2[MB];
    for (int m = 0; m < MB; ++m) acc[m] = acc2[m] = _mm512_setzero_ps();
    const uint8_t* wg = w + g * group / 2;
    const uint16_t* xg = xb + g * group;
    if (block64) {
#pragma GCC unroll 4
      for (int64_t i = 0; i < blocks; ++i) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * i)));
        const __m512i lo = _mm512_ternarylogic_epi32(v, low, magic, 0xEA);  // (v & 0xF) | 0x4300
        const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(v, 4), magic);
        for (int m = 0; m < MB; ++m) {
          const uint16_t* xm = xg + m * ldx + 64 * i;
          acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)lo, (__m512bh)_mm512_loadu_si512(xm));
          acc2[m] = _mm512_dpbf16_ps(acc2[m], (__m512bh)hi, (__m512bh)_mm512_loadu_si512(xm + 32));
        }
      }
    } else {
      for (int64_t i = 0; i < blocks; ++i) {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16 * i)));
        const __m256i lo = _mm256_ternarylogic_epi32(v, _mm512_castsi512_si256(low), _mm512_castsi512_si256(magic), 0xEA);
        const __m256i hi = _mm256_or_si256(_mm256_srli_epi16(v, 4), _mm512_castsi512_si256(magic));
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        for (int m = 0; m < MB; ++m)
          acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)both, (__m512bh)_mm512_loadu_si512(xg + m * ldx + 32 * i));
      }
    }
    const float s = as_float(sz[2 * g]), z = as_float(sz[2 * g + 1]);
    const __m512 scale = _mm512_set1_ps(s);
    for (int m = 0; m < MB; ++m) {
      total[m] = _mm512_fmadd_ps(_mm512_add_ps(acc[m], acc2[m]), scale, total[m]);
      y[m] += (z - 136.f * s) * xsum[m * groups + g];
    }
  }
  for (int m = 0; m < MB; ++m) out[m * ldo] = static_cast<c10::BFloat16>(y[m] + hsum(total[m]));
}
#endif  // __AVX512BF16__

#ifdef __AVX512BF16__
// int8 codes against bf16 activations: 32 codes -> fp32 -> bf16 (exact, |c| <= 127 has 7 bits),
// then one dpbf16 per activation row, so rows past the first cost a load and a dpbf16 per 32
// weights instead of two FMAs. K tail masked.
template <int MB>
void int8_row_bf16(const int8_t* w, float scale, const c10::BFloat16* x, int64_t ldx, int64_t k_size,
                   c10::BFloat16* out, int64_t ldo) {
  const auto* xb = reinterpret_cast<const uint16_t*>(x);
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_size; k += 32) {
    const int64_t left = std::min<int64_t>(32, k_size - k);
    const __mmask32 mask = left == 32 ? ~__mmask32(0) : static_cast<__mmask32>((1ull << left) - 1ull);
    const __m256i bytes = _mm256_maskz_loadu_epi8(mask, w + k);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
    const __m512bh codes = _mm512_cvtne2ps_pbh(hi, lo);  // lanes 0..15 from lo, 16..31 from hi
    for (int m = 0; m < MB; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], codes, (__m512bh)_mm512_maskz_loadu_epi16(mask, xb + m * ldx + k));
  }
  for (int m = 0; m < MB; ++m) out[m * ldo] = static_cast<c10::BFloat16>(scale * hsum(acc[m]));
}
#endif  // __AVX512BF16__

// int8 codes against fp32 activations: MB rows share each decoded chunk; K tail masked.
template <int MB, typename O>
void int8_row_f32(const int8_t* w, float scale, const float* x, int64_t ldx, int64_t k_size, O* out, int64_t ldo) {
  __m512 acc[MB], acc2[MB];
  for (int m = 0; m < MB; ++m) acc[m] = acc2[m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= k_size; k += 32) {
    const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))));
    const __m512 b =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16))));
    for (int m = 0; m < MB; ++m) {
      acc[m] = _mm512_fmadd_ps(a, _mm512_loadu_ps(x + m * ldx + k), acc[m]);
      acc2[m] = _mm512_fmadd_ps(b, _mm512_loadu_ps(x + m * ldx + k + 16), acc2[m]);
    }
  }
  for (; k < k_size; k += 16) {
    const int64_t left = std::min<int64_t>(16, k_size - k);
    const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
    const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + k)));
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(mask, x + m * ldx + k), acc[m]);
  }
  for (int m = 0; m < MB; ++m) out[m * ldo] = static_cast<O>(scale * hsum(_mm512_add_ps(acc[m], acc2[m])));
}
#endif  // TEXTGEN_AVX512

template <typename O>
void int8_row_plain(const int8_t* w, float scale, const float* x, int64_t ldx, int64_t m_rows, int64_t k_size,
                    O* out, int64_t ldo) {
  for (int64_t m = 0; m < m_rows; ++m) {
    float acc = 0.f;
    for (int64_t k = 0; k < k_size; ++k) acc += static_cast<float>(w[k]) * x[m * ldx + k];
    out[m * ldo] = static_cast<O>(scale * acc);
  }
}

// Dispatch a chunk of up to kMaxChunk activation rows to the kernel templated on its size.
template <typename F>
inline void by_chunk(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// fp32 copy of the activations (the fp32 paths read them; bf16 ones are widened exactly).
at::Tensor as_f32(const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat); }

// Per (row, group) sums of the activations in fp32, [M, G].
template <typename T>
std::vector<float> group_sums(const T* x, int64_t m_rows, int64_t k_size, int64_t group) {
  const int64_t groups = k_size / group;
  std::vector<float> sums(m_rows * groups);
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float acc = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) acc += static_cast<float>(x[m * k_size + k]);
      sums[m * groups + g] = acc;
    }
  return sums;
}

void check_activations(const at::Tensor& x, int64_t k_size) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "activations must be a contiguous [M, K] matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "activations must be float32 or bfloat16, not ", x.scalar_type());
  TORCH_CHECK(x.size(1) == k_size, "activations have ", x.size(1), " columns, the weight ", k_size);
}

// O: the output (and activation) dtype. bf16 activations are read as they are by the AVX512-BF16
// kernel; the other kernels read an fp32 copy.
template <typename S, typename O>
void int4_linear_impl(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t group,
                      at::Tensor& out) {
  const int64_t m_rows = x.size(0), k_size = x.size(1), n_size = packed.size(0), groups = k_size / group;
#if defined(TEXTGEN_AVX512) && defined(__AVX512BF16__)
  constexpr bool kNative = std::is_same_v<O, c10::BFloat16>;
#else
  constexpr bool kNative = false;
#endif
  const at::Tensor x32 = kNative ? x : as_f32(x);
  const std::vector<float> sums = group_sums(x.data_ptr<O>(), m_rows, k_size, group);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const S* s = sz.data_ptr<S>();
  [[maybe_unused]] const float* xf = kNative ? nullptr : x32.data_ptr<float>();
  [[maybe_unused]] const O* xo = x.data_ptr<O>();
  const float* xs = sums.data();
  O* o = out.data_ptr<O>();
  at::parallel_for(0, n_size, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* wn = w + n * (k_size / 2);
      const S* szn = s + n * groups * 2;
      for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxChunk) {
        const int64_t rows = std::min(kMaxChunk, m_rows - m0);
        O* on = o + m0 * n_size + n;
        const float* xsm = xs + m0 * groups;
        if constexpr (kNative) {
#if defined(TEXTGEN_AVX512) && defined(__AVX512BF16__)
          by_chunk(rows, [&](auto mb) {
            constexpr int kMB = decltype(mb)::value;
            switch (group) {
              case 64: int4_row_bf16<kMB, 1>(wn, szn, xo + m0 * k_size, k_size, xsm, k_size, group, on, n_size); break;
              case 128: int4_row_bf16<kMB, 2>(wn, szn, xo + m0 * k_size, k_size, xsm, k_size, group, on, n_size); break;
              case 256: int4_row_bf16<kMB, 4>(wn, szn, xo + m0 * k_size, k_size, xsm, k_size, group, on, n_size); break;
              default: int4_row_bf16<kMB, 0>(wn, szn, xo + m0 * k_size, k_size, xsm, k_size, group, on, n_size);
            }
          });
#endif
        } else {
#ifdef TEXTGEN_AVX512
          by_chunk(rows, [&](auto mb) {
            int4_row_f32<decltype(mb)::value>(wn, szn, xf + m0 * k_size, k_size, xsm, k_size, group, on, n_size);
          });
#else
          int4_row_plain(wn, szn, xf + m0 * k_size, k_size, xsm, rows, k_size, group, on, n_size);
#endif
        }
      }
    }
  });
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros,
                       int64_t group_size) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte,
              "int4 weight must be a contiguous uint8 [N, K/2] matrix");
  const int64_t n_size = packed.size(0), k_size = packed.size(1) * 2;
  check_activations(x, k_size);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && k_size % group_size == 0,
              "int4 group size must be a multiple of 32 dividing K=", k_size, ", got ", group_size);
  TORCH_CHECK(scales_zeros.is_contiguous() && scales_zeros.dim() == 3 && scales_zeros.size(0) == n_size &&
                  scales_zeros.size(1) == k_size / group_size && scales_zeros.size(2) == 2,
              "int4 scales_zeros must be a contiguous [N, G, 2] tensor");
  const bool sz_bf16 = scales_zeros.scalar_type() == at::kBFloat16;
  TORCH_CHECK(sz_bf16 || scales_zeros.scalar_type() == at::kFloat, "int4 scales_zeros must be bfloat16 or float32, not ",
              scales_zeros.scalar_type());
  at::Tensor out = at::empty({x.size(0), n_size}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    if (sz_bf16) int4_linear_impl<c10::BFloat16, c10::BFloat16>(x, packed, scales_zeros, group_size, out);
    else int4_linear_impl<float, c10::BFloat16>(x, packed, scales_zeros, group_size, out);
  } else {
    if (sz_bf16) int4_linear_impl<c10::BFloat16, float>(x, packed, scales_zeros, group_size, out);
    else int4_linear_impl<float, float>(x, packed, scales_zeros, group_size, out);
  }
  return out;
}

template <typename S, typename O>
void int8_linear_impl(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, at::Tensor& out) {
  const int64_t m_rows = x.size(0), k_size = x.size(1), n_size = codes.size(0);
#if defined(TEXTGEN_AVX512) && defined(__AVX512BF16__)
  constexpr bool kNative = std::is_same_v<O, c10::BFloat16>;
#else
  constexpr bool kNative = false;
#endif
  const at::Tensor x32 = kNative ? x : as_f32(x);
  const int8_t* w = codes.data_ptr<int8_t>();
  const S* s = scales.data_ptr<S>();
  [[maybe_unused]] const float* xf = kNative ? nullptr : x32.data_ptr<float>();
  [[maybe_unused]] const O* xo = x.data_ptr<O>();
  O* o = out.data_ptr<O>();
  at::parallel_for(0, n_size, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float scale = as_float(s[n]);
      for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxChunk) {
        const int64_t rows = std::min(kMaxChunk, m_rows - m0);
        if constexpr (kNative) {
#if defined(TEXTGEN_AVX512) && defined(__AVX512BF16__)
          by_chunk(rows, [&](auto mb) {
            int8_row_bf16<decltype(mb)::value>(w + n * k_size, scale, xo + m0 * k_size, k_size, k_size,
                                               o + m0 * n_size + n, n_size);
          });
#endif
        } else {
#ifdef TEXTGEN_AVX512
          by_chunk(rows, [&](auto mb) {
            int8_row_f32<decltype(mb)::value>(w + n * k_size, scale, xf + m0 * k_size, k_size, k_size,
                                              o + m0 * n_size + n, n_size);
          });
#else
          int8_row_plain(w + n * k_size, scale, xf + m0 * k_size, k_size, rows, k_size, o + m0 * n_size + n, n_size);
#endif
        }
      }
    }
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.scalar_type() == at::kChar,
              "int8 weight must be a contiguous int8 [N, K] matrix");
  check_activations(x, codes.size(1));
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 1 && scales.size(0) == codes.size(0),
              "int8 scales must be a contiguous [N] vector");
  const bool s_bf16 = scales.scalar_type() == at::kBFloat16;
  TORCH_CHECK(s_bf16 || scales.scalar_type() == at::kFloat, "int8 scales must be bfloat16 or float32, not ",
              scales.scalar_type());
  at::Tensor out = at::empty({x.size(0), codes.size(0)}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    if (s_bf16) int8_linear_impl<c10::BFloat16, c10::BFloat16>(x, codes, scales, out);
    else int8_linear_impl<float, c10::BFloat16>(x, codes, scales, out);
  } else {
    if (s_bf16) int8_linear_impl<c10::BFloat16, float>(x, codes, scales, out);
    else int8_linear_impl<float, float>(x, codes, scales, out);
  }
  return out;
}

#ifdef TEXTGEN_AVX512
inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
// fp32 -> bf16 rounding to nearest even (NaN-free inputs), as c10::BFloat16's constructor does.
inline void store16(c10::BFloat16* dst, __m512 v) {
#ifdef __AVX512BF16__
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
#endif
}
#endif

// The dense weight (codes - 8) * s + z into `out` [N, K] (bf16 or fp32), for the large-M path.
template <typename S, typename T>
void int4_dequantize_impl(const at::Tensor& packed, const at::Tensor& sz, int64_t group, at::Tensor& out) {
  const int64_t n_size = packed.size(0), k_size = packed.size(1) * 2, groups = k_size / group;
  const int64_t block = int4_block(group), half = block / 2;
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const S* s = sz.data_ptr<S>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, n_size, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = as_float(s[(n * groups + g) * 2]), zero = as_float(s[(n * groups + g) * 2 + 1]);
        const float base = zero - 8.f * scale;
        for (int64_t b = g * group; b < (g + 1) * group; b += block) {
          const uint8_t* bytes = w + n * (k_size / 2) + b / 2;
          T* dst = o + n * k_size + b;
#ifdef TEXTGEN_AVX512
          const __m512 vs = _mm512_set1_ps(scale), vb = _mm512_set1_ps(base);
          const __m512i low = _mm512_set1_epi32(0xF);
          for (int64_t j = 0; j < half; j += 16) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j)));
            store16(dst + j, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), vs, vb));
            store16(dst + half + j, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), vs, vb));
          }
          continue;
#endif
          for (int64_t j = 0; j < half; ++j) {
            dst[j] = static_cast<T>(static_cast<float>(bytes[j] & 0xF) * scale + base);
            dst[half + j] = static_cast<T>(static_cast<float>(bytes[j] >> 4) * scale + base);
          }
        }
      }
    }
  });
}

void int4_dequantize(const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group_size, at::Tensor out) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte,
              "int4 weight must be a contiguous uint8 [N, K/2] matrix");
  const int64_t n_size = packed.size(0), k_size = packed.size(1) * 2;
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && k_size % group_size == 0,
              "int4 group size must be a multiple of 32 dividing K=", k_size, ", got ", group_size);
  TORCH_CHECK(scales_zeros.is_contiguous() && scales_zeros.dim() == 3 && scales_zeros.size(0) == n_size &&
                  scales_zeros.size(1) == k_size / group_size && scales_zeros.size(2) == 2,
              "int4 scales_zeros must be a contiguous [N, G, 2] tensor");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == n_size && out.size(1) == k_size,
              "int4_dequantize writes a contiguous [N, K] tensor");
  const bool sz_bf16 = scales_zeros.scalar_type() == at::kBFloat16;
  TORCH_CHECK(sz_bf16 || scales_zeros.scalar_type() == at::kFloat, "int4 scales_zeros must be bfloat16 or float32");
  if (out.scalar_type() == at::kBFloat16) {
    if (sz_bf16) int4_dequantize_impl<c10::BFloat16, c10::BFloat16>(packed, scales_zeros, group_size, out);
    else int4_dequantize_impl<float, c10::BFloat16>(packed, scales_zeros, group_size, out);
  } else if (out.scalar_type() == at::kFloat) {
    if (sz_bf16) int4_dequantize_impl<c10::BFloat16, float>(packed, scales_zeros, group_size, out);
    else int4_dequantize_impl<float, float>(packed, scales_zeros, group_size, out);
  } else {
    TORCH_CHECK(false, "int4_dequantize writes bfloat16 or float32, not ", out.scalar_type());
  }
}

// Which instruction paths this build compiled (for describe() and the benchmarks).
std::string isa() {
#if defined(TEXTGEN_AVX512) && defined(__AVX512BF16__)
  return "avx512-bf16";
#elif defined(TEXTGEN_AVX512)
  return "avx512";
#else
  return "portable";
#endif
}

// The dense weight codes * s into `out` [N, K] (bf16 or fp32), for the large-M path.
template <typename S, typename T>
void int8_dequantize_impl(const at::Tensor& codes, const at::Tensor& scales, at::Tensor& out) {
  const int64_t n_size = codes.size(0), k_size = codes.size(1);
  const int8_t* w = codes.data_ptr<int8_t>();
  const S* s = scales.data_ptr<S>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, n_size, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float scale = as_float(s[n]);
      const int8_t* row = w + n * k_size;
      T* dst = o + n * k_size;
      int64_t k = 0;
#ifdef TEXTGEN_AVX512
      const __m512 vs = _mm512_set1_ps(scale);
      for (; k + 16 <= k_size; k += 16)
        store16(dst + k, _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)))), vs));
#endif
      for (; k < k_size; ++k) dst[k] = static_cast<T>(static_cast<float>(row[k]) * scale);
    }
  });
}

void int8_dequantize(const at::Tensor& codes, const at::Tensor& scales, at::Tensor out) {
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.scalar_type() == at::kChar,
              "int8 weight must be a contiguous int8 [N, K] matrix");
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 1 && scales.size(0) == codes.size(0),
              "int8 scales must be a contiguous [N] vector");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == codes.sizes(), "int8_dequantize writes a contiguous [N, K] tensor");
  const bool s_bf16 = scales.scalar_type() == at::kBFloat16;
  TORCH_CHECK(s_bf16 || scales.scalar_type() == at::kFloat, "int8 scales must be bfloat16 or float32");
  if (out.scalar_type() == at::kBFloat16) {
    if (s_bf16) int8_dequantize_impl<c10::BFloat16, c10::BFloat16>(codes, scales, out);
    else int8_dequantize_impl<float, c10::BFloat16>(codes, scales, out);
  } else if (out.scalar_type() == at::kFloat) {
    if (s_bf16) int8_dequantize_impl<c10::BFloat16, float>(codes, scales, out);
    else int8_dequantize_impl<float, float>(codes, scales, out);
  } else {
    TORCH_CHECK(false, "int8_dequantize writes bfloat16 or float32, not ", out.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(textgen_quant, m) {
  m.def("int8_dequantize(Tensor codes, Tensor scales, Tensor(a!) out) -> ()");
  m.def("isa() -> str", &isa);
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales_zeros, int group_size) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def("int4_dequantize(Tensor packed, Tensor scales_zeros, int group_size, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(textgen_quant, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_dequantize", &int4_dequantize);
  m.impl("int8_dequantize", &int8_dequantize);
}

