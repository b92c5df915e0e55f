"""The Dagster instance folder (``DAGSTER_HOME``) that `stream-sentinel up` runs with.

The instance settings (``dagster.yaml``) and the workspace (``workspace.yaml``) ship inside
the package, so `up` works the same from a checkout, an editable install or a wheel: they
are written into ``DAGSTER_HOME`` and Dagster is started from there. The workspace names the
code location by module (``stream_sentinel.definitions``), never by a path into a checkout,
and no ``dagster.yaml`` sits in Dagster's working directory except the instance's own (a
stray one is ignored by Dagster with a warning on every start).

Plain file handling: no Dagster import, like the rest of the library.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .atomic import write_bytes_atomic
from .config import Paths

INSTANCE_FILE = "dagster.yaml"
WORKSPACE_FILE = "workspace.yaml"
PACKAGED = (INSTANCE_FILE, WORKSPACE_FILE)


def packaged(name: str) -> bytes:
    """A file shipped as package data next to this module (``dagster.yaml``, ``workspace.yaml``)."""
    if name not in PACKAGED:
        raise ValueError(f"{name!r} is not one of the packaged Dagster files {PACKAGED}")
    return resources.files(__package__).joinpath(name).read_bytes()


def location(paths: Paths) -> Path:
    """``$DAGSTER_HOME`` when set, else ``<data root>/dagster``: one instance per data root."""
    return Path(os.environ.get("DAGSTER_HOME") or paths.home / "dagster").absolute()


def prepare(home: str | os.PathLike[str]) -> Path:
    """Create the instance folder ``home`` with the packaged files in it, and return it (absolute,
    symlinks resolved: `up` starts `dagster dev` in this folder with ``DAGSTER_HOME`` set to
    it, and Dagster warns that "the dagster.yaml in the current folder will not be used"
    when its real working directory and ``DAGSTER_HOME`` differ, even by a symlink).

    The files are the product's settings (run queue of one, run monitoring, retries), so they
    are written again when the installed version differs: an upgrade takes effect at the next
    `up`. Atomic writes, so a Dagster process starting meanwhile never reads half a file."""
    home = Path(home).absolute()
    home.mkdir(parents=True, exist_ok=True)
    home = home.resolve()
    for name in PACKAGED:
        data, target = packaged(name), home / name
        if not target.is_file() or target.read_bytes() != data:
            write_bytes_atomic(target, data)
    return home
