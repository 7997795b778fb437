// The product kernel's tile sequence alone, on one core: for each 32 x 32 block of c, four
// accumulator tiles, and per 32 of K two tiles of a (16 rows each, read from a's rows) and two
// of b (packed), four tile products; then the four tiles stored. Blocks go row block by row
// block, every column block in turn. a and b hold 1.0 (the speed does not depend on the values).
//   g++ -O2 -march=native -o tile_loop tile_loop.cc && ./tile_loop N M K [to_memory]
// to_memory 1: tiles stored into c [M, N] float32 (as the kernel's float32 output);
//           0: every block into the same 4 KiB (the product loop without its output's traffic).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

int main(int argc, char** argv) {
  if (argc < 4) return 2;
  const int n = atoi(argv[1]), m = atoi(argv[2]), k = atoi(argv[3]);
  const bool to_memory = argc < 5 || atoi(argv[4]) != 0;
  syscall(SYS_arch_prctl, 0x1023, 18);  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  TileConfig config;
  for (int i = 0; i < 8; ++i) config.colsb[i] = 64, config.rows[i] = 16;
  _tile_loadconfig(&config);
  auto* a = static_cast<uint16_t*>(aligned_alloc(64, size_t(m) * k * 2));
  auto* b = static_cast<uint16_t*>(aligned_alloc(64, size_t(k) * n * 2));
  auto* c = static_cast<float*>(aligned_alloc(64, size_t(m) * n * 4));
  for (size_t i = 0; i < size_t(m) * k; ++i) a[i] = 0x3f80;
  for (size_t i = 0; i < size_t(k) * n; ++i) b[i] = 0x3f80;
  for (size_t i = 0; i < size_t(m) * n; ++i) c[i] = 0.0f;
  double best = 1e9;
  for (int rep = 0; rep < 8; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    for (int r0 = 0; r0 < m; r0 += 32) {
      for (int nb = 0; nb < n / 32; ++nb) {
        const uint16_t* ar = a + size_t(r0) * k;
        const uint16_t* bt = b + size_t(nb) * (k / 32) * 1024;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int kb = 0; kb < k / 32; ++kb) {
          _tile_loadd(4, ar + kb * 32, k * 2);
          _tile_loadd(5, ar + 16 * k + kb * 32, k * 2);
          _tile_loadd(6, bt + kb * 1024, 64);
          _tile_loadd(7, bt + kb * 1024 + 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        float* out = to_memory ? c + size_t(r0) * n + nb * 32 : c;
        const int ld = to_memory ? n * 4 : 128;
        _tile_stored(0, out, ld);
        _tile_stored(1, out + 16, ld);
        _tile_stored(2, out + ld / 4 * 16, ld);
        _tile_stored(3, out + ld / 4 * 16 + 16, ld);
      }
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (rep > 0 && s < best) best = s;
  }
  const double flops = 2.0 * m * n * k;
  printf("M %d  K %d  N %d  output %s: %.2f ms, %.2f TFLOP/s on one core\n", m, k, n,
         to_memory ? "to memory" : "in L1", best * 1e3, flops / best / 1e12);
  _tile_release();
}
