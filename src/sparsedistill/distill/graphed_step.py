"""A whole training step captured in one CUDA graph: forward, backward, gradient all-reduce, clip, AdamW, masks.

Why: a small model (the ViT recipe's 2.7M parameters) spends most of its step launching kernels
from the host, so the GPU idles and a second GPU cannot help (docs/notes/scaling.md). Replaying a
captured step leaves the host nothing to do but copy the batch: 5.77 vs 10.54 ms a step on one
H200 in ``benchmarks/probes/train_step_probe.py``.

What a captured step may do: CUDA work on tensors of fixed shapes, the same Python path every step,
no host reads of device values (``.item()``, ``if tensor:``, printing). The batch is copied into
static buffers before each replay; the learning rate is a device tensor the caller fills; under
``torchrun`` the gradients are averaged by one coalesced all-reduce inside the graph (no DDP
wrapper: its hooks are not capturable).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .. import distributed as dist

__all__ = ["GraphedStep"]


def _clone_tree(x: Any, device: torch.device) -> Any:
    """Static buffers on the model's device: a host batch is copied in before each replay, outside the graph."""
    if isinstance(x, Tensor):
        return x.detach().to(device, copy=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_clone_tree(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _clone_tree(v, device) for k, v in x.items()}
    return x


def _copy_into(static: Any, new: Any, where: str = "batch") -> None:
    """Copy ``new`` into the static buffers, refusing anything the captured graph could not read."""
    if isinstance(static, Tensor):
        if not isinstance(new, Tensor) or new.shape != static.shape or new.dtype != static.dtype:
            got = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, Tensor) else type(new).__name__
            raise ValueError(f"cuda_graph: {where} must keep the shape and dtype it was captured with "
                             f"({tuple(static.shape)} {static.dtype}), got {got}; set cuda_graph = false for varying batches")
        static.copy_(new, non_blocking=True)
    elif isinstance(static, (tuple, list)):
        if not isinstance(new, (tuple, list)) or len(new) != len(static):
            raise ValueError(f"cuda_graph: {where} changed structure since capture")
        for i, (a, b) in enumerate(zip(static, new)):
            _copy_into(a, b, f"{where}[{i}]")
    elif isinstance(static, dict):
        if not isinstance(new, dict) or new.keys() != static.keys():
            raise ValueError(f"cuda_graph: {where} changed keys since capture")
        for k in static:
            _copy_into(static[k], new[k], f"{where}[{k!r}]")
    elif static != new:
        raise ValueError(f"cuda_graph: {where} is a non-tensor value that changed since capture ({static!r} -> {new!r})")


def _all_reduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Average gradients over ranks in one collective; a parameter without a gradient on this rank sends
    zeros, so every rank's buffer has the same layout (a mismatch would hang NCCL)."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    flat /= dist.world_size()
    for p, v in zip(params, flat.split([p.numel() for p in params])):
        if p.grad is not None:
            p.grad.copy_(v.view_as(p))


class GraphedStep:
    """``step(batch) -> (loss, metrics)`` replays one captured training step; the tensors returned are
    static (overwritten by the next replay), so read them before calling again.

    Capture runs ``warmup`` real steps first (on a side stream: AdamW's state, cuBLAS and NCCL set-up),
    then puts the parameters, buffers, optimizer state and RNG back as they were, so the trajectory
    starts from the same state an eager loop would.
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter], opt: torch.optim.Optimizer,
                 loss_fn: Callable[[nn.Module, Any], tuple[Tensor, dict[str, Any]]], example_batch: Any, *,
                 grad_clip: float = 0.0, enforce: Callable[[nn.Module], None] | None = None, warmup: int = 3) -> None:
        if not all(p.is_cuda for p in params):
            raise ValueError("cuda_graph: every trained parameter must be on a CUDA device")
        if warmup < 2:  # the first may sync (lazy set-up); the last checks that the step does not
            raise ValueError(f"cuda_graph: warmup must be >= 2, got {warmup}")
        self.static_batch = _clone_tree(example_batch, params[0].device)
        sync = dist.world_size() > 1

        def body() -> tuple[Tensor, dict[str, Any]]:
            loss, metrics = loss_fn(model, self.static_batch)
            loss.backward()
            if sync:
                _all_reduce_grads(params)
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if enforce is not None:
                enforce(model)
            return loss.detach(), metrics

        own = {id(t) for t in model.parameters()}
        tensors = [*model.parameters(), *model.buffers(), *[p for p in params if id(p) not in own]]
        if sync:  # what DDP's constructor does: every rank starts from rank 0's weights
            for t in tensors:
                torch.distributed.broadcast(t.data, 0)
        saved = [t.detach().clone() for t in tensors]
        saved_opt = {p: {k: v.clone() for k, v in s.items() if isinstance(v, Tensor)} for p, s in opt.state.items()}
        rng = torch.get_rng_state(), torch.cuda.get_rng_state()
        try:
            self._warm_up(body, opt, warmup)
        finally:  # undo the warm-up's updates in place (the graph records these very tensors), even after a failure
            with torch.no_grad():
                for t, v in zip(tensors, saved):
                    t.copy_(v)
                for p, st in opt.state.items():
                    before = saved_opt.get(p, {})
                    for k, v in st.items():
                        if isinstance(v, Tensor):
                            if k in before:
                                v.copy_(before[k])
                            else:  # state the warm-up created: a fresh AdamW's is all zeros (moments, step)
                                v.zero_()
            torch.set_rng_state(rng[0])
            torch.cuda.set_rng_state(rng[1])
            del saved, saved_opt
        opt.zero_grad(set_to_none=True)  # backward in the graph then writes fresh gradients on every replay
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.loss, self.metrics = body()
        except Exception as e:
            cause = e.__context__ or e  # the capture's own end error hides what broke it
            raise RuntimeError(f"cuda_graph: the training step could not be captured ({type(cause).__name__}: {cause}). "
                               "Set cuda_graph = false and restart the process (a failed capture can leave CUDA's "
                               "random-number state unusable in this one)") from e

    @staticmethod
    def _warm_up(body: Callable[[], Any], opt: torch.optim.Optimizer, steps: int) -> None:
        """Real steps on a side stream; the last with host syncs turned into errors, so that a step the graph
        could not hold fails here, with its own message, instead of inside the capture (which CUDA cannot undo)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(steps):
                opt.zero_grad(set_to_none=True)
                if i < steps - 1:  # the first steps may sync: lazy initialisation, AdamW's state
                    body()
                    continue
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    body()
                except RuntimeError as e:
                    if "synchroniz" not in str(e):
                        raise
                    raise RuntimeError(f"cuda_graph: the training step reads a device value on the host ({e}); a CUDA "
                                       "graph cannot hold that (.item(), bool(tensor), printing, data-dependent shapes). "
                                       "Remove the read from the loss / enforce function, or set cuda_graph = false") from e
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        torch.cuda.current_stream().wait_stream(side)

    def __call__(self, batch: Any) -> tuple[Tensor, dict[str, Any]]:
        _copy_into(self.static_batch, batch)
        self.graph.replay()
        return self.loss, self.metrics
