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

// ---- tensor cores -------------------------------------------------------------------------
// Every tensor-core operation goes through helpers here: their inline PTX is the only PTX in
// the kernels, and each has an emulated twin (cuda-emu/csrc/emu.h) that implements the
// fragment layout the PTX ISA documents, so kernels using them run on the virtual GPU too.

// bf16 bits of x, rounded to nearest even (NaN stays NaN).
__device__ __forceinline__ unsigned b2b_bf16_bits(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
// Two bf16 in one register, `lo` in the low half (the element with the lower index).
__device__ __forceinline__ unsigned b2b_pack_bf16x2(float lo, float hi) {
    return b2b_bf16_bits(lo) | (b2b_bf16_bits(hi) << 16);
}

// D = A B + C for one warp: A 16x16 (row-major), B 16x8 (column-major), bf16 inputs, fp32
// accumulators (mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32). With g = lane / 4 and
// t = lane % 4, each lane holds
//   a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]    a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
//   c[0..1] = C[g][2t, 2t+1] c[2..3] = C[g+8][2t, 2t+1]   (d likewise)
// All 32 lanes must call it together (it is a warp-wide operation).
__device__ __forceinline__ void b2b_mma_bf16_16x8x16(float d[4], const unsigned a[4], const unsigned b[2],
                                                     const float c[4]) {
#ifdef B2B_EMU
    emu_mma_bf16_16x8x16(d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

// ---- bf16 storage -------------------------------------------------------------------------
// In mixed precision, activations and activation gradients are stored as bf16: raw bits in an
// unsigned short (no CUDA header needed, and the emulator builds the same text). Kernels read
// them with b2b_get (exact widening) and write them with b2b_put (round to nearest even, as
// kernels::bf16_bits); all arithmetic stays fp32. A family templated on its activation type T
// exports one `extern "C"` entry per type: NAME for float, NAME_bf16 for b2b_bf16.
typedef unsigned short b2b_bf16;

__device__ __forceinline__ float b2b_get(const float* p) { return *p; }
__device__ __forceinline__ float b2b_get(const b2b_bf16* p) { return __uint_as_float(((unsigned)*p) << 16); }
__device__ __forceinline__ void b2b_put(float* p, float v) { *p = v; }
__device__ __forceinline__ void b2b_put(b2b_bf16* p, float v) { *p = (b2b_bf16)b2b_bf16_bits(v); }

// Four consecutive elements (16 bytes of float, 8 of bf16; the address aligned to that).
__device__ __forceinline__ float4 b2b_get4(const float* p) { return b2b_load4(p); }
__device__ __forceinline__ void b2b_put4(float* p, float4 v) { b2b_store4(p, v); }
__device__ __forceinline__ float4 b2b_get4(const b2b_bf16* p) {
#ifdef B2B_EMU
    emu_check_aligned<uint2>(p);
#endif
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                       __uint_as_float(u.y & 0xffff0000u));
}
__device__ __forceinline__ void b2b_put4(b2b_bf16* p, float4 v) {
#ifdef B2B_EMU
    emu_check_aligned<uint2>(p);
#endif
    *reinterpret_cast<uint2*>(p) = make_uint2(b2b_pack_bf16x2(v.x, v.y), b2b_pack_bf16x2(v.z, v.w));
}
