"""A plain MLP classifier: the dense teacher and sparse students of the distillation-core experiment."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model

__all__ = ["MLPClassifier", "mlp"]


class MLPClassifier(nn.Module):
    """Flatten -> [Linear -> GELU -> Dropout] * len(hidden) -> Linear head."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (512, 512), num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        dims = [in_features, *hidden]
        self.body = nn.Sequential()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            self.body.add_module(f"fc{i}", nn.Linear(a, b))
            self.body.add_module(f"act{i}", nn.GELU())
            if dropout:
                self.body.add_module(f"drop{i}", nn.Dropout(dropout))
        self.head = nn.Linear(dims[-1], num_classes)
        self.in_features = in_features

    def features(self, x: Tensor) -> Tensor:
        if x[0].numel() != self.in_features:
            raise ValueError(f"MLPClassifier expects {self.in_features} input features per sample, got shape {tuple(x.shape)}")
        return self.body(x.flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@register_model
def mlp(in_features: int = 784, hidden: tuple[int, ...] | list[int] = (512, 512), num_classes: int = 10, dropout: float = 0.0) -> MLPClassifier:
    return MLPClassifier(in_features, tuple(hidden), num_classes, dropout)
