// mosaic::AssociativeMemory as a native ONNX Runtime CPU kernel (the contract: __init__.py).
//
// One work item per (row b, head h), run on ONNX Runtime's own thread pool. Every query of the
// chunk keeps an online softmax; the stored pairs stream through block by block (each block read
// from memory once, for all the chunk's queries, which fold into it 6 at a time from registers,
// each over the span of pairs it can see), then the chunk's new pairs:
//   scores[s] = beta(n_t) q_t . k_s   where pair s is visible (mosaicrt.ops.geometry)
//   y_t = sum_s softmax(scores)_s v_s, 0 when nothing is visible.
// Products and softmax in fp32 whatever the stores hold (fp32, fp16, or int8 or fp8 e4m3 bits with
// a scale per pair and head: AssociativeMemoryInt8 and -Fp8, the scales applied to the scores and
// the softmax weights).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../ort_common.h"
#include "../ort_simd.h"

namespace mosaic {

struct MemoryShape {
  int64_t B, C, H, hs;  // q, new_k, new_v: (B, C, H, hs)
  int64_t NB, S;        // store_blocks (B, NB); store_tau (NB, B, S); pool blocks of S pairs
};

struct MemoryInputs {
  const float* q;
  const int64_t* t;
  const void* store_k;            // pools (P, H, S, hs): block p holds S pairs of every head
  const void* store_v;
  const int64_t* store_blocks;    // (B, NB): row b's block i is pool block store_blocks[b, i]
  const int64_t* store_tau;
  const float* new_k;
  const float* new_v;
  const int64_t* new_tau;
  const float* beta0;
  const float* beta1;
  const float* alpha;
  const float* store_k_scale;  // AssociativeMemoryInt8: (P, H, S); nullptr for fp stores
  const float* store_v_scale;
};

// Decode: value columns summed in registers at a time (4 vectors of AVX-512, 8 of AVX2: a head of
// 64 in one pass over its values, which a pass per half would read as two strided streams; 8 of 4
// lanes elsewhere, 32 columns).
#if MOSAIC_AVX512
constexpr int64_t kTileVectors = 4;
#else
constexpr int64_t kTileVectors = 8;
#endif
constexpr int64_t kTile = kTileVectors * kLanes;
// A chunk's queries: pairs scored, and value columns summed, in registers at a time (4 vectors).
constexpr int64_t kPairTile = 4 * kLanes;

// exp(kExpFloor) = 1.6e-38 is the least exp the softmax weights compute (FLT_MIN is 1.2e-38).
constexpr float kExpFloor = -87.f;

// Pair 0 of head h in row b's stored block blk, as an index into a pool (P, H, S[, hs]).
inline int64_t block_pair0(const MemoryInputs& in, const MemoryShape& s, int64_t b, int64_t blk,
                           int64_t h) {
  return (in.store_blocks[b * s.NB + blk] * s.H + h) * s.S;
}

// The scales from pair `pair` on, or nullptr for fp stores (which have none).
inline const float* scale_at(const float* scales, int64_t pair) {
  return scales != nullptr ? scales + pair : nullptr;
}

// Online-softmax state of one query over the pairs seen so far: y = acc / l, scores shifted by m.
struct Softmax {
  float m = kNoScore;
  float l = 0.f;
  std::vector<float> acc;
  explicit Softmax(int64_t hs) : acc(hs, 0.f) {}
};

// acc[0:kTile] += sum_i weight[i] * values[i * stride + 0:kTile], the kTile sums held in registers
// (accumulating in memory would chain every pair's update through a store and a load).
template <typename T>
void add_weighted_tile(const float* weight, const T* values, int64_t count, int64_t stride,
                       float* acc) {
  Vec sums[kTileVectors] = {};
  for (int64_t i = 0; i < count; ++i) {
    const float w = weight[i];
    const T* v = values + i * stride;
    prefetch_row(v + kPrefetchRows * stride, kTile);
    for (int c = 0; c < kTileVectors; ++c) sums[c] += w * load_vec(v + c * kLanes);
  }
  for (int64_t d = 0; d < kTile; ++d) acc[d] += sums[d / kLanes][d % kLanes];
}

// The softmax bookkeeping of folding `count` scores (kNoScore: not visible) into `state`:
// weight[i] = exp(score[i] - m) for the new running max m, the state's sums rescaled to m and the
// weights' sum added. False, state untouched, when no score is visible.
inline bool softmax_update(const float* score, int64_t count, Softmax& state, float* weight) {
  float best = kNoScore;
  for (int64_t i = 0; i < count; ++i) best = std::max(best, score[i]);
  if (best <= kNoScore) return false;  // nothing visible in these pairs
  const float m = std::max(state.m, best);
  // 0 before any weight; 1 (no exp, no rescaling) while the running max holds
  const float rescale = state.l == 0.f ? 0.f : m == state.m ? 1.f : std::exp(state.m - m);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) {
    // exp only of arguments where it is a normal float: the vector exp takes a slow scalar path
    // for any lane that underflows. Below, the weight is 0 (an invisible pair's kNoScore too),
    // where exp would give at most 1.2e-38 against the largest weight's 1.
    const float x = score[i] - m;
    const float e = std::exp(std::max(x, kExpFloor));
    weight[i] = x < kExpFloor ? 0.f : e;
    sum += weight[i];
  }
  if (rescale != 1.f)
    for (float& a : state.acc) a *= rescale;
  state.l = state.l * rescale + sum;
  state.m = m;
  return true;
}

// acc[0:hs] += sum_i weight[i] * values[i * stride + 0:hs], kTile columns at a time in registers.
template <typename T>
void add_weighted(const float* weight, const T* values, int64_t count, int64_t stride, int64_t hs,
                  float* acc) {
  if (hs % kTile == 0) {
    for (int64_t d0 = 0; d0 < hs; d0 += kTile)
      add_weighted_tile(weight, values + d0, count, stride, acc + d0);
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const T* v = values + i * stride;
    const float w = weight[i];
#pragma omp simd
    for (int64_t d = 0; d < hs; ++d) acc[d] += w * static_cast<float>(v[d]);
  }
}

// weight[i] *= value_scale[i] for scaled stores (pair i's value is values[i] * value_scale[i]);
// nothing for fp stores (value_scale nullptr).
inline void scale_weights(float* weight, const float* value_scale, int64_t count) {
  if (value_scale == nullptr) return;
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) weight[i] *= value_scale[i];
}

// Folds `count` pairs (value rows `stride` elements apart) into `state`; score[i] is the query's
// score of pair i, kNoScore where the pair is not visible.
// value_scale (nullable): pair i's value is values[i] * value_scale[i].
template <typename T>
void fold_pairs(const float* score, const T* values, const float* value_scale, int64_t count,
                int64_t stride, int64_t hs, Softmax& state, float* weight) {
  if (!softmax_update(score, count, state, weight)) return;
  scale_weights(weight, value_scale, count);
  add_weighted(weight, values, count, stride, hs, state.acc.data());
}

// Scores of `count` pairs (key rows `stride` elements apart) against the scaled query qb;
// kNoScore for the invisible ones. One dot product per pair (kLanes pairs reduced together, every
// slot: an invisible one is masked after): what a single query (decode) reads.
// key_scale (nullable): pair i's key is keys[i] * key_scale[i].
template <typename T>
void score_pairs(const float* qb, const T* keys, const float* key_scale, const int64_t* tau,
                 int64_t count, int64_t stride, int64_t hs, int64_t t, int64_t window,
                 int64_t delay, float* score) {
  if (!dot_rows(qb, keys, count, stride, hs, score)) {  // a width without a fixed-width version
    for (int64_t i = 0; i < count; ++i) {
      const T* k = keys + i * stride;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < hs; ++d) dot += qb[d] * static_cast<float>(k[d]);
      score[i] = dot;
    }
  }
  for (int64_t i = 0; i < count; ++i) {
    const float dot = key_scale != nullptr ? score[i] * key_scale[i] : score[i];
    score[i] = visible(t, tau[i], window, delay) ? dot : kNoScore;
  }
}

// The pairs [first, last) of a set (tau per pair) outside which no query at t_min..t_max sees
// any: a partly filled block or ring is read only as far as it holds visible pairs (those inside
// the span that a query cannot see are masked as usual). first == last when none is visible.
inline std::pair<int64_t, int64_t> visible_span(const int64_t* tau, int64_t count, int64_t t_min,
                                                int64_t t_max, int64_t window, int64_t delay) {
  int64_t first = count, last = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (tau[i] >= 0 && tau[i] <= t_max - delay && t_min - tau[i] <= window - 1) {
      first = std::min(first, i);
      last = i + 1;
    }
  }
  return {std::min(first, last), last};
}

// A prefill chunk's queries are folded kQueries at a time: each widened key and value loaded
// from cache serves all of them, and their sums fill the registers: with AVX-512, 6 x 4 vectors
// of 16 lanes, with the 4 loaded ones 28 of its 32 registers (6 ran faster than 4 queries); with
// AVX2, 3 x 4 vectors of 8 lanes, with the 4 loaded ones all 16 (3 ran faster than 2 or 4; so
// did 3 of 4 lanes with SSE's 16 registers).
#if MOSAIC_AVX512
constexpr int64_t kQueries = 6;
#else
constexpr int64_t kQueries = 3;
#endif

// score[k * stride + i] = q[k] . keys_t[:, i] for k < kQueries and i from lo to hi rounded up to
// kPairTile pairs (keys_t: hs rows of `stride` pairs, zero past the set's end, as far as
// hi + kPairTile).
inline void score_queries(const float* const* q, const float* keys_t, int64_t stride, int64_t lo,
                          int64_t hi, int64_t hs, float* score) {
  static_assert(kPairTile == 4 * kLanes, "four vectors of pairs");
  for (int64_t i0 = lo; i0 < hi; i0 += kPairTile) {
    Vec sums[kQueries][4] = {};
    for (int64_t d = 0; d < hs; ++d) {
      const float* row = keys_t + d * stride + i0;
      const Vec k[4] = {load_vec(row), load_vec(row + kLanes), load_vec(row + 2 * kLanes),
                        load_vec(row + 3 * kLanes)};
      for (int64_t j = 0; j < kQueries; ++j)
        for (int v = 0; v < 4; ++v) sums[j][v] += q[j][d] * k[v];
    }
    for (int64_t j = 0; j < kQueries; ++j)
      std::memcpy(score + j * stride + i0, sums[j], sizeof sums[j]);
  }
}

// acc[k][d0 : d0 + kLanes kVectors] += sum over i in [lo, hi) of weight[k][i] * values[i * stride + d0 ...]
// for k < kQueries: every query's sums of those columns held in registers.
template <int kVectors>
void add_weighted_queries(float* const* weight, int64_t lo, int64_t hi, const float* values,
                          int64_t stride, int64_t d0, float* const* acc) {
  Vec sums[kQueries][kVectors] = {};
  for (int64_t i = lo; i < hi; ++i) {
    Vec v[kVectors];
    for (int c = 0; c < kVectors; ++c) v[c] = load_vec(values + i * stride + d0 + c * kLanes);
    for (int64_t j = 0; j < kQueries; ++j) {
      const float w = weight[j][i];
      for (int c = 0; c < kVectors; ++c) sums[j][c] += w * v[c];
    }
  }
  for (int64_t j = 0; j < kQueries; ++j)
    for (int c = 0; c < kVectors; ++c)
      for (int l = 0; l < kLanes; ++l) acc[j][d0 + c * kLanes + l] += sums[j][c][l];
}

// Widened pairs (C > 1), fp32 whatever the stores hold: keys transposed (hs rows of `stride`
// pairs, scaled, zero from `count` on) and values (count rows `value_stride` apart; their scales
// stay with the weights, `value_scale`). full: no empty slot; then every pair is visible to a query
// at t where t - tau_max >= delay and t - tau_min < window.
struct WidePairs {
  const float* keys_t;
  const float* values;
  const float* value_scale;
  const int64_t* tau;
  int64_t count, stride, value_stride;
  int64_t tau_min, tau_max;
  bool full;
};

// Scratch of one work item for the chunk path: the widened pairs, and kQueries rows of scores
// and of weights.
struct ChunkScratch {
  std::vector<float> keys_t, values, score, weight;
  ChunkScratch(int64_t most, int64_t hs, bool chunk)
      : keys_t(chunk ? hs * (most + kPairTile) : 0), values(chunk ? most * hs : 0),
        score(chunk ? kQueries * (most + kPairTile) : most),
        weight(chunk ? kQueries * (most + kPairTile) : most) {}
};

// Queries c < nq (nq <= kQueries; qb rows hs apart, at positions t) folded over the widened
// pairs, scored only over the span that one of them sees.
inline void fold_queries(const WidePairs& set, const float* qb, const int64_t* t, int64_t nq,
                         int64_t hs, int64_t window, int64_t delay, Softmax* const* states,
                         ChunkScratch& scratch) {
  const auto [t_min, t_max] = std::minmax_element(t, t + nq);
  // Every pair visible to every query (a stored block well behind the chunk): no span to find
  // and no mask to apply.
  const bool all_seen =
      set.full && *t_min - set.tau_max >= delay && *t_max - set.tau_min <= window - 1;
  const auto [lo, hi] = all_seen
                            ? std::pair<int64_t, int64_t>{0, set.count}
                            : visible_span(set.tau, set.count, *t_min, *t_max, window, delay);
  if (lo == hi) return;
  const float* q[kQueries];
  float* weight[kQueries];
  std::vector<float> unused(nq < kQueries ? hs : 0);
  float* acc[kQueries];
  for (int64_t j = 0; j < kQueries; ++j) {
    q[j] = qb + std::min(j, nq - 1) * hs;  // beyond nq: a repeat, its results dropped
    weight[j] = scratch.weight.data() + j * set.stride;
    acc[j] = j < nq ? states[j]->acc.data() : unused.data();
  }
  score_queries(q, set.keys_t, set.stride, lo, hi, hs, scratch.score.data());
  for (int64_t j = 0; j < kQueries; ++j) {
    float* score = scratch.score.data() + j * set.stride;
    if (j < nq && !all_seen)
      for (int64_t i = lo; i < hi; ++i)
        if (!visible(t[j], set.tau[i], window, delay)) score[i] = kNoScore;
    if (j >= nq || !softmax_update(score + lo, hi - lo, *states[j], weight[j] + lo)) {
      std::fill(weight[j] + lo, weight[j] + hi, 0.f);  // adds nothing to its sums
      continue;
    }
    scale_weights(weight[j] + lo, scale_at(set.value_scale, lo), hi - lo);
  }
  if (hs % kLanes != 0) {  // a width without register tiles: one query at a time
    for (int64_t j = 0; j < nq; ++j)
      add_weighted(weight[j] + lo, set.values + lo * set.value_stride, hi - lo,
                   set.value_stride, hs, acc[j]);
    return;
  }
  const int64_t vs = set.value_stride;
  for (int64_t d0 = 0; d0 < hs; d0 += kPairTile) {
    switch (std::min<int64_t>(4, (hs - d0) / kLanes)) {
      case 4: add_weighted_queries<4>(weight, lo, hi, set.values, vs, d0, acc); break;
      case 3: add_weighted_queries<3>(weight, lo, hi, set.values, vs, d0, acc); break;
      case 2: add_weighted_queries<2>(weight, lo, hi, set.values, vs, d0, acc); break;
      default: add_weighted_queries<1>(weight, lo, hi, set.values, vs, d0, acc); break;
    }
  }
}

// One set of pairs (a store block, or the chunk's new pairs) folded into every query's softmax.
template <typename T>
struct PairSet {
  const T* keys;
  const T* values;
  const int64_t* tau;
  int64_t count, stride;  // pairs, elements between consecutive pairs' rows
  const float* key_scale = nullptr;  // int8, fp8 stores: per pair
  const float* value_scale = nullptr;
};

// Folds a set of pairs into the softmaxes of a chunk's C queries (positions t): for one query, its
// pairs read as stored; for several, widened once to fp32 and folded kQueries queries at a time.
template <typename T>
void fold_set(const PairSet<T>& whole, const float* qb, const int64_t* t, int64_t C, int64_t hs,
              int64_t window, int64_t delay, std::vector<Softmax>& states, ChunkScratch& scratch) {
  const auto [t_min, t_max] = std::minmax_element(t, t + C);
  const auto [first, last] = visible_span(whole.tau, whole.count, *t_min, *t_max, window, delay);
  if (first == last) return;
  const int64_t skip = first * whole.stride, count = last - first;
  const T* keys = whole.keys + skip;
  const T* values = whole.values + skip;
  const float* key_scale = scale_at(whole.key_scale, first);
  const float* value_scale = scale_at(whole.value_scale, first);
  if (C == 1) {
    float* score = scratch.score.data();
    score_pairs(qb, keys, key_scale, whole.tau + first, count, whole.stride, hs, t[0], window,
                delay, score);
    fold_pairs(score, values, value_scale, count, whole.stride, hs, states[0],
               scratch.weight.data());
    return;
  }
  const int64_t stride = count + kPairTile;  // room for the last tile's reads past `count`
  float* keys_t = scratch.keys_t.data();
  for (int64_t d = 0; d < hs; ++d) {
    float* row = keys_t + d * stride;
    for (int64_t i = 0; i < count; ++i)
      row[i] = static_cast<float>(keys[i * whole.stride + d]) *
               (key_scale != nullptr ? key_scale[i] : 1.f);
    std::fill(row + count, row + stride, 0.f);
  }
  const float* wide_values = scratch.values.data();
  int64_t value_stride = hs;
  if constexpr (std::is_same_v<T, float>) {  // read in place
    wide_values = values;
    value_stride = whole.stride;
  } else {
    for (int64_t i = 0; i < count; ++i)
      for (int64_t d = 0; d < hs; ++d)
        scratch.values[i * hs + d] = static_cast<float>(values[i * whole.stride + d]);
  }
  const int64_t* tau = whole.tau + first;
  const auto [tau_min, tau_max] = std::minmax_element(tau, tau + count);
  const WidePairs set{keys_t, wide_values, value_scale, tau, count, stride, value_stride,
                      *tau_min, *tau_max, *tau_min >= 0};
  for (int64_t c0 = 0; c0 < C; c0 += kQueries) {
    const int64_t nq = std::min(kQueries, C - c0);
    Softmax* tile[kQueries] = {};
    for (int64_t j = 0; j < nq; ++j) tile[j] = &states[c0 + j];
    fold_queries(set, qb + c0 * hs, t + c0, nq, hs, window, delay, tile, scratch);
  }
}

// out[0:hs] = a query's retrieval, acc / l (0 when it saw nothing); NaN when its scaled query
// holds a NaN, as the function body gives (code compiled with -ffast-math cannot be trusted to
// carry a NaN through its max and exp).
inline void write_output(const Softmax& state, const float* query, int64_t hs, float* out) {
  bool nan = false;
  for (int64_t d = 0; d < hs; ++d) nan |= is_nan(query[d]);
  const float inv = state.l > 0.f ? 1.f / state.l : 0.f;
  for (int64_t d = 0; d < hs; ++d)
    out[d] = nan ? std::numeric_limits<float>::quiet_NaN() : state.acc[d] * inv;
}

// Every query of row b, head h: the stored blocks, then the chunk's own pairs.
template <typename T>
void memory_row_head(const MemoryInputs& in, const MemoryShape& s, int64_t window, int64_t delay,
                     int64_t b, int64_t h, float* y) {
  const int64_t hs = s.hs, C = s.C, most = std::max(s.S, C);
  const int64_t* t = in.t + b * C;
  std::vector<float> qb(C * hs);
  ChunkScratch scratch(most, hs, C > 1);
  std::vector<Softmax> states(C, Softmax(hs));
  for (int64_t c = 0; c < C; ++c) {  // beta(n_t) folded into the query
    const float n = static_cast<float>(visible_count(t[c], window, delay));
    const float beta = in.beta1[h] * std::pow(n, in.alpha[h]) + in.beta0[h];
    const float* q = in.q + ((b * C + c) * s.H + h) * hs;
    for (int64_t d = 0; d < hs; ++d) qb[c * hs + d] = q[d] * beta;
  }
  const T* store_k = static_cast<const T*>(in.store_k);
  const T* store_v = static_cast<const T*>(in.store_v);
  for (int64_t blk = 0; blk < s.NB; ++blk) {
    const int64_t pair0 = block_pair0(in, s, b, blk, h), at = pair0 * hs;
    const PairSet<T> block{store_k + at, store_v + at, in.store_tau + (blk * s.B + b) * s.S,
                           s.S, hs, scale_at(in.store_k_scale, pair0),
                           scale_at(in.store_v_scale, pair0)};
    fold_set(block, qb.data(), t, C, hs, window, delay, states, scratch);
  }
  const int64_t at = (b * C * s.H + h) * hs;  // new pair j: row j of (C, H, hs)
  const PairSet<float> fresh{in.new_k + at, in.new_v + at, in.new_tau + b * C, C, s.H * hs};
  fold_set(fresh, qb.data(), t, C, hs, window, delay, states, scratch);
  for (int64_t c = 0; c < C; ++c) {
    float* out = y + ((b * C + c) * s.H + h) * hs;
    write_output(states[c], qb.data() + c * hs, hs, out);
  }
}

// Decode: the stored blocks of all rows are cut into about this many work items, so that every
// thread of the pool reads a share even at batch 1 (one core alone reads memory at about half
// the bandwidth of two).
constexpr int64_t kDecodeItems = 16;

// Decode (one query per row), the stored part: work item (b, r, heads) folds blocks
// [r * per_range, ...) of heads [h0, h1) of row b into partial softmaxes. A pool block holds all
// heads, each head's pairs after the last's: the block's keys are scored for all those heads in
// one contiguous run, then their values are folded in another (rather than a short run of keys,
// then of values, head after head).
template <typename T>
void decode_block_range(const MemoryInputs& in, const MemoryShape& s, int64_t window,
                        int64_t delay, int64_t b, int64_t range, int64_t per_range, int64_t h0,
                        int64_t h1, const std::vector<float>& qb, std::vector<Softmax>& partial) {
  const int64_t hs = s.hs, t = in.t[b];
  std::vector<float> score((h1 - h0) * s.S), weight(s.S);  // score: (h1 - h0, S)
  const int64_t first = range * per_range, last = std::min(s.NB, first + per_range);
  const T* store_k = static_cast<const T*>(in.store_k);
  const T* store_v = static_cast<const T*>(in.store_v);
  for (int64_t blk = first; blk < last; ++blk) {
    const int64_t* tau = in.store_tau + (blk * s.B + b) * s.S;
    const auto [lo, hi] = visible_span(tau, s.S, t, t, window, delay);  // same for every head
    if (lo == hi) continue;
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t pair0 = block_pair0(in, s, b, blk, h) + lo;
      score_pairs(qb.data() + (b * s.H + h) * hs, store_k + pair0 * hs,
                  scale_at(in.store_k_scale, pair0), tau + lo, hi - lo, hs, hs, t, window, delay,
                  score.data() + (h - h0) * s.S);
    }
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t pair0 = block_pair0(in, s, b, blk, h) + lo;
      fold_pairs(score.data() + (h - h0) * s.S, store_v + pair0 * hs,
                 scale_at(in.store_v_scale, pair0), hi - lo, hs, hs, partial[h], weight.data());
    }
  }
}

// Merges partial softmaxes of the same query into `into` (the same sums, rescaled to one max).
inline void merge_softmax(Softmax& into, const Softmax& part) {
  if (part.l == 0.f) return;
  const float m = std::max(into.m, part.m);
  const float a = std::exp(into.m - m), c = std::exp(part.m - m);
  for (size_t d = 0; d < into.acc.size(); ++d) into.acc[d] = into.acc[d] * a + part.acc[d] * c;
  into.l = into.l * a + part.l * c;
  into.m = m;
}

// Decode: row b's new pair (C = 1) folded into head h's softmax, and the head's output written.
inline void finish_decode(const MemoryInputs& in, const MemoryShape& s, int64_t window,
                          int64_t delay, const float* qb, int64_t b, int64_t h, Softmax& state,
                          float* y) {
  const int64_t at = (b * s.H + h) * s.hs;  // q, new_k, new_v, y: (B, 1, H, hs)
  float score, weight;
  score_pairs(qb + at, in.new_k + at, nullptr, in.new_tau + b, 1, s.H * s.hs, s.hs, in.t[b],
              window, delay, &score);
  fold_pairs(&score, in.new_v + at, nullptr, 1, s.H * s.hs, s.hs, state, &weight);
  write_output(state, qb + at, s.hs, y + at);
}

// Decode for every row and head: the stored blocks on the thread pool, in work items of a range
// of a row's blocks and a group of its heads; then per (b, h) the ranges' partial softmaxes
// merged and the new pair folded in (by the work item itself when it read all of the row's
// blocks).
template <typename T>
void memory_decode(const Ort::KernelContext& ctx, const MemoryInputs& in, const MemoryShape& s,
                   int64_t window, int64_t delay, float* y) {
  const int64_t hs = s.hs;
  const int64_t per_range = std::max<int64_t>(1, (s.B * s.NB + kDecodeItems - 1) / kDecodeItems);
  const int64_t ranges = (s.NB + per_range - 1) / per_range;  // per row
  std::vector<float> qb(s.B * s.H * hs);  // beta(n_t) folded into the query
  for (int64_t b = 0; b < s.B; ++b) {
    const float n = static_cast<float>(visible_count(in.t[b], window, delay));
    for (int64_t h = 0; h < s.H; ++h) {
      const float beta = in.beta1[h] * std::pow(n, in.alpha[h]) + in.beta0[h];
      for (int64_t d = 0; d < hs; ++d)
        qb[(b * s.H + h) * hs + d] = in.q[(b * s.H + h) * hs + d] * beta;
    }
  }
  // Rows of few blocks (a ring is one) are cut by heads too, so that every thread reads a share.
  const int64_t groups = std::clamp<int64_t>(kDecodeItems / std::max<int64_t>(s.B * ranges, 1),
                                             1, s.H);
  const int64_t per_group = (s.H + groups - 1) / groups;
  // A partial softmax per range of a row and head (one, left empty, for a table of no blocks).
  const int64_t per_row = std::max<int64_t>(ranges, 1);
  std::vector<std::vector<Softmax>> partial(s.B * per_row, std::vector<Softmax>(s.H, Softmax(hs)));
  parallel_for(ctx, s.B * ranges * groups, s.B * s.H * hs * s.NB * s.S, [&](size_t i) {
    const int64_t item = i / groups, h0 = static_cast<int64_t>(i % groups) * per_group;
    const int64_t b = item / ranges, h1 = std::min(s.H, h0 + per_group);
    decode_block_range<T>(in, s, window, delay, b, item % ranges, per_range, h0, h1, qb,
                          partial[item]);
    if (ranges == 1)  // the item read all of the row's blocks: its heads are done
      for (int64_t h = h0; h < h1; ++h)
        finish_decode(in, s, window, delay, qb.data(), b, h, partial[item][h], y);
  });
  if (ranges == 1) return;
  parallel_for(ctx, s.B * s.H, s.B * s.H * hs * per_row, [&](size_t i) {  // the ranges merged
    const int64_t b = i / s.H, h = i % s.H;
    Softmax& state = partial[b * per_row][h];
    for (int64_t r = 1; r < ranges; ++r) merge_softmax(state, partial[b * per_row + r][h]);
    finish_decode(in, s, window, delay, qb.data(), b, h, state, y);
  });
}

// Appending (fp32/fp16 stores, in a session that asks for it: ort_library.cc): the chunk's new
// pairs written into the stores in place, once every query of the op has read them. Pair tau of
// row b goes to slot tau % S of block store_blocks[b, tau / S]; for a ring (a memory with a
// window: one block per row) to slot tau % S of the row's block, the chunk's newest S pairs only.
// Each (row, head) writes blocks no other row holds (a row writes only its own newest block).
template <typename T>
void append_pairs(const Ort::KernelContext& ctx, const MemoryInputs& in, const MemoryShape& s,
                  bool ring, T* store_k, T* store_v) {
  const int64_t hs = s.hs;
  if (ring && s.NB != 1)
    throw Ort::Exception("AssociativeMemory: a ring is one block per row", ORT_FAIL);
  for (int64_t i = 0; i < s.B * s.C; ++i)
    if (!ring && in.new_tau[i] >= 0 && in.new_tau[i] / s.S >= s.NB)
      throw Ort::Exception(
          "AssociativeMemory: appending pair " + std::to_string(in.new_tau[i]) +
              " needs its block in store_blocks, which has " + std::to_string(s.NB) + " columns",
          ORT_FAIL);
  parallel_for(ctx, s.B * s.H, s.B * s.C * s.H * hs, [&](size_t i) {
    const int64_t b = i / s.H, h = i % s.H;
    const int64_t* tau = in.new_tau + b * s.C;
    const int64_t newest = *std::max_element(tau, tau + s.C);
    for (int64_t c = 0; c < s.C; ++c) {
      if (tau[c] < 0 || (ring && tau[c] <= newest - s.S)) continue;
      const int64_t pair = block_pair0(in, s, b, ring ? 0 : tau[c] / s.S, h) + tau[c] % s.S;
      const int64_t at = ((b * s.C + c) * s.H + h) * hs;  // new_k, new_v (B, C, H, hs)
      for (int64_t d = 0; d < hs; ++d) {
        store_k[pair * hs + d] = static_cast<T>(in.new_k[at + d]);
        store_v[pair * hs + d] = static_cast<T>(in.new_v[at + d]);
      }
    }
  });
}

// What the stores hold: AssociativeMemory's fp32/fp16, or (with their scales as inputs 12 and
// 13) AssociativeMemoryInt8's int8 or AssociativeMemoryFp8's e4m3 bits (in int8 tensors).
enum class Stores { kFloat, kInt8, kFp8 };

// The shape of a retrieval from q (B, C, H, hs), a store (P, H, S, hs) and its block table
// (B, NB), whose every entry must name a pool block.
inline MemoryShape memory_shape(const std::vector<int64_t>& q, const std::vector<int64_t>& store,
                                const std::vector<int64_t>& blocks, const int64_t* table) {
  const MemoryShape s{q[0], q[1], q[2], q[3], blocks[1], store[2]};
  if (blocks[0] != s.B)
    throw Ort::Exception("AssociativeMemory: store_blocks must have a row per query row",
                         ORT_FAIL);
  for (int64_t i = 0; i < s.B * s.NB; ++i)
    if (table[i] < 0 || table[i] >= store[0])
      throw Ort::Exception("AssociativeMemory: store_blocks names a block outside the pool",
                           ORT_FAIL);
  return s;
}

// y (B, C, H, hs) from stores of `type` (`stores` says which kind), then, with append, the new
// pairs written into fp32/fp16 stores: what AssociativeMemory's kernel runs, and LayerMemories'
// (ort_layer_memories.h) for each of its memories.
inline void retrieve(const Ort::KernelContext& ctx, const MemoryInputs& in, const MemoryShape& s,
                     int64_t window, int64_t delay, Stores stores, ONNXTensorElementDataType type,
                     bool append, float* y) {
  auto run = [&](auto zero) {
    using T = decltype(zero);
    if (s.C == 1 && s.NB > 1) {  // decode over a long store: contiguous block ranges
      memory_decode<T>(ctx, in, s, window, delay, y);
    } else {
      const int64_t cost = s.B * s.C * s.H * s.hs * (s.NB * s.S + s.C);
      parallel_for(ctx, s.B * s.H, cost, [&](size_t i) {
        memory_row_head<T>(in, s, window, delay, i / s.H, i % s.H, y);
      });
    }
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, _Float16>) {
      if (append)  // the stores are the caller's buffers, bound in place
        append_pairs<T>(ctx, in, s, window < kNoWindow,
                        const_cast<T*>(static_cast<const T*>(in.store_k)),
                        const_cast<T*>(static_cast<const T*>(in.store_v)));
    }
  };
  if ((stores != Stores::kFloat) != (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8))
    throw Ort::Exception(
        "AssociativeMemoryInt8 and -Fp8 take int8 stores (-Fp8: e4m3 bits), AssociativeMemory "
        "fp ones", ORT_FAIL);
  if (stores == Stores::kInt8) {
    run(int8_t{});
  } else if (stores == Stores::kFp8) {
    run(E4M3{});
  } else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    run(float{});
  } else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
    run(_Float16{});
  } else {
    throw Ort::Exception("AssociativeMemory: stores must be float32 or float16", ORT_FAIL);
  }
}

struct AssociativeMemoryKernel {
  int64_t window, delay;
  Stores stores;
  bool append;  // fp32/fp16 stores: write the new pairs into them (append_pairs)

  AssociativeMemoryKernel(const OrtKernelInfo* info, Stores kind, bool append)
      : stores(kind), append(append && kind == Stores::kFloat) {
    Ort::ConstKernelInfo kernel_info(info);
    window = kernel_info.GetAttribute<int64_t>("window");
    delay = kernel_info.GetAttribute<int64_t>("delay");
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] { compute(context); });
  }

  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto q = ctx.GetInput(0), store_k = ctx.GetInput(2), store_v = ctx.GetInput(3);
    auto store_blocks = ctx.GetInput(4);
    const auto q_shape = shape_of(q, 4, "q");
    const int64_t* table = store_blocks.GetTensorData<int64_t>();
    const MemoryShape s = memory_shape(q_shape, shape_of(store_k, 4, "store_k"),
                                       shape_of(store_blocks, 2, "store_blocks"), table);
    const auto type = store_k.GetTensorTypeAndShapeInfo().GetElementType();
    if (store_v.GetTensorTypeAndShapeInfo().GetElementType() != type)
      throw Ort::Exception("AssociativeMemory: store_k and store_v differ in type", ORT_FAIL);
    const bool scaled = stores != Stores::kFloat;
    const MemoryInputs in{
        q.GetTensorData<float>(),
        ctx.GetInput(1).GetTensorData<int64_t>(),
        store_k.GetTensorRawData(),
        store_v.GetTensorRawData(),
        table,
        ctx.GetInput(5).GetTensorData<int64_t>(),
        ctx.GetInput(6).GetTensorData<float>(),
        ctx.GetInput(7).GetTensorData<float>(),
        ctx.GetInput(8).GetTensorData<int64_t>(),
        ctx.GetInput(9).GetTensorData<float>(),
        ctx.GetInput(10).GetTensorData<float>(),
        ctx.GetInput(11).GetTensorData<float>(),
        scaled ? ctx.GetInput(12).GetTensorData<float>() : nullptr,
        scaled ? ctx.GetInput(13).GetTensorData<float>() : nullptr,
    };
    float* y = ctx.GetOutput(0, q_shape).GetTensorMutableData<float>();
    retrieve(ctx, in, s, window, delay, stores, type, append, y);
  }
};

// AssociativeMemory (fp32/fp16 stores, 12 inputs), AssociativeMemoryInt8 (int8 stores and their
// two scales, 14 inputs) or AssociativeMemoryFp8 (e4m3 bits and their scales): one kernel.
// append: the fp32/fp16 kernel also writes the new pairs into the stores (append_pairs).
template <Stores kStores>
struct AssociativeMemoryOpT
    : Ort::CustomOpBase<AssociativeMemoryOpT<kStores>, AssociativeMemoryKernel, true> {
  bool append;
  explicit AssociativeMemoryOpT(bool append = false) : append(append) {}
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new AssociativeMemoryKernel(info, kStores, append); });
  }
  const char* GetName() const {
    return kStores == Stores::kInt8  ? "AssociativeMemoryInt8"
           : kStores == Stores::kFp8 ? "AssociativeMemoryFp8"
                                     : "AssociativeMemory";
  }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kStores == Stores::kFloat ? 12 : 14; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case 1: case 4: case 5: case 8:  // t, store_blocks, taus
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      case 2: case 3:  // stores
        return kStores == Stores::kFloat ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
                                         : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};
using AssociativeMemoryOp = AssociativeMemoryOpT<Stores::kFloat>;
using AssociativeMemoryInt8Op = AssociativeMemoryOpT<Stores::kInt8>;
using AssociativeMemoryFp8Op = AssociativeMemoryOpT<Stores::kFp8>;

}  // namespace mosaic
