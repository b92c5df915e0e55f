"""Embedding throughput per backend on the demo texts, and recall@10 against torch fp32.

Backends, in the same run and on the same texts (alternatives as ratios: this machine is
shared, so absolute texts/s are only indicative). Backends take turns on the same slice of
texts, round after round; each ratio is the median over rounds of texts/s against torch fp32
in the same round, so a noisy neighbour hits all backends alike:

* torch fp32        sentence-transformers ``encode`` (batches of 32), the baseline
* torch bf16        the same with bfloat16 weights (AMX / AVX512-BF16 CPUs)
* product eager     ``Embedder``: the precision auto picks (bf16 on such CPUs), batches of 16
                    texts of similar token length, shortcut tokenizing (encoder.py); what a
                    run uses when it embeds in its own process
* product compiled  the same, compiled (torch.compile, frozen weights: a graph for one text and
                    graphs for batches of any shape, packed or padded by how full a batch
                    is, which is what this measures);
                    what the embedding server uses once it has compiled (its compile time
                    is reported apart)
* onnx fp32         STREAM_SENTINEL_EMBED_BACKEND=onnx: the sentence-transformers pipeline
                    exported with torch.onnx, run by onnxruntime (onnx_backend.py), same batches
* onnx int8         STREAM_SENTINEL_EMBED_BACKEND=onnx-int8: that graph with dynamic int8
                    quantization of its MatMuls (per channel); the variant follows the CPU:
                    avx512_vnni -> full-range u8s8, else avx2 -> reduce_range (7-bit) to avoid
                    int16 saturation. Export and quantization times are reported apart.
* torch cuda        when a GPU is present

recall@10: for every text, the share of its 10 nearest neighbours (among the benchmark
texts) under torch fp32 that the backend also finds. Needs the bench extra
(onnx, onnxruntime): pip install -c constraints.txt -e '.[bench]'.

    python bench/embedding_backends.py [--quick] [--texts 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MAX_LEN = 256  # all-MiniLM-L6-v2's max_seq_length


def recall_at_10(ref: np.ndarray, got: np.ndarray) -> float:
    sr, sg = ref @ ref.T, got @ got.T
    k = min(10, len(ref) - 1)
    return float(np.mean([len(set(np.argsort(-sr[i])[1:k + 1]) & set(np.argsort(-sg[i])[1:k + 1])) / k
                          for i in range(len(ref))]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds of 48 texts")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--texts", type=int, default=128, help="texts per round")
    args = ap.parse_args()
    rounds, n = (2, 48) if args.quick else (args.rounds, args.texts)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from stream_sentinel.embedding.embedder import Embedder, resolve_model_path

    recs, _, _ = common.corpus()
    texts = [r["text"] for r in recs[1000:1000 + rounds * n]]
    warm_texts = [r["text"] for r in recs[900:932]]
    path = resolve_model_path(None)
    backends: dict[str, object] = {}

    def st_encode(precision: str):
        from sentence_transformers import SentenceTransformer

        kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if precision == "bf16" else {}
        st = SentenceTransformer(str(path), device="cpu", local_files_only=True, **kwargs)
        return lambda ts: np.asarray(st.encode(ts, batch_size=32, normalize_embeddings=True), dtype=np.float32)

    backends["torch fp32"] = st_encode("fp32")
    backends["torch bf16"] = st_encode("bf16")
    product = Embedder.load()
    backends[f"product eager ({product.precision})"] = product.embed
    extra: dict[str, float | str | None] = {}
    from stream_sentinel.embedding.encoder import Encoder

    compiled_encoder = Encoder(product._model(), product.batch_size)  # same model, its own compiled graphs
    t = time.perf_counter()
    if compiled_encoder.warm():
        extra["compile_s"] = round(time.perf_counter() - t, 1)
        backends[f"product compiled ({product.precision})"] = compiled_encoder.encode
    else:
        extra["compile_error"] = compiled_encoder.compile_error
        print(f"compiled backend skipped: {compiled_encoder.compile_error}", file=sys.stderr)

    tmp = tempfile.TemporaryDirectory()  # a fresh export cache: the export is part of what is measured
    for backend in ("onnx", "onnx-int8"):
        try:
            t = time.perf_counter()
            emb = Embedder.load(backend=backend, models_root=tmp.name)
            emb.embed(["export"])
            extra[f"{backend}_export_s"] = round(time.perf_counter() - t, 1)
        except RuntimeError as exc:  # the onnx extra is not installed
            print(f"{backend} skipped: {exc}", file=sys.stderr)
            continue
        from stream_sentinel.embedding.onnx_backend import int8_variant

        backends["onnx fp32" if backend == "onnx" else f"onnx int8 ({int8_variant()})"] = emb.embed
    if torch.cuda.is_available():
        backends["torch cuda"] = Embedder.load(device="cuda", precision="fp32").embed

    for fn in backends.values():
        fn(warm_texts)  # model load, first-call allocations
    speed: dict[str, list[float]] = {k: [] for k in backends}
    vecs: dict[str, list[np.ndarray]] = {k: [] for k in backends}
    for r in range(rounds):
        chunk = texts[r * n:(r + 1) * n]
        for name, fn in backends.items():
            t = time.perf_counter()
            vecs[name].append(fn(chunk))
            speed[name].append(len(chunk) / (time.perf_counter() - t))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speed.items()), file=sys.stderr)
    tmp.cleanup()

    base = np.vstack(vecs["torch fp32"])
    results: dict[str, dict] = {}
    for name in backends:
        ratios = [a / b for a, b in zip(speed[name], speed["torch fp32"])]
        results[name] = {"texts_per_s": round(float(np.median(speed[name])), 1),
                         "vs_torch": round(float(np.median(ratios)), 2),
                         "vs_torch_rounds": [round(x, 2) for x in ratios],
                         "recall@10": round(recall_at_10(base, np.vstack(vecs[name])), 4)}
    eligible = {k: v for k, v in results.items() if v["recall@10"] >= 0.98}
    best = max(eligible, key=lambda k: eligible[k]["vs_torch"])
    print(f"\n{rounds} rounds x {n} demo texts (e-mails, truncated at {MAX_LEN} tokens), "
          f"{torch.get_num_threads()} threads\n")
    print(f"{'backend':<28}{'texts/s':>9}{'vs torch':>10}{'recall@10':>11}")
    for name, r in results.items():
        print(f"{name:<28}{r['texts_per_s']:>9}{r['vs_torch']:>10}{r['recall@10']:>11.4f}")
    if "compile_s" in extra:
        print(f"\ncompile (once per embedding server start): {extra['compile_s']} s")
    print(f"fastest with recall@10 >= 0.98: {best}")
    figures = {"bench": "embedding_backends", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.machine(), "rounds": rounds, "texts_per_round": n, "results": results,
               "best": best, **extra}
    common.save(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
