"""What every compression recipe (`MLAConfig`, `LowRankConfig`) shares: JSON round trip, version check.

Recipes are frozen dataclasses; tuples become JSON lists and back. Unknown fields mean the recipe was
written by another slimwhisper version, which is an error rather than something to ignore.
"""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar

from .errors import ConfigVersionError


class Recipe:
    """Mixin for frozen dataclass recipes: `to_dict` / `from_dict` with strict field checking."""

    recipe_name: ClassVar[str] = "recipe"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigVersionError(
                f"{cls.recipe_name} has unknown fields {sorted(unknown)}; it was written by another slimwhisper version"
            )
        return cls(**cls._prepare({k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}))

    @classmethod
    def _prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Hook to drop derived fields before construction."""
        return data
