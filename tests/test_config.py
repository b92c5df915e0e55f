"""Configuration you can see: every setting is a typed field of a Dagster resource, its
default is what the environment says when the code location loads, a bad value stops the
load with the variable's name, and a run can change one field and keep the others."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from stream_sentinel.config import SettingError, Settings, setting_fields
from stream_sentinel.definitions import build_definitions
from stream_sentinel.drift import DriftConfig
from stream_sentinel.resources import StreamSentinelResource

README = Path(__file__).resolve().parents[1] / "README.md"


def _schema(resource) -> dict:
    """The resource's config fields as Dagster (and so the resource page and launchpad) sees them."""
    fields = resource.get_resource_definition().config_schema.as_field().config_type.fields
    return {name: f for name, f in fields.items()}


def _defaults(resource) -> dict:
    out = {}
    for name, f in _schema(resource).items():
        out[name] = f.default_value if f.default_provided else None
    return out


@pytest.mark.parametrize("var,value,says", [
    ("STREAM_SENTINEL_PROMOTION_METRIC", "auc", "not one of roc_auc, f1, log_loss"),
    ("STREAM_SENTINEL_AB_ROUTING", "random", "not one of hash, thompson"),
    ("STREAM_SENTINEL_EMBED_PRECISION", "fp16", "not one of auto, fp32, bf16"),
    ("STREAM_SENTINEL_BATCH_MAX_FILES", "ten", "not an integer"),
    ("STREAM_SENTINEL_VALID_SHARE", "1.5", "between 0 and 0.9"),
    ("STREAM_SENTINEL_EMBED_COMPILE", "maybe", "not a boolean"),
    ("STREAM_SENTINEL_LABELS", "a,b,c", "exactly two labels"),
    ("STREAM_SENTINEL_RELIABILITY_PRIOR", "2", "two positive numbers"),
    ("STREAM_SENTINEL_PARTITIONS_START", "2025-13-01", "YYYY-MM-DD"),
    ("STREAM_SENTINEL_DRIFT_EMBEDDING_METHOD", "umap", "not one of distance, model, mmd, ratio"),
    ("STREAM_SENTINEL_DRIFT_SHARE", "-1", "between 0 and 1"),
])
def test_a_bad_value_stops_the_load_naming_the_variable(paths, monkeypatch, var, value, says):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingError, match=re.escape(var)) as err:
        build_definitions(home=str(paths.home))
    assert says in str(err.value)


def test_importing_the_code_location_reads_no_environment(tmp_path):
    """A broken variable does not break `import stream_sentinel.definitions`; it fails when
    Dagster loads the definitions (``defs()``), with the variable's name."""
    code = ("import stream_sentinel.definitions as d\nprint('imported')\n"
            "try:\n    d.defs()\nexcept ValueError as e:\n    print('load:', e)\n")
    env = {**os.environ, "STREAM_SENTINEL_HOME": str(tmp_path), "STREAM_SENTINEL_PROMOTION_MARGIN": "lots"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "imported" in out
    assert "load: STREAM_SENTINEL_PROMOTION_MARGIN='lots' is not a number" in out


def test_every_setting_is_a_field_of_a_resource_with_the_environment_as_default(paths, monkeypatch):
    monkeypatch.setenv("STREAM_SENTINEL_PROMOTION_MARGIN", "0.03")
    monkeypatch.setenv("STREAM_SENTINEL_LABELS", "routine,urgent")
    monkeypatch.setenv("STREAM_SENTINEL_DRIFT_NUM_METHOD", "psi")
    monkeypatch.setenv("STREAM_SENTINEL_EMBED_BATCH_SIZE", "8")
    defs = build_definitions(home=str(paths.home))
    sentinel, embedder = defs.resources["sentinel"], defs.resources["embedder"]
    top = _defaults(sentinel)
    assert top["home"] == str(paths.home)
    assert top["learning"]["promotion_margin"] == 0.03
    assert top["feedback"]["labels"] == "routine,urgent"
    assert top["drift"]["num_method"] == "psi"
    assert _defaults(embedder)["batch_size"] == 8
    # every setting a run uses is in some section, and each field's description names its variable
    shown = {name for section in top.values() if isinstance(section, dict) for name in section}
    for cls in (Settings, DriftConfig):
        for f, _ in setting_fields(cls):
            group = f.metadata["group"]
            if group is None:
                continue  # read at load (sensor interval, calendar)
            if group == "embedding":
                continue  # fields of the embedder resource, checked below
            assert f.name in shown, f"{f.name} ({f.metadata['env']}) is not a resource field"
            described = _schema(sentinel)[group].config_type.fields[f.name].description
            assert f.metadata["env"] in described
    # the embedder's fields are the embedding settings, declared once
    fields = _schema(embedder)
    for name, setting_name in [("model_path", "model_path"), ("device", "device"), ("batch_size", "embed_batch_size"),
                               ("precision", "embed_precision"), ("backend", "embed_backend")]:
        (f,) = [f for f, _ in setting_fields(Settings) if f.name == setting_name]
        assert f.metadata["env"] in fields[name].description, name
    assert {v.config_value for v in fields["backend"].config_type.enum_values} == {"torch", "onnx", "onnx-int8"}
    assert _defaults(embedder)["derived_dir"] == str(paths.embedding_models)
    assert _defaults(embedder)["server_socket"] == str(paths.embed_socket)
    # allowed values are part of the schema (the launchpad refuses others before a run starts)
    metric = _schema(sentinel)["learning"].config_type.fields["promotion_metric"].config_type
    assert {v.config_value for v in metric.enum_values} == {"roc_auc", "f1", "log_loss"}


def _probe_job(resource):
    seen = {}

    @dg.op
    def probe(sentinel: StreamSentinelResource):
        seen.update(home=str(sentinel.paths.home), margin=sentinel.settings.promotion_margin,
                    metric=sentinel.settings.promotion_metric, batch=sentinel.settings.batch_max_files,
                    positive=sentinel.settings.positive_label, negative=sentinel.settings.negative_label)

    @dg.job(resource_defs={"sentinel": resource})
    def probe_job():
        probe()

    return probe_job, seen


def test_a_run_sets_one_field_and_keeps_the_others(paths, monkeypatch):
    monkeypatch.setenv("STREAM_SENTINEL_BATCH_MAX_FILES", "7")
    job, seen = _probe_job(StreamSentinelResource.from_env(home=str(paths.home)))
    override = {"resources": {"sentinel": {"config": {"learning": {"promotion_margin": 0.2},
                                                      "feedback": {"labels": "a,b"}}}}}
    assert job.execute_in_process(run_config=override).success
    # the data root and the environment's batch size stay; the run's values apply;
    # the label pair follows the run's labels
    assert seen == {"home": str(paths.home), "margin": 0.2, "metric": "roc_auc", "batch": 7,
                    "positive": "b", "negative": "a"}


def test_a_bad_value_for_one_run_fails_that_run_naming_the_variable(paths):
    job, seen = _probe_job(StreamSentinelResource.from_env(home=str(paths.home)))
    result = job.execute_in_process(raise_on_error=False, run_config={
        "resources": {"sentinel": {"config": {"learning": {"valid_share": 0.5, "golden_share": 0.6}}}}})
    assert not result.success and not seen
    text = " ".join(str(e.message) + str(getattr(e, "event_specific_data", "")) for e in result.all_events)
    assert "STREAM_SENTINEL_VALID_SHARE" in text and "nothing would be left to train on" in text
    with pytest.raises(dg.DagsterInvalidConfigError, match="promotion_metric"):
        job.execute_in_process(run_config={"resources": {"sentinel": {"config": {
            "learning": {"promotion_metric": "accuracy"}}}}})


def test_every_variable_is_in_the_readme():
    """In full (`STREAM_SENTINEL_X`) or as the README's shorthand after a full name (`_X`)."""
    tokens = set(re.findall(r"`([A-Z_]+)`", README.read_text()))
    names = [f.metadata["env"] for cls in (Settings, DriftConfig) for f, _ in setting_fields(cls)]
    missing = [var for var in names if not any(var == t or (t.startswith("_") and var.endswith(t)) for t in tokens)]
    assert not missing, f"not documented in README.md: {missing}"


def test_the_cli_refuses_a_bad_value_with_the_variable_and_exit_2(tmp_path):
    env = {**os.environ, "STREAM_SENTINEL_HOME": str(tmp_path), "STREAM_SENTINEL_RETRAIN_GROWTH": "-0.5"}
    proc = subprocess.run([sys.executable, "-m", "stream_sentinel.cli", "run", "--once"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "STREAM_SENTINEL_RETRAIN_GROWTH (retrain_growth) = -0.5 must be at least 0" in proc.stderr
    assert "Traceback" not in proc.stderr
