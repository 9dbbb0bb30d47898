// Softmax cross-entropy fused with its gradient; one block per row of logits [rows, V].
// For label y (rows labelled -100 give 0 loss and 0 gradient):
//   lse = log sum_v exp(x_v);  loss = (1-ls) * (lse - x_y) + ls * (lse - mean_v x_v)
//   dlogits = grad_scale * (softmax(x) - (1-ls) * onehot(y) - ls / V)   (assigned)
// With write_grad the gradient REPLACES the logits in place: every thread reads x_y before the
// first reduction barrier; otherwise a thread reads and writes only its own strided elements,
// so no thread can see another's overwrite.
// Storage: the logits (and so the gradient written over them) are an activation, T = float or
// bf16 (NAME / NAME_bf16), widened exactly on every read; the max, the sums and the losses are
// fp32, and each gradient element is rounded once to T. `losses` is fp32.
// `labels` points at this launch's first row's label.
// Labels outside [0, V) are treated as ignored (the CPU backend reports them as an error).

template <typename T>
__device__ __forceinline__ void cross_entropy_body(float* losses, T* logits, const int* labels, int V, float ls,
                                                   float grad_scale, int write_grad) {
    __shared__ float shared32[32];
    const long long row = blockIdx.x;
    T* x = logits + row * V;
    const int y = labels[row];
    if (y < 0 || y >= V) {
        if (threadIdx.x == 0) losses[row] = 0.0f;
        if (write_grad)
            for (int v = threadIdx.x; v < V; v += blockDim.x) b2b_put(x + v, 0.0f);
        return;
    }
    const float xy = b2b_get(x + y);
    float mx = -3.402823466e38f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, b2b_get(x + v));
    mx = block_max(mx, shared32);
    float se = 0.0f, sx = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        const float xv = b2b_get(x + v);
        se += expf(xv - mx);
        sx += xv;
    }
    se = block_sum(se, shared32);
    sx = block_sum(sx, shared32);
    const float log_sum = logf(se);
    const float lse = mx + log_sum;
    if (threadIdx.x == 0) losses[row] = (1.0f - ls) * (lse - xy) + ls * (lse - sx / V);
    if (write_grad) {
        const float smooth = ls / V;
        for (int v = threadIdx.x; v < V; v += blockDim.x) {
            float g = grad_scale * (expf(b2b_get(x + v) - mx - log_sum) - smooth);
            if (v == y) g -= grad_scale * (1.0f - ls);
            b2b_put(x + v, g);
        }
    }
}

extern "C" __global__ void cross_entropy_forward_backward(float* losses, float* logits, const int* labels, int V,
                                                          float ls, float grad_scale, int write_grad) {
    cross_entropy_body(losses, logits, labels, V, ls, grad_scale, write_grad);
}

extern "C" __global__ void cross_entropy_forward_backward_bf16(float* losses, b2b_bf16* logits, const int* labels,
                                                               int V, float ls, float grad_scale, int write_grad) {
    cross_entropy_body(losses, logits, labels, V, ls, grad_scale, write_grad);
}
