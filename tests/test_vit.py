import pytest
import torch

from sparsedistill.models import create_model
from sparsedistill.models.vit import ViTConfig, VisionTransformer, load_timm_state_dict


def _tiny(**kw):
    return create_model("vit_fmnist_tiny", depth=2, **kw).eval()


def test_forward_shapes_and_attention_maps():
    model = _tiny()
    x = torch.randn(3, 1, 28, 28)
    out = model.forward_distill(x)
    assert out.logits.shape == (3, 10) and out.tokens.shape == (3, 50, 192)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 3, 50, 50)
    assert torch.allclose(out.attentions[1].sum(-1), torch.ones(3, 3, 50), atol=1e-5)
    # the SDPA path and the explicit-softmax path compute the same function
    assert torch.allclose(model(x), out.logits, atol=1e-5)


def test_patch_embedding_as_one_gemm_equals_the_convolution():
    """The default patch projection (a reshape, then one GEMM with the Conv2d's weight) gives the convolution's tokens."""
    torch.manual_seed(0)
    for cfg in (ViTConfig(img_size=32, patch_size=16, embed_dim=48, num_heads=4, depth=1),
                ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=32, num_heads=4, depth=1)):
        embed = VisionTransformer(cfg).double().patch_embed
        x = torch.randn(3, cfg.in_chans, cfg.img_size, cfg.img_size, dtype=torch.float64)
        assert embed.as_gemm
        tokens = embed(x)
        embed.as_gemm = False
        torch.testing.assert_close(tokens, embed(x), rtol=0, atol=1e-12)
        assert tokens.shape == (3, cfg.num_patches, cfg.embed_dim)


def test_state_dict_uses_timm_key_names():
    model = VisionTransformer(ViTConfig(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2))
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias", "head.weight", "head.bias", *(f"blocks.0.{k}" for k in block)}
    assert set(model.state_dict()) == expected
    avg = VisionTransformer(ViTConfig(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, global_pool="avg"))
    assert "fc_norm.weight" in avg.state_dict() and "norm.weight" not in avg.state_dict()


def test_loading_resamples_position_embeddings_and_skips_a_foreign_head():
    src = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=1000))
    dst = VisionTransformer(ViTConfig(img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10))
    with pytest.warns(UserWarning, match="1000 classes"):
        notes = load_timm_state_dict(dst, src.state_dict())
    assert any("pos_embed" in n for n in notes)
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    same = VisionTransformer(src.cfg)
    load_timm_state_dict(same, src.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(same.eval()(x), src.eval()(x))


def test_bad_checkpoint_and_bad_input_are_clear_errors():
    model = _tiny()
    deeper = create_model("vit_fmnist_tiny", depth=3)
    with pytest.raises(ValueError, match="missing .*unexpected .*blocks.2"):
        load_timm_state_dict(model, deeper.state_dict())
    wider = create_model("vit_fmnist_tiny", depth=2, embed_dim=96)
    with pytest.raises(ValueError, match="shapes do not match"):
        load_timm_state_dict(model, wider.state_dict())
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="not divisible"):
        ViTConfig(embed_dim=100, num_heads=3)


def test_matches_transformers_vit_on_the_same_weights():
    """CI's independent reference (timm needs torchvision, whose offline wheels here are CUDA builds that cannot load
    beside the CPU torch): Hugging Face's ViT, fed our timm-named weights through the public key mapping."""
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    ours = create_model("vit_base_patch16_224", img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3,
                        num_classes=7).eval()
    with torch.no_grad():  # no zero-initialised parts: every weight must land in the right place
        for p in ours.parameters():
            p.normal_(0, 0.2)
    hf = ViTForImageClassification(HFConfig(image_size=32, patch_size=8, hidden_size=96, num_hidden_layers=2,
                                            num_attention_heads=3, intermediate_size=384, num_labels=7,
                                            layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)).eval()
    # transformers' names for one block's parts: 5.x (first) or 4.x (second)
    names = {"q": ("attention.q_proj", "attention.attention.query"), "k": ("attention.k_proj", "attention.attention.key"),
             "v": ("attention.v_proj", "attention.attention.value"), "proj": ("attention.o_proj", "attention.output.dense"),
             "norm1": ("layernorm_before",) * 2, "norm2": ("layernorm_after",) * 2,
             "mlp.fc1": ("mlp.fc1", "intermediate.dense"), "mlp.fc2": ("mlp.fc2", "output.dense")}
    new = "vit.layers.0.attention.q_proj.weight" in hf.state_dict()
    layer = "vit.layers." if new else "vit.encoder.layer."
    sd, mapped = ours.state_dict(), {}
    mapped["vit.embeddings.cls_token"] = sd["cls_token"]
    mapped["vit.embeddings.position_embeddings"] = sd["pos_embed"]
    for kind in ("weight", "bias"):
        mapped[f"vit.embeddings.patch_embeddings.projection.{kind}"] = sd[f"patch_embed.proj.{kind}"]
        mapped[f"vit.layernorm.{kind}"] = sd[f"norm.{kind}"]
        mapped[f"classifier.{kind}"] = sd[f"head.{kind}"]
        for i in range(2):
            part = dict(zip("qkv", sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)))
            part |= {"proj": sd[f"blocks.{i}.attn.proj.{kind}"], "norm1": sd[f"blocks.{i}.norm1.{kind}"],
                     "norm2": sd[f"blocks.{i}.norm2.{kind}"], "mlp.fc1": sd[f"blocks.{i}.mlp.fc1.{kind}"],
                     "mlp.fc2": sd[f"blocks.{i}.mlp.fc2.{kind}"]}
            for ours_name, tensor in part.items():
                mapped[f"{layer}{i}.{names[ours_name][0 if new else 1]}.{kind}"] = tensor
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected and all("pooler" in m for m in missing)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(pixel_values=x).logits, atol=1e-4, rtol=1e-4)


def test_matches_timm_on_the_same_weights():
    timm = pytest.importorskip("timm")  # installed on the GPU machine, not on the CPU CI
    ref = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    ours = create_model("vit_base_patch16_224").eval()
    load_timm_state_dict(ours, ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-4, rtol=1e-4)
