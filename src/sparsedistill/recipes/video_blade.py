"""Video-BLADE on Moving Fashion-MNIST (paper 2): a dense many-step teacher, few-step TDM students with ASA.

Jobs (each skipped on ``--resume`` once its result exists; training jobs resume from checkpoints):
  classifier                frame classifier on real train clips (the metrics' judge; shared by seeds)
  teacher-s{seed}           the video DiT trained by rectified flow, with an EMA copy (what is sampled)
  {variant}-k{K}[-{arm}]-s{seed}
                            TDM students from the teacher's EMA, data-free:
                              tdm      dense attention                              (a)
                              tdm-asa  ASA in the student and the fake score        (b)
                            one per named arm of ``students.arms`` (settings compared in one run), if any
  eval-s{seed}              samples of the 50-step CFG teacher, the teacher at K steps (d) (guided, and unguided as the
                            students start), (a), (a) with ASA
                            switched on untrained (c) and (b), from the same noise and classes; class accuracy,
                            Frechet distances (frame classifier's and EfficientNet-Lite0's features) to real test
                            clips and to the teacher's samples, motion, label
                            consistency, achieved attention sparsity, bootstrap intervals; sample strips and GIFs
``video run --jobs`` trains chosen jobs only, so processes can share a run directory (arms side by side on one GPU)
and a last run evaluates them all against one set of teacher samples and one classifier.
Students are fully fine-tuned by default, or LoRA-adapted (``students.lora_rank``, as BLADE). Everything is drawn on the fly on the
run's device: clip i of a seed is the same clip on any machine (``data/moving_fmnist.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import distributed as dist
from ..config import update_config
from ..attention import SUPPORTED_BLOCKS, AdaptiveBlockSparseAttention, ASAConfig
from ..data.moving_fmnist import MovingFashionMNIST
from ..data.real_clips import SOURCES as REAL_SOURCES
from ..data.real_clips import RealClips
from ..distill import TrainConfig, train
from ..files import sha256_file
from ..models import create_model
from ..models.video_dit import VideoDiT
from ..runs import Run
from ..models.safetensors_io import load_weights, save_bf16
from ..video import flow_matching_loss
from ..video.metrics import (FrameClassifier, bootstrap_interval, class_accuracy, frame_features, frames_of,
                             frechet_distance, frechet_interval, imagenet_features, label_consistency, motion)
from ..video.samples import sample_videos, save_video_samples, seeded_noise, student_step_noise
from ..video.tdm import TDMTrainConfig, check_train_config, train_tdm, trained_student_state
from ..weights.lora import add_lora, merge_lora

log = logging.getLogger(__name__)

__all__ = ["VideoBladeConfig", "run_video_blade", "VARIANTS"]

VARIANTS = ("tdm", "tdm-asa")
DATA_CLASSES = {"moving_fmnist": 10, "real_clips": len(REAL_SOURCES)}  # what each data source labels


@dataclass
class ModelConfig:
    name: str = "video_dit_fmnist"  # a registry key; the data takes its frames, size and channels


@dataclass
class DataConfig:
    # "moving_fmnist": class-conditional Moving Fashion-MNIST (10 classes); "real_clips": windows of six real videos,
    # labelled by source (the second check; models video_dit_real*, 6 classes)
    source: str = "moving_fmnist"
    items: int = 2  # Fashion-MNIST pictures per clip, all of the clip's class
    short_side: int = 96  # real clips: frames resized to this short side before the random crops


@dataclass
class TeacherConfig(TrainConfig):
    steps: int = 4000
    batch_size: int = 16
    lr: float = 3e-4
    warmup_frac: float = 0.02
    checkpoint_every: int = 500
    ema_decay: float = 0.999
    drop_class: float = 0.1  # share of labels replaced by the null class (classifier-free guidance)
    # a teacher's EMA exported by an earlier run (exports/teacher-s<seed>-ema.safetensors, bf16, ~20 MB, small
    # enough to carry to a fresh GPU machine), used instead of training one; "{seed}" in it stands for each seed
    # (required with several seeds); "" trains
    init: str = ""


@dataclass
class SamplingConfig:
    steps: int = 50  # the teacher's Euler steps
    cfg: float = 5.0  # guidance scale (BLADE's Wan setting)
    shift: float = 1.0  # time shift of the teacher's grid
    # (students sample as TDM trained them: K steps on its uniform grid, each mixing students.tdm.eta of the
    # predicted noise with fresh noise)


@dataclass
class ASASettings:
    """ASA as BLADE configures it for Wan (block = the model's tile)."""

    tau: float = 0.95
    min_keep: float = 0.05
    max_keep: float = 0.17
    samples: int = 16
    pooled_kv: bool = False  # the dropped blocks' means, merged by log-sum-exp (BLADE's pooled branch)
    reuse: int = 1  # sampling: a layer's mask serves this many consecutive calls (denoising steps); training rebuilds


@dataclass
class StudentsConfig:
    steps: list[int] = field(default_factory=lambda: [4, 8])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    tdm: TDMTrainConfig = field(default_factory=TDMTrainConfig)
    # 0: full fine-tuning; > 0: LoRA of this rank (alpha = rank) on the layers named in lora_targets, in the student
    # and its fake score (BLADE: rank 64 on Wan's q, k, v, o; ours are the fused qkv and the output projection)
    lora_rank: int = 0
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "proj"])
    # (b) students: the fake score runs the student's ASA (BLADE's code) or dense attention (a score of the student's
    # samples that sparse attention does not limit; the student still samples sparse)
    fake_asa: bool = True
    # Named variations of these settings, trained and evaluated side by side in one run (one teacher, one classifier,
    # one set of teacher samples): e.g. arms.lr3 = {tdm = {lr = 3e-5}}, arms.b16 = {tdm = {batch_size = 16},
    # variants = ["tdm"]}. Empty: one unnamed arm, these settings. Job and model names end in -{arm}.
    arms: dict[str, dict] = field(default_factory=dict)


@dataclass
class ClassifierConfig(TrainConfig):
    steps: int = 1500
    batch_size: int = 16  # clips; every frame of each is a training image
    lr: float = 1e-3
    checkpoint_every: int = 500


@dataclass
class EvalConfig:
    videos: int = 200  # generated per model (and real test clips as the reference), classes balanced
    batch: int = 20
    bootstrap: int = 1000
    show: int = 4  # videos per model in the sample strips and GIFs
    # extra rows: each TDM + ASA (b) student sampled again with every layer's mask serving r consecutive denoising
    # steps (built at the first, reused after: 1 / r of the mask cost), for each r here; [] = none
    asa_reuse: list[int] = field(default_factory=list)


@dataclass
class VideoBladeConfig:
    seeds: list[int] = field(default_factory=lambda: [0])
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    asa: ASASettings = field(default_factory=ASASettings)
    students: StudentsConfig = field(default_factory=StudentsConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _with_mask_reuse(model: VideoDiT, reuse: int) -> VideoDiT:
    """A copy of an ASA model whose layers keep each mask for ``reuse`` consecutive calls (denoising steps)."""
    if reuse < 1:
        raise ValueError(f"eval.asa_reuse values are steps per mask, at least 1; got {reuse}")
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, AdaptiveBlockSparseAttention):
            m.reuse = reuse
    return model


def student_arms(students: StudentsConfig) -> dict[str, StudentsConfig]:
    """The student settings of each arm: ``students`` with the arm's table applied (one unnamed arm without arms)."""
    if not students.arms:
        return {"": students}
    base = dataclasses.replace(students, arms={})
    out = {}
    for name, table in students.arms.items():
        if not re.fullmatch(r"[a-z0-9_]+", name):
            raise ValueError(f"students.arms: arm name {name!r} must be lower-case letters, digits or _ (it ends job "
                             "and model names)")
        if not isinstance(table, dict) or "arms" in table:
            raise ValueError(f"students.arms.{name} must be a table of student settings (not arms), e.g. "
                             f"arms.{name} = {{tdm = {{lr = 3e-5}}}}")
        out[name] = update_config(base, table, f"students.arms.{name}")
    return out


def student_job(variant: str, k: int, arm: str) -> str:
    """A student's name in job and model names, without the seed: tdm-k4, tdm-asa-k8-lr3."""
    return f"{variant}-k{k}" + (f"-{arm}" if arm else "")


def validate(cfg: VideoBladeConfig) -> VideoDiT:
    """Check the config against the model it names (returned, on the CPU); errors say what is allowed."""
    model = create_model(cfg.model.name)
    if not isinstance(model, VideoDiT):
        raise ValueError(f"model {cfg.model.name!r} is not a video DiT; use e.g. video_dit_fmnist or video_dit_fmnist_tiny")
    if cfg.data.source not in DATA_CLASSES:
        raise ValueError(f"data.source {cfg.data.source!r} is not known; use one of {list(DATA_CLASSES)}")
    classes = DATA_CLASSES[cfg.data.source]
    # Moving Fashion-MNIST can use its first classes only; the real clips need one class per source video
    if model.cfg.num_classes > classes or (cfg.data.source == "real_clips" and model.cfg.num_classes != classes):
        suggest = "video_dit_real or video_dit_real_tiny" if cfg.data.source == "real_clips" else "video_dit_fmnist"
        raise ValueError(f"data.source {cfg.data.source!r} has {classes} classes but model {cfg.model.name!r} takes "
                         f"{model.cfg.num_classes}; use e.g. {suggest}")
    if model.cfg.height != model.cfg.width or model.cfg.channels != 1:
        raise ValueError(f"the clips are square and grey; {cfg.model.name} wants {model.cfg.channels} channels of "
                         f"{model.cfg.height} x {model.cfg.width}")
    for arm, s in student_arms(cfg.students).items():
        where = f"students.arms.{arm}" if arm else "students"
        unknown = set(s.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown student variants {sorted(unknown)} in {where}; use any of {list(VARIANTS)}")
        for k in s.steps:
            if not 1 <= k <= cfg.sampling.steps:
                raise ValueError(f"a student's steps K={k} ({where}) must be between 1 and the teacher's "
                                 f"{cfg.sampling.steps} sampling steps")
        if s.variants and model.cfg.block not in SUPPORTED_BLOCKS:  # (b) trains with ASA, (c) samples with it
            raise ValueError(f"ASA needs the model's tile ({model.cfg.tile} = {model.cfg.block} tokens) to be one of "
                             f"the kernel's block sizes {SUPPORTED_BLOCKS}")
        if s.lora_rank < 0:
            raise ValueError(f"{where}.lora_rank = {s.lora_rank}: 0 fine-tunes every weight, > 0 trains LoRA "
                             "adapters of that rank")
        if not 0.0 <= s.tdm.eta <= 1.0:
            raise ValueError(f"{where}.tdm.eta = {s.tdm.eta}: the share of predicted noise in a student step "
                             "must be in [0, 1] (1: deterministic Euler steps)")
        check_train_config(s.tdm, f"{where}.tdm.")
    if cfg.eval.videos % cfg.eval.batch:
        raise ValueError(f"eval.videos {cfg.eval.videos} must be a multiple of eval.batch {cfg.eval.batch}")
    if cfg.teacher.init:
        if len(cfg.seeds) > 1 and "{seed}" not in cfg.teacher.init:
            raise ValueError(f"teacher.init names one file for {len(cfg.seeds)} seeds: write {{seed}} in the path "
                             "(e.g. runs/x/exports/teacher-s{seed}-ema.safetensors) so that each seed has its own teacher")
        for seed in cfg.seeds:
            if not Path(cfg.teacher.init.format(seed=seed)).exists():
                raise FileNotFoundError(f"teacher.init: {cfg.teacher.init.format(seed=seed)} does not exist (an "
                                        "exports/teacher-s<seed>-ema.safetensors of an earlier run)")
    return model


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class VideoBlade:
    def __init__(self, cfg: VideoBladeConfig, run: Run, progress: bool) -> None:
        self.cfg, self.run, self.progress = cfg, run, progress
        self.device = dist.init()  # cuda:LOCAL_RANK under torchrun, else the one GPU or the CPU
        m = validate(cfg).cfg
        self.arms = student_arms(cfg.students)
        self.shape = (m.channels, m.frames, m.height, m.width)
        self.num_classes = m.num_classes
        self._clips_kw = dict(frames=m.frames, size=m.height, device=self.device)
        if cfg.data.source == "real_clips":
            self._clips_kw["short_side"] = cfg.data.short_side
        else:
            self._clips_kw.update(items=cfg.data.items, num_classes=m.num_classes)

    def _clips(self, split: str) -> MovingFashionMNIST | RealClips:
        source = RealClips if self.cfg.data.source == "real_clips" else MovingFashionMNIST
        return source.from_split(split, **self._clips_kw)

    # the data is read only by the jobs that use it: the students' distillation is data-free
    @functools.cached_property
    def train_clips(self) -> MovingFashionMNIST | RealClips:
        return self._clips("train")

    @functools.cached_property
    def test_clips(self) -> MovingFashionMNIST | RealClips:
        return self._clips("test")

    # jobs ------------------------------------------------------------------------------------
    def classifier(self) -> FrameClassifier:
        job, c = "classifier", self.cfg.classifier
        torch.manual_seed(0)  # a job's result depends on its config alone, not on what ran before it
        clf = FrameClassifier(self.num_classes).to(self.device)
        f = self.shape[1]

        def get_batch(rows: Tensor) -> tuple[Tensor, Tensor]:
            videos, y = self.train_clips.clips(rows, seed=10_000)  # clips of their own seed, not the teachers'
            return frames_of(videos), y.repeat_interleave(f)

        loss = lambda net, b: (nn.functional.cross_entropy(net(b[0]), b[1]), {})  # noqa: E731
        if self.run.result(job) is None:
            train(clf, loss, get_batch, c.steps * c.batch_size, c, job=job, run=self.run, seed=0, progress=self.progress)
            videos, y = self.test_clips.clips(range(self.cfg.eval.videos), seed=0)
            acc = float(class_accuracy(clf, videos, y).mean())
            self.run.save_result(job, {"real_test_frame_accuracy": acc, "steps": c.steps})
        clf.load_state_dict(self._checkpoint(job)["model"])
        return clf.eval()

    def teacher(self, seed: int) -> VideoDiT:
        """The teacher's EMA (trained here unless its job is done)."""
        job, c = f"teacher-s{seed}", self.cfg.teacher
        torch.manual_seed(seed)
        model = create_model(self.cfg.model.name).to(self.device)
        if c.init:
            path = Path(c.init.format(seed=seed))
            load_weights(model, path)
            if dist.is_main():  # rank 0 alone decides and writes: no rank may skip a barrier another waits in
                sha, done = sha256_file(path), self.run.result(job)
                if done is None:
                    self.run.save_result(job, {"init": str(path), "sha256": sha}, sync=False)
                elif done.get("sha256") != sha:
                    raise ValueError(f"teacher.init: {path} changed since this run started from it (sha256 "
                                     f"{done.get('sha256')}, now {sha}); start a new run")
            dist.barrier()
            return model.eval()
        state = None
        if self.run.result(job) is None:
            ema = copy.deepcopy(model)

            def loss(net: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict]:
                with _autocast(self.device):
                    return flow_matching_loss(net, batch[0], batch[1], self.num_classes, c.drop_class), {}

            train(model, loss, lambda rows: self.train_clips.clips(rows, seed=seed), c.steps * c.batch_size, c, job=job,
                  run=self.run, seed=seed, ema=ema, ema_decay=c.ema_decay, progress=self.progress)
            last = [r for r in self.run.metrics(job) if r["step"] == c.steps]
            state = self._checkpoint(job)
            self.run.save_result(job, {"steps": c.steps, "seconds": state.get("seconds"),
                                       "final_loss": last[0]["loss"] if last else None,
                                       "parameters": sum(p.numel() for p in model.parameters())})
        export = self.run.artifact("exports") / f"{job}-ema.safetensors"
        if state is None and self._export_only(job, export):
            return load_weights(model, export).eval()
        state = state if state is not None else self._checkpoint(job)  # read once: it holds optimizer state too
        model.load_state_dict(state["ema"])
        if dist.is_main() and not export.exists():
            save_bf16(model, export)
        return model.eval()

    def student(self, seed: int, variant: str, k: int, teacher: VideoDiT, arm: str = "") -> VideoDiT:
        job, s = f"{student_job(variant, k, arm)}-s{seed}", self.arms[arm]
        student = copy.deepcopy(teacher).requires_grad_(True).train()
        if variant == "tdm-asa":
            self.attach_asa(student)
        if s.lora_rank:  # after ASA, before the fake score's copy, as BLADE
            add_lora(student, s.lora_rank, s.lora_targets)
        if self.run.result(job) is None:
            fake = copy.deepcopy(student)  # made after ASA is attached: the fake score runs ASA too (as BLADE's)
            if variant == "tdm-asa" and not s.fake_asa:
                fake.set_attention(None)
            tdm = copy.deepcopy(s.tdm)
            tdm.steps, tdm.cfg = k, self.cfg.sampling.cfg
            train_tdm(student, fake, teacher, self.num_classes, tdm, job=job, run=self.run, seed=seed, progress=self.progress)
            last = [r for r in self.run.metrics(job) if r["step"] == tdm.iterations]
            self.run.save_result(job, {"iterations": tdm.iterations, "seconds": self._checkpoint(job).get("seconds"),
                                       **({k_: last[0][k_] for k_ in ("fake_loss", "generator_loss")} if last else {})})
            del fake
        export = self.run.artifact("exports") / f"{job}.safetensors"
        if self._export_only(job, export):  # merged adapters, as exported (untrained ones change nothing)
            return load_weights(merge_lora(student), export).eval()
        student.load_state_dict(trained_student_state(self._checkpoint(job)))  # its moving average where it kept one
        merge_lora(student)  # the adapters folded in: the teacher's architecture, no extra cost when sampling
        if dist.is_main() and not export.exists():  # bf16, ~20 MB: what travels back from a GPU machine
            save_bf16(student, export)
        return student.eval()

    def _export_only(self, job: str, export: Path) -> bool:
        """Whether a finished job has its bf16 export but no checkpoint: exports alone travel back from a GPU machine
        (checkpoints stay there), and a later session evaluates the run from them."""
        if self.run.checkpoint_path(job).exists() or not export.exists():
            return False
        log.info("%s: no checkpoint in %s; loading its export %s", job, self.run.path, export)
        return True

    def _checkpoint(self, job: str) -> dict:
        state = self.run.load_checkpoint(job)
        if state is None:
            raise FileNotFoundError(f"{self.run.path} has job {job!r} finished but not its weights "
                                    f"({self.run.checkpoint_path(job)}): copy them back, or start a new run")
        return state

    def attach_asa(self, model: VideoDiT) -> VideoDiT:
        a = self.cfg.asa
        asa = ASAConfig(block=model.cfg.block, tau=a.tau, min_keep=a.min_keep, max_keep=a.max_keep, samples=a.samples,
                        pooled_kv=a.pooled_kv)
        # without a GPU (the CPU check) the kernels' PyTorch references run instead
        return model.set_attention(lambda i: AdaptiveBlockSparseAttention(asa, reuse=a.reuse,
                                                                          reference=self.device.type == "cpu"))

    # evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model: VideoDiT, steps: int, cfg: float, student_eta: float | None,
                 seed: int) -> tuple[Tensor, float, float | None]:
        """Eval videos: (videos, wall seconds per video, mean kept share of ASA's blocks or None).

        Video i starts from noise drawn on the CPU from (seed, i), with class i % classes, so every model,
        batch size and device sees the same inputs. The teacher samples by guided Euler steps; a
        student (``student_eta`` given) by its K training steps (``rollout``), whose fresh noise is drawn per video and step
        (``student_step_noise``): the same for every student. One untimed warm-up batch first (kernel compilation
        and tuning, CUDA set-up); the kept share is gathered on the device and read after the timing.
        """
        e, dev = self.cfg.eval, self.device
        asa = [m for m in model.modules() if isinstance(m, AdaptiveBlockSparseAttention)]
        kept: list[Tensor] = []
        hook = lambda mod, i, o: kept.append(mod.last_mask.kv_counts.float().mean() / mod.last_mask.shape[-1])  # noqa: E731
        out, elapsed = [], 0.0
        for n, start in enumerate([0, *range(0, e.videos, e.batch)]):  # the first batch twice: a warm-up, then timed
            warm_up = n == 0
            noise = seeded_noise(self.shape, seed, range(start, start + e.batch)).to(dev)
            y = torch.arange(start, start + e.batch, device=dev) % self.num_classes
            for m in asa:  # reused masks never carry over from another batch's videos
                m.last_mask = None
            hooks = [] if warm_up else [m.register_forward_hook(hook) for m in asa]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            student = student_eta is not None
            fresh = student_step_noise(self.shape, seed, range(start, start + e.batch), steps) if student else None
            with _autocast(dev):
                x0 = sample_videos(model, noise, y, self.num_classes, steps, cfg, self.cfg.sampling.shift,
                                   student_eta=student_eta, fresh_noise=fresh)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            for h in hooks:
                h.remove()
            if not warm_up:
                elapsed += time.perf_counter() - t0
                out.append(x0)
        density = float(torch.stack(kept).mean()) if kept else None
        return torch.cat(out), elapsed / e.videos, density

    def evaluate(self, seed: int, teacher: VideoDiT, students: dict[tuple[str, str, int], VideoDiT],
                 clf: FrameClassifier) -> dict:
        """Every model's samples against real clips and the teacher's; ``students`` keyed (arm, variant, K)."""
        job, e, s = f"eval-s{seed}", self.cfg.eval, self.cfg.sampling
        if dist.broadcast_object(self.run.result(job) is not None):  # decided once, by rank 0, for every rank
            return self.run.result(job)
        if not dist.is_main():  # rank 0 evaluates alone (one set of samples and files); the others wait for its result
            dist.barrier()
            return self.run.result(job)
        labels = torch.arange(e.videos, device=self.device) % self.num_classes
        # the reference: as many real test clips, with the same balanced classes as the generated ones
        real, real_y = self.test_clips.clips(range(e.videos), seed=seed, labels=labels.cpu())
        # (name, what, model, steps, guidance, student eta or None): students sample as they were distilled
        models: list[tuple[str, str, VideoDiT, int, float, float | None]] = [
            (f"teacher-{s.steps}", "teacher", teacher, s.steps, s.cfg, None)]
        for k in sorted({k for s_ in self.arms.values() for k in s_.steps}):  # (d) even where no student has this K
            models.append((f"teacher-k{k}", "teacher at K steps (d)", teacher, k, s.cfg, None))
            if s.cfg != 1.0:  # the students start from these weights and sample unguided: what distillation starts from
                models.append((f"teacher-k{k}-cfg1", "teacher at K steps, unguided (the students' start)", teacher, k,
                               1.0, None))
            for arm, arm_cfg in self.arms.items():
                eta, of_arm = arm_cfg.tdm.eta, f", arm {arm}" if arm else ""
                if (arm, "tdm", k) in students:
                    dense = students[arm, "tdm", k]
                    models.append((student_job("tdm", k, arm), f"TDM dense (a){of_arm}", dense, k, 1.0, eta))
                    models.append((student_job("tdm+asa", k, arm), f"TDM dense + ASA untrained (c){of_arm}",
                                   self.attach_asa(copy.deepcopy(dense)), k, 1.0, eta))
                if (arm, "tdm-asa", k) in students:
                    joint = students[arm, "tdm-asa", k]
                    models.append((student_job("tdm-asa", k, arm), f"TDM + ASA (b){of_arm}", joint, k, 1.0, eta))
                    for r in e.asa_reuse:
                        models.append((f"{student_job('tdm-asa', k, arm)}-reuse{r}",
                                       f"TDM + ASA (b), each mask serving {r} steps{of_arm}", _with_mask_reuse(joint, r),
                                       k, 1.0, eta))
        rows, reference, reference_in = {}, None, None
        real_features = frame_features(clf, real)
        imagenet = create_model("efficientnet_lite0", pretrained=True).to(self.device)
        real_in = imagenet_features(imagenet, real)
        samples_dir = self.run.artifact("samples")
        samples_dir.mkdir(exist_ok=True)
        rounds = max(e.bootstrap // 10, 2)
        for name, what, model, steps, guidance, eta in models:
            videos, sec, density = self.generate(model, steps, guidance, eta, seed)
            feats, feats_in = frame_features(clf, videos), imagenet_features(imagenet, videos)
            if reference is None:
                reference, reference_in = feats, feats_in  # the 50-step teacher's samples
            acc = class_accuracy(clf, videos, labels)
            mot, cons = motion(videos), label_consistency(clf, videos)
            rows[name] = {
                "what": what, "steps": steps, "cfg": guidance, "nfe": steps * (2 if guidance != 1.0 else 1),
                "eta": 1.0 if eta is None else eta,
                "class_accuracy": float(acc.mean()), "class_accuracy_ci": bootstrap_interval(acc, e.bootstrap, seed=seed),
                "fd_real": frechet_distance(feats, real_features),
                "fd_real_ci": frechet_interval(feats, real_features, rounds, seed=seed),
                "fd_real_effnet": frechet_distance(feats_in, real_in),
                "fd_real_effnet_ci": frechet_interval(feats_in, real_in, rounds, seed=seed),
                # against the teacher's own samples (None for the teacher itself)
                "fd_teacher": None if feats is reference else frechet_distance(feats, reference),
                "fd_teacher_ci": None if feats is reference else frechet_interval(feats, reference, rounds, seed=seed),
                "fd_teacher_effnet": None if feats is reference else frechet_distance(feats_in, reference_in),
                "motion": float(mot.mean()), "label_consistency": float(cons.mean()),
                "attention_kept": density, "seconds_per_video": sec,
            }
            save_video_samples(videos[: e.show], samples_dir / f"{name}-s{seed}")
        save_video_samples(real[: e.show], samples_dir / f"real-s{seed}")
        # the noise floor: another set of real clips (another seed) against the reference
        other, _ = self.test_clips.clips(range(e.videos), seed=seed + 1_000, labels=labels.cpu())
        floor = {"fd_real": frechet_distance(frame_features(clf, other), real_features),
                 "fd_real_effnet": frechet_distance(imagenet_features(imagenet, other), real_in)}
        result = {"models": rows, "real": {"class_accuracy": float(class_accuracy(clf, real, real_y).mean()), **floor,
                                           "motion": float(motion(real).mean()),
                                           "label_consistency": float(label_consistency(clf, real).mean())},
                  "data": self.cfg.data.source,
                  "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"}
        self.run.save_result(job, result, sync=False)
        dist.barrier()
        return result

    def student_jobs(self) -> list[tuple[str, str, int]]:
        """(arm, variant, K) of every student, in the evaluation's order."""
        return [(arm, v, k) for arm, s in self.arms.items() for k in s.steps for v in s.variants]

    def train_only(self, jobs: list[str]) -> None:
        """Train the named jobs of every seed (``teacher``, ``classifier`` or a student without its seed, e.g.
        ``tdm-asa-k4-lr3``) and stop: several processes, each with its own jobs, can share one run directory; a last
        run without ``jobs`` evaluates. A student's teacher must be finished first (or come from ``teacher.init``)."""
        students = {student_job(v, k, arm): (arm, v, k) for arm, v, k in self.student_jobs()}
        known = ["teacher", "classifier", *students]
        unknown = [j for j in jobs if j not in known]
        if unknown:
            raise ValueError(f"unknown jobs {unknown}; this config's jobs are {known}")
        if "classifier" in jobs:
            self.classifier()
        if not {"teacher", *students} & set(jobs):
            return
        for seed in self.cfg.seeds:
            if not self.cfg.teacher.init and self.run.result(f"teacher-s{seed}") is None and "teacher" not in jobs:
                raise RuntimeError(f"the students distil teacher-s{seed}, which is not finished in {self.run.path}: "
                                   "train it first (--jobs teacher) or start from an export (teacher.init)")
            teacher = self.teacher(seed)
            for job in jobs:
                if job in students:
                    arm, variant, k = students[job]
                    self.student(seed, variant, k, teacher, arm)

    def run_all(self) -> dict:
        clf, out = None, {}
        for seed in self.cfg.seeds:
            teacher = self.teacher(seed)
            students = {(arm, v, k): self.student(seed, v, k, teacher, arm) for arm, v, k in self.student_jobs()}
            if clf is None:  # first needed here: a run from teacher.init trains its students without the data
                clf = self.classifier()
            out[seed] = self.evaluate(seed, teacher, students, clf)
            del students
        return out


def run_video_blade(cfg: VideoBladeConfig, run_dir: Path, resume: bool = False, progress: bool = True,
                    command: str = "", jobs: list[str] | None = None) -> Path | None:
    """Run (or resume) the recipe in ``run_dir`` and write ``report.md``; returns its path. With ``jobs``, train
    only those (see ``VideoBlade.train_only``) and return None: no evaluation, no report."""
    from .video_report import write_report

    validate(cfg)
    dist.init()
    run = Run(run_dir, cfg, resume=resume, command=command)
    recipe = VideoBlade(cfg, run, progress)
    if jobs:
        recipe.train_only(jobs)
        return None
    results = recipe.run_all()
    report = run.artifact("report.md")
    if dist.is_main():
        write_report(run, results)
    dist.barrier()
    return report
