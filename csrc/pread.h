// Positional reads of a column window: the bytes of a row-parallel (tensor-parallel) shard,
// read straight from the file into place, one pread per row. Avoids reading whole rows into
// staging and cutting them, which costs TP times the tensor's bytes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hfnemo {

// For r < rows: read col_bytes at file offset + r*src_row_bytes + col_offset into dst + r*col_bytes.
// Returns 0 on success, else the errno of the failing pread (or -1 when the file ends early).
int pread_cols(int fd, void* dst, std::size_t rows, std::uint64_t offset, std::size_t src_row_bytes,
               std::size_t col_offset, std::size_t col_bytes);

}  // namespace hfnemo
