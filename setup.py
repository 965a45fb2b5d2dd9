"""Build of the C core, rotalabs_steer._core. Metadata lives in pyproject.toml.

Environment switches:
  ROTALABS_STEER_SANITIZE=1   build with AddressSanitizer and UBSan (make test-asan)
  ROTALABS_STEER_WERROR=1     turn warnings into errors (make test, CI)
"""

import glob
import os

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

compile_args = ["-std=c11", "-Wall", "-Wextra", "-Wshadow", "-Wstrict-prototypes", "-O2"]
link_args = []
if os.environ.get("ROTALABS_STEER_WERROR") == "1":
    compile_args.append("-Werror")
if os.environ.get("ROTALABS_STEER_SANITIZE") == "1":
    sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                "-fno-sanitize-recover=undefined"]
    compile_args = [a for a in compile_args if a != "-O2"] + ["-O1", "-g"] + sanitize
    link_args += sanitize

core = Extension(
    "rotalabs_steer._core",
    sources=sorted(glob.glob("csrc/*.c")),
    depends=sorted(glob.glob("csrc/*.h")),
    include_dirs=["csrc", numpy.get_include()],
    define_macros=[("NPY_TARGET_VERSION", "NPY_1_22_API_VERSION")],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

class BuildExt(build_ext):
    """A wheel (``pip install .``, ``make wheel``) always compiles the core afresh: objects left in
    build/ by an earlier, differently configured build must never end up in it."""

    def finalize_options(self):
        super().finalize_options()
        if not self.inplace:
            self.force = True


setup(ext_modules=[core], cmdclass={"build_ext": BuildExt})
