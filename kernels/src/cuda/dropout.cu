// Inverted dropout with the counter-based mask of kernels/src/rng.rs: element i of stream
// `seed` is kept iff b2b_uniform(seed, i) >= p, then scaled by 1/(1-p). Forward and backward are
// the same kernel (the mask is recomputed, never stored).
// Storage: x is an activation (or its gradient), T = float or bf16 (NAME / NAME_bf16); the
// product is fp32, rounded once to T.

template <typename T>
__device__ __forceinline__ void dropout_apply_body(T* x, long long n, float p, unsigned long long seed) {
    const float keep_scale = 1.0f / (1.0f - p);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        b2b_put(x + i, b2b_uniform(seed, (u64)i) >= p ? b2b_get(x + i) * keep_scale : 0.0f);
}

extern "C" __global__ void dropout_apply(float* x, long long n, float p, unsigned long long seed) {
    dropout_apply_body(x, n, p, seed);
}

extern "C" __global__ void dropout_apply_bf16(b2b_bf16* x, long long n, float p, unsigned long long seed) {
    dropout_apply_body(x, n, p, seed);
}
