// LayerNorm family over the last dimension c of [rows, c], plain and fused with the residual
// add and dropout that precede it in every BERT block. One warp per row; every lane reads W
// consecutive elements per step: W = 4 (b2b_get4/b2b_put4: 16 bytes of float, 8 of bf16) when
// the launcher found c a multiple of 4 and every row pointer aligned to 4 elements of its type
// (`vec`), else W = 1. Storage: the activations (x, out, sum, skip, dout, dx, d_skip, d_x) are T,
// float or bf16 (entry points NAME and NAME_bf16); gamma, beta, mean, rstd, the parameter
// gradients and their partials are always fp32. All arithmetic is fp32; each T output is
// rounded once, when stored.
//
// layernorm_forward:      mean = avg(x), rstd = 1/sqrt(var(x) + eps) (biased variance, two
//                         passes), out = (x - mean) * rstd * gamma + beta; mean, rstd [rows] saved.
// residual_norm_forward:  sum = dropout(sum; p, seed) + skip IN PLACE (sum holds the block output
//                         on entry; mask: element i kept iff b2b_uniform(seed, i) >= p, times
//                         1/(1-p), i the index in [rows, c]), then out = LN(sum) as above. The
//                         statistics are those of sum *as stored*: the first pass adds up each
//                         value rounded to T (as_stored, the value it has just written), and the
//                         later passes re-read the stored row, so backward, which reads the
//                         stored sum, normalises exactly the numbers the forward did.
// layernorm_backward:     xhat = (x - mean) * rstd, g = dout * gamma,
//                         d = rstd * (g - avg(g) - xhat * avg(g * xhat)); dx (= or +=) d (+=:
//                         dx read, added in fp32, rounded once).
// residual_norm_backward: the same d from the saved sum; d_skip (= or +=) d, and
//                         d_x = dropout(d; p, seed) (assigned).
// Parameter gradients (fp32 whatever T is), deterministically and without atomics: each warp
// adds dout * xhat and dout of its rows into its own [2c] slice of shared memory (a lane owns
// its columns, so no two threads touch one element); the block sums its warps' slices in warp
// order into its row of `partials` [blocks, 2c] (fully overwritten, so never zeroed); then
// layernorm_param_grad adds the blocks' rows in a fixed order: dgamma += sum_b partials[b, :c],
// dbeta += ...[b, c:].

template <int W, typename T>
__device__ __forceinline__ void load_w(const T* p, float (&v)[W]) {
    if constexpr (W == 4) {
        const float4 t = b2b_get4(p);
        v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
    } else {
        v[0] = b2b_get(p);
    }
}

template <int W, typename T>
__device__ __forceinline__ void store_w(T* p, const float (&v)[W]) {
    if constexpr (W == 4)
        b2b_put4(p, make_float4(v[0], v[1], v[2], v[3]));
    else
        b2b_put(p, v[0]);
}

// The value b2b_put(p, v) stores, read back (the pointer only picks the type).
__device__ __forceinline__ float as_stored(const float*, float v) { return v; }
__device__ __forceinline__ float as_stored(const b2b_bf16*, float v) { return __uint_as_float(b2b_bf16_bits(v) << 16); }

// Inverted dropout of v[0..W) at flat indices first..first+W-1 (p > 0).
template <int W>
__device__ __forceinline__ void dropout_w(float (&v)[W], long long first, float p, u64 seed) {
    const float keep_scale = 1.0f / (1.0f - p);
#pragma unroll
    for (int j = 0; j < W; ++j) v[j] = b2b_uniform(seed, (u64)(first + j)) >= p ? v[j] * keep_scale : 0.0f;
}

// One row of the forward by one warp. With `skip`, x is first replaced by dropout(x) + skip,
// written to `sum` (which may be x itself: each lane rewrites only what it read, and re-reads
// only what it wrote).
template <int W, typename T>
__device__ void forward_row(T* out, float* mean, float* rstd, const T* x, const T* skip, T* sum, const float* gamma,
                            const float* beta, long long row, int c, float eps, float p, u64 seed) {
    const int lane = threadIdx.x & 31;
    const long long base = row * c;
    const T* src = skip ? sum : x;
    float s = 0.0f;
    for (int i = lane * W; i < c; i += 32 * W) {
        float v[W];
        load_w<W>(x + base + i, v);
        if (skip) {
            float k[W];
            load_w<W>(skip + base + i, k);
            if (p > 0.0f) dropout_w<W>(v, base + i, p, seed);
#pragma unroll
            for (int j = 0; j < W; ++j) v[j] = as_stored(sum, v[j] + k[j]);
            store_w<W>(sum + base + i, v);
        }
#pragma unroll
        for (int j = 0; j < W; ++j) s += v[j];
    }
    const float m = warp_sum(s) / c;
    float var = 0.0f;
    for (int i = lane * W; i < c; i += 32 * W) {
        float v[W];
        load_w<W>(src + base + i, v);
#pragma unroll
        for (int j = 0; j < W; ++j) var += (v[j] - m) * (v[j] - m);
    }
    const float r = 1.0f / sqrtf(warp_sum(var) / c + eps);
    for (int i = lane * W; i < c; i += 32 * W) {
        float v[W], g[W], b[W];
        load_w<W>(src + base + i, v);
        load_w<W>(gamma + i, g);
        load_w<W>(beta + i, b);
#pragma unroll
        for (int j = 0; j < W; ++j) v[j] = (v[j] - m) * r * g[j] + b[j];
        store_w<W>(out + base + i, v);
    }
    if (lane == 0) mean[row] = m, rstd[row] = r;
}

// The forward kernels' bodies: LayerNorm of x, or (with skip) of sum = dropout(sum) + skip in
// place (x and sum then the same row).
template <typename T>
__device__ __forceinline__ void forward_rows(T* out, float* mean, float* rstd, const T* x, const T* skip, T* sum,
                                             const float* gamma, const float* beta, int rows, int c, float eps,
                                             float p, u64 seed, int vec) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp: rows are warp-uniform
    if (vec)
        forward_row<4>(out, mean, rstd, x, skip, sum, gamma, beta, row, c, eps, p, seed);
    else
        forward_row<1>(out, mean, rstd, x, skip, sum, gamma, beta, row, c, eps, p, seed);
}

extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* gamma,
                                             const float* beta, int rows, int c, float eps, int vec) {
    forward_rows<float>(out, mean, rstd, x, nullptr, nullptr, gamma, beta, rows, c, eps, 0.0f, 0, vec);
}

extern "C" __global__ void layernorm_forward_bf16(b2b_bf16* out, float* mean, float* rstd, const b2b_bf16* x,
                                                  const float* gamma, const float* beta, int rows, int c, float eps,
                                                  int vec) {
    forward_rows<b2b_bf16>(out, mean, rstd, x, nullptr, nullptr, gamma, beta, rows, c, eps, 0.0f, 0, vec);
}

extern "C" __global__ void residual_norm_forward(float* out, float* mean, float* rstd, float* sum, const float* skip,
                                                 const float* gamma, const float* beta, int rows, int c, float eps,
                                                 float p, unsigned long long seed, int vec) {
    forward_rows<float>(out, mean, rstd, sum, skip, sum, gamma, beta, rows, c, eps, p, seed, vec);
}

extern "C" __global__ void residual_norm_forward_bf16(b2b_bf16* out, float* mean, float* rstd, b2b_bf16* sum,
                                                      const b2b_bf16* skip, const float* gamma, const float* beta,
                                                      int rows, int c, float eps, float p, unsigned long long seed,
                                                      int vec) {
    forward_rows<b2b_bf16>(out, mean, rstd, sum, skip, sum, gamma, beta, rows, c, eps, p, seed, vec);
}

// The outputs of one backward: dx (= or +=) d; when d_dropped is set, also d_dropped = dropout(d).
template <typename T>
struct BackwardOut {
    T* dx;
    int accumulate;
    T* d_dropped;
    float p;
    u64 seed;
};

// Every row of this block's warps (grid-stride), then the block's row of `partials`.
// `slices` is the block's dynamic shared memory, [warps][2c].
template <int W, typename T>
__device__ void backward_rows(BackwardOut<T> o, float* partials, float* slices, const T* dout, const T* x,
                              const float* gamma, const float* mean, const float* rstd, int rows, int c) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float* part = slices + (long long)warp * 2 * c;  // this warp's dgamma then dbeta partials
    const float zero[W] = {};
    for (int i = lane * W; i < c; i += 32 * W) store_w<W>(part + i, zero), store_w<W>(part + c + i, zero);
    for (long long row = (long long)blockIdx.x * warps + warp; row < rows; row += (long long)gridDim.x * warps) {
        const long long base = row * c;
        const float m = mean[row], r = rstd[row];
        float sg = 0.0f, sgx = 0.0f;
        for (int i = lane * W; i < c; i += 32 * W) {
            float d[W], xv[W], g[W];
            load_w<W>(dout + base + i, d);
            load_w<W>(x + base + i, xv);
            load_w<W>(gamma + i, g);
#pragma unroll
            for (int j = 0; j < W; ++j) {
                const float gg = d[j] * g[j];
                sg += gg;
                sgx += gg * ((xv[j] - m) * r);
            }
        }
        sg = warp_sum(sg) / c;
        sgx = warp_sum(sgx) / c;
        for (int i = lane * W; i < c; i += 32 * W) {
            float d[W], xv[W], g[W], pg[W], pb[W], v[W];
            load_w<W>(dout + base + i, d);
            load_w<W>(x + base + i, xv);
            load_w<W>(gamma + i, g);
            load_w<W>(part + i, pg);
            load_w<W>(part + c + i, pb);
#pragma unroll
            for (int j = 0; j < W; ++j) {
                const float xhat = (xv[j] - m) * r;
                v[j] = r * (d[j] * g[j] - sg - xhat * sgx);
                pg[j] += d[j] * xhat;
                pb[j] += d[j];
            }
            store_w<W>(part + i, pg);
            store_w<W>(part + c + i, pb);
            if (o.accumulate) {
                float prev[W], acc[W];
                load_w<W>(o.dx + base + i, prev);
#pragma unroll
                for (int j = 0; j < W; ++j) acc[j] = prev[j] + v[j];
                store_w<W>(o.dx + base + i, acc);
            } else {
                store_w<W>(o.dx + base + i, v);
            }
            if (o.d_dropped) {
                if (o.p > 0.0f) dropout_w<W>(v, base + i, o.p, o.seed);
                store_w<W>(o.d_dropped + base + i, v);
            }
        }
    }
    __syncthreads();
    float* mine = partials + (long long)blockIdx.x * 2 * c;
    for (int col = threadIdx.x; col < 2 * c; col += blockDim.x) {
        float t = 0.0f;
        for (int w = 0; w < warps; ++w) t += slices[(long long)w * 2 * c + col];
        mine[col] = t;
    }
}

// The backward kernels' bodies (x is the saved LayerNorm input: the sum for the fused kernel).
template <typename T>
__device__ __forceinline__ void backward_kernel(BackwardOut<T> o, float* partials, const T* dout, const T* x,
                                                const float* gamma, const float* mean, const float* rstd, int rows,
                                                int c, int vec) {
    B2B_DYNAMIC_SHARED(float, slices);
    if (vec)
        backward_rows<4>(o, partials, slices, dout, x, gamma, mean, rstd, rows, c);
    else
        backward_rows<1>(o, partials, slices, dout, x, gamma, mean, rstd, rows, c);
}

extern "C" __global__ void layernorm_backward(float* dx, float* partials, const float* dout, const float* x,
                                              const float* gamma, const float* mean, const float* rstd, int rows, int c,
                                              int accumulate, int vec) {
    const BackwardOut<float> o{dx, accumulate, nullptr, 0.0f, 0};
    backward_kernel(o, partials, dout, x, gamma, mean, rstd, rows, c, vec);
}

extern "C" __global__ void layernorm_backward_bf16(b2b_bf16* dx, float* partials, const b2b_bf16* dout,
                                                   const b2b_bf16* x, const float* gamma, const float* mean,
                                                   const float* rstd, int rows, int c, int accumulate, int vec) {
    const BackwardOut<b2b_bf16> o{dx, accumulate, nullptr, 0.0f, 0};
    backward_kernel(o, partials, dout, x, gamma, mean, rstd, rows, c, vec);
}

extern "C" __global__ void residual_norm_backward(float* d_skip, float* d_x, float* partials, const float* dout,
                                                  const float* sum, const float* gamma, const float* mean,
                                                  const float* rstd, int rows, int c, int accumulate, float p,
                                                  unsigned long long seed, int vec) {
    const BackwardOut<float> o{d_skip, accumulate, d_x, p, seed};
    backward_kernel(o, partials, dout, sum, gamma, mean, rstd, rows, c, vec);
}

extern "C" __global__ void residual_norm_backward_bf16(b2b_bf16* d_skip, b2b_bf16* d_x, float* partials,
                                                       const b2b_bf16* dout, const b2b_bf16* sum, const float* gamma,
                                                       const float* mean, const float* rstd, int rows, int c,
                                                       int accumulate, float p, unsigned long long seed, int vec) {
    const BackwardOut<b2b_bf16> o{d_skip, accumulate, d_x, p, seed};
    backward_kernel(o, partials, dout, sum, gamma, mean, rstd, rows, c, vec);
}

// dgamma[j] += sum_b partials[b, j], dbeta[j] += sum_b partials[b, c + j]: 32 columns of [2c] by
// 8 lanes of blocks per thread block; lane y sums blocks y, y+8, ... in order, then lane 0 adds
// the 8 lane sums in order, so the result never depends on scheduling. fp32 for either T.
extern "C" __global__ void layernorm_param_grad(float* dgamma, float* dbeta, const float* partials, int blocks, int c) {
    __shared__ float lanes[8][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (col < 2 * c)
        for (int b = threadIdx.y; b < blocks; b += 8) s += partials[(long long)b * 2 * c + col];
    lanes[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < 2 * c) {
        float t = 0.0f;
        for (int k = 0; k < 8; ++k) t += lanes[k][threadIdx.x];
        if (col < c)
            dgamma[col] += t;
        else
            dbeta[col - c] += t;
    }
}
