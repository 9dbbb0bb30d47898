// Embedding family.
// forward:  out[i, :] (= or +=) table[ids[i], :]      ids [n], table [rows, dim], out [n, dim]
// backward: dtable[ids[i], :] += dout[i, :]           (parameter gradient: accumulates, atomics)
// Ids outside [0, rows) are skipped (the CPU backend reports them as an error).
// Storage: out and dout are activations, T = float or bf16 (NAME / NAME_bf16); the table (the
// fp32 master weights) and dtable are fp32. An accumulated out is read, added to in fp32 and
// rounded once; dout is widened exactly and scattered into the fp32 gradient.

template <typename T>
__device__ __forceinline__ void embedding_forward_body(T* out, const int* ids, const float* table, long long n,
                                                       int dim, int rows, int accumulate) {
    const long long total = n * dim;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
        const long long i = k / dim;
        const int c = (int)(k - i * dim);
        const int id = ids[i];
        const float v = (id >= 0 && id < rows) ? table[(long long)id * dim + c] : 0.0f;
        b2b_put(out + k, accumulate ? b2b_get(out + k) + v : v);
    }
}

template <typename T>
__device__ __forceinline__ void embedding_backward_body(float* dtable, const int* ids, const T* dout, long long n,
                                                        int dim, int rows) {
    const long long total = n * dim;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
        const long long i = k / dim;
        const int c = (int)(k - i * dim);
        const int id = ids[i];
        if (id >= 0 && id < rows) atomicAdd(&dtable[(long long)id * dim + c], b2b_get(dout + k));
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
