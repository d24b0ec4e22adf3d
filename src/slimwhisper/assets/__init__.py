"""Files shipped with slimwhisper: English speech synthesised by this project, in two sets.

demo/         a few FLAC clips for the examples and quick checks;
calibration/  the default calibration set, more and more varied sentences and voices (OGG Vorbis).

Both are made by tools/make_demo_audio.py (offline TTS voices; its docstring says how to regenerate them),
each with a manifest.jsonl of {"id", "audio", "text", "lang", "duration", "voice"} rows, "audio" relative to
the manifest. `default_calibration_clips()` is all bundled audio: the calibration clips, then the demo clips.
"""
from __future__ import annotations

import json
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEMO_DIR = ASSETS_DIR / "demo"
CALIBRATION_DIR = ASSETS_DIR / "calibration"


def _manifest(folder: Path, what: str) -> Path:
    path = folder / "manifest.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the {what} clips were not installed with slimwhisper; reinstall the package, "
            "or regenerate them with tools/make_demo_audio.py"
        )
    return path


def _clips(manifest: Path) -> list[dict]:
    clips = []
    with open(manifest, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                row["audio"] = str((manifest.parent / row["audio"]).resolve())
                clips.append(row)
    return clips


def demo_manifest() -> Path:
    """Path of the bundled demo manifest (demo/manifest.jsonl)."""
    return _manifest(DEMO_DIR, "demo")


def demo_clips() -> list[dict]:
    """The demo manifest's rows, in order, each with "audio" made an absolute path (str)."""
    return _clips(demo_manifest())


def calibration_manifest() -> Path:
    """Path of the bundled calibration manifest (calibration/manifest.jsonl)."""
    return _manifest(CALIBRATION_DIR, "calibration")


def calibration_clips() -> list[dict]:
    """The calibration manifest's rows, in order, each with "audio" made an absolute path (str)."""
    return _clips(calibration_manifest())


def default_calibration_clips() -> list[dict]:
    """All bundled audio for calibration: the calibration clips followed by the demo clips."""
    return calibration_clips() + demo_clips()
