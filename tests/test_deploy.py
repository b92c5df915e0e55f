"""The Kubernetes deployment (deploy/kubernetes/), checked with what runs without a cluster:
the Dagster instance the Helm values make loads with the real K8sRunLauncher and PostgreSQL
storage, the code location the user deployment names validates, and every command and variable
of the manifests is one the product has."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from .conftest import REPO

DEPLOY = REPO / "deploy" / "kubernetes"


def _values() -> dict:
    return yaml.safe_load((DEPLOY / "values.yaml").read_text())


def _manifests() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "stream-sentinel.yaml").read_text()) if d]


def _instance_from_values(values: dict, namespace: str = "stream-sentinel") -> dict:
    """The instance settings the chart writes into its ConfigMap for these values (its
    configmap-instance template, for the parts the values set)."""
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    queue = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    pg = values["postgresql"]
    daemon = values["dagsterDaemon"]
    return {
        "scheduler": {"module": "dagster.core.scheduler", "class": "DagsterDaemonScheduler"},
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"max_concurrent_runs": queue["maxConcurrentRuns"],
                                       "dequeue_interval_seconds": queue["dequeueIntervalSeconds"]}},
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": {
            "load_incluster_config": launcher["loadInclusterConfig"],
            "job_namespace": namespace,
            "service_account_name": "dagster",
            "instance_config_map": "dagster-instance",
            "postgres_password_secret": "dagster-postgresql-secret",
            "dagster_home": "/opt/dagster/dagster_home",
            "image_pull_policy": "IfNotPresent",
            "env_config_maps": [m["name"] for m in launcher["envConfigMaps"]],
            "env_secrets": [s["name"] for s in launcher["envSecrets"]],
            "volumes": launcher["volumes"],
            "volume_mounts": launcher["volumeMounts"],
            "resources": launcher["resources"],
        }},
        "storage": {"postgres": {"postgres_db": {
            "username": pg["postgresqlUsername"], "password": {"env": "DAGSTER_PG_PASSWORD"},
            "hostname": pg["postgresqlHost"], "db_name": pg["postgresqlDatabase"], "port": pg["service"]["port"],
            "params": pg["postgresqlParams"]}}},
        "run_monitoring": {"enabled": daemon["runMonitoring"]["enabled"],
                           "start_timeout_seconds": daemon["runMonitoring"]["startTimeoutSeconds"],
                           "max_resume_run_attempts": daemon["runMonitoring"]["maxResumeRunAttempts"],
                           "poll_interval_seconds": daemon["runMonitoring"]["pollIntervalSeconds"],
                           "free_slots_after_run_end_seconds": daemon["runMonitoring"]["freeSlotsAfterRunEndSeconds"]},
        "run_retries": {"enabled": daemon["runRetries"]["enabled"], "max_retries": daemon["runRetries"]["maxRetries"]},
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
    }


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: not-a-secret}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def test_the_instance_of_the_helm_values_loads_with_the_k8s_run_launcher(tmp_path, pg_database, monkeypatch):
    """The run launcher's settings are checked by dagster-k8s's own schema and the launcher is
    built (against a kubeconfig, as no cluster runs here); the storage settings make a URL; the run
    queue lets runs overlap; runs get the data volume, the configuration and the secret."""
    from dagster_k8s import K8sRunLauncher
    from dagster_postgres.utils import get_conn_string

    values = _values()
    settings = _instance_from_values(values)
    storage = settings["storage"]["postgres"]["postgres_db"]
    url = get_conn_string(storage["username"], "pw", storage["hostname"], storage["db_name"], str(storage["port"]))
    assert url == "postgresql://dagster:pw@postgres.stream-sentinel.svc.cluster.local:5432/dagster"
    # here: the test server instead of the cluster's, a kubeconfig instead of the in-cluster account
    settings["storage"] = {"postgres": {"postgres_url": {"env": "TEST_PG_URL"}}}
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    settings["run_launcher"]["config"].update(load_incluster_config=False, kubeconfig_file=str(tmp_path / "kubeconfig"))
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("TEST_PG_URL", pg_database)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, K8sRunLauncher)
        assert launcher.job_namespace == "stream-sentinel"
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 8
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 30
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    launcher_values = values["runLauncher"]["config"]["k8sRunLauncher"]
    user = values["dagster-user-deployments"]["deployments"][0]
    # a run sees what the code location sees: the same configuration, secret and data volume
    for key in ("envConfigMaps", "envSecrets", "volumes", "volumeMounts"):
        assert launcher_values[key] == user[key], key
    assert user["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]


def test_the_code_location_of_the_user_deployment_validates(tmp_path):
    args = _values()["dagster-user-deployments"]["deployments"][0]["dagsterApiGrpcArgs"]
    assert args[:2] == ["--module-name", "stream_sentinel.definitions"]
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "STREAM_SENTINEL_HOME": str(tmp_path / "data")}
    out = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", *args], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_every_command_and_variable_of_the_manifests_is_the_products():
    """The containers run real subcommands with arguments the CLI accepts; every variable set in
    the manifests is documented; the API listens beyond the pod only with a token; the embedding
    service listens on TCP and its clients are told where."""
    from stream_sentinel.cli import build_parser

    docs = _manifests()
    kinds = [d["kind"] for d in docs]
    assert kinds.count("Deployment") == 2 and {"ConfigMap", "Secret", "PersistentVolumeClaim", "Service",
                                                 "NetworkPolicy"} <= set(kinds)
    parser = build_parser()
    commands = {}
    for d in docs:
        if d["kind"] == "Deployment":
            (container,) = d["spec"]["template"]["spec"]["containers"]
            assert container["args"][0] == "stream-sentinel"
            parser.parse_args(container["args"][1:])  # SystemExit on an unknown argument
            commands[container["args"][1]] = container["args"]
    assert set(commands) == {"serve", "embed-server"}
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    secret = next(d for d in docs if d["kind"] == "Secret")["stringData"]
    readme = (REPO / "README.md").read_text()
    for name in [*config, *secret]:
        assert f"`{name}`" in readme, f"{name} is set in the manifests but not documented in the README"
    assert "STREAM_SENTINEL_API_TOKEN" in secret and "0.0.0.0" in commands["serve"]
    listen = commands["embed-server"][commands["embed-server"].index("--socket") + 1]
    assert listen.startswith("tcp://0.0.0.0:") and config["STREAM_SENTINEL_EMBED_SERVER"].endswith(
        ":" + listen.rsplit(":", 1)[1])
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_image_installs_what_the_runs_need():
    text = (DEPLOY / "Dockerfile").read_text()
    extra = re.search(r"'\.\[(\w+)\]'", text).group(1)
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("dagster-k8s") for d in extras[extra])
    assert "stream-sentinel[postgres]" in extras[extra]
    for folder in ("stream_sentinel", "assets", "sensors", "resources"):
        assert f"COPY {folder} ./{folder}" in text
    assert Path(REPO / "constraints.txt").read_text().count("dagster-k8s==") == 1


@pytest.mark.parametrize("name", ["values.yaml", "stream-sentinel.yaml"])
def test_no_real_secret_is_committed(name):
    text = (DEPLOY / name).read_text()
    assert "CHANGE-ME" in text or name == "values.yaml"
    assert not re.search(r"postgresqlPassword:\s*\S", text)
