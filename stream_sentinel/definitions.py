"""The code location: what `workspace.yaml` loads and what `stream-sentinel` runs.

This module and the CLI are the only parts of the package that import Dagster; the
rest of ``stream_sentinel`` is a plain library. Nothing heavy (torch, faiss) is
imported here, so the code location loads fast.
"""

from __future__ import annotations

import dagster as dg

from assets import all_assets, all_checks, all_jobs
from resources import EmbedderResource, StreamSentinelResource
from sensors import build_raw_files_sensor
from stream_sentinel.config import Settings


def build_definitions(settings: Settings | None = None, home: str | None = None) -> dg.Definitions:
    settings = settings or Settings.from_env()
    return dg.Definitions(
        assets=all_assets,
        asset_checks=all_checks,
        jobs=all_jobs,
        sensors=[build_raw_files_sensor(settings)],
        resources={
            "sentinel": StreamSentinelResource(home=home),
            "embedder": EmbedderResource(),
        },
        # micro-batches are small: one process per run, not one per step
        executor=dg.in_process_executor,
    )


defs = build_definitions()
