"""Where the Triton kernels can run: on CUDA tensors, or anywhere under Triton's interpreter (tests)."""

import os

from torch import Tensor


def triton_can_run(t: Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
