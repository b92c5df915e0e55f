"""Partitions shared by the ingest assets."""

from __future__ import annotations

import os

import dagster as dg

# Arrival day (UTC) of a file in raw/: a micro-batch lands in today's partition and a
# backfill re-processes whole days. end_offset=1 makes today a valid partition.
daily_arrivals = dg.DailyPartitionsDefinition(
    start_date=os.environ.get("STREAM_SENTINEL_START_DATE", "2024-01-01"),
    end_offset=1,
    timezone="UTC",
)
