"""LoRA adapters (weights/lora.py) and the video students trained through them."""

import pytest
import torch

from sparsedistill.weights.lora import LoRALinear, add_lora, merge_lora


def test_lora_starts_as_the_base_trains_only_adapters_and_merges_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("qkv", torch.nn.Linear(16, 48))
    model.add_module("act", torch.nn.GELU())
    model.add_module("fc", torch.nn.Linear(48, 8))
    x = torch.randn(5, 16)
    before = model(x)
    assert add_lora(model, rank=4, targets=["qkv"]) == ["qkv"]
    assert isinstance(model.qkv, LoRALinear) and torch.equal(model(x), before)  # B = 0: the original function
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"qkv.lora_a", "qkv.lora_b"}
    with torch.no_grad():
        model.qkv.lora_b.normal_()
    adapted = model(x)
    assert not torch.allclose(adapted, before)
    merge_lora(model)
    assert type(model.qkv) is torch.nn.Linear and torch.allclose(model(x), adapted, atol=1e-5)
    with pytest.raises(ValueError, match="rank 20"):
        LoRALinear(torch.nn.Linear(16, 8), rank=20)
    with pytest.raises(ValueError, match="no Linear layer"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), rank=2, targets=["qkv"])


def test_video_student_with_lora_changes_only_the_adapted_layers(tmp_path):
    """A TDM student trained through LoRA: the teacher's weights everywhere but the adapted qkv / proj, merged into
    the teacher's architecture (its export loads into a plain model)."""
    from test_video import _tiny_recipe_config

    from sparsedistill.models import create_model
    from sparsedistill.models.safetensors_io import load_weights
    from sparsedistill.recipes.video_blade import VideoBlade
    from sparsedistill.runs import Run

    cfg = _tiny_recipe_config(**{"students.lora_rank": 4, "students.tdm.iterations": 3})
    torch.manual_seed(0)
    teacher = create_model(cfg.model.name)
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.05)
    recipe = VideoBlade(cfg, Run(tmp_path / "run", cfg), progress=False)
    student = recipe.student(0, "tdm", 2, teacher.eval())
    changed = {n for (n, a), b in zip(student.state_dict().items(), teacher.state_dict().values()) if not torch.equal(a, b)}
    assert changed and all(n.endswith(("qkv.weight", "proj.weight")) for n in changed), changed
    exported = load_weights(create_model(cfg.model.name), tmp_path / "run" / "exports" / "tdm-k2-s0.safetensors")
    assert all(torch.allclose(a.float(), b.to(torch.bfloat16).float()) for a, b in
               zip(exported.state_dict().values(), student.state_dict().values()))
    with pytest.raises(ValueError, match="lora_rank"):
        from sparsedistill.recipes.video_blade import validate

        validate(_tiny_recipe_config(**{"students.lora_rank": -1}))
