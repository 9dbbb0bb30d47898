// The emulator's NCCL reductions (nccl.cpp's arithmetic, kept apart from its transport): the
// data types and reduction operators of the NCCL C API by their enum values, and an elementwise
// reduction over n ranks' buffers that adds in rank order 0..n-1, so every rank computes the same
// bits. Included by nccl.cpp only.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace nccl_reduce {
// ncclDataType_t and ncclRedOp_t, by value.
enum { kInt8, kUint8, kInt32, kUint32, kInt64, kUint64, kFloat16, kFloat32, kFloat64, kBfloat16 };
enum { kSum, kProd, kMax, kMin, kAvg };

// Element i of a buffer as the accumulator type A, and back. bf16 (stored as uint16_t) is
// accumulated in fp32 and rounded to nearest even on the way back.
struct bf16 {};
template <class T, class A> A load(const unsigned char* p, size_t i) {
    if constexpr (std::is_same_v<T, bf16>) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        return __builtin_bit_cast(float, uint32_t(h) << 16);
    } else {
        T v;
        memcpy(&v, p + i * sizeof(T), sizeof v);
        return A(v);
    }
}
template <class T, class A> void store(unsigned char* p, size_t i, A a) {
    if constexpr (std::is_same_v<T, bf16>) {
        uint32_t u = __builtin_bit_cast(uint32_t, a);
        uint16_t h = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40)  // NaN stays a quiet NaN
                                                      : uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
        memcpy(p + 2 * i, &h, 2);
    } else {
        T v = T(a);
        memcpy(p + i * sizeof(T), &v, sizeof v);
    }
}

// Integer sums and products wrap (computed unsigned), as on the GPU; avg truncates for integers.
template <class A> A add(A a, A b) {
    if constexpr (std::is_integral_v<A>) return A(std::make_unsigned_t<A>(a) + std::make_unsigned_t<A>(b));
    else return a + b;
}
template <class A> A mul(A a, A b) {
    if constexpr (std::is_integral_v<A>) return A(std::make_unsigned_t<A>(a) * std::make_unsigned_t<A>(b));
    else return a * b;
}
template <class A> A divide(A a, int n) {
    if constexpr (std::is_unsigned_v<A>) return A(a / (unsigned long long)n);
    else if constexpr (std::is_integral_v<A>) return A((long long)a / n);
    else return a / A(n);
}

// dst[i] = src[0][i] op src[1][i] op ... in rank order, chunk by chunk, so dst may be a src.
template <class T, class A, class F>
void reduce_run(int n, size_t count, const unsigned char* const* src, unsigned char* dst, F f, bool avg) {
    constexpr size_t kChunk = 2048;
    A acc[kChunk];
    for (size_t b = 0; b < count; b += kChunk) {
        size_t m = std::min(kChunk, count - b);
        for (size_t i = 0; i < m; i++) acc[i] = load<T, A>(src[0], b + i);
        for (int p = 1; p < n; p++)
            for (size_t i = 0; i < m; i++) acc[i] = f(acc[i], load<T, A>(src[p], b + i));
        for (size_t i = 0; avg && i < m; i++) acc[i] = divide(acc[i], n);
        for (size_t i = 0; i < m; i++) store<T, A>(dst, b + i, acc[i]);
    }
}

template <class T, class A = T>
void reduce_op(int op, int n, size_t count, const unsigned char* const* src, unsigned char* dst) {
    switch (op) {
    case kSum: return reduce_run<T, A>(n, count, src, dst, add<A>, false);
    case kAvg: return reduce_run<T, A>(n, count, src, dst, add<A>, true);
    case kProd: return reduce_run<T, A>(n, count, src, dst, mul<A>, false);
    case kMax: return reduce_run<T, A>(n, count, src, dst, [](A a, A b) { return std::max(a, b); }, false);
    case kMin: return reduce_run<T, A>(n, count, src, dst, [](A a, A b) { return std::min(a, b); }, false);
    }
}

inline void reduce(int dtype, int op, int n, size_t count, const unsigned char* const* src, unsigned char* dst) {
    switch (dtype) {
    case kInt8: return reduce_op<int8_t>(op, n, count, src, dst);
    case kUint8: return reduce_op<uint8_t>(op, n, count, src, dst);
    case kInt32: return reduce_op<int32_t>(op, n, count, src, dst);
    case kUint32: return reduce_op<uint32_t>(op, n, count, src, dst);
    case kInt64: return reduce_op<int64_t>(op, n, count, src, dst);
    case kUint64: return reduce_op<uint64_t>(op, n, count, src, dst);
    case kFloat32: return reduce_op<float>(op, n, count, src, dst);
    case kFloat64: return reduce_op<double>(op, n, count, src, dst);
    case kBfloat16: return reduce_op<bf16, float>(op, n, count, src, dst);
    }
}
}  // namespace nccl_reduce
