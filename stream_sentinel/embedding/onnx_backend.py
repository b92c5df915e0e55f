"""The embedding model as an ONNX graph run by onnxruntime: ``onnx`` (fp32) and ``onnx-int8``.

Why offer it when torch bf16 is the default: on this project's CI machine (AMX, bf16) ONNX
is slower than torch (bench/embedding_backends.py), but on CPUs without bf16 units an
onnxruntime graph is often the faster fp32 path, and dynamic int8 the fastest of all where
its recall is good enough for the user's data. The bench measures each backend's
texts/s and recall@10 against torch fp32 on the machine at hand; pick from its output.

The export runs once per model content and backend, never at import, and is cached under
``$STREAM_SENTINEL_HOME/models/embedding/<model name>-<content hash>/`` (``Paths.embedding_models``). It is written to a temporary
name, fsynced and renamed, under a file lock, so two processes never export twice or read
a half-written file. The graph holds the whole sentence-transformers pipeline (transformer,
pooling, normalization), so any local sentence-transformers folder exports the same way.

int8 is dynamic quantization of the MatMuls, with per-channel weights. The variant follows
the CPU: full-range u8s8 on VNNI CPUs; elsewhere ``reduce_range`` (7-bit weights), which
avoids the int16 saturation of AVX2's u8s8 multiply-add.

Needs the ``onnx`` extra: ``pip install -c constraints.txt -e '.[onnx]'``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import fsync_path
from .cpu import cpu_flags

log = logging.getLogger(__name__)

OPSET = 17


def int8_variant() -> str:
    flags = cpu_flags()
    return "avx512_vnni" if ("avx512_vnni" in flags or "avx_vnni" in flags) else "avx2"


def _require_onnx():
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import quantize_dynamic  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "the onnx embedding backends need onnx and onnxruntime: "
            "pip install -c constraints.txt -e '.[onnx]' (or set STREAM_SENTINEL_EMBED_BACKEND=torch)") from exc


def cache_dir(models_root: Path, files_id: str) -> Path:
    """``<models_root>/<name>-<16 hex>``: one folder per model content."""
    name, digest = files_id.split("@sha256:")
    return Path(models_root) / f"{name}-{digest}"


def exported(model_path: Path, files_id: str, backend: str, models_root: Path) -> Path:
    """The ONNX file for ``backend``, exported (and quantized) on first use and cached."""
    if backend not in ("onnx", "onnx-int8"):
        raise ValueError(f"{backend!r} is not an onnx backend")
    _require_onnx()
    folder = cache_dir(models_root, files_id)
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "model.onnx"
    int8 = folder / f"model.int8-{int8_variant()}.onnx"
    want = fp32 if backend == "onnx" else int8
    if want.exists():
        return want
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be exporting the same model
        if not fp32.exists():
            _export(model_path, fp32)
        if backend == "onnx-int8" and not int8.exists():
            _quantize(fp32, int8)
        (folder / "source.json").write_text(json.dumps({"model": str(model_path), "model_files_id": files_id,
                                                        "opset": OPSET}, indent=2))
    return want


def _publish(tmp: Path, dest: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dest)
    fsync_path(dest.parent)


def _export(model_path: Path, dest: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    log.info("exporting %s to ONNX (once per model)", model_path)
    st = SentenceTransformer(str(model_path), device="cpu", local_files_only=True).eval()

    class Pipeline(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model({"input_ids": input_ids, "attention_mask": attention_mask,
                               "token_type_ids": token_type_ids})["sentence_embedding"]

    enc = st.tokenizer(["an example", "another, longer example text"], padding=True, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"], torch.zeros_like(enc["input_ids"]))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    with torch.inference_mode(), warnings.catch_warnings():
        # the tracer notes Python branches it fixes (mask shape checks, is_causal=False): right
        # for an encoder fed full masks, and the tests compare the graph with torch
        warnings.simplefilter("ignore")
        torch.onnx.export(Pipeline(st), args, str(tmp), input_names=names, output_names=["embedding"],
                          opset_version=OPSET, dynamo=False,
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, "embedding": {0: "batch"}})
    _publish(tmp, dest)


def _quantize(fp32: Path, dest: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}.onnx")
    quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=int8_variant() != "avx512_vnni", op_types_to_quantize=["MatMul"])
    _publish(tmp, dest)


def _max_seq_length(model_path: Path, tokenizer) -> int:
    cfg = model_path / "sentence_bert_config.json"
    if cfg.exists():
        value = json.loads(cfg.read_text()).get("max_seq_length")
        if value:
            return int(value)
    return int(min(tokenizer.model_max_length, 512))


class OnnxEncoder:
    """Token-length batches (as ``encoder.Encoder``) through an onnxruntime session."""

    compiled = False
    compile_error = "the onnx backends are not compiled by torch"

    def __init__(self, onnx_file: Path, model_path: Path, batch_size: int, threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        # no busy-waiting between calls: the process shares its cores (daemon, server, other runs)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self._max_len = _max_seq_length(model_path, self.tokenizer)
        self._dim = int(self._session.get_outputs()[0].shape[-1])
        self.batch_size = batch_size
        self.onnx_file = onnx_file

    def warm(self) -> bool:
        return False

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        from .encoder import encode_in_batches, model_inputs

        pad_id = self.tokenizer.pad_token_id or 0

        def infer(ids: list[list[int]]) -> np.ndarray:
            feed = dict(zip(("input_ids", "attention_mask", "token_type_ids"), model_inputs(ids, pad_id)))
            return self._session.run(None, {k: v for k, v in feed.items() if k in self._inputs})[0]

        return encode_in_batches(self.tokenizer, self._max_len, self.batch_size, texts, self._dim, infer)
