// Streams, events and the error state of the emulated device.
//
// A stream is a FIFO served by its own OS thread, so two streams really run at the same time
// and only events order them: a missing cuStreamWaitEvent can produce a wrong result here as
// it would on a GPU. Completion is a counter per stream; an event record is "this stream's
// counter reaches N".
#include <chrono>
#include <cstdio>
#include <deque>
#include <map>

#include "runtime.h"

namespace emu {
namespace {

std::mutex g_err_mu;
Result g_sticky = OK;
std::string g_sticky_detail;
std::map<int, std::deque<std::string>> g_details;  // kept alive: cuGetErrorString hands out pointers

std::mutex g_progress_mu;
std::condition_variable g_progress_cv;

double now_s() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

void remember(Result code, const std::string& detail) {
    auto& d = g_details[code];
    d.push_back(detail);
    if (d.size() > 64) d.pop_front();
}

void serve(Stream* s) {
    for (;;) {
        std::function<void()> op;
        {
            std::unique_lock<std::mutex> g(s->mu);
            s->cv.wait(g, [&] { return !s->queue.empty() || s->stopping; });
            if (s->queue.empty()) return;
            op = std::move(s->queue.front());
            s->queue.pop_front();
        }
        // After a sticky error the device does no more work, but the queue still drains so
        // that host waits end (and report the error) instead of hanging.
        if (sticky() == OK) op();
        s->completed.fetch_add(1);
        notify_progress();
    }
}

}  // namespace

void fail_sticky(Result code, const std::string& detail) {
    std::lock_guard<std::mutex> g(g_err_mu);
    std::fprintf(stderr, "[cuda-emu] error %d: %s\n", (int)code, detail.c_str());
    if (g_sticky == OK) {
        g_sticky = code;
        g_sticky_detail = detail;
    }
    remember(code, detail);
}

Result fail_now(Result code, const std::string& detail) {
    std::lock_guard<std::mutex> g(g_err_mu);
    std::fprintf(stderr, "[cuda-emu] error %d: %s\n", (int)code, detail.c_str());
    remember(code, detail);
    return code;
}

Result sticky() {
    std::lock_guard<std::mutex> g(g_err_mu);
    return g_sticky;
}

const char* describe(int code) {
    std::lock_guard<std::mutex> g(g_err_mu);
    auto it = g_details.find(code);
    if (it != g_details.end() && !it->second.empty()) return it->second.back().c_str();
    switch (code) {
        case OK: return "no error";
        case INVALID_VALUE: return "invalid argument";
        case OUT_OF_MEMORY: return "out of memory";
        case NOT_READY: return "device not ready";
        case ILLEGAL_ADDRESS: return "an illegal memory access was encountered";
        case NOT_FOUND: return "named symbol not found";
        default: return "cuda-emu error";
    }
}

std::mutex g_streams_mu;
std::vector<Stream*> g_streams;

Stream* stream_new(const char* name) {
    Stream* s = new Stream();
    s->name = name;
    s->worker = std::thread(serve, s);
    std::lock_guard<std::mutex> g(g_streams_mu);
    g_streams.push_back(s);
    return s;
}

void all_sync() {
    std::vector<Stream*> all;
    {
        std::lock_guard<std::mutex> g(g_streams_mu);
        all = g_streams;
    }
    for (Stream* s : all) stream_sync(s);
}

Stream* stream_get(void* handle) {
    // The legacy default stream (null) and the per-thread one (0x2) are one queue here; all
    // streams cudarc creates are non-blocking, so no implicit synchronisation is modelled.
    if (handle == nullptr || handle == reinterpret_cast<void*>(0x2)) {
        static Stream* def = stream_new("default");
        return def;
    }
    return static_cast<Stream*>(handle);
}

// Streams are never freed: an event may still name one after it is destroyed.
void stream_destroy(Stream* s) {
    stream_sync(s);
    {
        std::lock_guard<std::mutex> g(s->mu);
        s->stopping = true;
    }
    s->cv.notify_all();
    if (s->worker.joinable()) s->worker.join();
}

void enqueue(Stream* s, std::function<void()> op) {
    {
        std::lock_guard<std::mutex> g(s->mu);
        s->queue.push_back(std::move(op));
        s->enqueued++;
    }
    s->cv.notify_one();
}

void stream_sync(Stream* s) {
    uint64_t target;
    {
        std::lock_guard<std::mutex> g(s->mu);
        target = s->enqueued;
    }
    std::unique_lock<std::mutex> g(g_progress_mu);
    g_progress_cv.wait(g, [&] { return s->completed.load() >= target; });
}

void event_record(Event* e, Stream* s) {
    auto rec = std::make_shared<EventRecord>();
    rec->stream = s;
    {
        std::lock_guard<std::mutex> g(s->mu);
        s->queue.push_back([rec] { rec->when.store(now_s()); });
        rec->seq = ++s->enqueued;
    }
    s->cv.notify_one();
    e->rec = rec;
}

bool event_done(const EventRecord* r) { return !r || r->stream->completed.load() >= r->seq; }

void event_wait(const EventRecord* r) {
    std::unique_lock<std::mutex> g(g_progress_mu);
    g_progress_cv.wait(g, [&] { return event_done(r); });
}

void notify_progress() {
    { std::lock_guard<std::mutex> g(g_progress_mu); }
    g_progress_cv.notify_all();
}

}  // namespace emu
