// Bias + exact GELU (BERT's "gelu", the erf form).
// forward:  pre += bias (broadcast over rows; kept for backward), out = pre * Phi(pre),
//           Phi(x) = (1 + erf(x / sqrt 2)) / 2.
// backward: dpre = dout * (Phi(pre) + pre * phi(pre)) (assigned); dbias += column sums of dpre
//           (done by bias_column_sum from the launcher).

extern "C" __global__ void gelu_bias_forward(float* pre, float* out, const float* bias, long long n, int c) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float x = pre[i] + bias[i % c];
        pre[i] = x;
        out[i] = 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    }
}

extern "C" __global__ void gelu_backward(float* dpre, const float* pre, const float* dout, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float x = pre[i];
        const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        const float pdf = 0.3989422804014327f * expf(-0.5f * x * x);
        dpre[i] = dout[i] * (cdf + x * pdf);
    }
}
