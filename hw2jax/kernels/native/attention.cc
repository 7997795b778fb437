// Fused softmax attention for XLA:CPU, called from JAX through jax.ffi (hw2jax/kernels/).
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
#include "common.h"

namespace {
struct Problem {
  const float *q, *k, *v, *key_bias;
  float* out;
  int64_t items, t, h, d;  // items = N * H
  float scale;
  // Where not null, [H, D] biases added to q, k and v as they are packed: the projections'
  // biases, which would otherwise take a pass of their own over q, k and v.
  const float *q_bias = nullptr, *k_bias = nullptr, *v_bias = nullptr;
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
    auto of_head = [&](const float* bias) { return bias ? bias + head * kD : nullptr; };
    PackRows<kD>(p_.q, base, stride, t, tp_, p_.scale, q_.ptr, false, of_head(p_.q_bias));
    PackRows<kD>(p_.k, base, stride, t, tp_, 1.0f, kt_.ptr, true, of_head(p_.k_bias));
    PackRows<kD>(p_.v, base, stride, t, tp_, 1.0f, v_.ptr, false, of_head(p_.v_bias));
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
        for (int c = 0; c < kD; c += kRegLanes)
          store(p_.out + base + (i0 + r) * stride + c,
                load<vreg>(o_.ptr + r * kD + c) * inv_sum[r]);
    }
  }

 private:
  static constexpr int kD = kVecs * kLanes;

  // In place: row -> exp(row + bias - max); returns the sum.
  float Softmax(float* row) {
    vreg m = splat<vreg>(-INFINITY);
    for (int64_t j = 0; j < tp_; j += kRegLanes) {
      const vreg x = load<vreg>(row + j) + load<vreg>(bias_.ptr + j);
      store(row + j, x);
      m = x > m ? x : m;
    }
    const float row_max = hmax(m);
    vreg sum{};
    for (int64_t j = 0; j < tp_; j += kRegLanes) {
      const vreg e = exp_nonpositive(load<vreg>(row + j) - row_max);
      store(row + j, e);
      sum += e;
    }
    return hsum(sum);
  }

  const Problem& p_;
  const int64_t tp_;
  Aligned q_, kt_, v_, bias_, s_, o_;
};



// The row kernel; with `biases` (q's, k's and v's, [H, D] each) where not null.
ffi::Error RowAttention(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                        ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::F32>& key_bias, float scale,
                        ffi::ResultBuffer<ffi::F32>& out,
                        const ffi::Buffer<ffi::F32>* biases = nullptr) {
  if (ffi::Error error = CheckRowInputs(q, k, v, key_bias); error.failure()) return error;
  Problem p{q.typed_data(), k.typed_data(), v.typed_data(), key_bias.typed_data(),
            out->typed_data(), 0, 0, 0, 0, scale};  // RunItems fills in the sizes
  if (biases != nullptr) {
    const auto dims = q.dimensions();
    if (!SameCount(biases[0], biases[1], biases[2]) ||
        biases[0].element_count() != dims[dims.size() - 1] * dims[dims.size() - 2])
      return ffi::Error::InvalidArgument("q, k and v's biases must be [heads, D]");
    p.q_bias = biases[0].typed_data();
    p.k_bias = biases[1].typed_data();
    p.v_bias = biases[2].typed_data();
  }
  return RunItems<RowSoftmax>(pool, q, p);
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> key_bias, float scale,
                     ffi::ResultBuffer<ffi::F32> out) {
  return RowAttention(pool, q, k, v, key_bias, scale, out);
}

// The row kernel of q + q_bias, k + k_bias and v + v_bias.
ffi::Error AttentionWithBiases(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::F32> key_bias, ffi::Buffer<ffi::F32> q_bias,
                               ffi::Buffer<ffi::F32> k_bias, ffi::Buffer<ffi::F32> v_bias,
                               float scale, ffi::ResultBuffer<ffi::F32> out) {
  const ffi::Buffer<ffi::F32> biases[] = {q_bias, k_bias, v_bias};
  return RowAttention(pool, q, k, v, key_bias, scale, out, biases);
}

// ---------------------------------------------------------------------------------------------
// Flash attention with gradients: a forward pass that also returns each row's log-sum-exp, and
// a backward pass that recomputes the probabilities block by block from it (FlashAttention-2's
// algorithm). Causal or not, with a key bias [N, T] (BERT's padding mask) and dropout on the
// probabilities; q, k, v, out, dout are [N, T, H, D], lse and the bias gradient [N, H, T].
// One (sequence, head) per thread: the backward accumulates dq over key blocks without atomics.
//
// Dropout keeps entry (i, j) of a (sequence, head) when a hash of its seed and the counter
// i * T + j is at least rate * 2^32 (hw2jax/kernels/dropout.py writes the same hash in jnp, the
// tests in numpy): the backward regenerates the forward's mask, and no [T, T] mask is stored.

struct FlashProblem {
  const float *q, *k, *v, *key_bias, *out, *lse, *dout;  // out, lse, dout: backward only
  const uint32_t* seeds;                                  // [N, H]
  float *out_w, *lse_w;                                   // forward's results
  float *dq, *dk, *dv, *dbias;                            // backward's results
  int64_t items, t, h, d;
  float scale, dropout;
  bool causal;
};

// lowbias32 (Chris Wellons' integer hash): a bijection on 32 bits with full avalanche.
template <class U>
inline U Mix(U x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// One (sequence, head)'s dropout: Factor(counters) is 1 / (1 - rate) where the entry is kept,
// else 0.
class Dropout {
 public:
  Dropout(const FlashProblem& p, int64_t item)
      : on_(p.dropout > 0.0f), seed_(p.seeds[item]), key_(Mix<uint32_t>(seed_ ^ 0x9e3779b9U)),
        threshold_(static_cast<uint32_t>(
            std::min(4294967295.0, std::round(static_cast<double>(p.dropout) * 4294967296.0)))),
        inv_keep_(1.0f / (1.0f - p.dropout)) {}

  bool on() const { return on_; }

  vreg Factor(vureg counters) const {
    const vureg bits = Mix<vureg>(Mix<vureg>(counters ^ key_) ^ seed_);
    return bits >= threshold_ ? splat<vreg>(inv_keep_) : splat<vreg>(0.0f);
  }

  static vureg Iota(uint32_t step) {
    vureg lanes;
    for (int i = 0; i < kRegLanes; ++i) lanes[i] = static_cast<uint32_t>(i) * step;
    return lanes;
  }

 private:
  bool on_;
  uint32_t seed_, key_, threshold_;
  float inv_keep_;
};

// The key bias of (sequence n) into a padded row (padding keys are masked elsewhere).
inline void PackBias(const FlashProblem& p, int64_t n, int64_t tp, float* dst) {
  std::memcpy(dst, p.key_bias + n * p.t, sizeof(float) * p.t);
  std::fill(dst + p.t, dst + tp, 0.0f);
}

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

// The score block is kept transposed, [keys x query rows]: a vector then holds rows, so each
// row's running maximum, sum and rescale factor sit in vector lanes, with no reductions across
// lanes and no scalar exp per row (1.08-1.11x the forward's speed of [rows x keys] blocks, with
// the exp before vscalefps).
template <int kVecs>
class FlashForward {
 public:
  explicit FlashForward(const FlashProblem& p)
      : p_(p), tp_(RoundUp(p.t, kPad)), qt_(kD * tp_), k_(tp_ * kD), v_(tp_ * kD), bias_(tp_),
        s_(kBlockK * kBlockQ), o_(kBlocksPerPass * kBlockQ * kD) {}

  void Run(int64_t item) {
    const int64_t n = item / p_.h, head = item % p_.h, t = p_.t, stride = p_.h * kD;
    const int64_t base = n * t * stride + head * kD;
    PackRows<kD>(p_.q, base, stride, t, tp_, p_.scale, qt_.ptr, true);
    PackRows<kD>(p_.k, base, stride, t, tp_, 1.0f, k_.ptr, false);
    PackRows<kD>(p_.v, base, stride, t, tp_, 1.0f, v_.ptr, false);
    PackBias(p_, n, tp_, bias_.ptr);
    const Dropout dropout(p_, item);
    const vureg row_lanes = Dropout::Iota(static_cast<uint32_t>(t));  // a vector's lanes: rows
    // One pass over k and v serves kBlocksPerPass query blocks: at T = 16,384 k and v fill 8 MiB
    // per item, four times L2, and a pass per block read them from L3 that often.
    for (int64_t i_pass = 0; i_pass < t; i_pass += kBlocksPerPass * kBlockQ) {
      const int blocks =
          static_cast<int>(std::min<int64_t>(kBlocksPerPass, RoundUp(t - i_pass, kBlockQ) /
                                                                 kBlockQ));
      vreg m[kBlocksPerPass][kGroups], l[kBlocksPerPass][kGroups];
      for (int b = 0; b < blocks; ++b)
        for (int g = 0; g < kGroups; ++g) m[b][g] = splat<vreg>(-INFINITY), l[b][g] = vreg{};
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
            store(alpha + g * kRegLanes,
                  Softmax(s + g * kRegLanes, bias_.ptr + j0, m[b][g], l[b][g]));
          if (dropout.on())  // after the sums: dropout weights the values, not the softmax
            for (int j = 0; j < kBlockK; ++j)
              for (int g = 0; g < kGroups; ++g) {
                const uint32_t first = static_cast<uint32_t>((i0 + g * kRegLanes) * t + j0 + j);
                float* at = s + j * kBlockQ + g * kRegLanes;
                store(at, load<vreg>(at) * dropout.Factor(row_lanes + first));
              }
          if (j0 > 0)
            for (int r = 0; r < kBlockQ; ++r)
              if (alpha[r] != 1.0f)
                for (int c = 0; c < kD; c += kRegLanes)
                  store(o + r * kD + c, load<vreg>(o + r * kD + c) * alpha[r]);
          AccumulateProduct<kVecs>(s, 1, kBlockQ, kBlockQ, kBlockK, v_.ptr + j0 * kD, o);
        }
      }
      for (int b = 0; b < blocks; ++b) {
        const int64_t i0 = i_pass + b * kBlockQ;
        alignas(64) float row_max[kBlockQ], row_sum[kBlockQ];
        for (int g = 0; g < kGroups; ++g) {
          store(row_max + g * kRegLanes, m[b][g]);
          store(row_sum + g * kRegLanes, l[b][g]);
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
  static constexpr int kGroups = kBlockQ / kRegLanes;
  static constexpr int kBlocksPerPass = 8;

  // One group of kRegLanes rows, column `col` of a transposed block, `bias` its keys' bias:
  // scores -> exp(score + bias - new max) in place; updates the running max m and sum l, returns
  // the factor that rescales older terms.
  static vreg Softmax(float* col, const float* bias, vreg& m, vreg& l) {
    // two chains
    vreg max0 = load<vreg>(col) + bias[0], max1 = load<vreg>(col + kBlockQ) + bias[1];
    for (int j = 2; j < kBlockK; j += 2) {
      const vreg x0 = load<vreg>(col + j * kBlockQ) + bias[j];
      const vreg x1 = load<vreg>(col + (j + 1) * kBlockQ) + bias[j + 1];
      max0 = x0 > max0 ? x0 : max0;
      max1 = x1 > max1 ? x1 : max1;
    }
    vreg m_new = max0 > max1 ? max0 : max1;
    m_new = m > m_new ? m : m_new;  // finite: key 0 is in every row
    const vreg alpha = exp_nonpositive(m - m_new);
    vreg sum0{}, sum1{};
    for (int j = 0; j < kBlockK; j += 2) {
      const vreg e0 = exp_nonpositive(load<vreg>(col + j * kBlockQ) + (bias[j] - m_new));
      const vreg e1 = exp_nonpositive(load<vreg>(col + (j + 1) * kBlockQ) + (bias[j + 1] - m_new));
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
  Aligned qt_, k_, v_, bias_, s_, o_;
};

template <int kVecs>
class FlashBackward {
 public:
  explicit FlashBackward(const FlashProblem& p)
      : p_(p), tp_(RoundUp(p.t, kPad)), q_(tp_ * kD), k_(tp_ * kD), kt_(kD * tp_),
        vt_(kD * tp_), do_(tp_ * kD), dq_(tp_ * kD), lse_(tp_), delta_(tp_), bias_(tp_),
        dbias_(tp_), p_blk_(kBlockQ * kBlockK), ds_(kBlockQ * kBlockK),
        keep_(kBlockQ * kBlockK), dk_(kBlocksPerPass * kBlockK * kD),
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
    std::memset(dbias_.ptr, 0, sizeof(float) * tp_);
    PackBias(p_, n, tp_, bias_.ptr);
    const Dropout dropout(p_, item);
    const vureg key_lanes = Dropout::Iota(1);  // a vector holds kRegLanes keys
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
    float* keep = keep_.ptr;
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
            for (int j = 0; j < kBlockK; j += kRegLanes)
              store(row + j,
                    exp_nonpositive(load<vreg>(row + j) + (load<vreg>(bias_.ptr + j0 + j) - lse)));
          }
          MaskBlock(pb, i0, j0, t, p_.causal, 0.0f);
          // dv += p'^T . dout, with p' = p * keep / (1 - rate) the probabilities after dropout
          const float* kept = pb;
          if (dropout.on()) {
            for (int r = 0; r < kBlockQ; ++r)
              for (int j = 0; j < kBlockK; j += kRegLanes) {
                const int64_t at = r * kBlockK + j;
                const uint32_t first = static_cast<uint32_t>((i0 + r) * t + j0 + j);
                const vreg factor = dropout.Factor(key_lanes + first);
                store(keep + at, factor);
                store(ds + at, load<vreg>(pb + at) * factor);
              }
            kept = ds;
          }
          AccumulateProduct<kVecs>(kept, 1, kBlockK, kBlockK, kBlockQ, do_.ptr + i0 * kD, dv);
          // dp' = dout . v^T, dp = dp' * keep / (1 - rate), then ds = p * (dp - delta): delta =
          // rowsum(dout * out) = sum_j p_ij dp_ij still, since out = p' . v
          ScoresBlock<kVecs>(do_.ptr + i0 * kD, kBlockQ, PanelOf<kD>(vt_.ptr, j0), kBlockK, 0,
                             kBlockK, ds, kBlockK);
          for (int r = 0; r < kBlockQ; ++r) {
            const float delta = delta_.ptr[i0 + r];
            for (int j = 0; j < kBlockK; j += kRegLanes) {
              const int64_t at = r * kBlockK + j;
              const vreg dp =
                  dropout.on() ? load<vreg>(ds + at) * load<vreg>(keep + at) : load<vreg>(ds + at);
              store(ds + at, load<vreg>(pb + at) * (dp - delta));
            }
          }
          // the bias gradient: each key's column sum of ds
          for (int j = 0; j < kBlockK; j += kRegLanes) {
            vreg sum0 = load<vreg>(ds + j), sum1 = load<vreg>(ds + kBlockK + j);
            for (int r = 2; r < kBlockQ; r += 2) {
              sum0 += load<vreg>(ds + r * kBlockK + j);
              sum1 += load<vreg>(ds + (r + 1) * kBlockK + j);
            }
            store(dbias_.ptr + j0 + j, load<vreg>(dbias_.ptr + j0 + j) + (sum0 + sum1));
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
    std::memcpy(p_.dbias + item * t, dbias_.ptr, sizeof(float) * t);
  }

 private:
  static constexpr int kD = kVecs * kLanes;
  static constexpr int kBlocksPerPass = 8;
  const FlashProblem& p_;
  const int64_t tp_;
  Aligned q_, k_, kt_, vt_, do_, dq_, lse_, delta_, bias_, dbias_, p_blk_, ds_, keep_, dk_, dv_;
};

// The flash kernels' inputs besides q, k, v: key_bias [N, T] and seeds [N, H].
ffi::Error CheckFlashInputs(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& key_bias,
                            const ffi::Buffer<ffi::U32>& seeds, float dropout) {
  const auto dims = q.dimensions();
  if (dims.size() < 3) return ffi::Error::InvalidArgument("q must be [..., T, heads, D]");
  const int64_t h = dims[dims.size() - 2], d = dims[dims.size() - 1];
  if (q.element_count() != 0 && key_bias.element_count() != q.element_count() / (h * d))
    return ffi::Error::InvalidArgument("key_bias must be [..., T]");
  if (q.element_count() != 0 && seeds.element_count() * dims[dims.size() - 3] * d !=
                                    q.element_count())
    return ffi::Error::InvalidArgument("seeds must be [..., heads]");
  if (!(dropout >= 0.0f && dropout < 1.0f))
    return ffi::Error::InvalidArgument("dropout must be in [0, 1)");
  return ffi::Error::Success();
}

ffi::Error FlashForwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::F32> key_bias, ffi::Buffer<ffi::U32> seeds,
                            float scale, int32_t causal, float dropout,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  if (!SameCount(q, k, v))
    return ffi::Error::InvalidArgument("q, k and v must have the same shape");
  if (ffi::Error error = CheckFlashInputs(q, key_bias, seeds, dropout); error.failure())
    return error;
  FlashProblem p{};
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.key_bias = key_bias.typed_data();
  p.seeds = seeds.typed_data();
  p.out_w = out->typed_data();
  p.lse_w = lse->typed_data();
  p.scale = scale;
  p.dropout = dropout;
  p.causal = causal != 0;
  return RunItems<FlashForward>(pool, q, p);
}

ffi::Error FlashBackwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                             ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::F32> key_bias, ffi::Buffer<ffi::U32> seeds,
                             ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> dout, float scale, int32_t causal,
                             float dropout, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                             ffi::ResultBuffer<ffi::F32> dbias) {
  if (!SameCount(q, k, v, out, dout))
    return ffi::Error::InvalidArgument("q, k, v, out and dout must have the same shape");
  if (ffi::Error error = CheckFlashInputs(q, key_bias, seeds, dropout); error.failure())
    return error;
  FlashProblem p{};
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.key_bias = key_bias.typed_data();
  p.seeds = seeds.typed_data();
  p.out = out.typed_data();
  p.lse = lse.typed_data();
  p.dout = dout.typed_data();
  p.dq = dq->typed_data();
  p.dk = dk->typed_data();
  p.dv = dv->typed_data();
  p.dbias = dbias->typed_data();
  p.scale = scale;
  p.dropout = dropout;
  p.causal = causal != 0;
  return RunItems<FlashBackward>(pool, q, p);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuAttentionWithBiases, AttentionWithBiases,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // key_bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q's bias [H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k's bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v's bias
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuFlashForward, FlashForwardCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // key_bias [N, T]
                                  .Arg<ffi::Buffer<ffi::U32>>()  // seeds [N, H]
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("dropout")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse [N, H, T]

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuFlashBackward, FlashBackwardCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // key_bias
                                  .Arg<ffi::Buffer<ffi::U32>>()  // seeds
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("dropout")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dv
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dbias [N, H, T]
