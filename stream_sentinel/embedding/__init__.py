"""Text to vectors: the embedder, its encoders and backends, the embedding server."""
