"""Build hook for the optional C++ extension ``mmfast._C``.

The package is fully usable without the extension (the ``reference`` backend); set
``MMFAST_NO_EXT=1`` to skip building it. Sources are every ``csrc/*.cpp``.
"""
import glob
import os

from setuptools import setup


def _ext_modules():
    if os.environ.get("MMFAST_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch missing at build time: pure-Python install
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    args = ["-O3", "-fopenmp", "-march=x86-64-v2"] if os.name != "nt" else ["/O2", "/openmp"]
    ext = CppExtension(
        "mmfast._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args=args,
        extra_link_args=["-fopenmp"] if os.name != "nt" else [],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}  # ninja: the files compile in parallel


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
