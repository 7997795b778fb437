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

// exp for x <= 0 (scores minus the row maximum): Cephes' expf polynomial after the usual
// x = n ln2 + r reduction; exact 0 below the smallest normal float's exponent.
inline v16 exp_nonpositive(v16 x) {
  const v16 lowest = splat(-87.3365447f);
  const v16 xc = x < lowest ? lowest : x;
  const v16 n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  v16 r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v16 e = p * r * r + r + 1.0f;
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < lowest ? splat(0.0f) : e * scale;
}

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

struct Problem {
  const float *q, *k, *v, *key_bias;
  float* out;
  int64_t items, t, h, d;  // items = N * H
  float scale;
};

// One (sequence, head): packs q (scaled), k^T and v into contiguous tiles padded to whole
// blocks, then for each block of kRows query rows: scores -> softmax -> probs.v.
template <int kVecs>  // D / 16
class Worker {
 public:
  explicit Worker(const Problem& p)
      : p_(p),
        tq_((p.t + kRows - 1) / kRows * kRows),
        tk_((p.t + kKeys - 1) / kKeys * kKeys),
        q_(tq_ * kD), kt_(kD * tk_), v_(tk_ * kD), bias_(tk_), s_(kRows * tk_) {}

  void Run(int64_t item) {
    const int64_t n = item / p_.h, head = item % p_.h, t = p_.t;
    const int64_t row_stride = p_.h * kD;
    const int64_t base = n * t * row_stride + head * kD;
    std::memset(q_.ptr, 0, sizeof(float) * tq_ * kD);
    std::memset(v_.ptr, 0, sizeof(float) * tk_ * kD);
    for (int64_t i = 0; i < t; ++i) {
      const float* qi = p_.q + base + i * row_stride;
      const float* ki = p_.k + base + i * row_stride;
      const float* vi = p_.v + base + i * row_stride;
      for (int c = 0; c < kD; ++c) {
        q_.ptr[i * kD + c] = qi[c] * p_.scale;
        kt_.ptr[c * tk_ + i] = ki[c];
      }
      std::memcpy(v_.ptr + i * kD, vi, sizeof(float) * kD);
    }
    for (int c = 0; c < kD; ++c)
      for (int64_t i = t; i < tk_; ++i) kt_.ptr[c * tk_ + i] = 0.0f;
    std::memcpy(bias_.ptr, p_.key_bias + n * t, sizeof(float) * t);
    for (int64_t i = t; i < tk_; ++i) bias_.ptr[i] = -INFINITY;  // padding keys: weight 0

    for (int64_t i0 = 0; i0 < t; i0 += kRows) {
      Scores(i0);
      float inv_sum[kRows];
      for (int r = 0; r < kRows; ++r) inv_sum[r] = 1.0f / Softmax(s_.ptr + r * tk_);
      Mix(i0, inv_sum, p_.out + base);
    }
  }

 private:
  static constexpr int kD = kVecs * kLanes;
  // Rows of probs.v per pass, a divisor of kRows: keeps the accumulators at 16 or fewer.
  static constexpr int kMixRows = kVecs <= 2 ? kRows : kVecs <= 4 ? 4 : 2;

  void Scores(int64_t i0) {
    const float* q = q_.ptr + i0 * kD;
    for (int64_t j0 = 0; j0 < tk_; j0 += kKeys) {
      v16 acc[kRows][2];
      const v16 b0 = load(bias_.ptr + j0), b1 = load(bias_.ptr + j0 + kLanes);
      for (int r = 0; r < kRows; ++r) { acc[r][0] = b0; acc[r][1] = b1; }
      for (int c = 0; c < kD; ++c) {
        const v16 k0 = load(kt_.ptr + c * tk_ + j0), k1 = load(kt_.ptr + c * tk_ + j0 + kLanes);
        for (int r = 0; r < kRows; ++r) {
          const float qrc = q[r * kD + c];
          acc[r][0] += qrc * k0;
          acc[r][1] += qrc * k1;
        }
      }
      for (int r = 0; r < kRows; ++r) {
        store(s_.ptr + r * tk_ + j0, acc[r][0]);
        store(s_.ptr + r * tk_ + j0 + kLanes, acc[r][1]);
      }
    }
  }

  // In place: row -> exp(row - max); returns the sum.
  float Softmax(float* row) {
    v16 m = load(row);
    for (int64_t j = kLanes; j < tk_; j += kLanes) {
      const v16 x = load(row + j);
      m = x > m ? x : m;
    }
    const float row_max = hmax(m);
    v16 sum{};
    for (int64_t j = 0; j < tk_; j += kLanes) {
      const v16 e = exp_nonpositive(load(row + j) - row_max);
      store(row + j, e);
      sum += e;
    }
    return hsum(sum);
  }

  void Mix(int64_t i0, const float* inv_sum, float* out) {
    const int64_t row_stride = p_.h * kD;
    for (int r0 = 0; r0 < kRows; r0 += kMixRows) {
      v16 acc[kMixRows][kVecs] = {};
      for (int64_t j = 0; j < tk_; ++j) {
        v16 vj[kVecs];
        for (int c = 0; c < kVecs; ++c) vj[c] = load(v_.ptr + j * kD + c * kLanes);
        for (int r = 0; r < kMixRows; ++r) {
          const float prj = s_.ptr[(r0 + r) * tk_ + j];
          for (int c = 0; c < kVecs; ++c) acc[r][c] += prj * vj[c];
        }
      }
      for (int r = 0; r < kMixRows; ++r) {
        const int64_t i = i0 + r0 + r;
        if (i >= p_.t) break;
        for (int c = 0; c < kVecs; ++c)
          store(out + i * row_stride + c * kLanes, acc[r][c] * inv_sum[r0 + r]);
      }
    }
  }

  const Problem& p_;
  const int64_t tq_, tk_;
  Aligned q_, kt_, v_, bias_, s_;
};

// Items handed out through an atomic counter: the calling thread works too, so the call finishes
// even when no pool thread is free; helpers that start late find nothing left and return.
struct Shared {
  Problem problem;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <int kVecs>
void Drain(Shared& s) {
  int64_t i = s.next.fetch_add(1);
  if (i >= s.problem.items) return;  // a late helper: the buffers may already be gone
  Worker<kVecs> worker(s.problem);
  int64_t finished = 0;
  for (; i < s.problem.items; i = s.next.fetch_add(1), ++finished) worker.Run(i);
  if (s.done.fetch_add(finished) + finished == s.problem.items) {
    std::lock_guard<std::mutex> lock(s.mu);
    s.cv.notify_all();
  }
}

using DrainFn = void (*)(Shared&);

DrainFn DrainFor(int64_t d) {
  switch (d) {
    case 16: return Drain<1>;
    case 32: return Drain<2>;
    case 48: return Drain<3>;
    case 64: return Drain<4>;
    case 80: return Drain<5>;
    case 96: return Drain<6>;
    case 112: return Drain<7>;
    case 128: return Drain<8>;
    default: return nullptr;
  }
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> key_bias, float scale,
                     ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = q.dimensions();
  if (dims.size() < 3) return ffi::Error::InvalidArgument("q must be [..., T, heads, D]");
  const int64_t d = dims[dims.size() - 1], h = dims[dims.size() - 2], t = dims[dims.size() - 3];
  if (k.element_count() != q.element_count() || v.element_count() != q.element_count())
    return ffi::Error::InvalidArgument("q, k and v must have the same shape");
  const DrainFn drain = DrainFor(d);
  if (drain == nullptr)
    return ffi::Error::InvalidArgument("head dim must be a multiple of 16, at most 128");
  if (q.element_count() == 0) return ffi::Error::Success();  // nothing to attend over
  const int64_t sequences = q.element_count() / (t * h * d);
  if (key_bias.element_count() != static_cast<size_t>(sequences * t))
    return ffi::Error::InvalidArgument("key_bias must be [..., T]");

  auto shared = std::make_shared<Shared>();
  shared->problem = Problem{q.typed_data(), k.typed_data(), v.typed_data(),
                            key_bias.typed_data(), out->typed_data(), sequences * h, t, h, d,
                            scale};
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->problem.items - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared, drain] { drain(*shared); });
  drain(*shared);
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == shared->problem.items; });
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
