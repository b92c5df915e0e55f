"""The onnx and onnx-int8 embedding backends: exported once, cached by model content, own model ids."""

from __future__ import annotations

import numpy as np
import pytest

from stream_sentinel.embedding.embedder import Embedder, resolve_backend, resolve_precision


def _neighbours(vecs: np.ndarray, k: int = 5) -> list[set[int]]:
    sims = vecs @ vecs.T
    return [set(np.argsort(-sims[i])[1:k + 1]) for i in range(len(vecs))]


def test_backend_settings_are_checked():
    with pytest.raises(ValueError, match="torch, onnx, onnx-int8"):
        resolve_backend("tensorrt")
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("onnx", "cuda")
    with pytest.raises(ValueError, match="not bf16"):
        resolve_precision("bf16", "cpu", "onnx")
    assert resolve_precision("auto", "cpu", "onnx-int8") == "fp32"


def test_onnx_backends_export_once_and_keep_the_neighbours(tmp_path, demo_records):
    texts = [r["text"] for r in demo_records[300:360]] + ["short text", "cheap pills now"]
    reference = Embedder.load(precision="fp32", backend="torch").embed(texts)

    onnx = Embedder.load(backend="onnx", models_root=tmp_path)
    assert onnx.model_id == Embedder.load(precision="fp32").model_id + "+onnx"
    got = onnx.embed(texts)
    assert got.shape == reference.shape and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.sum(got * reference, axis=1).min() > 0.999  # the same fp32 network, other kernels

    (folder,) = tmp_path.iterdir()  # one folder per model content: <name>-<hash>
    assert folder.name == "all-MiniLM-L6-v2-" + onnx.model_id.split("@sha256:")[1].split("+")[0]
    exported = folder / "model.onnx"
    first_mtime = exported.stat().st_mtime_ns
    assert not list(folder.glob("*.tmp*"))  # published by rename, no leftovers

    int8 = Embedder.load(backend="onnx-int8", models_root=tmp_path, batch_size=8)
    assert int8.model_id.endswith("+onnx-int8")
    got8 = int8.embed(texts)
    assert exported.stat().st_mtime_ns == first_mtime  # reused the fp32 export
    assert len(list(folder.glob("model.int8-*.onnx"))) == 1
    assert np.sum(got8 * reference, axis=1).min() > 0.9
    overlap = np.mean([len(a & b) / 5 for a, b in zip(_neighbours(reference), _neighbours(got8))])
    assert overlap >= 0.7, overlap

    again = Embedder.load(backend="onnx", models_root=tmp_path, batch_size=4)  # a new process would do this
    assert np.allclose(again.embed(texts[:5]), got[:5], atol=1e-5)
    assert exported.stat().st_mtime_ns == first_mtime


def test_cli_exports_ahead_of_the_first_run(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "STREAM_SENTINEL_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "stream_sentinel.cli", "embed-export", "--backend", "onnx", "--json"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["model_id"].endswith("+onnx") and info["bytes"] > 1_000_000
    assert info["file"].startswith(str(tmp_path / "models" / "embedding"))
    # the embedder of a later run finds it there and does not export again
    mtime = os.stat(info["file"]).st_mtime_ns
    Embedder.load(backend="onnx", models_root=tmp_path / "models" / "embedding").embed(["hello"])
    assert os.stat(info["file"]).st_mtime_ns == mtime
