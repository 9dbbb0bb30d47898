// LayerNorm family over the last dimension c of x [rows, c]; one warp per row.
// forward:  mean = avg(x), rstd = 1/sqrt(var(x) + eps) (biased variance),
//           out = (x - mean) * rstd * gamma + beta; mean and rstd [rows] are saved.
// backward: xhat = (x - mean) * rstd, g = dout * gamma,
//           dx (= or +=) rstd * (g - avg(g) - xhat * avg(g * xhat)),
//           dgamma += sum_rows(dout * xhat), dbeta += sum_rows(dout)   (parameter gradients)
// Backward keeps per-block partial dgamma/dbeta in shared memory (2*c floats), then adds them
// to global memory with atomics.

extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd, const float* x, const float* gamma,
                                             const float* beta, int rows, int c, float eps) {
    const int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * warps + (threadIdx.x >> 5);
    if (row >= rows) return;
    const float* xr = x + (long long)row * c;
    float s = 0.0f;
    for (int i = lane; i < c; i += 32) s += xr[i];
    const float m = warp_sum(s) / c;
    float v = 0.0f;
    for (int i = lane; i < c; i += 32) { const float d = xr[i] - m; v += d * d; }
    const float r = 1.0f / sqrtf(warp_sum(v) / c + eps);
    float* o = out + (long long)row * c;
    for (int i = lane; i < c; i += 32) o[i] = (xr[i] - m) * r * gamma[i] + beta[i];
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

extern "C" __global__ void layernorm_backward(float* dx, float* dgamma, float* dbeta, const float* dout, const float* x,
                                              const float* gamma, const float* mean, const float* rstd, int rows, int c,
                                              int accumulate) {
    B2B_DYNAMIC_SHARED(float, part);  // [2 * c]: dgamma then dbeta partials of this block
    for (int i = threadIdx.x; i < 2 * c; i += blockDim.x) part[i] = 0.0f;
    __syncthreads();
    const int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
        const float* xr = x + (long long)row * c;
        const float* dr = dout + (long long)row * c;
        const float m = mean[row], r = rstd[row];
        float sg = 0.0f, sgx = 0.0f;
        for (int i = lane; i < c; i += 32) {
            const float g = dr[i] * gamma[i];
            sg += g;
            sgx += g * (xr[i] - m) * r;
        }
        sg = warp_sum(sg) / c;
        sgx = warp_sum(sgx) / c;
        float* dxr = dx + (long long)row * c;
        for (int i = lane; i < c; i += 32) {
            const float xhat = (xr[i] - m) * r;
            const float v = r * (dr[i] * gamma[i] - sg - xhat * sgx);
            dxr[i] = accumulate ? dxr[i] + v : v;
            atomicAdd(&part[i], dr[i] * xhat);
            atomicAdd(&part[c + i], dr[i]);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        atomicAdd(&dgamma[i], part[i]);
        atomicAdd(&dbeta[i], part[c + i]);
    }
}
