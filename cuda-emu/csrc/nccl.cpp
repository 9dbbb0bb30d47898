// The emulator's libnccl: the NCCL C API for ranks that are separate processes on one machine.
//
// Transport: files. ncclGetUniqueId makes a text id, "b2bemu-nccl:" + 32 random hex digits, that
// names a rendezvous directory <base>/b2bemu-nccl-<hex> (base: $B2B_EMU_NCCL_DIR, else /dev/shm
// when writable, else $TMPDIR or /tmp; every rank computes the same base). Each rank writes
// `rank-<r>` ("<pid> <start time> <pid namespace>") and init waits until all ranks' files exist.
//
// Collectives: each call takes the communicator's next sequence number s at call time and
// enqueues the work on the caller's stream, so it runs in stream order like a kernel. On the
// stream thread, op s waits until this communicator's op s-1 has finished (ops on different
// streams still run in call order), writes this rank's contribution to `op-<s>-<r>` (a 64-byte
// header naming the collective, then the raw bytes; written to a temporary name and renamed,
// so a visible file is always complete), waits for every peer's `op-<s>-<p>`, maps them and
// computes the result into recv. The header lets a rank that issued a different collective
// than its peers at the same position fail with ncclInvalidUsage instead of mixing data.
// Reductions add ranks 0..n-1 in order (then avg divides by n), so every rank computes the
// same bits; bfloat16 is reduced in fp32 and rounded to nearest even once at the end.
// Every op waits for all peers' files, even where it needs none of their data (a broadcast's
// root), so every op is a barrier: the deletion rule below depends on that.
//
// Deletion: at the start of op s a rank deletes its own `op-<s-2>-<r>`. Safe: this rank got
// past op s-1, which needed every peer's `op-<s-1>-<p>`; a peer writes that file only when its
// own op s-1 starts, which is after its op s-2 (the only reader of `op-<s-2>-<r>`) finished.
// Finalize deletes the rest after a barrier: it waits for every op of this rank, writes
// `fin-<r>`, and waits until each peer has `fin-<p>` or has left (its rank file is gone). A peer
// writes `fin-<p>` only after all its ops finished, so then nobody needs our op files; we delete
// them, then `fin-<r>`, then `rank-<r>` (in that order, so a peer still in its barrier sees one
// of the two), then rmdir the directory, which succeeds for the last rank out. A rank only ever
// deletes files it wrote, and never deletes recursively.
//
// Failures: a rank waiting in an op checks its missing peers every 50 ms. A dead peer (kill(pid,
// 0) says ESRCH, or /proc shows a zombie or a newer process with that pid; peers in another pid
// namespace are not checked) or one whose rank file vanished (it aborted) sets the
// communicator's async error to ncclRemoteError once, with a message for ncclGetLastError and
// stderr; after $B2B_EMU_NCCL_TIMEOUT_S (default 1800) of waiting the error is ncclTimeout. The
// op keeps waiting, as a real NCCL kernel stays stuck, until ncclCommAbort sets the abort flag;
// every wait polls with 200 us - 1 ms naps and checks that flag, so it returns within about a
// millisecond and leaves recv unchanged. The enqueued work holds a shared_ptr to the
// communicator, so abort or destroy never frees memory an op still uses. A rank that dies
// leaves its files behind: the survivors do not delete them, and init refuses a rank whose file
// is already there (each communicator needs a fresh id).
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <unordered_map>

#include "nccl_reduce.h"
#include "runtime.h"

typedef struct EmuComm* ncclComm_t;
typedef struct { char internal[128]; } ncclUniqueId;
enum ncclResult_t : int {
    ncclSuccess, ncclUnhandledCudaError, ncclSystemError, ncclInternalError, ncclInvalidArgument, ncclInvalidUsage,
    ncclRemoteError, ncclInProgress, ncclTimeout
};

namespace {
using namespace nccl_reduce;
enum : uint32_t { kAllReduce = 1, kBroadcast, kReduceScatter, kAllGather };
const char kIdPrefix[] = "b2bemu-nccl:";
const size_t kIdPrefixLen = sizeof(kIdPrefix) - 1;
using Clock = std::chrono::steady_clock;

// What one collective call asked for; every rank's must match at the same sequence number.
struct OpDesc {
    uint32_t kind, dtype, redop;
    int32_t root;
    uint64_t count;  // the API's count argument (recvcount for reduce-scatter, sendcount for all-gather)
};
struct FileHeader {
    char magic[8];
    uint64_t seq;
    OpDesc op;
    uint64_t payload;  // bytes after the header
    char pad[16];
};
static_assert(sizeof(FileHeader) == 64, "op file header is 64 bytes");
}  // namespace

struct EmuComm {
    int rank = 0, nranks = 0;
    std::string dir;
    std::vector<long> pids;                  // by rank
    std::vector<unsigned long long> starts;  // process start times from /proc, 0 when unknown
    std::vector<char> visible;               // the peer's pid is in our pid namespace: liveness checks work
    std::atomic<bool> joined{false};         // our files may exist: dropping the comm removes them
    std::atomic<bool> aborted{false}, finalized{false};
    std::atomic<int> async_err{ncclSuccess};
    std::mutex mu;  // guards async_msg
    std::string async_msg;
    std::atomic<uint64_t> issued{0};  // sequence numbers handed out (host side, at call time)
    std::atomic<uint64_t> done{0};    // ops finished or given up (stream side)
    ~EmuComm();
};

namespace {

// ---- errors and handles -------------------------------------------------------------------
struct Globals {
    std::mutex mu;
    std::string last_error;
    std::unordered_map<EmuComm*, std::shared_ptr<EmuComm>> comms;  // live handles
};
Globals& g() {
    static Globals* g = new Globals;  // never destroyed: stream threads may outlive static destructors
    return *g;
}

std::string vformat(const char* fmt, va_list ap) {
    char buf[1024];
    vsnprintf(buf, sizeof buf, fmt, ap);
    return buf;
}

// A synchronous error: printed, kept for ncclGetLastError, returned.
__attribute__((format(printf, 2, 3))) ncclResult_t fail(ncclResult_t code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string msg = vformat(fmt, ap);
    va_end(ap);
    fprintf(stderr, "[cuda-emu] nccl: %s\n", msg.c_str());
    std::lock_guard<std::mutex> lk(g().mu);
    g().last_error = msg;
    return code;
}

// The communicator's asynchronous error: the first one wins and is printed, once.
__attribute__((format(printf, 3, 4))) void set_async(EmuComm& c, ncclResult_t code, const char* fmt, ...) {
    std::lock_guard<std::mutex> lk(c.mu);
    if (c.async_err.load() != ncclSuccess) return;
    va_list ap;
    va_start(ap, fmt);
    c.async_msg = vformat(fmt, ap);
    va_end(ap);
    c.async_err.store(code);
    fprintf(stderr, "[cuda-emu] nccl: rank %d: %s\n", c.rank, c.async_msg.c_str());
}

std::shared_ptr<EmuComm> lookup(ncclComm_t comm, bool remove = false) {
    std::lock_guard<std::mutex> lk(g().mu);
    auto it = g().comms.find(comm);
    if (it == g().comms.end()) return nullptr;
    std::shared_ptr<EmuComm> c = it->second;
    if (remove) g().comms.erase(it);
    return c;
}

// ---- small helpers ------------------------------------------------------------------------
double env_seconds(const char* name, double dflt) {
    const char* v = getenv(name);
    char* end = nullptr;
    double s = v ? strtod(v, &end) : 0;
    return (v && *v && *end == 0 && s > 0) ? s : dflt;
}
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
// The poll interval: 200 us for the first few milliseconds of a wait, then 1 ms.
void nap(unsigned i) { usleep(i < 20 ? 200 : 1000); }
bool exists(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0;
}
std::string file(const EmuComm& c, const char* kind, int rank) {
    return c.dir + "/" + kind + "-" + std::to_string(rank);
}
std::string op_file(const EmuComm& c, uint64_t seq, int rank) {
    return c.dir + "/op-" + std::to_string(seq) + "-" + std::to_string(rank);
}
// "1, 2": the ranks with have[p] == 0.
std::string missing(const std::vector<char>& have) {
    std::string s;
    for (size_t p = 0; p < have.size(); p++)
        if (!have[p]) s += (s.empty() ? "" : ", ") + std::to_string(p);
    return s;
}

bool writable_dir(const char* p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode) && access(p, W_OK | X_OK) == 0;
}
std::string base_dir() {
    const char* e = getenv("B2B_EMU_NCCL_DIR");
    if (e && *e) return e;
    if (writable_dir("/dev/shm")) return "/dev/shm";
    const char* t = getenv("TMPDIR");
    return (t && *t) ? t : "/tmp";
}
bool mkdir_p(const std::string& path) {
    for (size_t i = 1; i <= path.size(); i++)
        if ((i == path.size() || path[i] == '/') && mkdir(path.substr(0, i).c_str(), 0700) != 0 && errno != EEXIST)
            return false;
    return writable_dir(path.c_str());
}

bool write_all(int fd, const void* data, size_t len) {
    for (const char* p = static_cast<const char*>(data); len > 0;) {
        ssize_t w = write(fd, p, std::min(len, size_t(1) << 30));
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        p += w;
        len -= size_t(w);
    }
    return true;
}

// Writes `path` atomically: header and data to this rank's temporary file, then rename.
bool write_atomic(const EmuComm& c, const std::string& path, const void* hdr, size_t hlen, const void* data,
                  size_t len, std::string* why) {
    std::string tmp = c.dir + "/.tmp-" + std::to_string(c.rank) + "-" + path.substr(c.dir.size() + 1);
    int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    bool ok = fd >= 0 && write_all(fd, hdr, hlen) && write_all(fd, data, len);
    int err = errno;
    if (fd >= 0 && close(fd) != 0 && ok) ok = false, err = errno;
    if (ok && rename(tmp.c_str(), path.c_str()) != 0) ok = false, err = errno;
    if (!ok) {
        unlink(tmp.c_str());
        *why = "writing " + path + " (" + std::to_string(hlen + len) + " bytes) failed: " + strerror(err) +
               " (B2B_EMU_NCCL_DIR can name a directory with more room)";
    }
    return ok;
}

// Deletes every file this rank wrote (op files and temporaries, then fin-<r>, then rank-<r>: that
// order matters to the finalize barrier), then the directory if it is empty now.
void remove_own_files(const EmuComm& c) {
    std::string tmp_prefix = ".tmp-" + std::to_string(c.rank) + "-";
    std::vector<std::string> mine;
    if (DIR* d = opendir(c.dir.c_str())) {
        while (struct dirent* e = readdir(d)) {
            unsigned long long s;
            int r = -1, end = 0;
            bool op = sscanf(e->d_name, "op-%llu-%d%n", &s, &r, &end) == 2 && e->d_name[end] == 0 && r == c.rank;
            if (op || strncmp(e->d_name, tmp_prefix.c_str(), tmp_prefix.size()) == 0) mine.push_back(e->d_name);
        }
        closedir(d);
    }
    for (const std::string& n : mine) unlink((c.dir + "/" + n).c_str());
    unlink(file(c, "fin", c.rank).c_str());
    unlink(file(c, "rank", c.rank).c_str());
    rmdir(c.dir.c_str());
}

// ---- processes ----------------------------------------------------------------------------
// State letter and start time (field 22) of a process, from /proc/<pid>/stat.
bool proc_stat(long pid, char* state, unsigned long long* start) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
    if (fd >= 0) close(fd);
    if (n <= 0) return false;
    buf[n] = 0;
    char* p = strrchr(buf, ')');  // the command name may hold spaces and parentheses
    if (!p || p[1] != ' ') return false;
    *state = p[2];
    p += 3;
    for (int field = 4; field < 22 && p; field++) p = strchr(p + 1, ' ');
    return p && sscanf(p, " %llu", start) == 1;
}

// True when the process that wrote a rank file has exited (or its pid now names another one).
// A zombie counts as gone: kill(pid, 0) still succeeds on one until its parent reaps it.
bool pid_gone(long pid, unsigned long long start) {
    if (kill(pid_t(pid), 0) != 0 && errno == ESRCH) return true;
    char st;
    unsigned long long t;
    if (!proc_stat(pid, &st, &t)) return false;  // no /proc: kill() alone decides
    return st == 'Z' || st == 'X' || (start != 0 && t != start);
}

// "pid:[4026531836]": ranks in other pid namespaces (containers) cannot be checked for liveness.
std::string pid_namespace() {
    char buf[64] = {0};
    return readlink("/proc/self/ns/pid", buf, sizeof buf - 1) > 0 ? buf : "?";
}

// A rank file holds "<pid> <start time> <pid namespace>".
bool read_rank_file(const std::string& path, long* pid, unsigned long long* start, char* visible) {
    FILE* f = fopen(path.c_str(), "re");
    if (!f) return false;
    char ns[64] = "";
    *start = 0;
    bool ok = fscanf(f, "%ld %llu %63s", pid, start, ns) >= 1 && *pid > 0;
    fclose(f);
    *visible = pid_namespace() == ns;
    return ok;
}

// ---- init ---------------------------------------------------------------------------------
bool parse_id(const ncclUniqueId& id, std::string* hex) {
    if (memcmp(id.internal, kIdPrefix, kIdPrefixLen) != 0) return false;
    const char* h = id.internal + kIdPrefixLen;
    for (int i = 0; i < 32; i++)
        if (!isxdigit(static_cast<unsigned char>(h[i]))) return false;
    *hex = std::string(h, 32);
    return h[32] == 0;
}

// Waits until every rank's rank file exists and records the peers' pids.
ncclResult_t wait_ranks(EmuComm& c) {
    const double limit = env_seconds("B2B_EMU_NCCL_INIT_TIMEOUT_S", 120);
    const auto t0 = Clock::now();
    std::vector<char> have(c.nranks, 0);
    for (unsigned i = 0;; i++) {
        bool all = true;
        for (int p = 0; p < c.nranks; p++) {
            if (!have[p]) have[p] = read_rank_file(file(c, "rank", p), &c.pids[p], &c.starts[p], &c.visible[p]);
            all = all && have[p];
        }
        if (all) return ncclSuccess;
        if (since(t0) > limit)
            return fail(ncclSystemError, "ncclCommInitRank: rank %d timed out after %.0f s "
                        "(B2B_EMU_NCCL_INIT_TIMEOUT_S) waiting for rank(s) %s of %d to join %s", c.rank, limit,
                        missing(have).c_str(), c.nranks, c.dir.c_str());
        usleep(i < 100 ? 1000 : 2000);
    }
}

ncclResult_t init_rank(ncclComm_t* out, int nranks, const ncclUniqueId& id, int rank) {
    if (!out) return fail(ncclInvalidArgument, "ncclCommInitRank: comm is NULL");
    *out = nullptr;
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return fail(ncclInvalidArgument, "ncclCommInitRank: rank %d of %d ranks is out of range", rank, nranks);
    std::string hex;
    if (!parse_id(id, &hex))
        return fail(ncclInvalidArgument, "ncclCommInitRank: the unique id is not \"%s\" and 32 hex digits: make it "
                    "with this library's ncclGetUniqueId", kIdPrefix);
    auto c = std::make_shared<EmuComm>();
    c->rank = rank;
    c->nranks = nranks;
    c->dir = base_dir() + "/b2bemu-nccl-" + hex;
    c->pids.assign(nranks, 0);
    c->starts.assign(nranks, 0);
    c->visible.assign(nranks, 0);
    if (!mkdir_p(c->dir))
        return fail(ncclSystemError, "ncclCommInitRank: cannot create %s: %s", c->dir.c_str(), strerror(errno));
    const std::string mine = file(*c, "rank", rank);
    // A rank file there already: its owner is live (two processes claim one rank), or it died and
    // left op files of an earlier communicator that peers would read as ours. Either way, refuse.
    long pid;
    unsigned long long start;
    char visible, st;
    if (read_rank_file(mine, &pid, &start, &visible))
        return fail(ncclInvalidUsage, "ncclCommInitRank: rank %d of %s is already taken by %s process %ld (each "
                    "communicator needs a fresh unique id)", rank, c->dir.c_str(),
                    visible && pid_gone(pid, start) ? "exited" : "live", pid);
    if (!proc_stat(getpid(), &st, &start)) start = 0;
    std::string text = std::to_string(getpid()) + " " + std::to_string(start) + " " + pid_namespace() + "\n", why;
    c->joined = true;  // from here on, dropping `c` removes what we wrote
    if (!write_atomic(*c, mine, text.data(), text.size(), nullptr, 0, &why))
        return fail(ncclSystemError, "ncclCommInitRank: %s", why.c_str());
    if (ncclResult_t r = wait_ranks(*c)) return r;
    std::lock_guard<std::mutex> lk(g().mu);
    g().comms[c.get()] = c;
    *out = c.get();
    return ncclSuccess;
}

// ---- waiting for peers --------------------------------------------------------------------
// Polls `ready` (which sets have[p] for each peer that is in) until it returns true -> true, or
// the communicator is aborted -> false. Missing peers are checked every 50 ms: a dead one is the
// async error ncclRemoteError, and so (except for the finalize barrier, `host_side`, where
// leaving is fine) is one whose rank file is gone; waiting past $B2B_EMU_NCCL_TIMEOUT_S is
// ncclTimeout. A stream op keeps waiting after an error, until abort; a host-side wait returns.
template <class Ready>
bool wait_peers(EmuComm& c, const char* what, std::vector<char>& have, Ready ready, bool host_side) {
    const double limit = env_seconds("B2B_EMU_NCCL_TIMEOUT_S", 1800);
    const auto t0 = Clock::now();
    auto checked = t0;
    for (unsigned i = 0;; i++) {
        if (c.aborted.load()) return false;
        if (ready()) return true;
        if (host_side && c.async_err.load() != ncclSuccess) return false;
        if (Clock::now() - checked >= std::chrono::milliseconds(50)) {
            checked = Clock::now();
            std::vector<std::pair<int, const char*>> lost;  // (rank, what happened to it)
            for (int p = 0; p < c.nranks; p++) {
                if (have[p]) continue;
                if (c.visible[p] && pid_gone(c.pids[p], c.starts[p]))
                    lost.push_back({p, "is gone: its process exited"});
                else if (!host_side && !exists(file(c, "rank", p)))
                    lost.push_back({p, "left the communicator (aborted or destroyed it)"});
            }
            if (!lost.empty() && ready()) return true;  // it got in meanwhile
            for (auto [p, how] : lost)
                if (!have[p])
                    set_async(c, ncclRemoteError, "rank %d (pid %ld) %s while rank %d waited for it in %s", p,
                              c.pids[p], how, c.rank, what);
        }
        if (since(t0) > limit)
            set_async(c, ncclTimeout, "%s waited %.0f s (B2B_EMU_NCCL_TIMEOUT_S) for rank(s) %s", what, limit,
                      missing(have).c_str());
        nap(i);
    }
}

// ---- collectives: the stream side ---------------------------------------------------------
const char* kind_name(uint32_t k) {
    static const char* names[] = {"?", "ncclAllReduce", "ncclBroadcast", "ncclReduceScatter", "ncclAllGather"};
    return names[k <= kAllGather ? k : 0];
}
size_t dtype_size(uint32_t t) {
    static const size_t sizes[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2};
    return t <= kBfloat16 ? sizes[t] : 0;
}
// Bytes rank p contributes to op d: all of its send buffer (only the root's, for a broadcast).
size_t payload_of(const EmuComm& c, const OpDesc& d, int p) {
    size_t b = d.count * dtype_size(d.dtype);
    if (d.kind == kBroadcast) return p == d.root ? b : 0;
    return d.kind == kReduceScatter ? b * size_t(c.nranks) : b;
}

struct Mapping {
    void* base = MAP_FAILED;
    size_t len = 0;
    ~Mapping() {
        if (base != MAP_FAILED) munmap(base, len);
    }
};

// Maps peer p's file of op `seq` into m: ncclSuccess, or ncclInProgress while it is not there
// yet, or an error (ncclInvalidUsage: the peer issued another collective) that `why` explains.
ncclResult_t map_peer(const EmuComm& c, uint64_t seq, const OpDesc& d, int p, Mapping* m, std::string* why) {
    std::string path = op_file(c, seq, p);
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) return ncclInProgress;
    struct stat st;
    m->len = fd >= 0 && fstat(fd, &st) == 0 ? size_t(st.st_size) : 0;
    if (m->len >= sizeof(FileHeader)) m->base = mmap(nullptr, m->len, PROT_READ, MAP_SHARED, fd, 0);
    int err = errno;
    if (fd >= 0) close(fd);
    if (m->base == MAP_FAILED) return *why = "reading " + path + " failed: " + strerror(err), ncclSystemError;
    FileHeader h;
    memcpy(&h, m->base, sizeof h);
    const OpDesc& o = h.op;
    if (memcmp(h.magic, "b2bop01", 8) == 0 && h.seq == seq && o.kind == d.kind && o.dtype == d.dtype &&
        o.redop == d.redop && o.root == d.root && o.count == d.count && h.payload == payload_of(c, d, p) &&
        m->len == sizeof h + h.payload)
        return ncclSuccess;
    char buf[512];
    snprintf(buf, sizeof buf, "collective #%llu differs between ranks: rank %d issued %s(count %llu, dtype %u, op %u, "
             "root %d), rank %d issued %s(count %llu, dtype %u, op %u, root %d); all ranks must issue the same "
             "collectives in the same order", (unsigned long long)seq, p, kind_name(o.kind),
             (unsigned long long)o.count, o.dtype, o.redop, o.root, c.rank, kind_name(d.kind),
             (unsigned long long)d.count, d.dtype, d.redop, d.root);
    return *why = buf, ncclInvalidUsage;
}

// src[p]: rank p's contribution (this rank's is its send buffer itself).
void compute(const EmuComm& c, const OpDesc& d, std::vector<const unsigned char*>& src, unsigned char* recv) {
    const size_t b = d.count * dtype_size(d.dtype);
    switch (d.kind) {
    case kAllReduce: return reduce(int(d.dtype), int(d.redop), c.nranks, d.count, src.data(), recv);
    case kReduceScatter:
        for (auto& s : src) s += size_t(c.rank) * b;
        return reduce(int(d.dtype), int(d.redop), c.nranks, d.count, src.data(), recv);
    case kBroadcast:
        if (b && recv != src[d.root]) memmove(recv, src[d.root], b);
        return;
    case kAllGather:  // own chunk first: in place, send is recv's chunk `rank`
        if (b && recv + size_t(c.rank) * b != src[c.rank]) memmove(recv + size_t(c.rank) * b, src[c.rank], b);
        for (int p = 0; p < c.nranks; p++)
            if (p != c.rank && b) memcpy(recv + size_t(p) * b, src[p], b);
        return;
    }
}

void exchange_and_compute(EmuComm& c, uint64_t seq, const OpDesc& d, const unsigned char* send, unsigned char* recv) {
    const int n = c.nranks;
    std::vector<const unsigned char*> src(n, send);
    std::vector<Mapping> maps(n);
    if (n > 1) {
        if (seq >= 2) unlink(op_file(c, seq - 2, c.rank).c_str());  // safe: see the header comment
        FileHeader h{};
        memcpy(h.magic, "b2bop01", 8);
        h.seq = seq;
        h.op = d;
        h.payload = payload_of(c, d, c.rank);
        std::string why, mine = op_file(c, seq, c.rank);
        if (!write_atomic(c, mine, &h, sizeof h, send, h.payload, &why)) {
            set_async(c, ncclSystemError, "%s", why.c_str());
            for (unsigned i = 20; !c.aborted.load(); i++) nap(i);  // stuck until abort, like a kernel
            return;
        }
        // An abort that listed the directory before the rename missed this file: remove it here.
        if (c.aborted.load()) return (void)unlink(mine.c_str());
        std::vector<char> have(n, 0), bad(n, 0);
        have[c.rank] = 1;
        auto ready = [&] {
            for (int p = 0; p < n; p++) {
                if (have[p] || bad[p]) continue;
                ncclResult_t r = map_peer(c, seq, d, p, &maps[p], &why);
                if (r != ncclSuccess && r != ncclInProgress) bad[p] = 1, set_async(c, r, "%s", why.c_str());
                have[p] = r == ncclSuccess;  // a bad peer is never in: the op is stuck until abort
            }
            return std::find(have.begin(), have.end(), 0) == have.end();
        };
        char what[96];
        snprintf(what, sizeof what, "%s (collective #%llu)", kind_name(d.kind), (unsigned long long)seq);
        if (!wait_peers(c, what, have, ready, false)) return;  // aborted: recv unchanged
        for (int p = 0; p < n; p++)
            if (p != c.rank) src[p] = static_cast<const unsigned char*>(maps[p].base) + sizeof(FileHeader);
    }
    compute(c, d, src, recv);
}

// The enqueued work of collective `seq`: after op seq-1 of this communicator, whatever stream
// that one ran on, so every rank's ops run in call order.
void run_op(EmuComm& c, uint64_t seq, const OpDesc& d, const unsigned char* send, unsigned char* recv) {
    for (unsigned i = 0; c.done.load() != seq && !c.aborted.load(); i++) nap(i);
    if (!c.aborted.load()) exchange_and_compute(c, seq, d, send, recv);
    c.done.store(seq + 1);
}

// ---- collectives: the call side -----------------------------------------------------------
bool check_buffer(const char* api, const char* which, const void* p, size_t bytes) {
    emu::Alloc a;
    if (bytes == 0 || emu::mem_find(uintptr_t(p), bytes, &a)) return true;
    fail(ncclInvalidArgument, "%s: %s %p (%zu bytes) is not inside one live allocation: %s", api, which, p, bytes,
         emu::mem_explain(uintptr_t(p)).c_str());
    return false;
}

ncclResult_t submit(OpDesc d, const void* send, void* recv, ncclComm_t comm, void* stream) {
    const char* api = kind_name(d.kind);
    std::shared_ptr<EmuComm> c = lookup(comm);
    if (!c) return fail(ncclInvalidArgument, "%s: communicator %p is not live (never made, or destroyed)", api,
                            (void*)comm);
    if (c->finalized.load()) return fail(ncclInvalidUsage, "%s: the communicator was finalized", api);
    const size_t es = dtype_size(d.dtype);
    const bool reduces = d.kind == kAllReduce || d.kind == kReduceScatter;
    if (es == 0 || (reduces && (d.dtype == kFloat16 || d.redop > kAvg)))
        return fail(ncclInvalidArgument, "%s: unsupported data type %u / reduction op %u", api, d.dtype, d.redop);
    if (d.kind == kBroadcast && (d.root < 0 || d.root >= c->nranks))
        return fail(ncclInvalidArgument, "%s: root %d of %d ranks", api, d.root, c->nranks);
    size_t one, all;
    if (__builtin_mul_overflow(d.count, es, &one) || __builtin_mul_overflow(one, size_t(c->nranks), &all))
        return fail(ncclInvalidArgument, "%s: count %llu is too large", api, (unsigned long long)d.count);
    size_t send_bytes = d.kind == kReduceScatter ? all : one, recv_bytes = d.kind == kAllGather ? all : one;
    if (d.kind == kBroadcast && c->rank != d.root) send_bytes = 0;  // only the root's send buffer is read
    if (!check_buffer(api, "sendbuff", send, send_bytes) || !check_buffer(api, "recvbuff", recv, recv_bytes))
        return ncclInvalidArgument;
    emu::Stream* s = emu::stream_get(stream);
    if (!s) return fail(ncclInvalidArgument, "%s: stream %p is not a live stream", api, stream);
    const uint64_t seq = c->issued.fetch_add(1);
    auto in = static_cast<const unsigned char*>(send);
    auto out = static_cast<unsigned char*>(recv);
    emu::enqueue(s, [c, seq, d, in, out] { run_op(*c, seq, d, in, out); });  // `c` keeps the comm alive
    return ncclSuccess;
}

// Waits for this rank's ops, then the finalize barrier (see the header comment), then deletes
// this rank's files. Returns the async error as soon as one is set.
ncclResult_t finalize(EmuComm& c) {
    if (c.finalized.load()) return ncclSuccess;
    const uint64_t target = c.issued.load();
    for (unsigned i = 0; c.done.load() < target && !c.aborted.load() && !c.async_err.load(); i++) nap(i);
    std::string why;
    if (!c.aborted.load() && !c.async_err.load() && c.nranks > 1 &&
        !write_atomic(c, file(c, "fin", c.rank), nullptr, 0, nullptr, 0, &why))
        set_async(c, ncclSystemError, "%s", why.c_str());
    std::vector<char> have(c.nranks, 0);
    have[c.rank] = 1;
    auto ready = [&] {
        for (int p = 0; p < c.nranks; p++)
            if (!have[p]) have[p] = exists(file(c, "fin", p)) || !exists(file(c, "rank", p));
        return std::find(have.begin(), have.end(), 0) == have.end();
    };
    if (c.aborted.load() || c.async_err.load() || !wait_peers(c, "ncclCommFinalize", have, ready, true)) {
        if (int e = c.async_err.load()) return ncclResult_t(e);
        return fail(ncclInvalidUsage, "ncclCommFinalize: the communicator was aborted");
    }
    c.finalized.store(true);
    remove_own_files(c);
    c.joined.store(false);
    return ncclSuccess;
}

// Ops see the flag within a poll interval and return. Our files go now, and again when the last
// reference drops (~EmuComm), for a file an op renamed into place meanwhile.
void abort_comm(EmuComm& c) {
    c.aborted.store(true);
    if (c.joined.load()) remove_own_files(c);
}

template <class T>
ncclResult_t get_field(ncclComm_t comm, T* out, const char* api, T (*f)(const EmuComm&)) {
    std::shared_ptr<EmuComm> c = lookup(comm);
    if (!c || !out) return fail(ncclInvalidArgument, "%s: communicator %p is not live, or output is NULL", api,
                            (void*)comm);
    *out = f(*c);
    return ncclSuccess;
}

const char* thread_copy(const std::string& s) {
    thread_local std::string copy;
    copy = s;
    return copy.c_str();
}

}  // namespace

EmuComm::~EmuComm() {
    if (joined.load()) remove_own_files(*this);
}

// ---- the C API ----------------------------------------------------------------------------
#define NCCL_API extern "C" __attribute__((visibility("default")))

NCCL_API ncclResult_t ncclGetVersion(int* version) {
    if (!version) return fail(ncclInvalidArgument, "ncclGetVersion: version is NULL");
    *version = 22800;  // 2.28.0
    return ncclSuccess;
}

NCCL_API ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return fail(ncclInvalidArgument, "ncclGetUniqueId: id is NULL");
    unsigned char r[16];
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    bool ok = fd >= 0 && read(fd, r, sizeof r) == ssize_t(sizeof r);
    if (fd >= 0) close(fd);
    if (!ok) return fail(ncclSystemError, "ncclGetUniqueId: cannot read /dev/urandom");
    memset(id->internal, 0, sizeof id->internal);
    memcpy(id->internal, kIdPrefix, kIdPrefixLen);
    for (int i = 0; i < 16; i++) snprintf(id->internal + kIdPrefixLen + 2 * i, 3, "%02x", r[i]);
    return ncclSuccess;
}

NCCL_API ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    return init_rank(comm, nranks, id, rank);
}

NCCL_API ncclResult_t ncclCommInitAll(ncclComm_t* /*comms*/, int ndev, const int* /*devlist*/) {
    return fail(ncclInvalidUsage, "ncclCommInitAll(%d devices): the emulator has one device per process; use one "
                "process per rank and ncclCommInitRank", ndev);
}

NCCL_API ncclResult_t ncclCommFinalize(ncclComm_t comm) {
    std::shared_ptr<EmuComm> c = lookup(comm);
    if (!c) return fail(ncclInvalidArgument, "ncclCommFinalize: communicator %p is not live", (void*)comm);
    return finalize(*c);
}

NCCL_API ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return ncclSuccess;
    std::shared_ptr<EmuComm> c = lookup(comm, true);
    if (!c) return fail(ncclInvalidArgument, "ncclCommDestroy: communicator %p is not live", (void*)comm);
    // Destroy without finalize finalizes a healthy communicator first (blocking until the peers
    // finalize too), so peers still get our last op's data; one in error or aborted is aborted.
    if (!c->finalized.load() && !c->aborted.load() && c->async_err.load() == ncclSuccess) finalize(*c);
    if (!c->finalized.load()) abort_comm(*c);
    return ncclSuccess;  // freed when the last queued op drops its reference
}

NCCL_API ncclResult_t ncclCommAbort(ncclComm_t comm) {
    if (!comm) return ncclSuccess;
    std::shared_ptr<EmuComm> c = lookup(comm, true);
    if (!c) return fail(ncclInvalidArgument, "ncclCommAbort: communicator %p is not live", (void*)comm);
    // Said on stderr so that tests can tell an abort from a clean finalize + destroy.
    fprintf(stderr, "[cuda-emu] nccl: rank %d: ncclCommAbort\n", c->rank);
    abort_comm(*c);
    return ncclSuccess;
}

NCCL_API ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* err) {
    return get_field<ncclResult_t>(comm, err, "ncclCommGetAsyncError",
                                   [](const EmuComm& c) { return ncclResult_t(c.async_err.load()); });
}
NCCL_API ncclResult_t ncclCommCount(ncclComm_t comm, int* count) {
    return get_field<int>(comm, count, "ncclCommCount", [](const EmuComm& c) { return c.nranks; });
}
NCCL_API ncclResult_t ncclCommUserRank(ncclComm_t comm, int* rank) {
    return get_field<int>(comm, rank, "ncclCommUserRank", [](const EmuComm& c) { return c.rank; });
}
NCCL_API ncclResult_t ncclCommCuDevice(ncclComm_t comm, int* device) {
    return get_field<int>(comm, device, "ncclCommCuDevice", [](const EmuComm&) { return 0; });
}

NCCL_API ncclResult_t ncclGroupStart() { return ncclSuccess; }
NCCL_API ncclResult_t ncclGroupEnd() { return ncclSuccess; }

NCCL_API ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int dtype, int op, ncclComm_t comm,
                                    void* stream) {
    return submit(OpDesc{kAllReduce, uint32_t(dtype), uint32_t(op), 0, count}, send, recv, comm, stream);
}
NCCL_API ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, int dtype, int root, ncclComm_t comm,
                                    void* stream) {
    return submit(OpDesc{kBroadcast, uint32_t(dtype), 0, root, count}, send, recv, comm, stream);
}
NCCL_API ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recvcount, int dtype, int op,
                                        ncclComm_t comm, void* stream) {
    return submit(OpDesc{kReduceScatter, uint32_t(dtype), uint32_t(op), 0, recvcount}, send, recv, comm, stream);
}
NCCL_API ncclResult_t ncclAllGather(const void* send, void* recv, size_t sendcount, int dtype, ncclComm_t comm,
                                    void* stream) {
    return submit(OpDesc{kAllGather, uint32_t(dtype), 0, 0, sendcount}, send, recv, comm, stream);
}

NCCL_API const char* ncclGetErrorString(ncclResult_t r) {
    static const char* text[] = {"no error", "unhandled cuda error", "unhandled system error", "internal error",
                                 "invalid argument", "invalid usage",
                                 "remote process exited or there was a network error", "NCCL operation in progress",
                                 "operation timed out"};
    return (r >= ncclSuccess && r <= ncclTimeout) ? text[r] : "unknown result code";
}

// The communicator's async error message if it has one, else the last synchronous error.
NCCL_API const char* ncclGetLastError(ncclComm_t comm) {
    if (std::shared_ptr<EmuComm> c = lookup(comm)) {
        std::lock_guard<std::mutex> lk(c->mu);
        if (!c->async_msg.empty()) return thread_copy(c->async_msg);
    }
    std::lock_guard<std::mutex> lk(g().mu);
    return thread_copy(g().last_error);
}
