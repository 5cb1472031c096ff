// Paged attention for the host CPU: each query token attends straight to its request's blocks in
// the KV cache, reading every key and value row once per KV head (the query heads that share it
// are computed together) instead of gathering the context into a padded copy first.
//
// Built at first use by textgen.backends.cpu.fused_attention with -march=native (the machine that
// runs it is the machine that compiled it), registered as torch.ops.textgen_cpu.paged_attention.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

template <typename T>
inline void to_float(const T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// exp for x <= 0 (scores minus their maximum) in plain arithmetic, so the softmax loop vectorizes
// (std::exp does not without -ffast-math): Cephes' expf polynomial after 2^n range reduction,
// relative error ~1e-7; below -87 the result flushes to 0 as expf's would underflow.
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.f ? -87.f : x;
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.f ? 0.f : y * scale;
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

struct Args {
  int64_t num_heads, num_kv_heads, head_size, block_size, num_blocks, max_blocks;
  int64_t window;      // 0: no sliding window
  float scale, soft_cap;  // soft_cap 0: none
  const float* slopes;    // nullptr: no ALiBi
};

// Asks for every row of one block (one KV head's slice of each) ahead of its use: the rows are
// `row_stride` apart and the blocks scattered, which the hardware prefetchers do not follow, and
// a 64-request decode step reads more KV than the caches hold.
template <typename T>
inline void prefetch_block(const T* rows, int64_t count, int64_t row_stride, int64_t row_bytes) {
#if defined(__AVX512F__)
  const char* p = reinterpret_cast<const char*>(rows);
  for (int64_t r = 0; r < count; ++r)
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(p + r * row_stride * sizeof(T) + b, _MM_HINT_T0);
#endif
}

constexpr int64_t kPrefetchBlocks = 2;  // how many blocks ahead of the one in use are requested

// Calls f(position, row_pointer) for context positions [start, end) of one KV head, block by
// block (no division per position), prefetching the next block's rows first.
template <typename T, typename F>
inline void for_rows(const T* __restrict base, const int32_t* __restrict table, int64_t start, int64_t end,
                     int64_t block_size, int64_t block_stride, int64_t row_stride, int64_t row_bytes, F&& f) {
  int64_t pos = start;
  int64_t block = pos / block_size;
  const int64_t last_block = (end - 1) / block_size;
  for (int64_t b = block; b < std::min(block + kPrefetchBlocks, last_block + 1); ++b)
    prefetch_block(base + static_cast<int64_t>(table[b]) * block_stride, block_size, row_stride, row_bytes);
  while (pos < end) {
    const int64_t first = pos - block * block_size;
    const int64_t last = std::min<int64_t>(block_size, first + (end - pos));
    const T* rows = base + static_cast<int64_t>(table[block]) * block_stride;
    if (block + kPrefetchBlocks <= last_block)
      prefetch_block(base + static_cast<int64_t>(table[block + kPrefetchBlocks]) * block_stride, block_size,
                     row_stride, row_bytes);
    for (int64_t off = first; off < last; ++off, ++pos) f(pos, rows + off * row_stride);
    ++block;
  }
}

// Soft-capping, ALiBi and the softmax over one query head's scores (in place).
inline void softmax_scores(const Args& a, float* __restrict sc, int64_t n, int64_t head, int64_t start) {
  if (a.soft_cap > 0.f) {
    for (int64_t s = 0; s < n; ++s) sc[s] = std::tanh(sc[s] / a.soft_cap) * a.soft_cap;
  }
  if (a.slopes != nullptr) {
    const float slope = a.slopes[head];
    for (int64_t s = 0; s < n; ++s) sc[s] += slope * static_cast<float>(start + s);
  }
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t s = 0; s < n; ++s) mx = std::max(mx, sc[s]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t s = 0; s < n; ++s) {
    sc[s] = exp_nonpositive(sc[s] - mx);
    sum += sc[s];
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t s = 0; s < n; ++s) sc[s] *= inv;
}

// Where one work item reads: its kv head's key and value rows through the request's block table.
struct Rows {
  int64_t start, end;  // context positions it attends to
  int64_t row_stride, block_stride;
};

#if defined(__AVX512F__)
// The vector path: keys and values in registers as float32 (D / 16 vectors a row), up to GC query
// heads at once (their D / 16 accumulators stay in registers through the value pass).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {  // round to nearest even, as c10::BFloat16 does
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i out = _mm512_mask_blend_epi32(nan, _mm512_srli_epi32(rounded, 16), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(out));
}
inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

template <typename T, int D, int GC>
void attend_heads_vec(const Args& a, const T* __restrict q, const T* __restrict keys, const T* __restrict values,
                      const int32_t* __restrict table, const Rows& r, int64_t head0, T* __restrict out,
                      float* __restrict scores) {
  constexpr int V = D / 16;
  const int64_t n = r.end - r.start;
  __m512 qv[GC][V];
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int g = 0; g < GC; ++g)
    for (int v = 0; v < V; ++v) qv[g][v] = _mm512_mul_ps(load16(q + g * D + v * 16), scale);
  for_rows(keys, table, r.start, r.end, a.block_size, r.block_stride, r.row_stride, D * sizeof(T), [&](int64_t pos, const T* k) {
    __m512 kv[V];
    for (int v = 0; v < V; ++v) kv[v] = load16(k + v * 16);
    for (int g = 0; g < GC; ++g) {
      __m512 acc = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int v = 1; v < V; ++v) acc = _mm512_fmadd_ps(qv[g][v], kv[v], acc);
      scores[g * n + pos - r.start] = _mm512_reduce_add_ps(acc);
    }
  });
  for (int g = 0; g < GC; ++g) softmax_scores(a, scores + g * n, n, head0 + g, r.start);
  __m512 acc[GC][V];
  for (int g = 0; g < GC; ++g)
    for (int v = 0; v < V; ++v) acc[g][v] = _mm512_setzero_ps();
  for_rows(values, table, r.start, r.end, a.block_size, r.block_stride, r.row_stride, D * sizeof(T), [&](int64_t pos, const T* row) {
    __m512 vv[V];
    for (int v = 0; v < V; ++v) vv[v] = load16(row + v * 16);
    for (int g = 0; g < GC; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * n + pos - r.start]);
      for (int v = 0; v < V; ++v) acc[g][v] = _mm512_fmadd_ps(p, vv[v], acc[g][v]);
    }
  });
  for (int g = 0; g < GC; ++g)
    for (int v = 0; v < V; ++v) store16(out + g * D + v * 16, acc[g][v]);
}

// Query heads per pass: their accumulators (GC x D / 16 vectors) must fit the 32 registers.
template <int D>
constexpr int heads_per_pass() { return D <= 64 ? 4 : D <= 128 ? 2 : 1; }

template <typename T, int D>
void attend_group_vec(const Args& a, const T* q, const T* keys, const T* values, const int32_t* table, const Rows& r,
                      int64_t head0, int64_t G, T* out, float* scores) {
  constexpr int P = heads_per_pass<D>();
  for (int64_t g = 0; g < G;) {
    const int64_t left = G - g;
    const T* qg = q + g * D;
    T* og = out + g * D;
    if (left >= P || P == 1) {
      attend_heads_vec<T, D, P>(a, qg, keys, values, table, r, head0 + g, og, scores);
      g += P;
    } else if (left == 3) {
      attend_heads_vec<T, D, 3>(a, qg, keys, values, table, r, head0 + g, og, scores);
      g += 3;
    } else if (left == 2) {
      attend_heads_vec<T, D, 2>(a, qg, keys, values, table, r, head0 + g, og, scores);
      g += 2;
    } else {
      attend_heads_vec<T, D, 1>(a, qg, keys, values, table, r, head0 + g, og, scores);
      g += 1;
    }
  }
}
#endif

// One (token, kv head) work item: the `group` query heads that share the kv head. HD > 0 fixes the
// head size at compile time (the vector path needs it, a multiple of 16); 0 reads it from the
// arguments and runs the portable loops.
template <typename T, int HD>
void attend_one(const Args& a, const T* __restrict q, const T* __restrict cache, const int32_t* __restrict table,
                int64_t context, int64_t kv_head, T* __restrict out, std::vector<float>& buf) {
  const int64_t D = HD > 0 ? HD : a.head_size, G = a.num_heads / a.num_kv_heads;
  const int64_t start = a.window > 0 ? std::max<int64_t>(0, context - a.window) : 0;
  const int64_t n = context - start;
  const int64_t row_stride = a.num_kv_heads * D;               // between offsets of one block
  const int64_t block_stride = a.block_size * row_stride;       // between blocks
  const T* keys = cache + kv_head * D;
  const T* values = cache + a.num_blocks * block_stride + kv_head * D;
  const int64_t head0 = kv_head * G;
  const Rows rows{start, context, row_stride, block_stride};
#if defined(__AVX512F__)
  if constexpr (HD > 0 && HD % 16 == 0) {
    buf.resize(static_cast<size_t>(heads_per_pass<HD>() * n));
    attend_group_vec<T, HD>(a, q + head0 * D, keys, values, table, rows, head0, G, out + head0 * D, buf.data());
    return;
  }
#endif
  buf.resize(static_cast<size_t>(G * D * 2 + D + G * n));
  float* qf = buf.data();          // [G, D] queries, pre-scaled
  float* acc = qf + G * D;         // [G, D] weighted values
  float* row = acc + G * D;        // [D] one key or value row in float
  float* scores = row + D;         // [G, n]
  for (int64_t g = 0; g < G; ++g) {
    to_float(q + (head0 + g) * D, qf + g * D, D);
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] *= a.scale;
  }
  for_rows(keys, table, start, context, a.block_size, block_stride, row_stride, D * sizeof(T), [&](int64_t pos, const T* k) {
    to_float(k, row, D);
    for (int64_t g = 0; g < G; ++g) scores[g * n + pos - start] = dot(qf + g * D, row, D);
  });
  for (int64_t g = 0; g < G; ++g) softmax_scores(a, scores + g * n, n, head0 + g, start);
  std::fill(acc, acc + G * D, 0.f);
  for_rows(values, table, start, context, a.block_size, block_stride, row_stride, D * sizeof(T), [&](int64_t pos, const T* v) {
    to_float(v, row, D);
    for (int64_t g = 0; g < G; ++g) axpy(scores[g * n + pos - start], row, acc + g * D, D);
  });
  for (int64_t g = 0; g < G; ++g) {
    T* o = out + (head0 + g) * D;
    const float* src = acc + g * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(src[d]);
  }
}

template <typename T, int HD>
void run(const Args& a, const at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
         const at::Tensor& block_tables, const at::Tensor& tokens, const at::Tensor& token_request,
         const at::Tensor& token_context) {
  const T* qp = q.data_ptr<T>();
  const T* cp = cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* tok = tokens.data_ptr<int32_t>();
  const int32_t* req = token_request.data_ptr<int32_t>();
  const int32_t* ctx = token_context.data_ptr<int32_t>();
  const int64_t items = tokens.numel() * a.num_kv_heads;
  const int64_t token_stride = a.num_heads * a.head_size;
  // a grain of one item: items differ in context length, and there are few at batch 1
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = tok[i / a.num_kv_heads], h = i % a.num_kv_heads;
      attend_one<T, HD>(a, qp + t * token_stride, cp, tables + static_cast<int64_t>(req[t]) * a.max_blocks, ctx[t],
                        h, op + t * token_stride, buf);
    }
  });
}

template <typename T>
void run_head_size(const Args& a, const at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
                   const at::Tensor& block_tables, const at::Tensor& tokens, const at::Tensor& token_request,
                   const at::Tensor& token_context) {
  switch (a.head_size) {
    case 64: run<T, 64>(a, out, q, cache, block_tables, tokens, token_request, token_context); break;
    case 128: run<T, 128>(a, out, q, cache, block_tables, tokens, token_request, token_context); break;
    case 256: run<T, 256>(a, out, q, cache, block_tables, tokens, token_request, token_context); break;
    default: run<T, 0>(a, out, q, cache, block_tables, tokens, token_request, token_context);
  }
}

// out/q [T, H, D]; cache [2, num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
// tokens [N] int32: which of the T tokens to compute; token_request [T] int32: each token's row of
// block_tables; token_context [T] int32: how many context positions the token sees (its position
// + 1). Writes out[t] for the listed tokens only.
void paged_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                     const at::Tensor& tokens, const at::Tensor& token_request, const at::Tensor& token_context,
                     double scale, int64_t window, double soft_cap, const c10::optional<at::Tensor>& slopes) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [T, H, D] of the same shape");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2, "cache must be [2, num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && cache.is_contiguous() && block_tables.is_contiguous(),
              "paged_attention needs contiguous tensors");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type() && out.scalar_type() == q.scalar_type(),
              "q, out and cache must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && tokens.scalar_type() == at::kInt &&
                  token_request.scalar_type() == at::kInt && token_context.scalar_type() == at::kInt,
              "index tensors must be int32");
  TORCH_CHECK(cache.size(4) == q.size(2) && q.size(1) % cache.size(3) == 0, "head sizes or counts do not match");
  at::Tensor slope_t;
  if (slopes.has_value()) {
    slope_t = slopes->contiguous();
    TORCH_CHECK(slope_t.scalar_type() == at::kFloat && slope_t.numel() == q.size(1), "slopes must be float32 [H]");
  }
  Args a{q.size(1), cache.size(3), q.size(2), cache.size(2), cache.size(1), block_tables.size(1), window,
         static_cast<float>(scale), static_cast<float>(soft_cap),
         slopes.has_value() ? slope_t.data_ptr<float>() : nullptr};
  switch (q.scalar_type()) {
    case at::kFloat: run_head_size<float>(a, out, q, cache, block_tables, tokens, token_request, token_context); break;
    case at::kBFloat16: run_head_size<c10::BFloat16>(a, out, q, cache, block_tables, tokens, token_request, token_context); break;
    case at::kHalf: run_head_size<c10::Half>(a, out, q, cache, block_tables, tokens, token_request, token_context); break;
    default: TORCH_CHECK(false, "paged_attention supports float32, bfloat16 and float16, not ", q.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(textgen_cpu, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor cache, Tensor block_tables, Tensor tokens, "
        "Tensor token_request, Tensor token_context, float scale, int window, float soft_cap, Tensor? slopes) -> ()");
}

TORCH_LIBRARY_IMPL(textgen_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }
