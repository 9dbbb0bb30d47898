// Runs a kernel launch: every block, every thread, with real barrier semantics.
//
// Each GPU thread of a block is a fiber with its own stack, switched by the few instructions
// in `emu_switch` (no system call per switch, unlike swapcontext). A fiber runs until it
// reaches a barrier (`__syncthreads`, or a warp exchange, which is a barrier over its warp)
// or returns. The block scheduler then releases every barrier whose participants have all
// arrived; threads that returned count as arrived, as on Volta and later. Nothing else makes
// a thread wait, so code between barriers runs one thread after another in the order the
// schedule gives (index order, or reversed): a race between barriers gives different results
// under the two schedules. If no barrier can be released while threads still wait, the block
// is deadlocked (divergent barriers) and the launch fails naming the kernel.
//
// A fault inside a kernel (guard page, misaligned vector access, __trap) switches straight
// back to the block scheduler, which abandons the block and makes the error sticky.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>

#include "emu.h"

#if !defined(__x86_64__)
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

// emu_switch(save, next): push callee-saved registers and the FP control words, store the
// stack pointer in *save, load `next`, pop the same set, return into the other fiber.
// A new fiber's stack is laid out so that the first switch "returns" into emu_fiber_start,
// which calls r13(r12).
asm(R"(
.text
.globl emu_switch
.hidden emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch,.-emu_switch
.globl emu_fiber_start
.hidden emu_fiber_start
.type emu_fiber_start,@function
emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
.size emu_fiber_start,.-emu_fiber_start
)");
extern "C" void emu_switch(void** save, void* next);
extern "C" void emu_fiber_start();

namespace emu {

thread_local Fiber* tl_fiber = nullptr;
thread_local BlockCtx* tl_block = nullptr;

namespace {

enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done, Faulted };

const size_t STACK_BYTES = 64 * 1024;
const unsigned MAX_THREADS = 1024;

struct Thread : Fiber {
    void* sp = nullptr;
    State state = State::Runnable;
    unsigned warp_mask = 0;  // the mask of the warp barrier it waits at
};

// Everything one OS thread needs to run blocks: fiber stacks are mapped once and reused.
struct Runner {
    unsigned char* stacks = nullptr;
    std::vector<Thread> threads;
    void* sched_sp = nullptr;
    const Launch* launch = nullptr;
    const unsigned char* args = nullptr;
    BlockCtx block{};
    std::vector<unsigned char> smem;
    uint64_t exchange[MAX_THREADS];
    std::vector<unsigned char> share = std::vector<unsigned char>(MAX_THREADS * 64);
    Result fault = OK;
    std::string fault_what;

    Runner() {
        void* m = mmap(nullptr, STACK_BYTES * MAX_THREADS, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            std::perror("[cuda-emu] fiber stacks");
            std::abort();
        }
        stacks = static_cast<unsigned char*>(m);
        threads.resize(MAX_THREADS);
    }
};
thread_local Runner* tl_runner = nullptr;

Runner& runner() {
    if (!tl_runner) tl_runner = new Runner();  // one per stream thread, lives as long as it
    return *tl_runner;
}

void back_to_scheduler(Thread* t, State s) {
    t->state = s;
    emu_switch(&t->sp, tl_runner->sched_sp);
}

void fiber_main(Thread* t) {
    Runner& r = *tl_runner;
    r.launch->kernel->invoke(r.launch->kernel->fn, r.args, r.launch->offsets.data());
    back_to_scheduler(t, State::Done);
    std::abort();  // a finished fiber is never resumed
}

void prepare(Thread& t, unsigned char* stack_top) {
    uintptr_t top = reinterpret_cast<uintptr_t>(stack_top) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top - 64);
    uint32_t mxcsr = 0x1f80;
    uint16_t fpcw = 0x037f;
    std::memcpy(&sp[0], &mxcsr, 4);
    std::memcpy(reinterpret_cast<unsigned char*>(&sp[0]) + 4, &fpcw, 2);
    sp[1] = 0;                                            // r15
    sp[2] = 0;                                            // r14
    sp[3] = reinterpret_cast<uint64_t>(&fiber_main);      // r13: entry
    sp[4] = reinterpret_cast<uint64_t>(&t);               // r12: its argument
    sp[5] = 0;                                            // rbx
    sp[6] = 0;                                            // rbp
    sp[7] = reinterpret_cast<uint64_t>(&emu_fiber_start);  // return address
    t.sp = sp;
    t.state = State::Runnable;
}

std::string describe_states(const std::vector<Thread>& ts, unsigned n) {
    unsigned at_block = 0, at_warp = 0, done = 0;
    for (unsigned i = 0; i < n; i++) {
        at_block += ts[i].state == State::AtBlockBarrier;
        at_warp += ts[i].state == State::AtWarpBarrier;
        done += ts[i].state == State::Done;
    }
    std::ostringstream o;
    o << at_block << " threads wait at __syncthreads, " << at_warp << " at a warp exchange, " << done
      << " have returned";
    return o.str();
}

// Release the barriers whose participants have all arrived; false when none could be.
bool release_barriers(std::vector<Thread>& ts, unsigned n) {
    bool released = false;
    for (unsigned w = 0; w * 32 < n; w++) {
        const unsigned lo = w * 32, hi = std::min(n, lo + 32);
        bool any = false, all = true;
        for (unsigned i = lo; i < hi; i++) {
            if (ts[i].state == State::AtWarpBarrier) any = true;
            else if (ts[i].state != State::Done) all = false;
        }
        if (any && all) {
            for (unsigned i = lo; i < hi; i++)
                if (ts[i].state == State::AtWarpBarrier) ts[i].state = State::Runnable;
            released = true;
        }
    }
    if (released) return true;
    bool any = false, all = true;
    for (unsigned i = 0; i < n; i++) {
        if (ts[i].state == State::AtBlockBarrier) any = true;
        else if (ts[i].state != State::Done) all = false;
    }
    if (any && all) {
        for (unsigned i = 0; i < n; i++)
            if (ts[i].state == State::AtBlockBarrier) ts[i].state = State::Runnable;
        return true;
    }
    return false;
}

// Runs one block to completion; false (with r.fault set) when it faulted or deadlocked.
bool run_block(Runner& r, uint3 bidx) {
    const Launch& l = *r.launch;
    const unsigned n = l.block.x * l.block.y * l.block.z;
    r.block.block_idx = bidx;
    if (!r.smem.empty()) std::memset(r.smem.data(), 0xff, r.smem.size());  // unwritten shared reads show
    for (unsigned i = 0; i < n; i++) {
        Thread& t = r.threads[i];
        t.linear = i;
        t.tid = uint3{i % l.block.x, (i / l.block.x) % l.block.y, i / (l.block.x * l.block.y)};
        t.lane = i % 32;
        t.warp = i / 32;
        prepare(t, r.stacks + (size_t)(i + 1) * STACK_BYTES);
    }
    const bool reversed = schedule() == 1;
    unsigned done = 0;
    while (done < n) {
        for (unsigned k = 0; k < n; k++) {
            Thread& t = r.threads[reversed ? n - 1 - k : k];
            if (t.state != State::Runnable) continue;
            tl_fiber = &t;
            emu_switch(&r.sched_sp, t.sp);
            tl_fiber = nullptr;
            if (t.state == State::Done) done++;
            if (t.state == State::Faulted) return false;
        }
        if (done == n) break;
        if (!release_barriers(r.threads, n)) {
            r.fault = LAUNCH_FAILED;
            r.fault_what = "deadlock: no barrier can be released (" + describe_states(r.threads, n) + ")";
            return false;
        }
    }
    return true;
}

std::string where(const Launch& l, uint3 b) {
    std::ostringstream o;
    o << "kernel `" << l.kernel->name << "` (grid " << l.grid.x << "x" << l.grid.y << "x" << l.grid.z << ", block "
      << l.block.x << "x" << l.block.y << "x" << l.block.z << ", block index " << b.x << "," << b.y << "," << b.z
      << ")";
    return o.str();
}

// Every pointer argument must be null or point into a live allocation.
bool check_pointer_args(const Launch& l, std::string* why) {
    const auto& a = l.kernel->args;
    for (size_t i = 0; i < a.size(); i++) {
        if (!a[i].is_pointer) continue;
        uintptr_t p;
        std::memcpy(&p, l.args.data() + l.offsets[i], sizeof p);
        if (p == 0 || mem_find(p, 0, nullptr)) continue;
        std::ostringstream o;
        o << "kernel `" << l.kernel->name << "` argument " << i << " (" << a[i].type << ") = 0x" << std::hex << p
          << std::dec << " is not device memory: " << mem_explain(p);
        *why = o.str();
        return false;
    }
    return true;
}

std::atomic<int> g_schedule{-1};

struct Registry {
    std::mutex mu;
    std::map<std::string, KernelEntry> kernels;
};
Registry& registry() {
    static Registry* r = new Registry();  // never destroyed: kernels register from static ctors
    return *r;
}

}  // namespace

int schedule() {
    int s = g_schedule.load();
    if (s < 0) {
        const char* e = getenv("B2B_EMU_SCHEDULE");
        s = (e && std::string(e) == "reverse") ? 1 : 0;
        g_schedule.store(s);
    }
    return s;
}
void set_schedule(int s) { g_schedule.store(s); }

namespace {
std::atomic<int> g_skip_bodies{-1};
}
bool skip_bodies() {
    int s = g_skip_bodies.load();
    if (s < 0) {
        const char* e = getenv("B2B_EMU_SKIP_BODIES");
        s = (e && std::string(e) == "1") ? 1 : 0;
        g_skip_bodies.store(s);
    }
    return s == 1;
}
void set_skip_bodies(bool on) { g_skip_bodies.store(on ? 1 : 0); }

void register_kernel(KernelEntry e) {
    std::lock_guard<std::mutex> g(registry().mu);
    registry().kernels[e.name] = std::move(e);
}
const KernelEntry* find_kernel(const std::string& name) {
    std::lock_guard<std::mutex> g(registry().mu);
    auto it = registry().kernels.find(name);
    return it == registry().kernels.end() ? nullptr : &it->second;
}

void sync_block() {
    Thread* t = static_cast<Thread*>(tl_fiber);
    back_to_scheduler(t, State::AtBlockBarrier);
}
void sync_warp(unsigned mask) {
    Thread* t = static_cast<Thread*>(tl_fiber);
    t->warp_mask = mask;
    back_to_scheduler(t, State::AtWarpBarrier);
}
// Two warp barriers: every lane publishes, then every lane reads, then nobody overwrites a
// slot before every lane has read it.
uint64_t warp_exchange(unsigned mask, uint64_t mine, int src_lane, int /*width*/) {
    Thread* t = static_cast<Thread*>(tl_fiber);
    Runner& r = *tl_runner;
    const unsigned warp_base = t->warp * 32;
    r.exchange[t->linear] = mine;
    sync_warp(mask);
    const unsigned src = warp_base + (unsigned)src_lane;
    const unsigned n = r.launch->block.x * r.launch->block.y * r.launch->block.z;
    uint64_t v = src < n ? r.exchange[src] : mine;
    sync_warp(mask);
    return v;
}
unsigned warp_ballot(unsigned mask, int pred) {
    Thread* t = static_cast<Thread*>(tl_fiber);
    Runner& r = *tl_runner;
    r.exchange[t->linear] = pred ? 1 : 0;
    sync_warp(mask);
    const unsigned base = t->warp * 32;
    const unsigned n = r.launch->block.x * r.launch->block.y * r.launch->block.z;
    unsigned bits = 0;
    for (unsigned i = 0; i < 32 && base + i < n; i++)
        if (r.threads[base + i].state != State::Done && r.exchange[base + i]) bits |= 1u << i;
    sync_warp(mask);
    return bits;
}
void warp_share(const void* mine, unsigned bytes, void* all) {
    if (bytes > 64) device_fault(LAUNCH_FAILED, "warp_share of more than 64 bytes per lane");
    Thread* t = static_cast<Thread*>(tl_fiber);
    Runner& r = *tl_runner;
    std::memcpy(&r.share[t->linear * 64], mine, bytes);
    sync_warp(0xffffffffu);
    const unsigned base = t->warp * 32;
    const unsigned n = r.launch->block.x * r.launch->block.y * r.launch->block.z;
    if (base + 32 > n) device_fault(LAUNCH_FAILED, "a warp-wide tensor-core operation in a partial warp");
    for (unsigned i = 0; i < 32; i++)
        std::memcpy(static_cast<unsigned char*>(all) + i * bytes, &r.share[(base + i) * 64], bytes);
    sync_warp(0xffffffffu);
}
void device_fault(Result code, const char* what) {
    Runner& r = *tl_runner;
    r.fault = code;
    r.fault_what = what;
    back_to_scheduler(static_cast<Thread*>(tl_fiber), State::Faulted);
    std::abort();
}

// A SIGSEGV inside a kernel (a guard page) ends the block like device_fault. Faults anywhere
// else go to the handler that was installed before ours.
namespace {
struct sigaction g_previous_segv;
void on_segv(int sig, siginfo_t* info, void* uc) {
    if (tl_fiber && tl_runner) {
        Runner& r = *tl_runner;
        r.fault = ILLEGAL_ADDRESS;
        r.fault_what = "invalid memory access at " + mem_explain(reinterpret_cast<uintptr_t>(info->si_addr));
        back_to_scheduler(static_cast<Thread*>(tl_fiber), State::Faulted);
    }
    sigaction(sig, &g_previous_segv, nullptr);
    (void)uc;
}
void install_segv_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa {};
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_previous_segv);
    });
}
}  // namespace

void run_launch(const Launch& l) {
    std::string why;
    if (!check_pointer_args(l, &why)) {
        fail_sticky(ILLEGAL_ADDRESS, why);
        return;
    }
    if (skip_bodies()) return;
    install_segv_handler();
    Runner& r = runner();
    r.launch = &l;
    r.args = l.args.data();
    r.block.block_dim = uint3{l.block.x, l.block.y, l.block.z};
    r.block.grid_dim = uint3{l.grid.x, l.grid.y, l.grid.z};
    r.smem.assign(l.dyn_smem, 0);
    r.block.dyn_smem = r.smem.empty() ? nullptr : r.smem.data();
    r.block.dyn_smem_bytes = l.dyn_smem;
    tl_block = &r.block;
    r.fault = OK;
    for (unsigned z = 0; z < l.grid.z; z++)
        for (unsigned y = 0; y < l.grid.y; y++)
            for (unsigned x = 0; x < l.grid.x; x++) {
                if (!run_block(r, uint3{x, y, z})) {
                    tl_block = nullptr;
                    fail_sticky(r.fault, where(l, uint3{x, y, z}) + ": " + r.fault_what);
                    return;
                }
            }
    tl_block = nullptr;
    // Guard bytes of every allocation the kernel was given must be intact.
    const auto& a = l.kernel->args;
    for (size_t i = 0; i < a.size(); i++) {
        if (!a[i].is_pointer) continue;
        uintptr_t p;
        std::memcpy(&p, l.args.data() + l.offsets[i], sizeof p);
        if (p != 0 && !mem_guards_intact(p, &why)) {
            fail_sticky(ILLEGAL_ADDRESS, "kernel `" + std::string(l.kernel->name) + "` wrote outside argument " +
                                             std::to_string(i) + " (" + a[i].type + "): " + why);
            return;
        }
    }
}

}  // namespace emu

// Test hook: pick the thread schedule (0 = index order, 1 = reversed) for later launches.
extern "C" __attribute__((visibility("default"))) void b2bEmuSetSchedule(int s) { emu::set_schedule(s); }
// Cost-model hook: 1 = check and order work but skip its bodies (see runtime.h), 0 = run it.
extern "C" __attribute__((visibility("default"))) void b2bEmuSetSkipBodies(int on) {
    emu::all_sync();  // work queued before the switch runs (or is skipped) as it was queued
    emu::set_skip_bodies(on != 0);
}
