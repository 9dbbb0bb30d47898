// Bias family (the non-GEMM half of a Linear layer).
// bias_add:        y[r, c] += bias[c]                      y [rows, cols]
// bias_column_sum: out[c] += sum_r x[r, c]                 (parameter gradient: accumulates)
// Storage: y and x are activations, T = float or bf16 (NAME / NAME_bf16); the bias and out are
// parameters and their gradients, always fp32. Sums are fp32; a bf16 y is rounded once.
// The column sum runs 32 columns x 8 row-lanes per block; blocks along y split the rows and
// add their partial sums with atomics (so the summation order is not fixed).

template <typename T>
__device__ __forceinline__ void bias_add_body(T* y, const float* bias, long long rows, int cols) {
    const long long n = rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        b2b_put(y + i, b2b_get(y + i) + bias[i % cols]);
}

template <typename T>
__device__ __forceinline__ void bias_column_sum_body(float* out, const T* x, long long rows, int cols) {
    __shared__ float part[8][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (col < cols)
        for (long long r = blockIdx.y * 8 + threadIdx.y; r < rows; r += (long long)gridDim.y * 8)
            s += b2b_get(x + r * cols + col);
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        float t = 0.0f;
        for (int k = 0; k < 8; ++k) t += part[k][threadIdx.x];
        atomicAdd(&out[col], t);
    }
}

extern "C" __global__ void bias_add(float* y, const float* bias, long long rows, int cols) {
    bias_add_body(y, bias, rows, cols);
}

extern "C" __global__ void bias_add_bf16(b2b_bf16* y, const float* bias, long long rows, int cols) {
    bias_add_body(y, bias, rows, cols);
}

extern "C" __global__ void bias_column_sum(float* out, const float* x, long long rows, int cols) {
    bias_column_sum_body(out, x, rows, cols);
}

extern "C" __global__ void bias_column_sum_bf16(float* out, const b2b_bf16* x, long long rows, int cols) {
    bias_column_sum_body(out, x, rows, cols);
}
