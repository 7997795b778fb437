// Fused softmax attention for XLA:CPU, called from JAX through jax.ffi (hw2jax/kernels/__init__.py).
//
// Why: XLA's CPU backend has no fused attention, so it writes the [T, T] scores, reads them for
// the softmax and again for probs.v. This kernel keeps one block of score rows in L1 per
// (sequence, head), the way torch's CPU SDPA does, and runs (sequence, head) items on XLA's own
// intra-op threads.
//
// Shapes: q, k, v, out are [N, T, H, D] float32 (N = all leading dims), exactly the layout the
// q/k/v projections produce, so no transposes on either side; key_bias is [N, T], added to every
// row's scores (0 for real keys, a large negative number for padding). D must be a multiple of 16
// and at most 128; the Python side checks this before calling.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <condition_variable>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define HW2JAX_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ffi = xla::ffi;

namespace {

// GCC/Clang vector extensions: 16 floats, AVX-512 registers under -march=native where the CPU
// has them, pairs of AVX2 registers otherwise.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

constexpr int kLanes = 16;
constexpr int kRows = 8;   // score rows per block: 8 x 32 keys = 16 accumulators
constexpr int kKeys = 32;  // keys per score tile (2 vectors)

inline v16 splat(float x) { return v16{} + x; }
inline v16 load(const float* p) { v16 r; std::memcpy(&r, p, sizeof r); return r; }
inline void store(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }

// exp(r) for |r| <= ln2 / 2: Cephes' expf polynomial.
inline v16 ExpReduced(v16 r) {
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// exp for x <= 0 (scores minus the row maximum), 0 far below the smallest normal float.
#ifdef __AVX512F__
// As 2^(x log2 e) = 2^n 2^r, |r| <= 1/2: Cephes' expf polynomial at r ln 2, scaled by 2^n with
// vscalefps: fewer instructions than building the scale in the exponent bits, as below, and the
// exp is a large share of the flash passes (benchmarks/NOTES.md). x log2 e carries a rounding of
// |x| 2^-24, which matters only where exp(x) is far below the row's largest term.
inline v16 exp_nonpositive(v16 x) {
  v16 t = x * 1.44269504088896341f;
  t = t < -200.0f ? splat(-200.0f) : t;  // -inf -> 0; NaN stays NaN
  const __m512 n = _mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const v16 r = (t - (v16)n) * 0.693147180559945309f;
  const v16 e = ExpReduced(r);
  return (v16)_mm512_scalef_ps((__m512)e, n);
}
#else
// Cephes' expf: x = n ln2 + r, the polynomial at r, times 2^n built in the exponent bits.
inline v16 exp_nonpositive(v16 x) {
  const v16 lowest = splat(-87.3365447f);
  const v16 xc = x < lowest ? lowest : x;
  const v16 n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  v16 r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const v16 e = ExpReduced(r);
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < lowest ? splat(0.0f) : e * scale;
}
#endif

inline float hmax(v16 x) {
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, x[i]);
  return m;
}

inline float hsum(v16 x) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
}

struct Aligned {
  explicit Aligned(size_t floats)
      : ptr(static_cast<float*>(std::aligned_alloc(64, ((floats * 4 + 63) / 64) * 64))) {}
  ~Aligned() { std::free(ptr); }
  float* ptr;
};

// Pieces shared by the kernels: score and product microkernels on 16-float vectors, and the
// packing of one (sequence, head) into padded tiles.

constexpr int kBlockQ = 64;   // query rows per block
constexpr int kBlockK = 64;   // keys per block (a multiple of kKeys)

// s[rows x cols] = a[rows x D] . bt[D x ...] over keys j0 .. j0 + cols, where bt is stored
// transposed (bt[c * ldb + j]); rows a multiple of kRows, cols of kKeys.
template <int kVecs>
void ScoresBlock(const float* a, int64_t rows, const float* bt, int64_t ldb, int64_t j0,
                 int64_t cols, float* s, int64_t lds) {
  constexpr int kD = kVecs * kLanes;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows)
    for (int64_t jj = 0; jj < cols; jj += kKeys) {
      v16 acc[kRows][2] = {};
      const float* b = bt + j0 + jj;
      for (int c = 0; c < kD; ++c) {
        const v16 b0 = load(b + c * ldb), b1 = load(b + c * ldb + kLanes);
        for (int r = 0; r < kRows; ++r) {
          const float x = a[(r0 + r) * kD + c];
          acc[r][0] += x * b0;
          acc[r][1] += x * b1;
        }
      }
      for (int r = 0; r < kRows; ++r) {
        store(s + (r0 + r) * lds + jj, acc[r][0]);
        store(s + (r0 + r) * lds + jj + kLanes, acc[r][1]);
      }
    }
}

// out[rows x D] += A . b[n x D], A's element (i, k) at a[i * ai + k * ak]: with (ai, ak) =
// (ld, 1) that is A . b, with (1, ld) it is A^T . b. rows a multiple of 8.
template <int kVecs>
void AccumulateProduct(const float* a, int64_t ai, int64_t ak, int64_t rows, int64_t n,
                       const float* b, float* out) {
  constexpr int kD = kVecs * kLanes;
  constexpr int kTile = kVecs <= 2 ? 8 : kVecs <= 4 ? 4 : 2;  // <= 16 accumulators
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    v16 acc[kTile][kVecs];
    for (int r = 0; r < kTile; ++r)
      for (int c = 0; c < kVecs; ++c) acc[r][c] = load(out + (i0 + r) * kD + c * kLanes);
    for (int64_t k = 0; k < n; ++k) {
      v16 bk[kVecs];
      for (int c = 0; c < kVecs; ++c) bk[c] = load(b + k * kD + c * kLanes);
      for (int r = 0; r < kTile; ++r) {
        const float x = a[(i0 + r) * ai + k * ak];
        for (int c = 0; c < kVecs; ++c) acc[r][c] += x * bk[c];
      }
    }
    for (int r = 0; r < kTile; ++r)
      for (int c = 0; c < kVecs; ++c) store(out + (i0 + r) * kD + c * kLanes, acc[r][c]);
  }
}

// Copies one head's [T, D] rows out of an [N, T, H, D] array into a zero-padded [tp, D] tile,
// times `scale`; with `transposed`, into [D, kBlockK] panels, one per key block, each contiguous
// (a [D, tp] matrix would put the rows of a panel tp floats apart, a power of two: they would
// fall into the same cache sets, and at T = 16,384 the panel no longer stays in L1 or L2).
template <int kD>
void PackRows(const float* src, int64_t base, int64_t row_stride, int64_t t, int64_t tp,
              float scale, float* dst, bool transposed) {
  if (transposed) {
    for (int64_t i = 0; i < tp; ++i) {
      float* panel = dst + i / kBlockK * (kD * kBlockK) + i % kBlockK;
      for (int c = 0; c < kD; ++c)
        panel[c * kBlockK] = i < t ? src[base + i * row_stride + c] * scale : 0.0f;
    }
  } else {
    for (int64_t i = 0; i < t; ++i)
      for (int c = 0; c < kD; ++c) dst[i * kD + c] = src[base + i * row_stride + c] * scale;
    std::memset(dst + t * kD, 0, sizeof(float) * (tp - t) * kD);
  }
}

// The [D, kBlockK] panel of keys j0.. in a tile packed with `transposed`.
template <int kD>
const float* PanelOf(const float* packed, int64_t j0) {
  return packed + j0 / kBlockK * (kD * kBlockK);
}

template <int kD>
void UnpackRows(const float* src, int64_t t, float scale, float* dst, int64_t base,
                int64_t row_stride) {
  for (int64_t i = 0; i < t; ++i)
    for (int c = 0; c < kD; ++c) dst[base + i * row_stride + c] = src[i * kD + c] * scale;
}

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
static_assert(kBlockQ % kBlockK == 0 || kBlockK % kBlockQ == 0, "blocks must nest");
constexpr int64_t kPad = kBlockQ > kBlockK ? kBlockQ : kBlockK;  // sequences padded to this

struct Problem {
  const float *q, *k, *v, *key_bias;
  float* out;
  int64_t items, t, h, d;  // items = N * H
  float scale;
};

// One (sequence, head): packs q (scaled), k in [D, kBlockK] panels and v, then per block of kRows
// query rows: scores -> softmax with the key bias -> probs.v, with the flash kernels' pieces.
template <int kVecs>  // D / 16
class RowSoftmax {
 public:
  explicit RowSoftmax(const Problem& p)
      : p_(p), tp_(RoundUp(p.t, kPad)), q_(tp_ * kD), kt_(kD * tp_), v_(tp_ * kD), bias_(tp_),
        s_(kRows * tp_), o_(kRows * kD) {}

  void Run(int64_t item) {
    const int64_t n = item / p_.h, head = item % p_.h, t = p_.t, stride = p_.h * kD;
    const int64_t base = n * t * stride + head * kD;
    PackRows<kD>(p_.q, base, stride, t, tp_, p_.scale, q_.ptr, false);
    PackRows<kD>(p_.k, base, stride, t, tp_, 1.0f, kt_.ptr, true);
    PackRows<kD>(p_.v, base, stride, t, tp_, 1.0f, v_.ptr, false);
    std::memcpy(bias_.ptr, p_.key_bias + n * t, sizeof(float) * t);
    std::fill(bias_.ptr + t, bias_.ptr + tp_, -INFINITY);  // padding keys: weight 0
    for (int64_t i0 = 0; i0 < t; i0 += kRows) {
      for (int64_t j0 = 0; j0 < tp_; j0 += kBlockK)
        ScoresBlock<kVecs>(q_.ptr + i0 * kD, kRows, PanelOf<kD>(kt_.ptr, j0), kBlockK, 0, kBlockK,
                           s_.ptr + j0, tp_);
      float inv_sum[kRows];
      for (int r = 0; r < kRows; ++r) inv_sum[r] = 1.0f / Softmax(s_.ptr + r * tp_);
      std::memset(o_.ptr, 0, sizeof(float) * kRows * kD);
      AccumulateProduct<kVecs>(s_.ptr, tp_, 1, kRows, tp_, v_.ptr, o_.ptr);
      const int64_t rows = std::min<int64_t>(kRows, t - i0);
      for (int64_t r = 0; r < rows; ++r)
        for (int c = 0; c < kD; c += kLanes)
          store(p_.out + base + (i0 + r) * stride + c, load(o_.ptr + r * kD + c) * inv_sum[r]);
    }
  }

 private:
  static constexpr int kD = kVecs * kLanes;

  // In place: row -> exp(row + bias - max); returns the sum.
  float Softmax(float* row) {
    v16 m = splat(-INFINITY);
    for (int64_t j = 0; j < tp_; j += kLanes) {
      const v16 x = load(row + j) + load(bias_.ptr + j);
      store(row + j, x);
      m = x > m ? x : m;
    }
    const float row_max = hmax(m);
    v16 sum{};
    for (int64_t j = 0; j < tp_; j += kLanes) {
      const v16 e = exp_nonpositive(load(row + j) - row_max);
      store(row + j, e);
      sum += e;
    }
    return hsum(sum);
  }

  const Problem& p_;
  const int64_t tp_;
  Aligned q_, kt_, v_, bias_, s_, o_;
};

// Items handed out through an atomic counter. The calling thread works too, with one helper
// fewer than the pool has threads: one more thread than cores made the last items wait
// (T = 16,384: 6.1 against 6.4-7.2 s forward and backward). Helpers that start late find
// nothing left and return.
template <class Problem>
struct Job {
  Problem problem;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <template <int> class Worker, int kVecs, class Problem>
void DrainJob(Job<Problem>& job) {
  int64_t i = job.next.fetch_add(1);
  if (i >= job.problem.items) return;
  Worker<kVecs> worker(job.problem);
  int64_t finished = 0;
  for (; i < job.problem.items; i = job.next.fetch_add(1), ++finished) worker.Run(i);
  if (job.done.fetch_add(finished) + finished == job.problem.items) {
    std::lock_guard<std::mutex> lock(job.mu);
    job.cv.notify_all();
  }
}

template <template <int> class Worker, class Problem>
void (*DrainFor(int64_t d))(Job<Problem>&) {
  switch (d) {
    case 16: return DrainJob<Worker, 1, Problem>;
    case 32: return DrainJob<Worker, 2, Problem>;
    case 48: return DrainJob<Worker, 3, Problem>;
    case 64: return DrainJob<Worker, 4, Problem>;
    case 80: return DrainJob<Worker, 5, Problem>;
    case 96: return DrainJob<Worker, 6, Problem>;
    case 112: return DrainJob<Worker, 7, Problem>;
    case 128: return DrainJob<Worker, 8, Problem>;
    default: return nullptr;
  }
}

// Runs `drain` over the problem's items on the calling thread and XLA's pool; returns when all
// are done.
template <class Problem>
void RunJob(ffi::ThreadPool& pool, void (*drain)(Job<Problem>&), const Problem& problem) {
  auto job = std::make_shared<Job<Problem>>();
  job->problem = problem;
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, problem.items - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job, drain] { drain(*job); });
  drain(*job);
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == job->problem.items; });
}

// Runs Worker<D / 16> over the (sequence, head) items of a [N, T, H, D] input `x`, on the
// calling thread and XLA's pool; fills in the problem's sizes.
template <template <int> class Worker, class Problem, ffi::DataType kType>
ffi::Error RunItems(ffi::ThreadPool& pool, ffi::Buffer<kType>& x, Problem problem) {
  const auto dims = x.dimensions();
  if (dims.size() < 3) return ffi::Error::InvalidArgument("inputs must be [..., T, heads, D]");
  const int64_t d = dims[dims.size() - 1], h = dims[dims.size() - 2], t = dims[dims.size() - 3];
  auto drain = DrainFor<Worker, Problem>(d);
  if (drain == nullptr)
    return ffi::Error::InvalidArgument("head dim must be a multiple of 16, at most 128");
  if (x.element_count() == 0) return ffi::Error::Success();
  problem.t = t;
  problem.h = h;
  problem.d = d;
  problem.items = x.element_count() / (t * d);
  RunJob(pool, drain, problem);
  return ffi::Error::Success();
}

// Whether every buffer holds as many elements as the first.
template <class First, class... Buffers>
bool SameCount(const First& first, const Buffers&... rest) {
  return ((rest.element_count() == first.element_count()) && ...);
}

// The row kernels' inputs: q, k, v [..., T, heads, D] of one shape, key_bias [..., T].
template <class Buffer>
ffi::Error CheckRowInputs(const Buffer& q, const Buffer& k, const Buffer& v,
                          const ffi::Buffer<ffi::F32>& key_bias) {
  const auto dims = q.dimensions();
  if (dims.size() < 3) return ffi::Error::InvalidArgument("q must be [..., T, heads, D]");
  const int64_t d = dims[dims.size() - 1], h = dims[dims.size() - 2];
  if (!SameCount(q, k, v))
    return ffi::Error::InvalidArgument("q, k and v must have the same shape");
  if (q.element_count() != 0 && key_bias.element_count() != q.element_count() / (h * d))
    return ffi::Error::InvalidArgument("key_bias must be [..., T]");
  return ffi::Error::Success();
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> key_bias, float scale,
                     ffi::ResultBuffer<ffi::F32> out) {
  if (ffi::Error error = CheckRowInputs(q, k, v, key_bias); error.failure()) return error;
  Problem p{q.typed_data(), k.typed_data(), v.typed_data(), key_bias.typed_data(),
            out->typed_data(), 0, 0, 0, 0, scale};  // RunItems fills in the sizes
  return RunItems<RowSoftmax>(pool, q, p);
}

// ---------------------------------------------------------------------------------------------
// Flash attention with gradients: a forward pass that also returns each row's log-sum-exp, and
// a backward pass that recomputes the probabilities block by block from it (FlashAttention-2's
// algorithm). Causal or not, no key bias; q, k, v, out, dout are [N, T, H, D], lse is [N, H, T].
// One (sequence, head) per thread: the backward accumulates dq over key blocks without atomics.

struct FlashProblem {
  const float *q, *k, *v, *out, *lse, *dout;  // out, lse, dout: backward only
  float *out_w, *lse_w;                        // forward's results
  float *dq, *dk, *dv;                         // backward's results
  int64_t items, t, h, d;
  float scale;
  bool causal;
};

// In a [kBlockQ x kBlockK] block of queries i0.. and keys j0.., entry (r, j) at s[r * at_row +
// j * at_key]: the entries of keys past the end and (causal) of keys after their query set to
// `value`.
inline void MaskBlock(float* s, int64_t i0, int64_t j0, int64_t t, bool causal, float value,
                      int64_t at_row = kBlockK, int64_t at_key = 1) {
  const bool tail = j0 + kBlockK > t, diagonal = causal && j0 + kBlockK - 1 > i0;
  if (!tail && !diagonal) return;
  for (int r = 0; r < kBlockQ; ++r) {
    const int64_t last = causal ? std::min(t - 1, i0 + r) : t - 1;
    for (int64_t j = std::max<int64_t>(j0, last + 1); j < j0 + kBlockK; ++j)
      s[r * at_row + (j - j0) * at_key] = value;
  }
}

// The score block is kept transposed, [keys x query rows]: a vector then holds 16 rows, so each
// row's running maximum, sum and rescale factor sit in vector lanes, with no reductions across
// lanes and no scalar exp per row (1.08-1.11x the forward's speed of [rows x keys] blocks, with
// the exp before vscalefps).
template <int kVecs>
class FlashForward {
 public:
  explicit FlashForward(const FlashProblem& p)
      : p_(p), tp_(RoundUp(p.t, kPad)), qt_(kD * tp_), k_(tp_ * kD), v_(tp_ * kD),
        s_(kBlockK * kBlockQ), o_(kBlocksPerPass * kBlockQ * kD) {}

  void Run(int64_t item) {
    const int64_t n = item / p_.h, head = item % p_.h, t = p_.t, stride = p_.h * kD;
    const int64_t base = n * t * stride + head * kD;
    PackRows<kD>(p_.q, base, stride, t, tp_, p_.scale, qt_.ptr, true);
    PackRows<kD>(p_.k, base, stride, t, tp_, 1.0f, k_.ptr, false);
    PackRows<kD>(p_.v, base, stride, t, tp_, 1.0f, v_.ptr, false);
    // One pass over k and v serves kBlocksPerPass query blocks: at T = 16,384 k and v fill 8 MiB
    // per item, four times L2, and a pass per block read them from L3 that often.
    for (int64_t i_pass = 0; i_pass < t; i_pass += kBlocksPerPass * kBlockQ) {
      const int blocks =
          static_cast<int>(std::min<int64_t>(kBlocksPerPass, RoundUp(t - i_pass, kBlockQ) /
                                                                 kBlockQ));
      v16 m[kBlocksPerPass][kGroups], l[kBlocksPerPass][kGroups];
      for (int b = 0; b < blocks; ++b)
        for (int g = 0; g < kGroups; ++g) m[b][g] = splat(-INFINITY), l[b][g] = splat(0.0f);
      std::memset(o_.ptr, 0, sizeof(float) * blocks * kBlockQ * kD);
      const int64_t limit = p_.causal ? std::min(t, i_pass + blocks * kBlockQ) : t;
      for (int64_t j0 = 0; j0 < limit; j0 += kBlockK) {
        for (int b = 0; b < blocks; ++b) {
          const int64_t i0 = i_pass + b * kBlockQ;
          if (p_.causal && j0 >= i0 + kBlockQ) continue;
          float* s = s_.ptr;  // s[key * kBlockQ + row]
          float* o = o_.ptr + b * kBlockQ * kD;
          ScoresBlock<kVecs>(k_.ptr + j0 * kD, kBlockK, PanelOf<kD>(qt_.ptr, i0), kBlockQ, 0,
                             kBlockQ, s, kBlockQ);
          MaskBlock(s, i0, j0, t, p_.causal, -INFINITY, 1, kBlockQ);
          alignas(64) float alpha[kBlockQ];
          for (int g = 0; g < kGroups; ++g)
            store(alpha + g * kLanes, Softmax(s + g * kLanes, m[b][g], l[b][g]));
          if (j0 > 0)
            for (int r = 0; r < kBlockQ; ++r)
              if (alpha[r] != 1.0f)
                for (int c = 0; c < kD; c += kLanes)
                  store(o + r * kD + c, load(o + r * kD + c) * alpha[r]);
          AccumulateProduct<kVecs>(s, 1, kBlockQ, kBlockQ, kBlockK, v_.ptr + j0 * kD, o);
        }
      }
      for (int b = 0; b < blocks; ++b) {
        const int64_t i0 = i_pass + b * kBlockQ;
        alignas(64) float row_max[kBlockQ], row_sum[kBlockQ];
        for (int g = 0; g < kGroups; ++g) {
          store(row_max + g * kLanes, m[b][g]);
          store(row_sum + g * kLanes, l[b][g]);
        }
        const int64_t rows = std::min<int64_t>(kBlockQ, t - i0);
        const float* o = o_.ptr + b * kBlockQ * kD;
        for (int64_t r = 0; r < rows; ++r) {
          const float inv = 1.0f / row_sum[r];
          float* dst = p_.out_w + base + (i0 + r) * stride;
          for (int c = 0; c < kD; ++c) dst[c] = o[r * kD + c] * inv;
          p_.lse_w[item * t + i0 + r] = row_max[r] + std::log(row_sum[r]);
        }
      }
    }
  }

 private:
  static constexpr int kD = kVecs * kLanes;
  static constexpr int kGroups = kBlockQ / kLanes;
  static constexpr int kBlocksPerPass = 8;

  // One group of 16 rows, column `col` of a transposed block: scores -> exp(score - new max) in
  // place; updates the running max m and sum l, returns the factor that rescales older terms.
  static v16 Softmax(float* col, v16& m, v16& l) {
    v16 max0 = load(col), max1 = load(col + kBlockQ);  // two chains: half the latency
    for (int j = 2; j < kBlockK; j += 2) {
      const v16 x0 = load(col + j * kBlockQ), x1 = load(col + (j + 1) * kBlockQ);
      max0 = x0 > max0 ? x0 : max0;
      max1 = x1 > max1 ? x1 : max1;
    }
    v16 m_new = max0 > max1 ? max0 : max1;
    m_new = m > m_new ? m : m_new;  // finite: key 0 is in every row
    const v16 alpha = exp_nonpositive(m - m_new);
    v16 sum0{}, sum1{};
    for (int j = 0; j < kBlockK; j += 2) {
      const v16 e0 = exp_nonpositive(load(col + j * kBlockQ) - m_new);
      const v16 e1 = exp_nonpositive(load(col + (j + 1) * kBlockQ) - m_new);
      store(col + j * kBlockQ, e0);
      store(col + (j + 1) * kBlockQ, e1);
      sum0 += e0;
      sum1 += e1;
    }
    l = l * alpha + (sum0 + sum1);
    m = m_new;
    return alpha;
  }

  const FlashProblem& p_;
  const int64_t tp_;
  Aligned qt_, k_, v_, s_, o_;
};

template <int kVecs>
class FlashBackward {
 public:
  explicit FlashBackward(const FlashProblem& p)
      : p_(p), tp_(RoundUp(p.t, kPad)), q_(tp_ * kD), k_(tp_ * kD), kt_(kD * tp_),
        vt_(kD * tp_), do_(tp_ * kD), dq_(tp_ * kD), lse_(tp_), delta_(tp_),
        p_blk_(kBlockQ * kBlockK), ds_(kBlockQ * kBlockK), dk_(kBlocksPerPass * kBlockK * kD),
        dv_(kBlocksPerPass * kBlockK * kD) {}

  void Run(int64_t item) {
    const int64_t n = item / p_.h, head = item % p_.h, t = p_.t, stride = p_.h * kD;
    const int64_t base = n * t * stride + head * kD;
    PackRows<kD>(p_.q, base, stride, t, tp_, p_.scale, q_.ptr, false);
    PackRows<kD>(p_.k, base, stride, t, tp_, 1.0f, k_.ptr, false);
    PackRows<kD>(p_.k, base, stride, t, tp_, 1.0f, kt_.ptr, true);
    PackRows<kD>(p_.v, base, stride, t, tp_, 1.0f, vt_.ptr, true);
    PackRows<kD>(p_.dout, base, stride, t, tp_, 1.0f, do_.ptr, false);
    std::memset(dq_.ptr, 0, sizeof(float) * tp_ * kD);
    for (int64_t i = 0; i < tp_; ++i) {
      // Padded rows have q = dout = 0: whatever their probabilities, they add nothing.
      lse_.ptr[i] = i < t ? p_.lse[item * t + i] : 0.0f;
      float dot = 0.0f;
      if (i < t) {
        const float* o = p_.out + base + i * stride;
        for (int c = 0; c < kD; ++c) dot += o[c] * do_.ptr[i * kD + c];
      }
      delta_.ptr[i] = dot;  // rowsum(dout * out) = sum_j p_ij dp_ij
    }
    float* pb = p_blk_.ptr;
    float* ds = ds_.ptr;
    // One pass over q, dout and dq serves kBlocksPerPass key blocks (as in the forward pass).
    for (int64_t j_pass = 0; j_pass < t; j_pass += kBlocksPerPass * kBlockK) {
      const int blocks =
          static_cast<int>(std::min<int64_t>(kBlocksPerPass, RoundUp(t - j_pass, kBlockK) /
                                                                 kBlockK));
      std::memset(dk_.ptr, 0, sizeof(float) * blocks * kBlockK * kD);
      std::memset(dv_.ptr, 0, sizeof(float) * blocks * kBlockK * kD);
      for (int64_t i0 = p_.causal ? j_pass / kBlockQ * kBlockQ : 0; i0 < t; i0 += kBlockQ) {
        for (int b = 0; b < blocks; ++b) {
          const int64_t j0 = j_pass + b * kBlockK;
          if (p_.causal && i0 + kBlockQ <= j0) continue;
          float* dk = dk_.ptr + b * kBlockK * kD;
          float* dv = dv_.ptr + b * kBlockK * kD;
          ScoresBlock<kVecs>(q_.ptr + i0 * kD, kBlockQ, PanelOf<kD>(kt_.ptr, j0), kBlockK, 0,
                             kBlockK, pb, kBlockK);
          for (int r = 0; r < kBlockQ; ++r) {
            float* row = pb + r * kBlockK;
            const float lse = lse_.ptr[i0 + r];
            for (int j = 0; j < kBlockK; j += kLanes)
              store(row + j, exp_nonpositive(load(row + j) - lse));
          }
          MaskBlock(pb, i0, j0, t, p_.causal, 0.0f);
          // dv += p^T . dout
          AccumulateProduct<kVecs>(pb, 1, kBlockK, kBlockK, kBlockQ, do_.ptr + i0 * kD, dv);
          // dp = dout . v^T, then ds = p * (dp - delta)
          ScoresBlock<kVecs>(do_.ptr + i0 * kD, kBlockQ, PanelOf<kD>(vt_.ptr, j0), kBlockK, 0,
                             kBlockK, ds, kBlockK);
          for (int r = 0; r < kBlockQ; ++r) {
            const float delta = delta_.ptr[i0 + r];
            for (int j = 0; j < kBlockK; j += kLanes) {
              const int64_t at = r * kBlockK + j;
              store(ds + at, load(pb + at) * (load(ds + at) - delta));
            }
          }
          // dq += ds . k ; dk += ds^T . (scale q)
          AccumulateProduct<kVecs>(ds, kBlockK, 1, kBlockQ, kBlockK, k_.ptr + j0 * kD,
                                   dq_.ptr + i0 * kD);
          AccumulateProduct<kVecs>(ds, 1, kBlockK, kBlockK, kBlockQ, q_.ptr + i0 * kD, dk);
        }
      }
      for (int b = 0; b < blocks; ++b) {
        const int64_t j0 = j_pass + b * kBlockK, keys = std::min<int64_t>(kBlockK, t - j0);
        UnpackRows<kD>(dk_.ptr + b * kBlockK * kD, keys, 1.0f, p_.dk, base + j0 * stride, stride);
        UnpackRows<kD>(dv_.ptr + b * kBlockK * kD, keys, 1.0f, p_.dv, base + j0 * stride, stride);
      }
    }
    UnpackRows<kD>(dq_.ptr, t, p_.scale, p_.dq, base, stride);
  }

 private:
  static constexpr int kD = kVecs * kLanes;
  static constexpr int kBlocksPerPass = 8;
  const FlashProblem& p_;
  const int64_t tp_;
  Aligned q_, k_, kt_, vt_, do_, dq_, lse_, delta_, p_blk_, ds_, dk_, dv_;
};

ffi::Error FlashForwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, float scale,
                            int32_t causal, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse) {
  if (!SameCount(q, k, v))
    return ffi::Error::InvalidArgument("q, k and v must have the same shape");
  FlashProblem p{};
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.out_w = out->typed_data();
  p.lse_w = lse->typed_data();
  p.scale = scale;
  p.causal = causal != 0;
  return RunItems<FlashForward>(pool, q, p);
}

ffi::Error FlashBackwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                             ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> dout, float scale, int32_t causal,
                             ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dv) {
  if (!SameCount(q, k, v, out, dout))
    return ffi::Error::InvalidArgument("q, k, v, out and dout must have the same shape");
  FlashProblem p{};
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.out = out.typed_data();
  p.lse = lse.typed_data();
  p.dout = dout.typed_data();
  p.dq = dq->typed_data();
  p.dk = dk->typed_data();
  p.dv = dv->typed_data();
  p.scale = scale;
  p.causal = causal != 0;
  return RunItems<FlashBackward>(pool, q, p);
}


// ---------------------------------------------------------------------------------------------
// Causal linear attention's product, (num_i, den_i) = (sum_{j<=i} (fq_i . fk_j) v_j,
// sum_{j<=i} fq_i . fk_j), by the chunk algorithm (as hw2jax/attention/linear_pallas.py, which
// sums the states first to run the chunks in parallel on a GPU): exact inside chunks of 64, the
// state S = sum_j fk_j v_j^T and z = sum_j fk_j carried between them in order. fq, fk, v, num
// are [N, T, H, D] (one D for features and values), den [N, T, H].
// The backward pass walks forward for d fq, then in reverse for d fk and d v.

// A worker with Forward(item) and Backward(item) as the Run(item) that RunItems calls.
template <template <int> class Worker, bool kBackward>
struct Pass {
  template <int kVecs>
  struct Of : Worker<kVecs> {
    using Worker<kVecs>::Worker;
    void Run(int64_t item) { kBackward ? this->Backward(item) : this->Forward(item); }
  };
};

struct LinearProblem {
  const float *fq, *fk, *v, *g_num, *g_den;  // g_*: backward only
  float *num, *den;                          // forward's results
  float *d_fq, *d_fk, *d_v;                  // backward's results
  int64_t items, t, h, d;
};

// Zeroes the entries of a [kBlockK x kBlockK] chunk block above the diagonal (j > i).
inline void ZeroFuture(float* s) {
  for (int r = 0; r < kBlockK; ++r) std::memset(s + r * kBlockK + r + 1, 0, sizeof(float) * (kBlockK - 1 - r));
}

// sums += the sum of a tile's first `rows` rows of kD.
template <int kD>
void AddRowSums(const float* tile, int64_t rows, float* sums) {
  for (int64_t r = 0; r < rows; ++r)
    for (int c = 0; c < kD; c += kLanes) store(sums + c, load(sums + c) + load(tile + r * kD + c));
}

template <int kD>
void Transpose(const float* a, float* at) {  // [kD x kD]
  for (int i = 0; i < kD; ++i)
    for (int j = 0; j < kD; ++j) at[j * kD + i] = a[i * kD + j];
}

template <int kVecs>
class LinearWorker {
 public:
  explicit LinearWorker(const LinearProblem& p)
      : p_(p), tp_(RoundUp(p.t, kBlockK)), q_(tp_ * kD), k_(tp_ * kD), kt_(kD * tp_),
        v_(tp_ * kD), vt_(kD * tp_), g_(tp_ * kD), gden_(tp_), s_(kBlockK * kBlockK),
        ds_(kBlockK * kBlockK), state_(kD * kD), state_t_(kD * kD), z_(kD), rows_(kBlockK * kD) {}

  void Forward(int64_t item) {
    const int64_t base = Pack(item, false);
    Zero(state_);
    Zero(z_, kD);
    for (int64_t c0 = 0; c0 < p_.t; c0 += kBlockK) {
      Scores(q_.ptr + c0 * kD, kt_.ptr, c0, s_.ptr);  // fq fk^T, causal
      float* num = rows_.ptr;
      std::memset(num, 0, sizeof(float) * kBlockK * kD);
      AccumulateProduct<kVecs>(s_.ptr, kBlockK, 1, kBlockK, kBlockK, v_.ptr + c0 * kD, num);
      AccumulateProduct<kVecs>(q_.ptr + c0 * kD, kD, 1, kBlockK, kD, state_.ptr, num);
      const int64_t rows = std::min<int64_t>(kBlockK, p_.t - c0);
      for (int64_t r = 0; r < rows; ++r) {
        float den = 0.0f;
        for (int j = 0; j <= r; ++j) den += s_.ptr[r * kBlockK + j];
        for (int c = 0; c < kD; ++c) den += q_.ptr[(c0 + r) * kD + c] * z_.ptr[c];
        std::memcpy(p_.num + base + (c0 + r) * Stride(), num + r * kD, sizeof(float) * kD);
        p_.den[Den(item, c0 + r)] = den;
      }
      // S += fk^T v ; z += sum of fk
      AccumulateProduct<kVecs>(k_.ptr + c0 * kD, 1, kD, kD, kBlockK, v_.ptr + c0 * kD, state_.ptr);
      AddRowSums<kD>(k_.ptr + c0 * kD, kBlockK, z_.ptr);
    }
  }

  void Backward(int64_t item) {
    const int64_t base = Pack(item, true);
    // Queries, in order: d fq = ds fk + g S^T + g_den z^T, ds = causal(g v^T + g_den).
    Zero(state_t_);
    Zero(z_, kD);
    for (int64_t c0 = 0; c0 < p_.t; c0 += kBlockK) {
      WeightGradients(c0);
      float* d_q = rows_.ptr;
      std::memset(d_q, 0, sizeof(float) * kBlockK * kD);
      AccumulateProduct<kVecs>(ds_.ptr, kBlockK, 1, kBlockK, kBlockK, k_.ptr + c0 * kD, d_q);
      AccumulateProduct<kVecs>(g_.ptr + c0 * kD, kD, 1, kBlockK, kD, state_t_.ptr, d_q);
      AddOuter(gden_.ptr + c0, z_.ptr, d_q);
      Unpack(d_q, c0, p_.d_fq, base);
      // S^T += v^T fk ; z += sum of fk
      AccumulateProduct<kVecs>(v_.ptr + c0 * kD, 1, kD, kD, kBlockK, k_.ptr + c0 * kD, state_t_.ptr);
      AddRowSums<kD>(k_.ptr + c0 * kD, kBlockK, z_.ptr);
    }
    // Keys and values, in reverse, with R = sum fq^T g and r = sum fq g_den over later chunks:
    // d fk = ds^T fq + v R^T + r^T, d v = causal(fq fk^T)^T g + fk R.
    Zero(state_);
    Zero(z_, kD);
    for (int64_t c0 = (p_.t - 1) / kBlockK * kBlockK; c0 >= 0; c0 -= kBlockK) {
      WeightGradients(c0);
      Scores(q_.ptr + c0 * kD, kt_.ptr, c0, s_.ptr);
      Transpose<kD>(state_.ptr, state_t_.ptr);
      float* d_k = rows_.ptr;
      std::memset(d_k, 0, sizeof(float) * kBlockK * kD);
      AccumulateProduct<kVecs>(ds_.ptr, 1, kBlockK, kBlockK, kBlockK, q_.ptr + c0 * kD, d_k);
      AccumulateProduct<kVecs>(v_.ptr + c0 * kD, kD, 1, kBlockK, kD, state_t_.ptr, d_k);
      for (int r = 0; r < kBlockK; ++r)
        for (int c = 0; c < kD; ++c) d_k[r * kD + c] += z_.ptr[c];
      Unpack(d_k, c0, p_.d_fk, base);
      float* d_v = rows_.ptr;
      std::memset(d_v, 0, sizeof(float) * kBlockK * kD);
      AccumulateProduct<kVecs>(s_.ptr, 1, kBlockK, kBlockK, kBlockK, g_.ptr + c0 * kD, d_v);
      AccumulateProduct<kVecs>(k_.ptr + c0 * kD, kD, 1, kBlockK, kD, state_.ptr, d_v);
      Unpack(d_v, c0, p_.d_v, base);
      // R += fq^T g ; r += fq^T g_den
      AccumulateProduct<kVecs>(q_.ptr + c0 * kD, 1, kD, kD, kBlockK, g_.ptr + c0 * kD, state_.ptr);
      for (int r = 0; r < kBlockK; ++r)
        for (int c = 0; c < kD; ++c) z_.ptr[c] += q_.ptr[(c0 + r) * kD + c] * gden_.ptr[c0 + r];
    }
  }

 private:
  static constexpr int kD = kVecs * kLanes;

  int64_t Stride() const { return p_.h * kD; }
  int64_t Den(int64_t item, int64_t i) const {
    return ((item / p_.h) * p_.t + i) * p_.h + item % p_.h;
  }
  static void Zero(Aligned& a, int64_t n = kD * kD) { std::memset(a.ptr, 0, sizeof(float) * n); }

  // Packs this item's fq, fk (rows and transposed panels) and v (and, for the backward pass,
  // v's panels, g_num and g_den); returns the item's offset in the [N, T, H, D] arrays.
  int64_t Pack(int64_t item, bool backward) {
    const int64_t n = item / p_.h, head = item % p_.h, t = p_.t, stride = Stride();
    const int64_t base = n * t * stride + head * kD;
    PackRows<kD>(p_.fq, base, stride, t, tp_, 1.0f, q_.ptr, false);
    PackRows<kD>(p_.fk, base, stride, t, tp_, 1.0f, k_.ptr, false);
    PackRows<kD>(p_.fk, base, stride, t, tp_, 1.0f, kt_.ptr, true);
    PackRows<kD>(p_.v, base, stride, t, tp_, 1.0f, v_.ptr, false);
    if (backward) {
      PackRows<kD>(p_.v, base, stride, t, tp_, 1.0f, vt_.ptr, true);
      PackRows<kD>(p_.g_num, base, stride, t, tp_, 1.0f, g_.ptr, false);
      for (int64_t i = 0; i < tp_; ++i) gden_.ptr[i] = i < t ? p_.g_den[Den(item, i)] : 0.0f;
    }
    return base;
  }

  // s = causal(a_chunk . panel^T) for the chunk of rows c0.. against keys c0..
  void Scores(const float* a, const float* panels, int64_t c0, float* s) {
    ScoresBlock<kVecs>(a, kBlockK, PanelOf<kD>(panels, c0), kBlockK, 0, kBlockK, s, kBlockK);
    ZeroFuture(s);
  }

  // ds = causal(g v^T + g_den): d (num_i, den_i) / d (fq_i . fk_j) for the chunk at c0.
  void WeightGradients(int64_t c0) {
    ScoresBlock<kVecs>(g_.ptr + c0 * kD, kBlockK, PanelOf<kD>(vt_.ptr, c0), kBlockK, 0, kBlockK,
                       ds_.ptr, kBlockK);
    for (int r = 0; r < kBlockK; ++r) {
      const float g_den = gden_.ptr[c0 + r];
      for (int j = 0; j <= r; ++j) ds_.ptr[r * kBlockK + j] += g_den;
    }
    ZeroFuture(ds_.ptr);
  }

  // out[r, :] += u[r] * w for the chunk's rows.
  static void AddOuter(const float* u, const float* w, float* out) {
    for (int r = 0; r < kBlockK; ++r)
      for (int c = 0; c < kD; c += kLanes) store(out + r * kD + c, load(out + r * kD + c) + u[r] * load(w + c));
  }

  void Unpack(const float* rows, int64_t c0, float* dst, int64_t base) {
    UnpackRows<kD>(rows, std::min<int64_t>(kBlockK, p_.t - c0), 1.0f, dst, base + c0 * Stride(),
                   Stride());
  }

  const LinearProblem& p_;
  const int64_t tp_;
  Aligned q_, k_, kt_, v_, vt_, g_, gden_, s_, ds_, state_, state_t_, z_, rows_;
};

ffi::Error LinearForwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> fq,
                             ffi::Buffer<ffi::F32> fk, ffi::Buffer<ffi::F32> v,
                             ffi::ResultBuffer<ffi::F32> num, ffi::ResultBuffer<ffi::F32> den) {
  if (!SameCount(fq, fk, v))
    return ffi::Error::InvalidArgument("fq, fk and v must have the same shape");
  LinearProblem p{};
  p.fq = fq.typed_data();
  p.fk = fk.typed_data();
  p.v = v.typed_data();
  p.num = num->typed_data();
  p.den = den->typed_data();
  return RunItems<Pass<LinearWorker, false>::Of>(pool, fq, p);
}

ffi::Error LinearBackwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> fq,
                              ffi::Buffer<ffi::F32> fk, ffi::Buffer<ffi::F32> v,
                              ffi::Buffer<ffi::F32> g_num, ffi::Buffer<ffi::F32> g_den,
                              ffi::ResultBuffer<ffi::F32> d_fq, ffi::ResultBuffer<ffi::F32> d_fk,
                              ffi::ResultBuffer<ffi::F32> d_v) {
  if (!SameCount(fq, fk, v, g_num))
    return ffi::Error::InvalidArgument("fq, fk, v and g_num must have the same shape");
  LinearProblem p{};
  p.fq = fq.typed_data();
  p.fk = fk.typed_data();
  p.v = v.typed_data();
  p.g_num = g_num.typed_data();
  p.g_den = g_den.typed_data();
  p.d_fq = d_fq->typed_data();
  p.d_fk = d_fk->typed_data();
  p.d_v = d_v->typed_data();
  return RunItems<Pass<LinearWorker, true>::Of>(pool, fq, p);
}


// ---------------------------------------------------------------------------------------------
// Non-causal linear attention, features included: out_i = phi(q_i) S / (phi(q_i) . z + eps),
// S = sum_j phi(k_j) v_j^T, z = sum_j phi(k_j), phi = elu + 1 (feature 0) or relu (feature 1).
// Each pass streams its rows once in tiles of kBlockK, applying phi (and phi') on the way, so
// no feature array is ever written out. q, k, v, out are [N, T, H, D], S [N, H, D, D], z
// [N, H, D].

struct DenseProblem {
  const float *q, *k, *v, *out, *s, *z, *g;  // out, s, z, g: backward only
  float *out_w, *s_w, *z_w;                   // forward's results
  float *dq, *dk, *dv;                        // backward's results
  int64_t items, t, h, d;
  int32_t feature;
  float eps;
};

// phi(x) and phi'(x) of one vector.
inline void Feature(v16 x, int32_t feature, v16& phi, v16& slope) {
  const v16 zero{};
  if (feature == 0) {  // elu(x) + 1: x + 1 above 0, exp(x) below
    const v16 e = exp_nonpositive(x < zero ? x : zero);
    phi = x > zero ? x + 1.0f : e;
    slope = x > zero ? splat(1.0f) : e;
  } else {  // relu
    phi = x > zero ? x : zero;
    slope = x > zero ? splat(1.0f) : zero;
  }
}

template <int kVecs>
class DenseLinear {
 public:
  explicit DenseLinear(const DenseProblem& p)
      : p_(p), a_(kBlockK * kD), a_slope_(kBlockK * kD), b_(kBlockK * kD), c_(kBlockK * kD),
        s_(kD * kD), s_t_(kD * kD), z_(kD), den_(kBlockK) {}

  void Forward(int64_t item) {
    const int64_t base = Base(item);
    std::memset(s_.ptr, 0, sizeof(float) * kD * kD);
    std::memset(z_.ptr, 0, sizeof(float) * kD);
    for (int64_t r0 = 0; r0 < p_.t; r0 += kBlockK) {  // S += phi(k)^T v, z += sum phi(k)
      const int64_t rows = Load(p_.k, base, r0, a_.ptr, a_slope_.ptr);
      Load(p_.v, base, r0, b_.ptr, nullptr);
      AccumulateProduct<kVecs>(a_.ptr, 1, kD, kD, rows, b_.ptr, s_.ptr);
      AddRowSums<kD>(a_.ptr, rows, z_.ptr);
    }
    for (int64_t r0 = 0; r0 < p_.t; r0 += kBlockK) {  // out = phi(q) S / (phi(q) . z + eps)
      const int64_t rows = Load(p_.q, base, r0, a_.ptr, a_slope_.ptr);
      std::memset(c_.ptr, 0, sizeof(float) * kBlockK * kD);
      AccumulateProduct<kVecs>(a_.ptr, kD, 1, kBlockK, kD, s_.ptr, c_.ptr);
      Denominators(rows);
      for (int64_t r = 0; r < rows; ++r)
        for (int c = 0; c < kD; c += kLanes)
          store(p_.out_w + base + (r0 + r) * Stride() + c, load(c_.ptr + r * kD + c) / den_.ptr[r]);
    }
    std::memcpy(p_.s_w + item * kD * kD, s_.ptr, sizeof(float) * kD * kD);
    std::memcpy(p_.z_w + item * kD, z_.ptr, sizeof(float) * kD);
  }

  void Backward(int64_t item) {
    const int64_t base = Base(item);
    std::memcpy(s_.ptr, p_.s + item * kD * kD, sizeof(float) * kD * kD);
    std::memcpy(z_.ptr, p_.z + item * kD, sizeof(float) * kD);
    Transpose<kD>(s_.ptr, s_t_.ptr);
    Aligned ds(kD * kD), ds_t(kD * kD), dz(kD);
    std::memset(ds.ptr, 0, sizeof(float) * kD * kD);
    std::memset(dz.ptr, 0, sizeof(float) * kD);
    // Queries: gn = g / den, gd = -(g . out) / den; d phi(q) = gn S^T + gd z^T;
    // dS += phi(q)^T gn, dz += phi(q)^T gd.
    for (int64_t r0 = 0; r0 < p_.t; r0 += kBlockK) {
      const int64_t rows = Load(p_.q, base, r0, a_.ptr, a_slope_.ptr);
      Load(p_.g, base, r0, b_.ptr, nullptr);
      Denominators(rows);
      float gd[kBlockK] = {};
      for (int64_t r = 0; r < rows; ++r) {
        const float* out = p_.out + base + (r0 + r) * Stride();
        v16 dot{};
        for (int c = 0; c < kD; c += kLanes) dot += load(b_.ptr + r * kD + c) * load(out + c);
        const float inv = 1.0f / den_.ptr[r];
        gd[r] = -hsum(dot) * inv;
        for (int c = 0; c < kD; c += kLanes) store(b_.ptr + r * kD + c, load(b_.ptr + r * kD + c) * inv);
      }
      std::memset(c_.ptr, 0, sizeof(float) * kBlockK * kD);
      AccumulateProduct<kVecs>(b_.ptr, kD, 1, kBlockK, kD, s_t_.ptr, c_.ptr);
      for (int64_t r = 0; r < rows; ++r)
        for (int c = 0; c < kD; c += kLanes) {
          const v16 d_phi = load(c_.ptr + r * kD + c) + gd[r] * load(z_.ptr + c);
          store(p_.dq + base + (r0 + r) * Stride() + c, d_phi * load(a_slope_.ptr + r * kD + c));
        }
      AccumulateProduct<kVecs>(a_.ptr, 1, kD, kD, rows, b_.ptr, ds.ptr);
      for (int64_t r = 0; r < rows; ++r)
        for (int c = 0; c < kD; c += kLanes)
          store(dz.ptr + c, load(dz.ptr + c) + gd[r] * load(a_.ptr + r * kD + c));
    }
    // Keys and values: d phi(k) = v dS^T + dz, dv = phi(k) dS.
    Transpose<kD>(ds.ptr, ds_t.ptr);
    for (int64_t r0 = 0; r0 < p_.t; r0 += kBlockK) {
      const int64_t rows = Load(p_.k, base, r0, a_.ptr, a_slope_.ptr);
      Load(p_.v, base, r0, b_.ptr, nullptr);
      std::memset(c_.ptr, 0, sizeof(float) * kBlockK * kD);
      AccumulateProduct<kVecs>(b_.ptr, kD, 1, kBlockK, kD, ds_t.ptr, c_.ptr);
      for (int64_t r = 0; r < rows; ++r)
        for (int c = 0; c < kD; c += kLanes) {
          const v16 d_phi = load(c_.ptr + r * kD + c) + load(dz.ptr + c);
          store(p_.dk + base + (r0 + r) * Stride() + c, d_phi * load(a_slope_.ptr + r * kD + c));
        }
      std::memset(c_.ptr, 0, sizeof(float) * kBlockK * kD);
      AccumulateProduct<kVecs>(a_.ptr, kD, 1, kBlockK, kD, ds.ptr, c_.ptr);
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(p_.dv + base + (r0 + r) * Stride(), c_.ptr + r * kD, sizeof(float) * kD);
    }
  }

 private:
  static constexpr int kD = kVecs * kLanes;
  int64_t Stride() const { return p_.h * kD; }
  int64_t Base(int64_t item) const { return (item / p_.h) * p_.t * Stride() + (item % p_.h) * kD; }

  // Rows r0.. of one head into a zero-padded [kBlockK, D] tile; with `slope`, phi of them into
  // `tile` and phi' into `slope` (padded rows: phi = 0). Returns the number of real rows.
  int64_t Load(const float* src, int64_t base, int64_t r0, float* tile, float* slope) const {
    const int64_t rows = std::min<int64_t>(kBlockK, p_.t - r0);
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = src + base + (r0 + r) * Stride();
      for (int c = 0; c < kD; c += kLanes) {
        if (slope == nullptr) {
          store(tile + r * kD + c, load(row + c));
          continue;
        }
        v16 phi, dphi;
        Feature(load(row + c), p_.feature, phi, dphi);
        store(tile + r * kD + c, phi);
        store(slope + r * kD + c, dphi);
      }
    }
    std::memset(tile + rows * kD, 0, sizeof(float) * (kBlockK - rows) * kD);
    return rows;
  }

  void Denominators(int64_t rows) {  // phi(q) . z + eps for the tile in a_
    for (int64_t r = 0; r < rows; ++r) {
      v16 dot{};
      for (int c = 0; c < kD; c += kLanes) dot += load(a_.ptr + r * kD + c) * load(z_.ptr + c);
      den_.ptr[r] = hsum(dot) + p_.eps;
    }
  }

  const DenseProblem& p_;
  Aligned a_, a_slope_, b_, c_, s_, s_t_, z_, den_;
};

ffi::Error DenseForwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, int32_t feature,
                            float eps, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> s, ffi::ResultBuffer<ffi::F32> z) {
  if (!SameCount(q, k, v))
    return ffi::Error::InvalidArgument("q, k and v must have the same shape");
  if (feature != 0 && feature != 1) return ffi::Error::InvalidArgument("feature: 0 elu, 1 relu");
  DenseProblem p{};
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.out_w = out->typed_data();
  p.s_w = s->typed_data();
  p.z_w = z->typed_data();
  p.feature = feature;
  p.eps = eps;
  return RunItems<Pass<DenseLinear, false>::Of>(pool, q, p);
}

ffi::Error DenseBackwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                             ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> s,
                             ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> g, int32_t feature,
                             float eps, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  if (!SameCount(q, k, v, out, g))
    return ffi::Error::InvalidArgument("q, k, v, out and g must have the same shape");
  if (feature != 0 && feature != 1) return ffi::Error::InvalidArgument("feature: 0 elu, 1 relu");
  DenseProblem p{};
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.out = out.typed_data();
  p.s = s.typed_data();
  p.z = z.typed_data();
  p.g = g.typed_data();
  p.dq = dq->typed_data();
  p.dk = dk->typed_data();
  p.dv = dv->typed_data();
  p.feature = feature;
  p.eps = eps;
  return RunItems<Pass<DenseLinear, true>::Of>(pool, q, p);
}

// ---------------------------------------------------------------------------------------------
// bf16 matmul on AMX tiles: c[M, N] (float32) = op(a)[M, K] . op(b)[K, N], a and b bfloat16,
// op() an optional transpose (the backward pass's products). Why: XLA:CPU has no AMX path, and
// on a CPU with AMX-BF16 its bf16 GEMMs run at a fraction of torch's oneDNN
// (benchmarks/results/amx_matmul/).
//
// b is packed once per call into the tiles' pair-interleaved layout, zero-padded to multiples of
// 32. A work item is up to kItemRows rows of c; K is taken in chunks of kChunk so that a chunk of
// b (kChunk x N) stays in L2 while every 32-row block of the item uses it: with the weight
// gradient's K of 8,192+ tokens, one pass over K per 32 rows read all of b from memory 48 times
// (MiniLM's output layer). Each 32 x 32 block of c is four 16 x 16 float32 tiles.

constexpr int64_t kChunk = 512;    // K per chunk
constexpr int64_t kItemRows = 128;  // rows of c per work item, at most

struct MatmulProblem {
  const uint16_t* a;
  const uint16_t* b;         // batched: each item packs its own matrix of b
  const uint16_t* b_packed;  // one matrix: packed once for all items
  float* c;
  uint16_t* c16;             // instead of c: the results rounded to bf16
  const float* bias;         // with c16: GELU(a b + bias) instead, the bias padded to np
  int64_t m, n, k, kp, np;   // kp, np: K and N rounded up to 32
  bool transpose_a, transpose_b;
  int64_t batch;             // > 1: one item per matrix of the batch
  int64_t item_rows;         // one matrix: a multiple of 32, at most kItemRows
  int64_t items;
};

struct AmxAttentionProblem {  // softmax(scale q k^T + key_bias) v, bf16 q, k, v
  const uint16_t *q, *k, *v;
  const float* key_bias;
  float* out;
  int64_t items, t, h, d;  // items = N * H
  float scale;
};

// erf by the rational approximation XLA and Eigen use for float32 (odd degree-13 numerator,
// even degree-8 denominator, argument clamped to [-4, 4], where erf is 1 to float precision).
inline v16 Erf(v16 x) {
  x = x > 4.0f ? splat(4.0f) : x;
  x = x < -4.0f ? splat(-4.0f) : x;
  const v16 x2 = x * x;
  v16 p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  v16 q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}

// The exact (erf) GELU, as BERT's "gelu" computes it.
inline v16 Gelu(v16 x) { return 0.5f * x * (1.0f + Erf(x * 0.707106781186547524f)); }

// float32 to bf16, rounding to nearest even as XLA's convert does.
inline void RoundToBf16(v16 x, uint16_t* out) {
#if defined(HW2JAX_AMX) && defined(__AVX512BF16__)  // immintrin.h is included for AMX builds
  __m512 packed;
  std::memcpy(&packed, &x, sizeof packed);
  const __m256bh rounded = _mm512_cvtneps_pbh(packed);  // one instruction, the same rounding
  std::memcpy(out, &rounded, 32);
#else
  typedef uint32_t vu16 __attribute__((vector_size(64)));
  vu16 bits;
  std::memcpy(&bits, &x, sizeof bits);
  const vu16 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  for (int i = 0; i < kLanes; ++i) out[i] = static_cast<uint16_t>(rounded[i]);
#endif
}

#ifdef HW2JAX_AMX
// Linux hands out AMX's 8 KiB of tile state only to processes that ask (once per process).
bool AmxPermitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                        18 /* XFEATURE_XTILEDATA */) == 0;
  return permitted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// op(b) [K, N] into [N/32][K/32][two 16-column halves][16 row pairs][16 columns][2]: each
// 16 x 16-pair tile is 1 KiB, contiguous; rows kk and kk + 1 of a pair interleave.
void PackB(const uint16_t* b, int64_t k, int64_t n, bool transpose, int64_t kp, int64_t np,
           uint16_t* out) {
  std::memset(out, 0, kp * np * 2);
  // A pair of rows is one 32-bit word per column: the word of column c, rows k0 and k0 + 1.
  uint32_t* words = reinterpret_cast<uint32_t*>(out);
  auto word_at = [&](int64_t k0, int64_t c) {
    return words + ((c / 32) * (kp / 32) + k0 / 32) * 512 + ((c % 32) / 16) * 256 +
           ((k0 % 32) / 2) * 16 + c % 16;
  };
  if (!transpose) {  // rows of b are rows of op(b): interleave two rows, 16 columns at a time
    for (int64_t k0 = 0; k0 < k; k0 += 2) {
      const uint16_t* even = b + k0 * n;
      const uint16_t* odd = k0 + 1 < k ? even + n : nullptr;
      for (int64_t c0 = 0; c0 < n; c0 += 16) {
        uint32_t* dst = word_at(k0, c0);
        const int64_t len = std::min<int64_t>(16, n - c0);
        if (odd != nullptr) {
          for (int64_t i = 0; i < len; ++i)
            dst[i] = even[c0 + i] | (static_cast<uint32_t>(odd[c0 + i]) << 16);
        } else {
          for (int64_t i = 0; i < len; ++i) dst[i] = even[c0 + i];
        }
      }
    }
    return;
  }
  for (int64_t c = 0; c < n; ++c) {  // b is [N, K]: a row's neighbours are already a pair
    const uint16_t* row = b + c * k;
    for (int64_t k0 = 0; k0 + 1 < k; k0 += 2) std::memcpy(word_at(k0, c), row + k0, 4);
    if (k % 2 == 1) *word_at(k - 1, c) = row[k - 1];
  }
}

// All eight tiles as 16 rows of 64 bytes (16 floats, or 32 bf16), for this thread.
inline void LoadTileConfig() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);
}

// The four accumulator tiles (0-3) as a 32 x 32 block of floats at c, ld floats apart, and back.
inline void StoreBlock(float* c, int64_t ld) {
  _tile_stored(0, c, ld * 4);
  _tile_stored(1, c + 16, ld * 4);
  _tile_stored(2, c + 16 * ld, ld * 4);
  _tile_stored(3, c + 16 * ld + 16, ld * 4);
}

inline void LoadBlock(const float* c, int64_t ld) {
  _tile_loadd(0, c, ld * 4);
  _tile_loadd(1, c + 16, ld * 4);
  _tile_loadd(2, c + 16 * ld, ld * 4);
  _tile_loadd(3, c + 16 * ld + 16, ld * 4);
}

// One worker per thread: tiles 0-3 accumulate c, 4-5 hold a's two 16-row halves, 6-7 b's two
// 16-column halves.
template <int>
class AmxRowBlocks {
 public:
  explicit AmxRowBlocks(const MatmulProblem& p)
      : p_(p),
        a_((p.item_rows * kChunk * 2 + 3) / 4),
        acc_(p.kp > kChunk ? p.item_rows * p.np : 0),
        b_(p.batch > 1 ? (p.kp * p.np * 2 + 3) / 4 : 0),
        tail_(32 * 32) {
    LoadTileConfig();
  }
  ~AmxRowBlocks() { _tile_release(); }

  void Run(int64_t item) {
    if (p_.batch == 1) {
      a_base_ = p_.a;
      c_base_ = p_.c;
      c16_base_ = p_.c16;
      b_base_ = p_.b_packed;
      const int64_t m0 = item * p_.item_rows;
      return Rows(m0, std::min(p_.item_rows, p_.m - m0));
    }
    a_base_ = p_.a + item * p_.m * p_.k;
    c_base_ = p_.c + item * p_.m * p_.n;
    c16_base_ = p_.c16 + item * p_.m * p_.n;
    uint16_t* packed = reinterpret_cast<uint16_t*>(b_.ptr);
    PackB(p_.b + item * p_.k * p_.n, p_.k, p_.n, p_.transpose_b, p_.kp, p_.np, packed);
    b_base_ = packed;
    for (int64_t m0 = 0; m0 < p_.m; m0 += p_.item_rows)
      Rows(m0, std::min(p_.item_rows, p_.m - m0));
  }

 private:
  // Rows m0 .. m0 + rows (at most item_rows) of the current matrix of c.
  void Rows(int64_t m0, int64_t rows) {
    const bool chunked = p_.kp > kChunk;  // then c accumulates in acc_ between chunks
    // Whole rows of an untransposed a whose K is a multiple of 32 load straight from a.
    const bool direct = !p_.transpose_a && p_.k == p_.kp;
    for (int64_t k0 = 0; k0 < p_.kp; k0 += kChunk) {
      const int64_t kc = std::min(kChunk, p_.kp - k0);
      for (int64_t r0 = 0; r0 < rows; r0 += 32) {
        const int64_t block_rows = std::min<int64_t>(32, rows - r0);
        if (!direct || block_rows < 32) PackRows(m0 + r0, block_rows, k0, kc, Packed(r0));
      }
      for (int64_t nb = 0; nb < p_.np / 32; ++nb) {
        const uint16_t* b = b_base_ + (nb * (p_.kp / 32) + k0 / 32) * 1024;
        for (int64_t r0 = 0; r0 < rows; r0 += 32) {
          const int64_t block_rows = std::min<int64_t>(32, rows - r0);
          const bool from_a = direct && block_rows == 32;
          const uint16_t* a = from_a ? a_base_ + (m0 + r0) * p_.k + k0 : Packed(r0);
          const int64_t stride = from_a ? p_.k * 2 : kChunk * 2;
          float* acc = chunked ? acc_.ptr + r0 * p_.np + nb * 32 : nullptr;
          if (k0 == 0) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else {
            LoadBlock(acc, p_.np);
          }
          for (int64_t kb = 0; kb < kc / 32; ++kb) {
            _tile_loadd(4, a + kb * 32, stride);
            _tile_loadd(5, a + 16 * stride / 2 + kb * 32, stride);
            _tile_loadd(6, b + kb * 1024, 64);
            _tile_loadd(7, b + kb * 1024 + 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
          if (k0 + kc < p_.kp) {
            StoreBlock(acc, p_.np);
          } else {
            Store(m0 + r0, block_rows, nb * 32);
          }
        }
      }
    }
  }

  uint16_t* Packed(int64_t r0) const {
    return reinterpret_cast<uint16_t*>(a_.ptr) + r0 * kChunk;
  }

  // The four accumulators into c's rows m0.., columns n0.. (through a 32 x 32 buffer at the
  // edges).
  void Store(int64_t m0, int64_t rows, int64_t n0) {
    const int64_t cols = std::min<int64_t>(32, p_.n - n0);
    if (p_.c16 != nullptr) return StoreBf16(m0, rows, n0, cols);
    if (rows == 32 && cols == 32) return StoreBlock(c_base_ + m0 * p_.n + n0, p_.n);
    StoreBlock(tail_.ptr, 32);
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(c_base_ + (m0 + r) * p_.n + n0, tail_.ptr + r * 32, cols * 4);
  }

  // The same block rounded to bf16 (with a bias, as bf16 GELU(c + bias)) while it is in L1:
  // the float32 product never reaches memory.
  void StoreBf16(int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
    StoreBlock(tail_.ptr, 32);
    uint16_t half[kLanes];
    for (int64_t r = 0; r < rows; ++r) {
      uint16_t* out = c16_base_ + (m0 + r) * p_.n + n0;
      for (int64_t h = 0; h < cols; h += kLanes) {
        const v16 x = load(tail_.ptr + r * 32 + h);
        RoundToBf16(p_.bias != nullptr ? Gelu(x + load(p_.bias + n0 + h)) : x, half);
        std::memcpy(out + h, half, std::min<int64_t>(kLanes, cols - h) * 2);
      }
    }
  }

  // Rows m0 .. m0 + rows of op(a), columns k0 .. k0 + kc, as 32 rows of kChunk values, zeros
  // past the ends.
  void PackRows(int64_t m0, int64_t rows, int64_t k0, int64_t kc, uint16_t* out) const {
    std::memset(out, 0, 32 * kChunk * 2);
    const int64_t k_end = std::min(kc, p_.k - k0);
    if (!p_.transpose_a) {
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(out + r * kChunk, a_base_ + (m0 + r) * p_.k + k0, k_end * 2);
      return;
    }
    // a is [K, M]: row kk holds column kk of op(a). Two of its rows make one 32-bit word of
    // each packed row.
    uint32_t* words = reinterpret_cast<uint32_t*>(out);
    for (int64_t kk = 0; kk < k_end; kk += 2) {
      const uint16_t* even = a_base_ + (k0 + kk) * p_.m + m0;
      const uint16_t* odd = kk + 1 < k_end ? even + p_.m : nullptr;
      uint32_t* dst = words + kk / 2;
      if (odd != nullptr) {
        for (int64_t r = 0; r < rows; ++r)
          dst[r * (kChunk / 2)] = even[r] | (static_cast<uint32_t>(odd[r]) << 16);
      } else {
        for (int64_t r = 0; r < rows; ++r) dst[r * (kChunk / 2)] = even[r];
      }
    }
  }

  const MatmulProblem& p_;
  Aligned a_, acc_, b_, tail_;
  const uint16_t* a_base_ = nullptr;  // the current matrix of a, packed b and c
  const uint16_t* b_base_ = nullptr;
  float* c_base_ = nullptr;
  uint16_t* c16_base_ = nullptr;
};

// BERT's attention in bf16, one (sequence, head) per item: q, k and v packed into tiles, then
// per 16 query rows the scores on the tiles, the softmax with the key bias in float32, the
// probabilities rounded to bf16 (as torch's bf16 attention rounds them) and multiplied by v on
// the tiles. Keys are padded to 64 with a bias of -inf, the head dim to 32 with zeros.
template <int kVecs>  // D / 16
class AmxRowAttention {
 public:
  explicit AmxRowAttention(const AmxAttentionProblem& p)
      : p_(p),
        tp_((p.t + 63) / 64 * 64),
        dp_((p.d + 31) / 32 * 32),
        q_((tp_ * dp_ + 1) / 2),
        kt_((tp_ * dp_ + 1) / 2),
        v_((tp_ * p.d + 1) / 2),
        pr_(16 * tp_ / 2),
        s_(16 * tp_),
        o_(16 * p.d),
        bias_(tp_) {
    LoadTileConfig();
  }
  ~AmxRowAttention() { _tile_release(); }

  void Run(int64_t item) {
    const int64_t n = item / p_.h, head = item % p_.h, t = p_.t, d = p_.d, row = p_.h * d;
    const int64_t base = (n * t * p_.h + head) * d;  // element (n, 0, head, 0)
    Pack(p_.q + base, p_.k + base, p_.v + base, row);
    for (int64_t j = 0; j < tp_; ++j)
      bias_.ptr[j] = j < t ? p_.key_bias[n * t + j] : -INFINITY;
    for (int64_t q0 = 0; q0 < t; q0 += 16) {
      Scores(q0);
      float inv_sum[16];
      Softmax(inv_sum);
      Values();
      for (int64_t r = 0; r < std::min<int64_t>(16, t - q0); ++r) {
        float* out = p_.out + base + (q0 + r) * row;
        for (int64_t c = 0; c < d; ++c) out[c] = o_.ptr[r * d + c] * inv_sum[r];
      }
    }
  }

 private:
  uint16_t* Half(const Aligned& a) const { return reinterpret_cast<uint16_t*>(a.ptr); }

  // q as [tp, dp] rows; k as the B tiles of its transpose (16 keys x 32 of D, in pairs along
  // D); v as the B tiles of [32 keys x 16 of D] (in pairs along keys); zeros past the ends.
  void Pack(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t row) {
    const int64_t t = p_.t, d = p_.d, chunks = dp_ / 32, blocks = d / 16;
    uint16_t *qp = Half(q_), *kp = Half(kt_), *vp = Half(v_);
    std::memset(qp, 0, tp_ * dp_ * 2);
    std::memset(kp, 0, tp_ * dp_ * 2);
    std::memset(vp, 0, tp_ * d * 2);
    // Pairs of bf16 move as one 32-bit word: k's pairs along D, v's pairs of keys.
    uint32_t *kt32 = reinterpret_cast<uint32_t*>(kp), *vt32 = reinterpret_cast<uint32_t*>(vp);
    for (int64_t j = 0; j < t; ++j) {
      std::memcpy(qp + j * dp_, q + j * row, d * 2);
      uint32_t pairs[64];  // d / 2 <= 64
      std::memcpy(pairs, k + j * row, d * 2);
      uint32_t* kt = kt32 + (j / 16) * chunks * 256 + (j % 16);
      for (int64_t c = 0; c < d / 2; ++c) kt[(c / 16) * 256 + (c % 16) * 16] = pairs[c];
    }
    for (int64_t j = 0; j < t; j += 2) {
      const uint16_t* even = v + j * row;
      const uint16_t* odd = j + 1 < t ? even + row : nullptr;
      uint32_t* vt = vt32 + (j / 32) * blocks * 256 + ((j % 32) / 2) * 16;
      for (int64_t c = 0; c < d; ++c)
        vt[(c / 16) * 256 + (c % 16)] = even[c] | (odd ? uint32_t(odd[c]) << 16 : 0u);
    }
  }

  // The 16 x tp scores of query rows q0.., four blocks of 16 keys at a time.
  void Scores(int64_t q0) {
    const int64_t chunks = dp_ / 32;
    const uint16_t* qp = Half(q_) + q0 * dp_;
    for (int64_t k0 = 0; k0 < tp_; k0 += 64) {
      const uint16_t* kt = Half(kt_) + (k0 / 16) * chunks * 512;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t c = 0; c < chunks; ++c) {
        _tile_loadd(4, qp + c * 32, dp_ * 2);
        _tile_loadd(5, kt + c * 512, 64);
        _tile_loadd(6, kt + (chunks + c) * 512, 64);
        _tile_loadd(7, kt + (2 * chunks + c) * 512, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
        _tile_dpbf16ps(2, 4, 7);
        _tile_loadd(5, kt + (3 * chunks + c) * 512, 64);
        _tile_dpbf16ps(3, 4, 5);
      }
      _tile_stored(0, s_.ptr + k0, tp_ * 4);
      _tile_stored(1, s_.ptr + k0 + 16, tp_ * 4);
      _tile_stored(2, s_.ptr + k0 + 32, tp_ * 4);
      _tile_stored(3, s_.ptr + k0 + 48, tp_ * 4);
    }
  }

  // Each row's exp(scale s + bias - max) into pr_ as bf16, and 1 / its float32 sum.
  void Softmax(float* inv_sum) {
    for (int r = 0; r < 16; ++r) {
      float* row = s_.ptr + r * tp_;
      v16 m = splat(-INFINITY);
      for (int64_t j = 0; j < tp_; j += kLanes) {
        const v16 x = load(row + j) * p_.scale + load(bias_.ptr + j);
        store(row + j, x);
        m = x > m ? x : m;
      }
      const v16 mx = splat(hmax(m));
      v16 sum = splat(0.0f);
      for (int64_t j = 0; j < tp_; j += kLanes) {
        const v16 e = exp_nonpositive(load(row + j) - mx);
        sum += e;
        RoundToBf16(e, Half(pr_) + r * tp_ + j);
      }
      inv_sum[r] = 1.0f / hsum(sum);
    }
  }

  // The 16 x d products of the rounded probabilities and v, 16 columns at a time.
  void Values() {
    const int64_t blocks = p_.d / 16;
    for (int64_t b = 0; b < blocks; ++b) {
      _tile_zero(0);
      for (int64_t k0 = 0; k0 < tp_; k0 += 32) {
        _tile_loadd(4, Half(pr_) + k0, tp_ * 2);
        _tile_loadd(5, Half(v_) + ((k0 / 32) * blocks + b) * 512, 64);
        _tile_dpbf16ps(0, 4, 5);
      }
      _tile_stored(0, o_.ptr + b * 16, p_.d * 4);
    }
  }

  const AmxAttentionProblem& p_;
  const int64_t tp_, dp_;
  Aligned q_, kt_, v_, pr_, s_, o_, bias_;
};

// Packs b (one matrix) and runs the items on the calling thread and XLA's pool.
ffi::Error Multiply(ffi::ThreadPool& pool, MatmulProblem p) {
  const int64_t blocks = (p.m + 31) / 32, threads = std::max<int64_t>(1, pool.num_threads());
  Aligned packed(p.batch == 1 ? (p.kp * p.np * 2 + 3) / 4 : 0);
  if (p.batch == 1) {
    PackB(p.b, p.k, p.n, p.transpose_b, p.kp, p.np, reinterpret_cast<uint16_t*>(packed.ptr));
    p.b_packed = reinterpret_cast<const uint16_t*>(packed.ptr);
    // Items of up to kItemRows rows, but at least one per thread where c has the rows.
    p.item_rows = 32 * std::clamp<int64_t>(blocks / threads, 1, kItemRows / 32);
    p.items = (p.m + p.item_rows - 1) / p.item_rows;
  } else {
    p.item_rows = 32 * std::min<int64_t>(blocks, kItemRows / 32);
    p.items = p.batch;
  }
  auto job = std::make_shared<Job<MatmulProblem>>();
  job->problem = p;
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, p.items - 1);
  for (int64_t i = 0; i < helpers; ++i)
    pool.Schedule([job] { DrainJob<AmxRowBlocks, 0, MatmulProblem>(*job); });
  DrainJob<AmxRowBlocks, 0, MatmulProblem>(*job);
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == job->problem.items; });
  return ffi::Error::Success();
}

#else
bool AmxPermitted() { return false; }
#endif

// op(a) op(b) for 2-D a and b, or for each matrix of 3-D ones, into c: float32, or with
// kType = BF16 rounded to bf16 as it leaves the tiles.
template <ffi::DataType kType>
ffi::Error MatmulCall(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                      int32_t transpose_a, int32_t transpose_b, ffi::ResultBuffer<kType> c) {
#ifndef HW2JAX_AMX
  return ffi::Error(ffi::ErrorCode::kUnavailable, "this kernel build has no AMX-BF16");
#else
  if (!AmxPermitted())
    return ffi::Error(ffi::ErrorCode::kUnavailable, "Linux refused this process AMX's tiles");
  const auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  const size_t rank = da.size();
  if ((rank != 2 && rank != 3) || db.size() != rank || dc.size() != rank)
    return ffi::Error::InvalidArgument("a, b and c must all be 2-D, or all 3-D (batched)");
  MatmulProblem p{};
  p.batch = rank == 3 ? da[0] : 1;
  if (rank == 3 && (db[0] != p.batch || dc[0] != p.batch))
    return ffi::Error::InvalidArgument("a, b and c must have the same batch");
  const int64_t r = rank - 2;  // the first matrix axis
  p.m = transpose_a ? da[r + 1] : da[r];
  p.k = transpose_a ? da[r] : da[r + 1];
  p.n = transpose_b ? db[r] : db[r + 1];
  if ((transpose_b ? db[r + 1] : db[r]) != p.k || dc[r] != p.m || dc[r + 1] != p.n)
    return ffi::Error::InvalidArgument("the shapes of a, b and c do not match");
  if (p.m == 0 || p.n == 0 || p.batch == 0) return ffi::Error::Success();
  if (p.k == 0) {
    std::memset(c->untyped_data(), 0, c->size_bytes());
    return ffi::Error::Success();
  }
  p.kp = (p.k + 31) / 32 * 32;
  p.np = (p.n + 31) / 32 * 32;
  p.a = reinterpret_cast<const uint16_t*>(a.typed_data());
  p.b = reinterpret_cast<const uint16_t*>(b.typed_data());
  if constexpr (kType == ffi::DataType::F32) {
    p.c = c->typed_data();
  } else {
    p.c16 = reinterpret_cast<uint16_t*>(c->typed_data());
  }
  p.transpose_a = transpose_a != 0;
  p.transpose_b = transpose_b != 0;
  return Multiply(pool, p);
#endif
}

ffi::Error AmxAttentionCall(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q,
                            ffi::Buffer<ffi::BF16> k, ffi::Buffer<ffi::BF16> v,
                            ffi::Buffer<ffi::F32> key_bias, float scale,
                            ffi::ResultBuffer<ffi::F32> out) {
#ifndef HW2JAX_AMX
  return ffi::Error(ffi::ErrorCode::kUnavailable, "this kernel build has no AMX-BF16");
#else
  if (!AmxPermitted())
    return ffi::Error(ffi::ErrorCode::kUnavailable, "Linux refused this process AMX's tiles");
  if (ffi::Error error = CheckRowInputs(q, k, v, key_bias); error.failure()) return error;
  AmxAttentionProblem p{reinterpret_cast<const uint16_t*>(q.typed_data()),
                        reinterpret_cast<const uint16_t*>(k.typed_data()),
                        reinterpret_cast<const uint16_t*>(v.typed_data()),
                        key_bias.typed_data(),
                        out->typed_data(),
                        0, 0, 0, 0, scale};
  return RunItems<AmxRowAttention>(pool, q, p);
#endif
}

// bf16 GELU(a b + bias) for a [M, K], b [K, N] and a float32 bias [N]: BERT's intermediate
// layer and its GELU, the product's float32 result kept in L1.
ffi::Error MatmulGeluCall(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a,
                          ffi::Buffer<ffi::BF16> b, ffi::Buffer<ffi::F32> bias,
                          ffi::ResultBuffer<ffi::BF16> c) {
#ifndef HW2JAX_AMX
  return ffi::Error(ffi::ErrorCode::kUnavailable, "this kernel build has no AMX-BF16");
#else
  if (!AmxPermitted())
    return ffi::Error(ffi::ErrorCode::kUnavailable, "Linux refused this process AMX's tiles");
  const auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2 || bias.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("a, b and c must be 2-D and the bias 1-D");
  MatmulProblem p{};
  p.batch = 1;
  p.m = da[0];
  p.k = da[1];
  p.n = db[1];
  if (db[0] != p.k || dc[0] != p.m || dc[1] != p.n || bias.dimensions()[0] != p.n)
    return ffi::Error::InvalidArgument("the shapes of a, b, the bias and c do not match");
  if (p.k == 0) return ffi::Error::InvalidArgument("the contracted axis is empty");
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  p.kp = (p.k + 31) / 32 * 32;
  p.np = (p.n + 31) / 32 * 32;
  Aligned padded(p.np);  // loads of 16 past N stay inside
  std::memset(padded.ptr, 0, p.np * 4);
  std::memcpy(padded.ptr, bias.typed_data(), p.n * 4);
  p.a = reinterpret_cast<const uint16_t*>(a.typed_data());
  p.b = reinterpret_cast<const uint16_t*>(b.typed_data());
  p.c16 = reinterpret_cast<uint16_t*>(c->typed_data());
  p.bias = padded.ptr;
  return Multiply(pool, p);
#endif
}

// ---- The float32 peak: independent multiply-add chains ----
//
// "Achieved against peak" needs the rate these cores reach at the clock they run, which no file
// reports (a hypervisor's "cpu MHz" is the nominal clock; boost goes past it). Each item runs
// kChains chains of a <- a x + y, 16 lanes wide, in registers: enough to fill both FMA units
// for their latency. The result is each item's final value, the mean over chains and lanes.

struct PeakProblem {
  const float* start;  // a_0 per item
  float* out;
  int64_t items, iterations;
  float x, y;
};

#ifdef __AVX512F__
constexpr int kPeakChains = 12;  // 2 units x 4 cycles of latency, and room
#else
constexpr int kPeakChains = 6;   // 12 of AVX2's 16 registers (a v16 is two)
#endif

template <int>
class FmaChains {
 public:
  explicit FmaChains(const PeakProblem& p) : p_(p) {}

  void Run(int64_t item) {
    v16 a[kPeakChains];
    for (int c = 0; c < kPeakChains; ++c) a[c] = splat(p_.start[item]);
    const v16 x = splat(p_.x), y = splat(p_.y);
    for (int64_t i = 0; i < p_.iterations; ++i) {
      for (int c = 0; c < kPeakChains; ++c) a[c] = a[c] * x + y;
      asm volatile("");  // keeps the iterations in order: no chain runs alone
    }
    v16 sum{};
    for (int c = 0; c < kPeakChains; ++c) sum += a[c];
    p_.out[item] = hsum(sum) / (kPeakChains * kLanes);
  }

 private:
  const PeakProblem& p_;
};

ffi::Error FmaPeakCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> start, int64_t iterations,
                       float x, float y, ffi::ResultBuffer<ffi::F32> out,
                       ffi::ResultBuffer<ffi::F32> lanes) {
  if (iterations < 0) return ffi::Error::InvalidArgument("iterations must be at least 0");
  PeakProblem p{start.typed_data(), out->typed_data(),
                static_cast<int64_t>(start.element_count()), iterations, x, y};
  lanes->typed_data()[0] = kPeakChains * kLanes;  // multiply-adds per item per iteration
  if (p.items > 0) RunJob(pool, DrainJob<FmaChains, 0, PeakProblem>, p);
  return ffi::Error::Success();
}

// ---- Softmax attention over a few keys that are also the values ----
//
// out = softmax(q kv^T) kv per sequence, q [M, D], kv [N, D] with N <= 64: the ViT's regrouped
// heads (hw2jax.models.vit.Attention), 4 heads x 50 tokens of query rows against 50 tokens. At
// that size a flash kernel's blocks are mostly padding and XLA runs six separate passes over
// [M, N] arrays; here one sequence's scores stay in L1: kv^T is packed once into [D, N padded
// to 16] and each block of query rows goes scores -> softmax -> probabilities . kv in registers.
// The forward keeps the probabilities [M, N] for the backward, which is
// dS = P * (G kv^T - rowsum(P * G kv^T)), dq = dS kv, dkv = dS^T q + P^T G.

struct FewKeysProblem {
  const float *q, *kv, *p, *g;  // p, g: backward only
  float *out, *p_w;             // forward's results: out [B, M, D], p_w [B, M, N]
  float *dq, *dkv;              // backward's results
  int64_t items, m, n, d;
};

inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }

// Every lane = the maximum (sum) of x's lanes.
inline v16 all_max(v16 x) {
  x = vmax(x, __builtin_shuffle(x, vi16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  x = vmax(x, __builtin_shuffle(x, vi16{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
  x = vmax(x, __builtin_shuffle(x, vi16{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
  return vmax(x, __builtin_shuffle(x, vi16{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
}

inline v16 all_sum(v16 x) {
  x += __builtin_shuffle(x, vi16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  x += __builtin_shuffle(x, vi16{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  x += __builtin_shuffle(x, vi16{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  return x + __builtin_shuffle(x, vi16{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
}

// acc[r] = a[r, :K] . bt, bt [K, kCols * 16] (a row-major with leading dimension lda).
template <int kCols, int kR>
inline void RowsTimesPacked(const float* a, int64_t lda, const float* bt, int64_t k_len,
                            v16 (&acc)[kR][kCols]) {
  for (int r = 0; r < kR; ++r)
    for (int j = 0; j < kCols; ++j) acc[r][j] = v16{};
  for (int64_t k = 0; k < k_len; ++k) {
    v16 b[kCols];
    for (int j = 0; j < kCols; ++j) b[j] = load(bt + k * kCols * kLanes + j * kLanes);
    for (int r = 0; r < kR; ++r) {
      const v16 s = splat(a[r * lda + k]);
      for (int j = 0; j < kCols; ++j) acc[r][j] += s * b[j];
    }
  }
}

template <int kDV, int kKV>  // D / 16, ceil(N / 16)
class FewKeys {
  static constexpr int kD = kDV * kLanes, kNP = kKV * kLanes;
  static constexpr int kR = kDV >= 8 ? 3 : 6;  // query rows per block: <= 24 accumulators
  static constexpr int kC = kDV >= 8 ? 2 : 5;  // dkv rows per block: <= 20 accumulators

 public:
  explicit FewKeys(const FewKeysProblem& p)
      : p_(p), kvt_(kD * kNP), s_(p.m * kNP), ds_(p.m * kNP) {
    for (int j = 0; j < kKV; ++j)
      for (int l = 0; l < kLanes; ++l) pad_[j][l] = j * kLanes + l < p.n ? 0.0f : -INFINITY;
  }

  void Forward(int64_t item) {
    Pack(item);
    const float* q = p_.q + item * p_.m * kD;
    float* out = p_.out + item * p_.m * kD;
    float* p = p_.p_w + item * p_.m * p_.n;
    int64_t i = 0;
    for (; i + kR <= p_.m; i += kR) ForwardRows<kR>(q, out, p, i);
    for (; i < p_.m; ++i) ForwardRows<1>(q, out, p, i);
  }

  void Backward(int64_t item) {
    Pack(item);
    const int64_t m = p_.m, n = p_.n;
    const float* p = p_.p + item * m * n;
    for (int64_t i = 0; i < m; ++i) {  // P into rows padded with zeros
      std::memcpy(s_.ptr + i * kNP, p + i * n, sizeof(float) * n);
      std::memset(s_.ptr + i * kNP + n, 0, sizeof(float) * (kNP - n));
    }
    const float* g = p_.g + item * m * kD;
    float* dq = p_.dq + item * m * kD;
    int64_t i = 0;
    for (; i + kR <= m; i += kR) BackwardRows<kR>(g, dq, i);
    for (; i < m; ++i) BackwardRows<1>(g, dq, i);
    const float* q = p_.q + item * m * kD;
    float* dkv = p_.dkv + item * n * kD;
    int64_t j = 0;
    for (; j + kC <= n; j += kC) KeyRows<kC>(q, g, dkv, j);
    for (; j < n; ++j) KeyRows<1>(q, g, dkv, j);
  }

 private:
  void Pack(int64_t item) {  // kv^T, zero past N
    kv_ = p_.kv + item * p_.n * kD;
    std::memset(kvt_.ptr, 0, sizeof(float) * kD * kNP);
    for (int64_t j = 0; j < p_.n; ++j)
      for (int c = 0; c < kD; ++c) kvt_.ptr[c * kNP + j] = kv_[j * kD + c];
  }

  // R rows of a [., kNP] tile times kv [N, D].
  template <int R>
  void TimesKv(const float* rows, float* out) {
    v16 acc[R][kDV];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kDV; ++c) acc[r][c] = v16{};
    for (int64_t j = 0; j < p_.n; ++j) {
      v16 b[kDV];
      for (int c = 0; c < kDV; ++c) b[c] = load(kv_ + j * kD + c * kLanes);
      for (int r = 0; r < R; ++r) {
        const v16 s = splat(rows[r * kNP + j]);
        for (int c = 0; c < kDV; ++c) acc[r][c] += s * b[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kDV; ++c) store(out + r * kD + c * kLanes, acc[r][c]);
  }

  template <int R>
  void ForwardRows(const float* q, float* out, float* p, int64_t i0) {
    v16 acc[R][kKV];
    RowsTimesPacked<kKV, R>(q + i0 * kD, kD, kvt_.ptr, kD, acc);
    float* s = s_.ptr + i0 * kNP;
    for (int r = 0; r < R; ++r) {
      v16 mx = acc[r][0] + pad_[0];
      for (int j = 0; j < kKV; ++j) {
        acc[r][j] += pad_[j];
        mx = vmax(mx, acc[r][j]);
      }
      mx = all_max(mx);
      v16 sum{};
      for (int j = 0; j < kKV; ++j) {
        acc[r][j] = exp_nonpositive(acc[r][j] - mx);
        sum += acc[r][j];
      }
      const v16 inv = 1.0f / all_sum(sum);
      for (int j = 0; j < kKV; ++j) store(s + r * kNP + j * kLanes, acc[r][j] * inv);
      std::memcpy(p + (i0 + r) * p_.n, s + r * kNP, sizeof(float) * p_.n);
    }
    TimesKv<R>(s, out + i0 * kD);
  }

  template <int R>
  void BackwardRows(const float* g, float* dq, int64_t i0) {
    v16 acc[R][kKV];  // G kv^T
    RowsTimesPacked<kKV, R>(g + i0 * kD, kD, kvt_.ptr, kD, acc);
    const float* p = s_.ptr + i0 * kNP;
    float* ds = ds_.ptr + i0 * kNP;
    for (int r = 0; r < R; ++r) {
      v16 delta{};
      for (int j = 0; j < kKV; ++j) delta += load(p + r * kNP + j * kLanes) * acc[r][j];
      delta = all_sum(delta);
      for (int j = 0; j < kKV; ++j)
        store(ds + r * kNP + j * kLanes, load(p + r * kNP + j * kLanes) * (acc[r][j] - delta));
    }
    TimesKv<R>(ds, dq + i0 * kD);
  }

  // dkv rows j0 .. j0 + C: sum over query rows i of dS[i, j] q[i] + P[i, j] G[i].
  template <int C>
  void KeyRows(const float* q, const float* g, float* dkv, int64_t j0) {
    v16 acc[C][kDV];
    for (int r = 0; r < C; ++r)
      for (int c = 0; c < kDV; ++c) acc[r][c] = v16{};
    for (int64_t i = 0; i < p_.m; ++i) {
      v16 a[kDV], b[kDV];
      for (int c = 0; c < kDV; ++c) {
        a[c] = load(q + i * kD + c * kLanes);
        b[c] = load(g + i * kD + c * kLanes);
      }
      const float* ds = ds_.ptr + i * kNP + j0;
      const float* p = s_.ptr + i * kNP + j0;
      for (int r = 0; r < C; ++r) {
        const v16 sd = splat(ds[r]), sp = splat(p[r]);
        for (int c = 0; c < kDV; ++c) acc[r][c] += sd * a[c] + sp * b[c];
      }
    }
    for (int r = 0; r < C; ++r)
      for (int c = 0; c < kDV; ++c) store(dkv + (j0 + r) * kD + c * kLanes, acc[r][c]);
  }

  const FewKeysProblem& p_;
  const float* kv_ = nullptr;  // this item's kv [N, D]
  Aligned kvt_, s_, ds_;
  v16 pad_[kKV];
};

template <int kCode>  // D / 16 * 8 + ceil(N / 16)
class FewKeysForward {
 public:
  explicit FewKeysForward(const FewKeysProblem& p) : k_(p) {}
  void Run(int64_t item) { k_.Forward(item); }

 private:
  FewKeys<kCode / 8, kCode % 8> k_;
};

template <int kCode>
class FewKeysBackward {
 public:
  explicit FewKeysBackward(const FewKeysProblem& p) : k_(p) {}
  void Run(int64_t item) { k_.Backward(item); }

 private:
  FewKeys<kCode / 8, kCode % 8> k_;
};

template <template <int> class Worker, int kDV>
void (*FewKeysDrainFor(int64_t key_vecs))(Job<FewKeysProblem>&) {
  switch (key_vecs) {
    case 1: return DrainJob<Worker, kDV * 8 + 1, FewKeysProblem>;
    case 2: return DrainJob<Worker, kDV * 8 + 2, FewKeysProblem>;
    case 3: return DrainJob<Worker, kDV * 8 + 3, FewKeysProblem>;
    case 4: return DrainJob<Worker, kDV * 8 + 4, FewKeysProblem>;
    default: return nullptr;
  }
}

template <template <int> class Worker>
void (*FewKeysDrainFor(int64_t d, int64_t n))(Job<FewKeysProblem>&) {
  const int64_t key_vecs = (n + kLanes - 1) / kLanes;
  switch (d) {
    case 16: return FewKeysDrainFor<Worker, 1>(key_vecs);
    case 32: return FewKeysDrainFor<Worker, 2>(key_vecs);
    case 64: return FewKeysDrainFor<Worker, 4>(key_vecs);
    case 128: return FewKeysDrainFor<Worker, 8>(key_vecs);
    default: return nullptr;
  }
}

// q [B, M, D] and kv [B, N, D] with D in {16, 32, 64, 128} and 1 <= N <= 64.
ffi::Error FewKeysShapes(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& kv,
                         FewKeysProblem& p) {
  const auto dq = q.dimensions(), dkv = kv.dimensions();
  if (dq.size() != 3 || dkv.size() != 3 || dq[0] != dkv[0] || dq[2] != dkv[2])
    return ffi::Error::InvalidArgument("q must be [B, M, D] and kv [B, N, D]");
  p.items = dq[0];
  p.m = dq[1];
  p.n = dkv[1];
  p.d = dq[2];
  if (p.n < 1 || p.n > 4 * kLanes)
    return ffi::Error::InvalidArgument("kv must have 1 to 64 rows");
  return ffi::Error::Success();
}

template <template <int> class Worker>
ffi::Error RunFewKeys(ffi::ThreadPool& pool, const FewKeysProblem& p) {
  auto drain = FewKeysDrainFor<Worker>(p.d, p.n);
  if (drain == nullptr) return ffi::Error::InvalidArgument("D must be 16, 32, 64 or 128");
  if (p.items == 0 || p.m == 0) return ffi::Error::Success();
  RunJob(pool, drain, p);
  return ffi::Error::Success();
}

ffi::Error FewKeysForwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::F32> kv, ffi::ResultBuffer<ffi::F32> out,
                              ffi::ResultBuffer<ffi::F32> probs) {
  FewKeysProblem p{q.typed_data(), kv.typed_data(), nullptr, nullptr, out->typed_data(),
                   probs->typed_data(), nullptr, nullptr};
  if (ffi::Error error = FewKeysShapes(q, kv, p); error.failure()) return error;
  return RunFewKeys<FewKeysForward>(pool, p);
}

ffi::Error FewKeysBackwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> kv, ffi::Buffer<ffi::F32> probs,
                               ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dq,
                               ffi::ResultBuffer<ffi::F32> dkv) {
  FewKeysProblem p{q.typed_data(), kv.typed_data(), probs.typed_data(), g.typed_data(),
                   nullptr, nullptr, dq->typed_data(), dkv->typed_data()};
  if (ffi::Error error = FewKeysShapes(q, kv, p); error.failure()) return error;
  if (probs.element_count() != p.items * p.m * p.n || g.element_count() != q.element_count())
    return ffi::Error::InvalidArgument("probs must be [B, M, N] and g [B, M, D]");
  return RunFewKeys<FewKeysBackward>(pool, p);
}

// ---- Layer norm over the last axis, forward and backward ----
//
// XLA splits a layer norm into reductions, elementwise passes and, where a weight gradient
// wants the output transposed, a second transposed evaluation: in the float32 ViT step about a
// fifth of the op time (benchmarks/NOTES.md). Here one pass over each row forward (keeping its
// mean and 1 / std) and one backward, rows in blocks on XLA's threads. C, the row length, is a
// multiple of 16.

struct LayerNormProblem {
  const float *x, *gamma, *beta, *mean, *rstd, *dy;  // mean, rstd, dy: backward only
  float *y, *mean_w, *rstd_w;                         // forward's results (y or y16)
  float *dx, *partials;                               // backward's: dx, [items, 2, C] sums
  int64_t items, rows, c;
  float eps;
  uint16_t* y16;  // the forward's result rounded to bf16 instead of y
};

constexpr int64_t kNormRows = 64;  // rows per item

template <int kUnused>
class LayerNormForward {
 public:
  explicit LayerNormForward(const LayerNormProblem& p) : p_(p) {}

  void Run(int64_t item) {
    const int64_t c = p_.c, r1 = std::min(p_.rows, (item + 1) * kNormRows);
    const float inv_c = 1.0f / static_cast<float>(c);
    for (int64_t r = item * kNormRows; r < r1; ++r) {
      const float* x = p_.x + r * c;
      v16 sum{};
      for (int64_t j = 0; j < c; j += kLanes) sum += load(x + j);
      const v16 mean = all_sum(sum) * inv_c;
      v16 squares{};
      for (int64_t j = 0; j < c; j += kLanes) {
        const v16 d = load(x + j) - mean;
        squares += d * d;
      }
      const float rstd = 1.0f / std::sqrt(all_sum(squares)[0] * inv_c + p_.eps);
      for (int64_t j = 0; j < c; j += kLanes) {
        const v16 y = (load(x + j) - mean) * rstd * load(p_.gamma + j) + load(p_.beta + j);
        if (p_.y16 != nullptr)
          RoundToBf16(y, p_.y16 + r * c + j);
        else
          store(p_.y + r * c + j, y);
      }
      p_.mean_w[r] = mean[0];
      p_.rstd_w[r] = rstd;
    }
  }

 private:
  const LayerNormProblem& p_;
};

template <int kUnused>
class LayerNormBackward {
 public:
  explicit LayerNormBackward(const LayerNormProblem& p) : p_(p) {}

  void Run(int64_t item) {
    const int64_t c = p_.c, r1 = std::min(p_.rows, (item + 1) * kNormRows);
    const float inv_c = 1.0f / static_cast<float>(c);
    float* dgamma = p_.partials + item * 2 * c;
    float* dbeta = dgamma + c;
    std::memset(dgamma, 0, sizeof(float) * 2 * c);
    for (int64_t r = item * kNormRows; r < r1; ++r) {
      const float *x = p_.x + r * c, *dy = p_.dy + r * c;
      const v16 mean = splat(p_.mean[r]), rstd = splat(p_.rstd[r]);
      v16 sum_g{}, sum_gx{};
      for (int64_t j = 0; j < c; j += kLanes) {
        const v16 xhat = (load(x + j) - mean) * rstd, g = load(dy + j) * load(p_.gamma + j);
        sum_g += g;
        sum_gx += g * xhat;
      }
      const v16 a = all_sum(sum_g) * inv_c, b = all_sum(sum_gx) * inv_c;
      float* dx = p_.dx + r * c;
      for (int64_t j = 0; j < c; j += kLanes) {
        const v16 xhat = (load(x + j) - mean) * rstd, d = load(dy + j);
        store(dx + j, rstd * (d * load(p_.gamma + j) - a - xhat * b));
        store(dgamma + j, load(dgamma + j) + d * xhat);
        store(dbeta + j, load(dbeta + j) + d);
      }
    }
  }

 private:
  const LayerNormProblem& p_;
};

// The row kernels' shapes: x [..., C] with C a multiple of 16 and `vector` [C] (gamma, bias);
// fills the row length, the rows and the items of `per_item` rows each.
ffi::Error RowShapes(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& vector,
                     int64_t per_item, int64_t& c, int64_t& rows, int64_t& items) {
  const auto dims = x.dimensions();
  if (dims.size() < 1 || dims[dims.size() - 1] % kLanes != 0 || dims[dims.size() - 1] == 0)
    return ffi::Error::InvalidArgument("x's last axis must be a positive multiple of 16");
  c = dims[dims.size() - 1];
  if (vector.element_count() != c)
    return ffi::Error::InvalidArgument("gamma and the bias must be [C], x's last axis");
  rows = x.element_count() / c;
  items = (rows + per_item - 1) / per_item;
  return ffi::Error::Success();
}

ffi::Error LayerNormShapes(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& gamma,
                           LayerNormProblem& p) {
  return RowShapes(x, gamma, kNormRows, p.c, p.rows, p.items);
}

// The forward with y float32 (kOut F32) or rounded to bf16 (kOut BF16).
template <ffi::DataType kOut>
ffi::Error LayerNormForwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> gamma, ffi::Buffer<ffi::F32> beta,
                                float eps, ffi::ResultBuffer<kOut> y,
                                ffi::ResultBuffer<ffi::F32> mean,
                                ffi::ResultBuffer<ffi::F32> rstd) {
  LayerNormProblem p{x.typed_data(), gamma.typed_data(), beta.typed_data(), nullptr, nullptr,
                     nullptr, nullptr, mean->typed_data(), rstd->typed_data()};
  if constexpr (kOut == ffi::DataType::BF16)
    p.y16 = reinterpret_cast<uint16_t*>(y->typed_data());
  else
    p.y = y->typed_data();
  p.eps = eps;
  if (ffi::Error error = LayerNormShapes(x, gamma, p); error.failure()) return error;
  if (beta.element_count() != p.c)
    return ffi::Error::InvalidArgument("gamma and the bias must be [C], x's last axis");
  if (p.items > 0) RunJob(pool, DrainJob<LayerNormForward, 0, LayerNormProblem>, p);
  return ffi::Error::Success();
}

ffi::Error LayerNormBackwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> gamma, ffi::Buffer<ffi::F32> mean,
                                 ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                                 ffi::ResultBuffer<ffi::F32> dx,
                                 ffi::ResultBuffer<ffi::F32> dgamma,
                                 ffi::ResultBuffer<ffi::F32> dbeta) {
  LayerNormProblem p{x.typed_data(), gamma.typed_data(), nullptr, mean.typed_data(),
                     rstd.typed_data(), dy.typed_data(), nullptr, nullptr, nullptr,
                     dx->typed_data()};
  if (ffi::Error error = LayerNormShapes(x, gamma, p); error.failure()) return error;
  if (dy.element_count() != x.element_count() || mean.element_count() != p.rows ||
      rstd.element_count() != p.rows)
    return ffi::Error::InvalidArgument("dy must be x's shape and mean, rstd one per row");
  Aligned partials(std::max<int64_t>(1, p.items) * 2 * p.c);
  p.partials = partials.ptr;
  if (p.items > 0) RunJob(pool, DrainJob<LayerNormBackward, 0, LayerNormProblem>, p);
  float *dg = dgamma->typed_data(), *db = dbeta->typed_data();
  std::memset(dg, 0, sizeof(float) * p.c);
  std::memset(db, 0, sizeof(float) * p.c);
  for (int64_t i = 0; i < p.items; ++i)  // in item order: the same sums whatever the threads
    for (int64_t j = 0; j < p.c; ++j) {
      dg[j] += partials.ptr[i * 2 * p.c + j];
      db[j] += partials.ptr[i * 2 * p.c + p.c + j];
    }
  return ffi::Error::Success();
}

// ---- GELU(x + bias), float32 ----
//
// BERT's intermediate layer after its float32 product: XLA runs this exact-erf GELU as one
// loop on one thread (about 11 ms a layer on MiniLM's 8,192 x 1,536, benchmarks/NOTES.md);
// here rows in blocks on XLA's threads.

struct BiasGeluProblem {
  const float *x, *bias;
  float* y;
  int64_t items, rows, n;
};

constexpr int64_t kGeluRows = 32;  // rows per item

template <int kUnused>
class BiasGelu {
 public:
  explicit BiasGelu(const BiasGeluProblem& p) : p_(p) {}

  void Run(int64_t item) {
    const int64_t n = p_.n, r1 = std::min(p_.rows, (item + 1) * kGeluRows);
    for (int64_t r = item * kGeluRows; r < r1; ++r)
      for (int64_t j = 0; j < n; j += kLanes)
        store(p_.y + r * n + j, Gelu(load(p_.x + r * n + j) + load(p_.bias + j)));
  }

 private:
  const BiasGeluProblem& p_;
};

ffi::Error BiasGeluCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias,
                        ffi::ResultBuffer<ffi::F32> y) {
  BiasGeluProblem p{x.typed_data(), bias.typed_data(), y->typed_data()};
  if (ffi::Error error = RowShapes(x, bias, kGeluRows, p.n, p.rows, p.items); error.failure())
    return error;
  if (p.items > 0) RunJob(pool, DrainJob<BiasGelu, 0, BiasGeluProblem>, p);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // key_bias
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuFlashForward, FlashForwardCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse [N, H, T]

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuFlashBackward, FlashBackwardCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuLinearForward, LinearForwardCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // fq
                                  .Arg<ffi::Buffer<ffi::F32>>()  // fk
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Ret<ffi::Buffer<ffi::F32>>()   // num
                                  .Ret<ffi::Buffer<ffi::F32>>());  // den [N, T, H]

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuLinearBackward, LinearBackwardCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // fq
                                  .Arg<ffi::Buffer<ffi::F32>>()  // fk
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_num
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_den [N, T, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d fq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d fk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d v

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuDenseLinearForward, DenseForwardCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Attr<int32_t>("feature")
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // S [N, H, D, D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // z [N, H, D]

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuDenseLinearBackward, DenseBackwardCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // S
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Attr<int32_t>("feature")
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuAmxMatmul, MatmulCall<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // a
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // b
                                  .Attr<int32_t>("transpose_a")
                                  .Attr<int32_t>("transpose_b")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // c

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuAmxMatmulBf16, MatmulCall<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // a
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // b
                                  .Attr<int32_t>("transpose_a")
                                  .Attr<int32_t>("transpose_b")
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // c

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuAmxAttention, AmxAttentionCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // q
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // k
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // key_bias
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuAmxMatmulGelu, MatmulGeluCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // a
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // c

// 1 where the bf16 matmul can run here, 0 where Linux refuses this process the tiles, -1 where
// this build has no AMX-BF16 (its -march build failed and a generic one was made): checked from
// Python before the kernel is chosen.
extern "C" int Hw2jaxAmxAvailable() {
#ifdef HW2JAX_AMX
  return AmxPermitted() ? 1 : 0;
#else
  return -1;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuFewKeysForward, FewKeysForwardCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kv
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // probabilities

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuFewKeysBackward, FewKeysBackwardCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kv
                                  .Arg<ffi::Buffer<ffi::F32>>()   // probabilities
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d q
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d kv

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuLayerNormForward,
                              LayerNormForwardCall<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [..., C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gamma [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // beta [C]
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean [...]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // 1 / std [...]

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuLayerNormForwardBf16,
                              LayerNormForwardCall<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [..., C]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // gamma [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // beta [C]
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::BF16>>()   // y, rounded to bf16
                                  .Ret<ffi::Buffer<ffi::F32>>()    // mean [...]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // 1 / std [...]

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuLayerNormBackward, LayerNormBackwardCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gamma
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()   // 1 / std
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d gamma
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d beta

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuBiasGelu, BiasGeluCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [..., N]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias [N]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // GELU(x + bias)

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuFmaPeak, FmaPeakCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // a_0 per item [items]
                                  .Attr<int64_t>("iterations")
                                  .Attr<float>("x")
                                  .Attr<float>("y")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // a_iterations [items]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lanes per iteration [1]
