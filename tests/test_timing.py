"""The benchmarks' profiler split helpers (CPU-testable parts)."""

from sparsedistill.timing import top_kernels


def test_top_kernels_sums_names_that_coincide_once_cut():
    times = {"void at::native::vectorized_elementwise_kernel<4, at::native::Foo>": 0.3,
             "void at::native::vectorized_elementwise_kernel<4, at::native::Bar>": 0.2, "gemm": 0.4, "tiny": 0.01}
    top = top_kernels(times, n=2, width=40)
    assert top == {"void at::native::vectorized_elementwise_": 0.5, "gemm": 0.4}  # summed, then ranked
    assert list(top_kernels(times, n=10, width=200).values()) == [0.4, 0.3, 0.2, 0.01]  # distinct names: each its own


def test_kernel_groups_take_the_first_matching_group_and_keep_the_rest():
    from sparsedistill.timing import kernel_groups

    times = {"sm90_xmma_sparse_gemm_s8": 1.0, "sm90_xmma_gemm_f16": 2.0, "pytorch_flash::flash_fwd_kernel": 0.5,
             "triton_per_fused_native_layer_norm_0": 0.25, "Memcpy DtoD": 0.125}
    groups = {"sparse GEMM": ("sparse",), "GEMM": ("gemm",), "attention": ("flash", "fmha"), "conv": ("conv",)}
    assert kernel_groups(times, groups) == {"sparse GEMM": 1.0, "GEMM": 2.0, "attention": 0.5, "conv": 0.0,
                                            "other": 0.375}
