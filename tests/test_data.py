import pytest
import torch

from sparsedistill.data import DatasetNotFound, load_fashion_mnist
from sparsedistill.models import create_model, list_models


def test_real_fashion_mnist_loads_offline():
    data = load_fashion_mnist(download=False)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0
    assert torch.equal(torch.bincount(data.test_y), torch.full((10,), 1000))
    assert data.classes[9] == "Ankle boot"


def test_subsets_are_class_balanced_and_deterministic():
    a = load_fashion_mnist(train_subset=1000, test_subset=500, download=False)
    b = load_fashion_mnist(train_subset=1000, test_subset=500, download=False)
    assert len(a.train_y) == 1000 and torch.equal(torch.bincount(a.train_y), torch.full((10,), 100))
    assert len(a.test_y) == 500 and torch.equal(a.train_x, b.train_x)


def test_one_split_loads_from_a_folder_holding_only_its_files(tmp_path, monkeypatch):
    import shutil

    from sparsedistill.data import load_fashion_mnist_split
    from sparsedistill.data.fashion_mnist import FILES

    full = load_fashion_mnist(download=False)
    for name in (FILES["test_images"], FILES["test_labels"]):  # an evaluation machine's copy: no training set
        shutil.copy(full.source / name, tmp_path / name)
    monkeypatch.setenv("SPARSEDISTILL_FASHION_MNIST", str(tmp_path))
    x, y = load_fashion_mnist_split("test", download=False)
    assert torch.equal(x, full.test_x) and torch.equal(y, full.test_y)
    with pytest.raises(DatasetNotFound, match="train-images"):
        load_fashion_mnist_split("train", download=False)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist_split("val")


def test_missing_dataset_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEDISTILL_FASHION_MNIST", str(tmp_path))
    with pytest.raises(DatasetNotFound, match="missing"):
        load_fashion_mnist(download=False)
    monkeypatch.delenv("SPARSEDISTILL_FASHION_MNIST")
    monkeypatch.setattr("sparsedistill.data.fashion_mnist.DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setenv("SPARSEDISTILL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(download=False)


def test_model_registry():
    assert "mlp" in list_models()
    model = create_model("mlp", hidden=[32], num_classes=10)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match="784 input features"):
        model(torch.randn(3, 100))
    with pytest.raises(ValueError, match="unknown model 'vit_huge'"):
        create_model("vit_huge")
