"""Right to erasure: a record removed from every place the loop copied it, the models trained on
it withdrawn and retrained, and an audit row that proves it without keeping the id.

keys      the keyed hash that names an erased id (never the id itself)
requests  the drop folder of erasure requests (what the CLI, the API and a sensor share)
files     removing a record from files: raw and quarantined record files, feedback and
          prediction logs
compact   rewriting the DuckDB file so deleted rows leave no bytes behind
operation the erasure itself: plan, remove, taint, withdraw, audit
"""
