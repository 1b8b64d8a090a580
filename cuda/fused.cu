// Fused elementwise helpers for an RWKV-4 step (fp32 math; fp16 results saturate instead of overflowing).
//
//   relu_square_*:    y[i] = max(x[i], 0)^2 over n contiguous elements (y may alias x: no __restrict__).
//                     Launch: 1-D grid-stride loop, any grid.
//   add_layernorm_*:  per row n of the fp32 residual stream x [N, C] (row stride ldx):
//                       x = (x + g * delta) * scale      (g = sigmoid(gate) if gate else 1; delta optional)
//                       out = (x - mean) / sqrt(var + eps) * weight + bias   (weight, bias fp32 [C])
//                     Launch: grid (N), block a multiple of 32 (<= 1024), no dynamic shared memory.
// Suffix: the dtype of delta, gate and out (f32, f16, bf16). add_layernorm's x and out are written and
// overlap neither each other nor the inputs.
#include "rwkv_common.cuh"

namespace rwkv {

template <typename T>
__device__ void relu_square_impl(i64 n, const T* x, T* y) {
  const i64 step = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    const float v = fmaxf(to_float(x[i]), 0.f);
    y[i] = from_float<T>(v * v);
  }
}

template <typename T>
__device__ void add_layernorm_impl(int N, int C, float* __restrict__ x, i64 ldx,
                                   const T* __restrict__ delta, i64 ldd, const T* __restrict__ gate,
                                   i64 ldg, float scale, const float* __restrict__ weight,
                                   const float* __restrict__ bias, float eps, T* __restrict__ out,
                                   i64 ldo) {
  __shared__ float shared32[32];
  const int n = blockIdx.x;
  if (n >= N) return;  // uniform per block
  float* xr = x + (i64)n * ldx;
  float sum = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float v = xr[c];
    if (delta != nullptr) {
      float d = to_float(delta[(i64)n * ldd + c]);
      if (gate != nullptr) d *= sigmoidf(to_float(gate[(i64)n * ldg + c]));
      v += d;
    }
    v *= scale;
    xr[c] = v;
    sum += v;
  }
  const float mean = block_sum(sum, shared32) / (float)C;
  float sq = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const float d = xr[c] - mean;
    sq += d * d;
  }
  const float rstd = rsqrtf(block_sum(sq, shared32) / (float)C + eps);
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    out[(i64)n * ldo + c] = from_float<T>((xr[c] - mean) * rstd * weight[c] + bias[c]);
  }
}

}  // namespace rwkv

#define RWKV_FUSED_ENTRY_POINTS(SUFFIX, T)                                                            \
  extern "C" __global__ void relu_square_##SUFFIX(long long n, const T* x, T* y) {                   \
    rwkv::relu_square_impl<T>(n, x, y);                                                              \
  }                                                                                                  \
  extern "C" __global__ void add_layernorm_##SUFFIX(                                                 \
      int N, int C, float* __restrict__ x, long long ldx, const T* __restrict__ delta,               \
      long long ldd, const T* __restrict__ gate, long long ldg, float scale,                         \
      const float* __restrict__ weight, const float* __restrict__ bias, float eps,                   \
      T* __restrict__ out, long long ldo) {                                                          \
    rwkv::add_layernorm_impl<T>(N, C, x, ldx, delta, ldd, gate, ldg, scale, weight, bias, eps, out,  \
                                ldo);                                                                \
  }

RWKV_FUSED_ENTRY_POINTS(f32, float)
RWKV_FUSED_ENTRY_POINTS(f16, __half)
RWKV_FUSED_ENTRY_POINTS(bf16, __nv_bfloat16)
