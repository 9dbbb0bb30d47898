// The device side of the emulator: what a .cu file sees when g++ builds it for the host.
// build.rs compiles each kernel family as: this header, common.cuh, the family's .cu text
// (unchanged), then one registration line per `extern "C" __global__` entry point.
//
// Every GPU thread is a fiber (sched.cpp). threadIdx and friends are read from the running
// fiber, `__syncthreads` and every warp exchange yield to the block's scheduler, and only
// barriers release waiting threads, so a kernel that needs a barrier it lacks computes
// something different under another schedule. `__shared__` is thread_local: a block runs
// wholly on one OS thread, so the block's fibers share it and concurrent blocks do not.
// What this header does not provide is a compile error, never a silent difference.
#pragma once

#include <chrono>
#include <cmath>
#include <thread>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "runtime.h"

#define B2B_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
// `extern __shared__` (dynamic shared memory) does not compile here on purpose: kernels use
// B2B_DYNAMIC_SHARED from common.cuh, which the emulator sizes by the launch.
#define __shared__ static thread_local

struct uint3 {
    unsigned x, y, z;
};
typedef uint3 dim3;

namespace emu {
struct Fiber;
struct BlockCtx;
// The fiber running on this OS thread (set by the scheduler before each switch).
extern thread_local Fiber* tl_fiber;
extern thread_local BlockCtx* tl_block;
struct Fiber {
    uint3 tid;
    unsigned linear, lane, warp;
};
struct BlockCtx {
    uint3 block_idx, block_dim, grid_dim;
    unsigned char* dyn_smem;
    unsigned dyn_smem_bytes;
};
// Yield points: opaque calls, so the compiler reloads memory (and threadIdx) after each.
__attribute__((noinline)) void sync_block();
__attribute__((noinline)) void sync_warp(unsigned mask);
__attribute__((noinline)) uint64_t warp_exchange(unsigned mask, uint64_t mine, int src_lane, int width);
__attribute__((noinline)) unsigned warp_ballot(unsigned mask, int pred);
[[noreturn]] __attribute__((noinline)) void device_fault(Result code, const char* what);
// Every lane of the warp gives `bytes` (at most 64) and receives all 32 lanes' in lane order.
__attribute__((noinline)) void warp_share(const void* mine, unsigned bytes, void* all);
}  // namespace emu

#define threadIdx (::emu::tl_fiber->tid)
#define blockIdx (::emu::tl_block->block_idx)
#define blockDim (::emu::tl_block->block_dim)
#define gridDim (::emu::tl_block->grid_dim)
#define warpSize 32

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::sync_warp(mask); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
// Sleeps the host thread: blocks are not preempted, so this delays the whole launch.
inline void __nanosleep(unsigned ns) { std::this_thread::sleep_for(std::chrono::nanoseconds(ns)); }
[[noreturn]] inline void __trap() { emu::device_fault(emu::LAUNCH_FAILED, "__trap() called"); }

// ---- warp exchange -------------------------------------------------------------------------
template <class T>
inline uint64_t emu_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
inline T emu_from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}
inline unsigned emu_lane() { return emu::tl_fiber->lane; }
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    const int base = (int)emu_lane() & ~(width - 1);
    return emu_from_bits<T>(emu::warp_exchange(mask, emu_bits(v), base + (src & (width - 1)), width));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const int l = (int)emu_lane();
    const int base = l & ~(width - 1);
    return emu_from_bits<T>(emu::warp_exchange(mask, emu_bits(v), base + ((l - base) ^ lane_mask), width));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int l = (int)emu_lane(), base = l & ~(width - 1), in = l - base;
    const int src = in + (int)delta < width ? l + (int)delta : l;
    return emu_from_bits<T>(emu::warp_exchange(mask, emu_bits(v), src, width));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int l = (int)emu_lane(), base = l & ~(width - 1), in = l - base;
    const int src = in - (int)delta >= 0 ? l - (int)delta : l;
    return emu_from_bits<T>(emu::warp_exchange(mask, emu_bits(v), src, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return emu::warp_ballot(mask, pred) & mask; }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == (mask & emu::warp_ballot(mask, 1)); }
inline unsigned __activemask() { return emu::warp_ballot(0xffffffffu, 1); }

// ---- atomics (real: blocks of one launch may run on different OS threads) -------------------
template <class T>
inline T emu_atomic_float_add(T* p, T v) {
    using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    U* up = reinterpret_cast<U*>(p);
    U old = __atomic_load_n(up, __ATOMIC_RELAXED);
    for (;;) {
        T cur;
        std::memcpy(&cur, &old, sizeof(T));
        T next = cur + v;
        U nb;
        std::memcpy(&nb, &next, sizeof(T));
        if (__atomic_compare_exchange_n(up, &old, nb, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return cur;
    }
}
inline float atomicAdd(float* p, float v) { return emu_atomic_float_add(p, v); }
inline double atomicAdd(double* p, double v) { return emu_atomic_float_add(p, v); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
inline float atomicExch(float* p, float v) {
    return emu_from_bits<float>(__atomic_exchange_n(reinterpret_cast<uint32_t*>(p), (uint32_t)emu_bits(v), __ATOMIC_RELAXED));
}
template <class T>
inline T atomicCAS(T* p, T expected, T desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return expected;
}
inline int atomicMax(int* p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline int atomicMin(int* p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}

// ---- math intrinsics ------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __int_as_float(int x) { return emu_from_bits<float>((uint32_t)x); }
inline int __float_as_int(float x) { return (int)(uint32_t)emu_bits(x); }
inline float __uint_as_float(unsigned x) { return emu_from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return (unsigned)emu_bits(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
using std::max;
using std::min;
template <class T>
inline T __ldg(const T* p) { return *p; }

// ---- 16-bit floats -------------------------------------------------------------------------
struct __nv_bfloat16 {
    uint16_t x;
};
struct __half {
    uint16_t x;
};
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u = (uint32_t)emu_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) { return emu_from_bits<float>((uint32_t)h.x << 16); }
inline __half __float2half(float f) {
    _Float16 h = (_Float16)f;
    return __half{(uint16_t)emu_bits(h)};
}
inline float __half2float(__half h) { return (float)emu_from_bits<_Float16>(h.x); }
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

// ---- vectors: loads and stores through b2b_load/b2b_store check alignment -----------------
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
template <class V>
inline void emu_check_aligned(const void* p) {
    if (reinterpret_cast<uintptr_t>(p) % alignof(V) != 0)
        emu::device_fault(emu::MISALIGNED_ADDRESS, "misaligned vector load or store");
}

// ---- registration (build.rs adds one B2B_EMU_REGISTER line per entry point) ----------------
namespace emu {
template <class T>
const char* type_name() {
    static const std::string name = [] {
        std::string f = __PRETTY_FUNCTION__;  // "... [with T = const float*]"
        size_t a = f.find("T = ");
        size_t b = f.find_first_of(";]", a);
        return a == std::string::npos ? std::string("?") : f.substr(a + 4, b - a - 4);
    }();
    return name.c_str();
}
template <class... A>
struct Signature {
    template <size_t... I>
    static void call(void* fn, const unsigned char* args, const size_t* off, std::index_sequence<I...>) {
        reinterpret_cast<void (*)(A...)>(fn)(*reinterpret_cast<const std::remove_cv_t<A>*>(args + off[I])...);
    }
    static void invoke(void* fn, const unsigned char* args, const size_t* off) {
        call(fn, args, off, std::index_sequence_for<A...>{});
    }
};
template <class... A>
KernelEntry make_entry(const char* name, void (*f)(A...)) {
    return KernelEntry{name, reinterpret_cast<void*>(f), &Signature<A...>::invoke,
                       {ArgInfo{sizeof(A), std::is_pointer<A>::value, type_name<A>()}...}};
}
struct Registrar {
    explicit Registrar(KernelEntry e) { register_kernel(std::move(e)); }
};
}  // namespace emu
#define B2B_EMU_REGISTER(name) static ::emu::Registrar b2b_emu_registrar_##name(::emu::make_entry(#name, &name));

// ---- tensor cores: twins of common.cuh's helpers, with the PTX ISA's fragment layouts ------
inline float emu_bf16_lo(unsigned r) { return emu_from_bits<float>((uint32_t)(r & 0xffffu) << 16); }
inline float emu_bf16_hi(unsigned r) { return emu_from_bits<float>((uint32_t)(r & 0xffff0000u)); }
inline void emu_mma_bf16_16x8x16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    struct Fragments {
        unsigned a[4], b[2];
        float c[4];
    } mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}}, all[32];
    emu::warp_share(&mine, sizeof mine, all);
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        const Fragments& f = all[l];
        for (int h = 0; h < 2; h++) {  // h: the register's low or high element
            auto pick = [&](unsigned r) { return h ? emu_bf16_hi(r) : emu_bf16_lo(r); };
            A[g][2 * t + h] = pick(f.a[0]);
            A[g + 8][2 * t + h] = pick(f.a[1]);
            A[g][2 * t + 8 + h] = pick(f.a[2]);
            A[g + 8][2 * t + 8 + h] = pick(f.a[3]);
            B[2 * t + h][g] = pick(f.b[0]);
            B[2 * t + 8 + h][g] = pick(f.b[1]);
            C[g][2 * t + h] = f.c[h];
            C[g + 8][2 * t + h] = f.c[2 + h];
        }
    }
    const int g = (int)emu_lane() / 4, t = (int)emu_lane() % 4;
    auto dot = [&](int row, int col) {
        float s = C[row][col];
        for (int k = 0; k < 16; k++) s += A[row][k] * B[k][col];
        return s;
    };
    d[0] = dot(g, 2 * t);
    d[1] = dot(g, 2 * t + 1);
    d[2] = dot(g + 8, 2 * t);
    d[3] = dot(g + 8, 2 * t + 1);
}
