#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

namespace hfnemo {

namespace {
std::atomic<int> g_threads{0};  // 0: not set yet, use default_threads()
std::atomic<std::size_t> g_min_chunk{std::size_t(1) << 20};
}  // namespace

int default_threads() {
    unsigned hc = std::thread::hardware_concurrency();
    if (hc == 0) hc = 1;
    return static_cast<int>(std::min(8u, hc));
}

void set_threads(int n) {
    if (n < 1) throw std::invalid_argument("thread count must be >= 1, got " + std::to_string(n));
    g_threads.store(n);
}

int get_threads() {
    int n = g_threads.load();
    return n > 0 ? n : default_threads();
}

void set_min_chunk_bytes(std::size_t n) {
    if (n < 1) throw std::invalid_argument("min chunk bytes must be >= 1");
    g_min_chunk.store(n);
}

std::size_t min_chunk_bytes() { return g_min_chunk.load(); }

void parallel_for(std::size_t n, double bytes_per_item, std::size_t align,
                  const std::function<void(std::size_t, std::size_t)>& fn) {
    if (n == 0) return;
    if (align == 0) align = 1;
    const double per = bytes_per_item > 0 ? bytes_per_item : 1.0;
    std::size_t min_items = static_cast<std::size_t>(std::ceil(static_cast<double>(min_chunk_bytes()) / per));
    if (min_items < 1) min_items = 1;
    std::size_t parts = std::min<std::size_t>(static_cast<std::size_t>(get_threads()), n / min_items);
    if (parts <= 1) {
        fn(0, n);
        return;
    }
    // Even split, boundaries rounded down to `align`; drop empty ranges.
    std::vector<std::size_t> bounds;
    bounds.reserve(parts + 1);
    bounds.push_back(0);
    for (std::size_t t = 1; t < parts; ++t) {
        std::size_t b = (n / parts) * t + ((n % parts) * t) / parts;  // floor(n * t / parts), no overflow
        b -= b % align;
        if (b > bounds.back()) bounds.push_back(b);
    }
    if (n > bounds.back()) bounds.push_back(n);
    const std::size_t ranges = bounds.size() - 1;

    std::exception_ptr first_error;
    std::mutex error_mutex;
    auto run = [&](std::size_t i) {
        try {
            fn(bounds[i], bounds[i + 1]);
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!first_error) first_error = std::current_exception();
        }
    };
    std::vector<std::thread> workers;
    workers.reserve(ranges - 1);
    std::size_t next = 1;
    for (; next < ranges; ++next) {
        try {
            workers.emplace_back(run, next);
        } catch (const std::system_error&) {
            break;  // cannot start more threads: the caller runs the rest
        }
    }
    run(0);
    for (std::size_t i = next; i < ranges; ++i) run(i);
    for (auto& w : workers) w.join();
    if (first_error) std::rethrow_exception(first_error);
}

}  // namespace hfnemo
