// Linear attention: causal, by the chunk algorithm, and non-causal with its features fused.
//
// Causal linear attention's product, (num_i, den_i) = (sum_{j<=i} (fq_i . fk_j) v_j,
// sum_{j<=i} fq_i . fk_j), by the chunk algorithm (as hw2jax/attention/linear_pallas.py, which
// sums the states first to run the chunks in parallel on a GPU): exact inside chunks of 64, the
// state S = sum_j fk_j v_j^T and z = sum_j fk_j carried between them in order. fq, fk, v, num
// are [N, T, H, D] (one D for features and values), den [N, T, H].
// The backward pass walks forward for d fq, then in reverse for d fk and d v.
#include "common.h"

namespace {

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
    for (int c = 0; c < kD; c += kRegLanes)
      store(sums + c, load<vreg>(sums + c) + load<vreg>(tile + r * kD + c));
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
      for (int c = 0; c < kD; c += kRegLanes)
        store(out + r * kD + c, load<vreg>(out + r * kD + c) + u[r] * load<vreg>(w + c));
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
inline void Feature(vreg x, int32_t feature, vreg& phi, vreg& slope) {
  const vreg zero{};
  if (feature == 0) {  // elu(x) + 1: x + 1 above 0, exp(x) below
    const vreg e = exp_nonpositive(x < zero ? x : zero);
    phi = x > zero ? x + 1.0f : e;
    slope = x > zero ? splat<vreg>(1.0f) : e;
  } else {  // relu
    phi = x > zero ? x : zero;
    slope = x > zero ? splat<vreg>(1.0f) : zero;
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
        for (int c = 0; c < kD; c += kRegLanes)
          store(p_.out_w + base + (r0 + r) * Stride() + c,
                load<vreg>(c_.ptr + r * kD + c) / den_.ptr[r]);
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
        vreg dot{};
        for (int c = 0; c < kD; c += kRegLanes)
          dot += load<vreg>(b_.ptr + r * kD + c) * load<vreg>(out + c);
        const float inv = 1.0f / den_.ptr[r];
        gd[r] = -hsum(dot) * inv;
        for (int c = 0; c < kD; c += kRegLanes)
          store(b_.ptr + r * kD + c, load<vreg>(b_.ptr + r * kD + c) * inv);
      }
      std::memset(c_.ptr, 0, sizeof(float) * kBlockK * kD);
      AccumulateProduct<kVecs>(b_.ptr, kD, 1, kBlockK, kD, s_t_.ptr, c_.ptr);
      for (int64_t r = 0; r < rows; ++r)
        for (int c = 0; c < kD; c += kRegLanes) {
          const vreg d_phi = load<vreg>(c_.ptr + r * kD + c) + gd[r] * load<vreg>(z_.ptr + c);
          store(p_.dq + base + (r0 + r) * Stride() + c,
                d_phi * load<vreg>(a_slope_.ptr + r * kD + c));
        }
      AccumulateProduct<kVecs>(a_.ptr, 1, kD, kD, rows, b_.ptr, ds.ptr);
      for (int64_t r = 0; r < rows; ++r)
        for (int c = 0; c < kD; c += kRegLanes)
          store(dz.ptr + c, load<vreg>(dz.ptr + c) + gd[r] * load<vreg>(a_.ptr + r * kD + c));
    }
    // Keys and values: d phi(k) = v dS^T + dz, dv = phi(k) dS.
    Transpose<kD>(ds.ptr, ds_t.ptr);
    for (int64_t r0 = 0; r0 < p_.t; r0 += kBlockK) {
      const int64_t rows = Load(p_.k, base, r0, a_.ptr, a_slope_.ptr);
      Load(p_.v, base, r0, b_.ptr, nullptr);
      std::memset(c_.ptr, 0, sizeof(float) * kBlockK * kD);
      AccumulateProduct<kVecs>(b_.ptr, kD, 1, kBlockK, kD, ds_t.ptr, c_.ptr);
      for (int64_t r = 0; r < rows; ++r)
        for (int c = 0; c < kD; c += kRegLanes) {
          const vreg d_phi = load<vreg>(c_.ptr + r * kD + c) + load<vreg>(dz.ptr + c);
          store(p_.dk + base + (r0 + r) * Stride() + c,
                d_phi * load<vreg>(a_slope_.ptr + r * kD + c));
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
  // Rows are Stride() floats apart (heads interleaved): the AVX2 build, with twice the
  // instructions per row, kept too few rows' loads in flight (the non-causal kernels 1.47x
  // faster forward and backward with a prefetch 4 rows ahead); the AVX-512 build's own loads
  // run far enough ahead, and there the prefetches cost 5-10 %
  // (benchmarks/results/zen4/attention_avx2_build/).
  static constexpr bool kPrefetch = !kWideRegisters;
  static constexpr int64_t kAhead = 4;
  int64_t Load(const float* src, int64_t base, int64_t r0, float* tile, float* slope) const {
    const int64_t rows = std::min<int64_t>(kBlockK, p_.t - r0);
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = src + base + (r0 + r) * Stride();
      if (kPrefetch && r + kAhead < rows)
        for (int c = 0; c < kD; c += 16)  // one 64-byte line each
          __builtin_prefetch(row + kAhead * Stride() + c);
      for (int c = 0; c < kD; c += kRegLanes) {
        if (slope == nullptr) {
          store(tile + r * kD + c, load<vreg>(row + c));
          continue;
        }
        vreg phi, dphi;
        Feature(load<vreg>(row + c), p_.feature, phi, dphi);
        store(tile + r * kD + c, phi);
        store(slope + r * kD + c, dphi);
      }
    }
    std::memset(tile + rows * kD, 0, sizeof(float) * (kBlockK - rows) * kD);
    return rows;
  }

  void Denominators(int64_t rows) {  // phi(q) . z + eps for the tile in a_
    for (int64_t r = 0; r < rows; ++r) {
      vreg dot{};
      for (int c = 0; c < kD; c += kRegLanes)
        dot += load<vreg>(a_.ptr + r * kD + c) * load<vreg>(z_.ptr + c);
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

}  // namespace

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
