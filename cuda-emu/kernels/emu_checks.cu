// Kernels for the emulator's own tests (cuda-emu/tests/checks.rs): each is correct only when
// called correctly, so a test can call it wrongly and show the emulator catches it. They are
// compiled by NVRTC (PTX, as the backend's kernels are) and into the emulator's host build.

// y += a * x over n elements (a grid-stride loop).
extern "C" __global__ void emu_check_axpy(float* y, const float* x, float a, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] += a * x[i];
}

// One thread writes y[n - 1 + past]: past = 0 is the last element, past > 0 is out of bounds.
extern "C" __global__ void emu_check_write_at(float* y, int n, int past) {
    if (blockIdx.x == 0 && threadIdx.x == 0) y[n - 1 + past] = 1.0f;
}

// out[b*n + t] = the value thread t+1 of the block stored: right only with the barrier.
extern "C" __global__ void emu_check_neighbour(float* out, int with_barrier) {
    __shared__ float s[1024];
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = (float)(blockIdx.x * n + t);
    if (with_barrier) __syncthreads();
    out[blockIdx.x * n + t] = s[(t + 1) % n];
}

// dst[0..4] = src[offset..offset+4] with one 16-byte vector load and store.
extern "C" __global__ void emu_check_vector_copy(float* dst, const float* src, int offset) {
    if (blockIdx.x == 0 && threadIdx.x == 0) b2b_store4(dst, b2b_load4(src + offset));
}

// Waits `ms` milliseconds, then sets out[0..n) = v: work that takes a while.
extern "C" __global__ void emu_check_slow_fill(float* out, int n, float v, int ms) {
    if (threadIdx.x == 0)
        for (int i = 0; i < ms; i++) __nanosleep(1000000);
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = v;
}

// dst = src over n elements.
extern "C" __global__ void emu_check_copy(float* dst, const float* src, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) dst[i] = src[i];
}

// Uses `bytes` of dynamic shared memory (zeroed, summed into out[0]).
extern "C" __global__ void emu_check_dynamic_shared(float* out, int floats) {
    B2B_DYNAMIC_SHARED(float, buf);
    for (int i = threadIdx.x; i < floats; i += blockDim.x) buf[i] = 1.0f;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int i = 0; i < floats; i++) s += buf[i];
        out[0] = s;
    }
}

// One warp: d (16x8, row-major) = a (16x16, row-major) b (16x8, row-major) through the
// tensor-core helper, each lane loading its fragments as common.cuh documents them.
extern "C" __global__ void emu_check_mma(float* d, const float* a, const float* b) {
    const int lane = threadIdx.x & 31, g = lane / 4, t = lane % 4;
    const unsigned fa[4] = {b2b_pack_bf16x2(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]),
                            b2b_pack_bf16x2(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]),
                            b2b_pack_bf16x2(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]),
                            b2b_pack_bf16x2(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9])};
    const unsigned fb[2] = {b2b_pack_bf16x2(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]),
                            b2b_pack_bf16x2(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g])};
    const float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float out[4];
    b2b_mma_bf16_16x8x16(out, fa, fb, c);
    d[g * 8 + 2 * t] = out[0];
    d[g * 8 + 2 * t + 1] = out[1];
    d[(g + 8) * 8 + 2 * t] = out[2];
    d[(g + 8) * 8 + 2 * t + 1] = out[3];
}
