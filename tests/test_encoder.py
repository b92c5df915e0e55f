"""Token-length batches, the shortcut tokenizer, and the compiled path against the eager one."""

from __future__ import annotations

import os

import hypothesis.strategies as hyp
import numpy as np
import pytest
from hypothesis import given, settings

from stream_sentinel.embedding.encoder import Encoder, tokenize_truncated


@pytest.fixture(scope="module")
def st_model(embedder):
    return embedder._model()


def test_shortcut_tokenizing_equals_the_tokenizers_truncation(st_model, demo_records):
    tok = st_model.tokenizer
    edge = ["", "word", "x" * 50_000, ("a " * 3000), ("\n" * 5000) + "text after a long blank run",
            "long " + "supercalifragilistic" * 400 + " tail", ("token " * 255).strip(), ("token " * 300).strip(),
            "é" * 4000, "a" + " " * 4000 + "b"]
    texts = [r["text"] for r in demo_records] + edge
    for max_len in (256, 64):
        got = tokenize_truncated(tok, texts, max_len)
        want = tok(texts, truncation=True, max_length=max_len)["input_ids"]
        bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        assert not bad, f"max_len {max_len}: {len(bad)} texts differ, first {texts[bad[0]][:80]!r}"


def test_token_length_batches_give_the_sentence_transformers_vectors(st_model, demo_records):
    texts = [r["text"] for r in demo_records[:40]] + ["short", "a slightly longer sentence about spam"]
    ours = Encoder(st_model, batch_size=16).encode(texts)
    theirs = st_model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    cos = np.sum(ours * theirs, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() > 0.999, cos.min()  # only padding differs; bf16 rounding at most


def test_one_text_runs_the_batch_graph_when_its_own_cannot_be_built(st_model):
    from stream_sentinel.embedding.packed import one_text

    enc = Encoder(st_model, batch_size=16)

    def broken(*tensors):
        raise RuntimeError("the C++ wrapper did not build")

    batches = []

    def batch_graph(ids):
        batches.append([len(x) for x in ids])
        return np.zeros((len(ids), 384), dtype=np.float32)

    assert enc._compile_one(broken, lambda ids: one_text(ids[0]), batch_graph) is batch_graph
    assert batches == [[len(enc._warm_ids()[0])]]  # run once at warm-up, as the one-text graph would have been


def test_compiled_model_serves_every_shape_like_eager_and_a_missing_compiler_keeps_eager(demo_records, monkeypatch,
                                                                                          embedder):
    import torch
    from sentence_transformers import SentenceTransformer
    from torch._dynamo.utils import counters

    from stream_sentinel.embedding import encoder

    real_fill = encoder.fill
    kwargs = {"dtype": torch.bfloat16} if embedder.precision == "bf16" else {}
    st = SentenceTransformer(str(embedder.path), device="cpu", local_files_only=True, model_kwargs=kwargs)
    st.max_seq_length = 64
    texts = [r["text"] for r in demo_records[100:150]] + ["one", "two words"]

    with monkeypatch.context() as m:  # a machine without a C++ compiler: told why, still embeds
        m.setenv("PATH", "/nonexistent")
        no_cc = Encoder(st, batch_size=16)
        assert no_cc.warm() is False and "C++ compiler" in no_cc.compile_error
        assert not no_cc.compiled
        eager = no_cc.encode(texts)

    enc = Encoder(st, batch_size=16)
    assert enc.warm() is True and enc.compiled and enc.compile_error is None
    assert enc.packed  # a BERT with mean pooling: batches run packed (packed.py)
    graphs = counters["stats"]["unique_graphs"]
    fills = []
    with monkeypatch.context() as mp:  # which layout each batch took: both must have been used
        mp.setattr(encoder, "fill", lambda ids: fills.append(real_fill(ids)) or fills[-1])
        # batches of every size and length the texts make, and one text alone (the one-row graph)
        compiled = enc.encode(texts)
        mixed = enc.encode(texts[-2:] + texts[:1])  # 3, 4 and 64 tokens: mostly padding
    assert min(fills) < encoder.PADDED_FILL <= max(fills)  # packed and padded batches both ran
    assert np.sum(mixed * np.vstack([eager[-2:], eager[:1]]), axis=1).min() > 0.99
    singles = np.vstack([enc.encode([t]) for t in texts[:6] + texts[-2:]])
    enc.encode(texts[:5])
    assert counters["stats"]["unique_graphs"] == graphs  # served by the warm graphs, nothing recompiled
    assert compiled.shape == eager.shape and np.allclose(np.linalg.norm(compiled, axis=1), 1.0, atol=1e-5)
    cos = np.sum(compiled * eager, axis=1)
    assert cos.min() > 0.99, cos.min()
    alone = np.sum(singles * np.vstack([eager[:6], eager[-2:]]), axis=1)
    assert alone.min() > 0.99, alone.min()  # nothing padded: one text is its own shape
    se, sc = eager @ eager.T, compiled @ compiled.T
    overlap = np.mean([len(set(np.argsort(-se[i])[1:6]) & set(np.argsort(-sc[i])[1:6])) / 5 for i in range(len(texts))])
    assert overlap >= 0.9, overlap


def test_packed_batches_give_the_models_own_vectors_and_only_where_it_fits(embedder, demo_records, caplog):
    """The packed forward (real tokens only, attention per text) against the model's own padded
    forward in fp32, on texts from 3 tokens to the 256-token cut; and a model it was not
    written for (CLS pooling), or one whose packed vectors would differ, keeps the padded path."""
    import logging

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from stream_sentinel.embedding import packed

    st = SentenceTransformer(str(embedder.path), device="cpu", local_files_only=True)  # fp32: exact
    texts = ["hi", "a slightly longer sentence about spam"] + [r["text"] for r in demo_records[:30]]
    ids = tokenize_truncated(st.tokenizer, texts, 256)
    assert min(map(len, ids)) <= 4 and max(map(len, ids)) == 256
    model = packed.PackedBert.of(st)
    assert model is not None
    with torch.inference_mode():
        got = model(*(torch.from_numpy(a) for a in packed.pack(ids))).numpy()
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    want = st.encode(texts, batch_size=8, normalize_embeddings=True, convert_to_numpy=True)
    cos = np.sum(got * want, axis=1)
    assert cos.min() > 0.99999, cos.min()
    with torch.inference_mode():  # one text alone (the query graph): no padding at all
        alone = np.vstack([model.forward_one(*(torch.from_numpy(a) for a in packed.one_text(x))).numpy() for x in ids])
    alone /= np.linalg.norm(alone, axis=1, keepdims=True)
    assert np.sum(alone * want, axis=1).min() > 0.99999
    # the padded layout (nearly full batches): the same vectors, any width rounding, and the
    # batch that is all at the 256-token cut
    full = [x for x in ids if len(x) == 256]
    assert len(full) >= 2
    for some, multiple in ((ids, 8), (ids[:7], 1), (full, 8), (ids[2:9], 7)):
        layout = packed.padded_layout(some, multiple)
        assert layout[0].shape == (len(some), -(-max(map(len, some)) // multiple) * multiple)
        with torch.inference_mode():
            laid = model.forward_padded(*(torch.from_numpy(a) for a in layout)).numpy()
        laid /= np.linalg.norm(laid, axis=1, keepdims=True)
        assert np.sum(laid * want[[ids.index(x) for x in some]], axis=1).min() > 0.99999
    # token counts rounded up by filler texts (the compiled batch graph's shapes): the real rows
    # come out as without filler, which never widens the attention layout
    for some, multiple in ((ids[:2], 32), (ids[:7], 32), (ids[2:9], 7)):
        rounded = packed.pack(some, multiple)
        assert len(rounded[0]) % multiple == 0 and len(rounded[0]) > sum(map(len, some))
        assert rounded[4].shape[1] == max(map(len, some))  # [texts + filler, longest real text]
        with torch.inference_mode():
            plain = model(*(torch.from_numpy(a) for a in packed.pack(some))).numpy()
            filled = model(*(torch.from_numpy(a) for a in rounded)).numpy()
        assert filled.shape[0] > len(some) and np.allclose(filled[:len(some)], plain, atol=1e-5)

    with caplog.at_level(logging.INFO, logger="stream_sentinel.embedding.packed"):
        cls = SentenceTransformer(modules=[st[0], Pooling(st.get_embedding_dimension(), pooling_mode="cls")],
                                  device="cpu")
        assert packed.PackedBert.of(cls) is None
        assert "mean pooling" in caplog.text

        class Off(packed.PackedBert):  # a structure the probe must catch: the last layer skipped
            def __init__(self, bert):
                super().__init__(bert)
                self.layers = self.layers[:-1]

        assert Off.of(st) is None
        assert "differ from the model's own" in caplog.text


@settings(max_examples=200, deadline=None)
@given(st_lengths=hyp.lists(hyp.integers(2, 3000), min_size=1, max_size=80), cells=hyp.integers(1, 8192))
def test_packed_batches_cover_every_text_once_within_the_attention_budget(st_lengths, cells):
    from stream_sentinel.embedding.encoder import _packed_batches

    order = np.argsort([-n for n in st_lengths], kind="stable")
    batches = _packed_batches(st_lengths, order, cells)
    assert np.array_equal(np.concatenate(batches), order)  # in order, each text once
    for b in batches:
        assert len(b) == 1 or len(b) * st_lengths[b[0]] <= cells
    for a, b in zip(batches, batches[1:]):  # cut only when the next text would not fit
        assert (len(a) + 1) * st_lengths[a[0]] > cells


def test_the_batch_size_setting_bounds_packed_batches(st_model, monkeypatch):
    """STREAM_SENTINEL_EMBED_BATCH_SIZE still means something when batches run packed: the
    attention cells a packed batch may hold scale with it."""
    from stream_sentinel.embedding import encoder

    texts = [" ".join(["word"] * n) for n in range(20, 60)]
    for batch_size in (2, 16):
        calls = []
        encoder.encode_in_batches(st_model.tokenizer, 256, batch_size, texts, 384,
                                  lambda ids: calls.append(ids) or np.ones((len(ids), 384), np.float32), packed=True)
        assert sum(map(len, calls)) == len(texts)
        assert all(len(c) == 1 or len(c) * max(map(len, c)) <= batch_size * encoder.PACKED_CELLS_PER_TEXT
                   for c in calls)
        assert max(map(len, calls)) > (1 if batch_size == 2 else 16)  # packed: more texts than the batch size


def test_nearly_full_batches_run_padded_and_mixed_ones_packed():
    """The compiled batch infer picks the layout by how much of the padded one real tokens fill
    (``encoder.PADDED_FILL``): texts cut at the model's limit, or sorted bulk texts, run padded;
    a dynamic batch of short texts of mixed length runs packed."""
    from stream_sentinel.embedding import encoder

    ran = []
    infer = encoder._by_fill(lambda ids: ran.append("padded"), lambda ids: ran.append("packed"))
    cases = {"padded": [[1] * 256] * 16, "packed": [[1] * n for n in (20, 40, 25, 33, 38, 21)]}
    cases["padded "] = [[1] * n for n in (64, 63, 61, 60)]  # sorted neighbours: width 64, fill 0.97
    cases["packed "] = [[1] * 9, [1] * 7]  # width rounded to 16: fill 0.5
    for want, ids in cases.items():
        ran.clear()
        infer(ids)
        assert ran == [want.strip()], (want, encoder.fill(ids))
    assert encoder.fill([[1] * 256] * 3) == 1.0 and encoder.fill([[1] * 250]) == 250 / 256


def test_kernel_cache_is_sized_for_a_server_unless_the_user_sized_it(monkeypatch):
    from stream_sentinel.embedding import encoder

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    encoder.keep_kernels()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(encoder.KERNEL_CACHE)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    encoder.keep_kernels()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
