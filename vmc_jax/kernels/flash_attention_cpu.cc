// FlashAttention on the CPU, forward and backward, as XLA FFI handlers (vmc_jax/cpu_kernels.py
// builds them; vmc_jax/models/attention_core.py calls them).
//
// XLA:CPU runs attention as separate passes over each block of scores (the scores, their row
// maxima, the exponentials, the value product); here one task takes `rows` queries of one
// (batch, head) through every key in blocks of kCols, with the scores in a cache-sized buffer,
// the row maxima taken while the scores are still in registers, and an online softmax. The
// backward pass recomputes the scores from the saved log-sum-exp, one (batch, head) a task.
//
// Float32, row-major, any leading dims L (batch, heads, ...); Q a multiple of `rows`, K a
// multiple of kTileC (the caller zero-pads; keys from k_len on are padding), D a multiple of 8.
//   forward:  q (L, Q, D), keys transposed kt (L, D, K), v (L, K, D)
//             -> out (L, Q, D), log-sum-exp of each query's scaled scores (L, Q)
//   backward: q, k (L, K, D), kt, values transposed vt (L, D, K), d_out (L, Q, D), the
//             log-sum-exp, rowsum(d_out * out) (L, Q) -> d_q, d_k, d_v
// Attributes: scale (of the scores), k_len, rows (queries a task or block: a multiple of kTileR
// up to kMaxRows; short sequences take fewer to waste no work).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr int64_t kMaxRows = 32; // queries a task at most
constexpr int64_t kCols = 512;   // keys a score block
constexpr int64_t kTileR = 4;    // register tile: rows
constexpr int64_t kTileC = 16;   // register tile: columns (two vectors)

inline v8f load8(const float* p) { v8f v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof v); }
inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

// e^x for x <= 0: x = n ln2 + r with |r| <= ln2 / 2 (n rounded by the 1.5 * 2^23 trick, which
// also leaves n in the low mantissa bits), e^r by Cephes' degree-6 polynomial, 2^n from the
// exponent bits; below -87 the result is flushed to 0.
inline v8f exp8(v8f x) {
  const v8f tiny = splat(-87.0f), magic = splat(12582912.0f);
  v8i underflow = x < tiny;
  x = x < tiny ? tiny : x;
  v8f shifted = x * splat(1.44269504088896341f) + magic;
  v8f nf = shifted - magic;
  v8f r = x - nf * splat(0.693359375f) + nf * splat(2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  v8i bits;
  __builtin_memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4B400000 + 127) << 23;
  v8f two_n;
  __builtin_memcpy(&two_n, &bits, sizeof two_n);
  v8f out = p * two_n;
  return underflow ? splat(0.0f) : out;
}

// s[r][c] = sum_h q[r][h] kt[h][c], for `rows` rows and `cols` (a multiple of kTileC) columns, and
// (unless top8 is null) each row's maximum over its first `valid` columns folded into top8[r]
// (eight lanes a row).
void Scores(const float* q, const float* kt, int64_t rows, int64_t d, int64_t k_stride, int64_t cols,
            int64_t valid, float* s, v8f* top8) {
  for (int64_t c = 0; c < cols; c += kTileC) {
    for (int64_t r = 0; r < rows; r += kTileR) {
      v8f acc[kTileR][2] = {};
      for (int64_t h = 0; h < d; ++h) {
        v8f k0 = load8(kt + h * k_stride + c), k1 = load8(kt + h * k_stride + c + 8);
        for (int64_t i = 0; i < kTileR; ++i) {
          v8f qi = splat(q[(r + i) * d + h]);
          acc[i][0] += qi * k0;
          acc[i][1] += qi * k1;
        }
      }
      for (int64_t i = 0; i < kTileR; ++i) {
        store8(s + (r + i) * kCols + c, acc[i][0]);
        store8(s + (r + i) * kCols + c + 8, acc[i][1]);
      }
      if (top8 == nullptr) continue;
      if (c + kTileC <= valid) {
        for (int64_t i = 0; i < kTileR; ++i) {
          v8f m = acc[i][0] > acc[i][1] ? acc[i][0] : acc[i][1];
          top8[r + i] = m > top8[r + i] ? m : top8[r + i];
        }
      } else {
        for (int64_t i = 0; i < kTileR; ++i)
          for (int64_t x = c; x < valid; ++x) top8[r + i][0] = std::max(top8[r + i][0], s[(r + i) * kCols + x]);
      }
    }
  }
}

// acc[a][:] += sum_b p[a * a_stride + b * b_stride] x[b][:], for `outs` rows of acc (a multiple
// of kTileR) and `inner` rows of x, d a multiple of 8: the value product P V (p's rows are acc's)
// and the transposed products P^T dO, dS^T Q (p's columns are acc's) of the backward pass.
template <int kVectors>
void AccumulateTiled(const float* p, int64_t a_stride, int64_t b_stride, const float* x, int64_t inner,
                     int64_t d, int64_t outs, float* acc) {
  for (int64_t a = 0; a < outs; a += kTileR) {
    for (int64_t y = 0; y < d; y += 8 * kVectors) {
      v8f o[kTileR][kVectors];
      for (int64_t i = 0; i < kTileR; ++i)
        for (int j = 0; j < kVectors; ++j) o[i][j] = load8(acc + (a + i) * d + y + 8 * j);
      for (int64_t b = 0; b < inner; ++b) {
        v8f xb[kVectors];
        for (int j = 0; j < kVectors; ++j) xb[j] = load8(x + b * d + y + 8 * j);
        for (int64_t i = 0; i < kTileR; ++i) {
          v8f pi = splat(p[(a + i) * a_stride + b * b_stride]);
          for (int j = 0; j < kVectors; ++j) o[i][j] += pi * xb[j];
        }
      }
      for (int64_t i = 0; i < kTileR; ++i)
        for (int j = 0; j < kVectors; ++j) store8(acc + (a + i) * d + y + 8 * j, o[i][j]);
    }
  }
}

void Accumulate(const float* p, int64_t a_stride, int64_t b_stride, const float* x, int64_t inner, int64_t d,
                int64_t outs, float* acc) {
  if (d % 16 == 0) {
    AccumulateTiled<2>(p, a_stride, b_stride, x, inner, d, outs, acc);
  } else {
    AccumulateTiled<1>(p, a_stride, b_stride, x, inner, d, outs, acc);
  }
}

// acc[r][:] += sum_c p[r][c] v[c][:] for `rows` rows of a score block and its first `cols` keys.
void AddValues(const float* p, const float* v, int64_t rows, int64_t d, int64_t cols, float* acc) {
  Accumulate(p, kCols, 1, v, cols, d, rows, acc);
}

// acc[c][:] += sum_r p[r][c] x[r][:] for the first `cols` keys of a score block and its `rows` rows.
void AddTransposed(const float* p, const float* x, int64_t rows, int64_t d, int64_t cols, float* acc) {
  Accumulate(p, 1, kCols, x, rows, d, cols, acc);
}

// e^(row[c] - shift) in place for the first `valid` of `cols` entries, 0 for the rest.
void ExpShifted(float* row, float shift, int64_t valid, int64_t cols) {
  int64_t c = 0;
  for (; c + 8 <= valid; c += 8) store8(row + c, exp8(load8(row + c) - splat(shift)));
  for (; c < valid; ++c) row[c] = std::exp(row[c] - shift);
  for (; c < cols; ++c) row[c] = 0.0f;
}

struct Problem {
  const float *q, *kt, *v;
  float *out, *lse;
  int64_t q_len, k_pad, k_len, d, rows;
  float scale;
};

struct BackwardProblem {
  const float *q, *k, *kt, *vt, *d_out, *lse, *d_row;
  float *d_q, *d_k, *d_v;
  int64_t q_len, k_pad, k_len, d, rows;
  float scale;
};

// FlashAttention's backward pass for one (batch x head), all its queries: scores recomputed
// from the log-sum-exp, P = exp(S - lse), dV += P^T dO, dS = P (dO V^T - rowsum(dO O)) scale,
// dQ += dS K, dK += dS^T Q. One task owns its dK and dV, so no two threads write one element.
void RunBackwardTask(const BackwardProblem& pr, int64_t bh) {
  const int64_t rows = pr.rows, d = pr.d;
  thread_local std::vector<float> scratch;
  scratch.resize(kMaxRows * (2 * d + 2 * kCols));
  float *q_scaled = scratch.data(), *d_q = q_scaled + rows * d, *p = d_q + rows * d, *d_s = p + rows * kCols;
  const float *k = pr.k + bh * pr.k_pad * d, *kt = pr.kt + bh * d * pr.k_pad, *vt = pr.vt + bh * d * pr.k_pad;
  float *d_k = pr.d_k + bh * pr.k_pad * d, *d_v = pr.d_v + bh * pr.k_pad * d;
  std::fill(d_k, d_k + pr.k_pad * d, 0.0f);
  std::fill(d_v, d_v + pr.k_pad * d, 0.0f);
  for (int64_t row0 = 0; row0 < pr.q_len; row0 += rows) {
    const int64_t first = bh * pr.q_len + row0;
    const float *q = pr.q + first * d, *d_o = pr.d_out + first * d;
    for (int64_t i = 0; i < rows * d; ++i) q_scaled[i] = q[i] * pr.scale;
    std::fill(d_q, d_q + rows * d, 0.0f);
    for (int64_t c0 = 0; c0 < pr.k_len; c0 += kCols) {
      const int64_t valid = std::min(kCols, pr.k_len - c0);
      const int64_t cols = (valid + kTileC - 1) / kTileC * kTileC;
      Scores(q_scaled, kt + c0, rows, d, pr.k_pad, cols, valid, p, nullptr);
      for (int64_t r = 0; r < rows; ++r) ExpShifted(p + r * kCols, pr.lse[first + r], valid, cols);
      AddTransposed(p, d_o, rows, d, cols, d_v + c0 * d);
      Scores(d_o, vt + c0, rows, d, pr.k_pad, cols, valid, d_s, nullptr);
      for (int64_t r = 0; r < rows; ++r) {
        const v8f row_term = splat(pr.d_row[first + r]), scale = splat(pr.scale);
        for (int64_t c = 0; c < cols; c += 8) {
          const int64_t at = r * kCols + c;
          store8(d_s + at, load8(p + at) * (load8(d_s + at) - row_term) * scale);
        }
      }
      AddValues(d_s, k + c0 * d, rows, d, cols, d_q);
      AddTransposed(d_s, q, rows, d, cols, d_k + c0 * d);
    }
    std::copy(d_q, d_q + rows * d, pr.d_q + first * d);
  }
}

// One (batch x head, query block): the online softmax over key blocks of kCols.
void RunTask(const Problem& pr, int64_t task) {
  const int64_t rows = pr.rows, d = pr.d;
  const int64_t blocks = pr.q_len / rows, bh = task / blocks, row0 = (task % blocks) * rows;
  thread_local std::vector<float> scratch;
  scratch.resize(kMaxRows * (2 * d + kCols + 2));
  float *q = scratch.data(), *acc = q + rows * d, *s = acc + rows * d, *top = s + rows * kCols,
        *total = top + rows;
  const float* q_src = pr.q + (bh * pr.q_len + row0) * d;
  for (int64_t i = 0; i < rows * d; ++i) q[i] = q_src[i] * pr.scale;
  std::fill(acc, acc + rows * d, 0.0f);
  std::fill(top, top + rows, -INFINITY);
  std::fill(total, total + rows, 0.0f);
  const float* kt = pr.kt + bh * d * pr.k_pad;
  const float* v = pr.v + bh * pr.k_pad * d;
  for (int64_t c0 = 0; c0 < pr.k_len; c0 += kCols) {
    const int64_t valid = std::min(kCols, pr.k_len - c0);
    const int64_t cols = (valid + kTileC - 1) / kTileC * kTileC;
    v8f top8[kMaxRows];
    for (int64_t r = 0; r < rows; ++r) top8[r] = splat(top[r]);
    Scores(q, kt + c0, rows, d, pr.k_pad, cols, valid, s, top8);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s + r * kCols;
      float m = top[r];
      for (int i = 0; i < 8; ++i) m = std::max(m, top8[r][i]);
      const float keep = std::exp(top[r] - m);
      v8f sum = splat(0.0f);
      int64_t c = 0;
      for (; c + 8 <= valid; c += 8) {
        v8f e = exp8(load8(row + c) - splat(m));
        store8(row + c, e);
        sum += e;
      }
      float tail = 0.0f;
      for (; c < valid; ++c) tail += row[c] = std::exp(row[c] - m);
      for (; c < cols; ++c) row[c] = 0.0f;
      for (int i = 0; i < 8; ++i) tail += sum[i];
      total[r] = total[r] * keep + tail;
      top[r] = m;
      for (int64_t x = 0; x < d; ++x) acc[r * d + x] *= keep;
    }
    AddValues(s, v + c0 * d, rows, d, cols, acc);
  }
  float* out = pr.out + (bh * pr.q_len + row0) * d;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t x = 0; x < d; ++x) out[r * d + x] = acc[r * d + x] / total[r];
    pr.lse[bh * pr.q_len + row0 + r] = top[r] + std::log(total[r]);
  }
}

// Tasks are claimed from a shared counter by the calling thread and by workers of XLA's
// intra-op pool; the call returns when every claimed task is done (a worker that starts late
// finds none left and touches nothing but this shared state).
struct Shared {
  std::function<void(int64_t)> task;
  int64_t tasks;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable all_done;

  void Work() {
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      task(t);
      if (done.fetch_add(1) + 1 == tasks) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, std::function<void(int64_t)> task) {
  auto shared = std::make_shared<Shared>();
  shared->task = std::move(task);
  shared->tasks = tasks;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->all_done.wait(lock, [&] { return shared->done.load() == shared->tasks; });
}

using Dims = ffi::AnyBuffer::Dimensions;

// Checks q (L, Q, D) and kt (L, D, K) and the attributes against what the kernels need; sets
// the product of the leading dims L and returns an empty string, or says what is wrong.
std::string CheckShapes(Dims q, Dims kt, int64_t rows, int64_t k_len, int64_t* lead) {
  const size_t rank = q.size();
  if (rank < 3 || kt.size() != rank) return "q and k need one rank >= 3";
  *lead = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (kt[i] != q[i]) return "the leading dims of q and k differ";
    *lead *= q[i];
  }
  const int64_t q_len = q[rank - 2], d = q[rank - 1], k_pad = kt[rank - 1];
  if (d % 8 || kt[rank - 2] != d) return "the head size must match and be a multiple of 8";
  if (rows < kTileR || rows > kMaxRows || rows % kTileR || q_len % rows) return "bad rows for this q";
  if (k_pad % kTileC || k_len < 1 || k_len > k_pad) return "bad k_len or key padding";
  return "";
}

// Whether `x` has the leading dims of q and then (n, d).
bool Shaped(Dims x, Dims q, int64_t n, int64_t d) {
  if (x.size() != q.size()) return false;
  for (size_t i = 0; i + 2 < q.size(); ++i)
    if (x[i] != q[i]) return false;
  return x[x.size() - 2] == n && x[x.size() - 1] == d;
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("flash attention: " + what + " (see flash_attention_cpu.cc)");
}

ffi::Error FlashForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kt,
                        ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                        ffi::ResultBuffer<ffi::F32> lse, float scale, int64_t k_len, int64_t rows) {
  int64_t lead;
  std::string error = CheckShapes(q.dimensions(), kt.dimensions(), rows, k_len, &lead);
  const int64_t rank = q.dimensions().size(), q_len = q.dimensions()[rank - 2], d = q.dimensions()[rank - 1];
  const int64_t k_pad = kt.dimensions()[rank - 1];
  if (error.empty() && !Shaped(v.dimensions(), q.dimensions(), k_pad, d)) error = "v is not (L, K, D)";
  if (!error.empty()) return Invalid(error);
  const Problem problem{q.typed_data(), kt.typed_data(), v.typed_data(), out->typed_data(),
                        lse->typed_data(), q_len, k_pad, k_len, d, rows, scale};
  ParallelFor(pool, lead * (q_len / rows), [&problem](int64_t task) { RunTask(problem, task); });
  return ffi::Error::Success();
}

ffi::Error FlashBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> kt, ffi::Buffer<ffi::F32> vt, ffi::Buffer<ffi::F32> d_out,
                         ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_row,
                         ffi::ResultBuffer<ffi::F32> d_q, ffi::ResultBuffer<ffi::F32> d_k,
                         ffi::ResultBuffer<ffi::F32> d_v, float scale, int64_t k_len, int64_t rows) {
  int64_t lead;
  Dims qd = q.dimensions();
  std::string error = CheckShapes(qd, kt.dimensions(), rows, k_len, &lead);
  const int64_t rank = qd.size(), q_len = qd[rank - 2], d = qd[rank - 1], k_pad = kt.dimensions()[rank - 1];
  if (error.empty() && !(Shaped(k.dimensions(), qd, k_pad, d) && Shaped(vt.dimensions(), qd, d, k_pad) &&
                         Shaped(d_out.dimensions(), qd, q_len, d) && static_cast<int64_t>(lse.element_count()) == lead * q_len &&
                         static_cast<int64_t>(d_row.element_count()) == lead * q_len))
    error = "k, v, d_out, lse or d_row do not match q";
  if (!error.empty()) return Invalid(error);
  const BackwardProblem problem{q.typed_data(), k.typed_data(), kt.typed_data(), vt.typed_data(),
                                d_out.typed_data(), lse.typed_data(), d_row.typed_data(), d_q->typed_data(),
                                d_k->typed_data(), d_v->typed_data(), q_len, k_pad, k_len, d, rows, scale};
  ParallelFor(pool, lead, [&problem](int64_t task) { RunBackwardTask(problem, task); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VmcFlashAttentionForward, FlashForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("k_len")
                                  .Attr<int64_t>("rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VmcFlashAttentionBackward, FlashBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("k_len")
                                  .Attr<int64_t>("rows"));
