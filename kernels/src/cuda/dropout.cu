// Inverted dropout with the counter-based mask of kernels/src/rng.rs: element i of stream
// `seed` is kept iff b2b_uniform(seed, i) >= p, then scaled by 1/(1-p). Forward and backward are
// the same kernel (the mask is recomputed, never stored).

extern "C" __global__ void dropout_apply(float* x, long long n, float p, unsigned long long seed) {
    const float keep_scale = 1.0f / (1.0f - p);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = b2b_uniform(seed, (u64)i) >= p ? x[i] * keep_scale : 0.0f;
}
