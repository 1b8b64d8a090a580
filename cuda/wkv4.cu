// RWKV-4 WKV recurrence over a state arena, in place, for a batch of slots.
//
// State arena: fp32 [capacity, n_layer, 5, C] (any element strides, channel stride 1), rows per layer
// [att_x, aa, bb, pp, ffn_x]. slots[b] < 0 means a stateless row (padding): it starts from the initial
// state (aa = bb = 0, pp = RWKV_EMPTY_PP, i.e. rwkv_stream.wkv.EMPTY_PP) and nothing is written back.
//
// Entry points (extern "C", one per input/output dtype pair; suffix <in>_<out>):
//   wkv_step_*   one token per stream:     grid (ceil(C / block), B), one thread per (stream, channel)
//   wkv_ragged_* tokens offsets[b]..offsets[b+1]-1 of a flat [N, C] batch belong to stream b:
//                grid (ceil(C / block), B), one thread per (stream, channel) looping over its tokens
// If r is not null the output is sigmoid(r) * wkv (the attention gate fused in).
// Aliasing: k, v, r, w, u, slots and offsets are only read (they may share memory); out and the state arena
// are written and must not overlap each other or any input (rwkv_stream.gpu checks this before launching).
#include "rwkv_common.cuh"

namespace rwkv {

struct WkvState {
  float aa, bb, pp;
};

// One token of the numerically stable recurrence; returns wkv and advances the state.
__device__ __forceinline__ float wkv_token(WkvState& s, float k, float v, float w, float u) {
  float uk = u + k;
  float q = fmaxf(s.pp, uk);
  float e1 = expf(s.pp - q);
  float e2 = expf(uk - q);
  const float y = (e1 * s.aa + e2 * v) / (e1 * s.bb + e2);
  const float pw = s.pp + w;
  q = fmaxf(pw, k);
  e1 = expf(pw - q);
  e2 = expf(k - q);
  s.aa = e1 * s.aa + e2 * v;
  s.bb = e1 * s.bb + e2;
  s.pp = q;
  return y;
}

__device__ __forceinline__ WkvState load_state(const StateArena& st, int slot, int layer, int c) {
  WkvState s{0.f, 0.f, kInitPP};
  if (slot >= 0) {
    s.aa = st.row(slot, layer, AA)[c];
    s.bb = st.row(slot, layer, BB)[c];
    s.pp = st.row(slot, layer, PP)[c];
  }
  return s;
}

__device__ __forceinline__ void store_state(const StateArena& st, int slot, int layer, int c,
                                            const WkvState& s) {
  if (slot < 0) return;
  st.row(slot, layer, AA)[c] = s.aa;
  st.row(slot, layer, BB)[c] = s.bb;
  st.row(slot, layer, PP)[c] = s.pp;
}

template <typename T>
struct Rows {  // a read-only [rows, C] matrix with row stride ld (channel stride 1); ptr may be null
  const T* __restrict__ ptr;
  i64 ld;
  __device__ __forceinline__ float at(i64 t, int c) const { return to_float(ptr[t * ld + c]); }
};

template <typename T, typename TO>
__device__ __forceinline__ void wkv_emit(float y, const Rows<T>& r, TO* __restrict__ out, i64 ldo, i64 t,
                                         int c) {
  if (r.ptr != nullptr) y *= sigmoidf(r.at(t, c));
  out[t * ldo + c] = from_float<TO>(y);
}

template <typename T, typename TO>
__device__ void wkv_step_impl(int B, int C, Rows<T> k, Rows<T> v, Rows<T> r, const float* __restrict__ w,
                              const float* __restrict__ u, const int* __restrict__ slots, int layer,
                              StateArena st, TO* __restrict__ out, i64 ldo) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y;
  if (c >= C || b >= B) return;
  const int slot = slots[b];
  WkvState s = load_state(st, slot, layer, c);
  const float y = wkv_token(s, k.at(b, c), v.at(b, c), w[c], u[c]);
  wkv_emit<T, TO>(y, r, out, ldo, b, c);
  store_state(st, slot, layer, c, s);
}

template <typename T, typename TO>
__device__ void wkv_ragged_impl(int B, int C, const int* __restrict__ offsets, Rows<T> k, Rows<T> v,
                                Rows<T> r, const float* __restrict__ w, const float* __restrict__ u,
                                const int* __restrict__ slots, int layer, StateArena st,
                                TO* __restrict__ out, i64 ldo) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y;
  if (c >= C || b >= B) return;
  const int t0 = offsets[b], t1 = offsets[b + 1];
  if (t1 <= t0) return;  // no tokens for this stream: state untouched
  const int slot = slots[b];
  WkvState s = load_state(st, slot, layer, c);
  const float wc = w[c], uc = u[c];
  for (int t = t0; t < t1; ++t) {
    const float y = wkv_token(s, k.at(t, c), v.at(t, c), wc, uc);
    wkv_emit<T, TO>(y, r, out, ldo, t, c);
  }
  store_state(st, slot, layer, c, s);
}

}  // namespace rwkv

#define RWKV_WKV_ENTRY_POINTS(SUFFIX, T, TO)                                                          \
  extern "C" __global__ void wkv_step_##SUFFIX(                                                      \
      int B, int C, const T* __restrict__ k, long long ldk, const T* __restrict__ v, long long ldv,   \
      const T* __restrict__ r, long long ldr, const float* __restrict__ w,                           \
      const float* __restrict__ u, const int* __restrict__ slots, int layer,                         \
      float* __restrict__ state, long long s_slot, long long s_layer, long long s_row,               \
      TO* __restrict__ out, long long ldo) {                                                         \
    rwkv::wkv_step_impl<T, TO>(B, C, {k, ldk}, {v, ldv}, {r, ldr}, w, u, slots, layer,               \
                               {state, s_slot, s_layer, s_row}, out, ldo);                           \
  }                                                                                                  \
  extern "C" __global__ void wkv_ragged_##SUFFIX(                                                    \
      int B, int C, const int* __restrict__ offsets, const T* __restrict__ k, long long ldk,         \
      const T* __restrict__ v, long long ldv, const T* __restrict__ r, long long ldr,                \
      const float* __restrict__ w, const float* __restrict__ u, const int* __restrict__ slots,       \
      int layer, float* __restrict__ state, long long s_slot, long long s_layer, long long s_row,    \
      TO* __restrict__ out, long long ldo) {                                                         \
    rwkv::wkv_ragged_impl<T, TO>(B, C, offsets, {k, ldk}, {v, ldv}, {r, ldr}, w, u, slots, layer,    \
                                 {state, s_slot, s_layer, s_row}, out, ldo);                         \
  }

RWKV_WKV_ENTRY_POINTS(f32_f32, float, float)
RWKV_WKV_ENTRY_POINTS(f16_f16, __half, __half)
RWKV_WKV_ENTRY_POINTS(f16_f32, __half, float)
RWKV_WKV_ENTRY_POINTS(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
RWKV_WKV_ENTRY_POINTS(bf16_f32, __nv_bfloat16, float)
