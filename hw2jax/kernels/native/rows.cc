// Row-wise kernels: a layer norm over the last axis (forward and backward) and BERT's
// GELU(x + bias); and the float32 peak probe.
//
// Layer norm: XLA splits a layer norm into reductions, elementwise passes and, where a weight gradient
// wants the output transposed, a second transposed evaluation: in the float32 ViT step about a
// fifth of the op time (benchmarks/NOTES.md). Here one pass over each row forward (keeping its
// mean and 1 / std) and one backward, rows in blocks on XLA's threads. C, the row length, is a
// multiple of 16.
#include "common.h"

namespace {

struct LayerNormProblem {
  const float *x, *gamma, *beta, *mean, *rstd, *dy;  // mean, rstd, dy: backward only
  float *y, *mean_w, *rstd_w;                         // forward's results (y or y16)
  float *dx, *partials;                               // backward's: dx, [items, 2, C] sums
  int64_t items, rows, c;
  float eps;
  uint16_t* y16;  // the forward's result rounded to bf16 instead of y
  // The forward of x + (h + h_bias) instead of x, where not null: a layer's product h [rows, C]
  // and its bias [C] join the residual x in the row pass, not in a pass of their own.
  const float *h = nullptr, *h_bias = nullptr;
};

constexpr int64_t kNormRows = 64;  // rows per item

template <int kUnused>
class LayerNormForward {
 public:
  explicit LayerNormForward(const LayerNormProblem& p) : p_(p), sum_(p.h ? p.c : 0) {}

  void Run(int64_t item) {
    const int64_t c = p_.c, r1 = std::min(p_.rows, (item + 1) * kNormRows);
    const float inv_c = 1.0f / static_cast<float>(c);
    for (int64_t r = item * kNormRows; r < r1; ++r) {
      const float* x = p_.x + r * c;
      vreg sum{};
      if (p_.h != nullptr) {  // added in XLA's order: the product and its bias first
        const float* h = p_.h + r * c;
        for (int64_t j = 0; j < c; j += kRegLanes) {
          const vreg s = load<vreg>(x + j) + (load<vreg>(h + j) + load<vreg>(p_.h_bias + j));
          store(sum_.ptr + j, s);
          sum += s;
        }
        x = sum_.ptr;
      } else {
        for (int64_t j = 0; j < c; j += kRegLanes) sum += load<vreg>(x + j);
      }
      const vreg mean = all_sum(sum) * inv_c;
      vreg squares{};
      for (int64_t j = 0; j < c; j += kRegLanes) {
        const vreg d = load<vreg>(x + j) - mean;
        squares += d * d;
      }
      const float rstd = 1.0f / std::sqrt(all_sum(squares)[0] * inv_c + p_.eps);
      for (int64_t j = 0; j < c; j += kRegLanes) {
        const vreg y =
            (load<vreg>(x + j) - mean) * rstd * load<vreg>(p_.gamma + j) + load<vreg>(p_.beta + j);
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
  Aligned sum_;  // one row of x + (h + h_bias)
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
      const vreg mean = splat<vreg>(p_.mean[r]), rstd = splat<vreg>(p_.rstd[r]);
      vreg sum_g{}, sum_gx{};
      for (int64_t j = 0; j < c; j += kRegLanes) {
        const vreg xhat = (load<vreg>(x + j) - mean) * rstd;
        const vreg g = load<vreg>(dy + j) * load<vreg>(p_.gamma + j);
        sum_g += g;
        sum_gx += g * xhat;
      }
      const vreg a = all_sum(sum_g) * inv_c, b = all_sum(sum_gx) * inv_c;
      float* dx = p_.dx + r * c;
      for (int64_t j = 0; j < c; j += kRegLanes) {
        const vreg xhat = (load<vreg>(x + j) - mean) * rstd, d = load<vreg>(dy + j);
        store(dx + j, rstd * (d * load<vreg>(p_.gamma + j) - a - xhat * b));
        store(dgamma + j, load<vreg>(dgamma + j) + d * xhat);
        store(dbeta + j, load<vreg>(dbeta + j) + d);
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

// The forward with y float32 (kOut F32) or rounded to bf16 (kOut BF16), of x + (h + h_bias)
// where h is given.
template <ffi::DataType kOut>
ffi::Error LayerNormForwardOf(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x,
                              const ffi::Buffer<ffi::F32>* h, const ffi::Buffer<ffi::F32>* h_bias,
                              const ffi::Buffer<ffi::F32>& gamma, const ffi::Buffer<ffi::F32>& beta,
                              float eps, ffi::ResultBuffer<kOut>& y,
                              ffi::ResultBuffer<ffi::F32>& mean, ffi::ResultBuffer<ffi::F32>& rstd) {
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
  if (h != nullptr) {
    if (h->element_count() != x.element_count() || h_bias->element_count() != p.c)
      return ffi::Error::InvalidArgument("h must be x's shape and its bias [C]");
    p.h = h->typed_data();
    p.h_bias = h_bias->typed_data();
  }
  if (p.items > 0) RunJob(pool, DrainJob<LayerNormForward, 0, LayerNormProblem>, p);
  return ffi::Error::Success();
}

template <ffi::DataType kOut>
ffi::Error LayerNormForwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> gamma, ffi::Buffer<ffi::F32> beta,
                                float eps, ffi::ResultBuffer<kOut> y,
                                ffi::ResultBuffer<ffi::F32> mean,
                                ffi::ResultBuffer<ffi::F32> rstd) {
  return LayerNormForwardOf<kOut>(pool, x, nullptr, nullptr, gamma, beta, eps, y, mean, rstd);
}

template <ffi::DataType kOut>
ffi::Error AddLayerNormForwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                   ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> h_bias,
                                   ffi::Buffer<ffi::F32> gamma, ffi::Buffer<ffi::F32> beta,
                                   float eps, ffi::ResultBuffer<kOut> y,
                                   ffi::ResultBuffer<ffi::F32> mean,
                                   ffi::ResultBuffer<ffi::F32> rstd) {
  return LayerNormForwardOf<kOut>(pool, x, &h, &h_bias, gamma, beta, eps, y, mean, rstd);
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
      for (int64_t j = 0; j < n; j += kRegLanes)
        store(p_.y + r * n + j, Gelu(load<vreg>(p_.x + r * n + j) + load<vreg>(p_.bias + j)));
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

// 2 FMA units x 4 cycles of latency need 8 chains in flight; 12 leave room. Vectors of the
// target's width: an array of 64-byte vectors on AVX2 stays in memory, and the loop ran at a
// sixteenth of AVX2's rate (benchmarks/results/amx_xeon/fma_peak_avx2/).
constexpr int kPeakChains = 12;

template <int>
class FmaChains {
 public:
  explicit FmaChains(const PeakProblem& p) : p_(p) {}

  void Run(int64_t item) {
    vreg a[kPeakChains];
    for (int c = 0; c < kPeakChains; ++c) a[c] = splat<vreg>(p_.start[item]);
    const vreg x = splat<vreg>(p_.x), y = splat<vreg>(p_.y);
    for (int64_t i = 0; i < p_.iterations; ++i) {
      for (int c = 0; c < kPeakChains; ++c) a[c] = a[c] * x + y;
      asm volatile("");  // keeps the iterations in order: no chain runs alone
    }
    vreg sum{};
    for (int c = 0; c < kPeakChains; ++c) sum += a[c];
    p_.out[item] = hsum(sum) / (kPeakChains * kRegLanes);
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
  lanes->typed_data()[0] = kPeakChains * kRegLanes;  // multiply-adds per item per iteration
  if (p.items > 0) RunJob(pool, DrainJob<FmaChains, 0, PeakProblem>, p);
  return ffi::Error::Success();
}

}  // namespace

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuAddLayerNormForward,
                              AddLayerNormForwardCall<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [..., C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h [..., C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h's bias [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gamma [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // beta [C]
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean [...]
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
