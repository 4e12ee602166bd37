"""cffi build script for ``fleeced._native`` (API mode, out-of-line).

Run by setuptools through ``setup(cffi_modules=["native/build_native.py:ffibuilder"])``
from the repository root; paths below are relative to it.  Declarations live in
``fleeced.cdef`` beside this file; the C compiler checks them against
``include/fleeced.h``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent

CFLAGS = [
    "-std=c11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-D_GNU_SOURCE",
    "-D_FILE_OFFSET_BITS=64",
    "-fstack-protector-strong",
    "-D_FORTIFY_SOURCE=2",
    "-pthread",
]

# FLEECED_SANITIZE=1 builds the module with AddressSanitizer and UBSan, for
# running the whole daemon under them (LD_PRELOAD the ASan runtime; see
# bench/soak.py --asan).  Never for releases.
SANITIZE = os.environ.get("FLEECED_SANITIZE") == "1"
SAN_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]

ffibuilder = FFI()
ffibuilder.cdef(_HERE.joinpath("fleeced.cdef").read_text())
ffibuilder.set_source(
    "fleeced._native",
    '#include "fleeced.h"',
    sources=sorted(str(p.relative_to(_ROOT)) for p in _HERE.joinpath("src").glob("*.c")),
    include_dirs=["native/include"],
    depends=sorted(
        str(p.relative_to(_ROOT))
        for p in [*_HERE.joinpath("src").glob("*.h"), *_HERE.joinpath("include").glob("*.h")]
    ),
    extra_compile_args=CFLAGS + (SAN_FLAGS if SANITIZE else []),
    extra_link_args=SAN_FLAGS if SANITIZE else [],
    libraries=["pthread", "nbd"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
