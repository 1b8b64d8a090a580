"""Compiled CPU kernels for RWKV-7 ("x070"): all layers in one C call and one OpenMP parallel region
(:func:`run_layers`), fp16 / bf16 / q8_0.

Each layer (equations in ``shared/notes/rwkv7-facts.md``) over a ragged batch, in place on the residual rows and
the streams' states, in phases separated by barriers:

1. time mix: layer norm and the six token-shift lerps (rows, then streams, shared by the threads); then the seven
   products that read the lerps (``W_r, W_k, W_v`` and the first matrices of the four low-rank paths) as one
   work list, ``tanh`` / ``sigmoid`` of the low-rank hiddens, the four second low-rank products as one list,
   then per (stream, head) the element-wise work (decay, in-context rate, ``kk``, ``k`` update, value
   residual), the matrix-state update token by token, the per-head GroupNorm, bonus and gate, and last the
   output product;
2. channel mix: layer norm and lerp, ``relu(W_k x)^2``, ``W_v``.

The products are :mod:`rwkv_stream.cpu_kernels`' (``multi_for`` over packed matrices, q8_0 activations
quantized to int16 per block); this source is appended to that module's and built as its own library by
:func:`rwkv_stream.cpu_kernels.build_library` (same compiler, flags, cache and switch). In the ``q8_0`` format
the low-rank matrices, the embedding, ``W_r``, ``W_k`` and the head are fp16 (see ``models/rwkv7.py``), as on
the torch path.

Batch invariance: every row of a product is computed by the same instructions whatever the row count, the
element-wise work of a (row, head) depends on that row alone, and the matrix state of each stream and head is
walked token by token in a fixed order (one thread per (stream, head) at a time). So a stream's bits depend
neither on its batch mates nor on how its tokens are split into calls. The bits are not the torch path's
(activations stay fp32 into the 16-bit products, another exp and summation order): see
``tests/test_cpu_kernels_rwkv7.py`` for the tolerances.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import cpu_kernels

SOURCE7 = r"""
/* ------------------------------------------------------------------------------------------------- RWKV-7 */
enum { M7_R, M7_K, M7_V, M7_W1, M7_A1, M7_G1, M7_V1, M7_W2, M7_A2, M7_G2, M7_V2, M7_O, M7_FK, M7_FV, M7_COUNT };
/* per-layer vectors, all fp32 [C] except mix [6, C] (r, w, k, v, a, g) */
enum { V7_LN1W, V7_LN1B, V7_LN2W, V7_LN2B, V7_MIX, V7_W0, V7_A0, V7_V0, V7_KK, V7_KA, V7_RK, V7_LNXW, V7_LNXB,
       V7_FXK, V7_COUNT };
#define R7_DECAY 0.60653065971263342f /* e^-1/2: decay = exp(-e^-1/2 * sigmoid(z)) */

typedef struct {
  const float *r, *zw, *za, *zg, *zv;  /* products (rows of the head) */
  float *k, *v, *vf;                    /* k, v updated in place; vf: the first layer's v (written at layer 0) */
  const float *const *vec;              /* per-layer vectors (offset by the head's first channel below) */
  int c0, layer0;
  float eps;
} r7_tok;

static inline float r7_sig(float x) { return 1.0f / (1.0f + expf(-x)); }

/* one token of head (c0 .. c0 + N - 1): element-wise prep, matrix-state update, GroupNorm, bonus, gate */
static void r7_head_scalar(int N, const float* Sin, float* S, const r7_tok* t, float* out) {
  const int c0 = t->c0;
  const float *w0 = t->vec[V7_W0] + c0, *a0 = t->vec[V7_A0] + c0, *v0 = t->vec[V7_V0] + c0;
  const float *k_k = t->vec[V7_KK] + c0, *k_a = t->vec[V7_KA] + c0, *r_k = t->vec[V7_RK] + c0;
  const float *lw = t->vec[V7_LNXW] + c0, *lb = t->vec[V7_LNXB] + c0;
  const float *r = t->r + c0, *zw = t->zw + c0, *za = t->za + c0, *zg = t->zg + c0, *zv = t->zv + c0;
  float *k = t->k + c0, *v = t->v + c0, *vf = t->vf + c0;
  float dec[N], al[N], be[N], y[N];
  float ss = 0.0f;
  for (int c = 0; c < N; c++) { float q = k[c] * k_k[c]; al[c] = q; ss += q * q; }
  float nrm = sqrtf(ss);
  nrm = nrm > 1e-12f ? nrm : 1e-12f;
  for (int c = 0; c < N; c++) {
    float kk = al[c] / nrm, a = r7_sig(a0[c] + za[c]);
    dec[c] = expf(-R7_DECAY * r7_sig(w0[c] + zw[c]));
    k[c] = k[c] * (1.0f + (a - 1.0f) * k_a[c]);
    al[c] = -kk;
    be[c] = kk * a;
    if (t->layer0) vf[c] = v[c];
    else v[c] = v[c] + (vf[c] - v[c]) * r7_sig(v0[c] + zv[c]);
  }
  for (int i = 0; i < N; i++) {
    const float* si = Sin + (size_t)i * N;
    float* s = S + (size_t)i * N;
    float sa = 0.0f, yi = 0.0f, vi = v[i];
    for (int j = 0; j < N; j++) sa += si[j] * al[j];
    for (int j = 0; j < N; j++) { float e = si[j] * dec[j] + sa * be[j] + vi * k[j]; s[j] = e; yi += e * r[j]; }
    y[i] = yi;
  }
  float mean = 0.0f, var = 0.0f, bonus = 0.0f;
  for (int i = 0; i < N; i++) mean += y[i];
  mean /= (float)N;
  for (int i = 0; i < N; i++) { float d = y[i] - mean; var += d * d; }
  float rstd = 1.0f / sqrtf(var / (float)N + t->eps);
  for (int j = 0; j < N; j++) bonus += r[j] * k[j] * r_k[j];
  for (int i = 0; i < N; i++) out[c0 + i] = ((y[i] - mean) * rstd * lw[i] + lb[i] + bonus * v[i]) * zg[i];
}

#ifdef RS_AVX2
/* the same for N a multiple of VW (VW channels a vector, the widest of the build; sums as vector partials, then
   one fixed reduction) */
/* rows i0 .. i0 + R - 1 (R = 1 or 4) of a head's state: sa = S_i . al, S_i = S_i * dec + sa * be + v_i * k, y_i =
   S_i . r; R rows share each load of the per-head vectors (4 rows: 25% less time a head on the Zen 1 host,
   which the loads bound); each row's arithmetic is the same whatever R. NT: the new rows go out with
   non-temporal stores (S aligned to the vector, see r7_stream_out) */
static inline AI void r7_state_rows(int N, const int R, const float* Sin, float* S, int i0, const float* al,
                                    const float* be, const float* k, const float* dec, const float* r, const float* v,
                                    float* y, const int NT) {
  const int nv = N / VW;
  const float* si[4];
  float* so[4];
  vf sav[4], sa[4], vi[4], yv[4];
  for (int u = 0; u < R; u++) {
    si[u] = Sin + (size_t)(i0 + u) * N;
    so[u] = S + (size_t)(i0 + u) * N;
    sav[u] = vzero();
    yv[u] = vzero();
  }
  for (int q = 0; q < nv; q++) {
    const vf a = vload(al + VW * q);
    for (int u = 0; u < R; u++) sav[u] = vfmadd(vload(si[u] + VW * q), a, sav[u]);
  }
  for (int u = 0; u < R; u++) {
    sa[u] = vset1(vsum(sav[u]));
    vi[u] = vset1(v[i0 + u]);
  }
  for (int q = 0; q < nv; q++) {
    const int o = VW * q;
    const vf bq = vload(be + o), kq = vload(k + o), dq = vload(dec + o), rq = vload(r + o);
    for (int u = 0; u < R; u++) {
      const vf e = vfmadd(vload(si[u] + o), dq, vfmadd(sa[u], bq, vmul(vi[u], kq)));
      if (NT) vstream(so[u] + o, e);
      else vstore(so[u] + o, e);
      yv[u] = vfmadd(e, rq, yv[u]);
    }
  }
  for (int u = 0; u < R; u++) y[i0 + u] = vsum(yv[u]);
}
static void r7_head_vec(int N, const float* Sin, float* S, const r7_tok* t, float* out, int stream_out) {
  const int c0 = t->c0, nv = N / VW;
  const float *w0 = t->vec[V7_W0] + c0, *a0 = t->vec[V7_A0] + c0, *v0 = t->vec[V7_V0] + c0;
  const float *k_k = t->vec[V7_KK] + c0, *k_a = t->vec[V7_KA] + c0, *r_k = t->vec[V7_RK] + c0;
  const float *lw = t->vec[V7_LNXW] + c0, *lb = t->vec[V7_LNXB] + c0;
  const float *r = t->r + c0, *zw = t->zw + c0, *za = t->za + c0, *zg = t->zg + c0, *zv = t->zv + c0;
  float *k = t->k + c0, *v = t->v + c0, *vfirst = t->vf + c0;
  float dec[N] __attribute__((aligned(64))), al[N] __attribute__((aligned(64)));
  float be[N] __attribute__((aligned(64))), y[N] __attribute__((aligned(64)));
  const vf one = vset1(1.0f);
  vf ssv = vzero();
  for (int q = 0; q < nv; q++) {
    vf kk = vmul(vload(k + VW * q), vload(k_k + VW * q));
    vstore(al + VW * q, kk);
    ssv = vfmadd(kk, kk, ssv);
  }
  float nrm = sqrtf(vsum(ssv));
  const vf vn = vset1(nrm > 1e-12f ? nrm : 1e-12f);
  for (int q = 0; q < nv; q++) {
    const int o = VW * q;
    vf kk = vdiv(vload(al + o), vn);
    vf a = vsigmoid(vadd(vload(a0 + o), vload(za + o)));
    vf sw = vsigmoid(vadd(vload(w0 + o), vload(zw + o)));
    vstore(dec + o, vexp(vmul(vset1(-R7_DECAY), sw)));
    vf kv = vload(k + o);
    vstore(k + o, vmul(kv, vfmadd(vsub(a, one), vload(k_a + o), one)));
    vstore(al + o, vsub(vzero(), kk));
    vstore(be + o, vmul(kk, a));
    vf vv = vload(v + o);
    if (t->layer0) vstore(vfirst + o, vv);
    else {
      vf gv = vsigmoid(vadd(vload(v0 + o), vload(zv + o)));
      vstore(v + o, vfmadd(vsub(vload(vfirst + o), vv), gv, vv));
    }
  }
  int i = 0;
  if (stream_out)  /* N % VW == 0 and VW % 4 == 0 here: no single rows left */
    for (; i + 4 <= N; i += 4) r7_state_rows(N, 4, Sin, S, i, al, be, k, dec, r, v, y, 1);
  else
    for (; i + 4 <= N; i += 4) r7_state_rows(N, 4, Sin, S, i, al, be, k, dec, r, v, y, 0);
  for (; i < N; i++) r7_state_rows(N, 1, Sin, S, i, al, be, k, dec, r, v, y, 0);
  vf mv = vzero(), bv = vzero();
  for (int q = 0; q < nv; q++) {
    mv = vadd(mv, vload(y + VW * q));
    bv = vfmadd(vmul(vload(r + VW * q), vload(k + VW * q)), vload(r_k + VW * q), bv);
  }
  const vf mean = vset1(vsum(mv) / (float)N);
  const vf bonus = vset1(vsum(bv));
  vf var = vzero();
  for (int q = 0; q < nv; q++) {
    vf d = vsub(vload(y + VW * q), mean);
    var = vfmadd(d, d, var);
  }
  const vf rstd = vset1(1.0f / sqrtf(vsum(var) / (float)N + t->eps));
  for (int q = 0; q < nv; q++) {
    const int o = VW * q;
    vf yn = vmul(vsub(vload(y + o), mean), rstd);
    yn = vfmadd(yn, vload(lw + o), vload(lb + o));
    yn = vfmadd(bonus, vload(v + o), yn);
    vstore(out + c0 + o, vmul(yn, vload(zg + o)));
  }
}
#endif

/* whether a head's new state goes out with non-temporal stores: a fresh output (read from in0, so S was not just
   read into the cache) written once in this call (one token), vector-aligned. Its old contents are then not
   read from memory before being overwritten (a third of the state walk's traffic at batch 1); the next read of
   the state is the next call's, after the rest of the network has streamed through the caches anyway */
static inline int r7_stream_out(const float* in0, int len, const float* S) {
#ifdef RS_AVX2
  return in0 != 0 && len == 1 && ((uintptr_t)S & (sizeof(vf) - 1)) == 0;
#else
  (void)in0; (void)len; (void)S;
  return 0;
#endif
}

/* one RWKV-7 layer over n rows of B streams (stream b owns rows starts[b] .. + lens[b] - 1): x [n, C] and the
   states (stream b's [att shift C | ffn shift C | S: H x N(value) x N(key)] at st0 + slots[b] * sstride;
   slots NULL: b) in place, or read from in0 (the same layout; NULL: st0) and written to st0.
   vf [n, C]: the value of layer 0 (written there, read by the later layers). mats: see M7_*; has_v = 0 for
   layer 0 (no value-residual path: mats M7_V1 / M7_V2 are not read). Ranks padded (rw, ra, rg, rv). */
static inline size_t r7_al(size_t b) { return (b + 63) & ~(size_t)63; }
static inline char* r7_take(char** p, size_t b) { char* q = *p; *p += r7_al(b); return q; }
static size_t r7_sizes(int n, int C, int F, const rs_mat* mats, int has_v, size_t* part) {
  const size_t nc = (size_t)n * C;
  const int rsum = mats[M7_W1].out + mats[M7_A1].out + mats[M7_G1].out + (has_v ? mats[M7_V1].out : 0);
  size_t acts = 0;
  for (int q = 0; q < M7_COUNT; q++) acts += (has_v || (q != M7_V1 && q != M7_V2)) ? act_bytes(&mats[q], n) : 0;
  /* xn, mixed (6 rows of C), products (r k v zw za zg zv out), low-rank hiddens, ffn hidden, q8 activations */
  const size_t b[6] = {4 * nc, 4 * 6 * nc, 4 * 8 * nc, 4 * ((size_t)n * rsum + 16), 4 * (size_t)n * F, acts + 64};
  size_t t = 64;
  for (int i = 0; i < 6; i++) { if (part) part[i] = b[i]; t += r7_al(b[i]); }
  return t;
}
/* a layer as rs_rwkv7_layers reads it: the per-layer vectors (V7_*), the matrices (M7_*), has_v = 0 for layer 0
   (no value-residual path: mats M7_V1 / M7_V2 are not read) */
typedef struct { const float* const* vec; const rs_mat* mats; int has_v; } rs_layer7;

/* one layer; every thread of a parallel region calls it (worksharing and barriers only); scratch: at least
   r7_sizes bytes, 64-byte aligned pieces */
static void layer7(float* x, int n, int C, int F, int H, int N, float* st0, const float* in0, long sstride,
                   const int* starts, const int* lens, int B, const int* slots, const rs_layer7* L, float* vf,
                   char* scratch, float eps) {
  const float* const* vec = L->vec;
  const rs_mat* mats = L->mats;
  const int has_v = L->has_v;
  const size_t nc = (size_t)n * C;
  const int rw = mats[M7_W1].out, ra = mats[M7_A1].out, rg = mats[M7_G1].out;
  size_t part[6];
  r7_sizes(n, C, F, mats, has_v, part);
  char* p = scratch;
  p += -(uintptr_t)p & 63;
  float* xn = (float*)r7_take(&p, part[0]);
  float* mixed = (float*)r7_take(&p, part[1]);
  float* prod = (float*)r7_take(&p, part[2]);
  float* hid = (float*)r7_take(&p, part[3]);
  float* big = (float*)r7_take(&p, part[4]);
  char* abuf = r7_take(&p, part[5]);
  float *r = prod, *k = prod + nc, *v = prod + 2 * nc, *zw = prod + 3 * nc, *za = prod + 4 * nc;
  float *zg = prod + 5 * nc, *zv = prod + 6 * nc, *yo = prod + 7 * nc;
  float *hw = hid, *ha = hid + (size_t)n * rw, *hg = ha + (size_t)n * ra, *hv = hg + (size_t)n * rg;
  const float* ins[M7_COUNT] = {mixed, mixed + 2 * nc, mixed + 3 * nc, mixed + nc, mixed + 4 * nc, mixed + 5 * nc,
                                mixed + 3 * nc, hw, ha, hg, hv, yo, mixed, big};
  float* ys[M7_COUNT] = {r, k, v, hw, ha, hg, hv, zw, za, zg, zv, mixed, big, mixed};
  rs_act acts[M7_COUNT];
  size_t off[M7_COUNT + 1] = {0};
  for (int q = 0; q < M7_COUNT; q++)
    off[q + 1] = off[q] + ((has_v || (q != M7_V1 && q != M7_V2)) ? act_bytes(&mats[q], n) : 0);
  for (int q = 0; q < M7_COUNT; q++) act_init(&mats[q], ins[q], n, &acts[q], abuf + off[q]);
  const int n1 = has_v ? 7 : 6, n2 = has_v ? 4 : 3;

  norm_shift_mix(x, xn, n, C, vec[V7_LN1W], vec[V7_LN1B], st0, in0, sstride, 0, starts, lens, B, slots, vec[V7_MIX], 6,
                 1, mixed);
  for (int q = 0; q < n1; q++) act_quantize_for(&mats[q], ins[q], n, &acts[q]);
  #pragma omp barrier
  multi_for(mats, acts, n1, n, ys);
  #pragma omp for schedule(static)
  for (int j = 0; j < n; j++) {
    for (int c = 0; c < rw; c++) hw[(size_t)j * rw + c] = tanhf(hw[(size_t)j * rw + c]);
    for (int c = 0; c < rg; c++) hg[(size_t)j * rg + c] = r7_sig(hg[(size_t)j * rg + c]);
  }
  for (int q = 0; q < n2; q++) act_quantize_for(&mats[M7_W2 + q], ins[M7_W2 + q], n, &acts[M7_W2 + q]);
  #pragma omp barrier
  multi_for(mats + M7_W2, acts + M7_W2, n2, n, ys + M7_W2);
  #pragma omp for schedule(static) nowait
  for (int u = 0; u < B * H; u++) {
    const int b = u / H, h = u % H;
    const size_t at = (size_t)(slots ? slots[b] : b) * sstride + 2 * (size_t)C + (size_t)h * N * N;
    float* S = st0 + at;
    const float* Sin = in0 ? in0 + at : S;  /* read at the stream's first token, then S */
    if (!lens[b] && Sin != S) memcpy(S, Sin, sizeof(float) * N * N);
    for (int t = 0; t < lens[b]; t++) {
      const size_t row = (size_t)(starts[b] + t) * C;
      r7_tok tk = {r + row, zw + row, za + row, zg + row, zv + row, k + row, v + row, vf + row, vec, h * N,
                   !has_v, eps};
#ifdef RS_AVX2
      if (N % VW == 0) { r7_head_vec(N, t ? S : Sin, S, &tk, yo + row, r7_stream_out(in0, lens[b], S)); continue; }
#endif
      r7_head_scalar(N, t ? S : Sin, S, &tk, yo + row);
    }
  }
#ifdef RS_AVX2
  _mm_sfence();  /* the non-temporal stores of r7_stream_out, before the barrier */
#endif
  #pragma omp barrier
  act_quantize_for(&mats[M7_O], yo, n, &acts[M7_O]);
  #pragma omp barrier
  multi_for(mats + M7_O, acts + M7_O, 1, n, ys + M7_O);
  add_for(x, mixed, nc);
  #pragma omp barrier
  norm_shift_mix(x, xn, n, C, vec[V7_LN2W], vec[V7_LN2B], st0, in0, sstride, 1, starts, lens, B, slots, vec[V7_FXK], 1,
                 1, mixed);
  act_quantize_for(&mats[M7_FK], mixed, n, &acts[M7_FK]);
  #pragma omp barrier
  multi_for(mats + M7_FK, acts + M7_FK, 1, n, ys + M7_FK);
  relu_square_for(big, (size_t)n * F);
  act_quantize_for(&mats[M7_FV], big, n, &acts[M7_FV]);
  #pragma omp barrier
  multi_for(mats + M7_FV, acts + M7_FV, 1, n, ys + M7_FV);
  add_for(x, mixed, nc);
  #pragma omp barrier
}

/* the count layers in one call and one parallel region: layer l's states at st + l * lstride (stream b's at +
   slots[b] * sstride, slots NULL: b), updated in place, or with st_in (the same layout) read from there and
   written to st (st's old values are not read: a functional step without first copying the states); vf [n, C]
   the value of layer 0. One scratch buffer, the largest any layer needs, serves every layer. */
void rs_rwkv7_layers(float* x, int n, int C, int F, int H, int N, float* st, const float* st_in, long lstride,
                     long sstride,
                     const int* starts, const int* lens, int B, const int* slots, const rs_layer7* layers, int count,
                     float* vf, float eps, int nt) {
  size_t need = 0;
  for (int l = 0; l < count; l++) {
    const size_t b = r7_sizes(n, C, F, layers[l].mats, layers[l].has_v, 0);
    need = b > need ? b : need;
  }
  char* scratch = (char*)malloc(need + 64);
  #pragma omp parallel num_threads(nt)
  for (int l = 0; l < count; l++)
    layer7(x, n, C, F, H, N, st + (size_t)l * lstride, st_in ? st_in + (size_t)l * lstride : 0, sstride, starts, lens,
           B, slots, &layers[l], vf, scratch, eps);
  free(scratch);
}
"""

_lib: ctypes.CDLL | None = None
_tried = False

N_MATS = 14
N_VECS = 14


def load() -> ctypes.CDLL | None:
    """The RWKV-7 kernels (the shared kernels' source with :data:`SOURCE7` appended), built on first use and
    cached; None where the shared kernels are off or unavailable (:func:`rwkv_stream.cpu_kernels.load`: the
    switch, no compiler, a failed build) or this build fails: the torch path then."""
    global _lib, _tried
    if cpu_kernels.load() is None:
        return None
    if _tried:
        return _lib
    _tried = True
    no_openmp = [f for f in cpu_kernels.CFLAGS if f != "-fopenmp"]
    lib = cpu_kernels.load_extension("rwkv_stream_cpu7", cpu_kernels.SOURCE + SOURCE7, (cpu_kernels.CFLAGS, no_openmp),
                                     "RWKV-7 CPU kernels")
    if lib is not None:
        lib.rs_rwkv7_layers.restype = None
        lib.rs_rwkv7_layers.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_float,
            ctypes.c_int]
    _lib = lib
    return lib


def reset() -> None:
    """Forget the loaded library (tests switch kernels on and off)."""
    global _lib, _tried
    _lib, _tried = None, False


def ready(n_embd: int, ffn_dim: int) -> bool:
    """Whether a model of these widths can run its CPU layers here: inputs in whole blocks of 32 (the 16-bit
    products read 32 inputs a step, q8_0 blocks are 32) and the kernels built."""
    return n_embd % cpu_kernels.QBLOCK == 0 and ffn_dim % cpu_kernels.QBLOCK == 0 and load() is not None


class RsLayer7(ctypes.Structure):
    """``rs_layer7``: a layer's vector table, its matrices and whether it has the value-residual path."""

    _fields_ = [("vec", ctypes.c_void_p), ("mats", ctypes.c_void_p), ("has_v", ctypes.c_int)]


class LayerArgs:
    """One layer's arguments of ``rs_rwkv7_layers`` (its vector table, matrices, value-residual flag); keeps the
    tensors and matrices they point to."""

    def __init__(self, vectors: list[Tensor], mats: list[cpu_kernels.RsMat], has_v: bool) -> None:
        assert len(vectors) == N_VECS and len(mats) == N_MATS
        assert all(v.is_contiguous() and v.dtype == torch.float32 and v.device.type == "cpu" for v in vectors)
        self.vectors = vectors
        self.vec = (ctypes.c_void_p * N_VECS)(*[v.data_ptr() for v in vectors])
        self.mats = (cpu_kernels.RsMat * N_MATS)(*mats)
        self.has_v = int(has_v)
        self.vec_ptr, self.mats_ptr = ctypes.addressof(self.vec), ctypes.addressof(self.mats)


class LayerTable:
    """A model's layers as ``rs_rwkv7_layers`` reads them (``rows``: ``rs_layer7[]``), built once at load."""

    def __init__(self, layers: list[LayerArgs]) -> None:
        self.layers = layers  # keeps what the rows point to
        self.rows = (RsLayer7 * len(layers))(*[RsLayer7(a.vec_ptr, a.mats_ptr, a.has_v) for a in layers])

    def __len__(self) -> int:
        return len(self.layers)


def run_layers(lib: ctypes.CDLL, x: Tensor, states: Tensor, lengths: list[int], layers: LayerTable,
               n_head: int, head_size: int, ffn_dim: int, eps: float, slots: Tensor | None = None,
               source: Tensor | None = None) -> None:
    """All layers in place in one ``rs_rwkv7_layers`` call: ``x`` ``[n, C]`` fp32 contiguous (stream ``b`` owns
    ``lengths[b]`` consecutive rows), ``states`` ``[B, L, 2C + H*N*N]`` fp32 contiguous, or with ``slots`` (int32
    contiguous) a slot arena ``[capacity, L, 2C + H*N*N]`` with stream ``b`` in row ``slots[b]``. ``source`` (no
    slots, one row a stream): the states to start from, laid out as ``states`` and apart from it; ``states`` is
    then only written (the same bits as copying ``source`` into ``states`` first, without that copy's traffic:
    2.4 MB a step at the 0.1B shape)."""
    n, C = x.shape
    B = len(lengths)
    per_layer = states.shape[2]
    assert x.dtype == torch.float32 and x.is_contiguous() and sum(lengths) == n
    assert states.dtype == torch.float32 and states.is_contiguous() and len(layers) == states.shape[1]
    assert slots is None or (slots.dtype == torch.int32 and slots.is_contiguous() and len(slots) == B)
    assert slots is not None or states.shape[0] >= B
    assert source is None or (slots is None and states.shape[0] == B and source.shape == states.shape
                              and source.dtype == torch.float32 and source.is_contiguous()
                              and source.data_ptr() != states.data_ptr())  # every row of states gets written
    starts, pos = [], 0
    for m in lengths:
        starts.append(pos)
        pos += m
    c_starts, c_lens = (ctypes.c_int * B)(*starts), (ctypes.c_int * B)(*lengths)
    v_first = torch.empty_like(x)  # layer 0's value, read by the later layers
    lib.rs_rwkv7_layers(x.data_ptr(), n, C, ffn_dim, n_head, head_size, states.data_ptr(),
                        None if source is None else source.data_ptr(), per_layer,
                        states.shape[1] * per_layer, c_starts, c_lens, B, None if slots is None else slots.data_ptr(),
                        layers.rows, len(layers), v_first.data_ptr(), eps, torch.get_num_threads())
