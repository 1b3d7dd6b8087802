"""The benchmarks' profiler split helpers (CPU-testable parts)."""

import pytest
import torch

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


def test_host_sync_sites_name_the_line_that_waited_and_pass_other_warnings_on(monkeypatch):
    """On the CPU the sync debug mode is emulated: a warning like CUDA's, raised where an op would wait."""
    import warnings

    from sparsedistill.timing import host_sync_sites, host_syncs

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def waits_twice():
        # torch's notice the first time the mode is set (2026-12-07, H100: counted as a wait of B0's step before)
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing "
                      "operations")
        warnings.warn("called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:146.)")
        warnings.warn("something else")
        warnings.warn("called a synchronizing CUDA operation")

    with pytest.warns(UserWarning) as shown:
        sites = host_sync_sites(waits_twice)
    assert [str(w.message)[:14] for w in shown] == ["Synchronizatio", "something else"]
    assert len(sites) == 2 and all(s.startswith("test_timing.py:") and " waits_twice <- test_timing.py:" in s for s in sites)
    assert sites[0] != sites[1]  # two lines
    assert modes == ["warn", 0]  # the mode found is restored
    assert host_syncs(lambda: None) == 0


def test_lap_timer_charges_each_stage_the_time_since_the_last_lap():
    import time

    from sparsedistill.timing import LapTimer

    lap = LapTimer("cpu")
    time.sleep(0.02)
    first = lap()
    second = lap()
    assert first >= 0.02 and 0 <= second < first
