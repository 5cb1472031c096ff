// Small-M linear layers for the host CPU: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M = a few rows.
//
// At decode batch sizes a linear layer is a stream over its weight: oneDNN's GEMV reached ~10 GB/s
// on this project's 2-core AMD EPYC where the memory gives ~35 GB/s. This kernel walks W's rows in
// order (each thread a contiguous range of rows), reads each 64-byte chunk of a row once and
// multiplies it into every one of the M input rows held in L1: products accumulate in float32
// (AVX512-BF16 `vdpbf16ps` for bfloat16, FMA for float32), each output rounds once, to the
// activation dtype.
//
// Built at first use by textgen.backends.cpu.gemv with -march=native. Without AVX-512 the op
// still exists (portable loops) but `textgen_cpu_gemv::native()` is false and the Python side
// keeps F.linear.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 8;  // M up to which the op is offered; the Python side picks a smaller one

// Rows of W whose partial sums stay in registers at once: 4 x M accumulators (at most 16 of 32 zmm).
template <int M>
constexpr int rows_per_pass() { return M <= 4 ? 4 : 2; }

#if defined(__AVX512F__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

template <int M>
void gemv_f32(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias, float* y, int64_t ldy,
              int64_t n0, int64_t n1) {
  constexpr int R = rows_per_pass<M>();
  const int64_t full = K / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - full)) - 1u);
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const bool last = k >= full;
      __m512 xs[M];
      for (int m = 0; m < M; ++m)
        xs[m] = last ? _mm512_maskz_loadu_ps(tail, x + m * ldx + k) : _mm512_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < R; ++r) {
        const float* row = w + (n + r) * K + k;
        const __m512 wv = last ? _mm512_maskz_loadu_ps(tail, row) : _mm512_loadu_ps(row);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xs[m], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * ldy + n + r] = hsum(acc[r][m]) + (bias ? bias[n + r] : 0.f);
  }
  for (; n < n1; ++n) {  // the last rows of a thread's range, one at a time
    for (int m = 0; m < M; ++m) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = k >= full ? tail : static_cast<__mmask16>(0xFFFF);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, w + n * K + k), _mm512_maskz_loadu_ps(mask, x + m * ldx + k),
                              acc);
      }
      y[m * ldy + n] = hsum(acc) + (bias ? bias[n] : 0.f);
    }
  }
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

inline __m512i load_bf16(const c10::BFloat16* p, __mmask32 mask, bool masked) {
  return masked ? _mm512_maskz_loadu_epi16(mask, p) : _mm512_loadu_si512(p);
}

template <int M>
void gemv_bf16(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* w, int64_t K, const c10::BFloat16* bias,
               c10::BFloat16* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int R = rows_per_pass<M>();
  const int64_t full = K / 32 * 32;
  const __mmask32 tail = K - full == 0 ? 0u : static_cast<__mmask32>((1ull << (K - full)) - 1ull);
  auto finish = [&](float sum, int64_t m, int64_t n) {
    if (bias) sum += static_cast<float>(bias[n]);
    y[m * ldy + n] = c10::BFloat16(sum);  // round to nearest even, as torch rounds
  };
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      const bool last = k >= full;
      __m512i xs[M];
      for (int m = 0; m < M; ++m) xs[m] = load_bf16(x + m * ldx + k, tail, last);
      for (int r = 0; r < R; ++r) {
        const __m512i wv = load_bf16(w + (n + r) * K + k, tail, last);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], as_bh(wv), as_bh(xs[m]));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) finish(hsum(acc[r][m]), m, n + r);
  }
  for (; n < n1; ++n) {
    for (int m = 0; m < M; ++m) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32) {
        const bool last = k >= full;
        acc = _mm512_dpbf16_ps(acc, as_bh(load_bf16(w + n * K + k, tail, last)),
                               as_bh(load_bf16(x + m * ldx + k, tail, last)));
      }
      finish(hsum(acc), m, n);
    }
  }
}
constexpr bool kNativeBf16 = true;
#else
constexpr bool kNativeBf16 = false;
#endif

// Portable loops (no AVX-512): correct everywhere, not meant to be fast.
template <typename T>
void gemv_portable(const T* x, int64_t ldx, const T* w, int64_t K, const T* bias, T* y, int64_t ldy, int64_t M,
                   int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(w[n * K + k]) * static_cast<float>(x[m * ldx + k]);
      if (bias) acc += static_cast<float>(bias[n]);
      y[m * ldy + n] = static_cast<T>(acc);
    }
  }
}

template <typename T, int M>
void run_rows(const T* x, int64_t ldx, const T* w, int64_t K, const T* bias, T* y, int64_t ldy, int64_t n0,
              int64_t n1) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    gemv_f32<M>(x, ldx, w, K, bias, y, ldy, n0, n1);
    return;
  }
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    gemv_bf16<M>(x, ldx, w, K, bias, y, ldy, n0, n1);
    return;
  }
#endif
  gemv_portable<T>(x, ldx, w, K, bias, y, ldy, M, n0, n1);
}

template <typename T>
void run(const T* x, int64_t ldx, const T* w, int64_t K, const T* bias, T* y, int64_t ldy, int64_t M, int64_t n0,
         int64_t n1) {
  switch (M) {
    case 1: run_rows<T, 1>(x, ldx, w, K, bias, y, ldy, n0, n1); break;
    case 2: run_rows<T, 2>(x, ldx, w, K, bias, y, ldy, n0, n1); break;
    case 3: run_rows<T, 3>(x, ldx, w, K, bias, y, ldy, n0, n1); break;
    case 4: run_rows<T, 4>(x, ldx, w, K, bias, y, ldy, n0, n1); break;
    case 5: run_rows<T, 5>(x, ldx, w, K, bias, y, ldy, n0, n1); break;
    case 6: run_rows<T, 6>(x, ldx, w, K, bias, y, ldy, n0, n1); break;
    case 7: run_rows<T, 7>(x, ldx, w, K, bias, y, ldy, n0, n1); break;
    default: run_rows<T, 8>(x, ldx, w, K, bias, y, ldy, n0, n1);
  }
}

// x [M, K] (rows may be strided, the last axis contiguous), weight [N, K] contiguous, bias [N] or
// none; returns y [M, N] in x's dtype.
at::Tensor small_m_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "small_m_linear: x [M, K] and weight [N, K] expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(0) <= kMaxRows, "small_m_linear takes at most ", kMaxRows, " rows, got ", x.size(0));
  TORCH_CHECK(weight.is_contiguous() && x.stride(1) == 1, "small_m_linear: weight contiguous, x rows contiguous");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "small_m_linear: x and weight must share a dtype");
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == weight.size(0) && b.scalar_type() == x.scalar_type(), "small_m_linear: bias [N]");
  }
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  // ranges of whole 16-row tiles per thread, in order, so each thread streams its slice of W
  const int64_t tiles = (N + 15) / 16;
  auto body = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = x.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    const int64_t ldx = x.stride(0);
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1));  // >= ~64 KiB of W per task
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
      run<T>(xp, ldx, wp, K, bp, yp, N, M, t0 * 16, std::min(N, t1 * 16));
    });
  };
  switch (x.scalar_type()) {
    case at::kFloat: body(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: body(static_cast<c10::BFloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "small_m_linear supports float32 and bfloat16, not ", x.scalar_type());
  }
  return y;
}

// Whether this build has the vector paths for `dtype` (else the portable loops, slower than oneDNN).
bool native(c10::ScalarType dtype) {
#if defined(__AVX512F__)
  if (dtype == at::kFloat) return true;
#endif
  return dtype == at::kBFloat16 && kNativeBf16;
}

bool native_for(const at::Tensor& probe) { return native(probe.scalar_type()); }

}  // namespace

TORCH_LIBRARY(textgen_cpu_gemv, m) {
  m.def("small_m_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("native(Tensor probe) -> bool");
}

TORCH_LIBRARY_IMPL(textgen_cpu_gemv, CPU, m) {
  m.impl("small_m_linear", &small_m_linear);
  m.impl("native", &native_for);
}
