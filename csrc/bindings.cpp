// hfnemo._C: the pybind11 surface of the native kernels. Declarations only; the work lives in
// cast.cpp, gather.cpp and parallel.cpp. Buffers travel as integer addresses (tensor.data_ptr())
// and sizes; callers (hfnemo.kernels.cpp) validate them. Every call releases the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cast.h"
#include "gather.h"
#include "parallel.h"
#include "pread.h"

namespace py = pybind11;

#ifndef HFNEMO_BUILD_FLAGS
#define HFNEMO_BUILD_FLAGS "unknown"
#endif

namespace {
void* ptr(std::uintptr_t a) { return reinterpret_cast<void*>(a); }
}  // namespace

PYBIND11_MODULE(_C, m) {
    using py::arg;
    using Release = py::call_guard<py::gil_scoped_release>;
    m.doc() = "hfnemo native kernels (C++17): float casts, batched gather, column slice. Raw addresses in.";

    m.def("set_threads", &hfnemo::set_threads, arg("n"), "Worker threads per call (process-wide, >= 1).");
    m.def("get_threads", &hfnemo::get_threads, "Worker threads per call.");
    m.def("default_threads", &hfnemo::default_threads, "min(8, hardware threads).");
    m.def("_set_min_chunk_bytes", &hfnemo::set_min_chunk_bytes, arg("n"),
          "Testing knob: smallest per-thread range in bytes moved (default 1 MiB).");
    m.def("_min_chunk_bytes", &hfnemo::min_chunk_bytes);
    m.def("_set_cast_stream_min_bytes", &hfnemo::set_cast_stream_min_bytes, arg("n"),
          "Benchmark knob: casts with outputs of at least n bytes use streamed stores (default 8 MiB).");
    m.def("_cast_stream_min_bytes", &hfnemo::cast_stream_min_bytes);

    m.def(
        "cast",
        [](std::uintptr_t dst, const std::string& dst_dtype, std::uintptr_t src, const std::string& src_dtype,
           std::size_t n) {
            hfnemo::cast(ptr(dst), hfnemo::parse_dtype(dst_dtype), ptr(src), hfnemo::parse_dtype(src_dtype), n);
        },
        arg("dst"), arg("dst_dtype"), arg("src"), arg("src_dtype"), arg("n"), Release(),
        "Convert n elements at address src (src_dtype) into address dst (dst_dtype); dtypes: "
        "float64, float32, float16, bfloat16.");
    m.def(
        "copy", [](std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes) { hfnemo::copy(ptr(dst), ptr(src), nbytes); },
        arg("dst"), arg("src"), arg("nbytes"), Release(), "Multithreaded memcpy.");
    m.def(
        "gather",
        [](std::uintptr_t table, std::size_t npieces) {
            hfnemo::gather(static_cast<const hfnemo::Piece*>(ptr(table)), npieces);
        },
        arg("table"), arg("npieces"), Release(),
        "Batched memcpy: table is the address of npieces rows of int64 (dst_addr, src_addr, nbytes).");
    m.def(
        "slice_cols",
        [](std::uintptr_t dst, std::uintptr_t src, std::size_t rows, std::size_t src_row_bytes,
           std::size_t col_offset, std::size_t col_bytes) {
            hfnemo::slice_cols(ptr(dst), ptr(src), rows, src_row_bytes, col_offset, col_bytes);
        },
        arg("dst"), arg("src"), arg("rows"), arg("src_row_bytes"), arg("col_offset"), arg("col_bytes"), Release(),
        "dst[r*col_bytes:(r+1)*col_bytes] = src[r*src_row_bytes+col_offset:...+col_bytes] for r < rows.");
    m.def(
        "f32_to_bf16", [](std::uint32_t x) { return hfnemo::f32_to_bf16(x); }, arg("bits"));
    m.def(
        "f32_to_f16", [](std::uint32_t x) { return hfnemo::f32_to_f16(x); }, arg("bits"));
    m.def(
        "f16_to_f32", [](std::uint16_t h) { return hfnemo::f16_to_f32(h); }, arg("bits"));
    m.def("build_info", []() { return std::string(HFNEMO_BUILD_FLAGS); }, "Compiler flags of this build.");
    m.def(
        "pread_cols",
        [](int fd, std::uintptr_t dst, std::size_t rows, std::uint64_t offset, std::size_t src_row_bytes,
           std::size_t col_offset, std::size_t col_bytes) {
            return hfnemo::pread_cols(fd, ptr(dst), rows, offset, src_row_bytes, col_offset, col_bytes);
        },
        arg("fd"), arg("dst"), arg("rows"), arg("offset"), arg("src_row_bytes"), arg("col_offset"),
        arg("col_bytes"), Release(),
        "Read a column window of rows rows from fd into dst, one pread per row; 0, errno, or -1 at EOF.");
}
