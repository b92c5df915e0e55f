"""Dagster assets, checks and jobs: thin wrappers over the stream_sentinel library."""

from .checks import checks_job, index_checks
from .ingest import embeddings, ingest_job, raw_records, vector_index
from .partitions import daily_arrivals

all_assets = [raw_records, embeddings, vector_index]
all_checks = [*index_checks]
all_jobs = [ingest_job, checks_job]

__all__ = ["all_assets", "all_checks", "all_jobs", "daily_arrivals", "ingest_job"]
