"""The package as a user installs it: a wheel with only ``stream_sentinel`` at the top of
site-packages, that runs without the checkout.

The tests build the wheel from a copy of this checkout, and install it into a fresh virtual
environment. That environment gets its dependencies from the test's own environment through
a ``.pth`` file that lists its site-packages folders. A plain path line in a ``.pth`` adds
the folder only; the ``.pth`` files inside it are not run, so the editable install's finder
(which maps ``stream_sentinel`` onto this checkout) stays out. Every command runs from an
empty temporary folder, with no ``PYTHONPATH``, and the tests check that ``stream_sentinel``
was imported from the new environment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import httpx
import pytest

import stream_sentinel
from stream_sentinel import dagster_home
from stream_sentinel.devtools.kafka_broker import free_port

from .conftest import REPO

# the checkout's folders and the names they are installed under (pyproject.toml, package-dir)
INSTALLED_AS = {"stream_sentinel": "stream_sentinel", "assets": "stream_sentinel/assets",
                "sensors": "stream_sentinel/sensors", "resources": "stream_sentinel/resources"}
# what the copy of the checkout leaves out: state, caches and build output, never sources
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv*", ".stream_sentinel", "__pycache__", "*.pyc", "build", "dist",
                                     "*.egg-info", ".pytest_cache", "results")


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} exited {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built by pip with this environment's setuptools (no download, no isolation).

    Built from a copy of the checkout: a build in place would leave ``build/`` behind, whose
    stale files (a module since deleted) a later build would ship."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCES)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", tmp / "dist", src], cwd=tmp)
    wheels = list((tmp / "dist").glob("stream_sentinel-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> dict:
    """A fresh virtual environment with the wheel installed, and the environment to run in it."""
    tmp = tmp_path_factory.mktemp("venv")
    root = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=tmp)
    python = root / "bin" / "python"
    # pip of this environment, installing into the new one (pip >= 22.3); before the .pth below
    # exists, so pip sees no stream-sentinel installed there and installs the wheel's files
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp).stdout.strip())
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    assert deps, f"no site-packages folder on this interpreter's path: {sys.path}"
    (site / "_test_dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    cwd = tmp / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "DAGSTER_HOME")}
    env.update(PYTHONNOUSERSITE="1", STREAM_SENTINEL_HOME=str(tmp / "data"),
               PATH=f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return {"root": root, "python": python, "site": site, "cwd": cwd, "env": env}


def test_the_wheel_holds_only_stream_sentinel_and_every_source_file(wheel):
    """A wheel that put ``assets``, ``sensors`` or ``resources`` at the top would take those
    generic names in every environment it is installed in."""
    names = zipfile.ZipFile(wheel).namelist()
    version = wheel.name.split("-")[1]
    outside = [n for n in names if not n.startswith(("stream_sentinel/", f"stream_sentinel-{version}.dist-info/"))]
    assert outside == []
    # every module of the checkout's four folders, at its installed name (a sub-package left
    # out of pyproject.toml's list would be missing here), and the files `up` writes
    expected = {f"{INSTALLED_AS[folder]}/{p.relative_to(REPO / folder).as_posix()}"
                for folder in INSTALLED_AS for p in (REPO / folder).rglob("*.py")}
    expected |= {f"stream_sentinel/{name}" for name in dagster_home.PACKAGED}
    assert expected - set(names) == set()
    assert {"stream_sentinel/assets/__init__.py", "stream_sentinel/sensors/__init__.py",
            "stream_sentinel/resources/__init__.py"} <= set(names)


def test_the_installed_wheel_runs_without_the_checkout(venv):
    env, cwd = venv["env"], venv["cwd"]
    help_ = _run([venv["root"] / "bin" / "stream-sentinel", "--help"], cwd=cwd, env=env)
    assert "up" in help_.stdout and "run" in help_.stdout

    probe = """
import json, sys
import dagster as dg
import stream_sentinel, stream_sentinel.assets, stream_sentinel.sensors, stream_sentinel.resources
from stream_sentinel.definitions import defs as load
defs = load()
dg.Definitions.validate_loadable(defs)
print(json.dumps({"files": {m: sys.modules[m].__file__ for m in ("stream_sentinel", "stream_sentinel.assets",
                  "stream_sentinel.sensors", "stream_sentinel.resources", "stream_sentinel.definitions")},
                  "jobs": sorted(j.name for j in defs.resolve_all_job_defs())}))
"""
    out = json.loads(_run([venv["python"], "-c", probe], cwd=cwd, env=env).stdout.strip().splitlines()[-1])
    site = venv["site"].resolve()
    for module, file in out["files"].items():
        assert Path(file).resolve().is_relative_to(site), f"{module} imported from {file}, not from the wheel"
    assert {"ingest_job", "feedback_job", "training_job"} <= set(out["jobs"])


def test_up_s_dagster_home_comes_from_the_package_and_its_workspace_loads(venv, tmp_path):
    """What `stream-sentinel up` starts Dagster with, from the wheel: the packaged
    dagster.yaml and workspace.yaml written into DAGSTER_HOME, and the code location loaded
    through that workspace (by module name) by Dagster's own validation command."""
    env, cwd = venv["env"], venv["cwd"]
    home = tmp_path / "dagster_home"
    written = _run([venv["python"], "-c", "import sys\nfrom stream_sentinel import dagster_home as dh\n"
                    "print(dh.prepare(sys.argv[1]))", home], cwd=cwd, env=env).stdout.strip()
    assert Path(written) == home
    for name in dagster_home.PACKAGED:
        assert (home / name).read_bytes() == (REPO / "stream_sentinel" / name).read_bytes()
    assert "module_name: stream_sentinel.definitions" in (home / "workspace.yaml").read_text()
    validated = _run([venv["python"], "-m", "dagster", "definitions", "validate", "-w", home / "workspace.yaml"],
                     cwd=home, env={**env, "DAGSTER_HOME": str(home)})
    assert "stream_sentinel" in validated.stdout + validated.stderr


LOCATIONS_QUERY = ("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                   "locationOrLoadError { __typename ... on PythonError { message } } } } } }")


def _locations(port: int) -> list[dict]:
    body = json.dumps({"query": LOCATIONS_QUERY}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.load(resp)["data"]["workspaceOrError"]["locationEntries"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # not serving yet


@pytest.mark.daemon
def test_up_runs_from_the_wheel(venv, tmp_path):
    """`stream-sentinel up`, started from the installed wheel in a folder that is no checkout:
    the webserver serves the code location, loaded from the packaged workspace, and the HTTP API
    answers; SIGTERM stops the whole stack. (No demo feed, no compile: what is tested is that
    it starts.)"""
    port, api_port = free_port(), free_port()
    log_path = tmp_path / "up.log"
    env = {**venv["env"], "STREAM_SENTINEL_HOME": str(tmp_path / "data"), "STREAM_SENTINEL_EMBED_COMPILE": "0",
           "STREAM_SENTINEL_API_PORT": str(api_port)}
    with open(log_path, "w") as log:
        up = subprocess.Popen([str(venv["root"] / "bin" / "stream-sentinel"), "up", "--no-demo", "--port", str(port)],
                              cwd=venv["cwd"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, entries = time.monotonic() + 180, []
        while time.monotonic() < deadline and up.poll() is None:
            entries = _locations(port)
            if entries and entries[0]["loadStatus"] == "LOADED":
                break
            time.sleep(1)
        assert up.poll() is None, f"`up` exited with {up.returncode}:\n{log_path.read_text()[-3000:]}"
        assert [(e["name"], e["loadStatus"], e["locationOrLoadError"]["__typename"]) for e in entries] == \
            [("stream_sentinel", "LOADED", "RepositoryLocation")], f"{entries}\n{log_path.read_text()[-3000:]}"
        health = None
        while time.monotonic() < deadline and health is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=5).json()
            except httpx.TransportError:
                time.sleep(0.5)
        assert health is not None and health["status"] == "ok", log_path.read_text()[-3000:]
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()
    assert up.returncode == 0, log_path.read_text()[-3000:]
    dagster_home_folder = tmp_path / "data" / "dagster"
    assert {p.name for p in dagster_home_folder.iterdir()} >= set(dagster_home.PACKAGED)
    # Dagster starts in DAGSTER_HOME, so it finds no stray dagster.yaml in its working folder
    out = log_path.read_text()
    assert "Found a dagster instance configuration" not in out
    # Dagster's own output passes through `up`'s relay (the link to the UI), without the
    # BetaWarning every process that loaded the definitions used to print
    assert "Serving dagster-webserver on" in out and "BetaWarning" not in out, out[-3000:]
    assert f"API         http://127.0.0.1:{api_port}" in out


def test_the_editable_install_maps_the_folders_of_this_checkout():
    """The tests themselves run on the editable install: ``stream_sentinel.assets`` must be this
    checkout's ``assets/`` (an editable install of another checkout would mix two versions)."""
    import stream_sentinel.assets
    import stream_sentinel.resources
    import stream_sentinel.sensors

    for folder, module in (("stream_sentinel", stream_sentinel), ("assets", stream_sentinel.assets),
                           ("sensors", stream_sentinel.sensors), ("resources", stream_sentinel.resources)):
        assert Path(module.__file__).resolve() == (REPO / folder / "__init__.py").resolve()


def test_the_library_does_not_import_dagster():
    """Only the Dagster layer (assets, sensors, resources), definitions.py and cli.py may."""
    library = sorted(p.stem for p in (REPO / "stream_sentinel").glob("*.py")
                     if p.stem not in ("__init__", "definitions", "cli"))
    code = f"import sys\nfor m in {library!r}: __import__('stream_sentinel.' + m)\nprint('dagster' in sys.modules)"
    out = _run([sys.executable, "-c", code], cwd=REPO)
    assert out.stdout.strip() == "False"
