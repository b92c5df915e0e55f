"""POST /v1/predict over real HTTP: latency by known id, throughput, and what dynamic batching buys.

Builds a data root from the demo corpus (the product's file path, the real model's vectors
computed once, the real FAISS index), labels its first ``--labelled`` records, trains and
promotes a champion, and starts `stream-sentinel serve` on it in its own process. The load
comes from this process (``loadgen``: keep-alive connections, a closed loop), so on a 2-core
machine the client takes some CPU from the server: its CPU seconds are printed beside each figure.

In one run:

* **predict by known id** (stored vector and features, one record per request): p50/p99 at
  concurrency 1, requests/s and p99 at concurrency 32 (goal: p99 <= 5 ms, >= 1,000 req/s);
* **predict new short texts** (20-40 tokens, one per request, each embedded by the server's
  model): p50/p99 at concurrency 1 (goal: p99 <= 30 ms), texts/s at concurrency 32 with dynamic
  batching (the default: continuous) and with it switched off (``STREAM_SENTINEL_API_BATCH_MAX=1``,
  a second server: the same model thread, one request at a time), against the embedder's own
  offline batch throughput on the same texts in this process (the limit). Goals: batching
  >= 80 % of offline and >= 4x batching off.

``--embed-server``: the API embeds through an embedding server, as `stream-sentinel up` runs
them (its own process, compiled before timing), instead of in its own process.

The server compiles its model in the background after its first text (``STREAM_SENTINEL_EMBED_COMPILE``,
on by default); the bench waits for that, and compiles the offline embedder too, so both sides
run the same graphs.

    python bench/serving.py [--quick] [--labelled 3000] [--requests 1000] [--seconds 15] [--parts id,text,off]
                            [--embed-server]

Ends with one JSON line, like every bench script.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import common  # noqa: E402  (puts the repo on sys.path)
import loadgen  # noqa: E402
from stream_sentinel import feedback as fb  # noqa: E402
from stream_sentinel.config import Paths, Settings  # noqa: E402
from stream_sentinel.embedding.embedder import Embedder  # noqa: E402
from stream_sentinel.learning import loop as learning  # noqa: E402
from stream_sentinel.learning.models import TrainParams, load_training_set  # noqa: E402
from stream_sentinel.learning.registry import ModelRegistry  # noqa: E402
from stream_sentinel.store import Store  # noqa: E402


def short_texts(recs: list[dict], n: int, tokenizer, seed: int = 3) -> list[str]:
    """``n`` texts of 20-40 tokens (the model's tokenizer, special tokens not counted), spans
    of whole words cut from the corpus. (Until 2026-12-05 this cut 20-40 *words*, 54 tokens on
    average: longer than the goal's texts.)"""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        words = rng.choice(recs)["text"].split()
        if len(words) < 45:
            continue
        k, at = rng.randint(12, 40), rng.randint(0, len(words) - 40)
        text = " ".join(words[at:at + k])
        if 20 <= len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 40:
            out.append(text)
    return out


def champion_for(root: Path, recs: list[dict], labels: dict[str, str], embedding_model_id: str) -> str:
    """Feedback for ``recs`` (one oracle vote each), consensus, a first model, promoted."""
    paths = Paths.at(root)
    store = Store(paths.db)
    now = datetime.now(timezone.utc)
    events = [fb.Event(fb.Position("bench", 0, i), r["id"], labels[r["id"]], "oracle", 1.0, now)
              for i, r in enumerate(recs)]
    fb.write(store, events, [], "file")
    fb.resolve_labels(store, fb.ConsensusConfig())
    ts = load_training_set(store, embedding_model_id, "spam")
    learning.persist_training_set(store, ts, embedding_model_id)
    ts = learning.training_set_for_version(store, ts.data_version, embedding_model_id)
    registry = ModelRegistry(paths.models, store)
    version = learning.train_candidate(registry, store, ts, embedding_model_id, TrainParams(), full=True).version
    registry.promote(version.version, None, "bench")
    return version.version


def measure(url: str, bodies: list[dict], concurrency: int, *, seconds: float | None = None,
            count: int | None = None, label: str) -> dict:
    host = url.removeprefix("http://")
    requests = [loadgen.post("/v1/predict", host, b) for b in bodies]
    cpu0 = time.process_time()
    res = loadgen.run(url, requests, concurrency, seconds, count)
    n = len(res.latencies)
    out = {"concurrency": concurrency, "requests": n, "errors": res.errors,
           "req_per_s": round(n / res.wall_s, 1), "p50_ms": common.percentile_ms(res.latencies, 50),
           "p99_ms": common.percentile_ms(res.latencies, 99), "client_cpu_s": round(time.process_time() - cpu0, 2),
           "wall_s": round(res.wall_s, 2)}
    assert json.loads(res.sample)["predictions"][0]["model_version"], res.sample[:300]
    print(f"{label:>26}: c={concurrency:<3} {out['req_per_s']:8.1f} req/s  p50 {out['p50_ms']:7.2f} ms  "
          f"p99 {out['p99_ms']:7.2f} ms  errors {res.errors}  (client CPU {out['client_cpu_s']} s of "
          f"{out['wall_s']} s)", flush=True)
    return out


def start_embed_server(root: Path, tmp: Path, model) -> "subprocess.Popen":
    """`stream-sentinel embed-server` on ``root`` (the API finds it by the data root's socket),
    once it answers compiled."""
    from stream_sentinel.embedding.server import connect

    log = open(tmp / "embed-server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "stream_sentinel.cli", "embed-server"], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "STREAM_SENTINEL_HOME": str(root)})
    deadline = time.monotonic() + 600
    while True:
        remote = connect(Paths.at(root).embed_socket, model.model_id, model.dim)
        if remote is not None and remote.ping().get("compiled"):
            print("embedding server up, compiled", flush=True)
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the embedding server did not get ready: {(tmp / 'embed-server.log').read_text()}")
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labelled", type=int, default=3000, help="records labelled before the champion is trained")
    ap.add_argument("--requests", type=int, default=1000, help="requests of each concurrency-1 measurement")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each concurrency-32 measurement")
    ap.add_argument("--texts", type=int, default=2000, help="distinct short texts")
    ap.add_argument("--parts", default="id,text,off", help="what to measure (default all): id, text, off")
    ap.add_argument("--quick", action="store_true", help="a small run: 200 requests, 5 s, 300 texts")
    ap.add_argument("--embed-server", action="store_true",
                    help="as `up` runs it: an embedding server (compiled before timing) embeds for the API")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.seconds, args.texts = 200, 5.0, 300
    recs, labels, _ = common.corpus()
    s = Settings.from_env()
    embedder = Embedder.load(s.model_path, s.device, s.embed_batch_size, s.embed_precision, s.embed_backend)
    vecs, _ = common.demo_vectors(embedder, recs)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedder.path))
    texts = short_texts(recs, args.texts, tokenizer)
    tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    print(f"{len(texts)} texts of {min(tokens)}-{max(tokens)} tokens, {sum(tokens) / len(tokens):.1f} on average",
          flush=True)
    # the limit: the embedder's own batch throughput on the same texts, in this process, compiled
    # as the server's is
    embedder.embed(texts[:64])
    compiled = bool(s.embed_compile and embedder.compile())
    print(f"offline embedder compiled: {compiled}" + (f" ({embedder.compile_error})" if embedder.compile_error
                                                      and s.embed_compile else ""), flush=True)
    embedder.embed(texts[:64])
    t0 = time.perf_counter()
    embedder.embed(texts)
    offline = len(texts) / (time.perf_counter() - t0)
    print(f"offline embedder: {offline:.1f} texts/s ({embedder.model_id}, batch {s.embed_batch_size})", flush=True)
    # context, not the goal's limit: the same embedder given 32 texts per call (the most a server
    # at concurrency 32 ever holds at once), so it can sort only those by length
    rng, done, t0 = random.Random(11), 0, time.perf_counter()
    while done < len(texts):
        embedder.embed(rng.sample(texts, 32))
        done += 32
    offline32 = done / (time.perf_counter() - t0)
    print(f"offline embedder, 32 texts per call: {offline32:.1f} texts/s", flush=True)
    model = SimpleNamespace(model_id=embedder.model_id, dim=embedder.dim)
    del embedder  # its memory and threads are not the server's competition
    results: dict = {"offline_compiled": compiled, "offline_texts_per_s": round(offline, 1),
                     "offline_32_per_call_texts_per_s": round(offline32, 1),
                     "text_tokens_mean": round(sum(tokens) / len(tokens), 1)}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        tmp = Path(tmp)
        root = tmp / "root"
        common.build_root(root, recs, vecs, model)
        champion = champion_for(root, recs[:args.labelled], labels, model.model_id)
        ids = [r["id"] for r in recs]
        rng = random.Random(5)

        def ready(h: dict) -> bool:
            return h["champion"] == champion and all(h["loaded"][k] for k in ("model", "index")) \
                and h["loaded"]["known_records"] == len(recs) and h["loaded"]["labelled_reference"] > 0

        by_id = [{"records": [{"id": rng.choice(ids)}]} for _ in range(5000)]
        new = [{"records": [{"id": f"new-{i}", "text": t}]} for i, t in enumerate(texts)]
        parts = set(args.parts.split(","))
        embed_server = start_embed_server(root, tmp, model) if args.embed_server else None
        for env, name in (({}, "batching"), ({"STREAM_SENTINEL_API_BATCH_MAX": "1"}, "off")):
            if not parts & ({"id", "text"} if name == "batching" else {"off"}):
                continue
            with common.api_server(root, tmp / f"serve-{name}.log", env, ready) as (url, _):
                measure(url, new[:20], 1, count=20, label="warm-up")
                server_compiled = common.wait_compiled(url)
                print(f"{name} server's embedder compiled: {server_compiled}", flush=True)
                results.setdefault("compiled", {})[name] = server_compiled
                measure(url, new[20:60], 1, count=40, label="warm-up (compiled)")
                part = results.setdefault(name, {})
                if name == "batching" and "id" in parts:
                    part["by_id_c1"] = measure(url, by_id, 1, count=args.requests, label="known id")
                    part["by_id_c32"] = measure(url, by_id, 32, seconds=args.seconds, label="known id")
                if name == "off" or "text" in parts:
                    if name == "batching":
                        part["text_c1"] = measure(url, new, 1, count=min(args.requests, len(new)),
                                                  label="new text, batching")
                    part["text_c32"] = measure(url, new, 32, seconds=args.seconds, label=f"new text, {name}")
        if embed_server is not None:
            embed_server.terminate()
            embed_server.wait(30)
    if "text_c32" not in results.get("batching", {}) or "off" not in results:
        common.save({"bench": "serving-partial", "embed_server": args.embed_server, "cpu": common.cpu_name(),
                     **results})
        return 0
    on, off = results["batching"]["text_c32"]["req_per_s"], results["off"]["text_c32"]["req_per_s"]
    results["batching_over_offline"] = round(on / offline, 3)
    results["batching_over_off"] = round(on / max(off, 1e-9), 2)
    results["batching_over_offline_32_per_call"] = round(on / offline32, 3)
    print(f"new texts at c=32: batching {on:.1f}/s = {on / offline:.2f} of offline {offline:.1f}/s "
          f"({on / offline32:.2f} of 32 per call), {on / max(off, 1e-9):.2f}x batching off ({off:.1f}/s)")
    common.save({"bench": "serving", "embed_server": args.embed_server, "cpu": common.cpu_name(),
                 "cores": os.cpu_count(), "records": len(recs),
                 "labelled": args.labelled, "champion": champion, "embed_backend": s.embed_backend,
                 "embed_precision": s.embed_precision, "batch_window_ms": s.api_batch_window_ms, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
