// What the fused CPU kernels share: vectors of the target's width and their exp, the score and
// microkernels, packing, and running items on XLA's intra-op threads. Each kernel file (one per
// kind of op) includes it and is compiled on its own, in parallel (hw2jax/kernels/build.py); the
// files link into one library. Everything here sits in an unnamed namespace: each file gets its
// own copy, and none of it holds state.
#pragma once
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
typedef uint32_t vu16 __attribute__((vector_size(64)));
// 8 floats, one AVX2 register.
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
// The target's own register width, for the microkernels' tiles and loops over values: GCC keeps
// an array of 64-byte vectors in memory where the target has no 64-byte registers, and splits
// their compares and selects into 16-byte pieces. Built for AVX2 with 64-byte vectors, the
// flash kernels ran 35 times slower than with AVX-512 on the same CPU, the GRU kernel 22 times
// slower than XLA's scan (benchmarks/results/zen4/attention_avx2_build/, gru_avx2_build/).
#ifdef __AVX512F__
typedef v16 vreg;
typedef vu16 vureg;
#else
typedef v8 vreg;
typedef vu8 vureg;
#endif
constexpr int kRegLanes = sizeof(vreg) / sizeof(float);

constexpr int kLanes = 16;
constexpr bool kWideRegisters = kRegLanes == kLanes;  // AVX-512's 32 registers, else AVX2's 16
constexpr int kRows = 8;   // score rows per block: 8 x 32 keys = 16 accumulators
constexpr int kKeys = 32;  // keys per score tile (2 vectors)

template <class V = v16>
inline V splat(float x) { return V{} + x; }
template <class V = v16>
inline V load(const float* p) { V r; std::memcpy(&r, p, sizeof r); return r; }
inline void store(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }
inline void store(float* p, v8 x) { std::memcpy(p, &x, sizeof x); }

// exp(r) for |r| <= ln2 / 2: Cephes' expf polynomial (V: a float vector of any width).
template <class V>
inline V ExpReduced(V r) {
  V p = V{} + 1.9875691500e-4f;
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
#endif
// Cephes' expf for x <= 0 in plain vector arithmetic, for vectors V of float and VI of int32
// of any width: x = n ln2 + r, the polynomial at r, times 2^n built in the exponent bits.
template <class V, class VI>
inline V ExpNonpositiveBits(V x) {
  const V lowest = V{} - 87.3365447f;
  const V xc = x < lowest ? lowest : x;
  const V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const V e = ExpReduced(r);
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < lowest ? V{} : e * scale;
}
#ifndef __AVX512F__
inline v16 exp_nonpositive(v16 x) { return ExpNonpositiveBits<v16, vi16>(x); }
#endif
inline v8 exp_nonpositive(v8 x) { return ExpNonpositiveBits<v8, vi8>(x); }

template <class V>
inline float hmax(V x) {
  float m = x[0];
  for (int i = 1; i < int(sizeof x / sizeof m); ++i) m = std::max(m, x[i]);
  return m;
}

template <class V>
inline float hsum(V x) {
  float s = 0.0f;
  for (int i = 0; i < int(sizeof x / sizeof s); ++i) s += x[i];
  return s;
}

struct Aligned {
  explicit Aligned(size_t floats)
      : ptr(static_cast<float*>(std::aligned_alloc(64, ((floats * 4 + 63) / 64) * 64))) {}
  ~Aligned() { std::free(ptr); }
  float* ptr;
};

// Pieces shared by the kernels: score and product microkernels on vectors of the target's
// width, and the packing of one (sequence, head) into padded tiles.

constexpr int kBlockQ = 64;   // query rows per block
constexpr int kBlockK = 64;   // keys per block (a multiple of kKeys)

// The microkernels' tiles: rows by vectors of columns, their accumulators in registers. AVX-512's
// 32 registers hold 8 x 2 score accumulators. AVX2's 16 hold 4 x 3 (12 accumulators, 3 vectors
// of b and a broadcast), with 4 x 2 tiles for what is left: two FMA units of 4 cycles' latency
// (5 on Zen 2) need 8 to 10 independent sums in flight, and 4 x 2 left none to spare.
constexpr int kScoreTileRows = kWideRegisters ? kRows : 4;
constexpr int kScoreTileKeys = 2 * kRegLanes;
static_assert(kRows % kScoreTileRows == 0 && kKeys % kScoreTileKeys == 0, "tiles must nest");

// How many vectors of columns the next tile takes, `left` of an even count remaining: 2 with
// AVX-512; with AVX2, 3 while that leaves an even count of 2 or more, else 2.
constexpr int TileVectors(int64_t left) {
  return kWideRegisters || left == 2 || left == 4 ? 2 : 3;
}

// One tile of ScoresBlock: s[kR x kV vectors] = a[kR x kD] . b, b's row c at b + c * ldb.
template <int kD, int kR, int kV>
inline void ScoresTile(const float* a, const float* b, int64_t ldb, float* s, int64_t lds) {
  vreg acc[kR][kV] = {};
  for (int c = 0; c < kD; ++c) {
    vreg bc[kV];
    for (int v = 0; v < kV; ++v) bc[v] = load<vreg>(b + c * ldb + v * kRegLanes);
    for (int r = 0; r < kR; ++r) {
      const float x = a[r * kD + c];
      for (int v = 0; v < kV; ++v) acc[r][v] += x * bc[v];
    }
  }
  for (int r = 0; r < kR; ++r)
    for (int v = 0; v < kV; ++v) store(s + r * lds + v * kRegLanes, acc[r][v]);
}

// s[rows x cols] = a[rows x D] . bt[D x ...] over keys j0 .. j0 + cols, where bt is stored
// transposed (bt[c * ldb + j]); rows a multiple of kRows, cols of kKeys.
template <int kVecs>
void ScoresBlock(const float* a, int64_t rows, const float* bt, int64_t ldb, int64_t j0,
                 int64_t cols, float* s, int64_t lds) {
  constexpr int kD = kVecs * kLanes;
  const int64_t vectors = cols / kRegLanes;
  for (int64_t r0 = 0; r0 < rows; r0 += kScoreTileRows)
    for (int64_t jv = 0; jv < vectors;) {
      const float* ar = a + r0 * kD;
      const float* b = bt + j0 + jv * kRegLanes;
      float* sr = s + r0 * lds + jv * kRegLanes;
      if (TileVectors(vectors - jv) == 2) {
        ScoresTile<kD, kScoreTileRows, 2>(ar, b, ldb, sr, lds);
        jv += 2;
      } else {
        ScoresTile<kD, kScoreTileRows, 3>(ar, b, ldb, sr, lds);
        jv += 3;
      }
    }
}

// One tile of AccumulateProduct: out[kR x kV vectors] += A . b over k < n, A's element (r, k)
// at a[r * ai + k * ak], b's row k at b + k * kD.
template <int kD, int kR, int kV>
inline void ProductTile(const float* a, int64_t ai, int64_t ak, int64_t n, const float* b,
                        float* out) {
  vreg acc[kR][kV];
  for (int r = 0; r < kR; ++r)
    for (int v = 0; v < kV; ++v) acc[r][v] = load<vreg>(out + r * kD + v * kRegLanes);
  for (int64_t k = 0; k < n; ++k) {
    vreg bk[kV];
    for (int v = 0; v < kV; ++v) bk[v] = load<vreg>(b + k * kD + v * kRegLanes);
    for (int r = 0; r < kR; ++r) {
      const float x = a[r * ai + k * ak];
      for (int v = 0; v < kV; ++v) acc[r][v] += x * bk[v];
    }
  }
  for (int r = 0; r < kR; ++r)
    for (int v = 0; v < kV; ++v) store(out + r * kD + v * kRegLanes, acc[r][v]);
}

// out[rows x D] += A . b[n x D], A's element (i, k) at a[i * ai + k * ak]: with (ai, ak) =
// (ld, 1) that is A . b, with (1, ld) it is A^T . b. rows a multiple of 8. AVX-512 tiles hold
// whole rows in <= 16 accumulators; AVX2's are 4 rows by 3 or 2 vectors.
template <int kVecs>
void AccumulateProduct(const float* a, int64_t ai, int64_t ak, int64_t rows, int64_t n,
                       const float* b, float* out) {
  constexpr int kD = kVecs * kLanes;
  constexpr int kTile = !kWideRegisters ? 4 : kVecs <= 2 ? 8 : kVecs <= 4 ? 4 : 2;
  constexpr int kVectors = kD / kRegLanes;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const float* ar = a + i0 * ai;
    if constexpr (kWideRegisters) {
      ProductTile<kD, kTile, kVecs>(ar, ai, ak, n, b, out + i0 * kD);
    } else {
      for (int cv = 0; cv < kVectors;) {
        float* o = out + i0 * kD + cv * kRegLanes;
        if (TileVectors(kVectors - cv) == 2) {
          ProductTile<kD, kTile, 2>(ar, ai, ak, n, b + cv * kRegLanes, o);
          cv += 2;
        } else {
          ProductTile<kD, kTile, 3>(ar, ai, ak, n, b + cv * kRegLanes, o);
          cv += 3;
        }
      }
    }
  }
}

// Copies one head's [T, D] rows out of an [N, T, H, D] array into a zero-padded [tp, D] tile,
// times `scale`; with `transposed`, into [D, kBlockK] panels, one per key block, each contiguous
// (a [D, tp] matrix would put the rows of a panel tp floats apart, a power of two: they would
// fall into the same cache sets, and at T = 16,384 the panel no longer stays in L1 or L2).
// With `bias` ([D], not null), each row is (row + bias) * scale: a projection's bias added
// here, not in a pass of its own.
template <int kD>
void PackRows(const float* src, int64_t base, int64_t row_stride, int64_t t, int64_t tp,
              float scale, float* dst, bool transposed, const float* bias = nullptr) {
  auto at = [&](int64_t i, int c) {  // no bias: no "+ 0", which would turn -0 into +0
    const float x = src[base + i * row_stride + c];
    return (bias != nullptr ? x + bias[c] : x) * scale;
  };
  if (transposed) {
    for (int64_t i = 0; i < tp; ++i) {
      float* panel = dst + i / kBlockK * (kD * kBlockK) + i % kBlockK;
      for (int c = 0; c < kD; ++c) panel[c * kBlockK] = i < t ? at(i, c) : 0.0f;
    }
  } else {
    for (int64_t i = 0; i < t; ++i)
      for (int c = 0; c < kD; ++c) dst[i * kD + c] = at(i, c);
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
// A dense call's operands: a [M, K], b [K, N], c [M, N] (their dimensions) and a bias [N]
// where has_bias (GELU only with one). Fills m, k and n; an error says what does not fit.
template <class DimsA, class DimsB, class DimsC>
ffi::Error CheckDenseOperands(const DimsA& da, const DimsB& db, const DimsC& dc,
                              const ffi::Buffer<ffi::F32>& bias, int32_t has_bias, int32_t gelu,
                              int64_t& m, int64_t& k, int64_t& n) {
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2 || bias.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("a, b and c must be 2-D and the bias 1-D");
  m = da[0];
  k = da[1];
  n = db[1];
  if (db[0] != k || dc[0] != m || dc[1] != n || (has_bias && bias.dimensions()[0] != n))
    return ffi::Error::InvalidArgument("the shapes of a, b, the bias and c do not match");
  if (gelu && !has_bias) return ffi::Error::InvalidArgument("GELU comes with a bias here");
  if (k == 0) return ffi::Error::InvalidArgument("the contracted axis is empty");
  return ffi::Error::Success();
}

// The bias [n] in `padded` (np floats), zeros past n: a dense call's epilogue loads whole
// vectors, and those past N stay inside.
inline const float* PaddedBias(const ffi::Buffer<ffi::F32>& bias, int64_t n, int64_t np,
                               Aligned& padded) {
  std::memset(padded.ptr, 0, np * 4);
  std::memcpy(padded.ptr, bias.typed_data(), n * 4);
  return padded.ptr;
}

// erf by the rational approximation XLA and Eigen use for float32 (odd degree-13 numerator,
// even degree-8 denominator, argument clamped to [-4, 4], where erf is 1 to float precision).
template <class V>
inline V Erf(V x) {
  x = x > 4.0f ? splat<V>(4.0f) : x;
  x = x < -4.0f ? splat<V>(-4.0f) : x;
  const V x2 = x * x;
  V p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  V q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}

// The exact (erf) GELU, as BERT's "gelu" computes it.
template <class V>
inline V Gelu(V x) { return 0.5f * x * (1.0f + Erf(x * 0.707106781186547524f)); }

// float32 to bf16, rounding to nearest even as XLA's convert does (VU: V's bits, unsigned).
template <class V, class VU>
inline void RoundToBf16Bits(V x, uint16_t* out) {
  VU bits;
  std::memcpy(&bits, &x, sizeof bits);
  const VU rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  for (int i = 0; i < int(sizeof(V) / sizeof(float)); ++i)
    out[i] = static_cast<uint16_t>(rounded[i]);
}

inline void RoundToBf16(v16 x, uint16_t* out) {
#if defined(HW2JAX_AMX) && defined(__AVX512BF16__)  // immintrin.h is included for AMX builds
  __m512 packed;
  std::memcpy(&packed, &x, sizeof packed);
  const __m256bh rounded = _mm512_cvtneps_pbh(packed);  // one instruction, the same rounding
  std::memcpy(out, &rounded, 32);
#else
  RoundToBf16Bits<v16, vu16>(x, out);
#endif
}
inline void RoundToBf16(v8 x, uint16_t* out) { RoundToBf16Bits<v8, vu8>(x, out); }

template <class V>
inline V vmax(V a, V b) { return a > b ? a : b; }

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

inline v8 all_max(v8 x) {
  x = vmax(x, __builtin_shuffle(x, vi8{4, 5, 6, 7, 0, 1, 2, 3}));
  x = vmax(x, __builtin_shuffle(x, vi8{2, 3, 0, 1, 6, 7, 4, 5}));
  return vmax(x, __builtin_shuffle(x, vi8{1, 0, 3, 2, 5, 4, 7, 6}));
}

inline v8 all_sum(v8 x) {
  x += __builtin_shuffle(x, vi8{4, 5, 6, 7, 0, 1, 2, 3});
  x += __builtin_shuffle(x, vi8{2, 3, 0, 1, 6, 7, 4, 5});
  return x + __builtin_shuffle(x, vi8{1, 0, 3, 2, 5, 4, 7, 6});
}

}  // namespace
