"""Class-conditional Moving Fashion-MNIST: real Fashion-MNIST items moving and bouncing on a canvas.

Each clip shows ``items`` pictures of one class (the clip's label, the generator's prompt), each
moving in a straight line at 1-3 pixels a frame and bouncing off the canvas edges, composed by
maximum. Clip ``i`` of a given ``seed`` is always the same clip, whatever batch it comes in and
on whatever device it is drawn (its random numbers come from a CPU generator seeded by
``(seed, i)``), so training batches are reproducible and resumable and evaluation references are
fixed. Training clips use the train split's pictures, evaluation references the test split's.
Rendering is a scatter on the clips' device: a GPU draws thousands of clips a second, so the
dataset is generated on the fly and never stored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fashion_mnist import load_fashion_mnist_split

__all__ = ["MovingFashionMNIST"]

_ITEM = 28  # Fashion-MNIST pictures are 28 x 28


class MovingFashionMNIST:
    """Clips (B, 1, frames, size, size) in [-1, 1] and their class labels, drawn by index."""

    def __init__(self, images: Tensor, labels: Tensor, frames: int = 16, size: int = 64, items: int = 2,
                 num_classes: int = 10, device: torch.device | str = "cpu") -> None:
        if size < _ITEM:
            raise ValueError(f"the canvas must hold a {_ITEM} x {_ITEM} picture, got size {size}")
        if frames < 1 or items < 1:
            raise ValueError(f"need at least one frame and one item, got frames={frames}, items={items}")
        self.frames, self.size, self.items, self.num_classes = frames, size, items, num_classes
        self.device = torch.device(device)
        self.images = images.reshape(-1, _ITEM, _ITEM).to(self.device, torch.float32)
        self.by_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
        if any(len(rows) == 0 for rows in self.by_class):
            raise ValueError("every class needs at least one picture")

    @classmethod
    def from_split(cls, split: str = "train", **kw) -> "MovingFashionMNIST":
        """Pictures of Fashion-MNIST's ``train`` or ``test`` split (found offline as ``load_fashion_mnist`` finds them)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return cls(*load_fashion_mnist_split(split), **kw)

    def _params(self, index: int, seed: int, label: int | None = None) -> tuple[int, Tensor, Tensor, Tensor]:
        """Class, picture rows, start positions and velocities of clip ``index``: from a CPU generator, so every device agrees."""
        g = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + index) % 2**63)  # no (seed, index) collisions in practice
        drawn = int(torch.randint(self.num_classes, (1,), generator=g))
        label = drawn if label is None else label
        pool = self.by_class[label]
        rows = pool[torch.randint(len(pool), (self.items,), generator=g)]
        room = self.size - _ITEM
        start = torch.rand(self.items, 2, generator=g) * room
        angle = torch.rand(self.items, generator=g) * 2 * torch.pi
        speed = 1 + 2 * torch.rand(self.items, generator=g)
        velocity = torch.stack([angle.cos(), angle.sin()], -1) * speed[:, None]
        return label, rows, start, velocity

    def clips(self, indices: Tensor | list[int] | range, seed: int = 0, labels: Tensor | list[int] | None = None) -> tuple[Tensor, Tensor]:
        """Videos (B, 1, frames, size, size) in [-1, 1] and labels (B,) for clip ``indices`` of ``seed``.

        ``labels`` fixes each clip's class (e.g. balanced evaluation sets); by default it is drawn.
        """
        indices = torch.as_tensor(list(indices) if isinstance(indices, range) else indices).flatten().tolist()
        if labels is not None:
            labels = torch.as_tensor(labels).flatten().tolist()
            if len(labels) != len(indices) or not all(0 <= c < self.num_classes for c in labels):
                raise ValueError(f"need one class in 0..{self.num_classes - 1} per clip, got {labels} for {len(indices)} clips")
        params = [self._params(int(i), seed, None if labels is None else labels[j]) for j, i in enumerate(indices)]
        b, f, s, n = len(params), self.frames, self.size, self.items
        labels = torch.tensor([p[0] for p in params])
        rows = torch.stack([p[1] for p in params]).to(self.device)  # (B, items)
        start = torch.stack([p[2] for p in params]).to(self.device)  # (B, items, 2) as (row, column)
        velocity = torch.stack([p[3] for p in params]).to(self.device)
        room = float(s - _ITEM)
        t = torch.arange(f, device=self.device, dtype=torch.float32)
        raw = start[:, :, None] + velocity[:, :, None] * t[None, None, :, None]  # (B, items, F, 2)
        period = raw.remainder(2 * room)
        pos = (room - (room - period).abs()).round().long() if room > 0 else torch.zeros_like(raw, dtype=torch.long)
        offs = torch.arange(_ITEM, device=self.device)
        ys = pos[..., 0, None, None] + offs[:, None]  # (B, items, F, 28, 1)
        xs = pos[..., 1, None, None] + offs[None, :]  # (B, items, F, 1, 28)
        flat = (ys * s + xs).permute(0, 2, 1, 3, 4).reshape(b * f, -1)  # (B*F, items*28*28) canvas positions
        pictures = self.images[rows]  # (B, items, 28, 28)
        values = pictures[:, None].expand(b, f, n, _ITEM, _ITEM).reshape(b * f, -1)
        canvas = torch.zeros(b * f, s * s, device=self.device)
        canvas.scatter_reduce_(1, flat, values, reduce="amax")
        return canvas.view(b, 1, f, s, s) * 2 - 1, labels.to(self.device)
