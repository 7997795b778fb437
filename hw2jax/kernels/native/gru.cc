// torch's GRU recurrence over all time steps in one call, forward and backward, for all
// directions of one layer (hw2jax/models/gru.py). XLA runs the recurrence as a while loop whose
// every step is a batched matmul, a few elementwise fusions and the writes of the saved values;
// its gates compile to scalar code when they sit beside the step's dynamic slices
// (benchmarks/results/gru_head/). Here each (direction, block of batch rows) is one item on
// one thread for all T steps: rows never meet across the batch, so the items need no
// synchronisation, and each item's W_hh, packed once per call, stays in its core's L2.
//
// Layouts (time-major, as the model's loop reads them): x_proj [T, D, B, 3H] = W_ih x + b_ih
// (already reversed within each length for the reverse direction), w_hh [D, 3H, H], b_hh
// [D, 3H], valid [B, T] (false past a sequence's end: the state stays, the output is 0).
// Gates in torch's r, z, n order.
#include "common.h"

namespace {

constexpr int kPanel = 32;  // columns per packed weight panel
// The tile's accumulators and the gates are vectors of the target's own width (common.h's
// vreg): with 64-byte vectors the AVX2 build ran 22 times slower than XLA's scan
// (benchmarks/results/zen4/gru_avx2_build/).
#ifdef __AVX512F__
constexpr int kTileRows = 8;  // 8 x 2 accumulators of 32 zmm registers
#else
constexpr int kTileRows = 3;  // 3 x 4 accumulators of 16 ymm registers
#endif
constexpr int kTileVecs = kPanel / kRegLanes;

// A matrix read with strides: element (i, k) at base[i * row + k * col].
struct Strided {
  const float* base;
  int64_t row, col;
};

// c[r, 0:32] = init[r, 0:32] + sum_k a(r, k) b[k * ldb + 0:32], for R rows (init may be c).
// Never inlined: inside the backward pass's loop GCC spilled the AVX2 build's accumulators.
template <int R>
__attribute__((noinline)) void Tile(Strided a, int64_t depth, const float* b, int64_t ldb,
                                    const float* init, int64_t ld_init, float* c, int64_t ldc) {
  vreg acc[R][kTileVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kTileVecs; ++v)
      acc[r][v] = init ? load<vreg>(init + r * ld_init + v * kRegLanes) : vreg{};
  for (int64_t k = 0; k < depth; ++k) {
    vreg bk[kTileVecs];
    for (int v = 0; v < kTileVecs; ++v) bk[v] = load<vreg>(b + k * ldb + v * kRegLanes);
    for (int r = 0; r < R; ++r) {
      const float x = a.base[r * a.row + k * a.col];
      for (int v = 0; v < kTileVecs; ++v) acc[r][v] += x * bk[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kTileVecs; ++v)
      store(c + r * ldc + v * kRegLanes, acc[r][v]);
}

template <int R>
void Tiles(Strided a, int64_t depth, const float* b, int64_t ldb, int64_t panel_step,
           int64_t width, const float* init, int64_t ld_init, float* c, int64_t ldc) {
  for (int64_t p = 0; p * kPanel < width; ++p)
    Tile<R>(a, depth, b + p * panel_step, ldb, init ? init + p * kPanel : nullptr, ld_init,
            c + p * kPanel, ldc);
}

// c[rows, 0:width'] = init + a[rows, 0:depth] . b, width' = width rounded up to kPanel, rows at
// most kTileRows. b's columns come in panels of kPanel, panel_step floats apart, rows ldb
// floats apart: packed panels (ldb = kPanel) or a row-major matrix (panel_step = kPanel) whose
// rows are padded to a multiple of kPanel.
void Product(int rows, Strided a, int64_t depth, const float* b, int64_t ldb, int64_t panel_step,
             int64_t width, const float* init, int64_t ld_init, float* c, int64_t ldc) {
  switch (rows) {
#define HW2JAX_ROWS(R) \
  case R: return Tiles<R>(a, depth, b, ldb, panel_step, width, init, ld_init, c, ldc);
    HW2JAX_ROWS(1) HW2JAX_ROWS(2) HW2JAX_ROWS(3)
#ifdef __AVX512F__
    HW2JAX_ROWS(4) HW2JAX_ROWS(5) HW2JAX_ROWS(6) HW2JAX_ROWS(7) HW2JAX_ROWS(8)
#endif
#undef HW2JAX_ROWS
    default: return;
  }
}

// c[rows, 0:width'] = init + a[rows, 0:depth] . packed panels.
void PanelsProduct(int rows, const float* a, int64_t lda, int64_t depth, const float* panels,
                   int64_t width, const float* init, int64_t ld_init, float* c, int64_t ldc) {
  Product(rows, Strided{a, lda, 1}, depth, panels, kPanel, depth * kPanel, width, init, ld_init,
          c, ldc);
}

// Panels of kPanel columns of m [rows, cols] (transposed: of m^T), each [depth, kPanel] and
// contiguous, zero past the last column.
void PackPanels(const float* m, int64_t rows, int64_t cols, bool transposed, float* panels) {
  const int64_t depth = transposed ? cols : rows, width = transposed ? rows : cols;
  for (int64_t p = 0; p * kPanel < width; ++p)
    for (int64_t k = 0; k < depth; ++k)
      for (int c = 0; c < kPanel; ++c) {
        const int64_t j = p * kPanel + c;
        panels[(p * depth + k) * kPanel + c] =
            j >= width ? 0.0f : transposed ? m[j * cols + k] : m[k * cols + j];
      }
}

inline vreg Sigmoid(vreg x) {
  const vreg e = exp_nonpositive(x > 0.0f ? -x : x);  // exp(-|x|)
  const vreg s = 1.0f / (1.0f + e);
  return x >= 0.0f ? s : e * s;
}

// Eigen's fast float tanh: an odd rational function on [-7.9053, 7.9053], x itself below 4e-4;
// within 4e-7 of tanh (float32 against float64 on 2e6 points of [-9, 9]).
inline vreg Tanh(vreg x) {
  const vreg c = x > 7.90531110763549805f    ? splat<vreg>(7.90531110763549805f)
                : x < -7.90531110763549805f ? splat<vreg>(-7.90531110763549805f)
                                            : x;
  const vreg x2 = c * c;
  vreg p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  vreg q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const vreg small = x < 0.0f ? -x : x;
  return small < 0.0004f ? x : c * p / q;
}

struct GruProblem {
  int64_t t, dirs, batch, hidden, block_rows, blocks, items;
  const float* x_proj;
  const float* b_hh;
  const bool* valid;
  const float* panels;  // per direction: W_hh^T's panels (forward) or W_hh's (backward)
  int64_t panel_floats;
  // forward
  float *out, *h_last, *h_prev, *r, *z, *n, *hp_n;
  // backward
  const float *g_out, *g_h, *s_h_prev, *s_r, *s_z, *s_n, *s_hp_n;
  float *d_xp, *partial_w, *partial_b;  // partial sums of dW_hh and db_hh, one per item
};

int64_t PanelWidth(int64_t cols) { return RoundUp(cols, kPanel); }

template <int>
struct GruForward {
  explicit GruForward(const GruProblem& p)
      : p_(p), h_(p.block_rows * p.hidden), hp_(kTileRows * PanelWidth(3 * p.hidden)) {}

  void Run(int64_t item) {
    const GruProblem& p = p_;
    const int64_t d = item / p.blocks, b0 = item % p.blocks * p.block_rows;
    const int64_t rows = std::min(p.block_rows, p.batch - b0), hid = p.hidden, g3 = 3 * hid;
    const int64_t ldp = PanelWidth(g3);
    const float* panels = p.panels + d * p.panel_floats;
    const float* bias = p.b_hh + d * g3;
    float* h = h_.ptr;
    std::memset(h, 0, sizeof(float) * rows * hid);
    for (int64_t t = 0; t < p.t; ++t) {
      const int64_t at = (t * p.dirs + d) * p.batch + b0;  // row b0 of step t, direction d
      for (int64_t i0 = 0; i0 < rows; i0 += kTileRows) {
        const int tile = static_cast<int>(std::min<int64_t>(kTileRows, rows - i0));
        float* hp = hp_.ptr;
        PanelsProduct(tile, h + i0 * hid, hid, hid, panels, g3, nullptr, 0, hp, ldp);
        for (int i = 0; i < tile; ++i) {
          const int64_t row = at + i0 + i;
          const bool ok = p.valid[(b0 + i0 + i) * p.t + t];
          const float* xp = p.x_proj + row * g3;
          const float* hpi = hp + i * ldp;
          float* hi = h + (i0 + i) * hid;
          for (int64_t j = 0; j < hid; j += kRegLanes) {
            const vreg hr = load<vreg>(hpi + j) + load<vreg>(bias + j);
            const vreg hz = load<vreg>(hpi + hid + j) + load<vreg>(bias + hid + j);
            const vreg hn = load<vreg>(hpi + 2 * hid + j) + load<vreg>(bias + 2 * hid + j);
            const vreg r = Sigmoid(load<vreg>(xp + j) + hr);
            const vreg z = Sigmoid(load<vreg>(xp + hid + j) + hz);
            const vreg n = Tanh(load<vreg>(xp + 2 * hid + j) + r * hn);
            const vreg before = load<vreg>(hi + j);
            const vreg after = (1.0f - z) * n + z * before;
            if (ok) store(hi + j, after);
            store(p.out + row * hid + j, ok ? after : vreg{});
            if (p.h_prev != nullptr) {
              store(p.h_prev + row * hid + j, before);
              store(p.r + row * hid + j, r);
              store(p.z + row * hid + j, z);
              store(p.n + row * hid + j, n);
              store(p.hp_n + row * hid + j, hn);
            }
          }
        }
      }
    }
    std::memcpy(p.h_last + (d * p.batch + b0) * hid, h, sizeof(float) * rows * hid);
  }

  const GruProblem& p_;
  Aligned h_, hp_;
};

template <int>
struct GruBackward {
  explicit GruBackward(const GruProblem& p)
      : p_(p),
        ldh_(PanelWidth(p.hidden)),
        dh_(p.block_rows * ldh_),
        base_(kTileRows * ldh_),
        d_hp_(p.block_rows * 3 * p.hidden),
        h_prev_(p.block_rows * ldh_),
        d_w_(3 * p.hidden * ldh_),
        d_b_(3 * p.hidden) {
    std::memset(base_.ptr, 0, sizeof(float) * kTileRows * ldh_);  // the padding stays 0
    std::memset(h_prev_.ptr, 0, sizeof(float) * p.block_rows * ldh_);
  }

  void Run(int64_t item) {
    const GruProblem& p = p_;
    const int64_t d = item / p.blocks, b0 = item % p.blocks * p.block_rows;
    const int64_t rows = std::min(p.block_rows, p.batch - b0), hid = p.hidden, g3 = 3 * hid;
    const int64_t ldh = ldh_;
    const float* panels = p.panels + d * p.panel_floats;
    float *dh = dh_.ptr, *d_hp = d_hp_.ptr, *h_prev = h_prev_.ptr, *d_w = d_w_.ptr;
    std::memset(d_w, 0, sizeof(float) * g3 * ldh);
    std::memset(d_b_.ptr, 0, sizeof(float) * g3);
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(dh + i * ldh, p.g_h + (d * p.batch + b0 + i) * hid, sizeof(float) * hid);
    for (int64_t t = p.t - 1; t >= 0; --t) {
      const int64_t at = (t * p.dirs + d) * p.batch + b0;
      for (int64_t i0 = 0; i0 < rows; i0 += kTileRows) {
        const int tile = static_cast<int>(std::min<int64_t>(kTileRows, rows - i0));
        float* base = base_.ptr;
        for (int i = 0; i < tile; ++i) {
          const int64_t row = at + i0 + i;
          const bool ok = p.valid[(b0 + i0 + i) * p.t + t];
          const int64_t s = row * hid;
          float* dhi = dh + (i0 + i) * ldh;
          float* dxp = p.d_xp + row * g3;
          float* dhp = d_hp + (i0 + i) * g3;
          for (int64_t j = 0; j < hid; j += kRegLanes) {
            const vreg carried = load<vreg>(dhi + j);
            if (!ok) {  // a frozen step: dh passes straight through, no gradient here
              store(base + i * ldh + j, carried);
              for (int gate = 0; gate < 3; ++gate) {
                store(dxp + gate * hid + j, vreg{});
                store(dhp + gate * hid + j, vreg{});
              }
              continue;
            }
            const vreg dnew = carried + load<vreg>(p.g_out + s + j);
            const vreg r = load<vreg>(p.s_r + s + j), z = load<vreg>(p.s_z + s + j);
            const vreg n = load<vreg>(p.s_n + s + j);
            const vreg dn = dnew * (1.0f - z);
            const vreg da_z = dnew * (load<vreg>(p.s_h_prev + s + j) - n) * z * (1.0f - z);
            const vreg da_n = dn * (1.0f - n * n);
            const vreg da_r = da_n * load<vreg>(p.s_hp_n + s + j) * r * (1.0f - r);
            store(dxp + j, da_r);
            store(dxp + hid + j, da_z);
            store(dxp + 2 * hid + j, da_n);
            store(dhp + j, da_r);
            store(dhp + hid + j, da_z);
            store(dhp + 2 * hid + j, da_n * r);
            store(base + i * ldh + j, dnew * z);
          }
        }
        // dh before this step = base + d(W_hh h + b_hh) . W_hh, over this tile's rows.
        PanelsProduct(tile, d_hp + i0 * g3, g3, g3, panels, hid, base, ldh, dh + i0 * ldh, ldh);
      }
      // dW_hh += d(W_hh h + b_hh)^T . h (the state before the step), db_hh += its column sums:
      // each step's rank-`rows` update while both are in cache.
      for (int64_t i = 0; i < rows; ++i)
        std::memcpy(h_prev + i * ldh, p.s_h_prev + (at + i) * hid, sizeof(float) * hid);
      for (int64_t g = 0; g < g3; g += kRegLanes) {  // the step's sum first: less rounding
        vreg sum = load<vreg>(d_hp + g);
        for (int64_t i = 1; i < rows; ++i) sum += load<vreg>(d_hp + i * g3 + g);
        store(d_b_.ptr + g, load<vreg>(d_b_.ptr + g) + sum);
      }
      for (int64_t g0 = 0; g0 < g3; g0 += kTileRows) {
        const int tile = static_cast<int>(std::min<int64_t>(kTileRows, g3 - g0));
        Product(tile, Strided{d_hp + g0, 1, g3}, rows, h_prev, ldh, kPanel, hid, d_w + g0 * ldh,
                ldh, d_w + g0 * ldh, ldh);
      }
    }
    float* w_out = p.partial_w + item * g3 * hid;
    for (int64_t g = 0; g < g3; ++g) std::memcpy(w_out + g * hid, d_w + g * ldh, sizeof(float) * hid);
    std::memcpy(p.partial_b + item * g3, d_b_.ptr, sizeof(float) * g3);
  }

  const GruProblem& p_;
  const int64_t ldh_;
  Aligned dh_, base_, d_hp_, h_prev_, d_w_, d_b_;
};

// Splits the batch into blocks so that there are about as many items as threads.
// dims: x_proj's [T, D, B, 3H] (gates = 3) or the outputs' [T, D, B, H] (gates = 1).
ffi::Error Plan(ffi::ThreadPool& pool, ffi::Span<const int64_t> dims, int64_t gates,
                const ffi::Buffer<ffi::F32>& w_hh, const ffi::Buffer<ffi::PRED>& valid,
                GruProblem& p) {
  if (dims.size() != 4) return ffi::Error::InvalidArgument("x_proj must be [T, D, B, 3H]");
  p.t = dims[0];
  p.dirs = dims[1];
  p.batch = dims[2];
  p.hidden = dims[3] / gates;
  if (p.hidden % kLanes != 0 || dims[3] != gates * p.hidden)
    return ffi::Error::InvalidArgument("the hidden size must be a multiple of 16");
  if (static_cast<int64_t>(w_hh.element_count()) != p.dirs * 3 * p.hidden * p.hidden)
    return ffi::Error::InvalidArgument("w_hh must be [D, 3H, H]");
  if (static_cast<int64_t>(valid.element_count()) != p.batch * p.t)
    return ffi::Error::InvalidArgument("valid must be [B, T]");
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_dir = std::max<int64_t>(1, (threads + p.dirs - 1) / p.dirs);
  p.block_rows = std::max<int64_t>(1, (p.batch + per_dir - 1) / per_dir);
  p.blocks = (p.batch + p.block_rows - 1) / p.block_rows;
  p.items = p.dirs * p.blocks;
  return ffi::Error::Success();
}

template <bool kSave>
ffi::Error GruForwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x_proj,
                          ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> b_hh,
                          ffi::Buffer<ffi::PRED> valid, ffi::ResultBuffer<ffi::F32> out,
                          ffi::ResultBuffer<ffi::F32> h_last, ffi::ResultBuffer<ffi::F32> h_prev,
                          ffi::ResultBuffer<ffi::F32> r, ffi::ResultBuffer<ffi::F32> z,
                          ffi::ResultBuffer<ffi::F32> n, ffi::ResultBuffer<ffi::F32> hp_n) {
  GruProblem p{};
  if (ffi::Error e = Plan(pool, x_proj.dimensions(), 3, w_hh, valid, p); e.failure())
    return e;
  if (p.items == 0 || p.t == 0) {
    std::memset(h_last->typed_data(), 0, sizeof(float) * h_last->element_count());
    return ffi::Error::Success();
  }
  const int64_t hid = p.hidden;
  p.panel_floats = PanelWidth(3 * hid) * hid;
  Aligned panels(p.dirs * p.panel_floats);
  for (int64_t d = 0; d < p.dirs; ++d)  // W_hh^T's columns: [H, 3H]
    PackPanels(w_hh.typed_data() + d * 3 * hid * hid, 3 * hid, hid, true,
               panels.ptr + d * p.panel_floats);
  p.panels = panels.ptr;
  p.x_proj = x_proj.typed_data();
  p.b_hh = b_hh.typed_data();
  p.valid = valid.typed_data();
  p.out = out->typed_data();
  p.h_last = h_last->typed_data();
  if (kSave) {
    p.h_prev = h_prev->typed_data();
    p.r = r->typed_data();
    p.z = z->typed_data();
    p.n = n->typed_data();
    p.hp_n = hp_n->typed_data();
  }
  RunJob(pool, DrainJob<GruForward, 0, GruProblem>, p);
  return ffi::Error::Success();
}

ffi::Error GruForwardOnly(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x_proj,
                          ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> b_hh,
                          ffi::Buffer<ffi::PRED> valid, ffi::ResultBuffer<ffi::F32> out,
                          ffi::ResultBuffer<ffi::F32> h_last) {
  return GruForwardCall<false>(pool, x_proj, w_hh, b_hh, valid, out, h_last, out, out, out, out,
                               out);
}

ffi::Error GruBackwardCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w_hh,
                           ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::F32> h_prev,
                           ffi::Buffer<ffi::F32> r, ffi::Buffer<ffi::F32> z,
                           ffi::Buffer<ffi::F32> n, ffi::Buffer<ffi::F32> hp_n,
                           ffi::Buffer<ffi::F32> g_out, ffi::Buffer<ffi::F32> g_h,
                           ffi::ResultBuffer<ffi::F32> d_xp, ffi::ResultBuffer<ffi::F32> d_w,
                           ffi::ResultBuffer<ffi::F32> d_b) {
  GruProblem p{};
  if (ffi::Error e = Plan(pool, g_out.dimensions(), 1, w_hh, valid, p); e.failure()) return e;
  if (!SameCount(g_out, h_prev, r, z, n, hp_n))
    return ffi::Error::InvalidArgument("saved values and g_out must be [T, D, B, H]");
  const int64_t hid = p.hidden, g3 = 3 * hid;
  std::memset(d_w->typed_data(), 0, sizeof(float) * d_w->element_count());
  std::memset(d_b->typed_data(), 0, sizeof(float) * d_b->element_count());
  if (p.items == 0 || p.t == 0) return ffi::Error::Success();
  p.panel_floats = PanelWidth(hid) * g3;
  Aligned panels(p.dirs * p.panel_floats);
  for (int64_t d = 0; d < p.dirs; ++d)  // W_hh's columns: [3H, H]
    PackPanels(w_hh.typed_data() + d * g3 * hid, g3, hid, false, panels.ptr + d * p.panel_floats);
  Aligned partial_w(p.items * g3 * hid), partial_b(p.items * g3);
  p.panels = panels.ptr;
  p.valid = valid.typed_data();
  p.s_h_prev = h_prev.typed_data();
  p.s_r = r.typed_data();
  p.s_z = z.typed_data();
  p.s_n = n.typed_data();
  p.s_hp_n = hp_n.typed_data();
  p.g_out = g_out.typed_data();
  p.g_h = g_h.typed_data();
  p.d_xp = d_xp->typed_data();
  p.partial_w = partial_w.ptr;
  p.partial_b = partial_b.ptr;
  RunJob(pool, DrainJob<GruBackward, 0, GruProblem>, p);
  // The blocks' partial sums in a fixed order: the same result whichever thread ran which.
  for (int64_t item = 0; item < p.items; ++item) {
    const int64_t d = item / p.blocks;
    float* w = d_w->typed_data() + d * g3 * hid;
    float* b = d_b->typed_data() + d * g3;
    const float* pw = partial_w.ptr + item * g3 * hid;
    const float* pb = partial_b.ptr + item * g3;
    for (int64_t i = 0; i < g3 * hid; ++i) w[i] += pw[i];
    for (int64_t i = 0; i < g3; ++i) b[i] += pb[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuGruForward, GruForwardOnly,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x_proj [T, D, B, 3H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_hh [D, 3H, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_hh [D, 3H]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid [B, T]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [T, D, B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // h [D, B, H]

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuGruForwardSave, GruForwardCall<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x_proj
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_hh
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h
                                  .Ret<ffi::Buffer<ffi::F32>>()   // the state before each step
                                  .Ret<ffi::Buffer<ffi::F32>>()   // r
                                  .Ret<ffi::Buffer<ffi::F32>>()   // z
                                  .Ret<ffi::Buffer<ffi::F32>>()   // n
                                  .Ret<ffi::Buffer<ffi::F32>>());  // W_hn h + b_hn

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuGruBackward, GruBackwardCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_hh
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid
                                  .Arg<ffi::Buffer<ffi::F32>>()   // the state before each step
                                  .Arg<ffi::Buffer<ffi::F32>>()   // r
                                  .Arg<ffi::Buffer<ffi::F32>>()   // z
                                  .Arg<ffi::Buffer<ffi::F32>>()   // n
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W_hn h + b_hn
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g_out [T, D, B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g_h [D, B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d x_proj [T, D, B, 3H]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d w_hh [D, 3H, H]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d b_hh [D, 3H]
