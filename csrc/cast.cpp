#include "cast.h"

#include <atomic>
#include <cstring>
#include <stdexcept>

#include "parallel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(HFNEMO_NO_CLONES)
#define HFNEMO_X86_F16 1  // run-time picked F16C / AVX-512 float16 loops (below)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace hfnemo {

namespace {

// Outputs at least this large are streamed. Measured (benchmarks/RESULTS.md): on an Intel Xeon the
// tiled streamed stores lift one-thread casts from 0.70-0.93 to 0.79-1.55 of copy_; on the AMD EPYC
// CI VM they lower them from 0.87-1.03 to 0.60-0.87. So: on by default on Intel CPUs only.
std::size_t stream_min_default();
std::atomic<std::size_t> g_stream_min{stream_min_default()};
constexpr std::size_t kStreamTile = 16384;         // bytes of output converted per tile

using u16 = std::uint16_t;
using u32 = std::uint32_t;

// All-ones when c, else zero: keeps the selects below branch-free so the loops vectorize.
inline u32 mask(bool c) { return 0u - static_cast<u32>(c); }
inline u32 select(bool c, u32 x, u32 y) { return (x & mask(c)) | (y & ~mask(c)); }

inline u32 bits_of(float f) {
    u32 u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float float_of(u32 u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// float32 -> bfloat16 for a non-NaN input: round the 16 dropped bits to nearest even (a carry
// into the exponent is the right result, up to +-inf).
inline u32 k_f32_to_bf16_rne(u32 x) { return (x + 0x7fffu + ((x >> 16) & 1u)) >> 16; }

// float32 -> bfloat16, torch's vectorized rule for NaN: 0xFFFF.
inline u32 k_f32_to_bf16(u32 x) {
    const u32 a = x & 0x7fffffffu;
    const u32 r = k_f32_to_bf16_rne(x);
    return a > 0x7f800000u ? 0xffffu : r;
}

// ---- float16: integer bit arithmetic, plus exact float operations for the subnormals ----

// float32 -> float16 as the x86 F16C instruction (vcvtps2ph, round to nearest even): NaN keeps
// its sign and top 9 payload bits with the quiet bit set; |x| >= 65520 gives inf. A subnormal result
// (2^-25 < |x| < 2^-14) is RNE(|x| * 2^24) computed with exact float operations only: the
// product by 2^24 is exact, truncation to integer (cvtt) and back is exact and ignores the
// rounding mode, the remainder t - trunc(t) is exact (Sterbenz), and no value is denormal.
inline u32 k_f32_to_f16(u32 x) {
    const u32 sign = (x >> 16) & 0x8000u;
    const u32 a = x & 0x7fffffffu;
    const u32 nb = a - 0x38000000u;
    const u32 normal = (nb + 0xfffu + ((nb >> 13) & 1u)) >> 13;
    // |x| clamped to [2^-25, 2^-14] (other lanes are selected away): no overflow, no denormal.
    const u32 ac = select(a < 0x33000000u, 0x33000000u, select(a < 0x38800000u, a, 0x38800000u));
    const float t = float_of(ac) * 16777216.0f;
    const std::int32_t q0 = static_cast<std::int32_t>(t);                               // truncation
    const float rem = t - static_cast<float>(q0);
    const u32 q = static_cast<u32>(q0);
    const u32 sub = q + (mask(rem > 0.5f) & 1u) + (mask(rem == 0.5f) & q & 1u);
    u32 r = sub & mask(a > 0x33000000u);
    r = select(a >= 0x38800000u, normal, r);
    r = select(a >= 0x477ff000u, 0x7c00u, r);
    r = select(a > 0x7f800000u, 0x7e00u | ((a >> 13) & 0x3ffu), r);
    return sign | r;
}

// float16 -> float32, exact, branch-free; NaN quiet bit set, payload kept (as vcvtph2ps). A
// subnormal (m * 2^-24, m = 1..1023) is normalized by converting the integer m to float32 (an
// exact conversion: no rounding, no denormal in or out, so no rounding mode or FTZ/DAZ effect)
// and subtracting 24 from its exponent.
inline u32 k_f16_to_f32(u32 h) {
    const u32 a = h & 0x7fffu;
    const u32 sub = bits_of(static_cast<float>(static_cast<std::int32_t>(a))) - (24u << 23);
    u32 r = select(a >= 0x400u, (a << 13) + 0x38000000u, sub & mask(a != 0u));
    r = select(a >= 0x7c00u, (a << 13) | 0x7f800000u | (0x400000u & mask(a > 0x7c00u)), r);
    return ((h & 0x8000u) << 16) | r;
}

inline u32 k_f16_to_bf16(u32 h) {
    return select((h & 0x7fffu) > 0x7c00u, 0x7fc0u, k_f32_to_bf16_rne(k_f16_to_f32(h)));
}

// ---- loops over [b, e) ----
//
// Each loop is compiled for the baseline ISA and, on x86-64 Linux with GCC/Clang, cloned for
// x86-64-v3 (AVX2) and x86-64-v4 (AVX-512) with the clone picked at load time (ifunc): no
// -march flag, the same .so runs everywhere. The element code is identical in every clone.

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(HFNEMO_NO_CLONES)
#define HFNEMO_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define HFNEMO_CLONES
#endif
#if defined(__GNUC__) || defined(__clang__)
#define HFNEMO_INLINE inline __attribute__((always_inline))
#else
#define HFNEMO_INLINE inline
#endif

// dst[i] = conv(src[i]): a plain loop the compiler vectorizes.
template <class S, class D, class Conv>
HFNEMO_INLINE void plain_loop(const void* src_v, void* dst_v, std::size_t b, std::size_t e, Conv conv) {
    const S* __restrict src = static_cast<const S*>(src_v);
    D* __restrict dst = static_cast<D*>(dst_v);
    for (std::size_t i = b; i < e; ++i) dst[i] = static_cast<D>(conv(src[i]));
}

#define HFNEMO_PLAIN(NAME, S, D, EXPR)                                                          \
    HFNEMO_CLONES void NAME(const void* s, void* d, std::size_t b, std::size_t e) {             \
        plain_loop<S, D>(s, d, b, e, [](S v) { return EXPR; });                                 \
    }

HFNEMO_PLAIN(loop_f32_bf16, u32, u16, k_f32_to_bf16(v))
HFNEMO_PLAIN(loop_f32_f16, u32, u16, k_f32_to_f16(v))
HFNEMO_PLAIN(loop_f32_f64, float, double, static_cast<double>(v))
HFNEMO_PLAIN(loop_bf16_f32, u16, u32, static_cast<u32>(v) << 16)
HFNEMO_PLAIN(loop_bf16_f16, u16, u16, k_f32_to_f16(static_cast<u32>(v) << 16))
HFNEMO_PLAIN(loop_bf16_f64, u16, double, static_cast<double>(float_of(static_cast<u32>(v) << 16)))
HFNEMO_PLAIN(loop_f16_f32, u16, u32, k_f16_to_f32(v))
HFNEMO_PLAIN(loop_f16_bf16, u16, u16, k_f16_to_bf16(v))
HFNEMO_PLAIN(loop_f16_f64, u16, double, static_cast<double>(float_of(k_f16_to_f32(v))))
HFNEMO_PLAIN(loop_f64_f32, double, float, static_cast<float>(v))
HFNEMO_PLAIN(loop_f64_f16, double, u16, k_f32_to_f16(bits_of(static_cast<float>(v))))
HFNEMO_PLAIN(loop_f64_bf16, double, u16, k_f32_to_bf16(bits_of(static_cast<float>(v))))

#undef HFNEMO_PLAIN

using LoopFn = void (*)(const void*, void*, std::size_t, std::size_t);

// ---- float16 with the x86 conversion instructions (F16C, AVX-512F) ----
//
// vcvtps2ph with an immediate round-to-nearest-even (imm8 = 0: MXCSR.RC not used) and vcvtph2ps
// are the instructions torch's vectorized copy_ uses on AVX2 / AVX-512 builds, and they give the
// bits of k_f32_to_f16 / k_f16_to_f32 for every input, NaNs included (quiet bit set, sign and the
// top payload bits kept; checked over all 2^32 float32 inputs). Their results do not depend on
// MXCSR (no float32 denormal input can round to anything but +-0 in float16, and vcvtph2ps /
// vcvtps2ph ignore FTZ for their float16 side). Picked at run time (cpuid), the same .so runs
// everywhere; the tails (< one vector) use the portable element code, which gives the same bits.

#ifdef HFNEMO_X86_F16
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push  // GCC 12's AVX-512 headers: false -Wmaybe-uninitialized (_mm512_undefined_*)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define HFNEMO_AVX2_F16C __attribute__((target("avx,avx2,f16c")))
#define HFNEMO_AVX512 __attribute__((target("avx512f")))

HFNEMO_AVX2_F16C void loop_f32_f16_f16c(const void* s, void* d, std::size_t b, std::size_t e) {
    const float* src = static_cast<const float*>(s);
    u16* dst = static_cast<u16*>(d);
    std::size_t i = b;
    for (; i + 32 <= e; i += 32) {
        const __m256 x0 = _mm256_loadu_ps(src + i), x1 = _mm256_loadu_ps(src + i + 8);
        const __m256 x2 = _mm256_loadu_ps(src + i + 16), x3 = _mm256_loadu_ps(src + i + 24);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(x0, _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 8), _mm256_cvtps_ph(x1, _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 16), _mm256_cvtps_ph(x2, _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 24), _mm256_cvtps_ph(x3, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i + 8 <= e; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    const u32* su = static_cast<const u32*>(s);
    for (; i < e; ++i) dst[i] = static_cast<u16>(k_f32_to_f16(su[i]));
}

HFNEMO_AVX512 void loop_f32_f16_avx512(const void* s, void* d, std::size_t b, std::size_t e) {
    const float* src = static_cast<const float*>(s);
    u16* dst = static_cast<u16*>(d);
    std::size_t i = b;
    for (; i + 64 <= e; i += 64) {
        const __m512 x0 = _mm512_loadu_ps(src + i), x1 = _mm512_loadu_ps(src + i + 16);
        const __m512 x2 = _mm512_loadu_ps(src + i + 32), x3 = _mm512_loadu_ps(src + i + 48);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtps_ph(x0, _MM_FROUND_TO_NEAREST_INT));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 16), _mm512_cvtps_ph(x1, _MM_FROUND_TO_NEAREST_INT));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 32), _mm512_cvtps_ph(x2, _MM_FROUND_TO_NEAREST_INT));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 48), _mm512_cvtps_ph(x3, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i + 16 <= e; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    const u32* su = static_cast<const u32*>(s);
    for (; i < e; ++i) dst[i] = static_cast<u16>(k_f32_to_f16(su[i]));
}

HFNEMO_AVX2_F16C void loop_bf16_f16_f16c(const void* s, void* d, std::size_t b, std::size_t e) {
    const u16* src = static_cast<const u16*>(s);
    u16* dst = static_cast<u16*>(d);
    std::size_t i = b;
    for (; i + 8 <= e; i += 8) {
        const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))), 16);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_castsi256_ps(w), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < e; ++i) dst[i] = static_cast<u16>(k_f32_to_f16(static_cast<u32>(src[i]) << 16));
}

HFNEMO_AVX512 void loop_bf16_f16_avx512(const void* s, void* d, std::size_t b, std::size_t e) {
    const u16* src = static_cast<const u16*>(s);
    u16* dst = static_cast<u16*>(d);
    std::size_t i = b;
    for (; i + 16 <= e; i += 16) {
        const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))), 16);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtps_ph(_mm512_castsi512_ps(w), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < e; ++i) dst[i] = static_cast<u16>(k_f32_to_f16(static_cast<u32>(src[i]) << 16));
}

HFNEMO_AVX2_F16C void loop_f16_f32_f16c(const void* s, void* d, std::size_t b, std::size_t e) {
    const u16* src = static_cast<const u16*>(s);
    float* dst = static_cast<float*>(d);
    std::size_t i = b;
    for (; i + 32 <= e; i += 32) {
        const __m128i h0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        const __m128i h1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 8));
        const __m128i h2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
        const __m128i h3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 24));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h0));
        _mm256_storeu_ps(dst + i + 8, _mm256_cvtph_ps(h1));
        _mm256_storeu_ps(dst + i + 16, _mm256_cvtph_ps(h2));
        _mm256_storeu_ps(dst + i + 24, _mm256_cvtph_ps(h3));
    }
    for (; i + 8 <= e; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    u32* du = static_cast<u32*>(d);
    for (; i < e; ++i) du[i] = k_f16_to_f32(src[i]);
}

HFNEMO_AVX512 void loop_f16_f32_avx512(const void* s, void* d, std::size_t b, std::size_t e) {
    const u16* src = static_cast<const u16*>(s);
    float* dst = static_cast<float*>(d);
    std::size_t i = b;
    for (; i + 64 <= e; i += 64) {
        const __m256i h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
        const __m256i h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 16));
        const __m256i h2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
        const __m256i h3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 48));
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h0));
        _mm512_storeu_ps(dst + i + 16, _mm512_cvtph_ps(h1));
        _mm512_storeu_ps(dst + i + 32, _mm512_cvtph_ps(h2));
        _mm512_storeu_ps(dst + i + 48, _mm512_cvtph_ps(h3));
    }
    for (; i + 16 <= e; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
    u32* du = static_cast<u32*>(d);
    for (; i < e; ++i) du[i] = k_f16_to_f32(src[i]);
}

#undef HFNEMO_AVX2_F16C
#undef HFNEMO_AVX512
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// 2: AVX-512F usable (CPU and OS), 1: AVX2 + F16C usable, 0: neither.
int f16_isa() {
    static const int isa = [] {
        unsigned a = 0, b = 0, c = 0, d = 0;
        const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
        __builtin_cpu_init();
        if (f16c && __builtin_cpu_supports("avx512f")) return 2;
        if (f16c && __builtin_cpu_supports("avx2")) return 1;
        return 0;
    }();
    return isa;
}

// Streamed (non-temporal) copy of whole 64-byte lines from an L1-resident tile to a 64-byte
// aligned destination: large casts write through these so the destination lines are not read
// first (no read-for-ownership), as memcpy does for large copies.
__attribute__((target("avx512f"))) void stream_lines_avx512(void* d, const void* s, std::size_t n) {
    char* dst = static_cast<char*>(d);
    const char* src = static_cast<const char*>(s);
    for (std::size_t i = 0; i < n; i += 64)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_load_si512(reinterpret_cast<const void*>(src + i)));
}

__attribute__((target("avx"))) void stream_lines_avx(void* d, const void* s, std::size_t n) {
    char* dst = static_cast<char*>(d);
    const char* src = static_cast<const char*>(s);
    for (std::size_t i = 0; i < n; i += 32)
        _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_load_si256(reinterpret_cast<const __m256i*>(src + i)));
}
#endif  // HFNEMO_X86_F16

LoopFn loop_for(DType s, DType d) {
    static const LoopFn table[4][4] = {
        // dst:   F64            F32            F16            BF16          (src row)
        {nullptr, loop_f64_f32, loop_f64_f16, loop_f64_bf16},      // F64
        {loop_f32_f64, nullptr, loop_f32_f16, loop_f32_bf16},      // F32
        {loop_f16_f64, loop_f16_f32, nullptr, loop_f16_bf16},      // F16
        {loop_bf16_f64, loop_bf16_f32, loop_bf16_f16, nullptr},    // BF16
    };
#ifdef HFNEMO_X86_F16
    if (const int isa = f16_isa()) {
        if (s == DType::F32 && d == DType::F16) return isa == 2 ? loop_f32_f16_avx512 : loop_f32_f16_f16c;
        if (s == DType::F16 && d == DType::F32) return isa == 2 ? loop_f16_f32_avx512 : loop_f16_f32_f16c;
        if (s == DType::BF16 && d == DType::F16) return isa == 2 ? loop_bf16_f16_avx512 : loop_bf16_f16_f16c;
    }
#endif
    return table[static_cast<int>(s)][static_cast<int>(d)];
}

}  // namespace

DType parse_dtype(const std::string& name) {
    if (name == "float64" || name == "f64" || name == "double") return DType::F64;
    if (name == "float32" || name == "f32" || name == "float") return DType::F32;
    if (name == "float16" || name == "f16" || name == "half") return DType::F16;
    if (name == "bfloat16" || name == "bf16") return DType::BF16;
    throw std::invalid_argument("unsupported dtype '" + name + "' (float64, float32, float16, bfloat16)");
}

std::size_t dtype_size(DType t) {
    switch (t) {
        case DType::F64: return 8;
        case DType::F32: return 4;
        case DType::F16:
        case DType::BF16: return 2;
    }
    throw std::invalid_argument("bad dtype");
}

void cast(void* dst, DType dst_t, const void* src, DType src_t, std::size_t n) {
    if (n == 0) return;
    const std::size_t ss = dtype_size(src_t), ds = dtype_size(dst_t);
    if (dst_t == src_t) {
        if (dst == src) return;
        char* d = static_cast<char*>(dst);
        const char* s = static_cast<const char*>(src);
        parallel_for(n * ss, 2.0, 64, [=](std::size_t b, std::size_t e) { std::memcpy(d + b, s + b, e - b); });
        return;
    }
    const LoopFn fn = loop_for(src_t, dst_t);
#ifdef HFNEMO_X86_F16
    // Large outputs: convert a 16 KiB tile at a time into a thread-local (L1/L2-resident) buffer
    // and stream it out in whole lines (one memory pass per destination byte instead of a read
    // for ownership plus the write). 1-thread bf16 -> fp32 on a Xeon: 0.79 -> see RESULTS.md.
    if (n * ds >= g_stream_min.load() && f16_isa() > 0) {
        const auto stream = f16_isa() == 2 ? stream_lines_avx512 : stream_lines_avx;
        parallel_for(n, static_cast<double>(ss + ds), 64, [=](std::size_t b, std::size_t e) {
            alignas(64) static thread_local unsigned char tile[kStreamTile];
            char* d = static_cast<char*>(dst);
            const char* s = static_cast<const char*>(src);
            std::size_t i = b;
            // head: element by element up to a 64-byte destination line (at most 31 elements)
            while (i < e && (reinterpret_cast<std::uintptr_t>(d + i * ds) & 63u)) {
                fn(src, dst, i, i + 1);
                ++i;
            }
            const std::size_t per_tile = kStreamTile / ds;
            while (i < e) {
                std::size_t m = e - i < per_tile ? e - i : per_tile;
                m -= m % (64 / ds);  // whole lines only
                if (m == 0) break;
                fn(s + i * ss, tile, 0, m);
                stream(d + i * ds, tile, m * ds);
                i += m;
            }
            if (i < e) fn(src, dst, i, e);  // tail shorter than a line
            _mm_sfence();  // streamed stores visible before the range is reported done
        });
        return;
    }
#endif
    // Ranges start on multiples of 64 elements: whole cache lines on both sides when aligned.
    parallel_for(n, static_cast<double>(ss + ds), 64,
                 [=](std::size_t b, std::size_t e) { fn(src, dst, b, e); });
}

namespace {
std::size_t stream_min_default() {
#ifdef HFNEMO_X86_F16
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid(0, &a, &b, &c, &d) && b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu)
        return std::size_t(8) << 20;  // "GenuineIntel"
#endif
    return ~std::size_t(0);
}
}  // namespace

void set_cast_stream_min_bytes(std::size_t n) { g_stream_min.store(n); }
std::size_t cast_stream_min_bytes() { return g_stream_min.load(); }

std::uint16_t f32_to_bf16(std::uint32_t x) { return static_cast<std::uint16_t>(k_f32_to_bf16(x)); }
std::uint16_t f32_to_f16(std::uint32_t x) { return static_cast<std::uint16_t>(k_f32_to_f16(x)); }
std::uint32_t f16_to_f32(std::uint16_t h) { return k_f16_to_f32(h); }
std::uint16_t f16_to_bf16(std::uint16_t h) { return static_cast<std::uint16_t>(k_f16_to_bf16(h)); }

}  // namespace hfnemo
