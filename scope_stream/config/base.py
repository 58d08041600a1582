"""Base class for every configuration section: unknown keys are errors, values are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A configuration section. Unknown keys are rejected so that typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
