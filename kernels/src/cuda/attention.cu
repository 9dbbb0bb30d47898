// Attention family: the non-GEMM parts of multi-head scaled-dot-product attention. The
// launcher (attention.rs) runs the GEMMs through cuBLAS on a head-major layout:
//   forward:  qh,kh,vh = split(q,k,v); S = qh kh^T / sqrt(D); P = masked_softmax(S) (saved);
//             Pd = dropout(P); ctx_h = Pd vh; out = merge(ctx_h)
//   backward: gh = split(dout); dPd = gh vh^T; dvh = Pd^T gh; dS = P * (dP - rowsum(dP * P)) with
//             dP = dropout(dPd); dqh = dS kh / sqrt(D); dkh = dS^T qh / sqrt(D);
//             dq = merge(dqh) (assigned), dk += merge(dkh), dv += merge(dvh).
// Layouts: interleaved [B, T, H*D] (as a Linear writes it) and head-major [B*H, T, D].
// Masked keys (key_mask == 0, or j > i when causal) score -1e30, so a fully masked row becomes
// uniform. Dropout element (b, h, i, j) uses counter ((b*H + h)*Tq + i)*Tk + j = row*Tk + j.

extern "C" __global__ void attention_split_heads(float* dst, const float* src, int B, int T, int H, int D) {
    const long long n = (long long)B * T * H * D;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
        const int d = (int)(k % D);
        const long long r = k / D;          // (b*H + h)*T + t
        const int t = (int)(r % T);
        const long long bh = r / T;
        const int h = (int)(bh % H);
        const long long b = bh / H;
        dst[k] = src[((b * T + t) * H + h) * D + d];
    }
}

extern "C" __global__ void attention_merge_heads(float* dst, const float* src, int B, int T, int H, int D, int accumulate) {
    const long long n = (long long)B * T * H * D;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
        const int d = (int)(k % D);
        const long long r = k / D;
        const int h = (int)(r % H);
        const long long bt = r / H;         // b*T + t
        const int t = (int)(bt % T);
        const long long b = bt / T;
        const float v = src[((b * H + h) * T + t) * D + d];
        dst[k] = accumulate ? dst[k] + v : v;
    }
}

// One warp per row (b, h, i) of probs [B*H, Tq, Tk]: scores in, probabilities out (in place);
// `pd` (may be null) receives the dropped-out probabilities.
extern "C" __global__ void attention_softmax_forward(float* probs, float* pd, const float* key_mask, int BH, int H, int Tq,
                                                     int Tk, int causal, float p_drop, unsigned long long seed) {
    const int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * warps + (threadIdx.x >> 5);
    if (row >= (long long)BH * Tq) return;
    const int i = (int)(row % Tq);
    const long long b = row / Tq / H;
    float* s = probs + row * Tk;
    const float* mask = key_mask + b * Tk;
    float mx = -3.402823466e38f;
    for (int j = lane; j < Tk; j += 32) {
        float v = s[j];
        if (mask[j] == 0.0f || (causal && j > i)) v = -1.0e30f;
        s[j] = v;
        mx = fmaxf(mx, v);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j < Tk; j += 32) {
        const float e = expf(s[j] - mx);
        s[j] = e;
        sum += e;
    }
    const float inv = 1.0f / warp_sum(sum);
    const float keep_scale = 1.0f / (1.0f - p_drop);
    for (int j = lane; j < Tk; j += 32) {
        const float p = s[j] * inv;
        s[j] = p;
        if (pd) pd[row * Tk + j] = b2b_uniform(seed, (u64)(row * Tk + j)) >= p_drop ? p * keep_scale : 0.0f;
    }
}

// One warp per row: dp holds dPd on entry and dS on exit.
extern "C" __global__ void attention_softmax_backward(float* dp, const float* probs, long long rows, int Tk, float p_drop,
                                                      unsigned long long seed) {
    const int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * warps + (threadIdx.x >> 5);
    if (row >= rows) return;
    float* g = dp + row * Tk;
    const float* p = probs + row * Tk;
    const float keep_scale = 1.0f / (1.0f - p_drop);
    float dot = 0.0f;
    for (int j = lane; j < Tk; j += 32) {
        float v = g[j];
        if (p_drop > 0.0f) v = b2b_uniform(seed, (u64)(row * Tk + j)) >= p_drop ? v * keep_scale : 0.0f;
        g[j] = v;
        dot += v * p[j];
    }
    dot = warp_sum(dot);
    for (int j = lane; j < Tk; j += 32) g[j] = p[j] * (g[j] - dot);
}
