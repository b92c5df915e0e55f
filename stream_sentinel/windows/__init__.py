"""Stream windows: declared aggregates per key over event time, as model features.

``spec`` reads the declarations (``<data root>/windows.yaml``), ``compute`` says what a
record's window holds and aggregates it (pure, vectorized over keys), ``state`` keeps the
values up to date per micro-batch in DuckDB and explains one.
"""
