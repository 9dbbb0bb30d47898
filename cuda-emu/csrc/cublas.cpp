// Emulated cuBLAS: the GEMMs bert2bert calls, with cuBLAS's exact column-major, transpose,
// leading-dimension and batch-stride semantics, queued on the handle's stream. Storage is fp32
// or bf16 (CUDA_R_16BF, for the bf16 fast path; a bf16 C is rounded once, at the end).
//
// Precision follows the compute type: CUBLAS_COMPUTE_32F multiplies fp32 exactly (fp32
// accumulation), *_FAST_16BF rounds both inputs to bf16 first and *_FAST_TF32 to tf32, then
// accumulates in fp32, as tensor cores do. With beta == 0, C is never read (so NaN there does
// not propagate), as cuBLAS documents.
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <sstream>

#include "runtime.h"

#define API extern "C" __attribute__((visibility("default")))

namespace {

using emu::enqueue;
using emu::fail_now;
using emu::mem_explain;
using emu::mem_find;
using emu::stream_get;
using emu::sticky;

enum Status { SUCCESS = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, EXECUTION_FAILED = 13, NOT_SUPPORTED = 15 };
enum DataType { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum Epilogue { EPI_DEFAULT = 1, EPI_BIAS = 4, EPI_BGRADA = 256, EPI_BGRADB = 512 };
enum Compute { C_32F = 68, C_32F_PEDANTIC = 69, C_32F_FAST_16F = 74, C_32F_FAST_16BF = 75, C_32F_FAST_TF32 = 77 };

struct Handle {
    void* stream = nullptr;
    int math_mode = 0;
};

float round_mantissa(float x, int drop_bits) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return x;  // NaN stays NaN
    const uint32_t half = 1u << (drop_bits - 1);
    u += half - 1 + ((u >> drop_bits) & 1u);  // round to nearest even
    u &= ~((1u << drop_bits) - 1);
    float y;
    std::memcpy(&y, &u, 4);
    return y;
}

struct Gemm {
    bool ta, tb;
    int m, n, k;
    float alpha, beta;
    const void* a;
    int atype, lda;
    long long sa;
    const void* b;
    int btype, ldb;
    long long sb;
    void* c;
    int ctype, ldc;
    long long sc;
    int batch;
    int round_bits;  // mantissa bits dropped from inputs: 16 for bf16, 13 for tf32, 0 for fp32
    // cuBLASLt epilogues (batch 1 only): BIAS adds bias[i] to row i of C before its one
    // rounding; BGRADA/BGRADB write bias[i] = sum_p op(A)[i, p] / bias[j] = sum_p op(B)[p, j].
    int epilogue = EPI_DEFAULT;
    void* bias = nullptr;
    int bias_type = R_32F;
};

size_t type_bytes(int t) { return t == R_32F ? 4 : 2; }

// Element `i` of a matrix stored as `type` (fp32 or bf16), widened to fp32.
float load(const void* base, int type, size_t i) {
    if (type == R_32F) return static_cast<const float*>(base)[i];
    const uint32_t bits = (uint32_t) static_cast<const uint16_t*>(base)[i] << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

void store(void* base, int type, size_t i, float v) {
    if (type == R_32F) {
        static_cast<float*>(base)[i] = v;
        return;
    }
    const float r = round_mantissa(v, 16);
    uint32_t bits;
    std::memcpy(&bits, &r, 4);
    static_cast<uint16_t*>(base)[i] = (uint16_t)(bits >> 16);
}

void run(const Gemm& g) {
    std::vector<float> at((size_t)g.m * g.k), bt((size_t)g.n * g.k);
    auto in = [&](float x) { return g.round_bits ? round_mantissa(x, g.round_bits) : x; };
    for (int q = 0; q < g.batch; q++) {
        const size_t oa = q * g.sa, ob = q * g.sb, oc = q * g.sc;
        // op(A) row i and op(B) column j, each made contiguous over k.
        for (int i = 0; i < g.m; i++)
            for (int p = 0; p < g.k; p++)
                at[(size_t)i * g.k + p] =
                    in(load(g.a, g.atype, oa + (g.ta ? p + (size_t)i * g.lda : i + (size_t)p * g.lda)));
        for (int j = 0; j < g.n; j++)
            for (int p = 0; p < g.k; p++)
                bt[(size_t)j * g.k + p] =
                    in(load(g.b, g.btype, ob + (g.tb ? j + (size_t)p * g.ldb : p + (size_t)j * g.ldb)));
        if (g.epilogue == EPI_BGRADA || g.epilogue == EPI_BGRADB) {
            const bool rows_of_a = g.epilogue == EPI_BGRADA;
            const std::vector<float>& src = rows_of_a ? at : bt;
            for (int i = 0; i < (rows_of_a ? g.m : g.n); i++) {
                float s = 0;
                for (int p = 0; p < g.k; p++) s += src[(size_t)i * g.k + p];
                store(g.bias, g.bias_type, i, s);
            }
        }
        for (int j = 0; j < g.n; j++) {
            const float* bj = &bt[(size_t)j * g.k];
            for (int i = 0; i < g.m; i++) {
                const float* ai = &at[(size_t)i * g.k];
                float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
                int p = 0;
                for (; p + 4 <= g.k; p += 4) {
                    s0 += ai[p] * bj[p];
                    s1 += ai[p + 1] * bj[p + 1];
                    s2 += ai[p + 2] * bj[p + 2];
                    s3 += ai[p + 3] * bj[p + 3];
                }
                for (; p < g.k; p++) s0 += ai[p] * bj[p];
                const float dot = (s0 + s1) + (s2 + s3);
                const size_t at_c = oc + i + (size_t)j * g.ldc;
                float v = g.beta == 0.0f ? g.alpha * dot : g.alpha * dot + g.beta * load(g.c, g.ctype, at_c);
                if (g.epilogue == EPI_BIAS) v += load(g.bias, g.bias_type, i);
                store(g.c, g.ctype, at_c, v);
            }
        }
    }
}

// Bytes an operand spans: `rows x cols` column-major with leading dimension `ld`.
size_t span(int rows, int cols, int ld, long long stride, int batch, int type) {
    if (rows == 0 || cols == 0 || batch == 0) return 0;
    return ((size_t)(cols - 1) * ld + rows + (size_t)(batch - 1) * stride) * type_bytes(type);
}

Status check_operand(const char* name, const void* p, int type, int rows, int cols, int ld, long long stride,
                     int batch, std::string* why) {
    std::ostringstream o;
    const size_t bytes = span(rows, cols, ld, stride, batch, type);
    if (ld < std::max(1, rows)) o << name << ": leading dimension " << ld << " < " << rows << " rows";
    else if ((uintptr_t)p % type_bytes(type) != 0) o << name << ": misaligned for its type";
    else if (!mem_find((uintptr_t)p, bytes, nullptr))
        o << name << ": " << bytes << " bytes at " << mem_explain((uintptr_t)p) << " do not fit in one allocation";
    *why = o.str();
    return why->empty() ? SUCCESS : INVALID_VALUE;
}

}  // namespace

API int cublasCreate_v2(Handle** h) {
    *h = new Handle();
    return SUCCESS;
}
API int cublasDestroy_v2(Handle* h) {
    delete h;
    return SUCCESS;
}
API int cublasSetStream_v2(Handle* h, void* s) {
    h->stream = s;
    return SUCCESS;
}
API int cublasGetStream_v2(Handle* h, void** s) {
    *s = h->stream;
    return SUCCESS;
}
API int cublasSetMathMode(Handle* h, int mode) {
    h->math_mode = mode;
    return SUCCESS;
}
API int cublasGetMathMode(Handle* h, int* mode) {
    *mode = h->math_mode;
    return SUCCESS;
}
API int cublasSetWorkspace_v2(Handle*, void*, size_t) { return SUCCESS; }

API int cublasGemmStridedBatchedEx(Handle* h, int transa, int transb, int m, int n, int k, const void* alpha,
                                   const void* A, int atype, int lda, long long sa, const void* B, int btype, int ldb,
                                   long long sb, const void* beta, void* C, int ctype, int ldc, long long sc, int batch,
                                   int compute, int /*algo*/) {
    std::string why;
    if (sticky() != emu::OK) return EXECUTION_FAILED;
    auto storage = [](int t) { return t == R_32F || t == R_16BF; };
    if (!storage(atype) || !storage(btype) || !storage(ctype) || atype != btype) {
        fail_now(emu::NOT_SUPPORTED, "cublasGemmStridedBatchedEx: emulated storage is CUDA_R_32F or CUDA_R_16BF, "
                                     "with A and B of one type");
        return NOT_SUPPORTED;
    }
    int bits = 0;
    if (compute == C_32F_FAST_16BF || atype == R_16BF) bits = 16;
    else if (compute == C_32F_FAST_TF32) bits = 13;
    else if (compute != C_32F && compute != C_32F_PEDANTIC) {
        fail_now(emu::NOT_SUPPORTED, "cublasGemmStridedBatchedEx: compute type " + std::to_string(compute) + " not emulated");
        return NOT_SUPPORTED;
    }
    if (m < 0 || n < 0 || k < 0 || batch < 0 || transa > 2 || transb > 2) return INVALID_VALUE;
    if (m == 0 || n == 0 || batch == 0) return SUCCESS;
    const bool ta = transa != 0, tb = transb != 0;
    const bool bad_inputs = k > 0 && (check_operand("A", A, atype, ta ? k : m, ta ? m : k, lda, sa, batch, &why) ||
                                      check_operand("B", B, btype, tb ? n : k, tb ? k : n, ldb, sb, batch, &why));
    if (bad_inputs || check_operand("C", C, ctype, m, n, ldc, sc, batch, &why)) {
        fail_now(emu::INVALID_VALUE, "cublasGemmStridedBatchedEx (m " + std::to_string(m) + ", n " + std::to_string(n) +
                                         ", k " + std::to_string(k) + ", batch " + std::to_string(batch) + "): " + why);
        return INVALID_VALUE;
    }
    Gemm g{ta, tb, m, n, k, *(const float*)alpha, *(const float*)beta, A, atype, lda, sa, B, btype, ldb, sb,
           C, ctype, ldc, sc, batch, bits};
    // Cost-model mode still checks and orders the call, but does not multiply.
    enqueue(stream_get(h->stream), [g] {
        if (!emu::skip_bodies()) run(g);
    });
    return SUCCESS;
}

API int cublasGemmEx(Handle* h, int transa, int transb, int m, int n, int k, const void* alpha, const void* A, int atype,
                     int lda, const void* B, int btype, int ldb, const void* beta, void* C, int ctype, int ldc,
                     int compute, int algo) {
    return cublasGemmStridedBatchedEx(h, transa, transb, m, n, k, alpha, A, atype, lda, 0, B, btype, ldb, 0, beta, C,
                                      ctype, ldc, 0, 1, compute, algo);
}
API int cublasSgemm_v2(Handle* h, int transa, int transb, int m, int n, int k, const float* alpha, const float* A,
                       int lda, const float* B, int ldb, const float* beta, float* C, int ldc) {
    return cublasGemmStridedBatchedEx(h, transa, transb, m, n, k, alpha, A, R_32F, lda, 0, B, R_32F, ldb, 0, beta, C,
                                      R_32F, ldc, 0, 1, C_32F, -1);
}

// ---- cuBLASLt: the subset bert2bert calls (cublasLtMatmul with the BIAS, BGRADA and BGRADB
// epilogues), on the same engine as cublasGemmStridedBatchedEx. Column-major layouts only; C and
// D must be one matrix (D = alpha op(A) op(B) + beta C in place). Anything else is refused with
// NOT_SUPPORTED and a message, never approximated.
namespace {

struct LtHandle {
    int unused = 0;
};
struct LtDesc {
    int compute, scale;
    int transa = 0, transb = 0;
    int epilogue = EPI_DEFAULT;
    void* bias = nullptr;
    int bias_type = -1;  // -1: the type of D, as cuBLASLt defaults
};
struct LtLayout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
    int batch = 1;
    int64_t stride = 0;
};
struct LtPref {
    size_t workspace = 0;
};
// cublasLtMatmulHeuristicResult_t's layout.
struct LtHeuristic {
    uint64_t algo[8];
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};

template <typename T>
bool read_attr(const void* buf, size_t size, T* out) {
    if (size != sizeof(T)) return false;
    std::memcpy(out, buf, sizeof(T));
    return true;
}

int lt_refuse(const std::string& what) {
    fail_now(emu::NOT_SUPPORTED, what);
    return NOT_SUPPORTED;
}

// B2B_EMU_CUBLASLT_REFUSE=heuristic|matmul: behave as a cuBLASLt with no kernel for epilogues,
// found by the heuristic or only when the matmul is queued, so tests can drive the callers'
// fallbacks (a real GPU's cuBLASLt may do either).
bool lt_refuses(const char* where, int epilogue) {
    const char* v = std::getenv("B2B_EMU_CUBLASLT_REFUSE");
    return v && epilogue != EPI_DEFAULT && std::strcmp(v, where) == 0;
}

}  // namespace

API int cublasLtCreate(LtHandle** h) {
    *h = new LtHandle();
    return SUCCESS;
}
API int cublasLtDestroy(LtHandle* h) {
    delete h;
    return SUCCESS;
}
API int cublasLtMatmulDescCreate(LtDesc** d, int compute, int scale) {
    *d = new LtDesc{compute, scale};
    return SUCCESS;
}
API int cublasLtMatmulDescDestroy(LtDesc* d) {
    delete d;
    return SUCCESS;
}
API int cublasLtMatmulDescSetAttribute(LtDesc* d, int attr, const void* buf, size_t size) {
    int32_t v32 = 0;
    bool ok = false;
    switch (attr) {
        case 2: ok = read_attr(buf, size, &v32) && v32 == 0; break;  // POINTER_MODE: host scalars only
        case 3: ok = read_attr(buf, size, &d->transa); break;
        case 4: ok = read_attr(buf, size, &d->transb); break;
        case 7: ok = read_attr(buf, size, &d->epilogue); break;
        case 8: ok = read_attr(buf, size, &d->bias); break;
        case 26: ok = read_attr(buf, size, &d->bias_type); break;
        default: return lt_refuse("cublasLtMatmulDescSetAttribute: attribute " + std::to_string(attr) + " not emulated");
    }
    if (!ok) return lt_refuse("cublasLtMatmulDescSetAttribute: attribute " + std::to_string(attr) + ": bad size or value");
    return SUCCESS;
}
API int cublasLtMatrixLayoutCreate(LtLayout** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    *l = new LtLayout{type, rows, cols, ld};
    return SUCCESS;
}
API int cublasLtMatrixLayoutDestroy(LtLayout* l) {
    delete l;
    return SUCCESS;
}
API int cublasLtMatrixLayoutSetAttribute(LtLayout* l, int attr, const void* buf, size_t size) {
    int32_t order = 0;
    bool ok = false;
    switch (attr) {
        case 1: ok = read_attr(buf, size, &order) && order == 0; break;  // ORDER: column-major only
        case 5: ok = read_attr(buf, size, &l->batch) && l->batch >= 0; break;
        case 6: ok = read_attr(buf, size, &l->stride); break;
        default: return lt_refuse("cublasLtMatrixLayoutSetAttribute: attribute " + std::to_string(attr) + " not emulated");
    }
    if (!ok) return lt_refuse("cublasLtMatrixLayoutSetAttribute: attribute " + std::to_string(attr) + ": bad size or value");
    return SUCCESS;
}
API int cublasLtMatmulPreferenceCreate(LtPref** p) {
    *p = new LtPref();
    return SUCCESS;
}
API int cublasLtMatmulPreferenceDestroy(LtPref* p) {
    delete p;
    return SUCCESS;
}
API int cublasLtMatmulPreferenceSetAttribute(LtPref* p, int attr, const void* buf, size_t size) {
    if (attr == 1 && read_attr(buf, size, &p->workspace)) return SUCCESS;  // MAX_WORKSPACE_BYTES
    return SUCCESS;  // search preferences do not change what the emulator computes
}
// One algorithm, needing no workspace: the emulator has a single engine.
API int cublasLtMatmulAlgoGetHeuristic(LtHandle*, LtDesc* d, LtLayout*, LtLayout*, LtLayout*, LtLayout*, LtPref*,
                                       int requested, LtHeuristic* results, int* count) {
    if (requested < 1) return INVALID_VALUE;
    if (lt_refuses("heuristic", d->epilogue)) {
        *count = 0;
        return NOT_SUPPORTED;
    }
    std::memset(&results[0], 0, sizeof(LtHeuristic));
    results[0].waves = 1.0f;
    *count = 1;
    return SUCCESS;
}

API int cublasLtMatmul(LtHandle*, LtDesc* d, const void* alpha, const void* A, LtLayout* la, const void* B,
                       LtLayout* lb, const void* beta, const void* C, LtLayout* lc, void* D, LtLayout* ld,
                       const void* /*algo*/, void* /*workspace*/, size_t /*workspace_size*/, void* stream) {
    if (sticky() != emu::OK) return EXECUTION_FAILED;
    auto storage = [](int t) { return t == R_32F || t == R_16BF; };
    if (!storage(la->type) || !storage(lb->type) || !storage(ld->type) || la->type != lb->type)
        return lt_refuse("cublasLtMatmul: emulated storage is CUDA_R_32F or CUDA_R_16BF, with A and B of one type");
    if (C != D || lc->type != ld->type || lc->rows != ld->rows || lc->cols != ld->cols || lc->ld != ld->ld)
        return lt_refuse("cublasLtMatmul: only in-place C == D (one pointer, one layout) is emulated");
    const int ep = d->epilogue;
    if (lt_refuses("matmul", ep)) return lt_refuse("cublasLtMatmul: no kernel for this epilogue (B2B_EMU_CUBLASLT_REFUSE)");
    if (ep != EPI_DEFAULT && ep != EPI_BIAS && ep != EPI_BGRADA && ep != EPI_BGRADB)
        return lt_refuse("cublasLtMatmul: epilogue " + std::to_string(ep) + " not emulated");
    int bits = 0;
    if (d->compute == C_32F_FAST_16BF || la->type == R_16BF) bits = 16;
    else if (d->compute == C_32F_FAST_TF32) bits = 13;
    else if (d->compute != C_32F && d->compute != C_32F_PEDANTIC)
        return lt_refuse("cublasLtMatmul: compute type " + std::to_string(d->compute) + " not emulated");
    const bool ta = d->transa != 0, tb = d->transb != 0;
    const int m = (int)ld->rows, n = (int)ld->cols;
    const int k = (int)(ta ? la->rows : la->cols);
    const int batch = ld->batch;
    std::string why;
    auto shape = [&] {
        return " (m " + std::to_string(m) + ", n " + std::to_string(n) + ", k " + std::to_string(k) + ", batch " +
               std::to_string(batch) + ")";
    };
    const bool a_fits = (int)(ta ? la->cols : la->rows) == m, b_fits = (int)(tb ? lb->rows : lb->cols) == n &&
                                                                   (int)(tb ? lb->cols : lb->rows) == k;
    if (!a_fits || !b_fits || la->batch != batch || lb->batch != batch) {
        fail_now(emu::INVALID_VALUE, "cublasLtMatmul: layouts of A, B and D disagree" + shape());
        return INVALID_VALUE;
    }
    if (m == 0 || n == 0 || batch == 0) return SUCCESS;
    if (ep != EPI_DEFAULT && batch != 1) return lt_refuse("cublasLtMatmul: epilogues are emulated for batch 1 only");
    const bool bad_inputs =
        k > 0 && (check_operand("A", A, la->type, (int)la->rows, (int)la->cols, (int)la->ld, la->stride, batch, &why) ||
                  check_operand("B", B, lb->type, (int)lb->rows, (int)lb->cols, (int)lb->ld, lb->stride, batch, &why));
    if (bad_inputs || check_operand("D", D, ld->type, m, n, (int)ld->ld, ld->stride, batch, &why)) {
        fail_now(emu::INVALID_VALUE, "cublasLtMatmul" + shape() + ": " + why);
        return INVALID_VALUE;
    }
    const int bias_type = d->bias_type < 0 ? ld->type : d->bias_type;
    if (ep != EPI_DEFAULT) {
        const int len = ep == EPI_BGRADB ? n : m;
        if (!storage(bias_type)) return lt_refuse("cublasLtMatmul: bias type " + std::to_string(bias_type));
        if (check_operand("bias", d->bias, bias_type, len, 1, len, 0, 1, &why)) {
            fail_now(emu::INVALID_VALUE, "cublasLtMatmul" + shape() + ": " + why);
            return INVALID_VALUE;
        }
    }
    Gemm g{ta, tb, m, n, k, *(const float*)alpha, *(const float*)beta, A, la->type, (int)la->ld, la->stride, B,
           lb->type, (int)lb->ld, lb->stride, D, ld->type, (int)ld->ld, ld->stride, batch, bits, ep, d->bias,
           bias_type};
    enqueue(stream_get(stream), [g] {
        if (!emu::skip_bodies()) run(g);
    });
    return SUCCESS;
}
