// Softmax attention over a few keys that are also the values.
//
// out = softmax(q kv^T) kv per sequence, q [M, D], kv [N, D] with N <= 64: the ViT's regrouped
// heads (hw2jax.models.vit.Attention), 4 heads x 50 tokens of query rows against 50 tokens. At
// that size a flash kernel's blocks are mostly padding and XLA runs six separate passes over
// [M, N] arrays; here one sequence's scores stay in L1: kv^T is packed once into [D, N padded
// to 16] and each block of query rows goes scores -> softmax -> probabilities . kv in registers.
// The forward keeps the probabilities [M, N] for the backward, which is
// dS = P * (G kv^T - rowsum(P * G kv^T)), dq = dS kv, dkv = dS^T q + P^T G.
#include "common.h"

namespace {

struct FewKeysProblem {
  const float *q, *kv, *p, *g;  // p, g: backward only
  float *out, *p_w;             // forward's results: out [B, M, D], p_w [B, M, N]
  float *dq, *dkv;              // backward's results
  int64_t items, m, n, d;
};


// acc[r] = a[r, :K] . bt, bt [K, kCols vectors] (a row-major with leading dimension lda).
template <int kCols, int kR>
inline void RowsTimesPacked(const float* a, int64_t lda, const float* bt, int64_t k_len,
                            vreg (&acc)[kR][kCols]) {
  for (int r = 0; r < kR; ++r)
    for (int j = 0; j < kCols; ++j) acc[r][j] = vreg{};
  for (int64_t k = 0; k < k_len; ++k) {
    vreg b[kCols];
    for (int j = 0; j < kCols; ++j)
      b[j] = load<vreg>(bt + k * kCols * kRegLanes + j * kRegLanes);
    for (int r = 0; r < kR; ++r) {
      const vreg s = splat<vreg>(a[r * lda + k]);
      for (int j = 0; j < kCols; ++j) acc[r][j] += s * b[j];
    }
  }
}

template <int kDV, int kKV>  // D / 16, ceil(N / 16)
class FewKeys {
  static constexpr int kD = kDV * kLanes, kNP = kKV * kLanes;
  // Vectors of the target's width (common.h's vreg) per row of q and of the scores.
  static constexpr int kDR = kD / kRegLanes, kKR = kNP / kRegLanes;
  // Query rows per block: <= 24 accumulators (AVX-512), <= 12 (AVX2).
  static constexpr int kR =
      kWideRegisters ? (kDV >= 8 ? 3 : 6) : std::max(1, 12 / std::max(kDR, kKR));
  // dkv rows per block: <= 20 accumulators beside q's and g's rows (AVX-512), <= 14 (AVX2).
  static constexpr int kC =
      kWideRegisters ? (kDV >= 8 ? 2 : 5) : std::max(1, (14 - 2 * kDR) / kDR);

 public:
  explicit FewKeys(const FewKeysProblem& p)
      : p_(p), kvt_(kD * kNP), s_(p.m * kNP), ds_(p.m * kNP) {
    for (int j = 0; j < kKR; ++j)
      for (int l = 0; l < kRegLanes; ++l)
        pad_[j][l] = j * kRegLanes + l < p.n ? 0.0f : -INFINITY;
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
    vreg acc[R][kDR];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kDR; ++c) acc[r][c] = vreg{};
    for (int64_t j = 0; j < p_.n; ++j) {
      vreg b[kDR];
      for (int c = 0; c < kDR; ++c) b[c] = load<vreg>(kv_ + j * kD + c * kRegLanes);
      for (int r = 0; r < R; ++r) {
        const vreg s = splat<vreg>(rows[r * kNP + j]);
        for (int c = 0; c < kDR; ++c) acc[r][c] += s * b[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kDR; ++c) store(out + r * kD + c * kRegLanes, acc[r][c]);
  }

  template <int R>
  void ForwardRows(const float* q, float* out, float* p, int64_t i0) {
    vreg acc[R][kKR];
    RowsTimesPacked<kKR, R>(q + i0 * kD, kD, kvt_.ptr, kD, acc);
    float* s = s_.ptr + i0 * kNP;
    for (int r = 0; r < R; ++r) {
      vreg mx = acc[r][0] + pad_[0];
      for (int j = 0; j < kKR; ++j) {
        acc[r][j] += pad_[j];
        mx = vmax(mx, acc[r][j]);
      }
      mx = all_max(mx);
      vreg sum{};
      for (int j = 0; j < kKR; ++j) {
        acc[r][j] = exp_nonpositive(acc[r][j] - mx);
        sum += acc[r][j];
      }
      const vreg inv = 1.0f / all_sum(sum);
      for (int j = 0; j < kKR; ++j) store(s + r * kNP + j * kRegLanes, acc[r][j] * inv);
      std::memcpy(p + (i0 + r) * p_.n, s + r * kNP, sizeof(float) * p_.n);
    }
    TimesKv<R>(s, out + i0 * kD);
  }

  template <int R>
  void BackwardRows(const float* g, float* dq, int64_t i0) {
    vreg acc[R][kKR];  // G kv^T
    RowsTimesPacked<kKR, R>(g + i0 * kD, kD, kvt_.ptr, kD, acc);
    const float* p = s_.ptr + i0 * kNP;
    float* ds = ds_.ptr + i0 * kNP;
    for (int r = 0; r < R; ++r) {
      vreg delta{};
      const float* p_row = p + r * kNP;
      for (int j = 0; j < kKR; ++j) delta += load<vreg>(p_row + j * kRegLanes) * acc[r][j];
      delta = all_sum(delta);
      for (int j = 0; j < kKR; ++j)
        store(ds + r * kNP + j * kRegLanes,
              load<vreg>(p_row + j * kRegLanes) * (acc[r][j] - delta));
    }
    TimesKv<R>(ds, dq + i0 * kD);
  }

  // dkv rows j0 .. j0 + C: sum over query rows i of dS[i, j] q[i] + P[i, j] G[i].
  template <int C>
  void KeyRows(const float* q, const float* g, float* dkv, int64_t j0) {
    vreg acc[C][kDR];
    for (int r = 0; r < C; ++r)
      for (int c = 0; c < kDR; ++c) acc[r][c] = vreg{};
    for (int64_t i = 0; i < p_.m; ++i) {
      vreg a[kDR], b[kDR];
      for (int c = 0; c < kDR; ++c) {
        a[c] = load<vreg>(q + i * kD + c * kRegLanes);
        b[c] = load<vreg>(g + i * kD + c * kRegLanes);
      }
      const float* ds = ds_.ptr + i * kNP + j0;
      const float* p = s_.ptr + i * kNP + j0;
      for (int r = 0; r < C; ++r) {
        const vreg sd = splat<vreg>(ds[r]), sp = splat<vreg>(p[r]);
        for (int c = 0; c < kDR; ++c) acc[r][c] += sd * a[c] + sp * b[c];
      }
    }
    for (int r = 0; r < C; ++r)
      for (int c = 0; c < kDR; ++c) store(dkv + (j0 + r) * kD + c * kRegLanes, acc[r][c]);
  }

  const FewKeysProblem& p_;
  const float* kv_ = nullptr;  // this item's kv [N, D]
  Aligned kvt_, s_, ds_;
  vreg pad_[kKR];
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

}  // namespace

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
