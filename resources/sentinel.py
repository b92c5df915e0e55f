"""Resources wrap the library; their fields are the settings, typed and visible in the UI.

The environment is read when the code location loads (``from_settings``: its values become
the fields' defaults, see ``sections.py``), never at import and never inside a run, so what
the resource page shows is what runs use, and a run can override any field in the launchpad.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import dagster as dg
from pydantic import Field, PrivateAttr

WORKER_TAG = "stream_sentinel/worker"  # read by sensors/liveness.py

from stream_sentinel import procs
from stream_sentinel.config import HOME_ENV, Paths, Settings
from stream_sentinel.drift import DriftConfig
from stream_sentinel.embedding.embedder import Embedder, model_dimension
from stream_sentinel.embedding.server import default_address
from stream_sentinel.index import IndexStore
from stream_sentinel.learning.registry import ModelRegistry
from stream_sentinel.store import STORE_URL_ENV, Store, store_url
from stream_sentinel.windows import spec as window_spec
from stream_sentinel.windows.spec import WindowSet

from .sections import (SENTINEL_SECTIONS, ABSettings, DriftSettings, FeedbackSettings, IndexSettings,
                       IngestSettings, LearningSettings, RetrySettings, ServingSettings, described,
                       section_values, with_defaults)


class StreamSentinelResource(dg.ConfigurableResource):
    """The data root (files, DuckDB, index) and every tunable of the loop, by section."""

    home: Optional[str] = Field(default=None, description=f"the data root; empty: ${HOME_ENV} or ./.stream_sentinel")
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    learning: LearningSettings = Field(default_factory=LearningSettings)
    ab: ABSettings = Field(default_factory=ABSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    store_url: Optional[str] = Field(
        default=None, description="the metrics store on PostgreSQL (postgresql+psycopg2://...), by reference to "
        "$STREAM_SENTINEL_STORE_URL so the password stays in the environment; empty: DuckDB at "
        "<data root>/metrics.duckdb. In progress: see the README's \"Beyond one machine\".")
    windows_file: Optional[str] = Field(
        default=None, description="the stream windows' declarations (YAML, see the README); empty: "
        "<data root>/windows.yaml. Each window_features materialization shows what it read.")

    _paths: Paths = PrivateAttr()
    _settings: Settings = PrivateAttr()
    _drift: DriftConfig = PrivateAttr()

    @classmethod
    def from_settings(cls, settings: Settings, drift: DriftConfig | None = None,
                      home: str | None = None) -> "StreamSentinelResource":
        """The resource whose field defaults are these settings (the code location's)."""
        values = {field: section_values(settings, group) for field, group in SENTINEL_SECTIONS.items()}
        values["drift"] = section_values(drift or DriftConfig.from_env(), "drift")
        values["home"] = str(Paths.at(home).home if home else Paths.from_env().home)
        # the URL by reference (an unset dg.EnvVar would fail every run, so only when set)
        refs = {"store_url": dg.EnvVar(STORE_URL_ENV)} if store_url() else {}
        return with_defaults(cls, values)(**refs)

    @classmethod
    def from_env(cls, home: str | None = None) -> "StreamSentinelResource":
        return cls.from_settings(Settings.from_env(), DriftConfig.from_env(), home)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        values: dict = {}
        for field in SENTINEL_SECTIONS:
            values.update(getattr(self, field).model_dump())
        self._settings = Settings(**values)  # checks every rule (a launchpad value too), naming the variable
        self._drift = DriftConfig(**self.drift.model_dump())
        self._paths = (Paths.at(self.home) if self.home else Paths.from_env()).ensure()
        if self.store_url:  # a launchpad value too: a URL, never a path taken for a DuckDB file
            store_url({STORE_URL_ENV: self.store_url})
        run = context.run
        if run is not None and context.instance is not None and run.tags.get(WORKER_TAG) != (me := procs.identity()):
            # who runs this run: run_liveness_sensor fails the run if this process dies mid-run
            context.instance.add_run_tags(run.run_id, {WORKER_TAG: me})

    @property
    def drift_config(self) -> DriftConfig:
        return self._drift

    @property
    def paths(self) -> Paths:
        return self._paths

    @property
    def settings(self) -> Settings:
        return self._settings

    def store(self, lock_timeout_s: float = 120.0) -> Store:
        return Store(self.store_url or self._paths.db, lock_timeout_s=lock_timeout_s, home=self._paths.home)

    def index_store(self) -> IndexStore:
        return IndexStore(self._paths.index, keep_backups=self._settings.keep_backups)

    def window_set(self) -> WindowSet:
        """The declared windows (raises WindowSpecError naming the file, window and rule)."""
        if self.windows_file:
            path = Path(self.windows_file)
            return window_spec.parse_text(path.read_text(encoding="utf-8"), str(path)) if path.exists() \
                else WindowSet(source=str(path))
        return window_spec.load(self._paths.home)

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self._paths.models, self.store())


class EmbedderResource(dg.ConfigurableResource):
    """The sentence-transformers model: a local folder, loaded offline, once per process."""

    model_path: Optional[str] = described(Settings, "model_path")
    device: str = described(Settings, "device")
    batch_size: int = described(Settings, "embed_batch_size")
    precision: Literal["auto", "fp32", "bf16"] = described(Settings, "embed_precision")
    backend: Literal["torch", "onnx", "onnx-int8"] = described(Settings, "embed_backend")
    server_socket: Optional[str] = Field(
        default=None, description="a warm model shared by all runs (`stream-sentinel embed-server`, started by "
        "`up`): a Unix socket, set to <data root>/embedder.sock when the code location loads, or "
        "tcp://host:port ($STREAM_SENTINEL_EMBED_SERVER, a cluster's embedding service). Without a server runs "
        "embed in-process.")
    derived_dir: Optional[str] = Field(
        default=None, description="where ONNX exports of the model are cached; set to <data root>/models/embedding "
        "when the code location loads")

    _embedder: Embedder = PrivateAttr()
    _remote: object = PrivateAttr(default=None)
    _looked_for_server: bool = PrivateAttr(default=False)

    @classmethod
    def from_settings(cls, settings: Settings, home: str | None = None) -> "EmbedderResource":
        """The resource whose field defaults are these settings (the code location's)."""
        paths = Paths.at(home) if home else Paths.from_env()
        return with_defaults(cls, {"model_path": settings.model_path, "device": settings.device,
                                   "batch_size": settings.embed_batch_size, "precision": settings.embed_precision,
                                   "backend": settings.embed_backend,
                                   "server_socket": str(default_address(paths.embed_socket)),
                                   "derived_dir": str(paths.embedding_models)})()

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        derived = Path(self.derived_dir) if self.derived_dir else Paths.from_env().embedding_models
        self._embedder = Embedder.load(self.model_path, self.device, self.batch_size, self.precision, self.backend,
                                       derived)

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    @property
    def text_embedder(self):
        """What embeds texts: the shared server when one runs with this model, else the local model.
        Looked up on first use, so runs that only need the model id (checks, drift) never ping it."""
        if not self._looked_for_server:
            from stream_sentinel.embedding.server import connect

            sock = self.server_socket or str(Paths.from_env().embed_socket)
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
