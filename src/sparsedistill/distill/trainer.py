"""The one training loop every recipe uses: step-based, DDP-ready, resumable.

Batches come from a stateless sampler (``batch_rows``): the rows of step ``s`` are a pure
function of ``(seed, s)``, so resuming from a checkpoint at step ``s`` sees exactly the batches
an uninterrupted run would, and under ``torchrun`` each rank takes an interleaved share of the
same global batch (DDP then averages gradients, which equals the single-process update).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import distributed as dist
from ..runs import Run
from .graphed_step import GraphedStep

__all__ = ["TrainConfig", "batch_rows", "train", "predict"]

LossFn = Callable[[nn.Module, Any], tuple[Tensor, dict[str, float | Tensor]]]


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256  # global, across all ranks
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    grad_clip: float = 1.0  # 0 disables
    log_every: int = 50
    checkpoint_every: int = 500
    # Capture each step in one CUDA graph (small models are host-bound otherwise): fixed batch shapes, no
    # host reads in the loss; no effect on a machine without CUDA. A run resumes in the mode it started in.
    cuda_graph: bool = False


def batch_rows(step: int, num_rows: int, batch_size: int, seed: int) -> Tensor:
    """Global row indices of ``step``: epoch-wise shuffles of ``range(num_rows)``, dropping the ragged tail."""
    if not 0 < batch_size <= num_rows:
        raise ValueError(f"batch size must be in [1, dataset size {num_rows}], got {batch_size}")
    epoch, i = divmod(step, num_rows // batch_size)
    return _epoch_order(num_rows, seed, epoch)[i * batch_size : (i + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _epoch_order(num_rows: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=g)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return 0.5 * (1 + math.cos(math.pi * t))


def train(
    model: nn.Module,
    loss_fn: LossFn,
    get_batch: Callable[[Tensor], Any],
    num_rows: int,
    cfg: TrainConfig,
    *,
    job: str,
    run: Run | None = None,
    seed: int = 0,
    enforce: Callable[[nn.Module], None] | None = None,
    extra_params: list[nn.Parameter] | None = None,
    ema: nn.Module | None = None,
    ema_decay: float = 0.999,
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place for ``cfg.steps`` steps and return it.

    ``get_batch(rows)`` turns this rank's row indices into a batch; ``loss_fn(model, batch)``
    returns ``(loss, metrics)``. ``enforce(model)`` runs after every optimizer step (sparsity
    masks). ``extra_params`` are trained too (e.g. a hint-loss projection). ``ema``, a copy of
    ``model``, is moved toward its weights by ``ema_decay`` after every step (diffusion
    teachers sample from it) and checkpointed with them. With a ``run``, the
    loop logs reduced metrics, checkpoints atomically every ``cfg.checkpoint_every`` steps and at
    the end, and resumes from ``run``'s checkpoint for ``job`` if there is one.
    """
    if cfg.batch_size % dist.world_size():
        raise ValueError(f"global batch {cfg.batch_size} is not divisible by {dist.world_size()} processes")
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params or [])
    graphed = cfg.cuda_graph and all(p.is_cuda for p in params)
    if cfg.cuda_graph and not graphed and torch.cuda.is_available():  # without CUDA the option has no effect, by design
        warnings.warn(f"{job}: cuda_graph needs the model on a CUDA device; training without graphs", stacklevel=2)
    # A graphed step reads the learning rate from a device tensor, set before each replay (no LR scheduler).
    lr_t = torch.tensor(cfg.lr, device=params[0].device) if graphed else None
    opt = torch.optim.AdamW(params, lr=lr_t if graphed else cfg.lr, weight_decay=cfg.weight_decay, capturable=graphed)
    sched = None if graphed else torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    start = 0
    state = run.load_checkpoint(job) if run else None
    ema_pairs = None
    if ema is not None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        ema_pairs = list(zip(ema.parameters(), model.parameters(), strict=True))
        for e, p in ema_pairs:
            if (e.device, e.dtype, e.shape) != (p.device, p.dtype, p.shape):
                raise ValueError(f"the EMA copy must match the model's parameters (device, dtype, shape): got {e.device} "
                                 f"{e.dtype} {tuple(e.shape)} for {p.device} {p.dtype} {tuple(p.shape)}; make it with "
                                 "copy.deepcopy(model) after moving the model")
        if any(p.dtype in (torch.float16, torch.bfloat16) for _, p in ema_pairs):
            warnings.warn(f"{job}: an EMA in 16-bit weights barely moves (steps of 1 - decay are below its precision); "
                          "keep the model in fp32 and train under autocast", stacklevel=2)
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None:  # a checkpoint written without an EMA: it starts from the weights
            ema.load_state_dict(state.get("ema") or state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        if graphed:  # the checkpoint may come from an eager run: its groups say capturable = False and hold a float lr
            for g in opt.param_groups:
                g.update(lr=lr_t, capturable=True)
            for s in opt.state.values():
                if isinstance(s.get("step"), Tensor):
                    s["step"] = s["step"].to(params[0].device, torch.float32)
        elif state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        else:  # written by a graphed run: the learning rate is a function of the step alone
            sched.last_epoch = start
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(start, cfg)
        if extra_params:
            for p, v in zip(extra_params, state["extra_params"]):
                p.data.copy_(v)
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    if start >= cfg.steps:
        return model
    seconds, since = (state or {}).get("seconds", 0.0), time.perf_counter()  # training time over every resume

    # A graphed step averages gradients itself, inside the graph (DDP's hooks cannot be captured).
    net = DistributedDataParallel(model) if dist.world_size() > 1 and not graphed else model
    if ema is not None and state is None:  # every rank's EMA starts from rank 0's weights, as the model does
        if dist.world_size() > 1 and graphed:  # DDP broadcast them above; a graphed step would only at capture
            for t in [*model.parameters(), *model.buffers()]:
                torch.distributed.broadcast(t.data, 0)
        ema.load_state_dict(model.state_dict())

    def optimizer_state() -> dict:
        sd = opt.state_dict()
        if graphed:  # plain floats, so that an eager run can resume from it too
            sd["param_groups"] = [{**g, "lr": float(g["lr"]), "capturable": False} for g in sd["param_groups"]]
        return sd

    def checkpoint(step: int) -> None:
        if run is not None:
            run.save_checkpoint(job, {
                "model": model.state_dict(), "optimizer": optimizer_state(), "scheduler": None if graphed else sched.state_dict(),
                "extra_params": [p.detach().clone() for p in extra_params or []],
                "ema": None if ema is None else ema.state_dict(),
                "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "step": step, "seconds": seconds + time.perf_counter() - since,
            })

    model.train()
    clock: tuple[float, int] | None = None  # (time, step) after this call's first step: throughput leaves out warm-up
    bar = tqdm(range(start, cfg.steps), desc=job, disable=not (progress and dist.is_main()), leave=False, mininterval=1.0)
    graph: GraphedStep | None = None
    for step in bar:
        rows = dist.shard_rows(batch_rows(step, num_rows, cfg.batch_size, seed))
        batch = get_batch(rows)
        if graphed:
            if graph is None:  # captured on the first batch this call sees
                graph = GraphedStep(model, params, opt, loss_fn, batch, grad_clip=cfg.grad_clip, enforce=enforce)
            lr_t.fill_(cfg.lr * _lr_factor(step, cfg))
            loss, metrics = graph(batch)
        else:
            loss, metrics = loss_fn(net, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in extra_params or []:  # outside DDP, so average their gradients by hand
                if p.grad is not None and dist.world_size() > 1:
                    p.grad.copy_(dist.all_reduce_mean(p.grad))
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            if enforce is not None:
                enforce(model)
        if ema_pairs:  # frozen parameters and buffers stay as the EMA copy got them (state_dict at the start)
            with torch.no_grad():
                torch._foreach_lerp_([e for e, p in ema_pairs if p.requires_grad],
                                     [p.detach() for _, p in ema_pairs if p.requires_grad], 1.0 - ema_decay)
        if clock is None:
            if loss.is_cuda:
                torch.cuda.synchronize()
            clock = (time.perf_counter(), step + 1)
        # The host reads the device only here, not every step, so it can queue steps ahead of the GPU.
        checkpoint_due = (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or checkpoint_due:
            names = ["loss", *metrics]
            local = torch.stack([loss.detach().float(), *[torch.as_tensor(v, dtype=torch.float32, device=loss.device) for v in metrics.values()]])
            vals = dist.all_reduce_mean(local)  # on the loss's device: NCCL reduces CUDA tensors only
            logged = dict(zip(names, vals.tolist()))  # .tolist() waits for the device: the clock below is honest
            # A NaN on any rank reaches every rank's gradients (DDP averages them) and this mean, so all
            # ranks stop here together, before a checkpoint could save the damage.
            if not math.isfinite(logged["loss"]):
                raise FloatingPointError(f"{job}: loss became non-finite by step {step + 1} (mean over ranks "
                                         f"{logged['loss']}); lower the learning rate or resume from the last checkpoint")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            if step + 1 > clock[1]:  # samples of the global batch per second, all ranks together
                logged["samples_per_s"] = (step + 1 - clock[1]) * cfg.batch_size / (time.perf_counter() - clock[0])
            bar.set_postfix(loss=f"{logged['loss']:.4f}")
            if run is not None:
                lr = cfg.lr * _lr_factor(step + 1, cfg) if graphed else sched.get_last_lr()[0]  # the next step's, as LambdaLR reports it
                run.log(job, step + 1, lr=lr, **logged)
        if checkpoint_due:
            checkpoint(step + 1)
    checkpoint(cfg.steps)
    return model


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor, batch_size: int = 1024) -> Tensor:
    """Outputs for every row of ``inputs``; under ``torchrun`` ranks split the rows and share results."""
    was_training = model.training
    model.eval()
    n = len(inputs)
    mine = torch.arange(n)[dist.rank() :: dist.world_size()]
    out = None
    for s in range(0, len(mine), batch_size):
        rows = mine[s : s + batch_size]
        y = model(inputs[rows]).float()
        if out is None:
            out = torch.zeros(n, *y.shape[1:], device=y.device)
        out[rows.to(y.device)] = y
    if out is None:  # more ranks than rows
        out = torch.zeros(n, *model(inputs[:1]).shape[1:], device=inputs.device)
    model.train(was_training)
    return dist.all_reduce_sum(out)
