"""Where Stream Sentinel keeps its data.

Everything lives under one data root so that a user can move, back up or delete a
deployment as a single folder. The root comes from ``STREAM_SENTINEL_HOME`` (default
``./.stream_sentinel``); nothing is chosen at import time, so tests and the Dagster
resources can point at another root without reloading modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

HOME_ENV = "STREAM_SENTINEL_HOME"
DEFAULT_HOME = ".stream_sentinel"
PARTITIONS_START_ENV = "STREAM_SENTINEL_PARTITIONS_START"
# The first partition of a data root made before its first day was recorded: the calendar
# such roots were built with, so none of their partitions disappears.
LEGACY_PARTITIONS_START = "2024-01-01"


def home_from_env() -> Path:
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().absolute()


@dataclass(frozen=True)
class Paths:
    """The layout of a data root; ``ensure()`` creates it."""

    home: Path

    @classmethod
    def from_env(cls) -> "Paths":
        return cls(home_from_env())

    @classmethod
    def at(cls, home: str | os.PathLike[str]) -> "Paths":
        return cls(Path(home).expanduser().absolute())

    @property
    def raw(self) -> Path:
        return self.home / "raw"

    @property
    def failed(self) -> Path:
        return self.home / "failed"

    @property
    def index(self) -> Path:
        return self.home / "index"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def embedding_models(self) -> Path:
        """Derived embedding models (ONNX exports, int8 variants), one folder per source model."""
        return self.models / "embedding"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def feedback(self) -> Path:
        return self.home / "feedback"

    @property
    def db(self) -> Path:
        return self.home / "metrics.duckdb"

    @property
    def embed_socket(self) -> Path:
        """Where `stream-sentinel embed-server` listens (see stream_sentinel.embedding.server)."""
        return self.home / "embedder.sock"

    @property
    def first_day_file(self) -> Path:
        """The UTC day the data root was made (``YYYY-MM-DD``): where its daily partitions start."""
        return self.home / "first_day"

    def first_day(self, today: date | None = None) -> str:
        """The first arrival day this data root can have, so the daily partitions start there.

        Files are partitioned by the day they arrive, and nothing arrives before the root
        exists: starting the calendar on that day shows a new user's first day as the only
        partition, instead of years of "missing" days before it. Read, never written, here
        (the code location calls this when it loads); ``ensure()`` records it. A root made
        before the day was recorded (it has a database already) keeps the old 2024-01-01
        start; a root that does not exist yet starts today.
        """
        try:
            return date.fromisoformat(self.first_day_file.read_text().strip()).isoformat()
        except FileNotFoundError:
            pass
        except ValueError:
            raise ValueError(f"{self.first_day_file} does not hold a YYYY-MM-DD day; set {PARTITIONS_START_ENV} "
                             "or delete the file (the data root's first day is then today)") from None
        if self.db.exists():
            return LEGACY_PARTITIONS_START
        return (today or datetime.now(timezone.utc).date()).isoformat()

    def note_arrival(self, day: date) -> None:
        """Move the recorded first day back to ``day`` if it is earlier.

        Only files registered with a fixed, past arrival time (tests, backfill demos) arrive
        before the root was made; their days must be partitions too. The code location sees
        the new first day when it loads next."""
        if day.isoformat() < self.first_day():
            from .atomic import write_bytes_atomic

            self.home.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.first_day_file, (day.isoformat() + "\n").encode())

    def ensure(self) -> "Paths":
        for p in (self.raw, self.failed, self.index, self.models, self.reports, self.feedback):
            p.mkdir(parents=True, exist_ok=True)
        if not self.first_day_file.exists():
            from .atomic import write_bytes_atomic

            write_bytes_atomic(self.first_day_file, (self.first_day() + "\n").encode())
        return self


def cache_root() -> Path:
    """Where downloads and derived files shared by every data root live (the demo corpus, the
    Kafka jars, precomputed test vectors): ``$STREAM_SENTINEL_CACHE``, else the XDG cache."""
    base = os.environ.get("STREAM_SENTINEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "stream-sentinel")
    return Path(base)


def env_num(name: str, default: float, cast=float):
    raw = os.environ.get(name)
    if raw in (None, ""):
        return cast(default)
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (1/0, true/false, yes/no, on/off)")


def _label_pair(labels: str, positive: str, negative: str) -> dict[str, str]:
    """The two classes the model learns, named as the labels say them.

    The model is binary: it scores ``positive`` and answers the other configured label
    otherwise (never an invented ``not_<positive>``: live accuracy, drift and the API
    compare answers with feedback labels as strings). With ``labels=a,b`` and nothing
    else set, ``b`` is the positive class (as ``spam`` is for the default ``ham,spam``).
    """
    names = list(dict.fromkeys(v.strip() for v in labels.split(",") if v.strip()))
    positive, negative = positive.strip(), negative.strip()
    if names:
        if len(names) != 2:
            raise ValueError(f"STREAM_SENTINEL_LABELS={labels!r}: the model learns two classes; "
                             f"name exactly two labels (e.g. ham,spam), or none to accept any")
        positive = positive or names[1]
        if positive not in names:
            raise ValueError(f"STREAM_SENTINEL_POSITIVE_LABEL={positive!r} is not one of "
                             f"STREAM_SENTINEL_LABELS={labels!r}")
        other = names[0] if positive == names[1] else names[1]
        if negative and negative != other:
            raise ValueError(f"STREAM_SENTINEL_NEGATIVE_LABEL={negative!r} must be the other label of "
                             f"STREAM_SENTINEL_LABELS={labels!r} ({other!r})")
        return {"positive_label": positive, "negative_label": other}
    if not positive:
        positive = "spam"
    if negative == positive:
        raise ValueError("STREAM_SENTINEL_NEGATIVE_LABEL must differ from STREAM_SENTINEL_POSITIVE_LABEL")
    # any label accepted: the negative class is named by the data when not set (learning.label_pair)
    return {"positive_label": positive, "negative_label": negative}


@dataclass(frozen=True)
class Settings:
    """Tunables, each overridable by an environment variable (documented in the README)."""

    sensor_interval_s: int = 5
    debounce_s: float = 2.0
    batch_max_files: int = 100
    batch_max_records: int = 5000
    rebuild_ratio: float = 0.2
    keep_backups: int = 3
    ivf_threshold: int = 200_000  # a rebuild past this many vectors makes an IVF index instead of exact search
    nprobe: int = 8  # IVF lists searched per query: at 1M recall@10 0.998, p99 0.88 ms (bench/faiss_search.py)
    model_path: str | None = None
    device: str = "cpu"
    embed_batch_size: int = 16
    embed_precision: str = "auto"  # auto | fp32 | bf16 (see embedding.resolve_precision)
    embed_backend: str = "torch"  # torch | onnx | onnx-int8 (see embedding.resolve_backend)
    embed_compile: bool = True  # the embedding server compiles the model at start (see embedding/encoder.py)
    embed_compile_granule: int = 32  # compiled padded lengths step by this many tokens (8 graphs for 256)
    feedback_topic: str = "stream-sentinel.feedback"
    labels: str = "ham,spam"  # allowed label values; empty = any string
    feedback_min_batch: int = 10
    feedback_max_wait_s: float = 30.0
    feedback_max_range: int = 50_000
    consensus_half_life_h: float = 168.0
    consensus_conflict_margin: float = 0.2
    reliability_prior: str = "2,1"  # Beta(agree, disagree) prior on each reviewer's reliability
    positive_label: str = "spam"  # the class the model scores; from env: default the second of `labels`
    negative_label: str = "ham"  # the other class; from env: default the other of `labels`
    valid_share: float = 0.2
    golden_share: float = 0.1
    valid_max: int = 200
    promotion_metric: str = "roc_auc"  # roc_auc | f1 | log_loss
    promotion_margin: float = 0.01
    retrain_min_labels: int = 50
    retrain_growth: float = 0.25  # ... and this share of the labels the newest training set has
    retrain_max_wait_s: float = 600.0
    replay_size: int = 500
    rescore_window: int = 10_000  # a new champion rescores this many latest records (new ones always)
    rollback_margin: float = 0.05  # live accuracy this far under the promised one -> automatic rollback
    rollback_min_samples: int = 50
    ab_share: float = 0.0  # > 0: a candidate that passes the gate becomes a challenger serving this share
    ab_routing: str = "hash"  # hash (consistent hashing of record id) | thompson
    ab_alpha: float = 0.05
    ab_min_samples: int = 100
    retry_max_attempts: int = 4  # failed runs of a unit (batch, range, feedback file) before it is parked
    retry_base_delay_s: float = 20.0  # backoff after the first failed run; doubles, up to 5 min
    retry_parked_s: float = 900.0  # a parked unit is still tried this often
    partitions_start: str = ""  # first daily partition (YYYY-MM-DD); empty = the data root's first day

    @classmethod
    def from_env(cls) -> "Settings":
        d = cls()
        return cls(
            sensor_interval_s=env_num("STREAM_SENTINEL_SENSOR_INTERVAL", d.sensor_interval_s, int),
            debounce_s=env_num("STREAM_SENTINEL_DEBOUNCE_SECONDS", d.debounce_s),
            batch_max_files=env_num("STREAM_SENTINEL_BATCH_MAX_FILES", d.batch_max_files, int),
            batch_max_records=env_num("STREAM_SENTINEL_BATCH_MAX_RECORDS", d.batch_max_records, int),
            rebuild_ratio=env_num("STREAM_SENTINEL_REBUILD_RATIO", d.rebuild_ratio),
            keep_backups=env_num("STREAM_SENTINEL_KEEP_BACKUPS", d.keep_backups, int),
            ivf_threshold=env_num("STREAM_SENTINEL_INDEX_IVF_THRESHOLD", d.ivf_threshold, int),
            nprobe=env_num("STREAM_SENTINEL_INDEX_NPROBE", d.nprobe, int),
            model_path=os.environ.get("STREAM_SENTINEL_MODEL_PATH") or None,
            device=os.environ.get("STREAM_SENTINEL_DEVICE") or d.device,
            embed_batch_size=env_num("STREAM_SENTINEL_EMBED_BATCH_SIZE", d.embed_batch_size, int),
            embed_precision=os.environ.get("STREAM_SENTINEL_EMBED_PRECISION") or d.embed_precision,
            embed_backend=os.environ.get("STREAM_SENTINEL_EMBED_BACKEND") or d.embed_backend,
            embed_compile=_env_bool("STREAM_SENTINEL_EMBED_COMPILE", d.embed_compile),
            embed_compile_granule=env_num("STREAM_SENTINEL_EMBED_COMPILE_GRANULE", d.embed_compile_granule, int),
            feedback_topic=os.environ.get("STREAM_SENTINEL_FEEDBACK_TOPIC") or d.feedback_topic,
            labels=os.environ.get("STREAM_SENTINEL_LABELS", d.labels),
            feedback_min_batch=env_num("STREAM_SENTINEL_FEEDBACK_BATCH", d.feedback_min_batch, int),
            feedback_max_wait_s=env_num("STREAM_SENTINEL_FEEDBACK_TIMEOUT_SECONDS", d.feedback_max_wait_s),
            feedback_max_range=env_num("STREAM_SENTINEL_FEEDBACK_MAX_RANGE", d.feedback_max_range, int),
            consensus_half_life_h=env_num("STREAM_SENTINEL_CONSENSUS_HALF_LIFE_HOURS", d.consensus_half_life_h),
            consensus_conflict_margin=env_num("STREAM_SENTINEL_CONFLICT_MARGIN", d.consensus_conflict_margin),
            reliability_prior=os.environ.get("STREAM_SENTINEL_RELIABILITY_PRIOR") or d.reliability_prior,
            **_label_pair(os.environ.get("STREAM_SENTINEL_LABELS", d.labels),
                          os.environ.get("STREAM_SENTINEL_POSITIVE_LABEL", ""),
                          os.environ.get("STREAM_SENTINEL_NEGATIVE_LABEL", "")),
            valid_share=env_num("STREAM_SENTINEL_VALID_SHARE", d.valid_share),
            golden_share=env_num("STREAM_SENTINEL_GOLDEN_SHARE", d.golden_share),
            valid_max=env_num("STREAM_SENTINEL_VALID_MAX", d.valid_max, int),
            promotion_metric=os.environ.get("STREAM_SENTINEL_PROMOTION_METRIC") or d.promotion_metric,
            promotion_margin=env_num("STREAM_SENTINEL_PROMOTION_MARGIN", d.promotion_margin),
            retrain_min_labels=env_num("STREAM_SENTINEL_RETRAIN_MIN_LABELS", d.retrain_min_labels, int),
            retrain_growth=env_num("STREAM_SENTINEL_RETRAIN_GROWTH", d.retrain_growth),
            retrain_max_wait_s=env_num("STREAM_SENTINEL_RETRAIN_MAX_WAIT_SECONDS", d.retrain_max_wait_s),
            replay_size=env_num("STREAM_SENTINEL_REPLAY_SIZE", d.replay_size, int),
            rescore_window=env_num("STREAM_SENTINEL_RESCORE_WINDOW", d.rescore_window, int),
            rollback_margin=env_num("STREAM_SENTINEL_ROLLBACK_MARGIN", d.rollback_margin),
            rollback_min_samples=env_num("STREAM_SENTINEL_ROLLBACK_MIN_SAMPLES", d.rollback_min_samples, int),
            ab_share=env_num("STREAM_SENTINEL_AB_SHARE", d.ab_share),
            ab_routing=os.environ.get("STREAM_SENTINEL_AB_ROUTING") or d.ab_routing,
            ab_alpha=env_num("STREAM_SENTINEL_AB_ALPHA", d.ab_alpha),
            ab_min_samples=env_num("STREAM_SENTINEL_AB_MIN_SAMPLES", d.ab_min_samples, int),
            retry_max_attempts=env_num("STREAM_SENTINEL_RETRY_MAX_ATTEMPTS", d.retry_max_attempts, int),
            retry_base_delay_s=env_num("STREAM_SENTINEL_RETRY_BASE_SECONDS", d.retry_base_delay_s),
            retry_parked_s=env_num("STREAM_SENTINEL_RETRY_PARKED_SECONDS", d.retry_parked_s),
            partitions_start=os.environ.get(PARTITIONS_START_ENV, "").strip(),
        )

    def partitions_start_for(self, paths: Paths) -> str:
        """The first daily partition: ``partitions_start`` when set, else the data root's first day.

        A malformed day is refused here, with the variable's name, when the code location
        loads, not at the first run that needs a partition key."""
        if not self.partitions_start:
            return paths.first_day()
        try:
            return date.fromisoformat(self.partitions_start).isoformat()
        except ValueError:
            raise ValueError(f"{PARTITIONS_START_ENV}={self.partitions_start!r} is not a day (YYYY-MM-DD)") from None

    def retry_policy(self):
        from .retry import RetryPolicy

        return RetryPolicy(max_attempts=self.retry_max_attempts, base_delay_s=self.retry_base_delay_s,
                           max_delay_s=max(self.retry_base_delay_s, 300.0), parked_retry_s=self.retry_parked_s)

    @property
    def allowed_labels(self) -> frozenset[str] | None:
        values = frozenset(v.strip() for v in self.labels.split(",") if v.strip())
        return values or None

    def consensus_config(self) -> "ConsensusConfig":
        agree, disagree = (float(x) for x in self.reliability_prior.split(","))
        return ConsensusConfig(half_life_hours=self.consensus_half_life_h, prior_agree=agree,
                               prior_disagree=disagree, conflict_margin=self.consensus_conflict_margin)


@dataclass(frozen=True)
class ConsensusConfig:
    half_life_hours: float = 168.0  # a vote a week older than the record's newest vote counts half
    prior_agree: float = 2.0  # Beta prior on a reviewer's reliability: 2/(2+1) = 0.67 before evidence
    prior_disagree: float = 1.0
    conflict_margin: float = 0.2  # (top - runner-up) / total below this -> conflict, held out
    iterations: int = 5
