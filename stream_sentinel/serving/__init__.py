"""The HTTP API: what the loop learns, for applications (``stream-sentinel serve``).

``app`` builds the ASGI application (Starlette, which the Dagster webserver already brings,
served by uvicorn). The request path never writes DuckDB: records and feedback become files
(or Kafka messages) that the sensors ingest, exactly as if they had been dropped by hand.
"""

from .app import create_app

__all__ = ["create_app"]
