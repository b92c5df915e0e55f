"""Development tooling, apart from runtime code: the local Kafka broker, the demo corpus."""
