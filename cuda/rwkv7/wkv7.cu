// RWKV-7 ("x070") WKV over the slot arena: one-token step and ragged multi-token prefill.
//
// Arena contract (rwkv_stream/gpu7.py): pool fp32 [capacity, n_layer, 2C + H*N*N], last axis contiguous;
// per layer [att shift C | ffn shift C | S as H x N(value) x N(key)]. A block is one (head, stream) pair,
// blockDim.x == N threads; thread i owns value row i of the head's state S[i, :], kept in registers for the
// whole call, so the state is read once and written once per call whatever the number of tokens.
// The tile goes through shared memory (row pitch N + 1: no bank conflicts) so that global reads and writes
// of the state are coalesced. slot < 0: a stateless row (starts from zero, nothing written back).
//
// Per token, with the vectors of head h (w is the LOG of the decay, a = -kk, b = kk * iclr):
//   sa = S a;  S <- S diag(exp(w)) + sa b^T + v k^T;  y = S r   (y reads the new S)
// exactly the order of rwkv_stream.models.rwkv7.wkv7_step (decay, then sa b, then v k).
//
// Vectors r, w, k, v, a, b and y are fp32 [rows, C] with row stride `ld` (channel stride 1).
//
// shift7 is the token shift of both mixes over the same arena (the att shift vector of a layer at offset 0,
// the ffn one at offset C): for token t of stream b and mix m,
//   out[m, t, :] = x[t] + (prev - x[t]) * mix[m]          (the engine's addcmul(xa, sx - xa, mix))
// where prev is x[t - 1] inside the stream and the arena's shift vector for the stream's first token; the
// stream's last x is written back there. offsets null: one token per stream (token b is stream b's).

namespace rwkv7 {

constexpr int CT = 16;  // tokens staged in shared memory per chunk by the ragged kernel

template <int N>
__device__ __forceinline__ float* state_of(float* pool, int slot, int layer, long long s_slot, long long s_layer,
                                           int c, int h) {
  return slot < 0 ? nullptr : pool + slot * s_slot + layer * s_layer + 2LL * c + (long long)h * N * N;
}

// Coalesced load of a head's N x N tile into shared memory, then each thread's row into registers.
template <int N>
__device__ __forceinline__ void load_rows(const float* __restrict__ S, float (*tile)[N + 1], float* row) {
  const int i = threadIdx.x;
  for (int m = 0; m < N; ++m) tile[m][i] = S ? S[m * N + i] : 0.f;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) row[j] = tile[i][j];
}

// Each thread's row back through shared memory, stored coalesced. Callers make sure no thread still reads
// the tile (every thread only ever reads its own row of it after load_rows' barrier).
template <int N>
__device__ __forceinline__ void store_rows(float* __restrict__ S, float (*tile)[N + 1], const float* row) {
  const int i = threadIdx.x;
#pragma unroll
  for (int j = 0; j < N; ++j) tile[i][j] = row[j];
  __syncthreads();
  for (int m = 0; m < N; ++m) S[m * N + i] = tile[m][i];
}

// One token of one head: row i of S updated in registers; returns y_i.
template <int N>
__device__ __forceinline__ float token(float* row, const float* rs, const float* ws, const float* ks, float vi,
                                       const float* as, const float* bs) {
  float sa = 0.f;
#pragma unroll
  for (int j = 0; j < N; ++j) sa += as[j] * row[j];
  float y = 0.f;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    row[j] = (row[j] * ws[j] + sa * bs[j]) + vi * ks[j];
    y += row[j] * rs[j];
  }
  return y;
}

template <int N>
__device__ void step_impl(int n_streams, int c, const float* __restrict__ r, const float* __restrict__ w,
                          const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ a,
                          const float* __restrict__ b, long long ld, const int* __restrict__ slots, int layer,
                          float* __restrict__ pool, long long s_slot, long long s_layer, float* __restrict__ y,
                          long long ld_y) {
  __shared__ float tile[N][N + 1];
  __shared__ float vec[5][N];  // r, decay, k, a, b
  const int h = blockIdx.x, bi = blockIdx.y, i = threadIdx.x;
  if (bi >= n_streams) return;  // uniform over the block
  const long long at = bi * ld + (long long)h * N + i;
  vec[0][i] = r[at];
  vec[1][i] = expf(w[at]);
  vec[2][i] = k[at];
  vec[3][i] = a[at];
  vec[4][i] = b[at];
  const float vi = v[at];
  float* S = state_of<N>(pool, slots[bi], layer, s_slot, s_layer, c, h);
  float row[N];
  load_rows<N>(S, tile, row);  // its barrier also publishes vec
  y[bi * ld_y + (long long)h * N + i] = token<N>(row, vec[0], vec[1], vec[2], vi, vec[3], vec[4]);
  if (S) store_rows<N>(S, tile, row);
}

template <int N>
__device__ void ragged_impl(int n_streams, int c, const int* __restrict__ offsets, const float* __restrict__ r,
                            const float* __restrict__ w, const float* __restrict__ k, const float* __restrict__ v,
                            const float* __restrict__ a, const float* __restrict__ b, long long ld,
                            const int* __restrict__ slots, int layer, float* __restrict__ pool, long long s_slot,
                            long long s_layer, float* __restrict__ y, long long ld_y) {
  __shared__ float tile[N][N + 1];
  __shared__ float vec[6][CT][N];  // r, decay, k, v, a, b of up to CT tokens
  const int h = blockIdx.x, bi = blockIdx.y, i = threadIdx.x;
  if (bi >= n_streams) return;
  const int t0 = offsets[bi], t1 = offsets[bi + 1];
  if (t0 >= t1) return;  // a stream with no tokens: its state is untouched
  float* S = state_of<N>(pool, slots[bi], layer, s_slot, s_layer, c, h);
  float row[N];
  load_rows<N>(S, tile, row);
  const long long col = (long long)h * N + i;
  for (int c0 = t0; c0 < t1; c0 += CT) {
    const int nt = t1 - c0 < CT ? t1 - c0 : CT;
    __syncthreads();  // every thread is done with the previous chunk's vectors
    for (int tt = 0; tt < nt; ++tt) {
      const long long at = (c0 + tt) * ld + col;
      vec[0][tt][i] = r[at];
      vec[1][tt][i] = expf(w[at]);
      vec[2][tt][i] = k[at];
      vec[3][tt][i] = v[at];
      vec[4][tt][i] = a[at];
      vec[5][tt][i] = b[at];
    }
    __syncthreads();
    for (int tt = 0; tt < nt; ++tt) {
      y[(c0 + tt) * ld_y + col] = token<N>(row, vec[0][tt], vec[1][tt], vec[2][tt], vec[3][tt][i], vec[4][tt],
                                           vec[5][tt]);
    }
  }
  if (S) store_rows<N>(S, tile, row);
}

// Grid (ceil(C / blockDim.x), any y <= 65535): the y dimension strides over tokens. Only the thread of a
// stream's first token reads and writes the stream's shift vector (per channel), so there is no race.
__device__ void shift_impl(int n_tok, int c, const float* __restrict__ x, long long ldx,
                           const int* __restrict__ offsets, const int* __restrict__ token_stream,
                           const int* __restrict__ slots, int layer, int which, float* __restrict__ pool,
                           long long s_slot, long long s_layer, int n_mix, const float* __restrict__ mix,
                           float* __restrict__ out, long long out_stride, long long ldo) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch >= c) return;
  for (int t = blockIdx.y; t < n_tok; t += gridDim.y) {
    const int bi = offsets ? token_stream[t] : t;
    const int first = offsets ? offsets[bi] : t;
    const float xt = x[(long long)t * ldx + ch];
    float prev = 0.f;
    if (t > first) {
      prev = x[(long long)(t - 1) * ldx + ch];
    } else if (slots[bi] >= 0) {
      float* shift = pool + slots[bi] * s_slot + layer * s_layer + (long long)which * c;
      prev = shift[ch];
      const int last = offsets ? offsets[bi + 1] - 1 : t;
      shift[ch] = x[(long long)last * ldx + ch];
    }
    const float d = prev - xt;
    for (int m = 0; m < n_mix; ++m) out[m * out_stride + (long long)t * ldo + ch] = xt + d * mix[(long long)m * c + ch];
  }
}

}  // namespace rwkv7

extern "C" __global__ void shift7(int n_tok, int c, const float* x, long long ldx, const int* offsets,
                                  const int* token_stream, const int* slots, int layer, int which, float* pool,
                                  long long s_slot, long long s_layer, int n_mix, const float* mix, float* out,
                                  long long out_stride, long long ldo) {
  rwkv7::shift_impl(n_tok, c, x, ldx, offsets, token_stream, slots, layer, which, pool, s_slot, s_layer, n_mix, mix,
                    out, out_stride, ldo);
}

#define RWKV7_ENTRIES(N)                                                                                     \
  extern "C" __global__ void wkv7_step_n##N(int n_streams, int c, const float* r, const float* w,            \
                                            const float* k, const float* v, const float* a, const float* b,  \
                                            long long ld, const int* slots, int layer, float* pool,          \
                                            long long s_slot, long long s_layer, float* y, long long ld_y) { \
    rwkv7::step_impl<N>(n_streams, c, r, w, k, v, a, b, ld, slots, layer, pool, s_slot, s_layer, y, ld_y);   \
  }                                                                                                          \
  extern "C" __global__ void wkv7_ragged_n##N(int n_streams, int c, const int* offsets, const float* r,      \
                                              const float* w, const float* k, const float* v,                \
                                              const float* a, const float* b, long long ld,                  \
                                              const int* slots, int layer, float* pool, long long s_slot,    \
                                              long long s_layer, float* y, long long ld_y) {                 \
    rwkv7::ragged_impl<N>(n_streams, c, offsets, r, w, k, v, a, b, ld, slots, layer, pool, s_slot, s_layer, \
                          y, ld_y);                                                                          \
  }

RWKV7_ENTRIES(16)
RWKV7_ENTRIES(32)
RWKV7_ENTRIES(64)
