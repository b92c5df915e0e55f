"""Kafka connection settings as a resource. Secrets arrive through dg.EnvVar (set up in
the definitions) and are never logged; without KAFKA_BOOTSTRAP_SERVERS the resource
reports itself unconfigured and feedback comes from the drop folder instead."""

from __future__ import annotations

import os
from typing import Optional

import dagster as dg
from pydantic import PrivateAttr

from stream_sentinel.kafka import ENV_VARS, KafkaSettings


class KafkaResource(dg.ConfigurableResource):
    bootstrap_servers: Optional[str] = None  # default: $KAFKA_BOOTSTRAP_SERVERS
    security_protocol: Optional[str] = None
    sasl_mechanism: Optional[str] = None
    sasl_username: Optional[str] = None
    sasl_password: Optional[str] = None
    ssl_ca_location: Optional[str] = None

    _settings: Optional[KafkaSettings] = PrivateAttr(default=None)

    @classmethod
    def from_env(cls) -> "KafkaResource":
        """Kafka settings by reference: the UI shows the variable names, the values (a password)
        stay in the environment and are resolved in the run. Only variables that are set are
        referenced (an unset ``dg.EnvVar`` fails the run)."""
        refs = {field: dg.EnvVar(var) for field, var in ENV_VARS.items() if os.environ.get(var)}
        return cls(**refs)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        env = KafkaSettings.from_env()
        servers = self.bootstrap_servers or (env.bootstrap_servers if env else None)
        if not servers:
            self._settings = None
            return
        pick = lambda mine, name: mine if mine is not None else (getattr(env, name) if env else None)  # noqa: E731
        self._settings = KafkaSettings(
            servers, pick(self.security_protocol, "security_protocol"), pick(self.sasl_mechanism, "sasl_mechanism"),
            pick(self.sasl_username, "sasl_username"), pick(self.sasl_password, "sasl_password"),
            pick(self.ssl_ca_location, "ssl_ca_location"))

    @property
    def configured(self) -> bool:
        return self._settings is not None

    @property
    def settings(self) -> KafkaSettings:
        if self._settings is None:
            raise dg.Failure("Kafka is not configured: set KAFKA_BOOTSTRAP_SERVERS (feedback falls back to "
                             "the feedback/ drop folder without it)")
        return self._settings
