// Shared helpers for the rwkv-stream kernels: dtype conversion (fp32 math everywhere), the state-arena
// addressing and block reductions. Compiled with NVRTC (no host code, no standard library headers).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rwkv {

typedef long long i64;

// Constants shared with Python are defined there once and injected at compile time by
// rwkv_stream.gpu.nvrtc_options(): RWKV_EMPTY_PP (rwkv_stream.wkv.EMPTY_PP) and RWKV_ROW_* (rwkv_stream.state.ROWS).
#if !defined(RWKV_EMPTY_PP) || !defined(RWKV_ROW_ATT_X) || !defined(RWKV_ROW_AA) || !defined(RWKV_ROW_BB) || \
    !defined(RWKV_ROW_PP) || !defined(RWKV_ROW_FFN_X)
#error "RWKV_EMPTY_PP / RWKV_ROW_* undefined: compile with the options of rwkv_stream.gpu.nvrtc_options()"
#endif

// Rows of one layer's state, in the order shared with the CPU engine.
enum StateRow {
  ATT_X = RWKV_ROW_ATT_X,
  AA = RWKV_ROW_AA,
  BB = RWKV_ROW_BB,
  PP = RWKV_ROW_PP,
  FFN_X = RWKV_ROW_FFN_X
};

constexpr float kInitPP = RWKV_EMPTY_PP;  // pp of an empty state (aa = bb = 0)
constexpr float kHalfMax = 65504.f; // largest finite fp16

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  // Saturate instead of overflowing to inf; comparisons are false for NaN, so NaN still propagates.
  x = x > kHalfMax ? kHalfMax : (x < -kHalfMax ? -kHalfMax : x);
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

// Address of channel 0 of one state row: state[slot, layer, row, :] given element strides.
struct StateArena {
  float* base;
  i64 s_slot;
  i64 s_layer;
  i64 s_row;
  __device__ __forceinline__ float* row(int slot, int layer, int r) const {
    return base + (i64)slot * s_slot + (i64)layer * s_layer + (i64)r * s_row;
  }
};

// Sum over a thread block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* shared32) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarp = blockDim.x >> 5;
  __syncthreads();  // shared32 may still be read by a previous reduction
  if (lane == 0) shared32[warp] = v;
  __syncthreads();
  v = lane < nwarp ? shared32[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace rwkv
