// Shared by every bert2bert kernel file (prepended by kernels/src/cuda/compile.rs).
// Keep in step with kernels/src/rng.rs: dropout masks must match the CPU bit for bit.
#pragma once

// Dynamic shared memory, sized by the launch. On a GPU it is `extern __shared__`; the CUDA
// emulator (cuda-emu, which defines B2B_EMU) hands each block its own buffer instead, and
// rejects a bare `extern __shared__` at build time.
#ifdef B2B_EMU
#define B2B_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::emu::tl_block->dyn_smem)
#else
#define B2B_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// 16-byte vector loads and stores. A misaligned address faults on a GPU; the emulator checks
// alignment here and fails the launch naming the kernel, so vector access goes through these.
__device__ __forceinline__ float4 b2b_load4(const float* p) {
#ifdef B2B_EMU
    emu_check_aligned<float4>(p);
#endif
    return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ void b2b_store4(float* p, float4 v) {
#ifdef B2B_EMU
    emu_check_aligned<float4>(p);
#endif
    *reinterpret_cast<float4*>(p) = v;
}

typedef unsigned long long u64;

__device__ __forceinline__ u64 b2b_mix(u64 seed, u64 index) {
    const u64 golden = 0x9E3779B97F4A7C15ull;
    u64 z = seed * golden + index + golden;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Uniform in [0, 1) with 24 bits, as rng::uniform.
__device__ __forceinline__ float b2b_uniform(u64 seed, u64 index) {
    return (float)(b2b_mix(seed, index) >> 40) * (1.0f / 16777216.0f);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v, float* shared32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    float t = lane < warps ? shared32[lane] : 0.0f;
    return warp_sum(t);
}

__device__ __forceinline__ float block_max(float v, float* shared32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    float t = lane < warps ? shared32[lane] : -3.402823466e38f;
    return warp_max(t);
}
