"""The one strict pydantic base of the project's configuration models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys.

    Settings, the rules file, the pipeline catalog and the model registry are written by
    hand; a misspelt key must stop the start with its name instead of being ignored.
    """

    model_config = ConfigDict(extra="forbid")
