"""When Inductor's C++ backend (real kernels compiled on the CPU) can run in this environment."""

from __future__ import annotations

import pytest
import torch

_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])

# torch before 2.14 hands its own library folder to the linker unquoted: with a space in the path of the
# environment (a project folder such as "My Projects"), every C++ kernel fails to link. The app never compiles
# on the CPU; only these tests of the compile machinery do.
needs_cpp_inductor = pytest.mark.skipif(
    " " in torch.__file__ and _VERSION < (2, 14),
    reason=f"torch {torch.__version__}'s Inductor cannot link C++ kernels from a path with a space "
           f"({torch.__file__})")
