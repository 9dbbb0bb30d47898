// Attention family: fused ("flash") multi-head scaled-dot-product attention, fp32 SIMT.
//
// Storage: q, k, v, out, dout, dq, dk and dv are activations, float or bf16 (T); each kernel
// is one template body with two entries, NAME (float) and NAME_bf16 (b2b_bf16). The key mask
// and lse stay fp32. bf16 elements are widened exactly when read and rounded once (nearest
// even) when written (dq, dk and dv are assigned: each element has one owner). All arithmetic is
// fp32, so the bf16 entries differ from the float ones only by that storage rounding.
//
// Layouts: q [B, Tq, H*D] with tokens ldq apart, k and v [B, Tk, H*D] with tokens ldkv apart
// (head h at columns h*D..h*D+D: the layout a linear layer writes, or column blocks of a fused
// QKV projection); dq is laid out as q, dk and dv as k; out and dout are contiguous
// [B, Tq, H*D]; key_mask [B, Tk] (1 real, 0 padding); lse [B, H, Tq].
//
// Grids: blockIdx.x = b*H + h, blockIdx.y = the query (or key) tile; 128 threads a block.
// forward (one block per 16 query rows of one (b, h); key tiles of 32 in shared memory):
//   x_ij = q_i . k_j * scale (scale = 1/sqrt(D), from the host, as the CPU computes it), or
//   MASKED = -1e30 where key j is padding or (causal) j > i; online softmax over the tiles:
//   m_i = max_j x_ij, l_i = sum_j exp(x_ij - m_i), P_ij = exp(x_ij - m_i) / l_i;
//   out_i = sum_j P_ij keep_ij v_j; saves only lse_i = m_i + log(l_i).
// backward (P recomputed from q, k and lse, never stored):
//   Dsum_i = dout_i . out_i  (= sum_j P_ij dP_ij), recomputed by each block that needs it;
//   dP_ij = keep_ij (dout_i . v_j); dS_ij = P_ij (dP_ij - Dsum_i);
//   dv_j = sum_i P_ij keep_ij dout_i; dk_j = scale sum_i dS_ij q_i   (one block per 32 keys,
//   looping over query tiles, in registers; each block then ASSIGNS its keys' dk and dv)
//   dq_i = scale sum_j dS_ij k_j   (one block per 16 query rows, looping over key tiles: ASSIGNED)
// Causal masks skip the tiles where every key comes after every query row (see each kernel).
// Every output element is written by exactly one thread, in a fixed order: deterministic, no
// atomics.
// Dropout: keep_ij = 1/(1-p) iff b2b_uniform(seed, ((b*H + h)*Tq + i)*Tk + j) >= p, else 0: the
// CPU's counter over the [B, H, Tq, Tk] probabilities.
// A row whose keys are all masked is uniform over all Tk keys, as the CPU's -1e30 scores make
// it: there m_i = MASKED and lse_i rounds to exactly MASKED (log Tk is far below MASKED's ulp),
// which backward reads as "P_ij = 1/Tk".
// Head dims up to FA_DMAX = 64 (each lane owns dims lane and lane + 32); the launcher rejects
// larger ones. Accumulation in fp32; results differ from the CPU's by rounding only.

#define FA_DMAX 64
#define FA_ROW (FA_DMAX + 1)  // padded shared row: a warp reading 32 different rows hits 32 banks
#define FA_BQ 16              // query rows per block (4 per warp)
#define FA_BK 32              // keys per tile (one per lane)
#define FA_WARPS 4
#define FA_RPW (FA_BQ / FA_WARPS)  // query rows per warp
#define FA_KPW (FA_BK / FA_WARPS)  // keys per warp in the dk/dv kernel
#define FA_MASKED (-1.0e30f)

// The kernels' trailing scalar parameters, and the bodies' arguments from them.
#define FA_SCALARS                                                                                              \
    int H, int D, int Tq, int Tk, int ldq, int ldkv, int causal, float scale, float p_drop, unsigned long long seed
#define FA_SCALAR_ARGS H, D, Tq, Tk, ldq, ldkv, causal, scale, p_drop, seed

// One element into a shared tile: fp32 tiles widen a bf16 element, a bf16 tile (the mma
// kernels' operands with bf16 storage) keeps its bits.
__device__ __forceinline__ void fa_set(float* dst, const float* src) { *dst = *src; }
__device__ __forceinline__ void fa_set(float* dst, const b2b_bf16* src) { *dst = b2b_get(src); }
__device__ __forceinline__ void fa_set(b2b_bf16* dst, const b2b_bf16* src) { *dst = *src; }

// *p = x for dk and dv, which the owning block writes once, after its last query tile.
template <typename T>
__device__ __forceinline__ void fa_store(T* p, float x) {
    b2b_put(p, x);
}

// dst[r][d] = rows[(t0 + r) * ld + d] for t0 + r < n and d < D, 0 elsewhere; `rows` points at
// the first token of this (b, h). All threads of the block take part.
template <typename S, int R, typename T>
__device__ __forceinline__ void flash_load_rows(S (*dst)[R], int nrows, const T* rows, long long ld, int t0, int n,
                                                int D) {
    for (int e = threadIdx.x; e < nrows * FA_DMAX; e += blockDim.x) {
        const int r = e / FA_DMAX, d = e % FA_DMAX;
        if (t0 + r < n && d < D)
            fa_set(&dst[r][d], rows + (long long)(t0 + r) * ld + d);
        else
            dst[r][d] = S(0);
    }
}

// The key mask of one tile (0 past Tk).
__device__ __forceinline__ void flash_load_mask(float* dst, const float* mask_b, int j0, int Tk) {
    for (int r = threadIdx.x; r < FA_BK; r += blockDim.x) dst[r] = j0 + r < Tk ? mask_b[j0 + r] : 0.0f;
}

// The scaled score of (i, j), or MASKED where the key is hidden from query i.
__device__ __forceinline__ float flash_score(float dot, float scale, float key_mask, int causal, int i, int j) {
    return (key_mask == 0.0f || (causal && j > i)) ? FA_MASKED : dot * scale;
}

// Dropout factor of probability (bh, i, j): 0 or 1/(1-p); 1 when dropout is off.
__device__ __forceinline__ float flash_keep(u64 seed, float p_drop, long long bh, int Tq, int Tk, int i, int j) {
    if (p_drop <= 0.0f) return 1.0f;
    const u64 counter = (u64)((bh * Tq + i) * (long long)Tk + j);
    return b2b_uniform(seed, counter) >= p_drop ? 1.0f / (1.0f - p_drop) : 0.0f;
}

// P_ij from the saved lse (see the header for the fully masked row).
__device__ __forceinline__ float flash_prob(float x, float lse, int Tk) {
    return lse == FA_MASKED ? 1.0f / (float)Tk : expf(x - lse);
}

// Whether one of the tile's rows (those before Tq) saw no key at all (see the header).
__device__ __forceinline__ bool flash_any_unseen(const float* lse_s, int i0, int Tq) {
    bool any = false;
    for (int r = 0; r < FA_BQ; r++) any |= i0 + r < Tq && lse_s[r] == FA_MASKED;
    return any;
}

// Dsum of FA_RPW query rows per warp into dsum_s (dout_i . out_i over the D dims of head h).
template <typename T>
__device__ __forceinline__ void flash_dsum(float* dsum_s, const T* dout_bh, const T* out_bh, long long c, int i0,
                                           int Tq, int D) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int rr = 0; rr < FA_RPW; rr++) {
        const int r = warp * FA_RPW + rr, i = i0 + r;
        float acc = 0.0f;
        if (i < Tq)
            for (int d = lane; d < D; d += 32) acc += b2b_get(dout_bh + i * c + d) * b2b_get(out_bh + i * c + d);
        acc = warp_sum(acc);
        if (lane == 0) dsum_s[r] = acc;
    }
}

template <typename T>
__device__ __forceinline__ void flash_forward(T* out, float* lse, const T* q, const T* k, const T* v,
                                              const float* key_mask, FA_SCALARS) {
    __shared__ float qs[FA_BQ][FA_ROW];
    __shared__ float ks[FA_BK][FA_ROW];
    __shared__ float vs[FA_BK][FA_ROW];
    __shared__ float km[FA_BK];
    const long long bh = blockIdx.x;
    const int b = (int)(bh / H), h = (int)(bh % H);
    const int i0 = blockIdx.y * FA_BQ, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long c = (long long)H * D;
    const T* k_bh = k + (long long)b * Tk * ldkv + (long long)h * D;
    const T* v_bh = v + (long long)b * Tk * ldkv + (long long)h * D;
    flash_load_rows(qs, FA_BQ, q + (long long)b * Tq * ldq + (long long)h * D, ldq, i0, Tq, D);
    float m[FA_RPW], l[FA_RPW], o[FA_RPW][2];
#pragma unroll
    for (int rr = 0; rr < FA_RPW; rr++) {
        m[rr] = -3.402823466e38f;
        l[rr] = 0.0f;
        o[rr][0] = o[rr][1] = 0.0f;
    }
    // Causal: the keys after the block's last row are hidden from all its rows, so the loop stops
    // there, unless a row has seen no key yet (all keys up to it are padding): that row is
    // uniform over all Tk keys, as on the CPU, and the block goes on over the rest.
    __shared__ int unseen;
    int j_end = causal ? min(Tk, i0 + FA_BQ) : Tk;
    for (int j0 = 0; j0 < Tk; j0 += FA_BK) {
        if (j0 >= j_end) {  // block-uniform: j0, j_end and the vote below are the same everywhere
            __syncthreads();
            if (threadIdx.x == 0) unseen = 0;
            __syncthreads();
#pragma unroll
            for (int rr = 0; rr < FA_RPW; rr++)
                if (lane == 0 && i0 + warp * FA_RPW + rr < Tq && m[rr] == FA_MASKED) unseen = 1;
            __syncthreads();
            if (!unseen) break;
            j_end = Tk;
        }
        __syncthreads();  // the previous tile is no longer read
        flash_load_rows(ks, FA_BK, k_bh, ldkv, j0, Tk, D);
        flash_load_rows(vs, FA_BK, v_bh, ldkv, j0, Tk, D);
        flash_load_mask(km, key_mask + (long long)b * Tk, j0, Tk);
        __syncthreads();
        const int j = j0 + lane;
        float dot[FA_RPW] = {};
        for (int d = 0; d < D; d++) {
            const float kd = ks[lane][d];
#pragma unroll
            for (int rr = 0; rr < FA_RPW; rr++) dot[rr] += qs[warp * FA_RPW + rr][d] * kd;
        }
#pragma unroll
        for (int rr = 0; rr < FA_RPW; rr++) {
            const int i = i0 + warp * FA_RPW + rr;
            const float x = flash_score(dot[rr], scale, km[lane], causal, i, j);
            const float m_new = fmaxf(m[rr], warp_max(j < Tk ? x : -3.402823466e38f));
            const float alpha = expf(m[rr] - m_new);
            const float p = j < Tk ? expf(x - m_new) : 0.0f;
            l[rr] = l[rr] * alpha + warp_sum(p);
            m[rr] = m_new;
            const float pk = (j < Tk && i < Tq) ? p * flash_keep(seed, p_drop, bh, Tq, Tk, i, j) : 0.0f;
            o[rr][0] *= alpha;
            o[rr][1] *= alpha;
            for (int jj = 0; jj < FA_BK; jj++) {
                const float pj = __shfl_sync(0xffffffffu, pk, jj);
                o[rr][0] += pj * vs[jj][lane];
                o[rr][1] += pj * vs[jj][lane + 32];
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < FA_RPW; rr++) {
        const int i = i0 + warp * FA_RPW + rr;
        if (i >= Tq) continue;
        const float inv = l[rr] > 0.0f ? 1.0f / l[rr] : 0.0f;  // no keys at all (Tk 0): out 0, as the CPU
        T* o_row = out + ((long long)b * Tq + i) * c + (long long)h * D;
        if (lane < D) b2b_put(o_row + lane, o[rr][0] * inv);
        if (lane + 32 < D) b2b_put(o_row + lane + 32, o[rr][1] * inv);
        if (lane == 0) lse[bh * Tq + i] = m[rr] + logf(l[rr]);
    }
}

// dk, dv of 32 keys of one (b, h): warp w owns keys w*8..w*8+7, lane holds dims lane, lane+32 of
// each; per query tile, lane (r, kk) = (lane / 8, lane % 8) computes one (row, key) pair of a
// group of 4 rows, and the warp broadcasts the 32 pairs' P*keep and dS with shuffles.
template <typename T>
__device__ __forceinline__ void flash_backward_dkdv(T* dk, T* dv, const T* q, const T* k, const T* v,
                                                    const float* key_mask, const T* out, const T* dout,
                                                    const float* lse, FA_SCALARS) {
    __shared__ float ks[FA_BK][FA_ROW];
    __shared__ float vs[FA_BK][FA_ROW];
    __shared__ float qs[FA_BQ][FA_ROW];
    __shared__ float dos[FA_BQ][FA_ROW];
    __shared__ float km[FA_BK];
    __shared__ float lse_s[FA_BQ];
    __shared__ float dsum_s[FA_BQ];
    const long long bh = blockIdx.x;
    const int b = (int)(bh / H), h = (int)(bh % H);
    const int j0 = blockIdx.y * FA_BK, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long c = (long long)H * D;
    const long long kv_off = (long long)b * Tk * ldkv + (long long)h * D;
    const T* q_bh = q + (long long)b * Tq * ldq + (long long)h * D;
    const T* dout_bh = dout + (long long)b * Tq * c + (long long)h * D;
    const T* out_bh = out + (long long)b * Tq * c + (long long)h * D;
    flash_load_rows(ks, FA_BK, k + kv_off, ldkv, j0, Tk, D);
    flash_load_rows(vs, FA_BK, v + kv_off, ldkv, j0, Tk, D);
    flash_load_mask(km, key_mask + (long long)b * Tk, j0, Tk);
    float dk_acc[FA_KPW][2] = {}, dv_acc[FA_KPW][2] = {};
    const int pair_r = lane / FA_KPW, pair_k = warp * FA_KPW + lane % FA_KPW;
    const int j = j0 + pair_k;
    for (int i0 = 0; i0 < Tq; i0 += FA_BQ) {
        __syncthreads();  // the previous query tile is no longer read
        for (int r = threadIdx.x; r < FA_BQ; r += blockDim.x) lse_s[r] = i0 + r < Tq ? lse[bh * Tq + i0 + r] : 0.0f;
        __syncthreads();
        // Causal: every key of this block comes after every row of the tile, so only rows that
        // saw no key (uniform over all keys) add anything. Block-uniform (shared lse_s).
        if (causal && i0 + FA_BQ <= j0 && !flash_any_unseen(lse_s, i0, Tq)) continue;
        flash_load_rows(qs, FA_BQ, q_bh, ldq, i0, Tq, D);
        flash_load_rows(dos, FA_BQ, dout_bh, c, i0, Tq, D);
        flash_dsum(dsum_s, dout_bh, out_bh, c, i0, Tq, D);
        __syncthreads();
        for (int g = 0; g < FA_BQ / 4; g++) {
            const int r = g * 4 + pair_r, i = i0 + r;
            float s = 0.0f, dpv = 0.0f;
            for (int d = 0; d < D; d++) {
                s += qs[r][d] * ks[pair_k][d];
                dpv += dos[r][d] * vs[pair_k][d];
            }
            float pk = 0.0f, ds = 0.0f;
            if (i < Tq && j < Tk) {
                const float p = flash_prob(flash_score(s, scale, km[pair_k], causal, i, j), lse_s[r], Tk);
                const float keep = flash_keep(seed, p_drop, bh, Tq, Tk, i, j);
                pk = p * keep;
                ds = p * (keep * dpv - dsum_s[r]);
            }
#pragma unroll
            for (int rr = 0; rr < 4; rr++) {
                const float* q_row = qs[g * 4 + rr];
                const float* do_row = dos[g * 4 + rr];
#pragma unroll
                for (int kk = 0; kk < FA_KPW; kk++) {
                    const float pkb = __shfl_sync(0xffffffffu, pk, rr * FA_KPW + kk);
                    const float dsb = __shfl_sync(0xffffffffu, ds, rr * FA_KPW + kk);
                    dv_acc[kk][0] += pkb * do_row[lane];
                    dv_acc[kk][1] += pkb * do_row[lane + 32];
                    dk_acc[kk][0] += dsb * q_row[lane];
                    dk_acc[kk][1] += dsb * q_row[lane + 32];
                }
            }
        }
    }
#pragma unroll
    for (int kk = 0; kk < FA_KPW; kk++) {
        const int jk = j0 + warp * FA_KPW + kk;
        if (jk >= Tk) continue;
        T* dk_row = dk + kv_off + (long long)jk * ldkv;
        T* dv_row = dv + kv_off + (long long)jk * ldkv;
        if (lane < D) {
            fa_store(dk_row + lane, scale * dk_acc[kk][0]);
            fa_store(dv_row + lane, dv_acc[kk][0]);
        }
        if (lane + 32 < D) {
            fa_store(dk_row + lane + 32, scale * dk_acc[kk][1]);
            fa_store(dv_row + lane + 32, dv_acc[kk][1]);
        }
    }
}

// dq of 16 query rows of one (b, h): warp w owns rows w*4..w*4+3, lane j the key j0 + lane of
// each tile, and holds dims lane, lane+32 of its rows' dq.
template <typename T>
__device__ __forceinline__ void flash_backward_dq(T* dq, const T* q, const T* k, const T* v, const float* key_mask,
                                                  const T* out, const T* dout, const float* lse, FA_SCALARS) {
    __shared__ float qs[FA_BQ][FA_ROW];
    __shared__ float dos[FA_BQ][FA_ROW];
    __shared__ float ks[FA_BK][FA_ROW];
    __shared__ float vs[FA_BK][FA_ROW];
    __shared__ float km[FA_BK];
    __shared__ float lse_s[FA_BQ];
    __shared__ float dsum_s[FA_BQ];
    const long long bh = blockIdx.x;
    const int b = (int)(bh / H), h = (int)(bh % H);
    const int i0 = blockIdx.y * FA_BQ, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long c = (long long)H * D;
    const long long q_off = (long long)b * Tq * ldq + (long long)h * D;
    const T* k_bh = k + (long long)b * Tk * ldkv + (long long)h * D;
    const T* v_bh = v + (long long)b * Tk * ldkv + (long long)h * D;
    const T* dout_bh = dout + (long long)b * Tq * c + (long long)h * D;
    flash_load_rows(qs, FA_BQ, q + q_off, ldq, i0, Tq, D);
    flash_load_rows(dos, FA_BQ, dout_bh, c, i0, Tq, D);
    flash_dsum(dsum_s, dout_bh, out + (long long)b * Tq * c + (long long)h * D, c, i0, Tq, D);
    for (int r = threadIdx.x; r < FA_BQ; r += blockDim.x) lse_s[r] = i0 + r < Tq ? lse[bh * Tq + i0 + r] : 0.0f;
    float dq_acc[FA_RPW][2] = {};
    __syncthreads();
    // Causal: keys after the block's last row add nothing, unless a row saw no key at all.
    const int j_end = causal && !flash_any_unseen(lse_s, i0, Tq) ? min(Tk, i0 + FA_BQ) : Tk;
    for (int j0 = 0; j0 < j_end; j0 += FA_BK) {
        __syncthreads();  // the previous key tile is no longer read (and the query tile is loaded)
        flash_load_rows(ks, FA_BK, k_bh, ldkv, j0, Tk, D);
        flash_load_rows(vs, FA_BK, v_bh, ldkv, j0, Tk, D);
        flash_load_mask(km, key_mask + (long long)b * Tk, j0, Tk);
        __syncthreads();
        const int j = j0 + lane;
        float s[FA_RPW] = {}, dpv[FA_RPW] = {};
        for (int d = 0; d < D; d++) {
            const float kd = ks[lane][d], vd = vs[lane][d];
#pragma unroll
            for (int rr = 0; rr < FA_RPW; rr++) {
                s[rr] += qs[warp * FA_RPW + rr][d] * kd;
                dpv[rr] += dos[warp * FA_RPW + rr][d] * vd;
            }
        }
#pragma unroll
        for (int rr = 0; rr < FA_RPW; rr++) {
            const int r = warp * FA_RPW + rr, i = i0 + r;
            float ds = 0.0f;
            if (i < Tq && j < Tk) {
                const float p = flash_prob(flash_score(s[rr], scale, km[lane], causal, i, j), lse_s[r], Tk);
                ds = p * (flash_keep(seed, p_drop, bh, Tq, Tk, i, j) * dpv[rr] - dsum_s[r]);
            }
            for (int jj = 0; jj < FA_BK; jj++) {
                const float dsb = __shfl_sync(0xffffffffu, ds, jj);
                dq_acc[rr][0] += dsb * ks[jj][lane];
                dq_acc[rr][1] += dsb * ks[jj][lane + 32];
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < FA_RPW; rr++) {
        const int i = i0 + warp * FA_RPW + rr;
        if (i >= Tq) continue;
        T* dq_row = dq + q_off + (long long)i * ldq;
        if (lane < D) b2b_put(dq_row + lane, scale * dq_acc[rr][0]);
        if (lane + 32 < D) b2b_put(dq_row + lane + 32, scale * dq_acc[rr][1]);
    }
}

extern "C" __global__ void attention_flash_forward(float* out, float* lse, const float* q, const float* k,
                                                   const float* v, const float* key_mask, FA_SCALARS) {
    flash_forward(out, lse, q, k, v, key_mask, FA_SCALAR_ARGS);
}
extern "C" __global__ void attention_flash_forward_bf16(b2b_bf16* out, float* lse, const b2b_bf16* q,
                                                        const b2b_bf16* k, const b2b_bf16* v, const float* key_mask,
                                                        FA_SCALARS) {
    flash_forward(out, lse, q, k, v, key_mask, FA_SCALAR_ARGS);
}
extern "C" __global__ void attention_flash_backward_dkdv(float* dk, float* dv, const float* q, const float* k,
                                                         const float* v, const float* key_mask, const float* out,
                                                         const float* dout, const float* lse, FA_SCALARS) {
    flash_backward_dkdv(dk, dv, q, k, v, key_mask, out, dout, lse, FA_SCALAR_ARGS);
}
extern "C" __global__ void attention_flash_backward_dkdv_bf16(b2b_bf16* dk, b2b_bf16* dv, const b2b_bf16* q,
                                                              const b2b_bf16* k, const b2b_bf16* v,
                                                              const float* key_mask, const b2b_bf16* out,
                                                              const b2b_bf16* dout, const float* lse, FA_SCALARS) {
    flash_backward_dkdv(dk, dv, q, k, v, key_mask, out, dout, lse, FA_SCALAR_ARGS);
}
extern "C" __global__ void attention_flash_backward_dq(float* dq, const float* q, const float* k, const float* v,
                                                       const float* key_mask, const float* out, const float* dout,
                                                       const float* lse, FA_SCALARS) {
    flash_backward_dq(dq, q, k, v, key_mask, out, dout, lse, FA_SCALAR_ARGS);
}
extern "C" __global__ void attention_flash_backward_dq_bf16(b2b_bf16* dq, const b2b_bf16* q, const b2b_bf16* k,
                                                            const b2b_bf16* v, const float* key_mask,
                                                            const b2b_bf16* out, const b2b_bf16* dout,
                                                            const float* lse, FA_SCALARS) {
    flash_backward_dq(dq, q, k, v, key_mask, out, dout, lse, FA_SCALAR_ARGS);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core variants (the CUDA backend's GemmPrecision::Bf16): the same kernels, tiles, grids,
// masks, dropout counters, online softmax, saved lse and fully-masked-row rule as above, but the
// dot products of each tile (S = Q K^T, dP = dO V^T, O += P V, dV += P^T dO, dK += dS^T Q,
// dQ += dS K) run as warp-wide m16n8k16 MMAs with fp32 accumulators. With float storage the
// q/k/v/dout tiles stay fp32 in shared memory and operands are rounded to bf16 when a fragment
// is loaded; with bf16 storage the tiles keep the stored bf16 bits (no conversion: they are the
// bits that rounding their widened values gives) and fragments pack them as they are. P and dS
// tiles are fp32 and rounded at the fragment either way. The softmax, exp, dropout and Dsum
// stay fp32 on CUDA cores. Head dims multiples of 16 up to 64 (the launcher falls back to
// the SIMT kernels otherwise). Results differ from the CPU's by bf16 operand rounding (~1e-2
// relative to the output's scale); each output element still has one owner and a fixed order.
// Fragment layout (g = lane / 4, t = lane % 4): see b2b_mma_bf16_16x8x16 in common.cuh.

#define FA_PROW (FA_BK + 1)              // padded shared row of a 16 x 32 tile of scores or probs
#define FA_NB (FA_DMAX / 8 / FA_WARPS)   // 8-dim output blocks per warp of a 16-row output (w, w+4)
#define FA_KNB (FA_DMAX / 8 / 2)         // 8-dim blocks per warp of a 32-key dk/dv (2 warps a key half)

// The row length of a shared operand tile of S: fp32 rows padded to FA_ROW; bf16 rows to 72
// halves (36 words), so a fragment's 8 rows x 4 word columns fall in 32 different banks.
template <typename S>
struct fa_tile {
    static const int row = FA_ROW;
};
template <>
struct fa_tile<b2b_bf16> {
    static const int row = FA_DMAX + 8;
};

// Two fragment elements in one register, `lo` in the low half: fp32 ones rounded to bf16,
// bf16 ones as stored.
__device__ __forceinline__ unsigned fa_pair(const float* lo, const float* hi) { return b2b_pack_bf16x2(*lo, *hi); }
__device__ __forceinline__ unsigned fa_pair(const b2b_bf16* lo, const b2b_bf16* hi) {
    return (unsigned)*lo | ((unsigned)*hi << 16);
}

// The A fragment of the 16x16 block at (r0, c0) of a row-major shared matrix (ld elements a row).
template <typename S>
__device__ __forceinline__ void fa_frag_a(unsigned a[4], const S* m, int ld, int r0, int c0) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const S* p0 = m + (r0 + g) * ld + c0 + 2 * t;
    const S* p1 = p0 + 8 * ld;
    a[0] = fa_pair(p0, p0 + 1);
    a[1] = fa_pair(p1, p1 + 1);
    a[2] = fa_pair(p0 + 8, p0 + 9);
    a[3] = fa_pair(p1 + 8, p1 + 9);
}

// The A fragment of the transpose: A[x][y] = m[(c0 + y) * ld + r0 + x].
template <typename S>
__device__ __forceinline__ void fa_frag_a_t(unsigned a[4], const S* m, int ld, int r0, int c0) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const S* p = m + (c0 + 2 * t) * ld + r0 + g;
    a[0] = fa_pair(p, p + ld);
    a[1] = fa_pair(p + 8, p + ld + 8);
    a[2] = fa_pair(p + 8 * ld, p + 9 * ld);
    a[3] = fa_pair(p + 8 * ld + 8, p + 9 * ld + 8);
}

// The B fragment with B[k][n] = m[(n0 + n) * ld + k0 + k]: the rows of m are B's columns (keys
// as the columns of Q K^T).
template <typename S>
__device__ __forceinline__ void fa_frag_b_rows(unsigned b[2], const S* m, int ld, int k0, int n0) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const S* p = m + (n0 + g) * ld + k0 + 2 * t;
    b[0] = fa_pair(p, p + 1);
    b[1] = fa_pair(p + 8, p + 9);
}

// The B fragment with B[k][n] = m[(k0 + k) * ld + n0 + n] (row-major K x N, as V in P V).
template <typename S>
__device__ __forceinline__ void fa_frag_b_cols(unsigned b[2], const S* m, int ld, int k0, int n0) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const S* p = m + (k0 + 2 * t) * ld + n0 + g;
    b[0] = fa_pair(p, p + ld);
    b[1] = fa_pair(p + 8 * ld, p + 9 * ld);
}

// c = rows (16 x D) . keys[n0 .. n0 + 8] (each a row of D) for the warp: a 16 x 8 block of dots.
template <typename S, int R>
__device__ __forceinline__ void fa_mma_dots(float c[4], const S (*rows)[R], const S (*keys)[R], int n0, int D) {
    c[0] = c[1] = c[2] = c[3] = 0.0f;
    for (int k0 = 0; k0 < D; k0 += 16) {
        unsigned a[4], b[2];
        fa_frag_a(a, &rows[0][0], R, 0, k0);
        fa_frag_b_rows(b, &keys[0][0], R, k0, n0);
        b2b_mma_bf16_16x8x16(c, a, b, c);
    }
}

// acc[nbi] += tile (16 x 32, row-major in shared) . src[32 keys][n-block w + 4*nbi], for the
// n-blocks of 8 dims below D that warp w owns (forward P V, backward dS K).
template <typename S, int R>
__device__ __forceinline__ void fa_mma_rows_by_keys(float acc[FA_NB][4], const float (*tile)[FA_PROW],
                                                    const S (*src)[R], int D) {
    const int warp = threadIdx.x >> 5;
    unsigned a[2][4];
    fa_frag_a(a[0], &tile[0][0], FA_PROW, 0, 0);
    fa_frag_a(a[1], &tile[0][0], FA_PROW, 0, 16);
#pragma unroll
    for (int nbi = 0; nbi < FA_NB; nbi++) {
        const int nb = warp + nbi * FA_WARPS;
        if (nb * 8 >= D) continue;  // warp-uniform
#pragma unroll
        for (int kh = 0; kh < 2; kh++) {
            unsigned b[2];
            fa_frag_b_cols(b, &src[0][0], R, kh * 16, nb * 8);
            b2b_mma_bf16_16x8x16(acc[nbi], a[kh], b, acc[nbi]);
        }
    }
}

template <typename T>
__device__ __forceinline__ void flash_forward_mma(T* out, float* lse, const T* q, const T* k, const T* v,
                                                  const float* key_mask, FA_SCALARS) {
    constexpr int R = fa_tile<T>::row;
    __shared__ T qs[FA_BQ][R];
    __shared__ T ks[FA_BK][R];
    __shared__ T vs[FA_BK][R];
    __shared__ float ps[FA_BQ][FA_PROW];  // the tile's raw dots, then its P * keep
    __shared__ float km[FA_BK];
    __shared__ float alpha_s[FA_BQ];
    __shared__ float l_s[FA_BQ];
    __shared__ int unseen;
    const long long bh = blockIdx.x;
    const int b = (int)(bh / H), h = (int)(bh % H);
    const int i0 = blockIdx.y * FA_BQ, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const long long c = (long long)H * D;
    const T* k_bh = k + (long long)b * Tk * ldkv + (long long)h * D;
    const T* v_bh = v + (long long)b * Tk * ldkv + (long long)h * D;
    flash_load_rows(qs, FA_BQ, q + (long long)b * Tq * ldq + (long long)h * D, ldq, i0, Tq, D);
    // Softmax state in the SIMT kernel's layout (warp w rows w*4.., lane = key of the tile).
    float m[FA_RPW], l[FA_RPW], o[FA_NB][4] = {};
#pragma unroll
    for (int rr = 0; rr < FA_RPW; rr++) {
        m[rr] = -3.402823466e38f;
        l[rr] = 0.0f;
    }
    int j_end = causal ? min(Tk, i0 + FA_BQ) : Tk;  // as attention_flash_forward
    for (int j0 = 0; j0 < Tk; j0 += FA_BK) {
        if (j0 >= j_end) {  // block-uniform
            __syncthreads();
            if (threadIdx.x == 0) unseen = 0;
            __syncthreads();
#pragma unroll
            for (int rr = 0; rr < FA_RPW; rr++)
                if (lane == 0 && i0 + warp * FA_RPW + rr < Tq && m[rr] == FA_MASKED) unseen = 1;
            __syncthreads();
            if (!unseen) break;
            j_end = Tk;
        }
        __syncthreads();  // the previous tile is no longer read
        flash_load_rows(ks, FA_BK, k_bh, ldkv, j0, Tk, D);
        flash_load_rows(vs, FA_BK, v_bh, ldkv, j0, Tk, D);
        flash_load_mask(km, key_mask + (long long)b * Tk, j0, Tk);
        __syncthreads();
        float dots[4];
        fa_mma_dots(dots, qs, ks, warp * 8, D);  // warp w: keys w*8 .. w*8+7 of the tile
#pragma unroll
        for (int e = 0; e < 4; e++) ps[g + (e >> 1) * 8][warp * 8 + 2 * t + (e & 1)] = dots[e];
        __syncthreads();
        const int j = j0 + lane;
#pragma unroll
        for (int rr = 0; rr < FA_RPW; rr++) {
            const int r = warp * FA_RPW + rr, i = i0 + r;
            const float x = flash_score(ps[r][lane], scale, km[lane], causal, i, j);
            const float m_new = fmaxf(m[rr], warp_max(j < Tk ? x : -3.402823466e38f));
            const float alpha = expf(m[rr] - m_new);
            const float p = j < Tk ? expf(x - m_new) : 0.0f;
            l[rr] = l[rr] * alpha + warp_sum(p);
            m[rr] = m_new;
            ps[r][lane] = (j < Tk && i < Tq) ? p * flash_keep(seed, p_drop, bh, Tq, Tk, i, j) : 0.0f;
            if (lane == 0) alpha_s[r] = alpha;
        }
        __syncthreads();
#pragma unroll
        for (int nbi = 0; nbi < FA_NB; nbi++) {
            o[nbi][0] *= alpha_s[g];
            o[nbi][1] *= alpha_s[g];
            o[nbi][2] *= alpha_s[g + 8];
            o[nbi][3] *= alpha_s[g + 8];
        }
        fa_mma_rows_by_keys(o, ps, vs, D);
    }
#pragma unroll
    for (int rr = 0; rr < FA_RPW; rr++) {
        const int r = warp * FA_RPW + rr, i = i0 + r;
        if (lane == 0) l_s[r] = l[rr];
        if (lane == 0 && i < Tq) lse[bh * Tq + i] = m[rr] + logf(l[rr]);
    }
    __syncthreads();
#pragma unroll
    for (int nbi = 0; nbi < FA_NB; nbi++) {
        const int nb = warp + nbi * FA_WARPS;
        if (nb * 8 >= D) continue;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = g + (e >> 1) * 8, i = i0 + r;
            if (i >= Tq) continue;
            const float inv = l_s[r] > 0.0f ? 1.0f / l_s[r] : 0.0f;  // no keys at all (Tk 0): out 0
            b2b_put(out + ((long long)b * Tq + i) * c + (long long)h * D + nb * 8 + 2 * t + (e & 1), o[nbi][e] * inv);
        }
    }
}

// P * keep and dS of the warp's 16 x 8 block (keys w*8 ..) of a backward tile, from its dots
// s = q.k and dpv = dout.v, into the shared 16 x 32 tiles pk_t and ds_t (0 outside Tq x Tk).
__device__ __forceinline__ void fa_backward_probs(float (*pk_t)[FA_PROW], float (*ds_t)[FA_PROW], const float s[4],
                                                  const float dpv[4], const float* km, const float* lse_s,
                                                  const float* dsum_s, long long bh, int i0, int j0, int Tq, int Tk,
                                                  int causal, float scale, float p_drop, u64 seed) {
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const int r = g + (e >> 1) * 8, col = warp * 8 + 2 * t + (e & 1);
        const int i = i0 + r, j = j0 + col;
        float pk = 0.0f, ds = 0.0f;
        if (i < Tq && j < Tk) {
            const float p = flash_prob(flash_score(s[e], scale, km[col], causal, i, j), lse_s[r], Tk);
            const float keep = flash_keep(seed, p_drop, bh, Tq, Tk, i, j);
            pk = p * keep;
            ds = p * (keep * dpv[e] - dsum_s[r]);
        }
        if (pk_t) pk_t[r][col] = pk;
        ds_t[r][col] = ds;
    }
}

// dk, dv of 32 keys of one (b, h), as attention_flash_backward_dkdv: per query tile, warp w
// computes the dots of keys w*8.. (S and dP), then dv = (P keep)^T dout and dk = dS^T q with
// warp w owning keys (w % 2)*16 .. +15 and the dim blocks w / 2, w / 2 + 2, ...
template <typename T>
__device__ __forceinline__ void flash_backward_dkdv_mma(T* dk, T* dv, const T* q, const T* k, const T* v,
                                                        const float* key_mask, const T* out, const T* dout,
                                                        const float* lse, FA_SCALARS) {
    constexpr int R = fa_tile<T>::row;
    __shared__ T ks[FA_BK][R];
    __shared__ T vs[FA_BK][R];
    __shared__ T qs[FA_BQ][R];
    __shared__ T dos[FA_BQ][R];
    __shared__ float pk_t[FA_BQ][FA_PROW];
    __shared__ float ds_t[FA_BQ][FA_PROW];
    __shared__ float km[FA_BK];
    __shared__ float lse_s[FA_BQ];
    __shared__ float dsum_s[FA_BQ];
    const long long bh = blockIdx.x;
    const int b = (int)(bh / H), h = (int)(bh % H);
    const int j0 = blockIdx.y * FA_BK, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3, key_half = warp & 1, nb0 = warp >> 1;
    const long long c = (long long)H * D;
    const long long kv_off = (long long)b * Tk * ldkv + (long long)h * D;
    const T* q_bh = q + (long long)b * Tq * ldq + (long long)h * D;
    const T* dout_bh = dout + (long long)b * Tq * c + (long long)h * D;
    const T* out_bh = out + (long long)b * Tq * c + (long long)h * D;
    flash_load_rows(ks, FA_BK, k + kv_off, ldkv, j0, Tk, D);
    flash_load_rows(vs, FA_BK, v + kv_off, ldkv, j0, Tk, D);
    flash_load_mask(km, key_mask + (long long)b * Tk, j0, Tk);
    float dk_acc[FA_KNB][4] = {}, dv_acc[FA_KNB][4] = {};
    for (int i0 = 0; i0 < Tq; i0 += FA_BQ) {
        __syncthreads();  // the previous query tile is no longer read
        for (int r = threadIdx.x; r < FA_BQ; r += blockDim.x) lse_s[r] = i0 + r < Tq ? lse[bh * Tq + i0 + r] : 0.0f;
        __syncthreads();
        if (causal && i0 + FA_BQ <= j0 && !flash_any_unseen(lse_s, i0, Tq)) continue;  // as the SIMT kernel
        flash_load_rows(qs, FA_BQ, q_bh, ldq, i0, Tq, D);
        flash_load_rows(dos, FA_BQ, dout_bh, c, i0, Tq, D);
        flash_dsum(dsum_s, dout_bh, out_bh, c, i0, Tq, D);
        __syncthreads();
        float s[4], dpv[4];
        fa_mma_dots(s, qs, ks, warp * 8, D);
        fa_mma_dots(dpv, dos, vs, warp * 8, D);
        fa_backward_probs(pk_t, ds_t, s, dpv, km, lse_s, dsum_s, bh, i0, j0, Tq, Tk, causal, scale, p_drop, seed);
        __syncthreads();
        unsigned a_pk[4], a_ds[4];  // A = (P keep)^T and dS^T: 16 keys x 16 rows
        fa_frag_a_t(a_pk, &pk_t[0][0], FA_PROW, key_half * 16, 0);
        fa_frag_a_t(a_ds, &ds_t[0][0], FA_PROW, key_half * 16, 0);
#pragma unroll
        for (int nbi = 0; nbi < FA_KNB; nbi++) {
            const int nb = nb0 + 2 * nbi;
            if (nb * 8 >= D) continue;  // warp-uniform
            unsigned bf[2];
            fa_frag_b_cols(bf, &dos[0][0], R, 0, nb * 8);
            b2b_mma_bf16_16x8x16(dv_acc[nbi], a_pk, bf, dv_acc[nbi]);
            fa_frag_b_cols(bf, &qs[0][0], R, 0, nb * 8);
            b2b_mma_bf16_16x8x16(dk_acc[nbi], a_ds, bf, dk_acc[nbi]);
        }
    }
#pragma unroll
    for (int nbi = 0; nbi < FA_KNB; nbi++) {
        const int nb = nb0 + 2 * nbi;
        if (nb * 8 >= D) continue;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int jk = j0 + key_half * 16 + g + (e >> 1) * 8;
            if (jk >= Tk) continue;
            const long long at = kv_off + (long long)jk * ldkv + nb * 8 + 2 * t + (e & 1);
            fa_store(dk + at, scale * dk_acc[nbi][e]);
            fa_store(dv + at, dv_acc[nbi][e]);
        }
    }
}

// dq of 16 query rows of one (b, h), as attention_flash_backward_dq: per key tile, warp w
// computes the dots of keys w*8.., then dq += dS k with warp w owning the dim blocks w, w + 4.
template <typename T>
__device__ __forceinline__ void flash_backward_dq_mma(T* dq, const T* q, const T* k, const T* v, const float* key_mask,
                                                      const T* out, const T* dout, const float* lse, FA_SCALARS) {
    constexpr int R = fa_tile<T>::row;
    __shared__ T qs[FA_BQ][R];
    __shared__ T dos[FA_BQ][R];
    __shared__ T ks[FA_BK][R];
    __shared__ T vs[FA_BK][R];
    __shared__ float ds_t[FA_BQ][FA_PROW];
    __shared__ float km[FA_BK];
    __shared__ float lse_s[FA_BQ];
    __shared__ float dsum_s[FA_BQ];
    const long long bh = blockIdx.x;
    const int b = (int)(bh / H), h = (int)(bh % H);
    const int i0 = blockIdx.y * FA_BQ, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const long long c = (long long)H * D;
    const long long q_off = (long long)b * Tq * ldq + (long long)h * D;
    const T* k_bh = k + (long long)b * Tk * ldkv + (long long)h * D;
    const T* v_bh = v + (long long)b * Tk * ldkv + (long long)h * D;
    const T* dout_bh = dout + (long long)b * Tq * c + (long long)h * D;
    flash_load_rows(qs, FA_BQ, q + q_off, ldq, i0, Tq, D);
    flash_load_rows(dos, FA_BQ, dout_bh, c, i0, Tq, D);
    flash_dsum(dsum_s, dout_bh, out + (long long)b * Tq * c + (long long)h * D, c, i0, Tq, D);
    for (int r = threadIdx.x; r < FA_BQ; r += blockDim.x) lse_s[r] = i0 + r < Tq ? lse[bh * Tq + i0 + r] : 0.0f;
    float dq_acc[FA_NB][4] = {};
    __syncthreads();
    const int j_end = causal && !flash_any_unseen(lse_s, i0, Tq) ? min(Tk, i0 + FA_BQ) : Tk;
    for (int j0 = 0; j0 < j_end; j0 += FA_BK) {
        __syncthreads();  // the previous key tile is no longer read (and the query tile is loaded)
        flash_load_rows(ks, FA_BK, k_bh, ldkv, j0, Tk, D);
        flash_load_rows(vs, FA_BK, v_bh, ldkv, j0, Tk, D);
        flash_load_mask(km, key_mask + (long long)b * Tk, j0, Tk);
        __syncthreads();
        float s[4], dpv[4];
        fa_mma_dots(s, qs, ks, warp * 8, D);
        fa_mma_dots(dpv, dos, vs, warp * 8, D);
        fa_backward_probs(nullptr, ds_t, s, dpv, km, lse_s, dsum_s, bh, i0, j0, Tq, Tk, causal, scale, p_drop, seed);
        __syncthreads();
        fa_mma_rows_by_keys(dq_acc, ds_t, ks, D);
    }
#pragma unroll
    for (int nbi = 0; nbi < FA_NB; nbi++) {
        const int nb = warp + nbi * FA_WARPS;
        if (nb * 8 >= D) continue;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int i = i0 + g + (e >> 1) * 8;
            if (i >= Tq) continue;
            b2b_put(dq + q_off + (long long)i * ldq + nb * 8 + 2 * t + (e & 1), scale * dq_acc[nbi][e]);
        }
    }
}

extern "C" __global__ void attention_flash_forward_mma(float* out, float* lse, const float* q, const float* k,
                                                       const float* v, const float* key_mask, FA_SCALARS) {
    flash_forward_mma(out, lse, q, k, v, key_mask, FA_SCALAR_ARGS);
}
extern "C" __global__ void attention_flash_forward_mma_bf16(b2b_bf16* out, float* lse, const b2b_bf16* q,
                                                            const b2b_bf16* k, const b2b_bf16* v,
                                                            const float* key_mask, FA_SCALARS) {
    flash_forward_mma(out, lse, q, k, v, key_mask, FA_SCALAR_ARGS);
}
extern "C" __global__ void attention_flash_backward_dkdv_mma(float* dk, float* dv, const float* q, const float* k,
                                                             const float* v, const float* key_mask, const float* out,
                                                             const float* dout, const float* lse, FA_SCALARS) {
    flash_backward_dkdv_mma(dk, dv, q, k, v, key_mask, out, dout, lse, FA_SCALAR_ARGS);
}
extern "C" __global__ void attention_flash_backward_dkdv_mma_bf16(b2b_bf16* dk, b2b_bf16* dv, const b2b_bf16* q,
                                                                  const b2b_bf16* k, const b2b_bf16* v,
                                                                  const float* key_mask, const b2b_bf16* out,
                                                                  const b2b_bf16* dout, const float* lse,
                                                                  FA_SCALARS) {
    flash_backward_dkdv_mma(dk, dv, q, k, v, key_mask, out, dout, lse, FA_SCALAR_ARGS);
}
extern "C" __global__ void attention_flash_backward_dq_mma(float* dq, const float* q, const float* k, const float* v,
                                                           const float* key_mask, const float* out,
                                                           const float* dout, const float* lse, FA_SCALARS) {
    flash_backward_dq_mma(dq, q, k, v, key_mask, out, dout, lse, FA_SCALAR_ARGS);
}
extern "C" __global__ void attention_flash_backward_dq_mma_bf16(b2b_bf16* dq, const b2b_bf16* q, const b2b_bf16* k,
                                                                const b2b_bf16* v, const float* key_mask,
                                                                const b2b_bf16* out, const b2b_bf16* dout,
                                                                const float* lse, FA_SCALARS) {
    flash_backward_dq_mma(dq, q, k, v, key_mask, out, dout, lse, FA_SCALAR_ARGS);
}
