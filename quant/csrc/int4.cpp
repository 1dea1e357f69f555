// int4 weight-only matrix products on the CPU, for decoding: the weight is read once per call
// as packed 4-bit codes and never materialised in float.
//
// Layout: row n of the weight holds K codes u in [0, 16) as K / 2 bytes; each run of 32 codes
// is 16 bytes, byte j holding code j in its low nibble and code 16 + j in its high nibble, so
// that both halves unpack into 16 consecutive lanes. The weight is w = u * s + m with one scale
// s and offset m per row and group of `group` codes (group a multiple of 32).
//
// Rows go in blocks of ROWS: each block's accumulators are independent chains (one chain alone
// waits on the FMA latency) and share the loads of x. With AVX-512 or AVX2 + FMA the unpacking
// and products are written with intrinsics (the compilers' own vectorisation of the plain loops
// below was 4-5x slower, measured); elsewhere those plain loops over 16 lanes.
// Blocks are split over OpenMP threads, the runtime PyTorch itself uses. Each block first asks
// for the bytes PREFETCH ahead (decode reads each weight once, from memory, not cache).
#include <cstdint>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int ROWS = 4;
constexpr int64_t PREFETCH = 1024;  // bytes ahead of the block being read (a block is 4 rows)

// y[r] = sum_k x[k] w[n0 + r, k] for r < rows (rows <= ROWS), without the offsets' share
template <int R>
void block(const float* x, const uint8_t* w, const float* s, int64_t n0, int64_t K, int64_t G,
           int64_t chunks, float* y) {
  for (int64_t off = 0; off < R * (K / 2); off += 64) __builtin_prefetch(w + n0 * (K / 2) + PREFETCH + off);
#if defined(__AVX512F__)
  const __m512i low = _mm512_set1_epi32(15);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t chunk = g * chunks + c;
      const __m512 x0 = _mm512_loadu_ps(x + chunk * 32), x1 = _mm512_loadu_ps(x + chunk * 32 + 16);
      for (int r = 0; r < R; ++r) {
        const __m128i bytes = _mm_loadu_si128((const __m128i*)(w + (n0 + r) * (K / 2) + chunk * 16));
        const __m512i v = _mm512_cvtepu8_epi32(bytes);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), x0, acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), x1, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) total[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[(n0 + r) * G + g]), acc[r], total[r]);
  }
  for (int r = 0; r < R; ++r) y[r] = _mm512_reduce_add_ps(total[r]);
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256i low = _mm256_set1_epi32(15);
  __m256 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t chunk = g * chunks + c;
      for (int half = 0; half < 2; ++half) {  // bytes 8 * half.. hold codes 8 * half.. and 16 + 8 * half..
        const float* xc = x + chunk * 32 + 8 * half;
        const __m256 x0 = _mm256_loadu_ps(xc), x1 = _mm256_loadu_ps(xc + 16);
        for (int r = 0; r < R; ++r) {
          const __m128i bytes = _mm_loadl_epi64((const __m128i*)(w + (n0 + r) * (K / 2) + chunk * 16 + 8 * half));
          const __m256i v = _mm256_cvtepu8_epi32(bytes);
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), x0, acc[r]);
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), x1, acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) total[r] = _mm256_fmadd_ps(_mm256_set1_ps(s[(n0 + r) * G + g]), acc[r], total[r]);
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float t[8];
    _mm256_store_ps(t, total[r]);
    y[r] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  }
#else
  float total[R][16] = {};
  for (int64_t g = 0; g < G; ++g) {
    float acc[R][16] = {};
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t chunk = g * chunks + c;
      const float* xc = x + chunk * 32;
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = w + (n0 + r) * (K / 2) + chunk * 16;
        for (int j = 0; j < 16; ++j) acc[r][j] += xc[j] * (float)(p[j] & 15) + xc[16 + j] * (float)(p[j] >> 4);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 16; ++j) total[r][j] += s[(n0 + r) * G + g] * acc[r][j];
  }
  for (int r = 0; r < R; ++r) {
    float t = 0.0f;
    for (int j = 0; j < 16; ++j) t += total[r][j];
    y[r] = t;
  }
#endif
}

}  // namespace

extern "C" {

// y[b, n] = sum_k x[b, k] w[n, k] for b < B: per group, sum_k x u times s, plus m times the
// group's sum of x (computed once per call).
void int4_gemv(const float* x, const uint8_t* w, const float* s, const float* m, float* y,
               int64_t B, int64_t N, int64_t K, int64_t group, int threads) {
  const int64_t G = K / group, chunks = group / 32, blocks = (N + ROWS - 1) / ROWS;
  std::vector<float> xsum(B * G, 0.0f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < G; ++g) {
      float t = 0.0f;
      for (int64_t k = 0; k < group; ++k) t += x[b * K + g * group + k];
      xsum[b * G + g] = t;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t n0 = i * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
    for (int64_t b = 0; b < B; ++b) {
      float part[ROWS];
      if (rows == ROWS) block<ROWS>(x + b * K, w, s, n0, K, G, chunks, part);
      else for (int64_t r = 0; r < rows; ++r) block<1>(x + b * K, w, s, n0 + r, K, G, chunks, part + r);
      for (int64_t r = 0; r < rows; ++r) {
        float offset = 0.0f;
        for (int64_t g = 0; g < G; ++g) offset += m[(n0 + r) * G + g] * xsum[b * G + g];
        y[b * N + n0 + r] = part[r] + offset;
      }
    }
  }
}

// The float weight w[n, k] = u * s + m, for products with many rows (a GEMM then beats reading
// the codes once per row).
void int4_dequantize(const uint8_t* w, const float* s, const float* m, float* out,
                     int64_t N, int64_t K, int64_t group, int threads) {
  const int64_t G = K / group, chunks = group / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const float sg = s[n * G + g], mg = m[n * G + g];
      for (int64_t c = 0; c < chunks; ++c) {
        const uint8_t* p = w + n * (K / 2) + (g * chunks + c) * 16;
        float* o = out + n * K + (g * chunks + c) * 32;
        for (int j = 0; j < 16; ++j) {
          o[j] = (float)(p[j] & 15) * sg + mg;
          o[16 + j] = (float)(p[j] >> 4) * sg + mg;
        }
      }
    }
}

}  // extern "C"
