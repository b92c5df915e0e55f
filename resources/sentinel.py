"""Resources wrap the library; every field left unset falls back to the environment.

Values are resolved in ``setup_for_execution`` (at run or tick time), never at import,
so one code location serves any data root and tests can point it at a temp folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import PrivateAttr

WORKER_TAG = "stream_sentinel/worker"  # read by sensors/liveness.py

from stream_sentinel import procs
from stream_sentinel.config import Paths, Settings
from stream_sentinel.embedding.embedder import Embedder, model_dimension
from stream_sentinel.index import IndexStore
from stream_sentinel.learning.registry import ModelRegistry
from stream_sentinel.store import Store


class StreamSentinelResource(dg.ConfigurableResource):
    """The data root (files, DuckDB, index) and the ingest knobs."""

    home: Optional[str] = None  # default: $STREAM_SENTINEL_HOME or ./.stream_sentinel
    debounce_seconds: Optional[float] = None
    batch_max_files: Optional[int] = None
    batch_max_records: Optional[int] = None
    rebuild_ratio: Optional[float] = None
    keep_backups: Optional[int] = None

    _paths: Paths = PrivateAttr()
    _settings: Settings = PrivateAttr()

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        env = Settings.from_env()
        self._settings = dataclasses.replace(
            env,
            debounce_s=env.debounce_s if self.debounce_seconds is None else self.debounce_seconds,
            batch_max_files=self.batch_max_files or env.batch_max_files,
            batch_max_records=self.batch_max_records or env.batch_max_records,
            rebuild_ratio=env.rebuild_ratio if self.rebuild_ratio is None else self.rebuild_ratio,
            keep_backups=env.keep_backups if self.keep_backups is None else self.keep_backups,
        )
        self._paths = (Paths.at(self.home) if self.home else Paths.from_env()).ensure()
        run = context.run
        if run is not None and context.instance is not None and run.tags.get(WORKER_TAG) != (me := procs.identity()):
            # who runs this run: run_liveness_sensor fails the run if this process dies mid-run
            context.instance.add_run_tags(run.run_id, {WORKER_TAG: me})

    @property
    def paths(self) -> Paths:
        return self._paths

    @property
    def settings(self) -> Settings:
        return self._settings

    def store(self, lock_timeout_s: float = 120.0) -> Store:
        return Store(self._paths.db, lock_timeout_s=lock_timeout_s)

    def index_store(self) -> IndexStore:
        return IndexStore(self._paths.index, keep_backups=self._settings.keep_backups)

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self._paths.models, self.store())


class EmbedderResource(dg.ConfigurableResource):
    """The sentence-transformers model: a local folder, loaded offline, once per process."""

    model_path: Optional[str] = None  # default: $STREAM_SENTINEL_MODEL_PATH or the bundled MiniLM
    device: Optional[str] = None  # cpu | cuda
    batch_size: Optional[int] = None
    precision: Optional[str] = None  # auto (bf16 on CPUs with bf16 units, else fp32) | fp32 | bf16
    backend: Optional[str] = None  # torch (default) | onnx | onnx-int8 (the `onnx` extra; exported once, cached)
    # a warm model shared by all runs (`stream-sentinel embed-server`, started by `up`);
    # default: $STREAM_SENTINEL_HOME/embedder.sock. Without a server runs embed in-process.
    server_socket: Optional[str] = None

    _embedder: Embedder = PrivateAttr()
    _remote: object = PrivateAttr(default=None)
    _looked_for_server: bool = PrivateAttr(default=False)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        env = Settings.from_env()
        self._embedder = Embedder.load(self.model_path or env.model_path, self.device or env.device,
                                       self.batch_size or env.embed_batch_size,
                                       self.precision or env.embed_precision, self.backend or env.embed_backend,
                                       Paths.from_env().embedding_models)

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    @property
    def text_embedder(self):
        """What embeds texts: the shared server when one runs with this model, else the local model.
        Looked up on first use, so runs that only need the model id (checks, drift) never ping it."""
        if not self._looked_for_server:
            from stream_sentinel.embedding.server import connect

            sock = Path(self.server_socket) if self.server_socket else Paths.from_env().embed_socket
            self._remote = connect(sock, self._embedder.model_id, self._embedder.dim)
            self._looked_for_server = True
        return self._remote or self._embedder

    @property
    def served(self) -> bool:
        return self._remote is not None

    @property
    def embedded_by(self) -> str:
        """For run metadata: which path embedded this run's texts."""
        if self._remote is None:
            return "in-process"
        return "embed-server (compiled)" if getattr(self._remote, "compiled", False) else "embed-server"

    @property
    def model_id(self) -> str:
        return self._embedder.model_id

    @property
    def dim(self) -> int:
        return model_dimension(self._embedder.path)
