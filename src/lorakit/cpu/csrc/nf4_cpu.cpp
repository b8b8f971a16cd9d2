// lorakit CPU kernels for blockwise 4-bit (NF4 / FP4) weights in bitsandbytes' layout, AVX512-BF16.
//
// Built on first use by lorakit/cpu/kernels.py (g++, a few hundred milliseconds) and called through ctypes
// with raw pointers; threads come from ATen's own OpenMP pool (at::parallel_for), so they follow
// torch.set_num_threads and never oversubscribe the machine.
//
// Layout (see lorakit/quant/nf4.py): a weight of n elements, flattened row-major, is stored two 4-bit code indices
// a byte (element 2i in the high nibble), one float32 scale per block of `bs` elements, the scales optionally
// double-quantized (scale_i = code8[q_i] * nested[i / 256] + offset, in float32, in that order).
//
// lk_dequant_4bit: w = code[idx] * scale (float32), written as float32 or rounded to bfloat16 (nearest even, as
//   torch's .to(torch.bfloat16)); bit-identical to lorakit.quant.dequantize_4bit, except that bfloat16 output
//   flushes values below 2^-126 to 0 (vcvtne2ps2bf16; a 4-bit code times a block absmax is never that small).
// lk_gemm_4bit_bf16: y (M, N) float32 = x (M, K) bfloat16 @ W^T, W (N, K) dequantized to bfloat16 (the same values
//   as lk_dequant_4bit) a tile of 32 rows at a time into a buffer laid out in bfloat16 pairs along K, never as a
//   whole; dot products in float32 (vdpbf16ps). Needs K % bs == 0 (blocks never straddle rows).
//
// Compile with -ffp-contract=off: scale and weight products must round exactly as torch's separate ops do.

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace {

struct Scales {
  const float* absmax;   // float32 scales, or nullptr when double-quantized
  const uint8_t* q;      // 8-bit scale codes (double quantization)
  const float* code8;    // 256 values
  const float* nested;   // one float32 per 256 scales
  float offset;

  inline float at(int64_t i) const {
    if (absmax != nullptr) return absmax[i];
    float a = code8[q[i]] * nested[i >> 8];
    return a + offset;
  }
};

inline uint16_t bf16_bits(float f) {  // round to nearest even; NaN stays NaN (torch's c10::BFloat16 rule)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// 16 float32 lanes -> bfloat16 bits in the low half of each 32-bit lane, rounded as bf16_bits (finite inputs).
inline __m512i bf16_round(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
}

// 16 packed bytes (low 8 bits of each 32-bit lane of `bytes`), scaled per lane: the (high, low) nibble values.
inline void decode_pairs(__m512i bytes, __m512 code, __m512 scale, __m512* hi, __m512* lo) {
  __m512i h = _mm512_srli_epi32(bytes, 4);
  __m512i l = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
  *hi = _mm512_mul_ps(_mm512_permutexvar_ps(h, code), scale);
  *lo = _mm512_mul_ps(_mm512_permutexvar_ps(l, code), scale);
}

// One bfloat16 pair per lane: element 2i (high nibble) in the low 16 bits, element 2i + 1 in the high 16 bits.
inline __m512i pack_pairs(__m512 hi, __m512 lo) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);  // 0, 16, 1, 17, ...
  return _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(lo, hi));
}

float scalar_value(const uint8_t* packed, int64_t i, const float* code) {
  uint8_t b = packed[i >> 1];
  return code[(i & 1) ? (b & 15) : (b >> 4)];
}

// Elements [e0, e1) of whole blocks, written to out (float32 or bf16 bits).
void dequant_range(const uint8_t* packed, int64_t e0, int64_t e1, int64_t bs, const float* code16, const Scales& sc,
                   void* out, bool bf16) {
  const __m512 code = _mm512_loadu_ps(code16);
  const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t e = e0; e < e1; e += 32) {  // bs is a multiple of 32: a step never crosses a block
    __m512 scale = _mm512_set1_ps(sc.at(e / bs));
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + e / 2)));
    __m512 hi, lo;
    decode_pairs(bytes, code, scale, &hi, &lo);
    if (bf16) {
      _mm512_storeu_si512(static_cast<uint16_t*>(out) + e, pack_pairs(hi, lo));
    } else {
      float* o = static_cast<float*>(out) + e;
      _mm512_storeu_ps(o, _mm512_permutex2var_ps(hi, ilo, lo));
      _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(hi, ihi, lo));
    }
  }
}

constexpr int kNR = 32;  // output columns per tile (two 16-lane vectors)
constexpr int kMR = 12;  // rows of x per micro-tile: 24 accumulators

// 16 x 16 32-bit transpose in registers: r[i] lane j -> r[j] lane i.
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + k]: rows i..i+3 of column 4L + k in 128-bit lane L
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88), v1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xDD);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xDD);
    r[k] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[8 + k] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    r[4 + k] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
}

// Dequantize rows [n0, n0 + rows) of W (N, K) into buf[p][c] (uint32 bf16 pairs, p < K / 2, c < 32), rows past
// `rows` as zeros. Each row is read front to back (16 bytes a step), decoded, and 16 x 16 blocks are transposed
// in registers, so the loads stream instead of gathering across rows.
void fill_tile(const uint8_t* packed, int64_t n0, int64_t rows, int64_t K, int64_t bs, const float* code16,
               const Scales& sc, uint32_t* buf) {
  const int64_t blocks_per_row = K / bs, P = K / 2;
  const __m512 code = _mm512_loadu_ps(code16);
  const uint8_t* base = packed + n0 * P;
  for (int c0 = 0; c0 < kNR; c0 += 16) {
    const int valid = rows - c0 <= 0 ? 0 : (rows - c0 >= 16 ? 16 : static_cast<int>(rows - c0));
    if (valid == 0) {
      for (int64_t p = 0; p < P; ++p) _mm512_store_si512(buf + p * kNR + c0, _mm512_setzero_si512());
      continue;
    }
    for (int64_t p = 0; p < P; p += 16) {  // 16 pairs (bytes, one 32-element step of one block) of 16 rows
      __m512i r[16];
      const int64_t block = 2 * p / bs;
      for (int c = 0; c < 16; ++c) {
        if (c >= valid) {
          r[c] = _mm512_setzero_si512();
          continue;
        }
        const __m512 scale = _mm512_set1_ps(sc.at((n0 + c0 + c) * blocks_per_row + block));
        const __m512i bytes =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(base + (c0 + c) * P + p)));
        __m512 hi, lo;
        decode_pairs(bytes, code, scale, &hi, &lo);
        r[c] = pack_pairs(hi, lo);
      }
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_store_si512(buf + (p + j) * kNR + c0, r[j]);
    }
  }
}

template <int MR>
void micro(const uint16_t* x, int64_t ldx, const uint32_t* buf, int64_t P, float* y, uint16_t* y16, int64_t ldy,
           __mmask16 m0, __mmask16 m1) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_load_si512(buf + p * kNR);
    const __m512bh w1 = (__m512bh)_mm512_load_si512(buf + p * kNR + 16);
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * ldx + 2 * p, 4);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, w1);
    }
  }
  if (y16 != nullptr) {  // bfloat16 output, rounded as torch rounds
    for (int i = 0; i < MR; ++i) {
      _mm256_mask_storeu_epi16(y16 + i * ldy, m0, _mm512_cvtepi32_epi16(bf16_round(acc[i][0])));
      _mm256_mask_storeu_epi16(y16 + i * ldy + 16, m1, _mm512_cvtepi32_epi16(bf16_round(acc[i][1])));
    }
    return;
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(y + i * ldy, m0, acc[i][0]);
    _mm512_mask_storeu_ps(y + i * ldy + 16, m1, acc[i][1]);
  }
}

// Few rows of x (decoding): each weight row is read once and dequantized in registers to bfloat16 (the values of
// the tiled path), then dotted with every row of x by vdpbf16ps; no buffer, no transpose. xp holds x's rows with
// each group of 32 columns reordered as its 16 even columns then its 16 odd ones, the order in which
// _mm512_cvtne2ps_pbh(lo, hi) lays out a group's weights (high nibbles = even columns first).
template <int M>
void gemv_rows(int64_t n0, int64_t n1, int64_t K, const uint16_t* xp, const uint8_t* packed, int64_t bs,
               const float* code16, const Scales& sc, float* y, uint16_t* y16, int64_t ldy) {
  const __m512 code = _mm512_loadu_ps(code16);
  const int64_t P = K / 2, steps_per_block = bs / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = packed + n * P;
    if (n + 1 < n1) _mm_prefetch(reinterpret_cast<const char*>(row + P), _MM_HINT_T0);
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    int64_t block = n * (K / bs), step = 0;
    __m512 scale = _mm512_set1_ps(sc.at(block));
    for (int64_t p = 0; p < P; p += 16) {  // 32 weights of one block a step
      if (step == steps_per_block) {
        step = 0;
        scale = _mm512_set1_ps(sc.at(++block));
      }
      ++step;
      __m512 hi, lo;
      decode_pairs(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + p))), code, scale,
                   &hi, &lo);
      const __m512bh w = _mm512_cvtne2ps_pbh(lo, hi);
      for (int m = 0; m < M; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(xp + m * K + 2 * p), w);
    }
    for (int m = 0; m < M; ++m) {
      const float v = _mm512_reduce_add_ps(acc[m]);
      if (y16 != nullptr)
        y16[m * ldy + n] = bf16_bits(v);
      else
        y[m * ldy + n] = v;
    }
  }
}

using GemvFn = void (*)(int64_t, int64_t, int64_t, const uint16_t*, const uint8_t*, int64_t, const float*,
                        const Scales&, float*, uint16_t*, int64_t);
constexpr int kGemvMaxRows = 8;  // beyond, the tiled path (weights decoded once for 32 rows) wins
constexpr GemvFn kGemv[kGemvMaxRows] = {&gemv_rows<1>, &gemv_rows<2>, &gemv_rows<3>, &gemv_rows<4>,
                                        &gemv_rows<5>, &gemv_rows<6>, &gemv_rows<7>, &gemv_rows<8>};

template <int... Rs>
struct MicroTable {
  static constexpr void (*fns[sizeof...(Rs)])(const uint16_t*, int64_t, const uint32_t*, int64_t, float*, uint16_t*,
                                               int64_t, __mmask16, __mmask16) = {&micro<Rs>...};
};
using Micros = MicroTable<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12>;

}  // namespace

extern "C" {

// n elements; the last block may be partial and n may be odd (both done in scalar code).
void lk_dequant_4bit(const uint8_t* packed, int64_t n, int64_t bs, const float* code16, const float* absmax,
                     const uint8_t* q, const float* code8, const float* nested, float offset, void* out, int bf16) {
  const Scales sc{absmax, q, code8, nested, offset};
  const int64_t full_blocks = n / bs;
  at::parallel_for(0, full_blocks, 2048 / bs + 1, [&](int64_t b0, int64_t b1) {
    dequant_range(packed, b0 * bs, b1 * bs, bs, code16, sc, out, bf16 != 0);
  });
  for (int64_t i = full_blocks * bs; i < n; ++i) {
    float v = scalar_value(packed, i, code16) * sc.at(i / bs);
    if (bf16)
      static_cast<uint16_t*>(out)[i] = bf16_bits(v);
    else
      static_cast<float*>(out)[i] = v;
  }
}

// y (M, N) with row stride ldy = x (M, K) bf16 with row stride ldx @ dequant(W (N, K))^T; y is float32, or
// bfloat16 (rounded to nearest even) when y_bf16 is nonzero.
void lk_gemm_4bit_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* x, int64_t ldx, const uint8_t* packed,
                       int64_t bs, const float* code16, const float* absmax, const uint8_t* q, const float* code8,
                       const float* nested, float offset, void* y, int64_t ldy, int y_bf16) {
  const Scales sc{absmax, q, code8, nested, offset};
  float* y32 = y_bf16 ? nullptr : static_cast<float*>(y);
  uint16_t* y16 = y_bf16 ? static_cast<uint16_t*>(y) : nullptr;
  if (M <= kGemvMaxRows) {
    auto* xp = static_cast<uint16_t*>(std::aligned_alloc(64, static_cast<size_t>(M * K * 2 + 64)));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < K; g += 32)
        for (int e = 0; e < 32; ++e) xp[m * K + g + e] = x[m * ldx + g + (e < 16 ? 2 * e : 2 * (e - 16) + 1)];
    at::parallel_for(0, N, 16, [&](int64_t a, int64_t b) {
      kGemv[M - 1](a, b, K, xp, packed, bs, code16, sc, y32, y16, ldy);
    });
    std::free(xp);
    return;
  }
  const int64_t tiles = (N + kNR - 1) / kNR, P = K / 2;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    auto* buf = static_cast<uint32_t*>(std::aligned_alloc(64, static_cast<size_t>(P) * kNR * 4));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kNR, rows = N - n0 < kNR ? N - n0 : kNR;
      if (t + 1 < t1) {  // the next tile into L2 while this one computes (its 32 rows are read as interleaved streams)
        const int64_t next_rows = N - n0 - kNR < kNR ? N - n0 - kNR : kNR;
        const char* start = reinterpret_cast<const char*>(packed + (n0 + kNR) * P);
        for (int64_t off = 0; off < next_rows * P; off += 64) _mm_prefetch(start + off, _MM_HINT_T1);
      }
      fill_tile(packed, n0, rows, K, bs, code16, sc, buf);
      const int64_t v0 = rows < 16 ? rows : 16, v1 = rows > 16 ? rows - 16 : 0;
      const __mmask16 m0 = static_cast<__mmask16>((1u << v0) - 1u), m1 = static_cast<__mmask16>((1u << v1) - 1u);
      int64_t mr = kMR;
      for (int64_t m = 0; m < M; m += mr) {  // equal micro-tiles: 64 rows run as 11+11+11+11+10+10, not 12×5+4
        const int64_t left = M - m, parts = (left + kMR - 1) / kMR;
        mr = (left + parts - 1) / parts;
        const int64_t at = m * ldy + n0;
        Micros::fns[mr - 1](x + m * ldx, ldx, buf, P, y32 ? y32 + at : nullptr, y16 ? y16 + at : nullptr, ldy, m0, m1);
      }
    }
    std::free(buf);
  });
}

}  // extern "C"
