// Byte movers: a batched memcpy of contiguous pieces, and the strided column slice that cuts a
// row-parallel shard out of full rows. Multithreaded over contiguous byte ranges (parallel.h);
// a piece or a row may be split between threads.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hfnemo {

// dst[0, nbytes) = src[0, nbytes), multithreaded.
void copy(void* dst, const void* src, std::size_t nbytes);

// One row of a gather table: copy nbytes from address src to address dst.
struct Piece {
    std::int64_t dst;
    std::int64_t src;
    std::int64_t nbytes;
};

// Copies every piece of table[0, npieces). Pieces must not overlap each other's destinations
// nor any source; nbytes < 0 throws std::invalid_argument (before anything is copied).
void gather(const Piece* table, std::size_t npieces);

// dst[r*col_bytes + c] = src[r*src_row_bytes + col_offset + c] for r < rows, c < col_bytes.
// col_offset + col_bytes > src_row_bytes throws std::invalid_argument.
void slice_cols(void* dst, const void* src, std::size_t rows, std::size_t src_row_bytes,
                std::size_t col_offset, std::size_t col_bytes);

}  // namespace hfnemo
