"""CPU kernels compiled at run time where a C compiler is present, with the plain torch path as fallback.

What they do (see BENCHMARKS.md, "CPU kernels"): one call and one OpenMP parallel region for all RWKV-4 layers
(:func:`rwkv4_layers`: per layer the layer norms, token shift, the seven matrix products, WKV and the gates over a
ragged batch, in place on the residual rows and the streams' states, phases separated by barriers) and one matrix
product for the head (:class:`KernelLinear`). The weights are packed once at
load for the kernel that reads them:

- ``float32`` / ``float16`` / ``bfloat16``: the weights as stored, products accumulated in fp32 (fp16 through
  F16C, bf16 widened by a shift; 512-bit vectors where the CPU has AVX-512, with the same sums in the same
  order as the 256-bit code);
- short rows (few inputs, many outputs: RWKV-7's second low-rank matrices): the float weights stored transposed,
  ``W^T`` ``[in, out]`` (:class:`rwkv_stream.linear.ColumnKernelLinear`), 64 outputs a unit with one
  multiply-add per input and no per-output reduction, each output one ``fmaf`` chain in input order (the same
  bits in every build);
- ``q8_0``: int8 weights with one fp16 scale per block of 32 inputs, packed in row pairs with the scales inline
  (:func:`pack_q8_0`: one sequential stream per thread); activations quantized on the fly to int16 per block
  of 32; integer block sums are exact (``vpdpwssd`` / ``pmaddwd``), scaled and accumulated in fp32, so AVX-512,
  AVX2 and plain C builds give the same bits. AVX2 builds work in 128-bit integer steps, both rows of a pair
  per pass (``q8_pair2``): on cores that split 256-bit work in two (the Zen 1 host of BENCHMARKS.md) that
  streamed 2.6x faster than 256-bit steps a row at a time; products over 4+ rows take 256-bit steps over 4
  activation rows (``q8_quad``: one sign extension per 8 multiply-adds).

AVX2 builds run the element-wise work (WKV, gates) with ``vexp``, the AVX-512 arithmetic bit for bit, and
16-bit products over 4+ rows three weight rows at a time (``f16_row_triples``, same sums per output).

Weights are prefetched to L2 8 KiB and to L1 1 KiB ahead of the reads (AVX-512 builds), or to L1 8 KiB ahead
(AVX2 builds) (``rs_set_prefetch``).
A model's packed weights live in one buffer in the order a step reads them, backed by transparent huge
pages where Linux allows (:func:`huge_page_buffer`, :func:`rwkv_stream.linear.pack_in_arena`); the bandwidth
probe (:func:`read_bandwidth`, the floor of BENCHMARKS.md) reads memory placed the same way.

Every output element is computed by the same instructions in the same order whatever the number of rows in
the product, so a row's bits never depend on the other rows (its batch mates): batch invariance with no
padding. The code is C (no torch headers), built with the system compiler (``$CC`` or ``cc``) with
``-O3 -march=native -fopenmp`` into ``$RWKV_STREAM_CACHE`` (default ``~/.cache/rwkv-stream``) under a name
that hashes the source, flags, compiler and CPU, and loaded with ctypes. No compiler, a failed build or
``RWKV_STREAM_CPU_KERNELS=0``: one log line and :func:`load` returns None; the engine then runs the torch path
(``q8_0`` through :class:`rwkv_stream.linear.Q8Linear`'s torch emulation: same format, slower).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

QBLOCK = 32  # inputs per scale of the q8_0 format (weights and activations)
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KIND_Q8 = 3
ENV_SWITCH = "RWKV_STREAM_CPU_KERNELS"

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define RS_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define RS_AVX512 1
#endif
#endif
#define AI __attribute__((always_inline))

#define QB 32     /* inputs per block (one scale) */
#define GRP 256   /* inputs per group: 8 blocks, one block per 32-bit lane of a 256-bit integer dot */
#define PG 544    /* bytes of a row pair's group: 16 fp16 scales (8 per row), then 16 steps x (16 + 16) bytes */
enum { K_F32 = 0, K_F16 = 1, K_BF16 = 2, K_Q8 = 3 };

/* inp: inputs padded to a multiple of GRP (q8) or in (float kinds); s unused; cols: float weights stored in the
   column layout (W^T [in, out], see col_unit) */
typedef struct { int kind, out, in, inp; const void* w; const float* s; int cols; } rs_mat;
/* activations: fp32 rows (float kinds) or int16 rows in the grouped order with one fp32 scale per block (q8) */
typedef struct { const float* x; const int16_t* q; const float* qs; int in, inp; } rs_act;

static int g_pf = 8192;  /* software prefetch this far ahead (bytes; 0: off): see PF */
void rs_set_prefetch(int bytes) { g_pf = bytes; }

int rs_features(void) {
  int f = 0;
#ifdef RS_AVX2
  f |= 1;
#endif
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
  f |= 2;
#endif
#ifdef _OPENMP
  f |= 4;
#endif
#ifdef RS_AVX512
  f |= 8;
#endif
  return f;
}

static float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, mant = h & 1023, bits;
  if (e == 0) {
    if (mant == 0) bits = sign;
    else { e = 113; while (!(mant & 1024)) { mant <<= 1; e--; } bits = sign | (e << 23) | ((mant & 1023) << 13); }
  } else if (e == 31) bits = sign | 0x7f800000u | (mant << 13);
  else bits = sign | ((e + 112) << 23) | (mant << 13);
  float f; memcpy(&f, &bits, 4); return f;
}

/* one row of activations for q8: int16 per block of 32 (scale = block absmax / 32767), stored grouped: in group g,
   the pair of elements 2t, 2t+1 of block j is 32-bit word t * 8 + j; blocks beyond in (padding) are zero.
   The same values on every code path (max and products exact, round to nearest even). */
static void quantize_row16(const float* x, int in, int inp, int16_t* q, float* s) {
  for (int b = 0; b < inp / QB; b++) {
    int32_t v[QB];
    float sc = 0.0f;
    if (b * QB < in) {
      const float* xb = x + b * QB;
      float amax = 0.0f;
#ifdef RS_AVX512
      __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
      amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      float id = amax > 0.0f ? 32767.0f / amax : 0.0f;
      __m512 vid = _mm512_set1_ps(id);
      __m512i lo = _mm512_set1_epi32(-32767), hi = _mm512_set1_epi32(32767);
      _mm512_storeu_si512(v, _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(x0, vid)), lo), hi));
      _mm512_storeu_si512(v + 16, _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(x1, vid)), lo),
                                                   hi));
#elif defined(RS_AVX2)
      __m256 xv[4], m4 = _mm256_setzero_ps();
      const __m256 sign = _mm256_set1_ps(-0.0f);
      for (int i = 0; i < 4; i++) {
        xv[i] = _mm256_loadu_ps(xb + 8 * i);
        m4 = _mm256_max_ps(m4, _mm256_andnot_ps(sign, xv[i]));
      }
      __m128 m1 = _mm_max_ps(_mm256_castps256_ps128(m4), _mm256_extractf128_ps(m4, 1));
      m1 = _mm_max_ps(m1, _mm_movehl_ps(m1, m1));
      amax = _mm_cvtss_f32(_mm_max_ss(m1, _mm_shuffle_ps(m1, m1, 1)));
      float id = amax > 0.0f ? 32767.0f / amax : 0.0f;
      const __m256 vid = _mm256_set1_ps(id);
      const __m256i lo = _mm256_set1_epi32(-32767), hi = _mm256_set1_epi32(32767);
      for (int i = 0; i < 4; i++)
        _mm256_storeu_si256((__m256i*)(v + 8 * i), _mm256_min_epi32(_mm256_max_epi32(
            _mm256_cvtps_epi32(_mm256_mul_ps(xv[i], vid)), lo), hi));
#else
      for (int i = 0; i < QB; i++) { float a = fabsf(xb[i]); amax = a > amax ? a : amax; }
      float id = amax > 0.0f ? 32767.0f / amax : 0.0f;
      for (int i = 0; i < QB; i++) {
        long r = lrintf(xb[i] * id);
        v[i] = (int32_t)(r > 32767 ? 32767 : (r < -32767 ? -32767 : r));
      }
#endif
      sc = amax / 32767.0f;
    } else {
      memset(v, 0, sizeof(v));
    }
    s[b] = sc;
    uint32_t* dst = (uint32_t*)(q + (size_t)(b / 8) * GRP) + (b % 8);
    for (int t = 0; t < QB / 2; t++)
      dst[t * 8] = (uint32_t)(uint16_t)v[2 * t] | ((uint32_t)(uint16_t)v[2 * t + 1] << 16);
  }
}

/* activations of n rows for a product with m: quantized into a buffer (q8) or read as they are */
static void *prepare(const rs_mat* m, const float* x, int n, rs_act* a, int nt) {
  a->x = x; a->in = m->in; a->inp = m->inp; a->q = 0; a->qs = 0;
  if (m->kind != K_Q8) return 0;
  size_t e = (size_t)n * m->inp, nb = (size_t)m->inp / QB;
  char* buf = (char*)malloc(2 * e + (size_t)n * nb * sizeof(float) + 64);
  int16_t* q = (int16_t*)buf; float* s = (float*)(buf + 2 * e);
  #pragma omp parallel for schedule(static) num_threads(nt) if (n > 8)
  for (int r = 0; r < n; r++) quantize_row16(x + (size_t)r * m->in, m->in, m->inp, q + (size_t)r * m->inp, s + r * nb);
  a->q = q; a->qs = s;
  return buf;
}

static inline float hsum8_s(const float* v) {  /* the order of hsum8 */
  float a0 = v[0] + v[4], a1 = v[1] + v[5], a2 = v[2] + v[6], a3 = v[3] + v[7];
  return (a0 + a2) + (a1 + a3);
}

#ifdef RS_AVX2
static inline float hsum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}
static inline __m256i dpw256(__m256i d, __m256i w, __m256i a) {  /* exact: |w| <= 127, |a| <= 32767 */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(d, w, a);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(d, w, a);
#else
  return _mm256_add_epi32(d, _mm256_madd_epi16(w, a));
#endif
}
#ifdef RS_AVX512
#define PF(p) do { if (g_pf) { _mm_prefetch((const char*)(p) + g_pf, _MM_HINT_T1); \
                               _mm_prefetch((const char*)(p) + 1024, _MM_HINT_T0); } } while (0)
#else
/* AVX2 builds: one prefetch, to L1 g_pf ahead (on the Zen 1 host the second, near one cost more issue slots than
   it saved: batch-1 steps 1-8% faster without it, fp16 4%) */
#define PF(p) do { if (g_pf) _mm_prefetch((const char*)(p) + g_pf, _MM_HINT_T0); } while (0)
#endif
#else
#define PF(p) do { } while (0)
#endif

/* the widest float vector of the build, for element-wise code written once */
#if defined(RS_AVX512)
typedef __m512 vf;
#define VW 16
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vstream _mm512_stream_ps /* non-temporal store: 64-byte aligned, ordered by _mm_sfence */
#define vset1 _mm512_set1_ps
#define vzero _mm512_setzero_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vdiv _mm512_div_ps
#define vmax _mm512_max_ps
#define vmin _mm512_min_ps
#define vfmadd _mm512_fmadd_ps
#define vfnmadd _mm512_fnmadd_ps
#define vround(v) _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vsum _mm512_reduce_add_ps
static inline vf vscale2(vf p, vf n) { return _mm512_scalef_ps(p, n); }  /* p * 2^n, one rounding */
#elif defined(RS_AVX2)
typedef __m256 vf;
#define VW 8
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vstream _mm256_stream_ps /* non-temporal store: 32-byte aligned, ordered by _mm_sfence */
#define vset1 _mm256_set1_ps
#define vzero _mm256_setzero_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vdiv _mm256_div_ps
#define vmax _mm256_max_ps
#define vmin _mm256_min_ps
#define vfmadd _mm256_fmadd_ps
#define vfnmadd _mm256_fnmadd_ps
#define vround(v) _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vsum hsum8
/* scalef(p, n) as p * 2^a * 2^b with a = n >> 1, b = n - a: both powers are normal for n in [-150, 128], the
   first product is exact and the second rounds once, as scalef does (checked against ldexpf on 1e9 inputs) */
static inline vf vscale2(vf p, vf n) {
  __m256i ni = _mm256_cvtps_epi32(n), a = _mm256_srai_epi32(ni, 1), b = _mm256_sub_epi32(ni, a);
  const __m256i bias = _mm256_set1_epi32(127);
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, bias), 23)));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, bias), 23)));
}
#endif

#ifdef RS_AVX512
static inline __m512i dpw512(__m512i d, __m512i w, __m512i a) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(d, w, a);
#else
  return _mm512_add_epi32(d, _mm512_madd_epi16(w, a));
#endif
}
/* q8: rows 2p and 2p+1 (one 512-bit vector: row 2p in the low half) against R activation rows r0.. (1..4); each
   output's arithmetic (exact integer block sums, then per lane fp32 scale and fma, then hsum8) is the same
   whatever R, and the same as q8_pair2's */
static inline AI void q8_pair(const rs_mat* m, const rs_act* a, int p, int r0, int R, float* y, const int NA) {
  const int G = m->inp / GRP, nb = m->inp / QB;
  const uint8_t* base = (const uint8_t*)m->w + (size_t)p * G * PG;
  __m512 acc[4];
  for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
  for (int g = 0; g < G; g++) {
    const uint8_t* blk = base + (size_t)g * PG;
    const int16_t* ag = a->q + (size_t)r0 * m->inp + g * GRP;
    /* NA independent integer sums per row (one row: 4, hiding the dot's latency); exact, so any split gives
       the same block sums */
    __m512i d[4][NA];
    for (int i = 0; i < R; i++) for (int k = 0; k < NA; k++) d[i][k] = _mm512_setzero_si512();
    for (int t = 0; t < 16; t++) {
      if (!(t & 1)) PF(blk + 32 * t);
      __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(blk + 32 + 32 * t)));
      for (int i = 0; i < R; i++)
        d[i][t % NA] = dpw512(d[i][t % NA], w, _mm512_broadcast_i32x8(_mm256_loadu_si256(
                                                   (const __m256i*)(ag + (size_t)i * m->inp + 16 * t))));
    }
    PF(blk + 512);
    for (int i = 0; i < R; i++) for (int k = 1; k < NA; k++) d[i][0] = _mm512_add_epi32(d[i][0], d[i][k]);
    __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)blk));
    for (int i = 0; i < R; i++) {
      __m512 sc = _mm512_mul_ps(ws, _mm512_broadcast_f32x8(_mm256_loadu_ps(a->qs + (size_t)(r0 + i) * nb + g * 8)));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][0]), sc, acc[i]);
    }
  }
  const int o = 2 * p;
  for (int i = 0; i < R; i++) {
    float* yr = y + (size_t)(r0 + i) * m->out;
    yr[o] = hsum8(_mm512_castps512_ps256(acc[i]));
    if (o + 1 < m->out) yr[o + 1] = hsum8(_mm512_extractf32x8_ps(acc[i], 1));
  }
}
#elif defined(RS_AVX2)
/* q8 without AVX-512: both rows of pair p against R activation rows r0.. (1..2), in 128-bit integer steps (the
   native width of some AVX2 cores, where a 256-bit sign extension and multiply-add are two operations each: on
   the Zen 1 host of BENCHMARKS.md this streams 2.6x faster than 256-bit steps a row at a time). Per output the
   arithmetic of q8_pair: exact integer block sums (lane j: block j), per lane fp32 scale and fma, hsum8. */
static inline AI void q8_pair2(const rs_mat* m, const rs_act* a, int p, int r0, int R, float* y) {
  const int G = m->inp / GRP, nb = m->inp / QB;
  const uint8_t* base = (const uint8_t*)m->w + (size_t)p * G * PG;
  __m256 acc0[2], acc1[2];
  for (int i = 0; i < R; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
  for (int g = 0; g < G; g++) {
    const uint8_t* blk = base + (size_t)g * PG;
    const int16_t* ag = a->q + (size_t)r0 * m->inp + g * GRP;
    __m128i d0[2], d1[2], e0[2], e1[2];  /* row 2p blocks 0-3, 4-7; row 2p+1 blocks 0-3, 4-7 */
    for (int i = 0; i < R; i++) d0[i] = d1[i] = e0[i] = e1[i] = _mm_setzero_si128();
    for (int t = 0; t < 16; t++) {
      if (!(t & 1)) PF(blk + 32 * t);
      const uint8_t* wt = blk + 32 + 32 * t;
      __m128i w0 = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)wt));
      __m128i w1 = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)(wt + 8)));
      __m128i w2 = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)(wt + 16)));
      __m128i w3 = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)(wt + 24)));
      for (int i = 0; i < R; i++) {
        const int16_t* at = ag + (size_t)i * m->inp + 16 * t;
        __m128i lo = _mm_loadu_si128((const __m128i*)at), hi = _mm_loadu_si128((const __m128i*)(at + 8));
        d0[i] = _mm_add_epi32(d0[i], _mm_madd_epi16(w0, lo));
        d1[i] = _mm_add_epi32(d1[i], _mm_madd_epi16(w1, hi));
        e0[i] = _mm_add_epi32(e0[i], _mm_madd_epi16(w2, lo));
        e1[i] = _mm_add_epi32(e1[i], _mm_madd_epi16(w3, hi));
      }
    }
    PF(blk + 512);
    __m256 ws0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)blk));
    __m256 ws1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 16)));
    for (int i = 0; i < R; i++) {
      __m256 as = _mm256_loadu_ps(a->qs + (size_t)(r0 + i) * nb + g * 8);
      acc0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_set_m128i(d1[i], d0[i])), _mm256_mul_ps(ws0, as), acc0[i]);
      acc1[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_set_m128i(e1[i], e0[i])), _mm256_mul_ps(ws1, as), acc1[i]);
    }
  }
  const int o = 2 * p;
  for (int i = 0; i < R; i++) {
    float* yr = y + (size_t)(r0 + i) * m->out;
    yr[o] = hsum8(acc0[i]);
    if (o + 1 < m->out) yr[o + 1] = hsum8(acc1[i]);
  }
}
/* q8_pair2 for one activation row (batch 1), its arithmetic per output: the steps in twos, one prefetch per 64
   bytes with no branch per step, and four named sums the compiler keeps in place (q8_pair2's arrays cost a
   register copy per sum and step): on the Zen 1 host a 384 x 768 product in L2 took 22 us instead of 28 */
static inline AI void q8_pair1(const rs_mat* m, const rs_act* a, int p, int r0, float* y) {
  const int G = m->inp / GRP, nb = m->inp / QB;
  const uint8_t* base = (const uint8_t*)m->w + (size_t)p * G * PG;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int g = 0; g < G; g++) {
    const uint8_t* blk = base + (size_t)g * PG;
    const int16_t* ag = a->q + (size_t)r0 * m->inp + g * GRP;
    __m128i d0 = _mm_setzero_si128(), d1 = d0, e0 = d0, e1 = d0;
    for (int t = 0; t < 16; t += 2) {
      PF(blk + 32 * t);
      for (int u = 0; u < 2; u++) {
        const uint8_t* wt = blk + 32 + 32 * (t + u);
        const int16_t* at = ag + 16 * (t + u);
        __m128i lo = _mm_loadu_si128((const __m128i*)at), hi = _mm_loadu_si128((const __m128i*)(at + 8));
        d0 = _mm_add_epi32(d0, _mm_madd_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)wt)), lo));
        d1 = _mm_add_epi32(d1, _mm_madd_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)(wt + 8))), hi));
        e0 = _mm_add_epi32(e0, _mm_madd_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)(wt + 16))), lo));
        e1 = _mm_add_epi32(e1, _mm_madd_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)(wt + 24))), hi));
      }
    }
    PF(blk + 512);
    __m256 ws0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)blk));
    __m256 ws1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 16)));
    __m256 as = _mm256_loadu_ps(a->qs + (size_t)r0 * nb + g * 8);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_set_m128i(d1, d0)), _mm256_mul_ps(ws0, as), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_set_m128i(e1, e0)), _mm256_mul_ps(ws1, as), acc1);
  }
  const int o = 2 * p;
  float* yr = y + (size_t)r0 * m->out;
  yr[o] = hsum8(acc0);
  if (o + 1 < m->out) yr[o + 1] = hsum8(acc1);
}
/* q8 without AVX-512, 4+ activation rows: both rows of pair p against the 4 rows r0.., in 256-bit steps (each
   step's sign extension then serves 8 multiply-adds, not 2: on the Zen 1 host 6-8% more multiply-adds per second
   than q8_pair2 twice). Per output the arithmetic of q8_pair2 (a lane is a block in both). */
static inline AI void q8_quad(const rs_mat* m, const rs_act* a, int p, int r0, float* y) {
  const int G = m->inp / GRP, nb = m->inp / QB;
  const uint8_t* base = (const uint8_t*)m->w + (size_t)p * G * PG;
  __m256 acc0[4], acc1[4];
  for (int i = 0; i < 4; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
  for (int g = 0; g < G; g++) {
    const uint8_t* blk = base + (size_t)g * PG;
    const int16_t* ag = a->q + (size_t)r0 * m->inp + g * GRP;
    __m256i d[4], e[4];  /* rows 2p and 2p+1, blocks 0-7 */
    for (int i = 0; i < 4; i++) d[i] = e[i] = _mm256_setzero_si256();
    for (int t = 0; t < 16; t++) {
      if (!(t & 1)) PF(blk + 32 * t);
      const uint8_t* wt = blk + 32 + 32 * t;
      __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)wt));
      __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wt + 16)));
      for (int i = 0; i < 4; i++) {
        __m256i at = _mm256_loadu_si256((const __m256i*)(ag + (size_t)i * m->inp + 16 * t));
        d[i] = _mm256_add_epi32(d[i], _mm256_madd_epi16(w0, at));
        e[i] = _mm256_add_epi32(e[i], _mm256_madd_epi16(w1, at));
      }
    }
    PF(blk + 512);
    __m256 ws0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)blk));
    __m256 ws1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 16)));
    for (int i = 0; i < 4; i++) {
      __m256 as = _mm256_loadu_ps(a->qs + (size_t)(r0 + i) * nb + g * 8);
      acc0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i]), _mm256_mul_ps(ws0, as), acc0[i]);
      acc1[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(e[i]), _mm256_mul_ps(ws1, as), acc1[i]);
    }
  }
  const int o = 2 * p;
  for (int i = 0; i < 4; i++) {
    float* yr = y + (size_t)(r0 + i) * m->out;
    yr[o] = hsum8(acc0[i]);
    if (o + 1 < m->out) yr[o + 1] = hsum8(acc1[i]);
  }
}
#endif

#ifdef RS_AVX512
static inline __m512 load16(int kind, const void* w, size_t i) {
  if (kind == K_F32) return _mm512_loadu_ps((const float*)w + i);
  __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)w + i));
  if (kind == K_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
/* R rows (1..4) against weight row o; lanes 0-7 / 8-15 of acc[i][j] are the 8-lane sums 2j / 2j+1 of the AVX2
   code: the same values in the same order */
static inline AI void f_rows(const rs_mat* m, const rs_act* a, int o, int r0, int R, float* y, const int kind,
                             size_t wo, const int pf) {
  const int in = m->in;
  const int esz = kind == K_F32 ? 4 : 2;
  __m512 acc[4][2];
  for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int k = 0; k < in; k += 32) {
    if (pf) {  /* off for rows widened into a stack buffer (see f16_rows_buffered) */
      PF((const char*)m->w + (wo + k) * esz);
      if (esz == 4) PF((const char*)m->w + (wo + k) * esz + 64);
    }
    for (int j = 0; j < 2; j++) {
      __m512 wv = load16(kind, m->w, wo + k + 16 * j);
      for (int i = 0; i < R; i++)
        acc[i][j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(a->x + (size_t)(r0 + i) * in + k + 16 * j), acc[i][j]);
    }
  }
  for (int i = 0; i < R; i++) {
    __m256 s01 = _mm256_add_ps(_mm512_castps512_ps256(acc[i][0]), _mm512_extractf32x8_ps(acc[i][0], 1));
    __m256 s23 = _mm256_add_ps(_mm512_castps512_ps256(acc[i][1]), _mm512_extractf32x8_ps(acc[i][1], 1));
    y[(size_t)(r0 + i) * m->out + o] = hsum8(_mm256_add_ps(s01, s23));
  }
}
static inline void widen_row(const rs_mat* m, size_t wo, float* buf) {
  for (int k = 0; k < m->in; k += 16) {
    if (!(k & 31)) PF((const uint16_t*)m->w + wo + k);
    _mm512_store_ps(buf + k, load16(m->kind, m->w, wo + k));
  }
}
#elif defined(RS_AVX2)
static inline __m256 load8(int kind, const void* w, size_t i) {
  if (kind == K_F32) return _mm256_loadu_ps((const float*)w + i);
  if (kind == K_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)w + i)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)w + i))), 16));
}
static inline AI void f_rows(const rs_mat* m, const rs_act* a, int o, int r0, int R, float* y, const int kind,
                             size_t wo, const int pf) {
  const int in = m->in;
  const int esz = kind == K_F32 ? 4 : 2;
  __m256 acc[4][4];
  for (int i = 0; i < R; i++) for (int j = 0; j < 4; j++) acc[i][j] = _mm256_setzero_ps();
  for (int k = 0; k < in; k += 32) {
    if (pf) {  /* off for rows widened into a stack buffer (see f16_rows_buffered) */
      PF((const char*)m->w + (wo + k) * esz);
      if (esz == 4) PF((const char*)m->w + (wo + k) * esz + 64);
    }
    for (int j = 0; j < 4; j++) {
      __m256 wv = load8(kind, m->w, wo + k + 8 * j);
      for (int i = 0; i < R; i++)
        acc[i][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a->x + (size_t)(r0 + i) * in + k + 8 * j), acc[i][j]);
    }
  }
  for (int i = 0; i < R; i++)
    y[(size_t)(r0 + i) * m->out + o] =
        hsum8(_mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]), _mm256_add_ps(acc[i][2], acc[i][3])));
}
static inline void widen_row(const rs_mat* m, size_t wo, float* buf) {
  for (int k = 0; k < m->in; k += 8) {
    if (!(k & 31)) PF((const uint16_t*)m->w + wo + k);
    _mm256_store_ps(buf + k, load8(m->kind, m->w, wo + k));
  }
}
#endif

static float wget(int kind, const void* w, size_t i) {
  if (kind == K_F32) return ((const float*)w)[i];
  uint16_t h = ((const uint16_t*)w)[i];
  if (kind == K_BF16) { uint32_t b = (uint32_t)h << 16; float f; memcpy(&f, &b, 4); return f; }
  return half_to_float(h);
}

/* rows ids[0 .. n-1] of a [V, C] table (fp32, fp16 or bf16: kind) into x [n, C] fp32, exactly widened (the
   embedding lookup of the compiled paths); returns the index of the first id outside [0, V), else -1 */
int rs_gather_rows(const void* table, int kind, long V, const int64_t* ids, int n, int C, float* x) {
  for (int j = 0; j < n; j++)
    if (ids[j] < 0 || ids[j] >= V) return j;
  for (int j = 0; j < n; j++)
    for (int c = 0; c < C; c++) x[(size_t)j * C + c] = wget(kind, table, (size_t)ids[j] * C + c);
  return -1;
}

/* Column layout (rs_mat.cols), for short rows (few inputs, many outputs: RWKV-7's second low-rank matrices, in = 32
   to 128): w holds W^T [in, out], input k's weights for every output contiguous. A unit is COLW consecutive
   outputs for all n rows: per input k, the weight vectors of 64 outputs (32 for two rows at a time) times a
   broadcast activation, fused multiply-adds in input order, no horizontal sums (a row-major product over 64
   inputs spends as long on each output's reduction as on its weights). Each output is one fmaf chain over
   k = 0 .. in - 1 starting from 0, lane for lane the same in vectors and in col_scalar: the same bits in AVX-512,
   AVX2 and plain C builds, for any n. */
#define COLW 64
static void col_scalar(const rs_mat* m, const rs_act* a, int n, float* y, int o0, int o1) {
  for (int r = 0; r < n; r++)
    for (int o = o0; o < o1; o++) {
      float acc = 0.0f;
      for (int k = 0; k < m->in; k++)
        acc = fmaf(wget(m->kind, m->w, (size_t)k * m->out + o), a->x[(size_t)r * m->in + k], acc);
      y[(size_t)r * m->out + o] = acc;
    }
}
#ifdef RS_AVX2
#ifdef RS_AVX512
#define vloadw load16
#else
#define vloadw load8
#endif
/* outputs o0 .. o0 + WD - 1 of R rows from r0 (WD = 64: one row; 32: one or two rows, the weight vectors of an
   input serving both); pf: prefetch the next unit's weights (the next unit of a thread's share) */
static inline AI void col_rows(const rs_mat* m, const rs_act* a, int o0, int r0, const int R, const int WD,
                               float* y, const int kind, const int pf) {
  const int out = m->out, in = m->in, esz = kind == K_F32 ? 4 : 2;
  vf acc[2][64 / VW];
  for (int i = 0; i < R; i++) for (int j = 0; j < WD / VW; j++) acc[i][j] = vzero();
  for (int k = 0; k < in; k++) {
    const size_t wo = (size_t)k * out + o0;
    if (pf && g_pf)
      for (int l = 0; l < COLW * esz; l += 64) _mm_prefetch((const char*)m->w + (wo + COLW) * esz + l, _MM_HINT_T0);
    for (int j = 0; j < WD / VW; j++) {
      const vf wv = vloadw(kind, m->w, wo + VW * j);
      for (int i = 0; i < R; i++) acc[i][j] = vfmadd(wv, vset1(a->x[(size_t)(r0 + i) * in + k]), acc[i][j]);
    }
  }
  for (int i = 0; i < R; i++)
    for (int j = 0; j < WD / VW; j++) vstore(y + (size_t)(r0 + i) * out + o0 + VW * j, acc[i][j]);
}
/* outputs o0 .. o1 - 1 (o1 - o0 <= COLW) of all n rows: 64-wide for one row, 32-wide for two, the last
   (o1 - o0) % 32 outputs in col_scalar */
static inline AI void col_block(const rs_mat* m, const rs_act* a, int n, float* y, int o0, int o1, const int kind) {
  const int full = o1 - o0 == COLW, o32 = o0 + (o1 - o0) / 32 * 32;
  int r = 0;
  for (; r + 2 <= n; r += 2)
    for (int o = o0; o < o32; o += 32) col_rows(m, a, o, r, 2, 32, y, kind, r == 0 && o == o0);
  for (; r < n; r++) {
    if (full) col_rows(m, a, o0, r, 1, 64, y, kind, r == 0);
    else for (int o = o0; o < o32; o += 32) col_rows(m, a, o, r, 1, 32, y, kind, 0);
  }
  if (o32 < o1) col_scalar(m, a, n, y, o32, o1);
}
#endif
static void col_unit(const rs_mat* m, const rs_act* a, int n, float* y, int u) {
  const int o0 = COLW * u, o1 = o0 + COLW < m->out ? o0 + COLW : m->out;
#ifdef RS_AVX2
  if (m->kind == K_F16) col_block(m, a, n, y, o0, o1, K_F16);
  else if (m->kind == K_BF16) col_block(m, a, n, y, o0, o1, K_BF16);
  else col_block(m, a, n, y, o0, o1, K_F32);
#else
  col_scalar(m, a, n, y, o0, o1);
#endif
}

/* whether a 16-bit product over n rows takes f16_row_triples: AVX2 builds and 4+ rows (on the Zen 1 host of
   BENCHMARKS.md, 16 rows: 30-40% faster than two weight rows at a time for in = 768, 24% faster than
   f16_rows_buffered for in = 3072, the widened rows then spilling from L1 to L2) */
static inline int row_triples16(const rs_mat* m, int n) {
#if defined(RS_AVX2) && !defined(RS_AVX512)
  return (m->kind == K_F16 || m->kind == K_BF16) && n >= 4;
#else
  (void)m; (void)n;
  return 0;
#endif
}

#ifdef RS_AVX2
/* 16-bit weights for many rows: the weight row widened to fp32 once (exact), then fp32 products 4 rows at a
   time; each row's sums are f_rows' (same values, same order), so a row's bits do not depend on n. f_rows runs
   on the stack buffer without prefetch: prefetching past it, into unmapped pages above a thread's stack, made
   16-row fp16 products 2-40x slower in some processes on the Zen 1 host; widen_row prefetches the weights. */
static void f16_rows_buffered(const rs_mat* m, const rs_act* a, int n, float* y, int o) {
  float buf[m->in] __attribute__((aligned(64)));
  widen_row(m, (size_t)o * m->in, buf);
  rs_mat row = *m;
  row.w = buf;
  row.kind = K_F32;
  int r = 0;
  for (; r + 4 <= n; r += 4) f_rows(&row, a, o, r, 4, y, K_F32, 0, 0);
  for (; r < n; r++) f_rows(&row, a, o, r, 1, y, K_F32, 0, 0);
}

#if !defined(RS_AVX512)
/* AVX2, 16-bit weights, n >= 4 rows: weight rows 3u .. 3u+2 widened to fp32 once, then for each of f_rows'
   four lane classes j (inputs 32c + 8j .. + 7) the partial sums of the three weight rows x 4 activation rows
   in registers (12 accumulators, 7 loads per 12 multiply-adds: the activation rows, which outgrow L1 when many,
   are read a third as often per product as a row at a time), finished as f_rows finishes them:
   hsum8((p0 + p1) + (p2 + p3)). Bit-identical to f_rows per output, whatever n. Rows beyond a multiple of 4
   take f_rows on the widened rows; the last one or two weight rows of a matrix (out not a multiple of 3) take
   f16_rows_buffered. */
static inline AI void f16_block3x4(const float* wb, const rs_act* a, int r0, float* y, int out, int o0) {
  const int in = a->in;
  float part[4][3][4][8] __attribute__((aligned(32)));
  for (int j = 0; j < 4; j++) {
    __m256 acc[3][4];
    for (int w = 0; w < 3; w++) for (int i = 0; i < 4; i++) acc[w][i] = _mm256_setzero_ps();
    for (int k = 8 * j; k < in; k += 32) {
      __m256 w0 = _mm256_load_ps(wb + k), w1 = _mm256_load_ps(wb + in + k), w2 = _mm256_load_ps(wb + 2 * in + k);
      for (int i = 0; i < 4; i++) {
        __m256 xv = _mm256_loadu_ps(a->x + (size_t)(r0 + i) * in + k);
        acc[0][i] = _mm256_fmadd_ps(w0, xv, acc[0][i]);
        acc[1][i] = _mm256_fmadd_ps(w1, xv, acc[1][i]);
        acc[2][i] = _mm256_fmadd_ps(w2, xv, acc[2][i]);
      }
    }
    for (int w = 0; w < 3; w++) for (int i = 0; i < 4; i++) _mm256_store_ps(part[j][w][i], acc[w][i]);
  }
  for (int w = 0; w < 3; w++)
    for (int i = 0; i < 4; i++) {
      __m256 s01 = _mm256_add_ps(_mm256_load_ps(part[0][w][i]), _mm256_load_ps(part[1][w][i]));
      __m256 s23 = _mm256_add_ps(_mm256_load_ps(part[2][w][i]), _mm256_load_ps(part[3][w][i]));
      y[(size_t)(r0 + i) * out + o0 + w] = hsum8(_mm256_add_ps(s01, s23));
    }
}
static void f16_row_triples(const rs_mat* m, const rs_act* a, int n, float* y, int u) {
  const int o0 = 3 * u;
  if (o0 + 3 > m->out) {  /* the last one or two rows */
    for (int o = o0; o < m->out; o++) f16_rows_buffered(m, a, n, y, o);
    return;
  }
  float wb[3 * m->in] __attribute__((aligned(32)));
  for (int w = 0; w < 3; w++) widen_row(m, (size_t)(o0 + w) * m->in, wb + w * m->in);
  int r = 0;
  for (; r + 4 <= n; r += 4) f16_block3x4(wb, a, r, y, m->out, o0);
  if (r < n) {
    rs_mat row = *m;
    row.kind = K_F32;
    for (int w = 0; w < 3; w++) {
      row.w = wb + w * m->in;
      for (int rr = r; rr < n; rr++) f_rows(&row, a, o0 + w, rr, 1, y, K_F32, 0, 0);
    }
  }
}
#endif

/* unit u of m: output row u (float kinds) or the row pair u (q8) for all n rows */
static void out_unit(const rs_mat* m, const rs_act* a, int n, float* y, int u) {
  int r = 0;
  if (m->cols) {
    col_unit(m, a, n, y, u);
    return;
  }
  if (m->kind == K_Q8) {
#ifdef RS_AVX512
    for (; r + 4 <= n; r += 4) q8_pair(m, a, u, r, 4, y, 1);
    for (; r < n; r++) q8_pair(m, a, u, r, 1, y, 4);
#else
    for (; r + 4 <= n; r += 4) q8_quad(m, a, u, r, y);
    for (; r + 2 <= n; r += 2) q8_pair2(m, a, u, r, 2, y);
    for (; r < n; r++) q8_pair1(m, a, u, r, y);
#endif
    return;
  }
  const int o = u;
  if ((m->kind == K_F16 || m->kind == K_BF16) && n >= 4) {
#if !defined(RS_AVX512)
    if (row_triples16(m, n)) {  /* unit u: weight rows 3u .. 3u + 2 (see units) */
      f16_row_triples(m, a, n, y, u);
      return;
    }
#endif
    f16_rows_buffered(m, a, n, y, o);
    return;
  }
  if (m->kind == K_F32) {
    for (; r + 4 <= n; r += 4) f_rows(m, a, o, r, 4, y, K_F32, (size_t)o * m->in, 1);
    for (; r < n; r++) f_rows(m, a, o, r, 1, y, K_F32, (size_t)o * m->in, 1);
  } else if (m->kind == K_F16) {
    for (; r + 2 <= n; r += 2) f_rows(m, a, o, r, 2, y, K_F16, (size_t)o * m->in, 1);
    for (; r < n; r++) f_rows(m, a, o, r, 1, y, K_F16, (size_t)o * m->in, 1);
  } else {
    for (; r + 2 <= n; r += 2) f_rows(m, a, o, r, 2, y, K_BF16, (size_t)o * m->in, 1);
    for (; r < n; r++) f_rows(m, a, o, r, 1, y, K_BF16, (size_t)o * m->in, 1);
  }
}
#else
static void out_unit(const rs_mat* m, const rs_act* a, int n, float* y, int u) {
  if (m->cols) {
    col_unit(m, a, n, y, u);
    return;
  }
  if (m->kind == K_Q8) {
    const int G = m->inp / GRP, nb = m->inp / QB;
    for (int h = 0; h < 2 && 2 * u + h < m->out; h++) {
      for (int r = 0; r < n; r++) {
        float acc[8] = {0};
        for (int g = 0; g < G; g++) {
          const uint8_t* blk = (const uint8_t*)m->w + ((size_t)u * G + g) * PG;
          const int16_t* ag = a->q + (size_t)r * m->inp + g * GRP;
          for (int j = 0; j < 8; j++) {
            int32_t d = 0;
            for (int t = 0; t < 16; t++)
              for (int e = 0; e < 2; e++)
                d += (int32_t)(int8_t)blk[32 + 32 * t + 16 * h + 2 * j + e] * ag[16 * t + 2 * j + e];
            uint16_t hs; memcpy(&hs, blk + 2 * (8 * h + j), 2);
            acc[j] = fmaf((float)d, half_to_float(hs) * a->qs[(size_t)r * nb + g * 8 + j], acc[j]);
          }
        }
        y[(size_t)r * m->out + 2 * u + h] = hsum8_s(acc);
      }
    }
    return;
  }
  const int in = m->in;
  for (int r = 0; r < n; r++) {
    float acc = 0.0f;
    for (int k = 0; k < in; k++) acc += wget(m->kind, m->w, (size_t)u * in + k) * a->x[(size_t)r * in + k];
    y[(size_t)r * m->out + u] = acc;
  }
}
#endif

/* work units of a product over n rows: COLW outputs in the column layout, row pairs for q8, row triples for
   16-bit weights over 4+ rows on AVX2 (see f16_row_triples), else output rows */
static inline int units(const rs_mat* m, int n) {
  if (m->cols) return (m->out + COLW - 1) / COLW;
  if (m->kind == K_Q8) return (m->out + 1) / 2;
  return row_triples16(m, n) ? (m->out + 2) / 3 : m->out;
}

/* how output rows are dealt to threads: 0 (default): static, one contiguous share per thread (in a layer's product
   lists, of equal weight bytes: see multi_for; one sequential stream each, whose look-ahead prefetch never lands
   in another thread's rows); 1: dynamic chunks of about g_chunk KiB of weights (whatever the row width); 2:
   guided. Every output is computed alike whichever thread takes it: the bits do not change. q8 units are row
   pairs. Static was 8-9% faster per step than dynamic 64 KiB on a quiet 2-vCPU host (169M shape, q8_0 and fp16,
   three alternating runs); with another process holding a core, both are equally slow (the threads spin at each
   barrier: see BENCHMARKS.md). */
static int g_dynamic = 0, g_chunk = 64;
void rs_set_schedule(int dynamic, int chunk_kib) { g_dynamic = dynamic; g_chunk = chunk_kib; }
static void apply_schedule(const rs_mat* m) {  /* every thread of a region, before a schedule(runtime) loop */
#ifdef _OPENMP
  size_t unit = m->kind == K_Q8 ? (size_t)(m->inp / GRP) * PG : (size_t)m->in * (m->kind == K_F32 ? 4 : 2);
  if (m->cols) unit *= COLW;
  int ch = (int)(((size_t)g_chunk * 1024 + unit - 1) / unit);
  omp_set_schedule(g_dynamic == 2 ? omp_sched_guided : g_dynamic ? omp_sched_dynamic : omp_sched_static,
                   g_dynamic ? (ch > 0 ? ch : 1) : 0);
#else
  (void)m;
#endif
}

static void matmul_act(const rs_mat* m, const rs_act* a, int n, float* y, int nt) {
  const int U = units(m, n);
  apply_schedule(m);
  #pragma omp parallel for schedule(runtime) num_threads(nt)
  for (int u = 0; u < U; u++) out_unit(m, a, n, y, u);
}

void rs_matmul(const rs_mat* m, const float* x, int n, float* y, int nt) {
  rs_act a;
  void* buf = prepare(m, x, n, &a, nt);
  matmul_act(m, &a, n, y, nt);
  free(buf);
}

/* layer norm of one row, its sums in double over 8 lanes (lane l: the elements l, l + 8, ..; then one fixed tree):
   eight independent additions a step rather than one chain of C (a serial part of every layer at batch 1), the
   same order in vector and plain-C builds */
static inline double sum_lanes8(const double* a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}
static void layer_norm(const float* x, float* y, int C, const float* w, const float* b) {
  double s8[8] = {0}, v8[8] = {0};
  int i = 0;
  for (; i + 8 <= C; i += 8)
    for (int l = 0; l < 8; l++) s8[l] += x[i + l];
  for (int l = 0; i + l < C; l++) s8[l] += x[i + l];
  float mean = (float)(sum_lanes8(s8) / C);
  for (i = 0; i + 8 <= C; i += 8)
    for (int l = 0; l < 8; l++) { double d = x[i + l] - mean; v8[l] += d * d; }
  for (int l = 0; i + l < C; l++) { double d = x[i + l] - mean; v8[l] += d * d; }
  double v = sum_lanes8(v8);
  float rstd = 1.0f / sqrtf((float)(v / C) + 1e-5f);
  for (i = 0; i < C; i++) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

/* layer norm (eps 1e-5) of the n rows of x into y (may be x): the models' output norm on the compiled path */
void rs_layer_norm_rows(const float* x, float* y, int n, int C, const float* w, const float* b, int nt) {
  #pragma omp parallel for schedule(static) num_threads(nt) if (n >= 16)
  for (int j = 0; j < n; j++) layer_norm(x + (size_t)j * C, y + (size_t)j * C, C, w, b);
}

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
#ifdef RS_AVX2
/* e^x in fp32 (Cephes expf: n = round(x / ln 2), degree-6 polynomial of the rest, 2^n by vscale2; ~1 ulp): the
   same bits at every vector width */
static inline vf vexp(vf x) {
  x = vmax(vmin(x, vset1(88.7f)), vset1(-104.0f));
  vf n = vround(vmul(x, vset1(1.44269504088896341f)));
  vf r = vfnmadd(n, vset1(0.693359375f), x);
  r = vfnmadd(n, vset1(-2.12194440e-4f), r);
  vf p = vset1(1.9875691500e-4f);
  p = vfmadd(p, r, vset1(1.3981999507e-3f));
  p = vfmadd(p, r, vset1(8.3334519073e-3f));
  p = vfmadd(p, r, vset1(4.1665795894e-2f));
  p = vfmadd(p, r, vset1(1.6666665459e-1f));
  p = vfmadd(p, r, vset1(5.0000001201e-1f));
  p = vfmadd(p, vmul(r, r), vadd(r, vset1(1.0f)));
  return vscale2(p, n);
}
static inline vf vsigmoid(vf x) {
  const vf one = vset1(1.0f);
  return vdiv(one, vadd(one, vexp(vsub(vzero(), x))));
}
#endif

/* relu(v)^2 in place over count values, shared by the threads of a region (orphaned worksharing, ends in a
   barrier). Vectors where the build has them: the scalar loop's branch on the sign mispredicted about every
   other value (3% of a 16-stream step on the Zen 1 host). Same values: max(v, 0) is 0 for NaN and -0 too. */
static void relu_square_for(float* v, size_t count) {
#ifdef RS_AVX2
  #pragma omp for schedule(static)
  for (size_t b = 0; b < (count + VW - 1) / VW; b++) {
    size_t e = b * VW;
    if (e + VW <= count) {
      vf q = vmax(vload(v + e), vset1(0.0f));
      vstore(v + e, vmul(q, q));
    } else {
      for (; e < count; e++) { float q = v[e] > 0.0f ? v[e] : 0.0f; v[e] = q * q; }
    }
  }
#else
  #pragma omp for schedule(static)
  for (size_t e = 0; e < count; e++) { float q = v[e] > 0.0f ? v[e] : 0.0f; v[e] = q * q; }
#endif
}

/* token shift over a ragged batch, nm mixes: out_q = prev + mix_q * (cur - prev) (RWKV-4), or with weigh_prev
   out_q = cur + mix_q * (prev - cur) (RWKV-7: the coefficient weighs the previous token, as in its references).
   Stream b's states are at st0 + slots[b] * sstride (slots NULL: b); their row `row` keeps the stream's last row.
   in0: the states to read, laid out as st0's (NULL: st0 itself; else st0's rows are written, not read) */
static void shift_mix(const float* xn, int n, int C, float* st0, const float* in0, long sstride, int row,
                      const int* starts, const int* lens, int B, const int* slots, const float* mix, int nm,
                      int weigh_prev, float* out) {
  #pragma omp for schedule(static)
  for (int b = 0; b < B; b++) {
    const size_t at = (size_t)(slots ? slots[b] : b) * sstride + (size_t)row * C;
    float* keep = st0 + at;
    const float* keep_in = in0 ? in0 + at : keep;
    for (int t = 0; t < lens[b]; t++) {
      int j = starts[b] + t;
      const float* prev = t == 0 ? keep_in : xn + (size_t)(j - 1) * C;
      const float* cur = xn + (size_t)j * C;
      for (int q = 0; q < nm; q++) {
        float* o = out + ((size_t)q * n + j) * C;
        const float* mq = mix + (size_t)q * C;
        if (weigh_prev)
          for (int c = 0; c < C; c++) o[c] = cur[c] + mq[c] * (prev[c] - cur[c]);
        else
          for (int c = 0; c < C; c++) o[c] = prev[c] + mq[c] * (cur[c] - prev[c]);
      }
    }
    if (lens[b] > 0) memcpy(keep, xn + (size_t)(starts[b] + lens[b] - 1) * C, sizeof(float) * C);
    else if (keep_in != keep) memcpy(keep, keep_in, sizeof(float) * C);
  }
}

/* from this many rows, a layer's norms and token shifts are shared by the threads of its parallel regions (on one
   row that would only add barriers; the residual adds are shared always, at no barrier's cost) */
#define PAR_ROWS 4
/* layer norm of the n rows of x into xn, then shift_mix over them: worksharing loops (rows, then streams), shared
   by the threads of a region when called inside one, run by the calling thread alone outside */
static void norm_shift_mix(const float* x, float* xn, int n, int C, const float* lnw, const float* lnb, float* st0,
                           const float* in0, long sstride, int row, const int* starts, const int* lens, int B,
                           const int* slots, const float* mix, int nm, int weigh_prev, float* out) {
  #pragma omp for schedule(static)
  for (int j = 0; j < n; j++) layer_norm(x + (size_t)j * C, xn + (size_t)j * C, C, lnw, lnb);
  shift_mix(xn, n, C, st0, in0, sstride, row, starts, lens, B, slots, mix, nm, weigh_prev, out);
}

/* the channel mix's output: x = (x + sigmoid(r) * v) * post_scale over count values (worksharing, no barrier);
   vectors of VW, the last count % VW values scalar, whichever thread takes them */
static void gate_residual_for(float* x, const float* r, const float* v, size_t count, float post_scale) {
#ifdef RS_AVX2
  #pragma omp for schedule(static) nowait
  for (size_t b = 0; b < (count + VW - 1) / VW; b++) {
    size_t e = b * VW;
    if (e + VW <= count) {
      vf y = vadd(vload(x + e), vmul(vsigmoid(vload(r + e)), vload(v + e)));
      vstore(x + e, post_scale != 1.0f ? vmul(y, vset1(post_scale)) : y);
      continue;
    }
    for (; e < count; e++) {
      float y = x[e] + sigmoidf(r[e]) * v[e];
      x[e] = post_scale != 1.0f ? y * post_scale : y;
    }
  }
#else
  #pragma omp for schedule(static) nowait
  for (size_t e = 0; e < count; e++) {
    float y = x[e] + sigmoidf(r[e]) * v[e];
    x[e] = post_scale != 1.0f ? y * post_scale : y;
  }
#endif
}

/* x += y over count values (worksharing, no barrier) */
static void add_for(float* x, const float* y, size_t count) {
  #pragma omp for schedule(static) nowait
  for (size_t e = 0; e < count; e++) x[e] += y[e];
}

/* pieces of a layer's parallel regions (orphaned worksharing: every thread of the region calls them) */
static size_t act_bytes(const rs_mat* m, int n) {
  return m->kind == K_Q8 ? 2 * (size_t)n * m->inp + (size_t)n * (m->inp / QB) * sizeof(float) + 64 : 0;
}
static void act_init(const rs_mat* m, const float* x, int n, rs_act* a, char* buf) {
  a->x = x; a->in = m->in; a->inp = m->inp; a->q = 0; a->qs = 0;
  if (m->kind == K_Q8) { a->q = (const int16_t*)buf; a->qs = (const float*)(buf + 2 * (size_t)n * m->inp); }
}
static void act_quantize_for(const rs_mat* m, const float* x, int n, const rs_act* a) {  /* no barrier */
  if (m->kind != K_Q8) return;
  const size_t nb = (size_t)m->inp / QB;
  #pragma omp for schedule(static) nowait
  for (int r = 0; r < n; r++)
    quantize_row16(x + (size_t)r * m->in, m->in, m->inp, (int16_t*)a->q + (size_t)r * m->inp, (float*)a->qs + r * nb);
}
/* weight bytes a unit of m reads (the last unit of a matrix may read fewer) */
static size_t unit_bytes(const rs_mat* m, int n) {
  const size_t esz = m->kind == K_F32 ? 4 : 2;
  if (m->cols) return esz * (size_t)m->in * COLW;
  if (m->kind == K_Q8) return (size_t)(m->inp / GRP) * PG;
  return esz * (size_t)m->in * (row_triples16(m, n) ? 3 : 1);
}
/* the products of count matrices over n rows as one work list (barrier at the end). Static schedule (the
   default): thread t of T takes the units whose first byte lies in the t-th T-th of the list's weight bytes, so
   that threads read equal bytes when the matrices' units differ in size (RWKV-7: fp16 rows, q8 row pairs and
   low-rank columns of 32 to 128 inputs in one list); each still reads one contiguous run. Which thread computes
   a unit does not change its bits. */
static void multi_for(const rs_mat* mats, const rs_act* acts, int count, int n, float* const* ys) {  /* barrier */
  if (g_dynamic) {
    int total = 0;
    for (int q = 0; q < count; q++) total += units(&mats[q], n);
    apply_schedule(&mats[0]);
    #pragma omp for schedule(runtime)
    for (int u = 0; u < total; u++) {
      int q = 0, uu = u;
      while (uu >= units(&mats[q], n)) { uu -= units(&mats[q], n); q++; }
      out_unit(&mats[q], &acts[q], n, ys[q], uu);
    }
    return;
  }
#ifdef _OPENMP
  const size_t nt = (size_t)omp_get_num_threads(), t = (size_t)omp_get_thread_num();
#else
  const size_t nt = 1, t = 0;
#endif
  size_t total = 0;
  for (int q = 0; q < count; q++) total += unit_bytes(&mats[q], n) * (size_t)units(&mats[q], n);
  const size_t lo = total * t / nt, hi = total * (t + 1) / nt;
  size_t pos = 0;
  for (int q = 0; q < count; q++) {
    const size_t b = unit_bytes(&mats[q], n), U = (size_t)units(&mats[q], n);
    /* units u of q with pos + u * b in [lo, hi) */
    const size_t u0 = lo > pos ? (lo - pos + b - 1) / b : 0, u1 = hi > pos ? (hi - pos + b - 1) / b : 0;
    for (size_t u = u0; u < u1 && u < U; u++) out_unit(&mats[q], &acts[q], n, ys[q], (int)u);
    pos += b * U;
  }
  #pragma omp barrier
}

/* a layer's weights: vectors fp32 [C] (amix [3, C]: k, v, r; fmix [2, C]: k, r; tw = -exp(time_decay), tu =
   time_first); mats: att key, value, receptance, output, ffn key, receptance, value; post_scale multiplies the
   layer's output rows (0.5 where float16 halves the residual, else 1) */
typedef struct {
  const float *ln1w, *ln1b, *ln2w, *ln2b, *amix, *tw, *tu, *fmix;
  const rs_mat* mats;
  float post_scale;
} rs_layer4;

/* the WKV recurrence of a layer over every stream's rows, token by token (worksharing over channels, ends in a
   barrier): writes sigmoid(r) * wkv into out and advances the aa, bb, pp rows of the states */
static void wkv4_for(const float* k, const float* v, const float* r, const float* tw, const float* tu, int C,
                     float* st0, long sstride, const int* starts, const int* lens, int B, float* out) {
#ifdef RS_AVX2
  #pragma omp for schedule(static)
  for (int cb = 0; cb < C / VW; cb++) {  /* VW channels a time, each channel's arithmetic the scalar loop's */
    const int c = cb * VW;
    const vf u = vload(tu + c), w = vload(tw + c);
    for (int b = 0; b < B; b++) {
      float* s = st0 + (size_t)b * sstride;
      vf aa = vload(s + C + c), bb = vload(s + 2 * C + c);
      vf pp = vload(s + 3 * C + c);
      for (int t = 0; t < lens[b]; t++) {
        size_t j = (size_t)(starts[b] + t) * C + c;
        vf kk = vload(k + j), vv = vload(v + j);
        vf ww = vadd(u, kk), q = vmax(ww, pp);
        vf e1 = vexp(vsub(pp, q)), e2 = vexp(vsub(ww, q));
        vf wkv = vdiv(vadd(vmul(e1, aa), vmul(e2, vv)), vadd(vmul(e1, bb), e2));
        ww = vadd(pp, w); q = vmax(kk, ww);
        e1 = vexp(vsub(ww, q)); e2 = vexp(vsub(kk, q));
        aa = vadd(vmul(e1, aa), vmul(e2, vv));
        bb = vadd(vmul(e1, bb), e2);
        pp = q;
        vstore(out + j, vmul(vsigmoid(vload(r + j)), wkv));
      }
      vstore(s + C + c, aa); vstore(s + 2 * C + c, bb); vstore(s + 3 * C + c, pp);
    }
  }
#else
  #pragma omp for schedule(static)
  for (int c = 0; c < C; c++) {
    for (int b = 0; b < B; b++) {
      float* s = st0 + (size_t)b * sstride;
      float aa = s[C + c], bb = s[2 * C + c], pp = s[3 * C + c];
      for (int t = 0; t < lens[b]; t++) {
        size_t j = (size_t)(starts[b] + t) * C + c;
        float kk = k[j], vv = v[j];
        float ww = tu[c] + kk, q = pp > ww ? pp : ww;
        float e1 = expf(pp - q), e2 = expf(ww - q);
        float wkv = (e1 * aa + e2 * vv) / (e1 * bb + e2);
        ww = pp + tw[c]; q = ww > kk ? ww : kk;
        e1 = expf(ww - q); e2 = expf(kk - q);
        aa = e1 * aa + e2 * vv; bb = e1 * bb + e2; pp = q;
        out[j] = sigmoidf(r[j]) * wkv;
      }
      s[C + c] = aa; s[2 * C + c] = bb; s[3 * C + c] = pp;
    }
  }
#endif
}

/* one RWKV-4 layer over n rows of B streams (stream b owns rows starts[b] .. + lens[b] - 1), in place on x [n, C]
   and the states (stream b's rows att_x, aa, bb, pp, ffn_x at st0 + b * sstride); called by every thread of a
   parallel region (worksharing and barriers only). Scratch: xn [n, C], mixed and kvr [3, n, C], big [n, F], abuf
   the quantized activations (layer4_act_bytes). */
static void layer4(float* x, int n, int C, int F, float* st0, long sstride, const int* starts, const int* lens,
                   int B, const rs_layer4* L, float* xn, float* mixed, float* kvr, float* big, char* abuf) {
  const size_t nc = (size_t)n * C;
  const rs_mat* mats = L->mats;
  const float* ins[7] = {mixed, mixed + nc, mixed + 2 * nc, xn, mixed, mixed + nc, big};
  rs_act acts[7];
  for (int q = 0; q < 7; q++) {
    act_init(&mats[q], ins[q], n, &acts[q], abuf);
    abuf += act_bytes(&mats[q], n);
  }
  float* ys_att[3] = {kvr, kvr + nc, kvr + 2 * nc};
  float* ys_out[1] = {kvr};
  float* ys_ffn[2] = {big, kvr};
  float* ys_val[1] = {kvr + nc};

  norm_shift_mix(x, xn, n, C, L->ln1w, L->ln1b, st0, 0, sstride, 0, starts, lens, B, 0, L->amix, 3, 0, mixed);
  for (int q = 0; q < 3; q++) act_quantize_for(&mats[q], ins[q], n, &acts[q]);
  #pragma omp barrier
  multi_for(mats, acts, 3, n, ys_att);
  wkv4_for(kvr, kvr + nc, kvr + 2 * nc, L->tw, L->tu, C, st0, sstride, starts, lens, B, xn);
  act_quantize_for(&mats[3], xn, n, &acts[3]);
  #pragma omp barrier
  multi_for(mats + 3, acts + 3, 1, n, ys_out);
  add_for(x, kvr, nc);
  #pragma omp barrier

  norm_shift_mix(x, xn, n, C, L->ln2w, L->ln2b, st0, 0, sstride, 4, starts, lens, B, 0, L->fmix, 2, 0, mixed);
  act_quantize_for(&mats[4], ins[4], n, &acts[4]);
  act_quantize_for(&mats[5], ins[5], n, &acts[5]);
  #pragma omp barrier
  multi_for(mats + 4, acts + 4, 2, n, ys_ffn);
  relu_square_for(big, (size_t)n * F);
  act_quantize_for(&mats[6], big, n, &acts[6]);
  #pragma omp barrier
  multi_for(mats + 6, acts + 6, 1, n, ys_val);
  gate_residual_for(x, kvr, kvr + nc, nc, L->post_scale);
  #pragma omp barrier
}

static size_t layer4_act_bytes(const rs_mat* mats, int n) {
  size_t total = 64;
  for (int q = 0; q < 7; q++) total += act_bytes(&mats[q], n);
  return total;
}

/* the count layers of RWKV-4 in one call and one parallel region (see layer4): x [n, C]; layer l's states at
   st + l * lstride (stream b's at + b * sstride) */
void rs_rwkv4_layers(float* x, int n, int C, int F, float* st, long lstride, long sstride, const int* starts,
                     const int* lens, int B, const rs_layer4* layers, int count, int nt) {
  if (count <= 0) return;
  size_t nc = (size_t)n * C;
  float* xn = (float*)malloc(sizeof(float) * nc);
  float* mixed = (float*)malloc(sizeof(float) * 3 * nc);
  float* kvr = (float*)malloc(sizeof(float) * 3 * nc);
  float* big = (float*)malloc(sizeof(float) * (size_t)n * F);
  char* abuf = (char*)malloc(layer4_act_bytes(layers[0].mats, n));  /* every layer's matrices have the same shapes */
  #pragma omp parallel num_threads(nt)
  for (int l = 0; l < count; l++)
    layer4(x, n, C, F, st + (size_t)l * lstride, sstride, starts, lens, B, &layers[l], xn, mixed, kvr, big, abuf);
  free(xn); free(mixed); free(kvr); free(big); free(abuf);
}

/* read bandwidth probe: sums a buffer as 64-bit words with full-width vector loads, prefetching as the products
   do (the best read rate the kernels can reach is the floor's reference) */
uint64_t rs_read_sum(const uint64_t* p, long words, int nt) {
  uint64_t total = 0;
  #pragma omp parallel for schedule(static) reduction(+:total) num_threads(nt)
  for (long c = 0; c < words / 64; c++) {  /* 512-byte chunks */
    const uint64_t* q = p + c * 64;
#if defined(RS_AVX512)
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    for (int i = 0; i < 64; i += 16) {
      PF(q + i);
      PF(q + i + 8);
      s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(q + i));
      s1 = _mm512_add_epi64(s1, _mm512_loadu_si512(q + i + 8));
    }
    total += (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(s0, s1));
#elif defined(RS_AVX2)
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int i = 0; i < 64; i += 8) {
      PF(q + i);
      s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i*)(q + i)));
      s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i*)(q + i + 4)));
    }
    s0 = _mm256_add_epi64(s0, s1);
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i*)lanes, s0);
    total += lanes[0] + lanes[1] + lanes[2] + lanes[3];
#else
    uint64_t s = 0;
    for (int i = 0; i < 64; i += 8) {
      PF(q + i);
      s += q[i] + q[i + 1] + q[i + 2] + q[i + 3] + q[i + 4] + q[i + 5] + q[i + 6] + q[i + 7];
    }
    total += s;
#endif
  }
  return total;
}
"""

CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared"]


class RsMat(ctypes.Structure):
    """A packed matrix as the kernels read it: ``inp`` is ``in_`` padded to :data:`GROUP` for q8_0."""

    _fields_ = [("kind", ctypes.c_int), ("out", ctypes.c_int), ("in_", ctypes.c_int), ("inp", ctypes.c_int),
                ("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("cols", ctypes.c_int)]


_lib: ctypes.CDLL | None = None
_tried = False
_off = 0  # > 0 inside disabled()


def cache_dir() -> Path:
    root = os.environ.get("RWKV_STREAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rwkv-stream")
    return Path(root) / "cpu-kernels"


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def find_compiler() -> str | None:
    """The C compiler the CPU kernels are built with: ``$CC``, else ``cc``, else ``gcc``; None without one."""
    return shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")


def build_library(compiler: str, stem: str, source: str, flag_sets: Sequence[Sequence[str]]) -> Path:
    """``source`` (C) compiled into a shared library under :func:`cache_dir`, named ``{stem}_{hash}.so`` by a
    hash of the source, the first flag set, the compiler's version and the CPU (a cached build is reused). The
    flag sets are tried in order (a fallback without some option); RuntimeError when none compiles."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([source, *flag_sets[0], version, _cpu_id()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{stem}_{key}.so"
    if out.exists():
        with contextlib.suppress(OSError):  # marks it as in use for prune_cache (a read-only cache still works)
            os.utime(out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, so = Path(tmp) / f"{stem}.c", Path(tmp) / f"{stem}.so"
        src.write_text(source)
        for flags in flag_sets:
            proc = subprocess.run([compiler, *flags, str(src), "-o", str(so), "-lm"], capture_output=True,
                                  text=True, timeout=300)
            if proc.returncode == 0:
                break
        else:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        os.replace(so, out)  # atomic: concurrent builders race harmlessly
    prune_cache(stem, keep=out)
    return out


CACHE_MAX_AGE_DAYS = 30


def prune_cache(stem: str, keep: Path, max_age_days: float = CACHE_MAX_AGE_DAYS) -> list[Path]:
    """Remove ``stem``'s other builds not used for ``max_age_days`` (each use refreshes a build's mtime): old
    source versions would otherwise pile up, one library per upgrade. A process that still has one loaded keeps
    its mapping (unlinking does not unmap). Returns what was removed."""
    import time

    cutoff = time.time() - max_age_days * 86400
    removed = []
    for old in keep.parent.glob(f"{stem}_*.so"):
        try:
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()
                removed.append(old)
        except OSError:  # raced with another process, or not ours to remove: leave it
            continue
    return removed


def load() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (cached); None where disabled, or with no working compiler."""
    global _lib, _tried
    if _off:
        return None
    if _tried:
        return _lib
    _tried = True
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("rwkv-stream CPU kernels off (%s=0): torch path", ENV_SWITCH)
        return None
    compiler = find_compiler()
    if compiler is None:
        log.warning("rwkv-stream: no C compiler found ($CC, cc, gcc): CPU kernels off, torch path")
        return None
    try:  # without OpenMP (no libgomp): one thread, still compiled
        no_openmp = [f for f in CFLAGS if f != "-fopenmp"]
        lib = ctypes.CDLL(str(build_library(compiler, "rwkv_stream_cpu", SOURCE, (CFLAGS, no_openmp))))
        lib.rs_matmul.argtypes = [ctypes.POINTER(RsMat), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_int]
        lib.rs_matmul.restype = None
        lib.rs_rwkv4_layers.restype = None
        lib.rs_rwkv4_layers.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                        ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.rs_features.restype = ctypes.c_int
        lib.rs_read_sum.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
        lib.rs_read_sum.restype = ctypes.c_uint64
        lib.rs_set_schedule.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.rs_set_prefetch.argtypes = [ctypes.c_int]
        lib.rs_layer_norm_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        lib.rs_layer_norm_rows.restype = None
        lib.rs_gather_rows.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_void_p]
        lib.rs_gather_rows.restype = ctypes.c_int
    except Exception as exc:  # any failure: the torch path is correct, only slower
        log.warning("rwkv-stream: CPU kernels unavailable (%s): torch path", str(exc).replace("\n", " ")[:300])
        return None
    _lib = lib
    return lib


def load_extension(stem: str, source: str, flag_sets: Sequence[Sequence[str]], what: str) -> ctypes.CDLL | None:
    """Another compiled library beside these kernels (the w8a8 layer parts, the RWKV-7 layer), built by
    :func:`build_library` and loaded; None where these kernels are off or unavailable (the same switch, the same
    compiler) or its build fails (one log line naming ``what``: the torch path is correct, only slower)."""
    if load() is None:
        return None
    compiler = find_compiler()
    if compiler is None:
        return None
    try:
        return ctypes.CDLL(str(build_library(compiler, stem, source, flag_sets)))
    except Exception as exc:
        log.warning("rwkv-stream: %s unavailable (%s): torch path", what, str(exc).replace("\n", " ")[:300])
        return None


def reset() -> None:
    """Forget the loaded library (tests switch kernels on and off)."""
    global _lib, _tried
    _lib, _tried = None, False


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Models built inside take the torch path, as on a machine without a compiler (benchmarks, tests)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def features() -> dict[str, bool]:
    lib = load()
    f = lib.rs_features() if lib is not None else 0
    return {"compiled": lib is not None, "avx2": bool(f & 1), "vnni": bool(f & 2), "openmp": bool(f & 4),
            "avx512": bool(f & 8)}


def gather_rows(table: Tensor, ids: Tensor) -> Tensor:
    """``table[ids]`` as fp32 ``[n, C]`` (``table`` fp32, fp16 or bf16 ``[V, C]`` contiguous, ``ids`` int64): the
    compiled paths' embedding lookup in one C call (indexing, casting and ``contiguous`` were three torch
    dispatches of a batch-1 step). An id outside the table raises ``IndexError`` naming it. Needs the kernels."""
    lib = load()
    assert lib is not None and table.dim() == 2
    if table.dtype not in KINDS or table.device.type != "cpu":  # no C reader for it: torch's lookup
        return table[ids].to(torch.float32).contiguous()
    table = table if table.is_contiguous() else table.contiguous()
    ids = ids if ids.dtype == torch.int64 and ids.is_contiguous() else ids.to(torch.int64).contiguous()
    n, (vocab, c) = ids.numel(), table.shape
    x = torch.empty(n, c, dtype=torch.float32)
    bad = lib.rs_gather_rows(table.data_ptr(), KINDS[table.dtype], vocab, ids.data_ptr(), n, c, x.data_ptr())
    if bad >= 0:
        raise IndexError(f"token id {int(ids.reshape(-1)[bad])} out of range for a table of {vocab} rows")
    return x


def layer_norm_rows_(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Layer norm (eps 1e-5) of the rows of ``x`` (fp32 ``[n, C]``, contiguous) in place, by the kernels'
    ``layer_norm`` (double sums over eight lanes), returning ``x``: the output norm of the compiled paths, one C
    call where ``F.layer_norm``'s dispatch took ~150 us of a batch-1 step once a step's weights had passed
    through the caches. ``weight`` and ``bias`` fp32 ``[C]`` contiguous. Needs the kernels (:func:`load`)."""
    lib = load()
    assert lib is not None and x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 2
    n, c = x.shape
    if weight.numel() != c or bias.numel() != c:
        raise ValueError(f"layer norm of {c} columns given a weight of {weight.numel()} and a bias of {bias.numel()}")
    lib.rs_layer_norm_rows(x.data_ptr(), x.data_ptr(), n, c, weight.data_ptr(), bias.data_ptr(),
                           torch.get_num_threads())
    return x


def quantize_q8_0(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per block of :data:`QBLOCK` inputs: ``weight ~= q * scales`` (per block); the scales are
    fp16 values (kept as fp32), as the packed rows store them. Returns ``q`` ``[out, in]`` int8 and ``scales``
    ``[out, in // QBLOCK]`` fp32."""
    out, n_in = weight.shape
    blocks = weight.float().reshape(out, n_in // QBLOCK, QBLOCK)
    scales = (blocks.abs().amax(dim=-1) / 127.0).half().float()
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    q = (blocks * inv.unsqueeze(-1)).round().clamp_(-127, 127).to(torch.int8).reshape(out, n_in)
    return q.contiguous(), scales.contiguous()


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """What the kernel does to a q8_0 product's input rows: int16 per block of :data:`QBLOCK` (scale = block
    absmax / 32767, round to nearest even); returns the integers (as int32) and ``[rows, in // QBLOCK]`` scales."""
    rows, n_in = x.shape
    blocks = x.float().reshape(rows, n_in // QBLOCK, QBLOCK)
    amax = blocks.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 32767.0 / amax, torch.zeros_like(amax))
    q = (blocks * inv.unsqueeze(-1)).round().clamp_(-32767, 32767).to(torch.int32).reshape(rows, n_in)
    return q, amax / 32767.0


GROUP = 256  # inputs per group of the packed q8_0 layout (8 blocks, one per 32-bit lane of an integer dot)
PAIR_GROUP_BYTES = 32 + 2 * GROUP  # 16 fp16 scales, then two rows' 256 int8 weights


def pack_q8_0(q: Tensor, scales: Tensor) -> Tensor:
    """Rows in pairs, inputs padded to a multiple of :data:`GROUP`, one contiguous stream the kernel reads in
    order: for pair ``p`` and group ``g``, the 16 fp16 scales (8 of row 2p, 8 of row 2p+1), then 16 steps of 32
    bytes (16 of row 2p, 16 of row 2p+1), each holding elements ``2t, 2t+1`` of the group's 8 blocks in turn.
    Returns uint8 ``[pairs, groups, PAIR_GROUP_BYTES]``."""
    out, n_in = q.shape
    pad_in, pad_out = (-n_in) % GROUP, out % 2
    q = torch.nn.functional.pad(q, (0, pad_in, 0, pad_out))
    s = torch.nn.functional.pad(scales.half(), (0, pad_in // QBLOCK, 0, pad_out))
    pairs, groups = q.shape[0] // 2, q.shape[1] // GROUP
    # [pair, row, group, block, step, 2] -> [pair, group, step, row, block, 2]
    w = q.reshape(pairs, 2, groups, 8, 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(pairs, groups, 2 * GROUP)
    sb = s.reshape(pairs, 2, groups, 8).permute(0, 2, 1, 3).contiguous().view(torch.uint8).reshape(pairs, groups, 32)
    return torch.cat((sb, w.view(torch.uint8)), dim=-1).contiguous()


def unpack_q8_0(packed: Tensor, out: int, n_in: int) -> tuple[Tensor, Tensor]:
    """The ``q`` and ``scales`` of :func:`quantize_q8_0` back from :func:`pack_q8_0`."""
    pairs, groups, _ = packed.shape
    w = packed[..., 32:].contiguous().view(torch.int8).reshape(pairs, groups, 16, 2, 8, 2)
    q = w.permute(0, 3, 1, 4, 2, 5).reshape(2 * pairs, groups * GROUP)
    s = packed[..., :32].contiguous().view(torch.float16).reshape(pairs, groups, 2, 8).permute(0, 2, 1, 3)
    s = s.reshape(2 * pairs, groups * 8).float()
    return q[:out, :n_in].contiguous(), s[:out, : n_in // QBLOCK].contiguous()


HUGE_PAGE = 2 << 20  # bytes of an x86-64 transparent huge page
_MADV_HUGEPAGE = 14


def huge_page_buffer(nbytes: int) -> Tensor:
    """An untouched uint8 buffer of ``nbytes`` that starts on a 2 MiB boundary and that Linux is asked to back
    with transparent huge pages (``madvise(MADV_HUGEPAGE)``, which takes effect where THP is ``always`` or
    ``madvise``; elsewhere it is plain memory). A step streams every weight once: with 4 KiB pages that is a
    TLB miss per 4 KiB read, and the products ran ~10% slower per byte in 4 KiB pages on the machine of
    BENCHMARKS.md."""
    raw = torch.empty(nbytes + 2 * HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    buf = raw[start : start + nbytes]  # a view: keeps the whole allocation alive
    _advise_huge_pages(buf.data_ptr(), -(-nbytes // HUGE_PAGE) * HUGE_PAGE)  # inside raw: 2 pages were added
    return buf


def _advise_huge_pages(address: int, length: int) -> None:
    if not sys.platform.startswith("linux") or length <= 0:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.madvise(address, length, _MADV_HUGEPAGE) != 0:
            log.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):  # no libc symbol: plain pages, same results
        pass


def read_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float | None:
    """Bytes per second the compiled kernel reads from a buffer well beyond the caches (best of ``repeats``),
    in memory placed as the weights are (:func:`huge_page_buffer`)."""
    import time

    lib = load()
    if lib is None:
        return None
    buf = huge_page_buffer(nbytes).view(torch.int64).fill_(1)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        lib.rs_read_sum(buf.data_ptr(), buf.numel(), torch.get_num_threads())
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def rwkv4_layer_ready(n_embd: int, ffn_dim: int) -> bool:
    return n_embd % QBLOCK == 0 and ffn_dim % QBLOCK == 0 and load() is not None


_LAYER4_VECTORS = ("ln1w", "ln1b", "ln2w", "ln2b", "amix", "tw", "tu", "fmix")


class RsLayer4(ctypes.Structure):
    """One RWKV-4 layer as ``rs_rwkv4_layers`` reads it (the tensors and matrices must outlive it)."""

    _fields_ = [
        *[(name, ctypes.c_void_p) for name in _LAYER4_VECTORS],
        ("mats", ctypes.POINTER(RsMat)),
        ("post_scale", ctypes.c_float),
    ]


class LayerTable:
    """The layers of a model for :func:`rwkv4_layers`: ``rows`` (``rs_layer4[]``) and the matrix arrays its rows
    point into."""

    def __init__(self, vectors: list[list[Tensor]], mats: list[list[RsMat]], post_scales: list[float]) -> None:
        self.rows = (RsLayer4 * len(vectors))()
        self._mat_arrays = []
        for row, vecs, ms, scale in zip(self.rows, vectors, mats, post_scales, strict=True):
            assert len(vecs) == len(_LAYER4_VECTORS) and len(ms) == 7
            assert all(v.is_contiguous() and v.dtype == torch.float32 for v in vecs)
            for name, v in zip(_LAYER4_VECTORS, vecs, strict=True):
                setattr(row, name, v.data_ptr())
            arr = (RsMat * 7)(*ms)
            row.mats = ctypes.cast(arr, ctypes.POINTER(RsMat))
            row.post_scale = scale
            self._mat_arrays.append(arr)

    def __len__(self) -> int:
        return len(self.rows)


def rwkv4_layer_table(vectors: list[list[Tensor]], mats: list[list[RsMat]], post_scales: list[float]) -> LayerTable:
    """Per layer the vectors ln1 w/b, ln2 w/b, att mix, -exp(decay), time_first, ffn mix (fp32, contiguous), the 7
    packed matrices in ``rs_layer4``'s order and the post scale."""
    return LayerTable(vectors, mats, post_scales)


def rwkv4_layers(lib: ctypes.CDLL, x: Tensor, states: Tensor, starts: ctypes.Array, lens: ctypes.Array,
                 table: LayerTable, ffn_dim: int) -> None:
    """Every layer in one call, in place: ``x`` ``[n, C]`` fp32 contiguous, ``states`` ``[B, L, 5, C]`` fp32
    contiguous; ``table`` from :func:`rwkv4_layer_table`."""
    n, C = x.shape
    L = states.shape[1]
    lib.rs_rwkv4_layers(x.data_ptr(), n, C, ffn_dim, states.data_ptr(), 5 * C, L * 5 * C, starts, lens, len(starts),
                        table.rows, len(table), torch.get_num_threads())
