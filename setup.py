"""Build hook for the native core.

Everything declarative lives in pyproject.toml. This file exists to carry the pybind11 C++
extension in csrc/ (added by the kernels issue); until then it builds a pure-Python package.
"""
from setuptools import setup

setup()
