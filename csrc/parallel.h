// Thread count and the contiguous-range splitter shared by every kernel.
//
// Work runs on std::threads started per call (the calling thread takes the first range), so the
// module is reentrant (the executor calls kernels from several Python threads at once) and
// fork-safe (no pool to inherit half-dead). A call is split into at most get_threads() contiguous
// ranges of at least min_chunk_bytes() each, so small calls stay on the calling thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace hfnemo {

// min(8, std::thread::hardware_concurrency()), at least 1.
int default_threads();
// Worker threads per call (process-wide). n < 1 throws std::invalid_argument.
void set_threads(int n);
int get_threads();

// Smallest range handed to one thread, in bytes moved (read + written). Default 1 MiB; tests
// lower it to exercise range boundaries on small inputs. n < 1 throws std::invalid_argument.
void set_min_chunk_bytes(std::size_t n);
std::size_t min_chunk_bytes();

// Calls fn(begin, end) over [0, n) cut into contiguous ranges: at most get_threads() of them,
// each at least ceil(min_chunk_bytes() / bytes_per_item) items, boundaries multiples of `align`
// (except n itself). Runs the ranges concurrently and returns when all are done; rethrows the
// first exception thrown by fn.
void parallel_for(std::size_t n, double bytes_per_item, std::size_t align,
                  const std::function<void(std::size_t, std::size_t)>& fn);

}  // namespace hfnemo
