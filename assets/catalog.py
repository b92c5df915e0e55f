"""What the asset catalog shows beside the graph: owners, tags, code versions, the DuckDB
table behind each table-like asset and its columns, and the daily partitions' start.

Applied in one place (``catalog``, called by ``build_definitions``) rather than on each
decorator: the column lists come from the DDL in ``stream_sentinel.store`` (so they cannot
drift from it), and the partitions' start is only known when the code location loads.
"""

from __future__ import annotations

import dagster as dg

from stream_sentinel.store import table_columns

from .partitions import with_partitions_start

# Who answers for an asset (the catalog's owner filter). One team owns the whole graph.
OWNERS = ["team:stream-sentinel"]

# The DuckDB table each table-like asset writes: its column schema is shown before the first
# materialization, and `dagster/row_count` is reported by each materialization.
TABLES = {
    "raw_records": "records",
    "window_features": "window_features",
    "embeddings": "embeddings",
    "feedback": "feedback_events",
    "labels": "labels",
    "training_set": "training_set_rows",
    "predictions": "predictions",
}

# Where the asset's output depends on rules in code, not only on its inputs' data versions:
# bump one when its rule changes, and the catalog marks the asset and what follows stale
# (changed code version) until it is materialized again.
CODE_VERSIONS = {
    "labels": "consensus-1",  # weighted vote, reliability prior, decay (stream_sentinel.feedback)
    "training_set": "split-1",  # train / time-based valid / fixed golden (stream_sentinel.learning.models)
    "window_features": "windows-1",  # what a window holds, ties, lateness (stream_sentinel.windows.compute)
}


def table_schema(table: str) -> dg.TableSchema:
    return dg.TableSchema(columns=[
        dg.TableColumn(name, dtype, description=note or None,
                       constraints=None if nullable else dg.TableColumnConstraints(nullable=False))
        for name, dtype, nullable, note in table_columns(table)])


def _describe(spec: dg.AssetSpec) -> dg.AssetSpec:
    name = spec.key.to_user_string()
    metadata, tags = dict(spec.metadata), dict(spec.tags)
    table = TABLES.get(name)
    if table:
        metadata.update({"dagster/column_schema": table_schema(table), "dagster/table_name": f"metrics.main.{table}"})
        tags["table"] = table
    return spec.replace_attributes(metadata=metadata, tags=tags, owners=[*spec.owners, *OWNERS],
                                   code_version=CODE_VERSIONS.get(name, spec.code_version))


def catalog(assets: list[dg.AssetsDefinition], partitions_start: str) -> list[dg.AssetsDefinition]:
    """The assets as the code location shows them (see the module docstring)."""
    return [a.map_asset_specs(_describe) for a in with_partitions_start(assets, partitions_start)]
