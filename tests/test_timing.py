"""The benchmarks' profiler split helpers (CPU-testable parts)."""

from sparsedistill.timing import top_kernels


def test_top_kernels_sums_names_that_coincide_once_cut():
    times = {"void at::native::vectorized_elementwise_kernel<4, at::native::Foo>": 0.3,
             "void at::native::vectorized_elementwise_kernel<4, at::native::Bar>": 0.2, "gemm": 0.4, "tiny": 0.01}
    top = top_kernels(times, n=2, width=40)
    assert top == {"void at::native::vectorized_elementwise_": 0.5, "gemm": 0.4}  # summed, then ranked
    assert list(top_kernels(times, n=10, width=200).values()) == [0.4, 0.3, 0.2, 0.01]  # distinct names: each its own
