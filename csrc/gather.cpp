#include "gather.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"

namespace hfnemo {

void copy(void* dst, const void* src, std::size_t nbytes) {
    if (nbytes == 0 || dst == src) return;
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    parallel_for(nbytes, 2.0, 64, [=](std::size_t b, std::size_t e) { std::memcpy(d + b, s + b, e - b); });
}

void gather(const Piece* table, std::size_t npieces) {
    if (npieces == 0) return;
    // starts[i]: offset of piece i in the concatenation of all pieces' bytes.
    std::vector<std::size_t> starts(npieces + 1);
    std::size_t total = 0;
    for (std::size_t i = 0; i < npieces; ++i) {
        if (table[i].nbytes < 0)
            throw std::invalid_argument("gather: piece " + std::to_string(i) + " has a negative size");
        starts[i] = total;
        total += static_cast<std::size_t>(table[i].nbytes);
    }
    starts[npieces] = total;
    if (total == 0) return;
    const std::size_t* st = starts.data();
    parallel_for(total, 2.0, 64, [=](std::size_t b, std::size_t e) {
        // First piece that holds byte b (skips empty pieces: upper_bound - 1).
        std::size_t i = static_cast<std::size_t>(std::upper_bound(st, st + npieces, b) - st) - 1;
        while (b < e) {
            const Piece& p = table[i];
            const std::size_t within = b - st[i];
            const std::size_t n = std::min(e, st[i + 1]) - b;
            if (n) {
                std::memcpy(reinterpret_cast<char*>(static_cast<std::uintptr_t>(p.dst)) + within,
                            reinterpret_cast<const char*>(static_cast<std::uintptr_t>(p.src)) + within, n);
            }
            b += n;
            ++i;
        }
    });
}

void slice_cols(void* dst, const void* src, std::size_t rows, std::size_t src_row_bytes,
                std::size_t col_offset, std::size_t col_bytes) {
    if (col_offset > src_row_bytes || col_bytes > src_row_bytes - col_offset)
        throw std::invalid_argument("slice_cols: col_offset + col_bytes exceeds src_row_bytes");
    if (rows == 0 || col_bytes == 0) return;
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src) + col_offset;
    if (col_bytes == src_row_bytes) {  // whole rows: one contiguous copy
        copy(d, s, rows * col_bytes);
        return;
    }
    // Byte range [b, e) of the output: row b / col_bytes from column b % col_bytes.
    parallel_for(rows * col_bytes, 2.0, 64, [=](std::size_t b, std::size_t e) {
        std::size_t r = b / col_bytes, c = b % col_bytes;
        while (b < e) {
            const std::size_t n = std::min(col_bytes - c, e - b);
            std::memcpy(d + b, s + r * src_row_bytes + c, n);
            b += n;
            ++r;
            c = 0;
        }
    });
}

}  // namespace hfnemo
