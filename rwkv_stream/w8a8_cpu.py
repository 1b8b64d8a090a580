"""Compiled element-wise parts of an RWKV-4 layer in the ``w8a8`` format (CPU), around torch's int8 products.

In ``w8a8`` the seven matrix products of a layer are int8 x int8 -> int32 (``torch._int_mm``, VNNI) and cheap
at the sizes of the small models; what costs is everything between them when written as torch ops over a
ragged batch: dequantizing, layer norms, token shift and mixes, quantizing activations row by row (six
passes over memory each), the gates and the WKV recurrence walking time. Here each of those runs as one C call
over all rows of the step (:class:`W8A8Layers`), so a layer is 4 C calls and 7 ``_int_mm``:

- ``w8_mix``: optional residual ``x += gate * dequant(acc)``, then per stream and token in order: layer norm,
  token shift (the stream's previous normalized row, from its state for the first token), ``m`` mixes, each
  quantized to int8 per row (the same rule as :func:`rwkv_stream.linear.quantize_rows`);
- ``w8_wkv``: dequantize k, v, r, the WKV recurrence token by token within each stream (state in place),
  ``sigmoid(r) * wkv``, quantized per row for the output product;
- ``w8_ffn``: ``relu(k)^2`` quantized per row for the value product, and the gate ``sigmoid(r)``;
- ``w8_residual``: the last layer's ``x += gate * dequant(acc)`` and the output layer norm.

Every row is computed on its own by the same instructions whatever the number of rows (a row's sums are
vectorized in an order fixed at compile time), and the WKV state is advanced token by token: a stream's bits
depend neither on its batch mates nor on how its tokens are split into steps (the engine's batch-invariance
contract). The bits are not the torch path's (another exp, summation order, and quantization by the scale's
reciprocal; within 1e-4 of it, tests/test_w8a8_cpu.py); the torch path stays the fallback where no compiler is
present or ``RWKV_STREAM_CPU_KERNELS=0``. Built by :func:`rwkv_stream.cpu_kernels.build_library` (the same compiler,
switch and cache as the other CPU kernels; ``-O3 -march=native``), without OpenMP: one thread.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch
from torch import Tensor

from . import cpu_kernels

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

/* exp(x) for x <= 0 (every caller passes -|d|): Cephes' polynomial on a range reduction by ln 2; 0 below
   -87.3. Branch-free so that the channel loops vectorize; each element's result depends on it alone. */
static inline float neg_exp(float x) {
  float xc = x < -87.3f ? -87.3f : x;
  float n = nearbyintf(xc * 1.44269504088896341f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float s;
  memcpy(&s, &bits, 4);
  return x < -87.3f ? 0.0f : p * s;
}

static inline float sigmoid(float x) {
  float e = neg_exp(-fabsf(x));
  float d = 1.0f + e;
  return x >= 0.0f ? 1.0f / d : e / d;
}

static float row_sum(const float* restrict x, int C) {
  float s = 0.0f;
  #pragma omp simd reduction(+:s)
  for (int c = 0; c < C; c++) s += x[c];
  return s;
}

static void layer_norm(const float* restrict x, int C, const float* restrict w, const float* restrict b,
                       float* restrict out) {
  float mean = row_sum(x, C) / (float)C;
  float var = 0.0f;
  #pragma omp simd reduction(+:var)
  for (int c = 0; c < C; c++) {
    float d = x[c] - mean;
    out[c] = d;
    var += d * d;
  }
  float rstd = 1.0f / sqrtf(var / (float)C + 1e-5f);
  for (int c = 0; c < C; c++) out[c] = out[c] * rstd * w[c] + b[c];
}

/* int8 per row, the rule of rwkv_stream.linear.quantize_rows: scale = max(absmax, 1e-30) / 127, q = round(y /
   scale), the division done as a product with the scale's reciprocal; amax is the row's max |y| */
static float quant_amax(const float* restrict y, int C, float amax, int8_t* restrict q) {
  float s = (amax > 1e-30f ? amax : 1e-30f) / 127.0f;
  float inv = 1.0f / s;
  for (int c = 0; c < C; c++) q[c] = (int8_t)nearbyintf(y[c] * inv);
  return s;
}

static float quant_row(const float* restrict y, int C, int8_t* restrict q) {
  float amax = 0.0f;
  #pragma omp simd reduction(max:amax)
  for (int c = 0; c < C; c++) {
    float a = fabsf(y[c]);
    amax = a > amax ? a : amax;
  }
  return quant_amax(y, C, amax, q);
}

static void residual(float* restrict x, int C, const int32_t* restrict acc, float xs, const float* restrict ws,
                     const float* restrict gate) {
  if (gate)
    for (int c = 0; c < C; c++) x[c] += gate[c] * ((float)acc[c] * xs * ws[c]);
  else
    for (int c = 0; c < C; c++) x[c] += (float)acc[c] * xs * ws[c];
}

/* torch.lerp's formula; returns the row's max |out| */
static float lerp_row(const float* restrict a, const float* restrict b, const float* restrict t, int C,
                      float* restrict out) {
  float amax = 0.0f;
  #pragma omp simd reduction(max:amax)
  for (int c = 0; c < C; c++) {
    float d = b[c] - a[c];
    float o = t[c] < 0.5f ? a[c] + t[c] * d : b[c] - d * (1.0f - t[c]);
    out[c] = o;
    float m = fabsf(o);
    amax = m > amax ? m : amax;
  }
  return amax;
}

void w8_mix(int N, int C, float* x, const int32_t* acc, const float* xs, const float* ws, const float* gate,
            const float* lnw, const float* lnb, float* state, long sstride, const int* starts, const int* lens,
            int B, const float* mix, int m, int8_t* q, float* s, long qstride) {
  float buf[2][C], y[C];
  for (int b = 0; b < B; b++) {
    float* st = state + (long)b * sstride;
    const float* prev = st;
    for (int t = 0; t < lens[b]; t++) {
      long n = starts[b] + t;
      float* xr = x + n * C;
      if (acc) residual(xr, C, acc + n * C, xs[n], ws, gate ? gate + n * C : 0);
      float* cur = buf[t & 1];
      layer_norm(xr, C, lnw, lnb, cur);
      for (int j = 0; j < m; j++) {
        float amax = lerp_row(prev, cur, mix + (long)j * C, C, y);
        s[j * qstride + n] = quant_amax(y, C, amax, q + (j * qstride + n) * C);
      }
      prev = cur;
    }
    if (lens[b] > 0) memcpy(st, prev, sizeof(float) * C);
  }
}

/* the last layer's residual, then the output layer norm (lnw, lnb) in place */
void w8_residual(int N, int C, float* x, const int32_t* acc, const float* xs, const float* ws, const float* gate,
                 const float* lnw, const float* lnb) {
  float y[C];
  for (long n = 0; n < N; n++) {
    residual(x + n * C, C, acc + n * C, xs[n], ws, gate ? gate + n * C : 0);
    layer_norm(x + n * C, C, lnw, lnb, y);
    memcpy(x + n * C, y, sizeof(float) * C);
  }
}

/* one token of one stream: k, v, r int32 sums with their scales; aa, bb, pp advanced in place; y = sigmoid(r) * wkv */
static void wkv_row(int C, const int32_t* restrict pk, const int32_t* restrict pv, const int32_t* restrict pr,
                    float sk, float sv, float sr, const float* restrict wk, const float* restrict wv,
                    const float* restrict wr, const float* restrict w, const float* restrict u,
                    float* restrict aa, float* restrict bb, float* restrict pp, float* restrict y) {
  for (int c = 0; c < C; c++) {
    float k = (float)pk[c] * sk * wk[c];
    float v = (float)pv[c] * sv * wv[c];
    float r = (float)pr[c] * sr * wr[c];
    float ww = u[c] + k, p = pp[c], a = aa[c], d = bb[c];
    float e = neg_exp(-fabsf(p - ww));
    float e1 = p >= ww ? 1.0f : e, e2 = p >= ww ? e : 1.0f;
    float num = e1 * a + e2 * v, den = e1 * d + e2;
    float w2 = p + w[c];
    float g = neg_exp(-fabsf(w2 - k));
    float f1 = w2 >= k ? 1.0f : g, f2 = w2 >= k ? g : 1.0f;
    aa[c] = f1 * a + f2 * v;
    bb[c] = f1 * d + f2;
    pp[c] = w2 >= k ? w2 : k;
    float er = neg_exp(-fabsf(r));  /* sigmoid(r) * num / den with one division */
    y[c] = (num * (r >= 0.0f ? 1.0f : er)) / (den * (1.0f + er));
  }
}

/* k, v, r: int32 sums of [N, C] with their row scales xk/xv/xr and column scales wk/wv/wr; state rows aa, bb,
   pp of stream b at state + b * sstride (+ C, + 2C). Output sigmoid(r) * wkv quantized per row. */
void w8_wkv(int N, int C, const int32_t* ak, const int32_t* av, const int32_t* ar, const float* xk,
            const float* xv, const float* xr, const float* wk, const float* wv, const float* wr, const float* w,
            const float* u, float* state, long sstride, const int* starts, const int* lens, int B, int8_t* q,
            float* s) {
  float y[C];
  for (int b = 0; b < B; b++) {
    float* aa = state + (long)b * sstride;
    for (int t = 0; t < lens[b]; t++) {
      long n = starts[b] + t;
      wkv_row(C, ak + n * C, av + n * C, ar + n * C, xk[n], xv[n], xr[n], wk, wv, wr, w, u, aa, aa + C,
              aa + 2 * C, y);
      s[n] = quant_row(y, C, q + n * C);
    }
  }
}

static float relu_sq(int F, const int32_t* restrict pk, float sk, const float* restrict wk, float* restrict y) {
  float amax = 0.0f;
  #pragma omp simd reduction(max:amax)
  for (int f = 0; f < F; f++) {
    float k = (float)pk[f] * sk * wk[f];
    k = k > 0.0f ? k : 0.0f;
    float k2 = k * k;
    y[f] = k2;
    amax = k2 > amax ? k2 : amax;
  }
  return amax;
}

static void gate_row(int C, const int32_t* restrict pr, float sr, const float* restrict wr, float* restrict g) {
  for (int c = 0; c < C; c++) g[c] = sigmoid((float)pr[c] * sr * wr[c]);
}

/* channel mix middle: relu(k)^2 quantized per row ([N, F]) and the gate sigmoid(r) ([N, C]) */
void w8_ffn(int N, int C, int F, const int32_t* ak, const int32_t* ar, const float* xk, const float* xr,
            const float* wk, const float* wr, int8_t* q, float* s, float* gate) {
  float y[F];
  for (long n = 0; n < N; n++) {
    float amax = relu_sq(F, ak + n * F, xk[n], wk, y);
    s[n] = quant_amax(y, F, amax, q + n * F);
    gate_row(C, ar + n * C, xr[n], wr, gate + n * C);
  }
}
"""

CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-fno-math-errno", "-fPIC", "-shared"]

_lib: ctypes.CDLL | None = None
_tried = False


def load() -> ctypes.CDLL | None:
    """The compiled w8a8 layer parts, built on first use (cached); None where the CPU kernels are off
    (``RWKV_STREAM_CPU_KERNELS=0``, :func:`rwkv_stream.cpu_kernels.disabled`) or no compiler works."""
    global _lib, _tried
    if cpu_kernels.load() is None:  # the same switch, the same "no compiler" answer
        return None
    if _tried:
        return _lib
    _tried = True
    lib = cpu_kernels.load_extension("rwkv_stream_w8a8", SOURCE, (CFLAGS,), "w8a8 CPU kernels")
    if lib is not None:
        for name in ("w8_mix", "w8_residual", "w8_wkv", "w8_ffn"):
            getattr(lib, name).restype = None
    _lib = lib
    return lib


def _p(t: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


class _Buffers:
    """Work rows of one chunk size, reused by every chunk of a step (views of ``n`` rows are contiguous)."""

    def __init__(self, rows: int, C: int, F: int) -> None:
        i8, i32 = torch.int8, torch.int32
        self.rows = rows
        self.qa, self.sa = torch.empty(3, rows, C, dtype=i8), torch.empty(3, rows)
        self.qf, self.sf = torch.empty(2, rows, C, dtype=i8), torch.empty(2, rows)
        self.acc = [torch.empty(rows, C, dtype=i32) for _ in range(3)]
        self.qo, self.so = torch.empty(rows, C, dtype=i8), torch.empty(rows)
        self.acc_f, self.qv = torch.empty(rows, F, dtype=i32), torch.empty(rows, F, dtype=i8)
        self.sv = torch.empty(rows)
        self.gate, self.acc_v = torch.empty(rows, C), torch.empty(rows, C, dtype=i32)

    def views(self, n: int) -> tuple:
        """``n``-row views: int_mm inputs and outputs, and the pointers the kernels take."""
        qa, qf, acc = [q[:n] for q in self.qa], [q[:n] for q in self.qf], [a[:n] for a in self.acc]
        tensors = (qa, qf, acc, self.qo[:n], self.acc_f[:n], self.qv[:n], self.acc_v[:n])
        names = ("qa", "qf", "qo", "so", "acc_f", "qv", "sv", "gate", "acc_v")
        ptrs: dict[str, Any] = {name: _p(getattr(self, name)) for name in names}
        ptrs["sa"] = [_p(self.sa[j]) for j in range(3)]
        ptrs["sf"] = [_p(self.sf[j]) for j in range(2)]
        ptrs["acc"] = [_p(a) for a in self.acc]
        return tensors, ptrs


class W8A8Layers:
    """The w8a8 RWKV-4 network over a flat ragged batch with the compiled parts (see the module docstring).

    ``layers``: the model's ``_Layer`` records whose seven matrices are :class:`rwkv_stream.linear.W8A8Linear`.
    """

    def __init__(self, lib: ctypes.CDLL, layers: list, n_embd: int, ffn_dim: int,
                 ln_out: tuple[Tensor, Tensor]) -> None:
        self.lib, self.layers, self.C, self.F = lib, layers, n_embd, ffn_dim
        assert layers and all(v.dtype == torch.float32 and v.is_contiguous() for v in ln_out)
        self._ln_out = (ln_out, _p(ln_out[0]), _p(ln_out[1]))
        self.chunk_rows = int(os.environ.get("RWKV_STREAM_W8A8_CHUNK", "512"))
        self._args: list[dict[str, Any]] = []  # per layer: pointers and transposed weight views, made once
        for layer in layers:  # contiguous fp32 vectors the kernels read
            vectors = (*layer.ln1, *layer.ln2, layer.att_mix, layer.ffn_mix, layer.w, layer.u)
            assert all(v.dtype == torch.float32 and v.is_contiguous() for v in vectors)
            mats = (layer.att_key, layer.att_value, layer.att_receptance, layer.att_output, layer.ffn_key,
                    layer.ffn_receptance, layer.ffn_value)
            self._args.append({
                "ln1": (_p(layer.ln1[0]), _p(layer.ln1[1])), "ln2": (_p(layer.ln2[0]), _p(layer.ln2[1])),
                "att_mix": _p(layer.att_mix), "ffn_mix": _p(layer.ffn_mix), "w": _p(layer.w), "u": _p(layer.u),
                "wt": [m.qweight.t() for m in mats], "ws": [_p(m.scales) for m in mats],
            })

    def run(self, x: Tensor, states: Tensor, lengths: list[int]) -> Tensor:
        """Advance ``x`` ``[N, C]`` (fp32, stream-major rows) through all layers; ``states`` ``[B, L, 5, C]``
        fp32 contiguous is updated in place. Returns the hidden vectors: the output layer norm of the last
        layer's residual stream (in ``x``'s memory).

        The rows go through all layers in chunks of at most :attr:`chunk_rows` consecutive rows, so that a
        chunk's activations stay in the core's cache: a stream cut by a chunk boundary continues in the next
        chunk from the state the first left (every update is token by token, so the bits are the same)."""
        x = x.to(torch.float32).contiguous()
        assert states.is_contiguous() and states.dtype == torch.float32
        bufs = _Buffers(min(len(x), self.chunk_rows), self.C, self.F)
        pos, b, done = 0, 0, 0  # chunk start row; its first stream and how many of that stream's rows are done
        while pos < len(x):
            end = min(pos + bufs.rows, len(x))
            first, starts, lens, at = b, [], [], pos
            while at < end:
                n = min(lengths[b] - done, end - at)
                starts.append(at - pos)
                lens.append(n)
                at += n
                done += n
                if done == lengths[b]:
                    b, done = b + 1, 0
            self._chunk(x[pos:end], states[first:first + len(lens)], starts, lens, bufs)
            pos = end
        return x

    def _chunk(self, x: Tensor, states: Tensor, starts: list[int], lengths: list[int], bufs: _Buffers) -> None:
        lib, C, F = self.lib, self.C, self.F
        N, B, L = x.shape[0], len(lengths), len(self.layers)
        c_starts, c_lens = (ctypes.c_int * B)(*starts), (ctypes.c_int * B)(*lengths)
        (qa, qf, acc, qo, acc_f, qv, acc_v), p = bufs.views(N)
        stride, sstride, px = ctypes.c_long(bufs.rows), ctypes.c_long(L * 5 * C), _p(x)
        base = states.data_ptr()
        none = ctypes.c_void_p(None)
        for i, a in enumerate(self._args):
            row = base + i * 5 * C * 4
            wt, ws = a["wt"], a["ws"]
            if i == 0:
                lib.w8_mix(N, C, px, none, none, none, none, *a["ln1"], ctypes.c_void_p(row), sstride, c_starts,
                           c_lens, B, a["att_mix"], 3, p["qa"], p["sa"][0], stride)
            else:  # the previous layer's channel-mix residual first
                lib.w8_mix(N, C, px, p["acc_v"], p["sv"], self._args[i - 1]["ws"][6], p["gate"], *a["ln1"],
                           ctypes.c_void_p(row), sstride, c_starts, c_lens, B, a["att_mix"], 3, p["qa"], p["sa"][0],
                           stride)
            for j in range(3):
                torch._int_mm(qa[j], wt[j], out=acc[j])
            lib.w8_wkv(N, C, *p["acc"], *p["sa"], ws[0], ws[1], ws[2], a["w"], a["u"], ctypes.c_void_p(row + C * 4),
                       sstride, c_starts, c_lens, B, p["qo"], p["so"])
            torch._int_mm(qo, wt[3], out=acc[0])
            lib.w8_mix(N, C, px, p["acc"][0], p["so"], ws[3], none, *a["ln2"], ctypes.c_void_p(row + 4 * C * 4),
                       sstride, c_starts, c_lens, B, a["ffn_mix"], 2, p["qf"], p["sf"][0], stride)
            torch._int_mm(qf[0], wt[4], out=acc_f)
            torch._int_mm(qf[1], wt[5], out=acc[1])
            lib.w8_ffn(N, C, F, p["acc_f"], p["acc"][1], *p["sf"], ws[4], ws[5], p["qv"], p["sv"], p["gate"])
            torch._int_mm(qv, wt[6], out=acc_v)
        lib.w8_residual(N, C, px, p["acc_v"], p["sv"], self._args[-1]["ws"][6], p["gate"], *self._ln_out[1:])
