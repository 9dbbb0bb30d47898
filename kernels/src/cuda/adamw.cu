// Fused AdamW, in torch.optim.AdamW's order (decoupled weight decay first):
//   p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps),  step_size = lr / (1 - b1^t).
// sum_squares: out[0] += sum x^2, accumulated in double per block, then one atomic per block.
//
// adamw_flat: the whole flat parameter buffer in one launch, with the global-norm clipping
// computed on the device (no host read-back). Inputs:
//   p, g, m, v   the flat buffers (n floats each; only the chunks below are touched, g is read);
//   chunks       3*n_chunks ints (start, len, decay), ascending and disjoint, len <= 16384:
//                the per-range no-decay mask, uploaded once (kernels::FlatSegments);
//   sumsq        one double, sum(g^2) over all of g, written by sum_squares earlier on the stream;
//   norm_out     one float: sqrt(sumsq), written by thread 0 of block 0;
//   copy         null, or the bf16 GEMM copy of p (n elements): each updated p[i] is also
//                written there, rounded to nearest even (saves the next pass's conversion).
// Every thread computes norm = (float)sqrt(*sumsq) and, when max_norm > 0, norm is finite and
// max_norm / (norm + 1e-6f) < 1, coef = that quotient (else 1): as kernels::clip_coef, in
// fp32 with IEEE division, so the CPU twin's coefficient has the same bits. Then with
// gi = g[i] * coef, the adamw_step update above, decay = 1 - lr*wd on decaying chunks and 1 on
// the others. Grid: one block per chunk (at least one, for norm_out); each thread strides over
// its chunk. Accumulation: none across elements (the norm's sum is sum_squares' contract:
// double, atomics per block, so its last bits depend on the block order).

extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v, long long n, float b1, float b2,
                                      float eps, float decay, float step_size, float bc2_sqrt) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i];
        float pi = p[i] * decay;
        const float mi = b1 * m[i] + (1.0f - b1) * gi;
        const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        pi -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

extern "C" __global__ void sum_squares(double* out, const float* x, long long n) {
    __shared__ double part[32];
    double s = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        s += (double)x[i] * (double)x[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (warp == 0) {
        double t = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
        if (lane == 0) atomicAdd(out, t);
    }
}

extern "C" __global__ void adamw_flat(float* p, const float* g, float* m, float* v, const int* chunks, int n_chunks,
                                      const double* sumsq, float* norm_out, float max_norm, float b1, float b2,
                                      float eps, float decay, float step_size, float bc2_sqrt, b2b_bf16* copy) {
    const float norm = (float)sqrt(*sumsq);
    float coef = 1.0f;
    if (max_norm > 0.0f && norm - norm == 0.0f) {  // finite: inf - inf and NaN - NaN are NaN
        const float c = max_norm / (norm + 1e-6f);
        if (c < 1.0f) coef = c;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) *norm_out = norm;
    if ((int)blockIdx.x >= n_chunks) return;
    const long long start = chunks[3 * blockIdx.x];
    const int len = chunks[3 * blockIdx.x + 1];
    const float dk = chunks[3 * blockIdx.x + 2] ? decay : 1.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const long long i = start + j;
        const float gi = g[i] * coef;
        float pi = p[i] * dk;
        const float mi = b1 * m[i] + (1.0f - b1) * gi;
        const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        pi -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (copy) b2b_put(copy + i, pi);
    }
}
