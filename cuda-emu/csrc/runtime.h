// The emulator's host-side runtime, shared by driver.cpp (libcuda), cublas.cpp, nccl.cpp and
// sched.cpp. Device memory is host memory: a CUdeviceptr is the address of the bytes.
//
// Ordering model: every stream is a real in-order queue served by its own OS thread, so work on
// two streams runs concurrently unless an event orders it. Host calls that read results
// (synchronize, DtoH copies) wait for the queue.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace emu {

// CUresult values we return (same numbers as cuda.h).
enum Result : int {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    NOT_READY = 600,
    ILLEGAL_ADDRESS = 700,
    LAUNCH_OUT_OF_RESOURCES = 701,
    LAUNCH_FAILED = 719,
    MISALIGNED_ADDRESS = 716,
    ASSERT = 710,
    NOT_SUPPORTED = 801,
    UNKNOWN = 999,
};

// ---- errors -------------------------------------------------------------------------------
// A failure inside queued work (a kernel, a copy) is sticky, as on a GPU: every later call
// returns it. `detail` makes cuGetErrorString name the kernel and the address, so the Rust
// side's `DriverError` message says what went wrong.
void fail_sticky(Result code, const std::string& detail);
// A synchronous error (bad launch config, bad argument): returned once, message kept for
// cuGetErrorString of that code.
Result fail_now(Result code, const std::string& detail);
Result sticky();
const char* describe(int code);

// ---- memory -------------------------------------------------------------------------------
struct Alloc {
    uintptr_t base;   // first byte the user may touch
    size_t size;      // bytes requested
    uintptr_t map;    // mmap start (a PROT_NONE page, then pattern, data, slack, PROT_NONE page)
    size_t map_len;
    uint64_t serial;  // allocation number, for messages
};
uintptr_t mem_alloc(size_t bytes);       // 0 when out of (emulated) memory
bool mem_free(uintptr_t base);           // false when `base` is not a live allocation
// The live allocation containing [p, p + bytes), or false. `bytes` may be 0 (a pointer to
// the end of an allocation is valid).
bool mem_find(uintptr_t p, size_t bytes, Alloc* out);
// Message for a bad address: "0x.. is 12 bytes past the end of allocation #5 (400 bytes)".
std::string mem_explain(uintptr_t p);
// Check the guard bytes around the allocation holding `p`; on damage, describe it.
bool mem_guards_intact(uintptr_t p, std::string* why);
size_t mem_used();
const size_t MEM_TOTAL = 80ull * 1000 * 1000 * 1000;  // an H100 80GB

// ---- streams and events -------------------------------------------------------------------
struct Stream {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::function<void()>> queue;
    uint64_t enqueued = 0;             // ops ever queued
    std::atomic<uint64_t> completed{0};
    bool stopping = false;
    std::thread worker;
    std::string name;
};
// One cuEventRecord: complete when `stream->completed >= seq`; `when` is stamped (seconds,
// steady clock) when the stream reaches it, for cuEventElapsedTime.
struct EventRecord {
    Stream* stream = nullptr;
    uint64_t seq = 0;
    std::atomic<double> when{0.0};
};
struct Event {
    std::shared_ptr<EventRecord> rec;  // null: never recorded (complete)
};
Stream* stream_get(void* handle);  // null handle = the context's default stream
Stream* stream_new(const char* name);
void stream_destroy(Stream* s);   // waits for queued work
void enqueue(Stream* s, std::function<void()> op);
void stream_sync(Stream* s);
void all_sync();
void event_record(Event* e, Stream* s);
bool event_done(const EventRecord* r);
// Blocks until done. Used by stream-side waits and cuEventSynchronize.
void event_wait(const EventRecord* r);
// Wakes every thread blocked in event_wait (called by each stream after an op completes).
void notify_progress();

// ---- kernels ------------------------------------------------------------------------------
struct ArgInfo {
    size_t size;
    bool is_pointer;
    const char* type;
};
struct KernelEntry {
    const char* name;
    void* fn;
    void (*invoke)(void* fn, const unsigned char* args, const size_t* offsets);
    std::vector<ArgInfo> args;
};
void register_kernel(KernelEntry e);
const KernelEntry* find_kernel(const std::string& name);

struct Dim3 {
    unsigned x, y, z;
};
struct Launch {
    const KernelEntry* kernel;
    Dim3 grid, block;
    unsigned dyn_smem;
    std::vector<unsigned char> args;  // packed copies of the argument values
    std::vector<size_t> offsets;
};
// Runs every thread of every block of `l` on the calling thread (a stream worker); a failure
// is sticky and names the kernel.
void run_launch(const Launch& l);

// Schedules: 0 = threads in index order between barriers, 1 = reversed.
int schedule();
void set_schedule(int s);

// Cost-model mode (`bench --predict`): launches, GEMM calls, copies and memsets are checked
// (arguments, limits, bounds) and ordered as usual, but their bodies do not run and fresh
// memory is not poisoned, so a bert-base step takes seconds and touches almost no host
// memory. Results are whatever the memory held (zeros for untouched pages): only the launch
// list is meaningful. Set by b2bEmuSetSkipBodies or B2B_EMU_SKIP_BODIES=1.
bool skip_bodies();
void set_skip_bodies(bool on);

}  // namespace emu
