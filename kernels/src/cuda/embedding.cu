// Embedding family.
// forward:  out[i, :] (= or +=) table[ids[i], :]      ids [n], table [rows, dim], out [n, dim]
// backward: dtable[ids[i], :] += dout[i, :]           (parameter gradient: accumulates, atomics)
// Ids outside [0, rows) are skipped (the CPU backend reports them as an error).

extern "C" __global__ void embedding_forward(float* out, const int* ids, const float* table, long long n, int dim, int rows, int accumulate) {
    const long long total = n * dim;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
        const long long i = k / dim;
        const int c = (int)(k - i * dim);
        const int id = ids[i];
        const float v = (id >= 0 && id < rows) ? table[(long long)id * dim + c] : 0.0f;
        out[k] = accumulate ? out[k] + v : v;
    }
}

extern "C" __global__ void embedding_backward(float* dtable, const int* ids, const float* dout, long long n, int dim, int rows) {
    const long long total = n * dim;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
        const long long i = k / dim;
        const int c = (int)(k - i * dim);
        const int id = ids[i];
        if (id >= 0 && id < rows) atomicAdd(&dtable[(long long)id * dim + c], dout[k]);
    }
}
