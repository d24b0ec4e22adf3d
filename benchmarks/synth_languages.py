"""Synthetic speech in other languages for label-free recovery of a multilingual model.

Recovery trains on the original model's own transcripts, so untranscribed speech in a language teaches
the compressed model that language as well as transcribed speech does. Without a dataset hub, this makes
it offline: sentences of frequent words of each language (the `wordfreq` package's lists, drawn with
weights that favour common words, so function words recur as in speech) spoken by espeak-ng in several
voice variants and speeds. The words do not form grammatical sentences; what the decoder learns is the
language's sounds and spelling, and the original's behaviour on them. Output: OUT/audio/<id>.flac (16 kHz
mono) and OUT/manifest.jsonl with {id, audio, text, lang, duration, voice}; a rerun skips finished clips.

Needs `pip install wordfreq` and espeak-ng (`apt-get install espeak-ng`).

    python benchmarks/synth_languages.py --languages de fr es pt --count 120 --out ~/.cache/sw-data/synth-multi
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

VARIANTS = ("", "+f2", "+m3", "+f4")  # espeak-ng voice variants: the default male, two female, another male
SPEEDS = (135, 160, 185)  # words per minute (espeak-ng's default is 175)


def sentences(language: str, count: int, seed: int, vocabulary: int = 5000) -> list[str]:
    """`count` sentences of 6-14 words drawn from the language's `vocabulary` most frequent words."""
    from wordfreq import top_n_list, word_frequency

    words = [w for w in top_n_list(language, vocabulary) if w.isalpha()]
    weights = [word_frequency(w, language) ** 0.6 for w in words]
    rng = random.Random(f"{language}-{seed}")
    out = []
    for _ in range(count):
        text = " ".join(rng.choices(words, weights=weights, k=rng.randint(6, 14)))
        out.append(text[0].upper() + text[1:] + ".")
    return out


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng's audio of `text` as 16 kHz float32."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", tmp.name, text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        audio, rate = sf.read(tmp.name, dtype="float32")
    return soxr.resample(audio, rate, 16000).astype(np.float32) if rate != 16000 else audio


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--languages", nargs="+", required=True, help="espeak-ng and wordfreq language codes (de fr ...)")
    p.add_argument("--count", type=int, default=120, help="clips per language (default 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    try:
        import wordfreq  # noqa: F401
    except ImportError:
        sys.exit("this script needs the wordfreq package: pip install wordfreq")
    if shutil.which("espeak-ng") is None:
        sys.exit("this script needs espeak-ng: apt-get install espeak-ng")
    out = Path(args.out).expanduser()
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for language in args.languages:
        for i, text in enumerate(sentences(language, args.count, args.seed)):
            voice, speed = language + VARIANTS[i % len(VARIANTS)], SPEEDS[(i // len(VARIANTS)) % len(SPEEDS)]
            uid = f"synth-{language}-{i:05d}"
            path = out / "audio" / f"{uid}.flac"
            if not path.is_file():
                audio = speak(text, voice, speed)
                tmp = path.with_suffix(".tmp.flac")
                sf.write(tmp, audio, 16000)
                os.replace(tmp, path)  # a killed run never leaves half a clip
            rows.append({"id": uid, "audio": f"audio/{uid}.flac", "text": text, "lang": language,
                         "duration": round(sf.info(path).duration, 3), "voice": f"espeak:{voice}@{speed}"})
        print(f"{language}: {args.count} clips", file=sys.stderr)
    tmp = out / "manifest.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out / "manifest.jsonl")
    print(f"wrote {len(rows)} clips to {out / 'manifest.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
