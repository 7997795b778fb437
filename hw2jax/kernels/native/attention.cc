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
#include "common.h"

namespace {
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
