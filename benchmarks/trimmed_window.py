"""WER when the encoder runs on a window trimmed to the audio instead of Whisper's fixed 30 s, no training.

Whisper encodes 1500 frames (30 s) for any clip, so a 5-s clip pays for six times the audio it has. This
script measures what cutting that window costs in accuracy before any recovery: per clip, the encoder runs
on the frames that hold the audio plus a margin (rounded up to 8 frames, at most 1500), and the engine's
greedy decoder transcribes from those frames. The first row (no margin given) is the full window.

    python benchmarks/trimmed_window.py --model tiny.en --data ../shared/data/realspeech/manifest.jsonl \
        --language en --margins 2 1 --out benchmarks/results/trimmed-window-tiny-en
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch.nn import functional as F

import slimwhisper as sw
from slimwhisper.audio import load_audio
from slimwhisper.bench.common import run_metadata, write_result
from slimwhisper.data.readers import read_jsonl
from slimwhisper.engine.decode import DecoderRunner, greedy_transcripts
from slimwhisper.eval.metrics import corpus_wer

FRAME_SECONDS = 0.02  # one encoder position: two 10-ms mel frames
GRANULE = 8


def window_frames(seconds: float, margin: float | None, full: int) -> int:
    """Encoder positions for a clip of `seconds` with `margin` seconds to spare (None: the full window)."""
    if margin is None:
        return full
    return min(full, GRANULE * math.ceil(math.ceil((seconds + margin) / FRAME_SECONDS) / GRANULE))


@torch.no_grad()
def encode_window(encoder: torch.nn.Module, features: torch.Tensor, frames: int) -> torch.Tensor:
    """The Whisper encoder's forward on the first `frames` positions (the stock forward insists on 1500)."""
    x = F.gelu(encoder.conv1(features[..., : 2 * frames]))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    for layer in encoder.layers:
        out = layer(x, attention_mask=None)
        x = out[0] if isinstance(out, tuple) else out
    return encoder.layer_norm(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a manifest of clips of at most 30 s")
    p.add_argument("--language", help="only this language's clips")
    p.add_argument("--margins", type=float, nargs="+", default=[2.0, 1.0], help="seconds kept after the audio")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    model, processor = sw.load(args.model)
    model.eval()
    full = model.config.max_source_positions
    samples = [s for s in read_jsonl(Path(args.data)) if not isinstance(s, tuple)]
    samples = [s for s in samples if args.language is None or s.language == args.language]
    runner = DecoderRunner(model)
    rows = []
    for margin in [None, *args.margins]:
        hyps, kept = [], []
        for sample in samples:
            audio = load_audio(sample.audio)
            features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
            frames = window_frames(len(audio) / 16000, margin, full)
            tokens = greedy_transcripts(runner, encode_window(model.get_encoder(), features, frames), 200)[0]
            hyps.append(processor.tokenizer.decode(tokens, skip_special_tokens=True))
            kept.append(frames / full)
        wer = 100 * corpus_wer([s.text for s in samples], hyps, args.language)
        rows.append(["full (30 s)" if margin is None else f"audio + {margin:g} s", f"{sum(kept) / len(kept):.2f}",
                     f"{wer:.2f}"])
        print(rows[-1], flush=True)
    base = float(rows[0][2])
    for row in rows:
        row.append(f"{float(row[2]) - base:+.2f}")
    result = {
        "title": f"{args.model}: encoder on a window trimmed to the audio, no training",
        "header": ["window", "mean share of the 30-s window", "WER %", "Δ WER"],
        "rows": rows,
        **run_metadata(model=args.model, data=args.data, language=args.language, margins=args.margins,
                       clips=len(samples)),
        "inputs": f"{len(samples)} clips of {args.data}; greedy decoding in the engine on the trimmed encoder "
                  "output; Δ against the full window.",
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
