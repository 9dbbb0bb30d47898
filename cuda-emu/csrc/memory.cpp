// Emulated device memory: host pages, one mapping per allocation, laid out to catch kernels
// that step outside their buffers.
//
//   [PROT_NONE page][guard bytes | data (256-aligned) | guard bytes][PROT_NONE page]
//
// The data is placed at the end of its pages (rounded to 256 bytes, cudaMalloc's alignment),
// so a read or write a little past the end lands in guard bytes, and further in the
// inaccessible page (a fault, reported by sched.cpp with this file's description of the
// address). Guard bytes hold a NaN pattern: a stray read shows up as NaN, and a stray write is
// found when the guards are checked after each launch. Fresh data is poisoned with NaN unless
// B2B_EMU_POISON=0, so a kernel that reads memory nobody wrote produces NaN.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>

#include "runtime.h"

namespace emu {
namespace {

const uint32_t GUARD_WORD = 0x7fbadbadu;  // a quiet NaN with a recognisable payload

struct Heap {
    std::mutex mu;
    std::map<uintptr_t, Alloc> live;  // by base
    uint64_t serial = 0;
    size_t used = 0;
};
Heap& heap() {
    static Heap* h = new Heap();
    return *h;
}

size_t page() {
    static size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

bool poison_enabled() {
    static int on = [] {
        const char* e = getenv("B2B_EMU_POISON");
        return (e && std::string(e) == "0") ? 0 : 1;
    }();
    return on != 0;
}

uint8_t guard_byte(uintptr_t addr) {
    uint32_t w = GUARD_WORD;
    return reinterpret_cast<uint8_t*>(&w)[addr % 4];
}

void fill_guard(uintptr_t from, uintptr_t to) {
    for (uintptr_t a = from; a < to; a++) *reinterpret_cast<uint8_t*>(a) = guard_byte(a);
}

// The first damaged guard byte in [from, to), or 0.
uintptr_t damaged(uintptr_t from, uintptr_t to) {
    for (uintptr_t a = from; a < to; a++)
        if (*reinterpret_cast<uint8_t*>(a) != guard_byte(a)) return a;
    return 0;
}

// The allocation whose mapping contains p (under the heap lock).
const Alloc* owner(uintptr_t p) {
    auto& live = heap().live;
    auto it = live.upper_bound(p);
    if (it != live.end() && p >= it->second.map) return &it->second;  // in the front guard of the next
    if (it == live.begin()) return nullptr;
    --it;
    return p < it->second.map + it->second.map_len ? &it->second : nullptr;
}

}  // namespace

uintptr_t mem_alloc(size_t bytes) {
    const size_t pg = page();
    const size_t data = (bytes + 255) / 256 * 256;
    const size_t body = (data + pg - 1) / pg * pg;
    const size_t len = body + 2 * pg;
    {
        std::lock_guard<std::mutex> g(heap().mu);
        if (heap().used + bytes > MEM_TOTAL) return 0;
    }
    void* m = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return 0;
    const uintptr_t map = reinterpret_cast<uintptr_t>(m);
    if (mprotect(reinterpret_cast<void*>(map + pg), body, PROT_READ | PROT_WRITE) != 0) {
        munmap(m, len);
        return 0;
    }
    const uintptr_t end = map + pg + body;
    const uintptr_t base = end - data;
    fill_guard(map + pg, base);
    fill_guard(base + bytes, end);
    if (poison_enabled() && !skip_bodies()) std::memset(reinterpret_cast<void*>(base), 0xff, bytes);
    std::lock_guard<std::mutex> g(heap().mu);
    Alloc a{base, bytes, map, len, ++heap().serial};
    heap().live[base] = a;
    heap().used += bytes;
    return base;
}

bool mem_free(uintptr_t base) {
    Alloc a;
    {
        std::lock_guard<std::mutex> g(heap().mu);
        auto it = heap().live.find(base);
        if (it == heap().live.end()) return false;
        a = it->second;
        heap().live.erase(it);
        heap().used -= a.size;
    }
    std::string why;
    // A write past the end that no launch check saw (e.g. by a copy) is still reported.
    const uintptr_t bad = damaged(a.map + page(), a.base);
    const uintptr_t bad2 = damaged(a.base + a.size, a.map + a.map_len - page());
    if (bad || bad2) {
        std::ostringstream o;
        o << "allocation #" << a.serial << " (" << a.size << " bytes) had its guard bytes overwritten at offset "
          << (long long)((bad ? bad : bad2) - a.base) << ", found when it was freed";
        fail_sticky(ILLEGAL_ADDRESS, o.str());
    }
    munmap(reinterpret_cast<void*>(a.map), a.map_len);
    return true;
}

bool mem_find(uintptr_t p, size_t bytes, Alloc* out) {
    std::lock_guard<std::mutex> g(heap().mu);
    auto& live = heap().live;
    auto it = live.upper_bound(p);
    if (it == live.begin()) return false;
    --it;
    const Alloc& a = it->second;
    if (p < a.base || p > a.base + a.size || bytes > a.base + a.size - p) return false;
    if (out) *out = a;
    return true;
}

std::string mem_explain(uintptr_t p) {
    std::lock_guard<std::mutex> g(heap().mu);
    std::ostringstream o;
    o << "0x" << std::hex << p << std::dec;
    const Alloc* a = owner(p);
    if (!a) {
        o << " is in no live allocation";
        return o.str();
    }
    if (p < a->base) o << " is " << (a->base - p) << " bytes before";
    else if (p >= a->base + a->size) o << " is " << (p - a->base - a->size) << " bytes past the end of";
    else o << " is inside";
    o << " allocation #" << a->serial << " (" << a->size << " bytes)";
    return o.str();
}

bool mem_guards_intact(uintptr_t p, std::string* why) {
    std::lock_guard<std::mutex> g(heap().mu);
    const Alloc* a = owner(p);
    if (!a) return true;  // freed meanwhile: mem_free checked it
    const uintptr_t bad = damaged(a->map + page(), a->base);
    const uintptr_t bad2 = bad ? 0 : damaged(a->base + a->size, a->map + a->map_len - page());
    if (!bad && !bad2) return true;
    std::ostringstream o;
    const uintptr_t at = bad ? bad : bad2;
    o << "guard byte at 0x" << std::hex << at << std::dec;
    if (bad) o << ", " << (a->base - at) << " bytes before";
    else o << ", " << (at - a->base - a->size) << " bytes past the end of";
    o << " allocation #" << a->serial << " (" << a->size << " bytes), was overwritten";
    *why = o.str();
    return false;
}

size_t mem_used() {
    std::lock_guard<std::mutex> g(heap().mu);
    return heap().used;
}

}  // namespace emu
