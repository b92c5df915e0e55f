"""Dagster concurrency pools: the writers that stay one at a time when runs overlap.

On the embedded default one run slot already runs everything in turn. In the scale-out
deployment (Dagster and the metrics store on PostgreSQL) several runs run at once, and the
instance gives every pool a limit of 1 (``concurrency: pools: default_limit``, written by
``dagster_home.instance_yaml``): runs of other kinds overlap, these steps queue instead of
waiting on a lock inside a run.
"""

POOL_INDEX = "stream_sentinel_index"  # publishes FAISS versions: vector_index, erasures (a rebuild without the record)
POOL_REGISTRY = "stream_sentinel_registry"  # trains, gates and promotes model versions: model, champion
