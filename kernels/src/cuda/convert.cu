// Storage conversion (Memory::copy between buffers of different dtypes).
// convert_f32_to_bf16: dst[i] = bf16(src[i]), rounded to nearest even (as kernels::bf16_bits).
// convert_bf16_to_f32: dst[i] = src[i], exact.
// dst and src have n elements; dst is assigned.

extern "C" __global__ void convert_f32_to_bf16(b2b_bf16* dst, const float* src, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        b2b_put(dst + i, src[i]);
}

extern "C" __global__ void convert_bf16_to_f32(float* dst, const b2b_bf16* src, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dst[i] = b2b_get(src + i);
}
