// Residual family: out = a + b; dst += src; x *= s. Backward of `add` is dout to both inputs,
// which callers express with add_assign. Grid-stride loops over n elements.
// Storage: every operand is an activation (or its gradient), T = float or bf16 (NAME /
// NAME_bf16); arithmetic is fp32, each result rounded once to T.

template <typename T>
__device__ __forceinline__ void residual_add_body(T* out, const T* a, const T* b, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        b2b_put(out + i, b2b_get(a + i) + b2b_get(b + i));
}

template <typename T>
__device__ __forceinline__ void residual_add_assign_body(T* dst, const T* src, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        b2b_put(dst + i, b2b_get(dst + i) + b2b_get(src + i));
}

template <typename T>
__device__ __forceinline__ void residual_scale_body(T* x, float s, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        b2b_put(x + i, b2b_get(x + i) * s);
}

extern "C" __global__ void residual_add(float* out, const float* a, const float* b, long long n) {
    residual_add_body(out, a, b, n);
}

extern "C" __global__ void residual_add_bf16(b2b_bf16* out, const b2b_bf16* a, const b2b_bf16* b, long long n) {
    residual_add_body(out, a, b, n);
}

extern "C" __global__ void residual_add_assign(float* dst, const float* src, long long n) {
    residual_add_assign_body(dst, src, n);
}

extern "C" __global__ void residual_add_assign_bf16(b2b_bf16* dst, const b2b_bf16* src, long long n) {
    residual_add_assign_body(dst, src, n);
}

extern "C" __global__ void residual_scale(float* x, float s, long long n) {
    residual_scale_body(x, s, n);
}

extern "C" __global__ void residual_scale_bf16(b2b_bf16* x, float s, long long n) {
    residual_scale_body(x, s, n);
}
