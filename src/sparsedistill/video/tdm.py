"""TDM (trajectory distribution matching) for few-step rectified-flow students, as Video-BLADE trains them.

Three networks: the frozen many-step *teacher* (the real score, guided by CFG), the few-step
*student* and a *fake score* that learns the distribution of the student's outputs. One
iteration (``docs/notes/video-blade-reading.md``, section 1):

1. ``rollout``: the student runs its K steps from noise without gradients, keeping each step's input;
2. a step i per sample; the student re-predicts x0 from that step's input (with gradients);
3. x0 takes one student step to the interval's lower time, then is diffused (detached) to a random
   time between it and ``t_max``;
4. ``fake_score_loss``: the fake score learns to denoise those points toward the student's x0;
5. ``generator_loss``: pseudo-Huber between x0 and stopgrad(x0 + x0_teacher,cfg - x0_fake): the
   student moves toward what the teacher denoises to and away from what its own distribution does.

Times are continuous (t in [0, 1], t = 1 noise). Student step j runs from t_j = 1 - j / K to
t_{j+1}; ``eta`` mixes predicted and fresh noise in each step (eta = 1: the deterministic Euler step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .flow import guided_velocity

if TYPE_CHECKING:
    from ..runs import Run

__all__ = ["TDMConfig", "TDMTrainConfig", "check_train_config", "lr_factor", "train_tdm", "trained_student_state",
           "student_times", "student_step", "rollout", "renoise", "fake_score_loss", "generator_loss", "pseudo_huber"]


@dataclass
class TDMConfig:
    steps: int = 4  # K, the student's sampling steps
    eta: float = 0.9  # share of predicted (vs fresh) noise in each student step
    cfg: float = 5.0  # guidance of the teacher (the real score)
    t_max: float = 0.98  # the highest time re-noised points reach
    huber_c: float = 1e-3  # pseudo-Huber constant before scaling: c = huber_c * sqrt(elements per sample) / 128


T_MIN = 1e-3  # the lowest time a re-noised point gets


def student_times(steps: int, device: torch.device | str = "cpu") -> Tensor:
    """The K + 1 times of a K-step student, from 1 to 0 (uniform; the same grid in training and sampling)."""
    if steps < 1:
        raise ValueError(f"a student needs at least one step, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def student_step(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, eta: float, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """(x0 estimate, x at ``t_next``) from velocity ``v`` at ``t``: x0 and the predicted noise, the noise mixed by ``eta``."""
    t, t_next = _bcast(t, x), _bcast(t_next, x)
    x0 = x - t * v
    eps = x + (1 - t) * v
    if eta < 1.0:
        if noise is None:
            raise ValueError("eta < 1 mixes in fresh noise: pass it")
        eps = eta * eps + math.sqrt(1 - eta**2) * noise
    return x0, (1 - t_next) * x0 + t_next * eps


@torch.no_grad()
def rollout(student: nn.Module, noise: Tensor, y: Tensor, steps: int, eta: float,
            generator: torch.Generator | None = None, fresh_noise: list[Tensor] | None = None) -> tuple[list[Tensor], Tensor]:
    """The student's K steps from ``noise``: each step's input (K tensors) and the final x0. Each step's fresh noise
    is ``fresh_noise[j]`` when given (evaluation: drawn per video), else drawn from ``generator``."""
    if fresh_noise is not None and len(fresh_noise) < steps:
        raise ValueError(f"{len(fresh_noise)} fresh-noise tensors for {steps} steps")
    times = student_times(steps, noise.device)
    x, inputs = noise, []
    for j in range(steps):
        inputs.append(x)
        t = times[j].expand(x.shape[0])
        fresh = None
        if eta < 1:
            fresh = (fresh_noise[j].to(x.device, x.dtype) if fresh_noise is not None
                     else torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator))
        x0, x = student_step(x, student(x, t, y), t, times[j + 1].expand(x.shape[0]), eta, fresh)
    return inputs, x0


def renoise(x0: Tensor, eps: Tensor, t_low: Tensor, eta: float, t_max: float,
            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """x0 one student step down to ``t_low``, then diffused forward to a random t in [t_low, t_max]; (x_t, t), detached.

    Forward diffusion of the flow from s to t > s: ``x_t = a x_s + sqrt(t^2 - (a s)^2) z`` with a = (1 - t) / (1 - s).
    """
    b = x0.shape[0]
    dev, dt = x0.device, x0.dtype
    x0, eps = x0.detach(), eps.detach()
    if eta < 1.0:
        eps = eta * eps + math.sqrt(1 - eta**2) * torch.randn(x0.shape, device=dev, dtype=dt, generator=generator)
    s = t_low.to(dev)
    x_s = (1 - _bcast(s, x0)) * x0 + _bcast(s, x0) * eps
    # at least T_MIN: the fake score's target divides by t
    t = (s + (t_max - s).clamp(min=0) * torch.rand(b, device=dev, generator=generator)).clamp(min=T_MIN)
    a = (1 - t) / (1 - s).clamp(min=1e-6)
    sd = (t.square() - (a * s).square()).clamp(min=1e-8).sqrt()
    z = torch.randn(x0.shape, device=dev, dtype=dt, generator=generator)
    return _bcast(a, x0) * x_s + _bcast(sd, x0) * z, t


def fake_score_loss(fake: nn.Module, x_t: Tensor, t: Tensor, y: Tensor, x0: Tensor) -> Tensor:
    """The fake score denoises the student's samples: MSE to the velocity that maps x_t to ``x0`` ((x_t - x0) / t)."""
    target = (x_t.float() - x0.detach().float()) / _bcast(t.float(), x_t)
    return (fake(x_t, t, y).float() - target).square().mean()


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    return ((diff.float().square() + c * c).sqrt() - c).mean()


def generator_loss(x0: Tensor, x_t: Tensor, t: Tensor, y: Tensor, teacher: nn.Module, fake: nn.Module,
                   null_class: int, cfg: float, huber_c: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Pseudo-Huber between the student's ``x0`` (with gradients) and stopgrad(x0 + x0_teacher,cfg - x0_fake) at (x_t, t).

    ``huber_c`` is scaled by sqrt(elements per sample) / 128, as BLADE scales TDM's 1e-3 to its latent size
    (0.0113 for Wan's 16 x 21 x 60 x 104 latent).
    """
    tb = _bcast(t, x_t)
    with torch.no_grad():
        x0_real = x_t - tb * guided_velocity(teacher, x_t, t, y, null_class, cfg)
        x0_fake = x_t - tb * fake(x_t, t, y)
        target = x0.detach() + (x0_real - x0_fake)
    c = huber_c * math.sqrt(x0[0].numel()) / 128
    loss = pseudo_huber(x0 - target, c)
    return loss, {"real_minus_fake": (x0_real - x0_fake).float().abs().mean()}


@dataclass
class TDMTrainConfig(TDMConfig):
    iterations: int = 300
    batch_size: int = 8  # global, across ranks
    lr: float = 1e-4  # the student (BLADE: 1e-4)
    fake_lr: float = 5e-4  # the fake score (BLADE: 5e-4)
    # fake-score updates per student update (BLADE and TDM: 1; DMD2's two time-scale rule: 5). Ours reuse the
    # iteration's one rollout with fresh steps and re-noising (DMD2 draws new generator samples for each): cheaper
    fake_updates: int = 1
    beta2: float = 0.95  # AdamW betas (0, beta2), as TDM and BLADE
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    # the student's learning rate over the iterations: "constant", or "cosine" to 0 after ``warmup`` linear iterations
    # (BLADE's launch script: cosine with 5 warm-up steps); the fake score keeps ``fake_lr`` (it tracks the student)
    lr_schedule: str = "constant"
    warmup: int = 0
    # decay of an exponential moving average of the student's weights (0: none; warmed up as (1 + n) / (10 + n)); with
    # one, the average is the student that training returns (TDM's code keeps one; a 300-iteration student against a
    # moving fake score is noisy)
    ema: float = 0.0
    log_every: int = 10
    checkpoint_every: int = 100


LR_SCHEDULES = ("constant", "cosine")


def check_train_config(cfg: TDMTrainConfig, where: str = "") -> None:
    """Clear errors for settings ``train_tdm`` cannot use (``where`` names them in a config, e.g. students.tdm.)."""
    if cfg.fake_updates < 1:
        raise ValueError(f"{where}fake_updates = {cfg.fake_updates}: the fake score needs at least one update per "
                         "iteration")
    if cfg.lr_schedule not in LR_SCHEDULES or cfg.warmup < 0:
        raise ValueError(f"{where}lr_schedule {cfg.lr_schedule!r} with warmup {cfg.warmup}: use one of {LR_SCHEDULES} "
                         "and warmup >= 0")
    if not 0 <= cfg.ema < 1:
        raise ValueError(f"{where}ema = {cfg.ema}: an average's decay is in [0, 1) (e.g. 0.99; 0 keeps none)")


def lr_factor(it: int, cfg: TDMTrainConfig) -> float:
    """The student's learning rate at iteration ``it`` (0-based) as a share of ``cfg.lr``."""
    if it < cfg.warmup:
        return (it + 1) / cfg.warmup
    if cfg.lr_schedule == "cosine":
        span = max(cfg.iterations - cfg.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * (it - cfg.warmup) / span))
    return 1.0


def train_tdm(student: nn.Module, fake: nn.Module, teacher: nn.Module, num_classes: int, cfg: TDMTrainConfig, *,
              job: str, run: Run | None = None, seed: int = 0, autocast: bool = True,
              progress: bool = True) -> nn.Module:
    """Distil ``teacher`` (frozen, dense, guided) into the K-step ``student`` by TDM; ``fake`` starts as the student's copy.

    Each iteration: one rollout of the student (no gradients), one update of the fake score, then one
    of the student against the updated fake score (BLADE's order). The prompts are class ids drawn
    uniformly (data-free; ``num_classes`` is also the null class of the teacher's guidance); they, the
    noise and every other draw come from a generator seeded by
    ``(seed, iteration)``, so a resumed run sees what an uninterrupted one would. Under ``torchrun``
    each rank takes its share of the batch and gradients are averaged by hand (no DDP wrapper: the
    student runs three times per iteration, twice without gradients). Checkpoints (both networks,
    both optimizers, the iteration) go to ``run`` every ``cfg.checkpoint_every`` iterations.
    """
    from tqdm.auto import tqdm

    from .. import distributed as dist

    check_train_config(cfg)
    if cfg.batch_size % dist.world_size():
        raise ValueError(f"global batch {cfg.batch_size} is not divisible by {dist.world_size()} processes")
    dev = next(student.parameters()).device
    teacher.eval()  # read under no_grad only (generator_loss)
    for name, m in (("student", student), ("fake score", fake)):
        if not any(p.requires_grad for p in m.parameters()):
            raise ValueError(f"the {name} has no trainable parameters (was it copied from a frozen teacher? "
                             "call .requires_grad_(True) on it)")
    opt_g = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.0, cfg.beta2),
                              weight_decay=cfg.weight_decay)
    opt_f = torch.optim.AdamW([p for p in fake.parameters() if p.requires_grad], lr=cfg.fake_lr, betas=(0.0, cfg.beta2),
                              weight_decay=cfg.weight_decay)
    start = 0
    # the student's moving average (every parameter, frozen ones too, so that it loads as the student's state)
    ema = [p.detach().clone() for p in student.parameters()] if cfg.ema else []
    state = run.load_checkpoint(job) if run else None
    if state is not None:
        if state.get("world_size", 1) != dist.world_size():
            raise ValueError(f"{job}: checkpoint written by {state.get('world_size', 1)} processes, resumed by "
                             f"{dist.world_size()}: the per-rank draws differ; resume with as many processes")
        student.load_state_dict(state["student"])
        fake.load_state_dict(state["fake"])
        opt_g.load_state_dict(state["opt_g"])
        opt_f.load_state_dict(state["opt_f"])
        start = state["iteration"]
        if cfg.ema:
            if "ema" not in state:
                raise ValueError(f"{job}: its checkpoint has no moving average (written with ema = 0); resume with "
                                 "students.tdm.ema = 0 or start a new run")
            ema = [state["ema"][name].to(dev) for name, _ in student.named_parameters()]
    elif dist.world_size() > 1:  # every rank starts from rank 0's weights
        for t in [*student.state_dict().values(), *fake.state_dict().values()]:
            torch.distributed.broadcast(t, 0)
        ema = [p.detach().clone() for p in student.parameters()] if cfg.ema else []
    local = cfg.batch_size // dist.world_size()
    seconds, since = (state or {}).get("seconds", 0.0), time.perf_counter()  # training time over every resume
    times = student_times(cfg.steps, dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast and dev.type == "cuda")

    def update(model: nn.Module, opt: torch.optim.Optimizer, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        if dist.world_size() > 1:  # one flat all-reduce; a parameter no rank gave a gradient keeps none (no decay)
            has = dist.all_reduce_sum(torch.tensor([float(p.grad is not None) for p in params], device=dev))
            flat = dist.all_reduce_mean(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                                   for p in params]))
            for p, g, n in zip(params, flat.split([p.numel() for p in params]), has.tolist()):
                p.grad = g.view_as(p).clone() if n > 0 else None
        params = [p for p in params if p.grad is not None]
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()

    def student_x0(inputs: list[Tensor], step: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """x0 re-predicted (with gradients) at each sample's step, its predicted noise and the step's lower time."""
        x = torch.stack(inputs)[step, torch.arange(len(step), device=dev)]
        t = times[step]
        v = student(x, t, y)
        tb = _bcast(t, x)
        return x - tb * v, x + (1 - tb) * v, times[step + 1]

    bar = tqdm(range(start, cfg.iterations), desc=job, disable=not (progress and dist.is_main()), leave=False)
    for it in bar:
        g = torch.Generator(device=dev).manual_seed((seed * 1_000_003 + it) * dist.world_size() + dist.rank())
        y = torch.randint(num_classes, (local,), device=dev, generator=g)
        noise = torch.randn((local, *_sample_shape(student)), device=dev, generator=g)
        with amp:
            inputs, _ = rollout(student, noise, y, cfg.steps, cfg.eta, generator=g)
        for _ in range(cfg.fake_updates):  # the fake score learns the student's current outputs
            with amp:
                step = torch.randint(cfg.steps, (local,), device=dev, generator=g)
                with torch.no_grad():
                    x0, eps, t_low = student_x0(inputs, step, y, g)
                x_t, t = renoise(x0, eps, t_low, cfg.eta, cfg.t_max, generator=g)
                loss_f = fake_score_loss(fake, x_t, t, y, x0)
            update(fake, opt_f, loss_f)
        with amp:  # then the student, against the updated fake score
            step = torch.randint(cfg.steps, (local,), device=dev, generator=g)
            x0, eps, t_low = student_x0(inputs, step, y, g)
            x_t, t = renoise(x0, eps, t_low, cfg.eta, cfg.t_max, generator=g)
            loss_g, metrics = generator_loss(x0, x_t, t, y, teacher, fake, num_classes, cfg.cfg, cfg.huber_c)
        for group in opt_g.param_groups:
            group["lr"] = cfg.lr * lr_factor(it, cfg)
        update(student, opt_g, loss_g)
        if ema:  # the decay warms up ((1 + n) / (10 + n)), so the starting weights do not linger in the average
            decay = min(cfg.ema, (1 + it) / (10 + it))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in student.parameters()], 1 - decay)
        done = it + 1
        if done % cfg.log_every == 0 or done == cfg.iterations:
            vals = dist.all_reduce_mean(torch.stack([loss_f.detach().float(), loss_g.detach().float(),
                                                     metrics["real_minus_fake"].float()]))
            lf, lg, gap = vals.tolist()
            if not (math.isfinite(lf) and math.isfinite(lg)):
                raise FloatingPointError(f"{job}: a TDM loss became non-finite by iteration {done} (fake {lf}, "
                                         f"generator {lg}); lower the learning rates or resume from the last checkpoint")
            bar.set_postfix(fake=f"{lf:.4f}", gen=f"{lg:.4f}")
            if run is not None:
                run.log(job, done, fake_loss=lf, generator_loss=lg, real_minus_fake=gap)
        if run is not None and (done % cfg.checkpoint_every == 0 or done == cfg.iterations):
            averaged = {"ema": dict(zip([n for n, _ in student.named_parameters()], ema))} if ema else {}
            run.save_checkpoint(job, {"student": student.state_dict(), "fake": fake.state_dict(),
                                      "opt_g": opt_g.state_dict(), "opt_f": opt_f.state_dict(), "iteration": done,
                                      "world_size": dist.world_size(), "seconds": seconds + time.perf_counter() - since,
                                      **averaged})
    if ema:  # the average is the student
        with torch.no_grad():
            for p, e in zip(student.parameters(), ema):
                p.copy_(e)
    return student


def trained_student_state(checkpoint: dict) -> dict[str, Tensor]:
    """The student's state dict from a ``train_tdm`` checkpoint: its moving average where it kept one."""
    return {**checkpoint["student"], **checkpoint.get("ema", {})}


def _sample_shape(model: nn.Module) -> tuple[int, ...]:
    """(C, F, H, W) of the videos a DiT-like model (with a ``cfg`` naming them) generates."""
    c = getattr(model, "cfg", None)
    if c is None or not all(hasattr(c, a) for a in ("channels", "frames", "height", "width")):
        raise ValueError("train_tdm needs a model whose .cfg has channels, frames, height and width (e.g. VideoDiT)")
    return c.channels, c.frames, c.height, c.width
