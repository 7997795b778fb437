// float32 dense layers: c = activation(a b + bias) for a [M, K], b [K, N], in register tiles of
// the target's vectors. On MiniLM's shapes on the AMX Xeon, XLA:CPU's own float32 dot took
// 1.05-1.08x the time of torch's (MKL's) and this GEMM 0.99-1.04x
// (benchmarks/results/amx_xeon/float32_dense/). It packs b into panels (a block of them stays in
// L2), reads a's rows where they are, and adds the bias and GELU before a tile is stored.
#include "common.h"

namespace {

// The register tile: kDenseRows rows of a by kDenseVecs vectors of b's columns, 6 x 4 of
// AVX-512's 32 registers, 6 x 2 of AVX2's 16 (with b's vectors and one broadcast beside them).
constexpr int kDenseRows = 6;
constexpr int kDenseVecs = kWideRegisters ? 4 : 2;
constexpr int kPanel = kDenseVecs * kRegLanes;  // b's columns per packed panel
constexpr int64_t kDepth = 384;       // K per pass over c: a panel's slice is 96 KB (AVX-512)
constexpr int64_t kBlockCols = 384;   // b's columns per block: one block stays in L2
constexpr int64_t kBlockRows = 96;    // a's rows per block, reused across a block's panels
constexpr int64_t kItemRows = 768;    // rows of c per work item, at most
static_assert(kBlockCols % kPanel == 0 && kBlockRows % kDenseRows == 0, "blocks must nest");

struct DenseProblem {
  const float* a;
  const float* panels;  // b packed: [np / kPanel][K][kPanel], columns past N zero
  const float* bias;    // padded to np; null: none
  bool gelu;
  float* c;
  int64_t m, n, k, np;
  int64_t item_rows, items;
};

enum Epilogue { kNone, kBias, kBiasGelu };

// c[kDenseRows x kPanel] (ldc apart) = (c if accumulate) + a[kDenseRows x depth] (rows lda
// apart) . panel[depth x kPanel]; then + bias and GELU where the epilogue says (the last pass
// over K).
// Not inlined: inside the loops around it, the compiler ran short of general registers and
// kept pointers in mask registers, whose moves take an FMA port.
template <Epilogue kEpilogue>
__attribute__((noinline)) void DenseTile(const float* a, int64_t lda, const float* panel,
                                         int64_t depth, float* c, int64_t ldc, bool accumulate,
                                         const float* bias) {
  vreg acc[kDenseRows][kDenseVecs];
  for (int r = 0; r < kDenseRows; ++r)
    for (int v = 0; v < kDenseVecs; ++v)
      acc[r][v] = accumulate ? load<vreg>(c + r * ldc + v * kRegLanes) : vreg{};
  for (int64_t k = 0; k < depth; ++k) {
    vreg bk[kDenseVecs];
    for (int v = 0; v < kDenseVecs; ++v) bk[v] = load<vreg>(panel + k * kPanel + v * kRegLanes);
    __builtin_prefetch(panel + (k + 8) * kPanel);
    for (int r = 0; r < kDenseRows; ++r) {
      const float x = a[r * lda + k];
      for (int v = 0; v < kDenseVecs; ++v) acc[r][v] += x * bk[v];
    }
  }
  for (int v = 0; v < kDenseVecs; ++v) {
    const vreg b = kEpilogue == kNone ? vreg{} : load<vreg>(bias + v * kRegLanes);
    for (int r = 0; r < kDenseRows; ++r) {
      vreg y = acc[r][v];
      if constexpr (kEpilogue != kNone) y += b;
      if constexpr (kEpilogue == kBiasGelu) y = Gelu(y);
      store(c + r * ldc + v * kRegLanes, y);
    }
  }
}

void DenseTileFor(const float* a, int64_t lda, const float* panel, int64_t depth, float* c,
                  int64_t ldc, bool accumulate, const float* bias, bool gelu) {
  if (bias == nullptr) return DenseTile<kNone>(a, lda, panel, depth, c, ldc, accumulate, bias);
  if (!gelu) return DenseTile<kBias>(a, lda, panel, depth, c, ldc, accumulate, bias);
  DenseTile<kBiasGelu>(a, lda, panel, depth, c, ldc, accumulate, bias);
}

template <int>
class DenseRows {
 public:
  explicit DenseRows(const DenseProblem& p) : p_(p) {}

  void Run(int64_t item) {
    const int64_t m0 = item * p_.item_rows, m1 = std::min(p_.m, m0 + p_.item_rows);
    for (int64_t j0 = 0; j0 < p_.np; j0 += kBlockCols)
      for (int64_t k0 = 0; k0 < p_.k; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, p_.k - k0);
        const bool last = k0 + depth == p_.k;
        for (int64_t i0 = m0; i0 < m1; i0 += kBlockRows)
          for (int64_t j = j0; j < std::min(p_.np, j0 + kBlockCols); j += kPanel) {
            const float* panel = p_.panels + j * p_.k + k0 * kPanel;
            for (int64_t i = i0; i < std::min(m1, i0 + kBlockRows); i += kDenseRows)
              Tile(i, std::min<int64_t>(kDenseRows, m1 - i), j, k0, depth, panel, last);
          }
      }
  }

 private:
  // Rows i.. (`rows` of them) by the panel's columns j..: straight from a into c where the
  // tile is whole, else through copies of its own (the last row repeated, and not kept).
  void Tile(int64_t i, int64_t rows, int64_t j, int64_t k0, int64_t depth, const float* panel,
            bool last) {
    const float* bias = last && p_.bias != nullptr ? p_.bias + j : nullptr;
    const int64_t cols = std::min<int64_t>(kPanel, p_.n - j);
    const float* a = p_.a + i * p_.k + k0;
    float* c = p_.c + i * p_.n + j;
    if (rows == kDenseRows && cols == kPanel) {
      DenseTileFor(a, p_.k, panel, depth, c, p_.n, k0 > 0, bias, p_.gelu);
      return;
    }
    for (int r = 0; r < kDenseRows; ++r)
      std::memcpy(rows_ + r * kDepth, a + std::min<int64_t>(r, rows - 1) * p_.k, depth * 4);
    for (int r = 0; r < rows && k0 > 0; ++r)
      std::memcpy(tile_ + r * kPanel, c + r * p_.n, cols * 4);
    DenseTileFor(rows_, kDepth, panel, depth, tile_, kPanel, k0 > 0, bias, p_.gelu);
    for (int r = 0; r < rows; ++r) std::memcpy(c + r * p_.n, tile_ + r * kPanel, cols * 4);
  }

  const DenseProblem& p_;
  alignas(64) float tile_[kDenseRows * kPanel] = {};
  alignas(64) float rows_[kDenseRows * kDepth] = {};
};

// b [K, N] into panels of kPanel columns, each [K][kPanel], zeros past N: one item a panel,
// on both threads (alone, the calling thread took up to 0.7 ms of a 30 ms product).
struct PackProblem {
  const float* b;
  float* out;
  int64_t k, n;
  int64_t items;  // panels
};

template <int>
class PackPanel {
 public:
  explicit PackPanel(const PackProblem& p) : p_(p) {}

  void Run(int64_t panel) {
    const int64_t j = panel * kPanel, cols = std::min<int64_t>(kPanel, p_.n - j);
    float* out = p_.out + j * p_.k;
    for (int64_t kk = 0; kk < p_.k; ++kk) {
      std::memcpy(out + kk * kPanel, p_.b + kk * p_.n + j, cols * 4);
      std::memset(out + kk * kPanel + cols, 0, (kPanel - cols) * 4);
    }
  }

 private:
  const PackProblem& p_;
};

ffi::Error DenseCall(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                     ffi::Buffer<ffi::F32> bias, int32_t has_bias, int32_t gelu,
                     ffi::ResultBuffer<ffi::F32> c) {
  DenseProblem p{};
  const ffi::Error error = CheckDenseOperands(a.dimensions(), b.dimensions(), c->dimensions(),
                                              bias, has_bias, gelu, p.m, p.k, p.n);
  if (error.failure() || p.m == 0 || p.n == 0) return error;
  p.np = RoundUp(p.n, kPanel);
  Aligned padded(p.np);
  if (has_bias) {
    p.bias = PaddedBias(bias, p.n, p.np, padded);
    p.gelu = gelu != 0;
  }
  Aligned panels(p.np * p.k);
  RunJob(pool, DrainJob<PackPanel, 0, PackProblem>,
         PackProblem{b.typed_data(), panels.ptr, p.k, p.n, p.np / kPanel});
  p.panels = panels.ptr;
  p.a = a.typed_data();
  p.c = c->typed_data();
  // Items of up to kItemRows rows, as many for each thread: 11 items of 768 rows on two
  // threads left one of them a sixth of the work to do alone.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t rounds = (p.m + threads * kItemRows - 1) / (threads * kItemRows);
  p.item_rows = RoundUp((p.m + threads * rounds - 1) / (threads * rounds), kDenseRows);
  p.items = (p.m + p.item_rows - 1) / p.item_rows;
  RunJob(pool, DrainJob<DenseRows, 0, DenseProblem>, p);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Hw2jaxCpuFloat32Dense, DenseCall,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Attr<int32_t>("has_bias")
                                  .Attr<int32_t>("gelu")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // c
