// Dot products of one query with many key rows, kLanes rows at a time, in GCC's portable vector
// types of one register: 16 fp32 lanes where the CPU has AVX-512, 8 with AVX2 (and F16C), else 4
// (SSE's or NEON's registers). A type wider than the registers takes several per value, and the
// register tiles of the kernels would spill. Each row's partial sums stay in a register and the
// kLanes rows are reduced together by a transpose-and-add, instead of one horizontal sum per row.
// The rows may hold fp32, fp16, int8 or fp8 e4m3, widened to fp32 as they are loaded.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
#include <immintrin.h>
#endif

namespace mosaic {

#if defined(__AVX512F__)
#define MOSAIC_AVX512 1
constexpr int64_t kLanes = 16;
#elif defined(__AVX2__) && defined(__F16C__)
#define MOSAIC_AVX2 1
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));  // one register
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

// The fp32 value of each e4m3 bit pattern: sign, 4 exponent bits (bias 7), 3 mantissa bits;
// exponent 0 holds the subnormals (steps of 2^-9); 0x7F and 0xFF are NaN.
inline std::array<float, 256> e4m3_table() {
  std::array<float, 256> table{};
  for (int bits = 0; bits < 256; ++bits) {
    const int exponent = (bits >> 3) & 15, mantissa = bits & 7;
    float value = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                                : std::ldexp(1.f + mantissa / 8.f, exponent - 7);
    if (exponent == 15 && mantissa == 7) value = NAN;
    table[bits] = bits & 128 ? -value : value;
  }
  return table;
}
inline const std::array<float, 256> kE4M3 = e4m3_table();

// An fp8 e4m3 store element, held as its bits (the graph carries fp8 stores in int8 tensors).
struct E4M3 {
  uint8_t bits;
  explicit operator float() const { return kE4M3[bits]; }
};
static_assert(sizeof(E4M3) == 1, "an fp8 element is one byte");

// Rows this far ahead are prefetched when they hold 1-byte elements (int8, fp8): widening each
// element costs more instructions than a float's load, so fewer of a row's cache lines are in
// flight and the hardware prefetcher alone falls behind (fp32 rows gain nothing from it).
constexpr int64_t kPrefetchRows = 32;

// Prefetches `elements` elements from p when they are 1-byte ones (a no-op otherwise).
template <typename T>
inline void prefetch_row(const T* p, int64_t elements) {
  if constexpr (sizeof(T) == 1)
    for (int64_t at = 0; at < elements; at += 64) __builtin_prefetch(p + at);
}

// kLanes consecutive elements from p, as fp32 lanes.
inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
#if MOSAIC_AVX512  // the widening loads as single instructions (GCC scalarizes the generic ones)
inline Vec load_vec(const _Float16* p) {
  return (Vec)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Vec load_vec(const int8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (Vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}
// e4m3 -> fp32 through fp16: the 7 magnitude bits shifted to fp16's bits 13..7 make an fp16 of
// the value x 2^-8 (exponent bias 15 against 7; e4m3's subnormals land on fp16's), the sign bit on
// bit 15 (the sign-extended byte shifted left, bit 14 cleared); then one widening and x 256.
inline Vec load_vec(const E4M3* p) {
  const __m256i bytes = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i half =
      _mm256_and_si256(_mm256_slli_epi16(bytes, 7), _mm256_set1_epi16(static_cast<int16_t>(0xBF80)));
  return (Vec)_mm512_mul_ps(_mm512_cvtph_ps(half), _mm512_set1_ps(256.f));
}
#elif MOSAIC_AVX2  // the same on 8 lanes
inline Vec load_vec(const _Float16* p) {
  return (Vec)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Vec load_vec(const int8_t* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (Vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}
inline Vec load_vec(const E4M3* p) {  // as the AVX-512 version, 8 bytes at a time
  const __m128i bytes = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i half =
      _mm_and_si128(_mm_slli_epi16(bytes, 7), _mm_set1_epi16(static_cast<int16_t>(0xBF80)));
  return (Vec)_mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(256.f));
}
#else
template <typename T>
inline Vec load_vec(const T* p) {
  Vec v;
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
#endif

// Lane i of the result: a[2i] + a[2i + 1] for pairs of lanes taken by `lo` and `hi` from the two
// vectors (one step of the transpose-and-add).
inline Vec fold(Vec x, Vec y, IVec lo, IVec hi) {
  return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, hi);
}

// out[r] = sum of the lanes of acc[r], r < kLanes: log2(kLanes) folding steps, each halving the
// lanes that hold one row's partial sums (16 -> 8 -> 4 -> 2 -> 1) while packing twice the rows per
// vector.
#if MOSAIC_AVX512
inline Vec reduce_rows(const Vec* acc) {
  const IVec lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const IVec hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const IVec lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const IVec hi4 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const IVec lo2 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const IVec hi2 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const IVec lo1 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const IVec hi1 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  Vec b[8], c[4], d[2];
  for (int j = 0; j < 8; ++j) b[j] = fold(acc[2 * j], acc[2 * j + 1], lo8, hi8);  // rows 2j, 2j+1
  for (int j = 0; j < 4; ++j) c[j] = fold(b[2 * j], b[2 * j + 1], lo4, hi4);      // 4 rows
  for (int j = 0; j < 2; ++j) d[j] = fold(c[2 * j], c[2 * j + 1], lo2, hi2);      // 8 rows
  return fold(d[0], d[1], lo1, hi1);                                               // 16 rows
}
#elif MOSAIC_AVX2
inline Vec reduce_rows(const Vec* acc) {
  const IVec lo4 = {0, 1, 2, 3, 8, 9, 10, 11};
  const IVec hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
  const IVec lo2 = {0, 1, 4, 5, 8, 9, 12, 13};
  const IVec hi2 = {2, 3, 6, 7, 10, 11, 14, 15};
  const IVec lo1 = {0, 2, 4, 6, 8, 10, 12, 14};
  const IVec hi1 = {1, 3, 5, 7, 9, 11, 13, 15};
  Vec c[4], d[2];
  for (int j = 0; j < 4; ++j) c[j] = fold(acc[2 * j], acc[2 * j + 1], lo4, hi4);  // rows 2j, 2j+1
  for (int j = 0; j < 2; ++j) d[j] = fold(c[2 * j], c[2 * j + 1], lo2, hi2);      // 4 rows
  return fold(d[0], d[1], lo1, hi1);                                               // 8 rows
}
#else
inline Vec reduce_rows(const Vec* acc) {
  const IVec lo2 = {0, 1, 4, 5};
  const IVec hi2 = {2, 3, 6, 7};
  const IVec lo1 = {0, 2, 4, 6};
  const IVec hi1 = {1, 3, 5, 7};
  const Vec d[2] = {fold(acc[0], acc[1], lo2, hi2), fold(acc[2], acc[3], lo2, hi2)};  // 2 rows
  return fold(d[0], d[1], lo1, hi1);                                                     // 4 rows
}
#endif

// out[i] = q . rows[i * stride : i * stride + kWidth] for i < count (the row width fixed at
// compile time, so the query and the kLanes rows' sums stay in registers).
template <int kWidth, typename T>
void dot_rows_fixed(const float* q, const T* rows, int64_t count, int64_t stride, float* out) {
  constexpr int kChunks = kWidth / kLanes;
  static_assert(kChunks * kLanes == kWidth, "a whole number of vectors per row");
  Vec qv[kChunks];
  for (int c = 0; c < kChunks; ++c) qv[c] = load_vec(q + c * kLanes);
  auto row_sums = [&](const T* row) {
    Vec sum = qv[0] * load_vec(row);
    for (int c = 1; c < kChunks; ++c) sum += qv[c] * load_vec(row + c * kLanes);
    return sum;
  };
  int64_t i0 = 0;
  for (; i0 + kLanes <= count; i0 += kLanes) {
    Vec acc[kLanes];
    for (int r = 0; r < kLanes; ++r) {
      prefetch_row(rows + (i0 + r + kPrefetchRows) * stride, kWidth);
      acc[r] = row_sums(rows + (i0 + r) * stride);
    }
    const Vec dots = reduce_rows(acc);
    std::memcpy(out + i0, &dots, sizeof dots);
  }
  for (int64_t i = i0; i < count; ++i) {  // the last rows, one horizontal sum each
    const Vec sum = row_sums(rows + i * stride);
    float dot = 0.f;
    for (int l = 0; l < kLanes; ++l) dot += sum[l];
    out[i] = dot;
  }
}

// out[i] = q . rows[i * stride : i * stride + hs] for i < count; false (nothing written) for a
// width this has no fixed-width version of (16, 32, 64, 128 or 256).
template <typename T>
bool dot_rows(const float* q, const T* rows, int64_t count, int64_t stride, int64_t hs,
              float* out) {
  switch (hs) {
    case 16: dot_rows_fixed<16>(q, rows, count, stride, out); return true;
    case 32: dot_rows_fixed<32>(q, rows, count, stride, out); return true;
    case 64: dot_rows_fixed<64>(q, rows, count, stride, out); return true;
    case 128: dot_rows_fixed<128>(q, rows, count, stride, out); return true;
    case 256: dot_rows_fixed<256>(q, rows, count, stride, out); return true;
    default: return false;
  }
}

}  // namespace mosaic
