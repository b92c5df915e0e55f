"""The settings as typed, visible resource config.

Each tunable is declared once, in the library (``config.setting``: default, variable, help,
section). This module turns a section into a ``dg.Config`` class, so the resource page and
the launchpad show every field with its type, its allowed values and its variable, and a
run can set any of them.

Why the defaults are rewritten when the code location loads (``with_defaults``): Dagster
replaces a resource's configured values with the run config as a whole (a run that sets one
field would fall back to the class defaults for every other field, the data root included).
Making the environment's values the *schema defaults* lets a run change one field and keep
the rest, and shows the effective values in the UI. ``dg.EnvVar`` is not used for these
fields: Dagster resolves it to strings and integers only (there is no float source), and it
would hide the value behind the variable's name; secrets (the Kafka resource) do use it.
"""

from __future__ import annotations

from typing import Any, Mapping

import dagster as dg
from pydantic import Field, create_model

from stream_sentinel.config import Settings, setting_fields
from stream_sentinel.drift import DriftConfig


def section(name: str, doc: str, settings_cls: type, group: str) -> type[dg.Config]:
    """A config class with the fields of one settings section, defaults as declared."""
    fields = {f.name: (tp, Field(default=f.default, description=f"{f.metadata['help']} (${f.metadata['env']})"))
              for f, tp in setting_fields(settings_cls) if f.metadata["group"] == group}
    return create_model(name, __base__=dg.Config, __doc__=doc, __module__=__name__, **fields)


def described(settings_cls: type, name: str, **kw: Any):
    """A pydantic ``Field`` for one declared setting: its default, bounds and description (with the variable)."""
    (f,) = [f for f, _ in setting_fields(settings_cls) if f.name == name]
    low, high = f.metadata["low"], f.metadata["high"]
    bounds = {k: v for k, v in (("ge", low), ("le", high)) if v is not None}
    return Field(default=f.default, description=f"{f.metadata['help']} (${f.metadata['env']})", **bounds, **kw)


def section_values(obj: Any, group: str) -> dict[str, Any]:
    """The values of one section of a settings object, as configured."""
    return {f.name: getattr(obj, f.name) for f, _ in setting_fields(type(obj)) if f.metadata["group"] == group}


def with_defaults(cls: type[dg.Config], values: Mapping[str, Any]) -> type:
    """A subclass of ``cls`` whose defaults are ``values`` (nested sections: nested mappings)."""
    fields: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if name not in values:
            continue
        value = values[name]
        if isinstance(value, Mapping):
            sub = with_defaults(info.annotation, value)
            fields[name] = (sub, Field(default_factory=sub, description=info.description))
        else:
            fields[name] = (info.annotation, Field(default=value, description=info.description))
    return create_model(cls.__name__, __base__=cls, __doc__=cls.__doc__, __module__=cls.__module__, **fields)


IngestSettings = section("IngestSettings", "How files become micro-batches.", Settings, "ingest")
IndexSettings = section("IndexSettings", "The FAISS index versions.", Settings, "index")
FeedbackSettings = section("FeedbackSettings", "Label feedback, the label names and consensus.", Settings,
                           "feedback")
LearningSettings = section("LearningSettings", "Training, the promotion gate and rollback.", Settings, "learning")
ABSettings = section("ABSettings", "A/B tests between champion and challenger.", Settings, "ab")
RetrySettings = section("RetrySettings", "Retries of failed batches, ranges and feedback files.", Settings,
                        "retry")
ServingSettings = section("ServingSettings", "The HTTP API (`stream-sentinel serve`) and links to it.", Settings,
                          "serving")
DriftSettings = section("DriftSettings", "How drift reports judge a window.", DriftConfig, "drift")

# resource field -> settings section (the order they show in the UI)
SENTINEL_SECTIONS = {"ingest": "ingest", "index": "index", "feedback": "feedback", "learning": "learning",
                     "ab": "ab", "retry": "retry", "serving": "serving"}
