import pytest
import torch
from torch import nn

from sparsedistill.models import create_model
from sparsedistill.weights import NMSparsifier, QuantLinear, calibrate, nm_mask, swap_linears
from sparsedistill.weights.export import deployed_bytes, load_sparse24, pack_24, save_sparse24, to_sparse24, unpack_24
from sparsedistill.weights.sparse24 import Sparse24Linear

PRUNED = ("qkv", "proj", "fc1", "fc2")


def include(name, _mod):
    return name.rsplit(".", 1)[-1] in PRUNED


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8, torch.float8_e4m3fn])
def test_pack_unpack_round_trips_including_groups_with_fewer_than_two_nonzeros(dtype):
    w = torch.randn(32, 64) * 20
    w = w * nm_mask(w)
    w[0, :8] = 0  # empty groups
    w[1, 1] = 0  # a group with one nonzero
    w = w.to(dtype) if dtype != torch.int8 else w.round().clamp(-127, 127).to(dtype)
    values, index = pack_24(w)
    assert values.shape == (32, 32) and index.shape == (32, 8) and index.dtype == torch.uint8
    assert torch.equal(unpack_24(values, index).float(), w.float())  # -0.0 comes back as 0.0


def test_pack_refuses_dense_weights():
    with pytest.raises(ValueError, match="not 2:4"):
        pack_24(torch.randn(16, 64))


def _student(fmt):
    torch.manual_seed(0)
    model = create_model("vit_fmnist_micro").eval()
    NMSparsifier(2, 4, include=include).step_to(model, 1.0)
    x = torch.rand(8, 1, 28, 28)
    if fmt != "fp16":
        masks = {n: m.weight != 0 for n, m in model.named_modules() if isinstance(m, nn.Linear) and include(n, m)}
        swap_linears(model, lambda n, lin: QuantLinear.from_linear(lin, fmt, mask=masks[n]) if n in masks else None)
        calibrate(model, [x])
    return model, x


@pytest.mark.parametrize("fmt", ["fp16", "int8", "fp8"])
def test_export_round_trip_computes_what_was_saved_and_the_file_is_the_deployed_size(tmp_path, fmt):
    model, x = _student(fmt)
    with torch.no_grad():
        trained = model(x)
    to_sparse24(model, fmt, include)
    path = tmp_path / "m.safetensors"
    written = save_sparse24(model, path, "vit_fmnist_micro", {"num_classes": 10})
    loaded = load_sparse24(path)
    assert sum(isinstance(m, Sparse24Linear) for m in loaded.modules()) == 16
    with torch.no_grad():
        out = loaded(x)
    # the rest of the model is stored in fp16, the only difference from the in-memory model
    assert (out - trained).norm() / trained.norm() < 0.02
    size = deployed_bytes(model)
    assert written == path.stat().st_size and 0 < written - size["total"] < 16_384  # the JSON header
    dense = sum(p.numel() for p in create_model("vit_fmnist_micro").parameters())
    assert size["total"] < (0.6 if fmt == "fp16" else 0.35) * 2 * dense  # vs dense fp16


def test_export_refuses_dense_layers_and_keeps_odd_sizes_dense_with_a_warning():
    model = create_model("vit_fmnist_micro")
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        to_sparse24(model, "fp16", include)
    odd = nn.Sequential(nn.Linear(64, 40))
    odd[0].weight.data *= nm_mask(odd[0].weight)
    with pytest.warns(UserWarning, match="stays dense"):
        with pytest.raises(ValueError, match="no layer was converted"):
            to_sparse24(odd, "fp16", lambda n, m: True)


def test_load_gives_clear_errors_for_foreign_or_broken_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError):
        load_sparse24(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a sparsedistill 2:4 export"):
        load_sparse24(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_sparse24(tmp_path / "junk.safetensors")
    model, _ = _student("fp16")
    to_sparse24(model, "fp16", include)
    save_sparse24(model, tmp_path / "m.safetensors", "vit_fmnist_tiny")  # the wrong architecture
    with pytest.raises(ValueError, match="vit_fmnist_tiny"):
        load_sparse24(tmp_path / "m.safetensors")


def test_half_moves_the_dense_layers_only():
    model, _ = _student("int8")
    to_sparse24(model, "int8", include)
    model.half()
    sp = model.blocks[0].attn.qkv
    assert sp.weight_q.dtype == torch.int8 and sp.weight_scale.dtype == torch.float32
    assert model.head.weight.dtype == torch.float16
