#include "pread.h"

#include <cerrno>
#include <unistd.h>

namespace hfnemo {

int pread_cols(int fd, void* dst, std::size_t rows, std::uint64_t offset, std::size_t src_row_bytes,
               std::size_t col_offset, std::size_t col_bytes) {
    auto* out = static_cast<unsigned char*>(dst);
    for (std::size_t r = 0; r < rows; ++r) {
        std::size_t done = 0;
        const std::uint64_t at = offset + r * src_row_bytes + col_offset;
        while (done < col_bytes) {
            ssize_t n = ::pread(fd, out + r * col_bytes + done, col_bytes - done, static_cast<off_t>(at + done));
            if (n < 0) {
                if (errno == EINTR) continue;
                return errno;
            }
            if (n == 0) return -1;  // the file ends early: the caller reports a truncated file
            done += static_cast<std::size_t>(n);
        }
    }
    return 0;
}

}  // namespace hfnemo
