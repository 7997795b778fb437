// Feasibility: bf16 GEMM on AVX512-BF16 pair dot products (vdpbf16ps), 2 threads.
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>
#include <cmath>

static uint16_t to_bf16(float f) { uint32_t u; memcpy(&u, &f, 4); return (u + 0x7fff + ((u >> 16) & 1)) >> 16; }
static float from_bf16(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; memcpy(&f, &u, 4); return f; }

template <int R>
static void block(const uint16_t* a, int64_t lda, const uint32_t* bp, int64_t pairs, float* c, int64_t ldc) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i b0 = _mm512_load_si512(bp + p * 32), b1 = _mm512_load_si512(bp + p * 32 + 16);
    for (int r = 0; r < R; ++r) {
      uint32_t w; memcpy(&w, a + r * lda + 2 * p, 4);
      __m512i av = _mm512_set1_epi32(w);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)av, (__m512bh)b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)av, (__m512bh)b1);
    }
  }
  for (int r = 0; r < R; ++r) { _mm512_storeu_ps(c + r * ldc, acc[r][0]); _mm512_storeu_ps(c + r * ldc + 16, acc[r][1]); }
}

int main() {
  int shapes[3][3] = {{8192, 384, 384}, {8192, 384, 1536}, {8192, 1536, 384}};
  for (auto& s : shapes) {
    int64_t M = s[0], K = s[1], N = s[2], P = K / 2;
    std::vector<uint16_t> A(M * K), B(K * N);
    std::mt19937 g(0); std::normal_distribution<float> nd;
    for (auto& x : A) x = to_bf16(nd(g)); for (auto& x : B) x = to_bf16(nd(g));
    uint32_t* bp = (uint32_t*)aligned_alloc(64, K * N * 2);
    for (int64_t nb = 0; nb < N / 32; ++nb) for (int64_t p = 0; p < P; ++p) for (int h = 0; h < 32; ++h) {
      int64_t col = nb * 32 + h;
      bp[(nb * P + p) * 32 + h] = B[(2 * p) * N + col] | (uint32_t(B[(2 * p + 1) * N + col]) << 16);
    }
    std::vector<float> C(M * N);
    constexpr int R = ROWS;
    auto work = [&](int t) {
      int64_t m_begin = t * M / 2, m_end = (t + 1) * M / 2;
      for (int64_t m0 = m_begin; m0 < m_end; m0 += R) {
        int rows = std::min<int64_t>(R, m_end - m0);
        for (int64_t nb = 0; nb < N / 32; ++nb) {
          if (rows == R) block<R>(A.data() + m0 * K, K, bp + nb * P * 32, P, C.data() + m0 * N + nb * 32, N);
          else for (int r = 0; r < rows; ++r) block<1>(A.data() + (m0 + r) * K, K, bp + nb * P * 32, P, C.data() + (m0 + r) * N + nb * 32, N);
        }
      }
    };
    std::vector<double> ts;
    for (int rep = 0; rep < 12; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      std::thread th(work, 1); work(0); th.join();
      ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ts.begin(), ts.end());
    double err = 0;
    for (int i = 0; i < 50; ++i) { int64_t m = (i * 7919) % M, n = (i * 104729) % N; double ref = 0;
      for (int64_t k = 0; k < K; ++k) ref += double(from_bf16(A[m * K + k])) * from_bf16(B[k * N + n]);
      err = std::max(err, std::fabs(ref - C[m * N + n])); }
    printf("%ld x %ld x %ld: %.2f ms, %.0f GFLOP/s, max err %.2e\n", (long)M, (long)K, (long)N, ts[6] * 1e3, 2.0 * M * K * N / ts[6] / 1e9, err);
  }
}
