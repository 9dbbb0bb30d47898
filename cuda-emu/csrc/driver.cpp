// The CUDA driver API subset that cudarc calls for bert2bert, over the emulated device.
// cudarc looks each symbol up by name on first use, so a function missing here panics there;
// the emulator tests drive every path the backend uses.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <sstream>

#include "runtime.h"

#define API extern "C" __attribute__((visibility("default")))

typedef unsigned long long CUdeviceptr;
typedef int CUresult;

namespace {

using namespace emu;

const int DEVICE_COUNT = 8;
struct Context {
    int device;
};
Context g_contexts[DEVICE_COUNT];
bool g_initialised = false;

// One loaded module: the PTX's entry points, each resolved to its host build.
struct Function {
    const KernelEntry* kernel;
    int max_dynamic_smem = 48 * 1024;
};
struct Module {
    std::map<std::string, Function*> functions;
};

CUresult guard() {
    if (!g_initialised) return NOT_INITIALIZED;
    return sticky();
}

bool range_ok(CUdeviceptr p, size_t bytes, const char* what) {
    if (bytes == 0 || mem_find((uintptr_t)p, bytes, nullptr)) return true;
    fail_now(INVALID_VALUE, std::string(what) + ": " + std::to_string(bytes) + " bytes at " + mem_explain((uintptr_t)p) +
                                " do not fit in one allocation");
    return false;
}

size_t ptx_type_size(const std::string& t) {
    if (t == ".u8" || t == ".s8" || t == ".b8") return 1;
    if (t == ".u16" || t == ".s16" || t == ".b16" || t == ".f16" || t == ".bf16") return 2;
    if (t == ".u32" || t == ".s32" || t == ".b32" || t == ".f32") return 4;
    if (t == ".u64" || t == ".s64" || t == ".b64" || t == ".f64") return 8;
    return 0;
}

// Parameter sizes of every `.entry` in a PTX text.
std::map<std::string, std::vector<size_t>> ptx_entries(const std::string& ptx) {
    std::map<std::string, std::vector<size_t>> out;
    size_t pos = 0;
    while ((pos = ptx.find(".entry ", pos)) != std::string::npos) {
        pos += 7;
        size_t name_end = ptx.find_first_of(" (\n\t", pos);
        std::string name = ptx.substr(pos, name_end - pos);
        size_t open = ptx.find('(', name_end), close = ptx.find(')', open);
        std::vector<size_t> sizes;
        if (open != std::string::npos && close != std::string::npos) {
            std::string params = ptx.substr(open + 1, close - open - 1);
            std::istringstream items(params);
            std::string item;
            while (std::getline(items, item, ',')) {
                std::istringstream toks(item);
                std::string tok;
                size_t size = 0, count = 1;
                while (toks >> tok) {
                    if (size_t s = ptx_type_size(tok)) size = s;
                    size_t lb = tok.find('[');
                    if (lb != std::string::npos) count = std::strtoull(tok.c_str() + lb + 1, nullptr, 10);
                }
                if (size) sizes.push_back(size * count);
            }
        }
        out[name] = sizes;
        pos = close == std::string::npos ? pos : close;
    }
    return out;
}

CUresult copy_async(uintptr_t dst, uintptr_t src, size_t bytes, void* stream) {
    enqueue(stream_get(stream), [dst, src, bytes] {
        if (!skip_bodies()) std::memmove((void*)dst, (const void*)src, bytes);
    });
    return OK;
}

}  // namespace

API CUresult cuInit(unsigned) {
    g_initialised = true;
    return OK;
}
API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return OK;
}
API CUresult cuDeviceGetCount(int* n) {
    *n = DEVICE_COUNT;
    return OK;
}
API CUresult cuDeviceGet(int* dev, int ordinal) {
    if (ordinal < 0 || ordinal >= DEVICE_COUNT) return INVALID_DEVICE;
    *dev = ordinal;
    return OK;
}
API CUresult cuDeviceGetName(char* name, int len, int dev) {
    std::snprintf(name, (size_t)len, "cuda-emu %d (virtual H100, sm_90)", dev);
    return OK;
}
API CUresult cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = MEM_TOTAL;
    return OK;
}
API CUresult cuDeviceGetUuid(unsigned char* uuid, int dev) {
    std::memset(uuid, 0, 16);
    std::memcpy(uuid, "b2b-emu", 7);
    uuid[15] = (unsigned char)dev;
    return OK;
}
API CUresult cuDeviceGetUuid_v2(unsigned char* uuid, int dev) { return cuDeviceGetUuid(uuid, dev); }

// H100 SXM limits: what launches are checked against.
API CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 1: *v = 1024; break;                 // max threads per block
        case 2: case 3: *v = 1024; break;         // max block dim x, y
        case 4: *v = 64; break;                   // max block dim z
        case 5: *v = 2147483647; break;           // max grid x
        case 6: case 7: *v = 65535; break;        // max grid y, z
        case 8: *v = 48 * 1024; break;            // static shared memory per block
        case 9: *v = 65536; break;                // constant memory
        case 10: *v = 32; break;                  // warp size
        case 12: case 82: *v = 65536; break;      // registers per block / per SM
        case 13: *v = 1980000; break;             // clock (kHz)
        case 16: *v = 132; break;                 // SMs
        case 31: case 41: case 15: *v = 1; break; // concurrent kernels, unified addressing, overlap
        case 36: *v = 2619000; break;             // memory clock (kHz)
        case 37: *v = 5120; break;                // bus width
        case 38: *v = 50 * 1024 * 1024; break;    // L2
        case 39: *v = 2048; break;                // threads per SM
        case 40: *v = 3; break;                   // copy engines
        case 75: *v = 9; break;                   // compute capability 9.0
        case 76: *v = 0; break;
        case 81: *v = 228 * 1024; break;          // shared memory per SM
        case 97: *v = 227 * 1024; break;          // opt-in shared memory per block
        case 106: *v = 32; break;                 // blocks per SM
        case 115: *v = 1; break;                  // memory pools (stream-ordered allocation)
        default: *v = 0; break;
    }
    return OK;
}
API CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) {
    if (dev < 0 || dev >= DEVICE_COUNT) return INVALID_DEVICE;
    g_contexts[dev].device = dev;
    *ctx = &g_contexts[dev];
    return OK;
}
API CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
API CUresult cuCtxSetCurrent(void*) { return OK; }
API CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = &g_contexts[0];
    return OK;
}
API CUresult cuCtxGetDevice(int* dev) {
    *dev = 0;
    return OK;
}
API CUresult cuCtxSynchronize() {
    if (CUresult r = guard()) return r;
    all_sync();
    return sticky();
}
API CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    *least = 0;
    *greatest = -5;
    return OK;
}

API CUresult cuGetErrorString(CUresult code, const char** s) {
    *s = describe(code);
    return OK;
}
API CUresult cuGetErrorName(CUresult code, const char** s) {
    static thread_local char buf[32];
    std::snprintf(buf, sizeof buf, "CUDA_ERROR_%d", code);
    *s = code == 0 ? "CUDA_SUCCESS" : buf;
    return OK;
}

// ---- memory ----------------------------------------------------------------------------------
API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    *total = MEM_TOTAL;
    *free_bytes = MEM_TOTAL - mem_used();
    return OK;
}
API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    if (CUresult r = guard()) return r;
    uintptr_t a = mem_alloc(bytes);
    if (!a) return fail_now(OUT_OF_MEMORY, "cuMemAlloc of " + std::to_string(bytes) + " bytes");
    *p = a;
    return OK;
}
// Stream-ordered allocation: the memory exists at once (legal: it is valid no later than the
// stream reaches the call).
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
API CUresult cuMemFree_v2(CUdeviceptr p) {
    all_sync();
    if (!mem_free((uintptr_t)p)) return fail_now(INVALID_VALUE, "cuMemFree of " + mem_explain((uintptr_t)p));
    return OK;
}
// Freed when the stream gets there, so kernels queued before still see the memory.
API CUresult cuMemFreeAsync(CUdeviceptr p, void* stream) {
    if (!mem_find((uintptr_t)p, 0, nullptr)) return fail_now(INVALID_VALUE, "cuMemFreeAsync of " + mem_explain(p));
    Stream* s = stream_get(stream);
    {
        std::lock_guard<std::mutex> g(s->mu);
        s->queue.push_back([p] { mem_free((uintptr_t)p); });
        s->enqueued++;
    }
    s->cv.notify_one();
    return OK;
}

// Host memory given to an async copy is pageable here, so (as CUDA does for pageable memory)
// HtoD copies it before returning and DtoH returns only when the data has arrived.
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, void* stream) {
    if (CUresult r = guard()) return r;
    if (!range_ok(dst, bytes, "cuMemcpyHtoDAsync")) return INVALID_VALUE;
    if (skip_bodies()) return copy_async(0, 0, 0, stream);  // checked and ordered, nothing copied
    auto data = std::make_shared<std::vector<unsigned char>>((const unsigned char*)src, (const unsigned char*)src + bytes);
    enqueue(stream_get(stream), [dst, data] { std::memcpy((void*)dst, data->data(), data->size()); });
    return OK;
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, void* stream) {
    if (CUresult r = guard()) return r;
    if (!range_ok(src, bytes, "cuMemcpyDtoHAsync")) return INVALID_VALUE;
    Stream* s = stream_get(stream);
    copy_async((uintptr_t)dst, (uintptr_t)src, bytes, stream);
    stream_sync(s);
    return sticky();
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, void* stream) {
    if (CUresult r = guard()) return r;
    if (!range_ok(dst, bytes, "cuMemcpyDtoDAsync dst") || !range_ok(src, bytes, "cuMemcpyDtoDAsync src"))
        return INVALID_VALUE;
    return copy_async((uintptr_t)dst, (uintptr_t)src, bytes, stream);
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    CUresult r = cuMemcpyHtoDAsync_v2(dst, src, bytes, nullptr);
    if (r) return r;
    all_sync();
    return sticky();
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    all_sync();
    return cuMemcpyDtoHAsync_v2(dst, src, bytes, nullptr);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    CUresult r = cuMemcpyDtoDAsync_v2(dst, src, bytes, nullptr);
    if (r) return r;
    all_sync();
    return sticky();
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* stream) {
    if (CUresult r = guard()) return r;
    if (!range_ok(dst, n, "cuMemsetD8Async")) return INVALID_VALUE;
    enqueue(stream_get(stream), [dst, v, n] {
        if (!skip_bodies()) std::memset((void*)dst, v, n);
    });
    return OK;
}
API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void* stream) {
    if (CUresult r = guard()) return r;
    if (dst % 4 != 0) return fail_now(MISALIGNED_ADDRESS, "cuMemsetD32Async: destination not 4-byte aligned");
    if (!range_ok(dst, n * 4, "cuMemsetD32Async")) return INVALID_VALUE;
    enqueue(stream_get(stream), [dst, v, n] {
        if (skip_bodies()) return;
        unsigned* p = (unsigned*)dst;
        for (size_t i = 0; i < n; i++) p[i] = v;
    });
    return OK;
}
API CUresult cuMemsetD16Async(CUdeviceptr dst, unsigned short v, size_t n, void* stream) {
    if (CUresult r = guard()) return r;
    if (dst % 2 != 0) return fail_now(MISALIGNED_ADDRESS, "cuMemsetD16Async: destination not 2-byte aligned");
    if (!range_ok(dst, n * 2, "cuMemsetD16Async")) return INVALID_VALUE;
    enqueue(stream_get(stream), [dst, v, n] {
        if (skip_bodies()) return;
        unsigned short* p = (unsigned short*)dst;
        for (size_t i = 0; i < n; i++) p[i] = v;
    });
    return OK;
}
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    CUresult r = cuMemsetD8Async(dst, v, n, nullptr);
    if (!r) all_sync();
    return r ? r : sticky();
}
API CUresult cuMemsetD16_v2(CUdeviceptr dst, unsigned short v, size_t n) {
    CUresult r = cuMemsetD16Async(dst, v, n, nullptr);
    if (!r) all_sync();
    return r ? r : sticky();
}
API CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) {
    CUresult r = cuMemsetD32Async(dst, v, n, nullptr);
    if (!r) all_sync();
    return r ? r : sticky();
}

// ---- streams and events ----------------------------------------------------------------------
API CUresult cuStreamCreate(void** s, unsigned) {
    if (CUresult r = guard()) return r;
    *s = stream_new("stream");
    return OK;
}
API CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
API CUresult cuStreamDestroy_v2(void* s) {
    stream_destroy(stream_get(s));
    return OK;
}
API CUresult cuStreamSynchronize(void* s) {
    stream_sync(stream_get(s));
    return sticky();
}
API CUresult cuStreamQuery(void* s) {
    Stream* st = stream_get(s);
    std::lock_guard<std::mutex> g(st->mu);
    if (Result r = sticky()) return r;
    return st->completed.load() >= st->enqueued ? OK : NOT_READY;
}
API CUresult cuStreamWaitEvent(void* s, void* ev, unsigned) {
    if (CUresult r = guard()) return r;
    std::shared_ptr<EventRecord> rec = static_cast<Event*>(ev)->rec;  // the record as of now
    if (rec) enqueue(stream_get(s), [rec] { event_wait(rec.get()); });
    return OK;
}
API CUresult cuEventCreate(void** ev, unsigned) {
    *ev = new Event();
    return OK;
}
API CUresult cuEventDestroy_v2(void* ev) {
    delete static_cast<Event*>(ev);  // pending records live on in the queue (shared_ptr)
    return OK;
}
API CUresult cuEventRecord(void* ev, void* s) {
    if (CUresult r = guard()) return r;
    event_record(static_cast<Event*>(ev), stream_get(s));
    return OK;
}
API CUresult cuEventQuery(void* ev) {
    if (Result r = sticky()) return r;
    return event_done(static_cast<Event*>(ev)->rec.get()) ? OK : NOT_READY;
}
API CUresult cuEventSynchronize(void* ev) {
    event_wait(static_cast<Event*>(ev)->rec.get());
    return sticky();
}
API CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
    auto a = static_cast<Event*>(start)->rec, b = static_cast<Event*>(end)->rec;
    if (!a || !b) return INVALID_HANDLE;
    event_wait(a.get());
    event_wait(b.get());
    *ms = (float)((b->when.load() - a->when.load()) * 1e3);
    return OK;
}
API CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }
API CUresult cuLaunchHostFunc(void* s, void (*fn)(void*), void* data) {
    if (CUresult r = guard()) return r;
    enqueue(stream_get(s), [fn, data] { fn(data); });
    return OK;
}

// ---- modules and launches --------------------------------------------------------------------
// A module is PTX from NVRTC (which still compiles every kernel, catching device-compiler
// errors); each entry point runs as the host build of the same .cu text. Entry points missing
// from the host build, or whose parameter sizes differ from the PTX, fail the load.
API CUresult cuModuleLoadData(void** module, const void* image) {
    if (CUresult r = guard()) return r;
    const std::string ptx(static_cast<const char*>(image));
    auto entries = ptx_entries(ptx);
    if (entries.empty()) return fail_now(INVALID_IMAGE, "cuModuleLoadData: no .entry in the image (PTX expected)");
    Module* m = new Module();
    for (auto& [name, sizes] : entries) {
        const KernelEntry* k = find_kernel(name);
        if (!k) {
            delete m;
            return fail_now(NOT_FOUND, "kernel `" + name + "` is in the PTX but not in the emulator's host build");
        }
        bool same = k->args.size() == sizes.size();
        for (size_t i = 0; same && i < sizes.size(); i++) same = k->args[i].size == sizes[i];
        if (!same) {
            delete m;
            return fail_now(INVALID_IMAGE, "kernel `" + name + "`: the host build's parameters differ from the PTX's");
        }
        m->functions[name] = new Function{k};
    }
    *module = m;
    return OK;
}
API CUresult cuModuleUnload(void*) { return OK; }  // functions stay valid: handles may outlive it
API CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
    Module* m = static_cast<Module*>(module);
    auto it = m->functions.find(name);
    if (it == m->functions.end()) return fail_now(NOT_FOUND, std::string("kernel `") + name + "` not in module");
    *f = it->second;
    return OK;
}
API CUresult cuFuncSetAttribute(void* f, int attr, int value) {
    if (attr == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: the opt-in
        if (value < 0 || value > 227 * 1024)
            return fail_now(INVALID_VALUE, std::string("kernel `") + static_cast<Function*>(f)->kernel->name +
                                               "`: dynamic shared memory opt-in " + std::to_string(value) +
                                               " exceeds 227 KiB");
        static_cast<Function*>(f)->max_dynamic_smem = value;
    }
    return OK;
}
API CUresult cuFuncGetAttribute(int* v, int attr, void* f) {
    switch (attr) {
        case 0: *v = 1024; break;
        case 8: *v = static_cast<Function*>(f)->max_dynamic_smem; break;
        default: *v = 0;
    }
    return OK;
}
API CUresult cuFuncSetCacheConfig(void*, int) { return OK; }

API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned smem, void* stream, void** params, void** extra) {
    if (CUresult r = guard()) return r;
    Function* fn = static_cast<Function*>(f);
    const KernelEntry* k = fn->kernel;
    std::ostringstream bad;
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (bx == 0 || by == 0 || bz == 0 || gx == 0 || gy == 0 || gz == 0) bad << "a zero grid or block dimension";
    else if (threads > 1024) bad << threads << " threads per block (at most 1024)";
    else if (bx > 1024 || by > 1024 || bz > 64) bad << "block " << bx << "x" << by << "x" << bz << " over 1024x1024x64";
    else if (gy > 65535 || gz > 65535 || gx > 2147483647u) bad << "grid " << gx << "x" << gy << "x" << gz << " over the limits";
    else if (smem > (unsigned)fn->max_dynamic_smem)
        bad << smem << " bytes of dynamic shared memory (limit " << fn->max_dynamic_smem
            << "; above 48 KiB needs cuFuncSetAttribute, at most 227 KiB)";
    else if (extra != nullptr) bad << "`extra` launch parameters are not supported";
    else if (!k->args.empty() && params == nullptr) bad << "no kernel parameters given";
    if (!bad.str().empty())
        return fail_now(INVALID_VALUE, "launch of kernel `" + std::string(k->name) + "`: " + bad.str());
    auto l = std::make_shared<Launch>();
    l->kernel = k;
    l->grid = Dim3{gx, gy, gz};
    l->block = Dim3{bx, by, bz};
    l->dyn_smem = smem;
    size_t off = 0;
    for (size_t i = 0; i < k->args.size(); i++) {
        off = (off + 7) / 8 * 8;
        l->offsets.push_back(off);
        off += k->args[i].size;
    }
    l->args.resize(off + 8);
    for (size_t i = 0; i < k->args.size(); i++) std::memcpy(&l->args[l->offsets[i]], params[i], k->args[i].size);
    enqueue(stream_get(stream), [l] { run_launch(*l); });
    return OK;
}

