"""Build hook for the native core.

Everything declarative lives in pyproject.toml. This file only adds the pybind11 extension
``hfnemo._C`` (csrc/). The extension is optional: when it cannot be built (no compiler, no
pybind11) the install still succeeds, with a warning, and hfnemo runs on the torch reference
kernels (see hfnemo.kernels.get_backend).
"""
import os
import sys
from glob import glob

from setuptools import setup

CXX_FLAGS = ["-O3"]  # portable: no -march (the compiler vectorizes for the baseline ISA)

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pybind11 missing (a --no-build-isolation install without it)
    print("WARNING: pybind11 not found; building hfnemo without its native kernels (hfnemo._C)",
          file=sys.stderr)
    setup()
else:

    class OptionalBuildExt(build_ext):
        """build_ext that turns a failed native build into a warning."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - distutils raises several unrelated types
                self._warn(e)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                self._warn(e)

        @staticmethod
        def _warn(e):
            print(f"WARNING: could not build hfnemo._C ({type(e).__name__}: {e}); hfnemo will use the "
                  "torch reference kernels", file=sys.stderr)

    flags = [] if sys.platform == "win32" else CXX_FLAGS
    ext = Pybind11Extension(
        "hfnemo._C",
        sorted(glob(os.path.join("csrc", "*.cpp"))),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=flags,
        extra_link_args=[] if sys.platform == "win32" else ["-pthread"],
        define_macros=[("HFNEMO_BUILD_FLAGS", '"' + " ".join(["-std=c++17"] + flags) + '"')],
    )
    setup(ext_modules=[ext], cmdclass={"build_ext": OptionalBuildExt})
