// Single-thread rate of pair-dot register blocks (32 rows x `cols` of c over a K chunk kc), and of
// vdpbf16ps alone. g++ -O3 -march=native -std=c++17 pair_dot_loop.cc -o loop && ./loop
#include <immintrin.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

// b packed per 32 columns as the kernel does: per kb of 32 K values, [2 halves][16 pairs][16].
template <int R, int V>
__attribute__((noinline)) void Block(const uint16_t* a, int64_t lda, const uint16_t* b,
                                     int64_t next32, int64_t kc, float* out, int64_t ld) {
  for (int64_t r0 = 0; r0 + R <= 32; r0 += R) {
    __m512 acc[R][V];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
    const uint16_t* ar = a + r0 * lda;
    for (int64_t kb = 0; kb < kc / 32; ++kb) {
      for (int pair = 0; pair < 16; ++pair) {
        __m512bh bv[V];
        for (int v = 0; v < V; ++v)
          bv[v] = (__m512bh)_mm512_loadu_si512(b + (v / 2) * next32 + kb * 1024 + (v % 2) * 512 +
                                               pair * 32);
        for (int r = 0; r < R; ++r) {
          uint32_t word;
          std::memcpy(&word, ar + r * lda + kb * 32 + 2 * pair, 4);
          const __m512bh x = (__m512bh)_mm512_set1_epi32((int)word);
          for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, bv[v]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + (r0 + r) * ld + v * 16, acc[r][v]);
  }
}

__attribute__((noinline)) float Peak(int64_t n) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(i);
  __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], x, x);
    asm volatile("" : "+v"(x));
  }
  float s = 0;
  for (int i = 0; i < 16; ++i) s += _mm512_reduce_add_ps(acc[i]);
  return s;
}

template <int R, int V>
double Rate(int64_t kc, int64_t cols, double seconds) {
  std::vector<uint16_t> a(32 * kc, 0x3f80), b((cols / 32) * (kc / 32) * 1024, 0x3f80);
  std::vector<float> out(32 * cols);
  const int64_t next32 = (kc / 32) * 1024;
  int64_t reps = 0;
  auto t0 = std::chrono::steady_clock::now();
  double s = 0;
  while (s < seconds) {
    for (int64_t nb = 0; nb < cols / (16 * V); ++nb)
      Block<R, V>(a.data(), kc, b.data() + nb * (V / 2) * next32, next32, kc,
                  out.data() + nb * 16 * V, cols);
    ++reps;
    s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const int rows = (32 / R) * R;
  return 2.0 * rows * cols * kc * reps / s / 1e9;
}

int main() {
  auto t0 = std::chrono::steady_clock::now();
  const int64_t n = 20000000;
  volatile float s = Peak(n);
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("dpbf16 alone, 16 chains: %.1f GFLOP/s\n", 16.0 * 64 * n / sec / 1e9);
  (void)s;
  for (int64_t kc : {512, 128}) {
    std::printf("kc %ld, 1152 columns\n", kc);
    std::printf("  8 x 2 (the kernel's): %.1f\n", Rate<8, 2>(kc, 1152, 1.0));
    std::printf("  4 x 4: %.1f\n", Rate<4, 4>(kc, 1152, 1.0));
    std::printf("  16 x 1: %.1f\n", Rate<16, 1>(kc, 1152, 1.0));
    std::printf("  14 x 2 (28 of 32 rows): %.1f\n", Rate<14, 2>(kc, 1152, 1.0));
    std::printf("  6 x 4 (30 of 32 rows): %.1f\n", Rate<6, 4>(kc, 1152, 1.0));
  }
}
