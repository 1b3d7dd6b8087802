"""GPUSQ-ViT on Fashion-MNIST (paper 1): dense ViT teacher -> 2:4 -> mixed-strategy KD -> QAT -> export.

Jobs per seed (each skipped on ``--resume`` once its result exists):
  teacher-s{seed}              dense ViT, cross-entropy with label smoothing, crop/flip augmentation
  prune-s{seed}                input-channel permutations (fc1->fc2, v->proj within each head), 2:4 masks
  sparse-{kd}-s{seed}          2:4 fine-tune, KD from the dense teacher; kd = full (CE + logits +
                               features + attention), ce and logits (the ablation), unsup (no labels)
  qat-{fmt}[-unsup]-s{seed}    masks frozen, fake-quant int8 / fp8, KD from the dense (or sparse) teacher
Every student is exported to ``exports/<job>.safetensors`` (2:4 values + index metadata), loaded
back from that file alone and evaluated on the test set: the accuracy reported is the deployed
model's (cuSPARSELt on a GPU; on a CPU the same arithmetic run densely).
"""

from __future__ import annotations

import copy
import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed as dist
from ..data import load_fashion_mnist
from ..data.augment import random_crop_flip
from ..distill import OPERATORS, HintLoss, TrainConfig, attention_kl, forward_kl, predict, train
from ..models import create_model
from ..models.vit import VisionTransformer, load_timm_state_dict
from ..runs import Run
from ..weights import NMSparsifier, QuantLinear, calibrate, kept_magnitude, permute_linear_pair, search_permutation, swap_linears
from ..weights.export import deployed_bytes, load_sparse24, save_sparse24, to_sparse24
from ..weights.sparse24 import fuse_sparse24_mlps

log = logging.getLogger(__name__)

__all__ = ["CompressConfig", "run_compress", "KD_VARIANTS"]

KD_VARIANTS = ("full", "ce", "logits", "unsup")


@dataclass
class DataConfig:
    train_subset: int = 0  # 0 = all 60,000 training images
    test_subset: int = 0  # 0 = the full 10,000-image test set
    augment: bool = True  # random 2-pixel crops and horizontal flips while training


@dataclass
class ModelConfig:
    name: str = "vit_fmnist_tiny"  # a registry key (sparsedistill.models)
    init: str = ""  # a timm-style state_dict (.pt / .safetensors) to start the teacher from; "" = from scratch


@dataclass
class TeacherConfig(TrainConfig):
    label_smoothing: float = 0.1
    steps: int = 36000  # 154 epochs of 60,000 images at batch 256: 12,000 (51 epochs) stopped at 91.8-92.3 %
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    checkpoint_every: int = 1000
    cuda_graph: bool = True  # 2x faster steps for this small ViT on a GPU (no effect on a CPU)


@dataclass
class KDConfig:
    """Weights of the mixed-strategy KD terms (0 switches a term off)."""

    ce: float = 1.0  # hard labels
    logits: float = 1.0  # KL to the teacher's softened distribution
    features: float = 1.0  # MSE between every block's (layer-normed) tokens
    attention: float = 1.0  # KL between every block's attention maps
    temperature: float = 4.0
    operator: str = "power"


@dataclass
class PruneConfig:
    layers: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    permute: bool = True  # search input-channel permutations that keep more magnitude under 2:4
    permutation_rounds: int = 2000


@dataclass
class QATConfig:
    formats: list[str] = field(default_factory=lambda: ["int8", "fp8"])
    teacher: str = "dense"  # "dense" (the teacher) or "sparse" (the 2:4 fp16 student)
    calibration_batches: int = 4
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=800, lr=1e-4, checkpoint_every=400, cuda_graph=True))


@dataclass
class SpeedConfig:
    batch: int = 256  # on a GPU, after training: each export vs the dense fp16 model, CUDA-graphed; 0 skips


@dataclass
class CompressConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    student: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000, lr=2e-4, weight_decay=0.0, checkpoint_every=1000,
                                                                      cuda_graph=True))
    qat: QATConfig = field(default_factory=QATConfig)
    ablation: bool = True  # also train the 2:4 student with CE only and CE + logits
    unsupervised: bool = True  # also the label-free path: sparse and int8 students from KD terms only
    speed: SpeedConfig = field(default_factory=SpeedConfig)


def validate(cfg: CompressConfig) -> None:
    if not cfg.seeds:
        raise ValueError("seeds is empty; give at least one, e.g. --set seeds=[0]")
    bad_layers = set(cfg.prune.layers) - {"qkv", "proj", "fc1", "fc2"}
    if bad_layers or not cfg.prune.layers:
        raise ValueError(f"prune.layers: {sorted(bad_layers) or 'empty'}; choose among ['qkv', 'proj', 'fc1', 'fc2']")
    bad_fmt = set(cfg.qat.formats) - {"int8", "fp8"}
    if bad_fmt:
        raise ValueError(f"qat.formats: {sorted(bad_fmt)} not understood; choose from ['int8', 'fp8']")
    if cfg.qat.teacher not in ("dense", "sparse"):
        raise ValueError(f"qat.teacher must be 'dense' or 'sparse', got {cfg.qat.teacher!r}")
    if cfg.kd.operator not in OPERATORS:
        raise ValueError(f"kd.operator {cfg.kd.operator!r} not understood; choose from {list(OPERATORS)}")
    weights = [cfg.kd.ce, cfg.kd.logits, cfg.kd.features, cfg.kd.attention]
    if min(weights) < 0 or sum(weights) == 0:
        raise ValueError(f"kd weights must be >= 0 and not all 0, got ce/logits/features/attention = {weights}")
    if cfg.unsupervised and cfg.kd.logits <= 0:
        # without labels or logits the classifier head gets no gradient (and DDP stops on the unused parameters)
        raise ValueError("unsupervised students learn from the KD terms only and need kd.logits > 0; or set unsupervised=false")


class _DistillForward(nn.Module):
    """Calls ``forward_distill`` through ``forward``, so DDP sees (and syncs) the pass."""

    def __init__(self, vit: VisionTransformer, return_attn: bool) -> None:
        super().__init__()
        self.vit, self.return_attn = vit, return_attn

    def forward(self, x: Tensor):
        return self.vit.forward_distill(x, self.return_attn)


class Compress:
    def __init__(self, cfg: CompressConfig, run: Run, progress: bool = True) -> None:
        validate(cfg)
        self.cfg, self.run, self.progress = cfg, run, progress
        self.device = dist.init()
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 training of a small model: TF32 is the fast path
            torch.backends.cudnn.allow_tf32 = True
        self.data = load_fashion_mnist(cfg.data.train_subset, cfg.data.test_subset)
        self.train_x, self.train_y = self.data.train_x.to(self.device), self.data.train_y.to(self.device)
        self.test_x, self.test_y = self.data.test_x.to(self.device), self.data.test_y.to(self.device)
        self.models: dict[str, nn.Module] = {}  # finished jobs' models, for the jobs that start from them
        self._pruned: dict[int, tuple[VisionTransformer, NMSparsifier]] = {}

    # ----------------------------------------------------------------------------------- pieces
    def new_model(self) -> VisionTransformer:
        model = create_model(self.cfg.model.name, num_classes=len(self.data.classes))
        if not isinstance(model, VisionTransformer):
            raise ValueError(f"model.name {self.cfg.model.name!r} is not a ViT from sparsedistill.models.vit")
        return model

    def batch(self, seed: int):
        def get(rows: Tensor) -> tuple[Tensor, Tensor]:
            r = rows.to(self.device)
            x = self.train_x[r]
            if self.cfg.data.augment:  # draws are a function of the rows: a resumed run sees the same batches
                x = random_crop_flip(x, torch.Generator().manual_seed(zlib.crc32(rows.numpy().tobytes(), seed)))
            return x, self.train_y[r]
        return get

    def include(self, name: str, _mod: nn.Module | None = None) -> bool:
        return name.startswith("blocks.") and name.rsplit(".", 1)[-1] in self.cfg.prune.layers

    def kd_loss(self, teacher: VisionTransformer, weights: KDConfig):
        hint = HintLoss(teacher.cfg.embed_dim, teacher.cfg.embed_dim, normalize=True)
        need_attn = weights.attention > 0

        def loss(net: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            x, y = batch
            s = net(x)
            terms: dict[str, Tensor] = {}
            if weights.ce > 0:
                terms["ce"] = F.cross_entropy(s.logits, y)
            if weights.logits or weights.features or weights.attention:
                with torch.no_grad():
                    t = teacher.forward_distill(x, need_attn)
                if weights.logits > 0:
                    terms["logits"] = forward_kl(s.logits, t.logits, weights.temperature, weights.operator)
                if weights.features > 0:
                    terms["features"] = torch.stack([hint(a, b) for a, b in zip(s.hidden, t.hidden)]).mean()
                if weights.attention > 0:
                    terms["attention"] = torch.stack([attention_kl(a, b) for a, b in zip(s.attentions, t.attentions)]).mean()
            total = sum(getattr(weights, k) * v for k, v in terms.items())
            return total, {k: v.detach() for k, v in terms.items()}

        return loss

    def evaluate(self, model: nn.Module, x: Tensor | None = None) -> tuple[dict[str, float], Tensor]:
        logits = predict(model, self.test_x if x is None else x, batch_size=1000)
        metrics = {"test_acc": float((logits.argmax(-1) == self.test_y).float().mean()),
                   "test_nll": float(F.cross_entropy(logits, self.test_y)), "test_rows": len(self.test_y)}
        return metrics, logits

    def load_job_model(self, job: str, model: nn.Module) -> nn.Module:
        """A finished job's weights from its final checkpoint (after a resume, or a restarted run)."""
        if job not in self.models:
            state = self.run.load_checkpoint(job)
            if state is None:
                raise FileNotFoundError(f"{job} has a result but no checkpoint in {self.run.path}; delete results/{job}.json to redo it")
            model.load_state_dict(state["model"])
            self.models[job] = model.to(self.device)
        return self.models[job]

    # ------------------------------------------------------------------------------------- jobs
    def teacher(self, seed: int) -> VisionTransformer:
        job = f"teacher-s{seed}"
        if job in self.models:
            return self.models[job]
        torch.manual_seed(seed)
        model = self.new_model()
        if self.cfg.model.init:
            load_timm_state_dict(model, _read_state_dict(Path(self.cfg.model.init)))
        model.to(self.device)
        tc = self.cfg.teacher
        ce = lambda net, b: (F.cross_entropy(net(b[0]), b[1], label_smoothing=tc.label_smoothing), {})  # noqa: E731
        t0 = time.time()
        train(model, ce, self.batch(seed), len(self.train_x), tc, job=job, run=self.run, seed=seed, progress=self.progress)
        model.eval().requires_grad_(False)
        if self.run.result(job) is None:
            metrics, _ = self.evaluate(model)
            self.run.save_result(job, {"job": job, **metrics, "train_seconds": time.time() - t0, "flops": model.flops(),
                                       "params": sum(p.numel() for p in model.parameters()), "deployed": self.deploy(job, seed, model, None)})
        self.models[job] = model
        return model

    def pruned(self, seed: int) -> tuple[VisionTransformer, NMSparsifier]:
        """A fresh copy of the teacher, permuted (function unchanged) and 2:4-pruned: every student's start."""
        if seed not in self._pruned:
            self._pruned[seed] = self._prune(seed)
        model, sparsifier = self._pruned[seed]
        fresh = NMSparsifier(2, 4, include=self.include)
        fresh.load_state_dict(sparsifier.state_dict())
        return copy.deepcopy(model), fresh

    def _prune(self, seed: int) -> tuple[VisionTransformer, NMSparsifier]:
        job = f"prune-s{seed}"
        teacher = self.teacher(seed)
        model = copy.deepcopy(teacher).train().requires_grad_(True)
        perm_stats: dict[str, list[float]] = {}
        if self.cfg.prune.permute:
            perm_stats = permute_for_24(model, self.cfg.prune.layers, self.cfg.prune.permutation_rounds, seed,
                                        progress=self.progress and dist.is_main())
        sparsifier = NMSparsifier(2, 4, include=self.include)
        sparsifier.step_to(model, 1.0)
        if self.run.result(job) is None:
            metrics, _ = self.evaluate(model)
            kept = {name: float(kept_magnitude(m.weight.detach().cpu()) / _unpruned_magnitude(teacher, name))
                    for name, m in model.named_modules() if self.include(name, m)}
            self.run.save_result(job, {"job": job, **metrics, "sparsity": sparsifier.masks.sparsity(),
                                       "kept_magnitude_by_layer": kept, "permutation": perm_stats})
        return model, sparsifier

    def sparse_student(self, variant: str, seed: int) -> VisionTransformer:
        job = f"sparse-{variant}-s{seed}"
        if self.run.result(job) is not None:
            return self.load_job_model(job, _DistillForward(self.new_model(), True)).vit
        teacher = self.teacher(seed)
        model, sparsifier = self.pruned(seed)
        k = self.cfg.kd
        weights = {"full": k, "ce": KDConfig(k.ce, 0, 0, 0, k.temperature, k.operator),
                   "logits": KDConfig(k.ce, k.logits, 0, 0, k.temperature, k.operator),
                   "unsup": KDConfig(0, k.logits, k.features, k.attention, k.temperature, k.operator)}[variant]
        net = _DistillForward(model, weights.attention > 0)
        torch.manual_seed(zlib.crc32(job.encode()))
        t0 = time.time()
        train(net, self.kd_loss(teacher, weights), self.batch(seed), len(self.train_x), self.cfg.student, job=job, run=self.run,
              seed=seed * 100 + 1, enforce=lambda _: sparsifier.enforce(model), progress=self.progress)
        model.eval()
        self.models[job] = net
        self.finish(job, seed, model, "fp16", time.time() - t0, {"kd": vars(weights)})
        return model

    def qat_student(self, fmt: str, seed: int, unsup: bool = False) -> None:
        job = f"qat-{fmt}{'-unsup' if unsup else ''}-s{seed}"
        if self.run.result(job) is not None:
            return
        teacher = self.teacher(seed)
        base = self.sparse_student("unsup" if unsup else "full", seed)
        model = copy.deepcopy(base).train().requires_grad_(True)
        masks = {n: (m.weight != 0) for n, m in model.named_modules() if self.include(n, m)}
        swap_linears(model, lambda n, lin: QuantLinear.from_linear(lin, fmt, mask=masks[n]) if n in masks else None)
        calib_rows = torch.arange(min(len(self.train_x), self.cfg.qat.calibration_batches * self.cfg.qat.train.batch_size))
        calibrate(model, list(self.train_x[calib_rows].split(self.cfg.qat.train.batch_size)))
        k = self.cfg.kd
        weights = KDConfig(0 if unsup else k.ce, k.logits, k.features, k.attention, k.temperature, k.operator)
        kd_teacher = teacher if self.cfg.qat.teacher == "dense" else copy.deepcopy(base).eval().requires_grad_(False)
        net = _DistillForward(model, weights.attention > 0)
        torch.manual_seed(zlib.crc32(job.encode()))
        t0 = time.time()
        train(net, self.kd_loss(kd_teacher, weights), self.batch(seed), len(self.train_x),
              self.cfg.qat.train, job=job, run=self.run, seed=seed * 100 + 2, progress=self.progress)
        model.eval()
        self.finish(job, seed, model, fmt, time.time() - t0, {"kd": vars(weights), "kd_teacher": self.cfg.qat.teacher})

    def finish(self, job: str, seed: int, model: VisionTransformer, fmt: str, seconds: float, extra: dict[str, Any]) -> None:
        """Evaluate the training graph, export, reload from the file and evaluate what deploys."""
        t0 = time.time()
        metrics, logits = self.evaluate(model)
        result = {"job": job, "format": fmt, **metrics, "train_seconds": seconds, **extra,
                  "flops": model.flops(tuple(self.cfg.prune.layers)), "eval_seconds": time.time() - t0}
        t0 = time.time()
        result["deployed"] = self.deploy(job, seed, model, fmt, logits)
        result["deploy_seconds"] = time.time() - t0  # export, reload, evaluate
        self.run.save_result(job, result)

    def deploy(self, job: str, seed: int, model: VisionTransformer, fmt: str | None, train_logits: Tensor | None = None) -> dict[str, Any]:
        """Export (students), reload from the file, evaluate on the test set."""
        out: dict[str, Any] = {}
        if fmt is None:  # the dense teacher: its sizes
            n = sum(p.numel() for p in model.parameters())
            return {"bytes_fp32": 4 * n, "bytes_fp16": 2 * n}
        exported = copy.deepcopy(model).cpu()
        to_sparse24(exported, fmt, self.include)
        path = self.run.artifact("exports") / f"{job}.safetensors"
        if dist.is_main():
            out["file_bytes"] = save_sparse24(exported, path, self.cfg.model.name, {"num_classes": len(self.data.classes)},
                                              extra={"job": job})
        dist.barrier()
        out["bytes"] = deployed_bytes(exported)
        deployed = load_sparse24(path, self.device)
        x = self.test_x.half() if self.device.type == "cuda" else self.test_x
        metrics, logits = self.evaluate(deployed, x)
        out |= {"test_acc": metrics["test_acc"], "path": str(path.relative_to(self.run.path)),
                "runs_on": "cuSPARSELt 2:4 kernel" if self.device.type == "cuda" else "CPU: dense reference of the 2:4 arithmetic"}
        if train_logits is not None:
            out["agreement_with_training_graph"] = float((logits.argmax(-1) == train_logits.argmax(-1)).float().mean())
        if fmt == "int8" and fuse_sparse24_mlps(deployed):  # fc1 -> GELU -> int8 in cuSPARSELt's epilogue (issue 24)
            try:  # an extra measurement: its failure is recorded, the trained job is kept
                fused, fused_logits = self.evaluate(deployed, x)
                out |= {"test_acc_fused_mlp": fused["test_acc"],
                        "agreement_fused_mlp": float((fused_logits.argmax(-1) == logits.argmax(-1)).float().mean())}
            except (RuntimeError, OSError) as e:
                log.warning("%s: the fused-MLP evaluation failed: %s", job, e)
                out["fused_mlp_error"] = f"{type(e).__name__}: {e}"[:300]
        return out

    # ------------------------------------------------------------------------------------- main
    def run_all(self) -> dict[str, Any]:
        cfg = self.cfg
        bar = tqdm(total=len(cfg.seeds) * len(self.jobs(0)), desc="vit compress", disable=not (self.progress and dist.is_main()))
        for seed in cfg.seeds:
            self.teacher(seed)
            bar.update()
            for job in self.jobs(seed)[1:]:
                kind, rest = job.split("-", 1)
                if kind == "sparse":
                    self.sparse_student(rest.rsplit("-s", 1)[0], seed)
                elif kind == "qat":
                    self.qat_student(rest.split("-")[0], seed, unsup="-unsup-" in job)
                bar.update()
            self.models.clear()  # the next seed starts from its own teacher
            self._pruned.clear()
        bar.close()
        return {"seeds": cfg.seeds, "jobs": {s: self.jobs(s) for s in cfg.seeds}}

    def jobs(self, seed: int) -> list[str]:
        cfg = self.cfg
        names = [f"teacher-s{seed}", f"sparse-full-s{seed}"]
        names += [f"sparse-{v}-s{seed}" for v in ("ce", "logits") if cfg.ablation]
        names += [f"qat-{f}-s{seed}" for f in cfg.qat.formats]
        if cfg.unsupervised:
            names += [f"sparse-unsup-s{seed}"] + ([f"qat-int8-unsup-s{seed}"] if "int8" in cfg.qat.formats else [])
        return names


@torch.no_grad()
def permute_for_24(model: VisionTransformer, layers: list[str], rounds: int, seed: int, progress: bool = False) -> dict[str, list[float]]:
    """Permute channels where the function allows it, so 2:4 pruning keeps more weight magnitude.

    fc2's inputs are fc1's outputs (GELU is elementwise); proj's inputs are the attention output,
    whose channels may move only within their head (they belong to that head's values). The
    inputs of qkv and fc1 are the residual stream, shared by every block, so they stay put.
    Returns ``{layer_kind: [kept share before, after, ...]}`` per block.
    """
    stats: dict[str, list[float]] = {"fc2": [], "proj": []}
    for blk in tqdm(model.blocks, desc="2:4 permutations", disable=not progress, leave=False):
        if "fc2" in layers:
            r = search_permutation(blk.mlp.fc2.weight, rounds=rounds, seed=seed)
            permute_linear_pair(blk.mlp.fc1, blk.mlp.fc2, r.perm.to(blk.mlp.fc2.weight.device))
            stats["fc2"] += [r.kept_before, r.kept_after]
        if "proj" in layers:
            attn = blk.attn
            d, hd = attn.proj.in_features, attn.head_dim
            before = after = 0.0
            for h in range(attn.num_heads):
                cols = slice(h * hd, (h + 1) * hd)
                r = search_permutation(attn.proj.weight[:, cols], rounds=rounds, seed=seed)
                p = r.perm.to(attn.proj.weight.device)
                attn.proj.weight[:, cols] = attn.proj.weight[:, cols][:, p]
                v_rows = slice(2 * d + h * hd, 2 * d + (h + 1) * hd)  # this head's value channels inside qkv
                attn.qkv.weight[v_rows] = attn.qkv.weight[v_rows][p]
                if attn.qkv.bias is not None:
                    attn.qkv.bias[v_rows] = attn.qkv.bias[v_rows][p]
                before, after = before + r.kept_before / attn.num_heads, after + r.kept_after / attn.num_heads
            stats["proj"] += [before, after]
    return {k: v for k, v in stats.items() if v}


def time_exports(run: Run, batch: int, progress: bool = True) -> dict[str, dict[str, float]]:
    """GPU time of every exported student vs the dense fp16 model of the same architecture (both CUDA-graphed).

    Run after training, in one process, so no other work shares the GPU; written to ``<run>/speed.json``.
    """
    from ..runs import atomic_write_bytes
    from ..timing import time_ms
    from ..weights.sparse24 import CUDAGraphed

    if not torch.cuda.is_available():
        raise RuntimeError("timing the 2:4 exports needs a CUDA GPU with sparse tensor cores (Ampere or newer); none was found")
    out: dict[str, dict[str, float]] = {}
    dense_ms: dict[str, float] = {}
    for path in tqdm(sorted((run.path / "exports").glob("*.safetensors")), desc="GPU timing", disable=not progress):
        model = load_sparse24(path, "cuda")
        cfg = model.cfg
        x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device="cuda", dtype=torch.float16)
        key = repr(cfg)
        with torch.no_grad():
            if key not in dense_ms:  # weights do not change the dense time: a fresh model of the same shapes
                dense = VisionTransformer(cfg).cuda().half().eval()
                g = CUDAGraphed(dense, x)
                dense_ms[key] = time_ms(lambda: g(x), graph=False)
                del dense, g
            ours = CUDAGraphed(model, x)
            ms = time_ms(lambda: ours(x), graph=False)
        out[path.stem] = {"batch": batch, "ms": ms, "dense_fp16_ms": dense_ms[key], "speedup": dense_ms[key] / ms,
                          "device": torch.cuda.get_device_name()}
    atomic_write_bytes(run.path / "speed.json", json.dumps(out, indent=1).encode())
    return out


def _unpruned_magnitude(model: nn.Module, name: str) -> float:
    return float(model.get_submodule(name).weight.detach().abs().sum())


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"model.init: no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def run_compress(cfg: CompressConfig, run_dir: Path, resume: bool = False, progress: bool = True, command: str = "") -> Path:
    """Run (or resume) the pipeline in ``run_dir`` and write ``report.md``; returns its path."""
    from .vit_report import write_report

    validate(cfg)
    dist.init()
    run = Run(run_dir, cfg, resume=resume, command=command)
    job = Compress(cfg, run, progress=progress)
    index = job.run_all()
    index["data_source"] = str(job.data.source)
    if torch.cuda.is_available() and cfg.speed.batch and dist.is_main():
        time_exports(run, cfg.speed.batch, progress=progress)
    report = run.artifact("report.md")
    if dist.is_main():
        write_report([run], index)
    dist.barrier()
    return report
