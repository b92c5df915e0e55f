"""Partitions shared by the ingest and drift assets."""

from __future__ import annotations

import dagster as dg

# The calendar the assets are declared with. It is a placeholder: `daily_arrivals(start)`
# makes the real one when the code location loads (its start is a setting, or the data
# root's first day), and `with_partitions_start` puts it on every daily asset. Reading the
# setting here, at import, would fix the start for every Definitions built in the process.
DECLARED_START = "2024-01-01"


def daily_arrivals(start: str = DECLARED_START) -> dg.DailyPartitionsDefinition:
    """Arrival day (UTC) of a file in raw/: a micro-batch lands in today's partition and a
    backfill re-processes whole days. end_offset=1 makes today a valid partition."""
    return dg.DailyPartitionsDefinition(start_date=start, end_offset=1, timezone="UTC")


declared_daily_arrivals = daily_arrivals()


def with_partitions_start(assets: list[dg.AssetsDefinition], start: str) -> list[dg.AssetsDefinition]:
    """The assets, their daily partitions starting on ``start`` (YYYY-MM-DD)."""
    daily = daily_arrivals(start)

    def restart(spec: dg.AssetSpec) -> dg.AssetSpec:
        if spec.partitions_def is None:
            return spec
        return spec.replace_attributes(partitions_def=daily)

    return [a.map_asset_specs(restart) for a in assets]
