"""served_predictions: the API's prediction log, loaded into DuckDB exactly once."""

import dagster as dg

from stream_sentinel import served
from stream_sentinel.resources import StreamSentinelResource


@dg.asset(
    group_name="serving",
    kinds={"duckdb"},
    description="Every answer `stream-sentinel serve` gave (POST /v1/predict): the served one and the other "
    "model's shadow answer, from the append-only log in served/ (whole lines only, each once; a line that "
    "is not a valid answer is kept in `served_rejects`). A/B arms and live accuracy count this traffic; "
    "feedback for an id joins by that id.",
)
def served_predictions(context: dg.AssetExecutionContext, sentinel: StreamSentinelResource) -> dg.MaterializeResult:
    store = sentinel.store()
    counts = served.ingest(sentinel.paths.home, store)
    if counts["rejected"]:
        context.log.warning(f"{counts['rejected']} line(s) of the prediction log are not valid answers; kept in "
                            "served_rejects with the rule each broke")
    context.log.info(f"served predictions: {counts['loaded']} loaded from {counts['files']} file(s)")
    with store.connect() as con:
        total = con.execute("SELECT count(*) FROM served_predictions").fetchall()[0][0]
    return dg.MaterializeResult(metadata={**counts, "dagster/row_count": total},
                                data_version=dg.DataVersion(str(total)))


served_job = dg.define_asset_job("served_job", selection=dg.AssetSelection.assets(served_predictions),
                                 description="Load the API's new prediction log lines into served_predictions.")
