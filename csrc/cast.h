// Elementwise float casts between float64, float32, float16 and bfloat16, bit-identical to
// torch's CPU copy_ (x86 AVX2/AVX512 build, the vectorized main loop):
//
//   * narrowing rounds to nearest, ties to even; overflow gives +-inf; subnormals are produced
//     and consumed exactly; -0.0 stays -0.0;
//   * float64 -> float16 / bfloat16 goes through float32 (two roundings), as torch does;
//   * NaN (torch's bit patterns, matched bit for bit):
//       float32/float64 -> bfloat16 : 0xFFFF whatever the sign or payload
//       float16 -> bfloat16         : 0x7FC0
//       any other pair              : sign kept, quiet bit set, payload kept (widening) or
//                                     truncated to its top bits (narrowing), as the x86
//                                     conversion instructions do
//     (torch's scalar tail loops differ for NaN only: they give 0x7FC0 for float64 -> bfloat16
//     and 0x7FFFFFFF for float16 -> float32 on the last numel % vector-width elements of each
//     chunk; hfnemo follows the main loop everywhere).
//
// bfloat16 and float16 conversions are integer bit arithmetic in branch-free loops the compiler
// vectorizes (no float16 / bfloat16 compiler types), the portable definition. On x86-64 CPUs with
// F16C (AVX2) or AVX-512F, float32 -> float16, bfloat16 -> float16 and float16 -> float32 use the
// hardware conversions (vcvtps2ph with immediate RNE, vcvtph2ps, as torch does), picked at run
// time; they give the portable code's bits for every input, NaNs included, whatever MXCSR holds
// (checked over all 2^32 float32 inputs under default, FTZ|DAZ and round-to-zero). float16 subnormals
// alone use float32 operations that are exact (integer <-> float conversions of small integers,
// products by powers of two, truncation, Sterbenz subtraction): their results do not depend on
// the rounding mode or on FTZ/DAZ. float64 <-> float32 is the C++ cast (IEEE, round to nearest
// even; NaN quieted with its payload kept or truncated).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace hfnemo {

enum class DType : int { F64 = 0, F32 = 1, F16 = 2, BF16 = 3 };

// "float64", "float32", "float16", "bfloat16" (also "f64", "f32", "f16", "bf16", "double",
// "float", "half"); anything else throws std::invalid_argument.
DType parse_dtype(const std::string& name);
std::size_t dtype_size(DType t);

// dst[i] = src[i] converted, for i < n. Both buffers element-aligned and non-overlapping (the
// same buffer with the same dtype is allowed: nothing to do). Multithreaded (parallel.h).
void cast(void* dst, DType dst_t, const void* src, DType src_t, std::size_t n);

// Casts whose output is at least this many bytes write through a tile with streamed stores
// (default 8 MiB; a benchmarking knob).
void set_cast_stream_min_bytes(std::size_t n);
std::size_t cast_stream_min_bytes();

// Single-element conversions (bit patterns in, bit patterns out), the definitions of the loops.
std::uint16_t f32_to_bf16(std::uint32_t x);
std::uint16_t f32_to_f16(std::uint32_t x);
std::uint32_t f16_to_f32(std::uint16_t h);
std::uint16_t f16_to_bf16(std::uint16_t h);

}  // namespace hfnemo
