// Dot products of one query with many key rows, 16 rows at a time, in GCC's portable vector types
// (16 fp32 lanes: one AVX-512 register, two AVX2 ones): each row's partial sums stay in a register
// and the 16 rows are reduced together by a transpose-and-add, instead of one horizontal sum per
// row. The rows may hold fp32, fp16, int8 or fp8 e4m3, widened to fp32 as they are loaded.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mosaic {

typedef float F16 __attribute__((vector_size(64)));  // 16 fp32 lanes
typedef int32_t I16 __attribute__((vector_size(64)));

constexpr int64_t kLanes = 16;

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

// 16 consecutive elements from p, as fp32 lanes.
inline F16 load16(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
#if defined(__AVX512F__)  // the widening loads as single instructions (GCC scalarizes the generic ones)
inline F16 load16(const _Float16* p) {
  return (F16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline F16 load16(const int8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (F16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}
// e4m3 -> fp32 through fp16: the 7 magnitude bits shifted to fp16's bits 13..7 make an fp16 of
// the value x 2^-8 (exponent bias 15 against 7; e4m3's subnormals land on fp16's), the sign bit on
// bit 15 (the sign-extended byte shifted left, bit 14 cleared); then one widening and x 256.
inline F16 load16(const E4M3* p) {
  const __m256i bytes = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i half =
      _mm256_and_si256(_mm256_slli_epi16(bytes, 7), _mm256_set1_epi16(static_cast<int16_t>(0xBF80)));
  return (F16)_mm512_mul_ps(_mm512_cvtph_ps(half), _mm512_set1_ps(256.f));
}
#else
inline F16 load16(const _Float16* p) {
  F16 v;
  for (int l = 0; l < 16; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
inline F16 load16(const int8_t* p) {
  F16 v;
  for (int l = 0; l < 16; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
inline F16 load16(const E4M3* p) {
  F16 v;
  for (int l = 0; l < 16; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
#endif

// Lane i of the result: a[2i] + a[2i + 1] for pairs of lanes taken by `lo` and `hi` from the two
// vectors (one step of the transpose-and-add).
inline F16 fold(F16 x, F16 y, I16 lo, I16 hi) {
  return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, hi);
}

// out[r] = sum of the lanes of acc[r], r < 16: four folding steps, each halving the lanes that
// hold one row's partial sums (16 -> 8 -> 4 -> 2 -> 1) while packing twice the rows per vector.
inline F16 reduce16(const F16* acc) {
  const I16 lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const I16 hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const I16 lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const I16 hi4 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const I16 lo2 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const I16 hi2 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const I16 lo1 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const I16 hi1 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  F16 b[8], c[4], d[2];
  for (int j = 0; j < 8; ++j) b[j] = fold(acc[2 * j], acc[2 * j + 1], lo8, hi8);  // rows 2j, 2j+1
  for (int j = 0; j < 4; ++j) c[j] = fold(b[2 * j], b[2 * j + 1], lo4, hi4);      // 4 rows
  for (int j = 0; j < 2; ++j) d[j] = fold(c[2 * j], c[2 * j + 1], lo2, hi2);      // 8 rows
  return fold(d[0], d[1], lo1, hi1);                                               // 16 rows
}

// out[i] = q . rows[i * stride : i * stride + 16 * kChunks] for i < count (the row width fixed
// at compile time, so the query and the 16 rows' sums stay in registers).
template <int kChunks, typename T>
void dot_rows_fixed(const float* q, const T* rows, int64_t count, int64_t stride, float* out) {
  F16 qv[kChunks];
  for (int c = 0; c < kChunks; ++c) qv[c] = load16(q + c * kLanes);
  auto row_sums = [&](const T* row) {
    F16 sum = qv[0] * load16(row);
    for (int c = 1; c < kChunks; ++c) sum += qv[c] * load16(row + c * kLanes);
    return sum;
  };
  int64_t i0 = 0;
  for (; i0 + kLanes <= count; i0 += kLanes) {
    F16 acc[kLanes];
    for (int r = 0; r < kLanes; ++r) {
      prefetch_row(rows + (i0 + r + kPrefetchRows) * stride, kChunks * kLanes);
      acc[r] = row_sums(rows + (i0 + r) * stride);
    }
    const F16 dots = reduce16(acc);
    std::memcpy(out + i0, &dots, sizeof dots);
  }
  for (int64_t i = i0; i < count; ++i) {  // the last rows, one horizontal sum each
    const F16 sum = row_sums(rows + i * stride);
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
    case 16: dot_rows_fixed<1>(q, rows, count, stride, out); return true;
    case 32: dot_rows_fixed<2>(q, rows, count, stride, out); return true;
    case 64: dot_rows_fixed<4>(q, rows, count, stride, out); return true;
    case 128: dot_rows_fixed<8>(q, rows, count, stride, out); return true;
    case 256: dot_rows_fixed<16>(q, rows, count, stride, out); return true;
    default: return false;
  }
}

}  // namespace mosaic
