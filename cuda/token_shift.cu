// Token shift for a ragged batch, reading and updating the previous-token row of the state arena.
//
// xa: flat [N, C] (ln1 or ln2 output), tokens offsets[b]..offsets[b+1]-1 belong to stream b, and
// token_stream[t] is the stream b of token t (both computed once per batch on the host side, so no thread
// searches the offsets); offsets may be null: then N == B, token b is stream b's only token and
// token_stream is not read. For each token t of stream b and each mix m:
//   out[m, t, c] = xa[t, c] * mix[m, c] + prev[t, c] * (1 - mix[m, c])
// where prev is xa[t - 1] inside a stream and the state row (att_x or ffn_x) for a stream's first token.
// The stream's last xa is written back into that row. The thread of a stream's first token both reads
// and writes the row, so there is no race with the other tokens. slots[b] < 0: prev = 0, no write-back.
//
// Launch: grid (ceil(C / block), any y <= 65535), the y dimension strides over tokens.
// Aliasing: out and the state arena are written and overlap neither each other nor xa, mix or the indices.
// Entry points: token_shift_{f32,f16,bf16}; mixes are fp32 [n_mix, C] contiguous, out is [n_mix, N, C]
// with strides (out_stride, ldo, 1).
#include "rwkv_common.cuh"

namespace rwkv {

template <typename T>
__device__ void token_shift_impl(int N, int C, const T* __restrict__ xa, i64 ldx,
                                 const int* __restrict__ offsets, const int* __restrict__ token_stream,
                                 const int* __restrict__ slots, int layer, int row, StateArena st, int n_mix,
                                 const float* __restrict__ mix, T* __restrict__ out, i64 out_stride,
                                 i64 ldo) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  for (int t = blockIdx.y; t < N; t += gridDim.y) {
    const int b = offsets != nullptr ? token_stream[t] : t;
    const int first = offsets != nullptr ? offsets[b] : t;
    const int slot = slots[b];
    const float x = to_float(xa[(i64)t * ldx + c]);
    float prev = 0.f;
    if (t > first) {
      prev = to_float(xa[(i64)(t - 1) * ldx + c]);
    } else if (slot >= 0) {
      float* srow = st.row(slot, layer, row);
      prev = srow[c];
      const int last = offsets != nullptr ? offsets[b + 1] - 1 : t;
      srow[c] = to_float(xa[(i64)last * ldx + c]);
    }
    for (int m = 0; m < n_mix; ++m) {
      const float mx = mix[(i64)m * C + c];
      out[(i64)m * out_stride + (i64)t * ldo + c] = from_float<T>(x * mx + prev * (1.f - mx));
    }
  }
}

}  // namespace rwkv

#define RWKV_TOKEN_SHIFT_ENTRY_POINT(SUFFIX, T)                                                       \
  extern "C" __global__ void token_shift_##SUFFIX(                                                   \
      int N, int C, const T* __restrict__ xa, long long ldx, const int* __restrict__ offsets,        \
      const int* __restrict__ token_stream, const int* __restrict__ slots, int layer, int row,       \
      float* __restrict__ state, long long s_slot, long long s_layer, long long s_row, int n_mix,    \
      const float* __restrict__ mix, T* __restrict__ out, long long out_stride, long long ldo) {     \
    rwkv::token_shift_impl<T>(N, C, xa, ldx, offsets, token_stream, slots, layer, row,               \
                              {state, s_slot, s_layer, s_row}, n_mix, mix, out, out_stride, ldo);    \
  }

RWKV_TOKEN_SHIFT_ENTRY_POINT(f32, float)
RWKV_TOKEN_SHIFT_ENTRY_POINT(f16, __half)
RWKV_TOKEN_SHIFT_ENTRY_POINT(bf16, __nv_bfloat16)
