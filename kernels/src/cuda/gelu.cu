// Bias + exact GELU (BERT's "gelu", the erf form).
// forward:  pre += bias (broadcast over rows; kept for backward), out = pre * Phi(pre),
//           Phi(x) = (1 + erf(x / sqrt 2)) / 2. gelu_forward: out = pre * Phi(pre), pre only read
//           (its bias came from the GEMM's epilogue).
// backward: dpre = dout * (Phi(pre) + pre * phi(pre)) (assigned); dbias += column sums of dpre
//           (done by bias_column_sum from the launcher, reading dpre as stored).
// Storage: pre, out, dout and dpre are activations, T = float or bf16 (NAME / NAME_bf16); the
// bias and dbias are fp32. The forward computes out from the fp32 sum pre + bias, and stores
// that sum rounded to T (the backward sees the stored value).

template <typename T>
__device__ __forceinline__ void gelu_bias_forward_body(T* pre, T* out, const float* bias, long long n, int c) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float x = b2b_get(pre + i) + bias[i % c];
        b2b_put(pre + i, x);
        b2b_put(out + i, 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)));
    }
}

template <typename T>
__device__ __forceinline__ void gelu_forward_body(const T* pre, T* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float x = b2b_get(pre + i);
        b2b_put(out + i, 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)));
    }
}

template <typename T>
__device__ __forceinline__ void gelu_backward_body(T* dpre, const T* pre, const T* dout, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float x = b2b_get(pre + i);
        const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        const float pdf = 0.3989422804014327f * expf(-0.5f * x * x);
        b2b_put(dpre + i, b2b_get(dout + i) * (cdf + x * pdf));
    }
}

extern "C" __global__ void gelu_bias_forward(float* pre, float* out, const float* bias, long long n, int c) {
    gelu_bias_forward_body(pre, out, bias, n, c);
}

extern "C" __global__ void gelu_bias_forward_bf16(b2b_bf16* pre, b2b_bf16* out, const float* bias, long long n, int c) {
    gelu_bias_forward_body(pre, out, bias, n, c);
}

extern "C" __global__ void gelu_forward(const float* pre, float* out, long long n) { gelu_forward_body(pre, out, n); }

extern "C" __global__ void gelu_forward_bf16(const b2b_bf16* pre, b2b_bf16* out, long long n) {
    gelu_forward_body(pre, out, n);
}

extern "C" __global__ void gelu_backward(float* dpre, const float* pre, const float* dout, long long n) {
    gelu_backward_body(dpre, pre, dout, n);
}

extern "C" __global__ void gelu_backward_bf16(b2b_bf16* dpre, const b2b_bf16* pre, const b2b_bf16* dout, long long n) {
    gelu_backward_body(dpre, pre, dout, n);
}
