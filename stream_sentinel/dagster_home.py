"""The Dagster instance folder (``DAGSTER_HOME``) that `stream-sentinel up` runs with.

The instance settings (``dagster.yaml``) and the workspace (``workspace.yaml``) ship inside
the package, so `up` works the same from a checkout, an editable install or a wheel: they
are written into ``DAGSTER_HOME`` and Dagster is started from there. The workspace names the
code location by module (``stream_sentinel.definitions``), never by a path into a checkout,
and no ``dagster.yaml`` sits in Dagster's working directory except the instance's own (a
stray one is ignored by Dagster with a warning on every start).

With ``STREAM_SENTINEL_DAGSTER_PG_URL`` set, the instance keeps its runs, event logs and
schedules on PostgreSQL (``dagster-postgres``, the ``postgres`` extra) instead of SQLite files
in ``DAGSTER_HOME``: ``prepare`` adds a ``storage: postgres`` block that names the variable,
so the URL and its password stay in the environment, never in a file.

Plain file handling: no Dagster import, like the rest of the library.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .atomic import write_bytes_atomic
from .config import Paths, SettingError

INSTANCE_FILE = "dagster.yaml"
WORKSPACE_FILE = "workspace.yaml"
PACKAGED = (INSTANCE_FILE, WORKSPACE_FILE)
PG_URL_ENV = "STREAM_SENTINEL_DAGSTER_PG_URL"
STORE_URL_ENV = "STREAM_SENTINEL_STORE_URL"  # the metrics store's (store.STORE_URL_ENV)
MAX_RUNS_ENV = "STREAM_SENTINEL_MAX_CONCURRENT_RUNS"
DEFAULT_MAX_RUNS = 4
FREE_SLOTS_AFTER_S = 30
# SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, and dagster-postgres (0.29) then fails
# on its `NOTIFY run_events, $1`; dagster-postgres is written for psycopg2, which it requires.
PG_SCHEME = "postgresql+psycopg2"
POSTGRES_STORAGE = f"""
# Added by stream-sentinel because {PG_URL_ENV} is set: runs, event logs and
# schedules on PostgreSQL. The URL (and its password) is read from the environment.
storage:
  postgres:
    postgres_url:
      env: {PG_URL_ENV}
""".encode()


def packaged(name: str) -> bytes:
    """A file shipped as package data next to this module (``dagster.yaml``, ``workspace.yaml``)."""
    if name not in PACKAGED:
        raise ValueError(f"{name!r} is not one of the packaged Dagster files {PACKAGED}")
    return resources.files(__package__).joinpath(name).read_bytes()


def pg_url(environ: os._Environ | dict | None = None) -> str | None:
    """The instance's PostgreSQL URL from ``STREAM_SENTINEL_DAGSTER_PG_URL``, or None (SQLite).

    Refused with a message naming the variable and the fix (never the URL: it may hold a
    password) unless it selects psycopg2 (``postgresql+psycopg2://``)."""
    url = (os.environ if environ is None else environ).get(PG_URL_ENV, "").strip()
    if not url:
        return None
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme != PG_SCHEME:
        raise SettingError(
            f"{PG_URL_ENV} must start with {PG_SCHEME}:// (it starts with {scheme or 'no scheme'!r}): "
            f"dagster-postgres needs the psycopg2 driver, and SQLAlchemy 2.1 picks psycopg 3 for "
            f"postgresql://, which fails on Dagster's run-event NOTIFY")
    return url


def instance_yaml(environ: os._Environ | dict | None = None) -> bytes:
    """The instance settings to write: the packaged ``dagster.yaml``, plus the PostgreSQL
    storage block when ``STREAM_SENTINEL_DAGSTER_PG_URL`` is set. When the metrics store is on
    PostgreSQL too (``STREAM_SENTINEL_STORE_URL``), runs no longer wait for one run slot: up to
    ``STREAM_SENTINEL_MAX_CONCURRENT_RUNS`` (default 4) run at once, and the assets that must
    have one writer (the index, training, erasure) are kept to one at a time by Dagster
    concurrency pools (``pool=`` on those assets; every pool's limit is 1)."""
    environ = os.environ if environ is None else environ
    data = packaged(INSTANCE_FILE)
    if not pg_url(environ):
        return data
    if not environ.get(STORE_URL_ENV, "").strip():
        return data + POSTGRES_STORAGE
    import yaml

    raw = environ.get(MAX_RUNS_ENV, "").strip() or str(DEFAULT_MAX_RUNS)
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise SettingError(f"{MAX_RUNS_ENV}={raw!r} is not a whole number of runs from 1 to 64")
    settings = yaml.safe_load(data)
    queue = settings.get("run_queue", {})
    queue.pop("max_concurrent_runs", None)  # Dagster refuses it beside `concurrency: runs`
    settings["concurrency"] = {"runs": {"max_concurrent_runs": int(raw)}, "pools": {"default_limit": 1}}
    # a run killed while its step held a pool's slot (failed afterwards by run_liveness_sensor)
    # would hold it forever, and every later step of that pool would wait: Dagster frees a
    # finished run's slots only when this is set (found by the chaos run: a training run stuck)
    settings["run_monitoring"]["free_slots_after_run_end_seconds"] = FREE_SLOTS_AFTER_S
    head = (f"# Written by stream-sentinel for the scale-out deployment ({PG_URL_ENV} and\n"
            f"# {STORE_URL_ENV} are set): the packaged dagster.yaml, with up to {raw} runs at once\n"
            f"# and one writer per concurrency pool. The packaged file explains each setting.\n")
    return head.encode() + yaml.safe_dump(settings, sort_keys=False).encode() + POSTGRES_STORAGE


def location(paths: Paths) -> Path:
    """``$DAGSTER_HOME`` when set, else ``<data root>/dagster``: one instance per data root."""
    return Path(os.environ.get("DAGSTER_HOME") or paths.home / "dagster").absolute()


def prepare(home: str | os.PathLike[str], environ: os._Environ | dict | None = None) -> Path:
    """Create the instance folder ``home`` with the packaged files in it, and return it (absolute,
    symlinks resolved: `up` starts `dagster dev` in this folder with ``DAGSTER_HOME`` set to
    it, and Dagster warns that "the dagster.yaml in the current folder will not be used"
    when its real working directory and ``DAGSTER_HOME`` differ, even by a symlink).

    The files are the product's settings (run queue of one, run monitoring, retries), so they
    are written again when the installed version differs: an upgrade takes effect at the next
    `up`. Atomic writes, so a Dagster process starting meanwhile never reads half a file.
    ``environ`` (default: this process's) decides the storage (see ``instance_yaml``); unset
    ``STREAM_SENTINEL_DAGSTER_PG_URL`` and the next `up` is back on SQLite."""
    home = Path(home).absolute()
    home.mkdir(parents=True, exist_ok=True)
    home = home.resolve()
    for name in PACKAGED:
        data, target = instance_yaml(environ) if name == INSTANCE_FILE else packaged(name), home / name
        if not target.is_file() or target.read_bytes() != data:
            write_bytes_atomic(target, data)
    return home
