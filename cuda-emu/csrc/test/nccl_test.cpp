// Standalone test of cuda-emu/csrc/nccl.cpp: ranks are forked processes, the emu runtime is a
// small fake (one real queue thread per stream; mem_find accepts every range).
// Build and run from the repository root:
//   g++ -std=c++17 -O1 -pthread -I cuda-emu/csrc cuda-emu/csrc/nccl.cpp cuda-emu/csrc/test/nccl_test.cpp -o /tmp/nccl_test && /tmp/nccl_test
// (or cuda-emu/csrc/test/run_nccl_test.sh). Exits non-zero, naming each failed check, on failure.
#include <dirent.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "runtime.h"

// ---- the fake runtime ---------------------------------------------------------------------
namespace emu {
static Stream* make_stream(const char* name) {
    Stream* s = new Stream;
    s->name = name;
    s->worker = std::thread([s] {
        for (;;) {
            std::function<void()> op;
            {
                std::unique_lock<std::mutex> lk(s->mu);
                s->cv.wait(lk, [s] { return !s->queue.empty(); });
                op = std::move(s->queue.front());
                s->queue.pop_front();
            }
            op();
            s->completed.fetch_add(1);
        }
    });
    s->worker.detach();
    return s;
}
Stream* stream_get(void* handle) {
    static Stream* dflt = make_stream("default");
    return handle ? static_cast<Stream*>(handle) : dflt;
}
void enqueue(Stream* s, std::function<void()> op) {
    std::lock_guard<std::mutex> lk(s->mu);
    s->queue.push_back(std::move(op));
    s->enqueued++;
    s->cv.notify_all();
}
bool mem_find(uintptr_t, size_t, Alloc*) { return true; }
std::string mem_explain(uintptr_t p) { return "fake mem_explain(" + std::to_string(p) + ")"; }
}  // namespace emu

// ---- the API under test -------------------------------------------------------------------
typedef struct EmuComm* ncclComm_t;
typedef struct {
    char internal[128];
} ncclUniqueId;
enum { ncclSuccess, ncclUnhandledCudaError, ncclSystemError, ncclInternalError, ncclInvalidArgument,
       ncclInvalidUsage, ncclRemoteError, ncclInProgress, ncclTimeout };
enum { ncclInt8, ncclUint8, ncclInt32, ncclUint32, ncclInt64, ncclUint64, ncclFloat16, ncclFloat32, ncclFloat64,
       ncclBfloat16 };
enum { ncclSum, ncclProd, ncclMax, ncclMin, ncclAvg };
extern "C" {
int ncclGetUniqueId(ncclUniqueId*);
int ncclCommInitRank(ncclComm_t*, int, ncclUniqueId, int);
int ncclCommFinalize(ncclComm_t);
int ncclCommDestroy(ncclComm_t);
int ncclCommAbort(ncclComm_t);
int ncclCommGetAsyncError(ncclComm_t, int*);
int ncclCommCount(ncclComm_t, int*);
int ncclCommUserRank(ncclComm_t, int*);
int ncclCommCuDevice(ncclComm_t, int*);
int ncclAllReduce(const void*, void*, size_t, int, int, ncclComm_t, void*);
int ncclBroadcast(const void*, void*, size_t, int, int, ncclComm_t, void*);
int ncclReduceScatter(const void*, void*, size_t, int, int, ncclComm_t, void*);
int ncclAllGather(const void*, void*, size_t, int, ncclComm_t, void*);
const char* ncclGetLastError(ncclComm_t);
}

// ---- helpers ------------------------------------------------------------------------------
static int g_failures = 0;
#define CHECK(cond, ...)                                                                      \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "FAILED [pid %d] %s:%d: %s: ", getpid(), __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                                     \
            fprintf(stderr, "\n");                                                            \
            g_failures++;                                                                     \
        }                                                                                     \
    } while (0)

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Waits until the stream has run everything queued; false after `limit` seconds.
static bool drain(void* stream, double limit) {
    emu::Stream* s = emu::stream_get(stream);
    double t0 = now_s();
    for (;;) {
        uint64_t want;
        {
            std::lock_guard<std::mutex> lk(s->mu);
            want = s->enqueued;
        }
        if (s->completed.load() >= want) return true;
        if (now_s() - t0 > limit) return false;
        usleep(200);
    }
}

// Deterministic inputs: rank `r`'s values for test `t`, with magnitudes that make float sums
// depend on their order.
static uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
static std::vector<float> gen(int t, int r, size_t n) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) {
        uint64_t h = mix(uint64_t(t) * 1000003u + uint64_t(r) * 7919u + i);
        v[i] = float(double(h >> 11) / 9007199254740992.0 * 2 - 1) * float(1 << (h % 11));
    }
    return v;
}
static uint16_t bf16_trunc(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return uint16_t(u >> 16);
}
static float bf16_value(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
// Round to nearest bf16, ties to even, by comparing the two neighbours (finite inputs only).
static uint16_t bf16_nearest(float f) {
    uint16_t lo = bf16_trunc(f), hi = uint16_t(lo + 1);
    double dl = std::fabs(double(f) - double(bf16_value(lo))), dh = std::fabs(double(bf16_value(hi)) - double(f));
    if (dl < dh) return lo;
    if (dh < dl) return hi;
    return (lo & 1) ? hi : lo;
}
template <class T> static std::vector<unsigned char> bytes_of(const std::vector<T>& v) {
    std::vector<unsigned char> b(v.size() * sizeof(T));
    memcpy(b.data(), v.data(), b.size());
    return b;
}

// Forks one process per rank running fn(rank); returns their pids.
template <class F> static std::vector<pid_t> spawn(int n, F fn) {
    std::vector<pid_t> pids;
    fflush(nullptr);
    for (int r = 0; r < n; r++) {
        pid_t p = fork();
        if (p == 0) {
            g_failures = 0;  // count this rank's own
            int failures = fn(r);
            fflush(nullptr);
            _exit(failures ? 1 : 0);  // _exit: the detached stream threads must not meet exit()
        }
        pids.push_back(p);
    }
    return pids;
}
static void reap(pid_t p, const char* what) {
    int st = 0;
    waitpid(p, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "%s (pid %d) failed (wait status %d)", what, p, st);
}

static std::string g_base;  // B2B_EMU_NCCL_DIR for the whole test
static std::string g_dir;   // the rendezvous directory of the collectives test
static std::string dir_of(const ncclUniqueId& id) {
    return g_base + "/b2bemu-nccl-" + std::string(id.internal + 12, 32);
}
static std::vector<std::string> list_dir(const std::string& d) {
    std::vector<std::string> out;
    if (DIR* dp = opendir(d.c_str())) {
        while (dirent* e = readdir(dp))
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) out.push_back(e->d_name);
        closedir(dp);
    }
    return out;
}

// ---- the collectives test: 3 ranks --------------------------------------------------------
constexpr int kRanks = 3, kTests = 11;
constexpr size_t kSlot = 8192;
struct Shared {
    size_t len[kRanks][kTests];
    unsigned char data[kRanks][kTests][kSlot];
};
static Shared* g_shared;

static void keep(int r, int t, const void* p, size_t len) {
    g_shared->len[r][t] = len;
    memcpy(g_shared->data[r][t], p, len);
}

static int rank_main(int r, const ncclUniqueId& id) {
    ncclComm_t comm = nullptr;
    CHECK(ncclCommInitRank(&comm, kRanks, id, r) == ncclSuccess, "init rank %d: %s", r, ncclGetLastError(nullptr));
    if (!comm) return 1;
    int v = -1;
    CHECK(ncclCommCount(comm, &v) == ncclSuccess && v == kRanks, "count %d", v);
    CHECK(ncclCommUserRank(comm, &v) == ncclSuccess && v == r, "rank %d", v);
    CHECK(ncclCommCuDevice(comm, &v) == ncclSuccess && v == 0, "device %d", v);
    const size_t n = 1001;
    std::vector<float> a0 = gen(0, r, n), o0(n, -9), a1 = gen(1, r, n), a2 = gen(2, r, n), o2(n, -9);
    std::vector<float> a3 = gen(3, r, 777);
    std::vector<float> a4 = gen(4, r, 999), o4(333, -9), a5 = gen(5, r, 999), a6 = gen(6, r, 257), o6(771, -9);
    std::vector<float> a7(771, -5.0f), t7 = gen(7, r, 257);
    std::copy(t7.begin(), t7.end(), a7.begin() + r * 257);
    std::vector<uint16_t> a8(n), o8(n, 0);
    std::vector<float> t8 = gen(8, r, n);
    for (size_t i = 0; i < n; i++) a8[i] = bf16_trunc(t8[i]);
    std::vector<int32_t> a9(n), o9(n, 0);
    for (size_t i = 0; i < n; i++) a9[i] = int32_t(mix(9000 + r * 5000 + i));
    std::vector<double> a10(n), o10(n, 0);
    std::vector<float> t10 = gen(10, r, n);
    for (size_t i = 0; i < n; i++) a10[i] = double(t10[i]) / 3.0;

    emu::Stream* second = emu::make_stream("second");
    CHECK(ncclAllReduce(a0.data(), o0.data(), n, ncclFloat32, ncclSum, comm, nullptr) == 0, "allreduce sum");
    CHECK(ncclAllReduce(a1.data(), a1.data(), n, ncclFloat32, ncclAvg, comm, nullptr) == 0, "allreduce avg");
    CHECK(ncclAllReduce(a1.data(), a1.data(), n, ncclFloat16, ncclSum, comm, nullptr) == ncclInvalidArgument,
          "float16 reduction must be refused");
    CHECK(ncclBroadcast(a2.data(), o2.data(), n, ncclFloat32, 1, comm, nullptr) == 0, "broadcast");
    CHECK(ncclBroadcast(a3.data(), a3.data(), 777, ncclFloat32, 1, comm, nullptr) == 0, "broadcast in place");
    CHECK(ncclReduceScatter(a4.data(), o4.data(), 333, ncclFloat32, ncclAvg, comm, nullptr) == 0, "reduce-scatter");
    CHECK(ncclReduceScatter(a5.data(), a5.data() + r * 333, 333, ncclFloat32, ncclAvg, comm, nullptr) == 0,
          "reduce-scatter in place");
    CHECK(ncclAllGather(a6.data(), o6.data(), 257, ncclFloat32, comm, nullptr) == 0, "all-gather");
    CHECK(ncclAllGather(a7.data() + r * 257, a7.data(), 257, ncclFloat32, comm, nullptr) == 0, "all-gather in place");
    CHECK(ncclAllReduce(a8.data(), o8.data(), n, ncclBfloat16, ncclSum, comm, nullptr) == 0, "bf16 sum");
    // On another stream: still runs after the ops before it, in call order.
    CHECK(ncclAllReduce(a9.data(), o9.data(), n, ncclInt32, ncclMax, comm, second) == 0, "int32 max");
    CHECK(ncclAllReduce(a10.data(), o10.data(), n, ncclFloat64, ncclSum, comm, nullptr) == 0, "f64 sum");
    CHECK(drain(nullptr, 30) && drain(second, 30), "streams did not drain");
    // Many small ops: each result right, and old op files deleted as it goes (at most 2 per rank).
    const int kMany = 300;
    std::vector<int64_t> many(kMany * 3), many_out(kMany * 3, 0);
    for (int i = 0; i < kMany * 3; i++) many[i] = int64_t(i) * 1000 + r;
    double t0 = now_s();
    for (int i = 0; i < kMany; i++)
        CHECK(ncclAllReduce(&many[i * 3], &many_out[i * 3], 3, ncclInt64, ncclSum, comm, nullptr) == 0, "op %d", i);
    CHECK(drain(nullptr, 60), "many ops did not drain");
    if (r == 0) printf("%d small all-reduces: %.1f us each\n", kMany, (now_s() - t0) / kMany * 1e6);
    for (int i = 0; i < kMany * 3; i++)
        CHECK(many_out[i] == int64_t(i) * 3000 + 3, "many[%d] = %lld", i, (long long)many_out[i]);
    int own_ops = 0;
    for (const std::string& f : list_dir(g_dir))
        own_ops += f.compare(0, 3, "op-") == 0 && f.size() > 2 && f.substr(f.size() - 2) == "-" + std::to_string(r);
    CHECK(own_ops <= 2, "rank %d has %d op files in the directory, want <= 2", r, own_ops);
    int err = -1;
    CHECK(ncclCommGetAsyncError(comm, &err) == 0 && err == ncclSuccess, "async error %d: %s", err,
          ncclGetLastError(comm));
    keep(r, 0, o0.data(), n * 4);
    keep(r, 1, a1.data(), n * 4);
    keep(r, 2, o2.data(), n * 4);
    keep(r, 3, a3.data(), 777 * 4);
    keep(r, 4, o4.data(), 333 * 4);
    keep(r, 5, a5.data() + r * 333, 333 * 4);
    keep(r, 6, o6.data(), 771 * 4);
    keep(r, 7, a7.data(), 771 * 4);
    keep(r, 8, o8.data(), n * 2);
    keep(r, 9, o9.data(), n * 4);
    keep(r, 10, o10.data(), n * 8);
    CHECK(ncclCommFinalize(comm) == ncclSuccess, "finalize: %s", ncclGetLastError(comm));
    CHECK(ncclCommDestroy(comm) == ncclSuccess, "destroy");
    return g_failures;
}

// The expected bytes of test t on rank r (the same on every rank, except reduce-scatter's chunk).
static std::vector<unsigned char> expected(int t, int r) {
    const size_t n = 1001;
    auto fsum = [](int t, size_t n, size_t off, size_t len, bool avg) {
        std::vector<float> in[kRanks], out(len);
        for (int q = 0; q < kRanks; q++) in[q] = gen(t, q, n);
        for (size_t i = 0; i < len; i++) {
            float s = in[0][off + i];
            for (int q = 1; q < kRanks; q++) s = s + in[q][off + i];
            out[i] = avg ? s / float(kRanks) : s;
        }
        return out;
    };
    std::vector<float> f;
    switch (t) {
    case 0: return bytes_of(fsum(0, n, 0, n, false));
    case 1: return bytes_of(fsum(1, n, 0, n, true));
    case 4:
    case 5: return bytes_of(fsum(t, 999, r * 333, 333, true));
    case 2: return bytes_of(gen(2, 1, n));
    case 3: return bytes_of(gen(3, 1, 777));
    case 6:
    case 7:
        for (int q = 0; q < kRanks; q++) {
            std::vector<float> c = gen(t, q, 257);
            f.insert(f.end(), c.begin(), c.end());
        }
        return bytes_of(f);
    case 8: {  // inputs are bf16 (truncated floats); the sum is fp32, rounded once
        std::vector<float> in[kRanks];
        for (int q = 0; q < kRanks; q++) in[q] = gen(8, q, n);
        std::vector<uint16_t> out(n);
        for (size_t i = 0; i < n; i++) {
            float s = bf16_value(bf16_trunc(in[0][i]));
            for (int q = 1; q < kRanks; q++) s = s + bf16_value(bf16_trunc(in[q][i]));
            out[i] = bf16_nearest(s);
        }
        return bytes_of(out);
    }
    case 9: {
        std::vector<int32_t> out(n);
        for (size_t i = 0; i < n; i++) {
            out[i] = int32_t(mix(9000 + i));
            for (int q = 1; q < kRanks; q++) out[i] = std::max(out[i], int32_t(mix(9000 + q * 5000 + i)));
        }
        return bytes_of(out);
    }
    case 10: {
        std::vector<float> in[kRanks];
        for (int q = 0; q < kRanks; q++) in[q] = gen(10, q, n);
        std::vector<double> out(n);
        for (size_t i = 0; i < n; i++) {
            out[i] = double(in[0][i]) / 3.0;
            for (int q = 1; q < kRanks; q++) out[i] = out[i] + double(in[q][i]) / 3.0;
        }
        return bytes_of(out);
    }
    }
    return {};
}

static void test_collectives() {
    ncclUniqueId id;
    CHECK(ncclGetUniqueId(&id) == 0 && memcmp(id.internal, "b2bemu-nccl:", 12) == 0, "unique id");
    g_dir = dir_of(id);
    void* shared = mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    g_shared = static_cast<Shared*>(shared);
    double t0 = now_s();
    for (pid_t p : spawn(kRanks, [&](int r) { return rank_main(r, id); })) reap(p, "collectives rank");
    printf("collectives: 3 ranks, %d collectives each, %.2f s\n", kTests, now_s() - t0);
    for (int t = 0; t < kTests; t++) {
        for (int r = 0; r < kRanks; r++) {
            std::vector<unsigned char> want = expected(t, r);
            size_t len = g_shared->len[r][t];
            CHECK(len == want.size() && memcmp(g_shared->data[r][t], want.data(), len) == 0,
                  "test %d rank %d: result differs from the reference (%zu vs %zu bytes)", t, r, len, want.size());
            if (t != 4 && t != 5 && r > 0)
                CHECK(memcmp(g_shared->data[r][t], g_shared->data[0][t], len) == 0, "test %d: rank %d != rank 0", t, r);
        }
    }
    struct stat st;
    CHECK(stat(dir_of(id).c_str(), &st) != 0 && errno == ENOENT, "rendezvous dir %s still exists after "
          "finalize+destroy", dir_of(id).c_str());
    munmap(g_shared, sizeof(Shared));
}

// ---- failures -----------------------------------------------------------------------------
// Rank 1 dies after init; rank 0's all-reduce must report ncclRemoteError, and abort must free
// the stuck stream op, leaving recv unchanged. The parent reaps rank 0 first, so rank 1 stays
// a zombie meanwhile (kill(pid, 0) still succeeds on one).
static int dead_peer_rank0(const ncclUniqueId& id) {
    ncclComm_t comm = nullptr;
    CHECK(ncclCommInitRank(&comm, 2, id, 0) == ncclSuccess, "init: %s", ncclGetLastError(nullptr));
    if (!comm) return 1;
    std::vector<float> in(1001, 7.0f), out(1001, 1.0f);
    CHECK(ncclAllReduce(in.data(), out.data(), in.size(), ncclFloat32, ncclSum, comm, nullptr) == 0, "enqueue");
    int err = ncclSuccess;
    double t0 = now_s();
    while (now_s() - t0 < 5 && ncclCommGetAsyncError(comm, &err) == 0 && err == ncclSuccess) usleep(2000);
    CHECK(err == ncclRemoteError, "async error %d after %.2f s, want ncclRemoteError", err, now_s() - t0);
    printf("dead peer: ncclRemoteError after %.3f s: %s\n", now_s() - t0, ncclGetLastError(comm));
    CHECK(strstr(ncclGetLastError(comm), "rank 1 (pid ") && strstr(ncclGetLastError(comm), "is gone"), "message: %s",
          ncclGetLastError(comm));
    CHECK(!drain(nullptr, 0.3), "the op must stay stuck until abort");
    CHECK(ncclCommAbort(comm) == ncclSuccess, "abort");
    CHECK(drain(nullptr, 2), "the stream op did not return after abort");
    for (float v : out) CHECK(v == 1.0f, "recv changed: %g", v);
    return g_failures;
}

static void test_dead_peer() {
    ncclUniqueId id;
    ncclGetUniqueId(&id);
    std::vector<pid_t> p = spawn(2, [&](int r) {
        if (r == 0) return dead_peer_rank0(id);
        ncclComm_t comm;
        if (ncclCommInitRank(&comm, 2, id, 1) != ncclSuccess) return 1;
        _exit(0);  // dies without a word, before its collective
    });
    reap(p[0], "dead-peer rank 0");
    reap(p[1], "dead-peer rank 1");
    // Only the dead rank's file may remain: rank 0 removed its own and nobody removes others'.
    std::vector<std::string> left = list_dir(dir_of(id));
    CHECK(left.size() == 1 && left[0] == "rank-1", "after abort the dir holds %zu files (%s...)", left.size(),
          left.empty() ? "" : left[0].c_str());
    for (const std::string& f : left) unlink((dir_of(id) + "/" + f).c_str());
    rmdir(dir_of(id).c_str());
}

// The mismatch case's ranks meet here after each has seen its error and before either aborts:
// abort removes a rank's op files, so a peer still waiting for them (a slow fork on a busy
// machine) would see the rank leave (ncclRemoteError) instead of the mismatch. Marker files are
// named after the test process (the parent), which removes them after reaping both ranks.
static std::string marker(int r) { return "/tmp/b2b-nccl-test-" + std::to_string(getppid()) + "-seen-" + std::to_string(r); }
static void meet_peer(int r) {
    if (FILE* f = fopen(marker(r).c_str(), "w")) fclose(f);
    struct stat st;
    double t0 = now_s();
    while (now_s() - t0 < 10 && stat(marker(1 - r).c_str(), &st) != 0) usleep(1000);
}

// Rank 1 aborts instead of joining the collective: rank 0 sees it leave (ncclRemoteError).
// Then two ranks that issue different collectives: both get ncclInvalidUsage.
static int abort_or_mismatch_rank(int r, const ncclUniqueId& id, bool mismatch) {
    ncclComm_t comm = nullptr;
    CHECK(ncclCommInitRank(&comm, 2, id, r) == ncclSuccess, "init: %s", ncclGetLastError(nullptr));
    if (!comm) return 1;
    std::vector<float> buf(100, 1.0f);
    if (!mismatch && r == 1) {
        usleep(500 * 1000);  // let rank 0 finish init first: it must still see our rank file
        CHECK(ncclCommAbort(comm) == ncclSuccess, "abort");
        usleep(1000 * 1000);  // stay alive: rank 0 must see us leave, not die
        return g_failures;
    }
    size_t count = mismatch ? 90 + r : 100;
    CHECK(ncclAllReduce(buf.data(), buf.data(), count, ncclFloat32, ncclSum, comm, nullptr) == 0, "enqueue");
    int err = ncclSuccess, want = mismatch ? ncclInvalidUsage : ncclRemoteError;
    double t0 = now_s();
    while (now_s() - t0 < 5 && ncclCommGetAsyncError(comm, &err) == 0 && err == ncclSuccess) usleep(2000);
    CHECK(err == want, "%s: async error %d, want %d", mismatch ? "mismatch" : "peer abort", err, want);
    const char* msg = ncclGetLastError(comm);
    CHECK(strstr(msg, mismatch ? "differs between ranks" : "left the communicator"), "message: %s", msg);
    if (mismatch) meet_peer(r);
    CHECK(ncclCommFinalize(comm) == want, "finalize must report the async error");
    CHECK(ncclCommAbort(comm) == ncclSuccess, "abort");
    CHECK(drain(nullptr, 2), "the stream op did not return after abort");
    return g_failures;
}

static void test_abort_and_mismatch() {
    for (bool mismatch : {false, true}) {
        ncclUniqueId id;
        ncclGetUniqueId(&id);
        for (pid_t p : spawn(2, [&](int r) { return abort_or_mismatch_rank(r, id, mismatch); }))
            reap(p, mismatch ? "mismatch rank" : "peer-abort rank");
        for (int r = 0; r < 2; r++) unlink(("/tmp/b2b-nccl-test-" + std::to_string(getpid()) + "-seen-" + std::to_string(r)).c_str());
        struct stat st;
        CHECK(stat(dir_of(id).c_str(), &st) != 0, "dir %s left behind", dir_of(id).c_str());
    }
}

static void test_init_errors() {
    ncclUniqueId bad;
    memset(&bad, 0, sizeof bad);
    strcpy(bad.internal, "not-an-emulator-id");
    ncclComm_t comm = nullptr;
    CHECK(ncclCommInitRank(&comm, 2, bad, 0) == ncclInvalidArgument, "a foreign id must be refused");
    ncclUniqueId id;
    ncclGetUniqueId(&id);
    CHECK(ncclCommInitRank(&comm, 2, id, 2) == ncclInvalidArgument, "rank out of range");
    setenv("B2B_EMU_NCCL_INIT_TIMEOUT_S", "1", 1);
    double t0 = now_s();
    CHECK(ncclCommInitRank(&comm, 2, id, 0) == ncclSystemError, "init without a peer must time out");
    CHECK(now_s() - t0 < 3, "init timeout took %.1f s", now_s() - t0);
    CHECK(strstr(ncclGetLastError(nullptr), "rank(s) 1 of 2"), "message: %s", ncclGetLastError(nullptr));
    struct stat st;
    CHECK(stat(dir_of(id).c_str(), &st) != 0, "dir left behind after a failed init");
    // A rank taken by a live process is refused.
    setenv("B2B_EMU_NCCL_INIT_TIMEOUT_S", "2", 1);
    std::vector<pid_t> p = spawn(1, [&](int) {
        ncclComm_t c;
        return ncclCommInitRank(&c, 2, id, 0) == ncclSystemError ? 0 : 1;
    });
    std::string rank0 = dir_of(id) + "/rank-0";
    for (int i = 0; i < 1000 && stat(rank0.c_str(), &st) != 0; i++) usleep(1000);
    CHECK(ncclCommInitRank(&comm, 2, id, 0) == ncclInvalidUsage, "a rank taken by a live process must be refused");
    reap(p[0], "rank-taken child");
    unsetenv("B2B_EMU_NCCL_INIT_TIMEOUT_S");
}

int main() {
    char tmpl[] = "/tmp/b2bemu-nccl-test.XXXXXX";
    if (!mkdtemp(tmpl)) return perror("mkdtemp"), 2;
    g_base = tmpl;
    setenv("B2B_EMU_NCCL_DIR", tmpl, 1);
    test_init_errors();
    test_collectives();
    test_dead_peer();
    test_abort_and_mismatch();
    std::vector<std::string> left = list_dir(g_base);
    CHECK(left.empty(), "%zu entries left in %s (first: %s)", left.size(), tmpl, left.empty() ? "" : left[0].c_str());
    rmdir(tmpl);
    if (g_failures) {
        fprintf(stderr, "nccl_test: %d check(s) failed in the parent (children report their own)\n", g_failures);
        return 1;
    }
    printf("nccl_test: all passed\n");
    return 0;
}
