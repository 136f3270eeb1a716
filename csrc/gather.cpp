#include "gather.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(HFNEMO_NO_CLONES)
#define HFNEMO_X86_ROWS 1  // run-time picked AVX2 / AVX-512 row copies for slice_cols (below)
#include <immintrin.h>
#endif

namespace hfnemo {

namespace {

// slice_cols over the output byte range [b, e): row b / col_bytes from column b % col_bytes.
//
// Portable: one memcpy a row. On x86-64 (picked at run time) an inlined vector copy a row that
// prefetches the first 512 bytes of the next source row (the hardware prefetcher restarts at every
// row, the software one hides that start), and for outputs >= kStreamBytes non-temporal stores of
// whole 64-byte destination lines (no read-for-ownership of the destination, which would not stay
// in cache anyway). Measured on a 2-core AMD EPYC (AVX-512) VM, 256 MiB of 56 KiB rows, one
// thread, vs one memcpy a row: 1.3-1.6x; see benchmarks/RESULTS.md "CPU kernels".
struct SliceArgs {
    char* d;
    const char* s;  // src + col_offset
    std::size_t src_row_bytes, col_bytes;
    bool stream;
};
using SliceFn = void (*)(const SliceArgs&, std::size_t, std::size_t);

constexpr std::size_t kStreamBytes = std::size_t(8) << 20;

void slice_memcpy(const SliceArgs& a, std::size_t b, std::size_t e) {
    std::size_t r = b / a.col_bytes, c = b % a.col_bytes;
    while (b < e) {
        const std::size_t n = std::min(a.col_bytes - c, e - b);
        std::memcpy(a.d + b, a.s + r * a.src_row_bytes + c, n);
        b += n;
        ++r;
        c = 0;
    }
}

#ifdef HFNEMO_X86_ROWS

// V: the vector type's traits (W bytes a vector, 4 vectors a step).
#define HFNEMO_SLICE_BODY(ATTR, NAME, VEC, W, LOAD, STORE, STREAM)                                  \
    ATTR void NAME(const SliceArgs& a, std::size_t b, std::size_t e) {                               \
        std::size_t r = b / a.col_bytes, c = b % a.col_bytes;                                         \
        while (b < e) {                                                                               \
            const std::size_t n = std::min(a.col_bytes - c, e - b);                                   \
            const char* src = a.s + r * a.src_row_bytes + c;                                          \
            char* dst = a.d + b;                                                                      \
            if (b + n < e) {                                                                          \
                const char* next = a.s + (r + 1) * a.src_row_bytes;                                   \
                for (int k = 0; k < 8; ++k) _mm_prefetch(next + 64 * k, _MM_HINT_T0);               \
            }                                                                                         \
            std::size_t i = 0;                                                                        \
            if (n >= 4 * W) {                                                                         \
                if (a.stream) {                                                                       \
                    /* head up to a 64-byte destination line, then whole lines streamed */           \
                    const std::size_t head = (64 - (reinterpret_cast<std::uintptr_t>(dst) & 63)) & 63; \
                    std::memcpy(dst, src, head);                                                      \
                    i = head;                                                                         \
                    for (; i + 4 * W <= n; i += 4 * W) {                                              \
                        const VEC x0 = LOAD(src + i), x1 = LOAD(src + i + W);                         \
                        const VEC x2 = LOAD(src + i + 2 * W), x3 = LOAD(src + i + 3 * W);             \
                        STREAM(dst + i, x0);                                                          \
                        STREAM(dst + i + W, x1);                                                      \
                        STREAM(dst + i + 2 * W, x2);                                                  \
                        STREAM(dst + i + 3 * W, x3);                                                  \
                    }                                                                                 \
                } else {                                                                              \
                    for (; i + 4 * W <= n; i += 4 * W) {                                              \
                        const VEC x0 = LOAD(src + i), x1 = LOAD(src + i + W);                         \
                        const VEC x2 = LOAD(src + i + 2 * W), x3 = LOAD(src + i + 3 * W);             \
                        STORE(dst + i, x0);                                                           \
                        STORE(dst + i + W, x1);                                                       \
                        STORE(dst + i + 2 * W, x2);                                                   \
                        STORE(dst + i + 3 * W, x3);                                                   \
                    }                                                                                 \
                }                                                                                     \
            }                                                                                         \
            std::memcpy(dst + i, src + i, n - i);                                                     \
            b += n;                                                                                   \
            ++r;                                                                                      \
            c = 0;                                                                                    \
        }                                                                                             \
        if (a.stream) _mm_sfence(); /* streamed stores visible before the range is reported done */ \
    }

#define HFNEMO_LD256(p) _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
#define HFNEMO_ST256(p, x) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x)
#define HFNEMO_NT256(p, x) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), x)
#define HFNEMO_LD512(p) _mm512_loadu_si512(p)
#define HFNEMO_ST512(p, x) _mm512_storeu_si512(p, x)
#define HFNEMO_NT512(p, x) _mm512_stream_si512(reinterpret_cast<__m512i*>(p), x)

HFNEMO_SLICE_BODY(__attribute__((target("avx2"))), slice_avx2, __m256i, 32, HFNEMO_LD256, HFNEMO_ST256, HFNEMO_NT256)
HFNEMO_SLICE_BODY(__attribute__((target("avx512f"))), slice_avx512, __m512i, 64, HFNEMO_LD512, HFNEMO_ST512,
                  HFNEMO_NT512)

#undef HFNEMO_SLICE_BODY
#undef HFNEMO_LD256
#undef HFNEMO_ST256
#undef HFNEMO_NT256
#undef HFNEMO_LD512
#undef HFNEMO_ST512
#undef HFNEMO_NT512

SliceFn slice_fn() {
    static const SliceFn fn = [] {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f")) return &slice_avx512;
        if (__builtin_cpu_supports("avx2")) return &slice_avx2;
        return &slice_memcpy;
    }();
    return fn;
}
#else
SliceFn slice_fn() { return &slice_memcpy; }
#endif

}  // namespace

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
    const SliceArgs args{d, s, src_row_bytes, col_bytes, rows * col_bytes >= kStreamBytes};
    const SliceFn fn = slice_fn();
    parallel_for(rows * col_bytes, 2.0, 64, [&args, fn](std::size_t b, std::size_t e) { fn(args, b, e); });
}

}  // namespace hfnemo
