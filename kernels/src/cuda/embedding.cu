// Embedding family.
// forward:  out[i, :] (= or +=) table[ids[i], :]      ids [n], table [rows, dim], out [n, dim]
// backward: dtable[ids[i], :] += dout[i, :]           (parameter gradient: accumulates, atomics)
// Ids outside [0, rows) are skipped (the CPU backend reports them as an error).
// Storage: out and dout are activations, T = float or bf16 (NAME / NAME_bf16); the table (the
// fp32 master weights) and dtable are fp32. An accumulated out is read, added to in fp32 and
// rounded once; dout is widened exactly and scattered into the fp32 gradient.
// The same ops gather and scatter rows of activations (the LM head's label rows, beam caches):
// embedding_gather_bf16 reads a bf16 table, embedding_scatter_bf16 adds into a bf16 dtable, each
// element once through a compare-and-swap on its 32-bit word (read, add in fp32, round once).

template <typename T, typename W>
__device__ __forceinline__ void embedding_forward_body(T* out, const int* ids, const W* table, long long n,
                                                       int dim, int rows, int accumulate) {
    const long long total = n * dim;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
        const long long i = k / dim;
        const int c = (int)(k - i * dim);
        const int id = ids[i];
        const float v = (id >= 0 && id < rows) ? b2b_get(table + (long long)id * dim + c) : 0.0f;
        b2b_put(out + k, accumulate ? b2b_get(out + k) + v : v);
    }
}

__device__ __forceinline__ void embedding_atomic_add(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void embedding_atomic_add(b2b_bf16* p, float v) {
    const unsigned long long addr = (unsigned long long)p;
    unsigned* word = (unsigned*)(addr & ~3ull);
    const unsigned shift = (addr & 2ull) ? 16u : 0u;
    unsigned old = *word, assumed;
    do {
        assumed = old;
        const float sum = __uint_as_float(((assumed >> shift) & 0xffffu) << 16) + v;
        const unsigned desired = (assumed & ~(0xffffu << shift)) | (b2b_bf16_bits(sum) << shift);
        old = atomicCAS(word, assumed, desired);
    } while (old != assumed);
}

template <typename T, typename W>
__device__ __forceinline__ void embedding_backward_body(W* dtable, const int* ids, const T* dout, long long n,
                                                        int dim, int rows) {
    const long long total = n * dim;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
        const long long i = k / dim;
        const int c = (int)(k - i * dim);
        const int id = ids[i];
        if (id >= 0 && id < rows) embedding_atomic_add(dtable + (long long)id * dim + c, b2b_get(dout + k));
    }
}

extern "C" __global__ void embedding_forward(float* out, const int* ids, const float* table, long long n, int dim,
                                             int rows, int accumulate) {
    embedding_forward_body(out, ids, table, n, dim, rows, accumulate);
}

extern "C" __global__ void embedding_forward_bf16(b2b_bf16* out, const int* ids, const float* table, long long n,
                                                  int dim, int rows, int accumulate) {
    embedding_forward_body(out, ids, table, n, dim, rows, accumulate);
}

extern "C" __global__ void embedding_backward(float* dtable, const int* ids, const float* dout, long long n, int dim,
                                              int rows) {
    embedding_backward_body(dtable, ids, dout, n, dim, rows);
}

extern "C" __global__ void embedding_backward_bf16(float* dtable, const int* ids, const b2b_bf16* dout, long long n,
                                                   int dim, int rows) {
    embedding_backward_body(dtable, ids, dout, n, dim, rows);
}

extern "C" __global__ void embedding_gather_bf16(b2b_bf16* out, const int* ids, const b2b_bf16* table, long long n,
                                                 int dim, int rows, int accumulate) {
    embedding_forward_body(out, ids, table, n, dim, rows, accumulate);
}

extern "C" __global__ void embedding_scatter_bf16(b2b_bf16* dtable, const int* ids, const b2b_bf16* dout, long long n,
                                                  int dim, int rows) {
    embedding_backward_body(dtable, ids, dout, n, dim, rows);
}
