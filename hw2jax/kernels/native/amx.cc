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
#include "common.h"

// Without AMX, CPUs with AVX512-BF16 run the same products on vdpbf16ps, the pair dot product of
// 16 lanes: b is packed the same way, and each 8 x 32 block of c is 16 zmm accumulators.
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HW2JAX_PAIR_DOT 1
#endif
#if defined(HW2JAX_AMX) || defined(HW2JAX_PAIR_DOT)
#define HW2JAX_BF16_PRODUCTS 1
#endif

namespace {

constexpr int64_t kChunk = 512;    // K per chunk
constexpr int64_t kItemRows = 128;  // rows of c per work item, at most
// Packed b up to this size (K in one chunk) goes through the tiles row block by row block, every
// column block in turn: a's 32 rows stay in L1 while b streams from L2 (2 MiB a core on the CPUs
// with AMX). Larger b goes column block by column block, each chunk of it kept in L1.
constexpr int64_t kRowsOuterBytes = 5 << 18;

struct MatmulProblem {
  const uint16_t* a;
  const uint16_t* b;         // batched: each item packs its own matrix of b
  const float* b32;          // instead of b (one matrix): float32, rounded to bf16 as it packs
  const uint16_t* b_packed;  // one matrix: packed once for all items
  float* c;
  uint16_t* c16;             // instead of c: the results rounded to bf16
  const float* bias;         // a b + bias instead, the bias padded to np
  bool gelu;                 // with the bias: GELU(a b + bias)
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
  uint16_t* out16;  // instead of out: the output rounded to bf16
  int64_t items, t, h, d;  // items = N * H
  float scale;
};

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
#else
bool AmxPermitted() { return false; }
#endif

#ifdef HW2JAX_BF16_PRODUCTS
// b packed: a pair of rows is one 32-bit word per column; the word of rows k0 and k0 + 1,
// column c.
inline uint32_t* PackedWord(uint16_t* out, int64_t kp, int64_t k0, int64_t c) {
  return reinterpret_cast<uint32_t*>(out) + ((c / 32) * (kp / 32) + k0 / 32) * 512 +
         ((c % 32) / 16) * 256 + ((k0 % 32) / 2) * 16 + c % 16;
}

void PackB(const uint16_t* b, int64_t k, int64_t n, bool transpose, int64_t kp, int64_t np,
           uint16_t* out) {
  std::memset(out, 0, kp * np * 2);
  if (!transpose) {  // rows of b are rows of op(b): interleave two rows, 16 columns at a time
    for (int64_t k0 = 0; k0 < k; k0 += 2) {
      const uint16_t* even = b + k0 * n;
      const uint16_t* odd = k0 + 1 < k ? even + n : nullptr;
      for (int64_t c0 = 0; c0 < n; c0 += 16) {
        uint32_t* dst = PackedWord(out, kp, k0, c0);
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
    for (int64_t k0 = 0; k0 + 1 < k; k0 += 2) std::memcpy(PackedWord(out, kp, k0, c), row + k0, 4);
    if (k % 2 == 1) *PackedWord(out, kp, k - 1, c) = row[k - 1];
  }
}

// A float32 b [K, N] (untransposed), each pair of rows rounded to bf16 (by the rounding of the
// kernels' bf16 outputs: to nearest, ties to even, as XLA's convert) as it is packed: the
// product of a layer's float32 weights without a pass that writes their bf16 copy.
void PackB(const float* b, int64_t k, int64_t n, int64_t kp, int64_t np, uint16_t* out) {
  std::memset(out, 0, kp * np * 2);
  for (int64_t k0 = 0; k0 < k; k0 += 2) {
    const float* even = b + k0 * n;
    const float* odd = k0 + 1 < k ? even + n : nullptr;
    for (int64_t c0 = 0; c0 < n; c0 += 16) {
      const int64_t len = std::min<int64_t>(16, n - c0);
      v16 x = splat(0.0f), y = splat(0.0f);  // zeros past N and past K
      if (len == 16) {
        x = load(even + c0);
        if (odd != nullptr) y = load(odd + c0);
      } else {
        float e[16] = {}, o[16] = {};
        std::memcpy(e, even + c0, len * 4);
        if (odd != nullptr) std::memcpy(o, odd + c0, len * 4);
        x = load(e);
        y = load(o);
      }
      alignas(32) uint16_t low[16], high[16];
      RoundToBf16(x, low);
      RoundToBf16(y, high);
      const __m512i words = _mm512_or_si512(
          _mm512_cvtepu16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(low))),
          _mm512_slli_epi32(
              _mm512_cvtepu16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(high))),
              16));
      _mm512_mask_storeu_epi32(PackedWord(out, kp, k0, c0), (1u << len) - 1, words);
    }
  }
}

#endif

#ifdef HW2JAX_AMX
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

#endif

#ifdef HW2JAX_BF16_PRODUCTS
// One worker per thread, on AMX tiles (kEngine 0: tiles 0-3 accumulate c, 4-5 hold a's two
// 16-row halves, 6-7 b's two 16-column halves) or on pair dot products (kEngine 1).
constexpr int kTiles = 0, kPairDots = 1;

template <int kEngine>
class RowBlocks {
 public:
  explicit RowBlocks(const MatmulProblem& p)
      : p_(p),
        a_((p.item_rows * kChunk * 2 + 3) / 4),
        acc_(p.kp > kChunk ? p.item_rows * p.np : 0),
        b_(p.batch > 1 ? (p.kp * p.np * 2 + 3) / 4 : 0),
        tail_(32 * 32) {
#ifdef HW2JAX_AMX
    if (kEngine == kTiles) LoadTileConfig();
#endif
  }
  ~RowBlocks() {
#ifdef HW2JAX_AMX
    if (kEngine == kTiles) _tile_release();
#endif
  }

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
    // The order of the blocks (kRowsOuterBytes); each block's sums are the same either way.
    const bool rows_outer = kEngine == kTiles && !chunked && p_.kp * p_.np * 2 <= kRowsOuterBytes;
    const int64_t column_blocks = p_.np / 32, row_blocks = (rows + 31) / 32;
    for (int64_t k0 = 0; k0 < p_.kp; k0 += kChunk) {
      const int64_t kc = std::min(kChunk, p_.kp - k0);
      for (int64_t r0 = 0; r0 < rows; r0 += 32) {
        const int64_t block_rows = std::min<int64_t>(32, rows - r0);
        if (!direct || block_rows < 32) PackRows(m0 + r0, block_rows, k0, kc, Packed(r0));
      }
      for (int64_t i = 0; i < column_blocks * row_blocks; ++i) {
        const int64_t nb = rows_outer ? i % column_blocks : i / row_blocks;
        const int64_t r0 = 32 * (rows_outer ? i / column_blocks : i % row_blocks);
        const uint16_t* b = b_base_ + (nb * (p_.kp / 32) + k0 / 32) * 1024;
        const int64_t block_rows = std::min<int64_t>(32, rows - r0);
        const bool from_a = direct && block_rows == 32;
        const uint16_t* a = from_a ? a_base_ + (m0 + r0) * p_.k + k0 : Packed(r0);
        const int64_t stride = from_a ? p_.k * 2 : kChunk * 2;
        float* acc = chunked ? acc_.ptr + r0 * p_.np + nb * 32 : nullptr;
        if (kEngine == kPairDots) {
          PairDotBlock(a, stride / 2, b, kc, k0 == 0 ? nullptr : acc, acc, k0 + kc < p_.kp,
                       m0 + r0, block_rows, nb * 32);
          continue;
        }
#ifdef HW2JAX_AMX
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
        } else if (p_.c16 == nullptr && p_.bias == nullptr && block_rows == 32 &&
                   p_.n - nb * 32 >= 32) {
          StoreBlock(c_base_ + (m0 + r0) * p_.n + nb * 32, p_.n);  // straight into c
        } else {
          StoreBlock(tail_.ptr, 32);
          Store(m0 + r0, block_rows, nb * 32);
        }
#endif
      }
    }
  }

  uint16_t* Packed(int64_t r0) const {
    return reinterpret_cast<uint16_t*>(a_.ptr) + r0 * kChunk;
  }

#ifdef HW2JAX_PAIR_DOT
  // The 32 x 32 block of c at rows m0.., columns n0.. over this chunk of K (kc), 8 rows at a
  // time: a's rows lda values apart, b the chunk's packed tiles, init the chunk before's sums
  // (or none); into acc (its place in acc_) while chunks remain, else through tail_ into c.
  void PairDotBlock(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t kc,
                    const float* init, float* acc, bool more, int64_t m0, int64_t rows,
                    int64_t n0) {
    float* out = more ? acc : tail_.ptr;
    const int64_t ld_out = more ? p_.np : 32;
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      __m512 acc[8][2];
      for (int r = 0; r < 8; ++r) {
        acc[r][0] = init ? _mm512_loadu_ps(init + (r0 + r) * p_.np) : _mm512_setzero_ps();
        acc[r][1] = init ? _mm512_loadu_ps(init + (r0 + r) * p_.np + 16) : _mm512_setzero_ps();
      }
      const uint16_t* ar = a + r0 * lda;
      for (int64_t kb = 0; kb < kc / 32; ++kb) {
        const uint16_t* bt = b + kb * 1024;
        for (int pair = 0; pair < 16; ++pair) {
          const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bt + pair * 32);
          const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bt + 512 + pair * 32);
          for (int r = 0; r < 8; ++r) {
            uint32_t word;
            std::memcpy(&word, ar + r * lda + kb * 32 + 2 * pair, 4);
            const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
          }
        }
      }
      for (int r = 0; r < 8; ++r) {
        _mm512_storeu_ps(out + (r0 + r) * ld_out, acc[r][0]);
        _mm512_storeu_ps(out + (r0 + r) * ld_out + 16, acc[r][1]);
      }
    }
    if (!more) Store(m0, rows, n0);
  }
#else
  void PairDotBlock(const uint16_t*, int64_t, const uint16_t*, int64_t, const float*, float*,
                    bool, int64_t, int64_t, int64_t) {}
#endif

  // The 32 x 32 block in tail_ into c's rows m0.., columns n0.., with the bias and GELU
  // where asked and rounded to bf16 for c16, while it is in L1: the float32 product never
  // reaches memory.
  void Store(int64_t m0, int64_t rows, int64_t n0) {
    const int64_t cols = std::min<int64_t>(32, p_.n - n0);
    if (p_.c16 == nullptr && p_.bias == nullptr) {
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(c_base_ + (m0 + r) * p_.n + n0, tail_.ptr + r * 32, cols * 4);
      return;
    }
    uint16_t half[kLanes];
    float whole[kLanes];
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t h = 0; h < cols; h += kLanes) {
        v16 x = load(tail_.ptr + r * 32 + h);
        if (p_.bias != nullptr) x += load(p_.bias + n0 + h);
        if (p_.gelu) x = Gelu(x);
        const int64_t at = (m0 + r) * p_.n + n0 + h, len = std::min<int64_t>(kLanes, cols - h);
        if (p_.c16 != nullptr && len == kLanes) {  // whole vectors: no copy of variable size
          RoundToBf16(x, c16_base_ + at);
        } else if (p_.c16 != nullptr) {
          RoundToBf16(x, half);
          std::memcpy(c16_base_ + at, half, len * 2);
        } else if (len == kLanes) {
          store(c_base_ + at, x);
        } else {
          store(whole, x);
          std::memcpy(c_base_ + at, whole, len * 4);
        }
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
#endif

#ifdef HW2JAX_AMX
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
        const int64_t at = base + (q0 + r) * row;
        for (int64_t c = 0; c < d; c += kLanes) {
          const v16 o = load(o_.ptr + r * d + c) * inv_sum[r];
          if (p_.out16 != nullptr) {
            RoundToBf16(o, p_.out16 + at + c);
          } else {
            store(p_.out + at + c, o);
          }
        }
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

#endif

#ifdef HW2JAX_BF16_PRODUCTS
// Packs b (one matrix) and runs the items on the calling thread and XLA's pool.
ffi::Error Multiply(ffi::ThreadPool& pool, MatmulProblem p) {
  const int64_t blocks = (p.m + 31) / 32, threads = std::max<int64_t>(1, pool.num_threads());
  Aligned packed(p.batch == 1 ? (p.kp * p.np * 2 + 3) / 4 : 0);
  if (p.batch == 1) {
    uint16_t* out = reinterpret_cast<uint16_t*>(packed.ptr);
    if (p.b32 != nullptr) {
      PackB(p.b32, p.k, p.n, p.kp, p.np, out);
    } else {
      PackB(p.b, p.k, p.n, p.transpose_b, p.kp, p.np, out);
    }
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
  // AMX's tiles where Linux grants them, else the pair dot products where the build has them.
  void (*drain)(Job<MatmulProblem>&) = nullptr;
#ifdef HW2JAX_AMX
  if (AmxPermitted()) drain = DrainJob<RowBlocks, kTiles, MatmulProblem>;
#endif
#ifdef HW2JAX_PAIR_DOT
  if (drain == nullptr) drain = DrainJob<RowBlocks, kPairDots, MatmulProblem>;
#endif
  if (drain == nullptr)
    return ffi::Error(ffi::ErrorCode::kUnavailable, "Linux refused this process AMX's tiles");
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, p.items - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job, drain] { drain(*job); });
  drain(*job);
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == job->problem.items; });
  return ffi::Error::Success();
}

#endif


// op(a) op(b) for 2-D a and b, or for each matrix of 3-D ones, into c: float32, or with
// kType = BF16 rounded to bf16 as it leaves the tiles.
template <ffi::DataType kType>
ffi::Error MatmulCall(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                      int32_t transpose_a, int32_t transpose_b, ffi::ResultBuffer<kType> c) {
#ifndef HW2JAX_BF16_PRODUCTS
  return ffi::Error(ffi::ErrorCode::kUnavailable, "this kernel build has no AMX-BF16 or AVX512-BF16");
#else
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

// The attention's output as float32, or with kType = BF16 rounded to bf16 as it is stored.
template <ffi::DataType kType>
ffi::Error AmxAttentionCall(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q,
                            ffi::Buffer<ffi::BF16> k, ffi::Buffer<ffi::BF16> v,
                            ffi::Buffer<ffi::F32> key_bias, float scale,
                            ffi::ResultBuffer<kType> out) {
#ifndef HW2JAX_AMX
  return ffi::Error(ffi::ErrorCode::kUnavailable, "this kernel build has no AMX-BF16");
#else
  if (!AmxPermitted())
    return ffi::Error(ffi::ErrorCode::kUnavailable, "Linux refused this process AMX's tiles");
  if (ffi::Error error = CheckRowInputs(q, k, v, key_bias); error.failure()) return error;
  AmxAttentionProblem p{};
  p.q = reinterpret_cast<const uint16_t*>(q.typed_data());
  p.k = reinterpret_cast<const uint16_t*>(k.typed_data());
  p.v = reinterpret_cast<const uint16_t*>(v.typed_data());
  p.key_bias = key_bias.typed_data();
  if constexpr (kType == ffi::DataType::F32) {
    p.out = out->typed_data();
  } else {
    p.out16 = reinterpret_cast<uint16_t*>(out->typed_data());
  }
  p.scale = scale;
  return RunItems<AmxRowAttention>(pool, q, p);
#endif
}

// activation(a b + bias) for a [M, K] bf16, b [K, N] (bf16, or float32 rounded to bf16 as it
// is packed), a float32 bias [N] (with has_bias) and GELU or none (gelu): a dense layer with
// its bias (and BERT's intermediate layer with its GELU) in one call, the product's float32
// result kept in L1; c float32, or with kOut = BF16 rounded to bf16 as it is stored.
template <ffi::DataType kB, ffi::DataType kOut>
ffi::Error DenseCall(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<kB> b,
                     ffi::Buffer<ffi::F32> bias, int32_t has_bias, int32_t gelu,
                     ffi::ResultBuffer<kOut> c) {
#ifndef HW2JAX_BF16_PRODUCTS
  return ffi::Error(ffi::ErrorCode::kUnavailable, "this kernel build has no AMX-BF16 or AVX512-BF16");
#else
  MatmulProblem p{};
  p.batch = 1;
  const ffi::Error error = CheckDenseOperands(a.dimensions(), b.dimensions(), c->dimensions(),
                                              bias, has_bias, gelu, p.m, p.k, p.n);
  if (error.failure() || p.m == 0 || p.n == 0) return error;
  p.kp = (p.k + 31) / 32 * 32;
  p.np = (p.n + 31) / 32 * 32;
  Aligned padded(p.np);
  if (has_bias) {
    p.bias = PaddedBias(bias, p.n, p.np, padded);
    p.gelu = gelu != 0;
  }
  p.a = reinterpret_cast<const uint16_t*>(a.typed_data());
  if constexpr (kB == ffi::DataType::F32) {
    p.b32 = b.typed_data();
  } else {
    p.b = reinterpret_cast<const uint16_t*>(b.typed_data());
  }
  if constexpr (kOut == ffi::DataType::F32) {
    p.c = c->typed_data();
  } else {
    p.c16 = reinterpret_cast<uint16_t*>(c->typed_data());
  }
  return Multiply(pool, p);
#endif
}

}  // namespace

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

#define HW2JAX_AMX_ATTENTION(name, type)                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, AmxAttentionCall<type>,               \
                                ffi::Ffi::Bind()                            \
                                    .Ctx<ffi::ThreadPool>()                 \
                                    .Arg<ffi::Buffer<ffi::BF16>>() /* q */  \
                                    .Arg<ffi::Buffer<ffi::BF16>>() /* k */  \
                                    .Arg<ffi::Buffer<ffi::BF16>>() /* v */  \
                                    .Arg<ffi::Buffer<ffi::F32>>() /* bias */ \
                                    .Attr<float>("scale")                   \
                                    .Ret<ffi::Buffer<type>>());
HW2JAX_AMX_ATTENTION(Hw2jaxCpuAmxAttention, ffi::DataType::F32)
HW2JAX_AMX_ATTENTION(Hw2jaxCpuAmxAttentionBf16, ffi::DataType::BF16)

// The dense calls: b bf16 or float32, c float32 or bf16.
#define HW2JAX_DENSE(name, b_type, out_type)                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (DenseCall<b_type, out_type>),        \
                                ffi::Ffi::Bind()                            \
                                    .Ctx<ffi::ThreadPool>()                 \
                                    .Arg<ffi::Buffer<ffi::BF16>>() /* a */  \
                                    .Arg<ffi::Buffer<b_type>>() /* b */     \
                                    .Arg<ffi::Buffer<ffi::F32>>() /* bias */ \
                                    .Attr<int32_t>("has_bias")              \
                                    .Attr<int32_t>("gelu")                  \
                                    .Ret<ffi::Buffer<out_type>>());
HW2JAX_DENSE(Hw2jaxCpuAmxDense, ffi::DataType::F32, ffi::DataType::F32)
HW2JAX_DENSE(Hw2jaxCpuAmxDenseBf16, ffi::DataType::F32, ffi::DataType::BF16)
HW2JAX_DENSE(Hw2jaxCpuAmxDenseBf16Weights, ffi::DataType::BF16, ffi::DataType::F32)
HW2JAX_DENSE(Hw2jaxCpuAmxDenseBf16WeightsBf16, ffi::DataType::BF16, ffi::DataType::BF16)

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

// How the bf16 products run here: 2 on AMX tiles, 1 on AVX512-BF16 pair dot products, 0 not at
// all (AMX in the build but refused by Linux), -1 neither is in this build.
extern "C" int Hw2jaxBf16Products() {
#ifdef HW2JAX_AMX
  if (AmxPermitted()) return 2;
#endif
#ifdef HW2JAX_PAIR_DOT
  return 1;
#elif defined(HW2JAX_AMX)
  return 0;
#else
  return -1;
#endif
}
