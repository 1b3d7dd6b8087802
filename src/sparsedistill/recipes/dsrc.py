"""DSRC on simulated multi-vehicle LiDAR: cooperative detectors trained clean, evaluated under corruptions.

Jobs, per seed (each resumable; a finished job is skipped on --resume):
  teacher-s{seed}             the detector on DSRC's painted input (own background + the fleet's car points)
  teacher_unpainted-s{seed}   the same input with the paint channel zeroed (the "no painting" ablation's teacher)
  {variant}-s{seed}           b0 (detection loss only), no_fusion (the ego alone), early (points merged before
                              pillars), dsrc (distillation + reconstruction) and its ablations dsrc_no_paint,
                              dsrc_no_recon, dsrc_no_distill
  detect-{model}-s{seed}      a model's detections on the test frames, clean and under each corruption at each
                              level (a checkpoint, ~3 MB), their AP@0.5 / 0.7, the frames' true boxes, and the
                              predictions matched to them (``matches/``, ~0.5 MB); b0 and dsrc also draw their BEV
                              pictures here
  eval-s{seed}                Robo3D's CE / RR against b0, paired bootstrap of delta-AP vs b0, from the detect jobs'
                              results and matches alone: no model, no frame, no raw detection (so it runs anywhere)
``perception run --jobs`` trains (and detects with) chosen jobs only, in the order given.
Every trained model is also exported in bf16 (``exports/<job>.safetensors``, ~18 MB); a finished job whose
checkpoint is absent loads its export. A run carries across machines and sessions as the results and matches of
its detected models (the "bank" benchmarks/device/dsrc_run.sh returns, committed by hand): the rest trains again.
Frames are simulated at the start (``perception.frames``) from disjoint seed ranges per split; nothing is
downloaded. The report (``dsrc_report``) merges seeds.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import distributed as dist
from ..distill import TrainConfig, train
from ..models import create_model
from ..models.coop_detector import CoopDetector
from ..models.safetensors_io import load_weights, save_bf16
from ..perception.anchors import make_anchors
from ..perception.batching import Batch, FrameInputs, add_reconstruction_targets, collate, frame_inputs, merge
from ..perception.corruptions import LEVELS, corruption_names
from ..perception.detections import (IOU_THRESHOLDS, load_matches, pack_frames, packed_sha256, save_matches,
                                       unpack_frames)
from ..perception.frames import Frame, SimConfig, corrupt_frame, simulate_frames, split_seeds
from ..perception.lidar import LidarConfig
from ..perception.plots import save_bev
from ..perception.metrics import (FrameMatches, corruption_error, match_frames, matched_ap, mean_ce, mean_rr,
                                  paired_bootstrap_delta_matched, resilience_rate)
from ..perception.scene import SceneConfig
from ..perception.training import DSRCWeights, detector_loss, freeze, predict, student_loss, teacher_points
from ..runs import Run
from ..timing import LapTimer

__all__ = ["DSRCConfig", "VARIANTS", "run_dsrc"]

log = logging.getLogger(__name__)
PICTURED = ("b0", "dsrc")  # the models whose BEV pictures the report shows

# variant: (input mode, fusion, teacher job (None: no distillation), reconstruction head)
VARIANTS = {
    "b0": ("intermediate", "attention", None, False),
    "no_fusion": ("intermediate", "none", None, False),
    "early": ("early", "attention", None, False),
    "dsrc": ("intermediate", "attention", "teacher", True),
    "dsrc_no_paint": ("intermediate", "attention", "teacher_unpainted", True),
    "dsrc_no_recon": ("intermediate", "attention", "teacher", False),
    "dsrc_no_distill": ("intermediate", "attention", None, True),
}


@dataclass
class SimSettings:
    rings: int = 32
    azimuths: int = 1024
    agents: tuple[int, int] = (2, 5)
    train_frames: int = 2000
    test_frames: int = 200


@dataclass
class DetectorTrainConfig(TrainConfig):
    steps: int = 4000
    batch_size: int = 4  # frames
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.05
    log_every: int = 50
    checkpoint_every: int = 500
    # "tf32": fp32 weights and activations, TF32 tensor cores; "bf16": forwards and losses under bf16 autocast
    # (weights, optimizer and evaluation stay fp32). benchmarks/dsrc_speed.py times both.
    precision: str = "tf32"
    # BEV maps and conv weights in NHWC, cuDNN's layout on tensor cores (the same numbers up to the order of sums):
    # H100, 5629515, 30 steps a row: B0 179 frames/s against 156 in NCHW at the batch of 4, DSRC 124 against 106
    # (benchmarks/results/dsrc_speed_h100_5629515.json). The three seeds banked in docs/results/dsrc trained in NCHW.
    channels_last: bool = True


@dataclass
class EvalConfig:
    corruptions: list[str] = field(default_factory=corruption_names)
    levels: list[int] = field(default_factory=lambda: list(LEVELS))
    batch: int = 8
    bootstrap: int = 1000
    # drawn at level 2 beside clean in b0's and dsrc's BEV pictures (those of them among ``corruptions``)
    pictures: list[str] = field(default_factory=lambda: ["beam_missing", "fog", "motion_blur"])


@dataclass
class DSRCConfig:
    seeds: list[int] = field(default_factory=lambda: [0])
    model: str = "coop_detector"
    sim: SimSettings = field(default_factory=SimSettings)
    train: DetectorTrainConfig = field(default_factory=DetectorTrainConfig)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    eval: EvalConfig = field(default_factory=EvalConfig)


def validate(cfg: DSRCConfig) -> None:
    unknown = set(cfg.variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; use any of {list(VARIANTS)}")
    if "b0" not in cfg.variants:
        raise ValueError("the variants must include b0: CE and delta-AP are measured against it")
    bad = (set(cfg.eval.corruptions) | set(cfg.eval.pictures)) - set(corruption_names())
    if bad:
        raise ValueError(f"unknown corruptions {sorted(bad)} (eval.corruptions / eval.pictures); use any of "
                         f"{corruption_names()}")
    if set(cfg.eval.levels) - set(LEVELS) or not cfg.eval.levels:
        raise ValueError(f"eval.levels must be a non-empty subset of {list(LEVELS)}, got {cfg.eval.levels}")
    if cfg.train.precision not in ("tf32", "bf16"):
        raise ValueError(f"train.precision must be 'tf32' or 'bf16', got {cfg.train.precision!r}")
    if not isinstance(create_model(cfg.model), CoopDetector):
        raise ValueError(f"model {cfg.model!r} is not a cooperative detector; use coop_detector or coop_detector_tiny")


class DSRCRecipe:
    def __init__(self, cfg: DSRCConfig, run: Run, progress: bool) -> None:
        validate(cfg)
        self.cfg, self.run, self.progress = cfg, run, progress
        self.device = dist.init()
        if self.device.type == "cuda":  # fp32 convolutions of a small BEV net: TF32 tensor cores are the fast path
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        s = cfg.sim
        self.sim = SimConfig(SceneConfig(agents=tuple(s.agents)), LidarConfig(rings=s.rings, azimuths=s.azimuths))
        probe = create_model(cfg.model)
        self.grid, self.anchor_cfg = probe.cfg.grid, probe.cfg.anchors
        self.anchors = make_anchors(self.grid, self.anchor_cfg, self.device).view(-1, 7)
        self._frames: dict[str, list[Frame]] = {}
        self._kept: dict[str, dict[int, FrameInputs]] = {}  # collated training inputs by input mode, by frame
        self._teacher_input_later = False  # whether a job of this process will train on the teacher's input
        self._test_cache: tuple[str, list[tuple[tuple[str, int], list[Batch]]]] | None = None  # see _test_batches

    def frames(self, split: str) -> list[Frame]:
        if split not in self._frames:
            n = self.cfg.sim.train_frames if split == "train" else self.cfg.sim.test_frames
            # simulated once per run directory: --jobs processes side by side and resumed calls load the first's file
            self._frames[split] = simulate_frames(split_seeds(split, n), self.sim, self.device,
                                                  cache_dir=self.run.path / "frames")
        return self._frames[split]

    def _model(self, **kw) -> CoopDetector:
        return create_model(self.cfg.model, channels_last=self.cfg.train.channels_last, **kw).to(self.device)

    def _train(self, job: str, model: nn.Module, loss_fn, inputs: str, teacher_input: bool, seed: int,
               reconstruction: bool = False) -> nn.Module:
        if self.run.result(job) is None:  # the training frames are simulated only when a job needs them
            frames = self.frames("train")
            # each frame's inputs are collated at its first visit and kept, for the later jobs of this process too: the
            # steps revisit every frame (4,000 x 4 draws of 2,000 frames) and collating is ~570 small ops a frame
            # (launch-bound on a GPU: ~45 s a job at 2,000 frames). With the teacher's input when any job here will
            # need it, so that B0 before the teacher collates once for both; each job merges only what it uses.
            kept = self._kept.setdefault(inputs, {})
            with_teacher = teacher_input or (inputs == "intermediate" and self._teacher_input_later)

            def get_batch(rows: torch.Tensor):
                for r in rows.tolist():
                    if r not in kept or (teacher_input and kept[r].teacher_clouds is None):
                        kept[r] = frame_inputs(frames[r], self.grid, self.anchors, self.anchor_cfg, inputs=inputs,
                                               teacher=with_teacher)
                    if reconstruction:  # per frame, once: kept inputs of an earlier job gain them
                        add_reconstruction_targets(kept[r], self.grid)
                return merge([kept[r] for r in rows.tolist()], teacher=teacher_input,
                             reconstruction=reconstruction)

            amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")

            def amp_loss(net, batch):
                with amp:
                    return loss_fn(net, batch)

            torch.manual_seed(seed)
            log.info("%s: training %d steps on %d frames (%s inputs)", job, self.cfg.train.steps, len(frames), inputs)
            train(model, amp_loss, get_batch, len(frames), self.cfg.train, job=job, run=self.run, seed=seed,
                  progress=self.progress)
            seconds = self.run.load_checkpoint(job).get("seconds")
            layout = "nhwc" if self.cfg.train.channels_last else "nchw"  # a run resumed across the default's change
            self.run.save_result(job, {"steps": self.cfg.train.steps, "seconds": seconds, "layout": layout})
            log.info("%s: trained in %s s", job, f"{seconds:.0f}" if seconds is not None else "?")
        export = self.run.artifact("exports") / f"{job}.safetensors"
        state = self.run.load_checkpoint(job)
        if state is None:
            if not export.exists():
                raise FileNotFoundError(f"{self.run.path} has job {job!r} finished but neither its checkpoint nor its "
                                        f"export ({export}): copy one back, or start a new run")
            log.info("%s: no checkpoint in %s; loading its export %s", job, self.run.path, export)
            return load_weights(model, export)
        model.load_state_dict(state["model"])
        if dist.is_main() and not export.exists():  # bf16: what travels back from a GPU machine
            save_bf16(model, export)
        return model

    def teacher(self, seed: int, painted: bool = True) -> CoopDetector:
        job = f"{'teacher' if painted else 'teacher_unpainted'}-s{seed}"
        torch.manual_seed(seed)
        model = self._model(in_features=5)

        def loss(net, batch):
            return detector_loss(net(teacher_points(batch, painted), batch.teacher_cloud, batch.agents), batch)

        return freeze(self._train(job, model, loss, "intermediate", True, seed))

    def variant(self, name: str, seed: int, teachers: dict[str, CoopDetector]) -> CoopDetector:
        inputs, fusion, teacher_job, recon = VARIANTS[name]
        torch.manual_seed(seed)
        model = self._model(fusion=fusion, reconstruction=recon)
        teacher = teachers.get(teacher_job) if teacher_job else None
        if teacher_job and teacher is None and self.run.result(f"{name}-s{seed}") is None:
            raise RuntimeError(f"{name}-s{seed} distils from {teacher_job}-s{seed}: pass it in teachers to train it")
        weights = DSRCWeights() if recon else DSRCWeights(occupancy=0.0, offset=0.0)
        painted = teacher_job != "teacher_unpainted"

        def loss(net, batch):
            return student_loss(net, batch, teacher, weights, painted)

        return self._train(f"{name}-s{seed}", model, loss, inputs, teacher is not None, seed, recon).eval()

    def _conditions(self) -> list[tuple[str, int]]:
        e = self.cfg.eval
        return [("clean", 0)] + [(c, lv) for c in e.corruptions for lv in e.levels]

    @functools.cached_property
    def _test_truth(self) -> list[Tensor]:
        """BEV boxes (x, y, l, w, yaw) of each test frame's labels, from the clean frame: a corruption hides points, not cars."""
        test, n = self.frames("test"), self.cfg.eval.batch
        return [gt[:, [0, 1, 3, 4, 6]].cpu() for i in range(0, len(test), n) for gt in collate(test[i : i + n], self.grid).boxes]

    @torch.no_grad()
    def detect(self, seed: int, name: str, model: CoopDetector) -> None:
        """A model's detections on the test frames in every condition, their AP and the frames' true boxes: its own job
        (``detect-<name>-s<seed>``, detections kept as a checkpoint), so a cut evaluation resumes at the next model and
        ``--jobs`` processes detect with the models they train. b0 and dsrc draw their BEV pictures here too."""
        job, e = f"detect-{name}-s{seed}", self.cfg.eval
        if self._detected(job):
            return
        test, inputs, truth = self.frames("test"), VARIANTS[name][0], self._test_truth
        ap, detections, matches, t0 = {}, {}, {}, time.perf_counter()
        split, lap = dict.fromkeys(("inputs", "predict", "match"), 0.0), LapTimer(self.device)  # where the time goes
        for (cname, lv), batches in self._test_batches(inputs):
            split["inputs"] += lap()  # corrupted and collated (the first model of a process), else copied back
            key = "clean" if cname == "clean" else f"{cname}-{lv}"
            boxes, scores = [], []
            for batch in batches:
                for b, sc in predict(model, batch, self.anchors, self.anchor_cfg):
                    boxes.append(b[:, [0, 1, 3, 4, 6]].cpu())
                    scores.append(sc.cpu())
            detections[key] = pack_frames(boxes, scores)
            split["predict"] += lap()  # forward, decoding, NMS
            matches[key] = {t: match_frames(boxes, scores, truth, thr) for t, thr in IOU_THRESHOLDS.items()}
            ap[key] = {t: matched_ap(m) for t, m in matches[key].items()}
            split["match"] += lap()
        if name in PICTURED:
            self._pictures(seed, name, model, test[:2], [c for c in e.pictures if c in e.corruptions])
        packed_truth = pack_frames(truth)
        # rank 0 detects alone (its callers wait for it): no collective here
        self.run.save_checkpoint(job, {"detections": detections, "truth": packed_truth}, sync=False)
        save_matches(self._matches_path(job), matches)
        self.run.save_result(job, {"ap": ap, "seconds": time.perf_counter() - t0,
                                   "seconds_split": {k: round(v, 3) for k, v in split.items()}, "frames": len(test),
                                   "conditions": len(ap), "truth_sha256": packed_sha256(packed_truth)}, sync=False)
        corrupted = [row["ap50"] for key, row in ap.items() if key != "clean"]
        log.info("%s: clean AP@0.5 %.1f %%, corrupted (mean) %.1f %%, in %.0f s (%s)", job, 100 * ap["clean"]["ap50"],
                 100 * sum(corrupted) / max(len(corrupted), 1), time.perf_counter() - t0,
                 ", ".join(f"{k} {v:.0f} s" for k, v in split.items()))

    def _test_batches(self, inputs: str) -> Iterator[tuple[tuple[str, int], list[Batch]]]:
        """Per condition (``_conditions``' order), the test frames corrupted and collated for ``inputs`` as batches.
        Every model of a process detects on the same ones, so they are made once and kept for the input mode last
        asked, in host memory (~7-12 GB at 200 frames x 25 conditions: not on the GPU, where the next models train);
        another mode replaces them."""
        if self._test_cache is not None and self._test_cache[0] == inputs:
            for condition, batches in self._test_cache[1]:
                yield condition, [b.to(self.device) for b in batches]
            return
        self._test_cache = None  # freed before the next mode's batches are made
        test, n, kept = self.frames("test"), self.cfg.eval.batch, []
        for cname, lv in self._conditions():
            frames = [corrupt_frame(f, cname, lv, self.cfg.sim.rings) for f in test]
            # no labels: corrupted frames are scored against the clean frames' (``_test_truth``)
            batches = [collate(frames[i : i + n], self.grid, inputs=inputs, labels=False)
                       for i in range(0, len(frames), n)]
            kept.append(((cname, lv), [b.to("cpu", pin=True) for b in batches]))
            yield (cname, lv), batches
        self._test_cache = (inputs, kept)

    def _detected(self, job: str) -> bool:
        return self.run.result(job) is not None and (self._matches_path(job).exists()
                                                     or self.run.checkpoint_path(job).exists())

    def _matches_path(self, job: str) -> Path:
        """A detect job's matched predictions (~0.5 MB): all the evaluation needs, small enough to keep with the
        results where the detections (~3 MB a model) and the models are not."""
        return self.run.artifact("matches") / f"{job}.npz"

    def _matches(self, job: str) -> dict[str, dict[str, FrameMatches]]:
        """A detect job's matches by condition and AP threshold, made from its detections if they predate the file."""
        path = self._matches_path(job)
        if not path.exists():
            state = self.run.load_checkpoint(job)
            if "truth" not in state:
                raise ValueError(f"{job} predates packed detections with their true boxes (9fb0abd): delete its "
                                 "results/ and checkpoints/ files to detect it again")
            truth = unpack_frames(*state["truth"])[0]
            save_matches(path, {key: {t: match_frames(*unpack_frames(*d), truth, thr)
                                      for t, thr in IOU_THRESHOLDS.items()}
                                for key, d in state["detections"].items()})
        return load_matches(path)

    @torch.no_grad()
    def evaluate(self, seed: int, models: list[str] | None = None) -> dict:
        """CE / RR and paired delta-AP against b0 from every model's detect job; the frames and models are not needed.
        ``models``: a part of the config's variants (with b0), evaluated but not saved as the finished evaluation."""
        job, e = f"eval-s{seed}", self.cfg.eval
        partial = models is not None and list(models) != list(self.cfg.variants)
        models = list(self.cfg.variants) if models is None else list(models)
        unknown = [m for m in models if m not in self.cfg.variants]
        if unknown:
            raise ValueError(f"models {unknown} are not variants of this run; its variants are {list(self.cfg.variants)}")
        if "b0" not in models:
            raise ValueError(f"the evaluation compares every model with b0; detect b0 (seed {seed}) first")
        if not partial and self.run.result(job) is not None:
            return self.run.result(job)
        missing = [v for v in models if not self._detected(f"detect-{v}-s{seed}")]
        if missing:
            raise FileNotFoundError(f"{self.run.path} lacks the detections of {missing} (seed {seed}): run "
                                    f"`perception run --jobs {' '.join(missing)}` there, or copy their results/ and "
                                    "matches/ files back")
        results: dict = {"conditions": [f"{c}-{lv}" if c != "clean" else "clean" for c, lv in self._conditions()],
                         "models": {}}
        matches: dict[str, dict[str, dict[str, FrameMatches]]] = {}
        truth_sha = {}
        for name in models:
            found = self.run.result(f"detect-{name}-s{seed}")
            results["models"][name] = {key: dict(row) for key, row in found["ap"].items()}
            matches[name] = self._matches(f"detect-{name}-s{seed}")
            truth_sha[name] = found.get("truth_sha256")
        if len(set(truth_sha.values())) > 1:  # detect jobs of one run on other machines must have seen the same frames
            raise ValueError(f"the detect jobs of seed {seed} saw different test frames (true boxes' sha256 per model: "
                             f"{truth_sha}); detect them again on one machine (delete their results/detect-* files)")
        # Robo3D's robustness against b0, and paired bootstrap of delta-AP against b0, per condition
        for name, rows in results["models"].items():
            b0 = results["models"]["b0"]
            for t in ("ap50", "ap70"):
                # undefined (None) where a denominator is 0: b0 perfect under a corruption, or a clean AP of 0
                ce = {c: corruption_error([rows[f"{c}-{lv}"][t] for lv in e.levels], [b0[f"{c}-{lv}"][t] for lv in e.levels])
                      if any(b0[f"{c}-{lv}"][t] < 1 for lv in e.levels) else None for c in e.corruptions}
                rr = {c: resilience_rate([rows[f"{c}-{lv}"][t] for lv in e.levels], rows["clean"][t])
                      if rows["clean"][t] > 0 else None for c in e.corruptions}
                rows[f"ce_{t}"], rows[f"rr_{t}"] = ce, rr
                rows[f"mce_{t}"] = mean_ce(ce) if ce and None not in ce.values() else None
                rows[f"mrr_{t}"] = mean_rr(rr) if rr and None not in rr.values() else None
            if name != "b0":
                for key in results["conditions"]:
                    for t in IOU_THRESHOLDS:
                        rows[key][f"delta_{t}_vs_b0"] = paired_bootstrap_delta_matched(
                            matches[name][key][t], matches["b0"][key][t], rounds=e.bootstrap, seed=seed)
        if not partial:  # a partial evaluation saved as the job would stop the full one
            self.run.save_result(job, results, sync=False)  # rank 0 evaluates alone
        return results

    def evaluate_detected(self) -> tuple[dict[int, dict], dict[int, list[str]]]:
        """The evaluation of every seed's models detected so far, trained and detected nowhere here: per seed its
        results (full where every variant is detected) and the variants not yet detected."""
        results, missing = {}, {}
        for seed in self.cfg.seeds:
            if self.run.result(f"eval-s{seed}") is not None:  # evaluated already (its matches may not be here)
                results[seed], missing[seed] = self.run.result(f"eval-s{seed}"), []
                continue
            detected = [v for v in self.cfg.variants if self._detected(f"detect-{v}-s{seed}")]
            missing[seed] = [v for v in self.cfg.variants if v not in detected]
            if "b0" in detected:
                results[seed] = self.evaluate(seed, detected)
        if not results:
            raise FileNotFoundError(f"{self.run.path} has no seed with b0 detected, which every comparison needs: run "
                                    "`perception run --jobs b0` there first")
        return results, missing

    def _pictures(self, seed: int, name: str, model: CoopDetector, frames: list[Frame], corruptions: list[str]) -> None:
        """BEV pictures of the first test frames, clean and under each of ``corruptions`` at level 2."""
        out = self.run.artifact("samples")
        out.mkdir(exist_ok=True)
        for cname in ["clean", *corruptions]:
            for i, frame in enumerate(frames):
                f = corrupt_frame(frame, cname, 2, self.cfg.sim.rings)
                clouds = [f.points_in_ego(a) for a in range(f.num_agents)]
                truth = collate([frame], self.grid).boxes[0]
                batch = collate([f], self.grid, inputs=VARIANTS[name][0], labels=False)
                boxes, scores = predict(model, batch, self.anchors, self.anchor_cfg)[0]
                label = "clean" if cname == "clean" else f"{cname}-2"
                save_bev(out / f"bev-{name}-{label}-f{i}-s{seed}.png", clouds, truth, self.grid, boxes, scores,
                         title=f"{name}, {label}, test frame {i}, seed {seed}")

    def all_jobs(self) -> list[str]:
        """Every training job of the config, each teacher before its students (``run_dsrc(jobs=[])``)."""
        teachers = [t for t in ("teacher", "teacher_unpainted") if any(VARIANTS[v][2] == t for v in self.cfg.variants)]
        return teachers + list(self.cfg.variants)

    def train_only(self, jobs: list[str]) -> None:
        """Train the named jobs of every seed in the order given (``teacher``, ``teacher_unpainted`` or a variant; a
        variant also detects on the test conditions) and stop: several processes, each with its own jobs, can share
        one run directory; a last run without ``jobs`` evaluates. A variant's teacher must be finished first, by an
        earlier job of the list or another process. One process taking the jobs in turn is the fast way on one GPU:
        the training inputs stay collated between jobs, and processes side by side time-share the card (measured on
        an H100: six at once trained at 0.6x the rate of one). In one process a failed job (e.g. out of memory) does
        not stop the jobs after it, except its teacher's students; the failures are raised together at the end."""
        known = {"teacher", "teacher_unpainted", *self.cfg.variants}
        unknown = [j for j in jobs if j not in known]
        if unknown:
            raise ValueError(f"unknown jobs {unknown}; this config's jobs are {sorted(known)}")
        failed: dict[str, str] = {}
        for s, seed in enumerate(self.cfg.seeds):
            teachers: dict[str, CoopDetector] = {}
            for i, job in enumerate(jobs):
                self._keep_inputs_for(self._untrained(jobs, i, s))
                teacher = job if job in ("teacher", "teacher_unpainted") else VARIANTS[job][2]
                if teacher and f"{teacher}-s{seed}" in failed:
                    failed[f"{job}-s{seed}"] = f"its teacher {teacher}-s{seed} failed"
                    continue
                try:
                    if job == teacher:
                        if self._teacher_needed(seed, job, jobs):
                            teachers[job] = self.teacher(seed, painted=job == "teacher")
                    else:
                        self._train_and_detect(seed, job, teachers, train_teacher=False)
                except Exception as e:  # the later jobs still run (one process takes them all in turn)
                    if dist.world_size() > 1:
                        raise  # the other ranks would wait in a collective for this one
                    log.exception("%s-s%s failed; going on with the next job", job, seed)
                    failed[f"{job}-s{seed}"] = f"{type(e).__name__}: {e}"[:300]
                    teachers.pop(job, None)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                self._keep_inputs_for(self._untrained(jobs, i + 1, s))
        if failed:
            raise RuntimeError(f"{len(failed)} jobs failed (the others finished): "
                               + "; ".join(f"{j}: {why}" for j, why in failed.items()))

    def _input_kind(self, job: str) -> tuple[str, bool, bool]:
        """What a job trains on: its input mode (the key of ``_kept``), whether it needs the teacher's input, and
        whether the reconstruction targets."""
        if job in ("teacher", "teacher_unpainted"):
            return "intermediate", True, False
        inputs, _, teacher, recon = VARIANTS[job]
        return inputs, teacher is not None, recon

    def _untrained(self, jobs: list[str], i: int, s: int) -> list[str]:
        """The jobs of ``train_only`` still to train from the ``i``-th of seed number ``s`` on (every seed trains on
        the same frames, so a later seed's jobs count)."""
        seeds = self.cfg.seeds
        todo = [(j, seeds[s]) for j in jobs[i:]] + [(j, later) for later in seeds[s + 1:] for j in jobs]
        return [j for j, seed in todo if self.run.result(f"{j}-s{seed}") is None]

    def _keep_inputs_for(self, jobs: list[str]) -> None:
        """Keep of the collated training inputs what ``jobs`` (those still to come in this process) train on, and
        collate the teacher's input from now on if any of them needs it (so B0 before a teacher collates once)."""
        kinds = [self._input_kind(j) for j in jobs]
        self._teacher_input_later = any(mode == "intermediate" and teacher for mode, teacher, _ in kinds)
        for mode in list(self._kept):
            if mode not in {m for m, _, _ in kinds}:  # no later job trains on these inputs
                del self._kept[mode]
                continue
            for part in self._kept[mode].values():  # the parts no later job uses (~2 MB a frame)
                if not any(m == mode and t for m, t, _ in kinds):
                    part.teacher_clouds = part.object_cells = None
                if not any(m == mode and r for m, _, r in kinds):
                    part.occupied_cells = part.occupied_offsets = None

    def _teacher_needed(self, seed: int, teacher: str, jobs: list[str]) -> bool:
        """Whether a listed teacher must be trained or loaded here. Unfinished: unless every student of it in the
        config is already trained or detected (a later session of a run whose detections are kept needs no teacher
        for them). Finished: loaded only for a listed student still to train."""
        students = [v for v in self.cfg.variants if VARIANTS[v][2] == teacher]
        pending = [v for v in students
                   if self.run.result(f"{v}-s{seed}") is None and not self._detected(f"detect-{v}-s{seed}")]
        if self.run.result(f"{teacher}-s{seed}") is None:
            return bool(pending) or not students
        return any(v in jobs for v in pending)

    def _train_and_detect(self, seed: int, name: str, teachers: dict[str, CoopDetector], train_teacher: bool) -> None:
        """A variant trained (or loaded) and detected, unless its detections exist; its teacher is loaded into
        ``teachers`` only to train it, and trained here only with ``train_teacher`` (else another process does)."""
        job = f"detect-{name}-s{seed}"
        if self._detected(job):
            if dist.is_main() and not self._matches_path(job).exists():
                self._matches(job)  # detections from before the matches: a run's bank keeps only the matches
            return
        t = VARIANTS[name][2]
        if t and t not in teachers and self.run.result(f"{name}-s{seed}") is None:
            if not train_teacher and self.run.result(f"{t}-s{seed}") is None:
                raise RuntimeError(f"{name} distils from {t}-s{seed}, which is not finished in {self.run.path}: "
                                   f"train it first (--jobs {t})")
            teachers[t] = self.teacher(seed, painted=t == "teacher")
        model = self.variant(name, seed, teachers)  # every rank: training is data-parallel
        if dist.is_main():
            self.detect(seed, name, model)
        dist.barrier()

    def run_all(self) -> dict:
        out = {}
        self._keep_inputs_for(list(self.cfg.variants))
        for seed in self.cfg.seeds:
            if self.run.result(f"eval-s{seed}") is None:
                teachers: dict[str, CoopDetector] = {}
                for v in self.cfg.variants:
                    self._train_and_detect(seed, v, teachers, train_teacher=True)
                del teachers
            out[seed] = self.evaluate(seed) if dist.is_main() else None
            dist.barrier()
        return out


def run_dsrc(cfg: DSRCConfig, run_dir: Path, resume: bool = False, progress: bool = True, command: str = "",
             jobs: list[str] | None = None, evaluate_only: bool = False) -> Path | None:
    """Run (or resume) the recipe in ``run_dir`` and write ``report.md``; returns its path. With ``jobs``, train
    only those (see ``DSRCRecipe.train_only``; ``[]``: every job) and return None: no evaluation, no report. With ``evaluate_only``,
    train and detect nothing: the report of the models detected so far (partial, saying what is missing, until
    every model is detected)."""
    from .dsrc_report import write_report

    if jobs is not None and evaluate_only:
        raise ValueError("--jobs trains and --evaluate-only trains nothing: pass one of them")
    if evaluate_only and not (Path(run_dir) / "config.toml").exists():  # a new directory would be left behind empty
        raise FileNotFoundError(f"--evaluate-only evaluates a run's detected models, and {run_dir} holds no run: "
                                "give the run's directory with --run-dir")
    validate(cfg)
    dist.init()
    run = Run(run_dir, cfg, resume=resume, command=command)
    recipe = DSRCRecipe(cfg, run, progress)
    if jobs is not None:
        recipe.train_only(jobs or recipe.all_jobs())
        return None
    missing: dict[int, list[str]] = {}
    if evaluate_only:
        results, missing = recipe.evaluate_detected() if dist.is_main() else ({}, {})
    else:
        results = recipe.run_all()
    report = run.artifact("report.md")
    if dist.is_main():
        write_report(run, results, recipe, missing=missing)
    dist.barrier()
    return report
