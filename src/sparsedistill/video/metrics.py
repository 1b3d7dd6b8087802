"""Offline quality metrics for class-conditional video generators (Moving Fashion-MNIST).

- per-frame **class accuracy** of a Fashion-MNIST frame classifier trained on real clips (does the
  video show the prompted class?);
- **Frechet distance** between generated and reference frames, on that classifier's penultimate
  features and on ImageNet EfficientNet-Lite0's (``imagenet_features``): FID's statistic without
  Inception's weights (which cannot be fetched offline). Computed here from the features' moments
  (tr sqrt(S1 S2) as tr sqrt(A S1 A), A = S2^(1/2), a symmetric eigendecomposition) because the
  bootstrap resamples videos of already computed features, while torchmetrics' public
  ``FrechetInceptionDistance`` accumulates statistics of images passed through a feature module;
  the tests check that both give the same number;
- **motion**: mean absolute change between consecutive frames, and **label consistency**: the share
  of frames whose predicted class agrees with the video's majority (objects should not morph);
- **bootstrap** intervals over videos for every figure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FrameClassifier", "frames_of", "frame_features", "imagenet_features", "class_accuracy", "frechet_distance", "frechet_interval",
           "motion", "label_consistency", "bootstrap_interval"]


class FrameClassifier(nn.Module):
    """A small CNN on single frames (N, 1, H, W) in [-1, 1]; ``features`` gives its ``num_features``-d penultimate layer."""

    num_features = 128

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        def conv(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(conv(1, 32), conv(32, 64), conv(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(128, self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.body(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def frames_of(videos: Tensor) -> Tensor:
    """(B, C, F, H, W) -> (B * F, C, H, W)."""
    b, c, f, h, w = videos.shape
    return videos.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


@torch.no_grad()
def _predict(classifier: FrameClassifier, videos: Tensor, batch: int = 512) -> Tensor:
    classifier.eval()
    frames = frames_of(videos.clamp(-1, 1))
    preds = torch.cat([classifier(frames[i : i + batch].float()).argmax(-1) for i in range(0, len(frames), batch)])
    return preds.view(videos.shape[0], videos.shape[2])


def class_accuracy(classifier: FrameClassifier, videos: Tensor, labels: Tensor) -> Tensor:
    """Per video: the share of its frames classified as its label (B,)."""
    return (_predict(classifier, videos) == labels.view(-1, 1).to(videos.device)).float().mean(1)


def label_consistency(classifier: FrameClassifier, videos: Tensor) -> Tensor:
    """Per video: the share of frames predicted as the video's most frequent predicted class (B,)."""
    preds = _predict(classifier, videos)
    return (preds == preds.mode(1).values[:, None]).float().mean(1)


def motion(videos: Tensor) -> Tensor:
    """Per video: mean absolute change between consecutive frames, on the [-1, 1] scale (B,)."""
    return (videos[:, :, 1:] - videos[:, :, :-1]).abs().mean((1, 2, 3, 4))


@torch.no_grad()
def frame_features(classifier: FrameClassifier, videos: Tensor, batch: int = 512) -> Tensor:
    """(B, F, num_features) fp64 classifier features of every frame."""
    classifier.eval()
    frames = frames_of(videos.clamp(-1, 1))
    feats = torch.cat([classifier.features(frames[i : i + batch].float()) for i in range(0, len(frames), batch)])
    return feats.double().view(videos.shape[0], videos.shape[2], -1)


@torch.no_grad()
def imagenet_features(model: nn.Module, videos: Tensor, size: int = 224, batch: int = 128) -> Tensor:
    """(B, F, 1280) fp64 EfficientNet-Lite0 features of every frame (grey frames as RGB, resized to ``size``)."""
    model.eval()
    frames = frames_of(videos.clamp(-1, 1)).float()
    out = []
    for i in range(0, len(frames), batch):
        x = F.interpolate(frames[i : i + batch], size=size, mode="bilinear", align_corners=False)
        out.append(model.features(x.expand(-1, 3, -1, -1)))
    return torch.cat(out).double().view(videos.shape[0], videos.shape[2], -1)


def _moments(features: Tensor) -> tuple[Tensor, Tensor]:
    f = features.reshape(-1, features.shape[-1]).double()
    return f.mean(0), torch.cov(f.T)


def _sqrt_psd(s: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _frechet(mu1: Tensor, s1: Tensor, mu2: Tensor, s2: Tensor, root2: Tensor) -> float:
    cross = torch.linalg.eigvalsh(root2 @ s1 @ root2).clamp(min=0).sqrt().sum()
    return max(float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross), 0.0)  # >= 0 up to rounding


@torch.no_grad()
def frechet_distance(generated: Tensor, reference: Tensor) -> float:
    """Frechet distance between the per-frame features (B, F, d) of two video sets (FID's statistic)."""
    mu2, s2 = _moments(reference)
    return _frechet(*_moments(generated), mu2, s2, _sqrt_psd(s2))


@torch.no_grad()
def frechet_interval(generated: Tensor, reference: Tensor, rounds: int = 100, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float]:
    """Bias-corrected bootstrap interval of the Frechet distance, resampling generated videos (reference fixed).

    Resampling with replacement inflates the distance (duplicated videos shrink the covariance), so
    the percentile interval of the resampled distances can lie wholly above the full-sample value;
    it is shifted down by the bootstrap's bias (mean of the resamples - full-sample value).
    """
    g = torch.Generator().manual_seed(seed)
    mu2, s2 = _moments(reference)
    root2 = _sqrt_psd(s2)
    full = _frechet(*_moments(generated), mu2, s2, root2)
    vals = torch.tensor([_frechet(*_moments(generated[torch.randint(len(generated), (len(generated),), generator=g)]),
                                  mu2, s2, root2) for _ in range(rounds)], dtype=torch.float64)
    lo, hi = torch.quantile(vals, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    bias = float(vals.mean()) - full
    return max(lo - bias, 0.0), max(hi - bias, 0.0)


def bootstrap_interval(values: Tensor, rounds: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` (one per video) over ``rounds`` resamples."""
    g = torch.Generator().manual_seed(seed)
    v = values.detach().float().cpu()
    idx = torch.randint(len(v), (rounds, len(v)), generator=g)
    means = v[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2])).tolist()
    return lo, hi
