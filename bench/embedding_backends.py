"""Embedding throughput per backend on the demo texts, and recall@10 against torch fp32.

Backends, in the same run and on the same texts (alternatives as ratios: this machine is
shared, so absolute texts/s are only indicative):

* torch fp32        sentence-transformers, the baseline
* torch bf16        the same model with bfloat16 weights (AMX / AVX512-BF16 CPUs); what the
                    product picks with STREAM_SENTINEL_EMBED_PRECISION=auto on such CPUs
* onnx fp32         the transformer exported with torch.onnx (mean pooling and L2 norm in the
                    graph), run by onnxruntime
* onnx int8         the same graph with dynamic int8 quantization of its MatMuls (per channel);
                    the variant follows the CPU: avx512_vnni -> full-range u8s8, else avx2 ->
                    reduce_range (7-bit) to avoid int16 saturation
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


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def export_onnx(model_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModel.from_pretrained(str(model_path)).eval()

    class Pooled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            e = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, p=2, dim=1)

    enc = tok(["an example", "another, longer example text"], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(Pooled(model), tuple(enc[n] for n in names), str(out), input_names=names,
                      output_names=["embedding"], opset_version=17, dynamo=False,
                      dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, "embedding": {0: "batch"}})


def onnx_embed(session, tok, texts: list[str], batch: int = 32) -> np.ndarray:
    order = np.argsort([len(t) for t in texts])  # length-sorted batches, as sentence-transformers does
    out = np.zeros((len(texts), 384), dtype=np.float32)
    names = [i.name for i in session.get_inputs()]
    for s in range(0, len(texts), batch):
        idx = order[s:s + batch]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="np")
        out[idx] = session.run(None, {n: enc[n].astype(np.int64) for n in names})[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 texts")
    ap.add_argument("--texts", type=int, default=512)
    args = ap.parse_args()
    n = 128 if args.quick else args.texts
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from stream_sentinel.embedding import Embedder, resolve_model_path

    recs, _, _ = common.corpus()
    texts = [r["text"] for r in recs[1000:1000 + n]]
    path = resolve_model_path(None)
    results: dict[str, dict] = {}

    def run(name: str, fn) -> np.ndarray:
        fn(texts[:8])  # warm-up: model load, first-call allocations
        t = time.perf_counter()
        vecs = fn(texts)
        secs = time.perf_counter() - t
        results[name] = {"texts_per_s": round(len(texts) / secs, 1), "seconds": round(secs, 2)}
        print(f"{name}: {results[name]['texts_per_s']} texts/s", file=sys.stderr)
        return vecs

    base = run("torch fp32", Embedder.load(precision="fp32").embed)
    results["torch fp32"]["recall@10"] = 1.0
    vecs = run("torch bf16", Embedder.load(precision="bf16").embed)
    results["torch bf16"]["recall@10"] = round(recall_at_10(base, vecs), 4)

    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from transformers import AutoTokenizer
    except ImportError:
        print("onnx backends skipped: pip install -c constraints.txt -e '.[bench]'", file=sys.stderr)
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
        vnni = "avx512_vnni" in cpu_flags() or "avx_vnni" in cpu_flags()
        variant = "avx512_vnni" if vnni else "avx2"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        with tempfile.TemporaryDirectory() as tmp:
            fp32, int8 = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
            export_onnx(path, fp32)
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=not vnni, op_types_to_quantize=["MatMul"])
            for name, f in (("onnx fp32", fp32), (f"onnx int8 ({variant})", int8)):
                sess = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
                vecs = run(name, lambda ts, s=sess: onnx_embed(s, tok, ts))
                results[name]["recall@10"] = round(recall_at_10(base, vecs), 4)
    if torch.cuda.is_available():
        vecs = run("torch cuda", Embedder.load(device="cuda", precision="fp32").embed)
        results["torch cuda"]["recall@10"] = round(recall_at_10(base, vecs), 4)

    torch_tps = results["torch fp32"]["texts_per_s"]
    for r in results.values():
        r["vs_torch"] = round(r["texts_per_s"] / torch_tps, 2)
    eligible = {k: v for k, v in results.items() if v["recall@10"] >= 0.98}
    best = max(eligible, key=lambda k: eligible[k]["texts_per_s"])
    print(f"\n{n} demo texts (e-mails, truncated at {MAX_LEN} tokens), {torch.get_num_threads()} threads\n")
    print(f"{'backend':<26}{'texts/s':>9}{'vs torch':>10}{'recall@10':>11}")
    for name, r in results.items():
        print(f"{name:<26}{r['texts_per_s']:>9}{r['vs_torch']:>10}{r['recall@10']:>11.4f}")
    print(f"\nfastest with recall@10 >= 0.98: {best}")
    figures = {"bench": "embedding_backends", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.machine(), "texts": n, "results": results, "best": best}
    common.save(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
