"""Every bad input a user can give the `slimwhisper` CLI ends in exit 0 with a right result, or exit 2 with one line.

Each case is a command line, a setup that builds the bad input under tmp_path, and the outcome the user should
see: exit 0 plus a check of what came out, or exit 2 with exactly one stderr line that says what to do, no
traceback, and nothing half-written in --out.

Starting Python and importing torch + transformers costs ~10 s on a loaded machine, and there are 50 cases, so
each case runs in a child forked from one `python` that imported `slimwhisper.cli` once: a fresh process
per case (its own stdout, stderr, exit code, cwd) for milliseconds. `test_real_entry_point` runs a case
through `python -m slimwhisper.cli` itself, so the shortcut cannot hide a difference.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import SHARED_DATA, byte_whisper_pair

SR = 16_000
REAL_CLIP = SHARED_DATA / "realspeech" / "en" / "en_lj_LJ001-0002.flac"  # "in being comparatively modern."
CASE_TIMEOUT_S = 240

# Imports the CLI once, then forks one child per case line read on stdin; replies with the exit code.
RUNNER = r"""
import json, os, sys, time, traceback
import slimwhisper.cli as cli

def child(job):
    for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(job["cwd"])
    os.environ.update(job["env"])
    sys.argv = ["slimwhisper", *job["argv"]]
    try:
        code = cli.main(job["argv"])
    except SystemExit as exc:  # what the interpreter does with sys.exit(...) at the top level
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # an uncaught exception: the traceback python -m would print
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))

print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(job)
    deadline = time.monotonic() + job["timeout"]
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        rc = 137
    else:
        rc = os.waitstatus_to_exitcode(done[1])
    print(json.dumps({"rc": rc}), flush=True)
"""


def cli_env() -> dict[str, str]:
    """The environment of every run: offline, no progress chatter, this checkout's sources first."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


class Runner:
    """One pre-imported CLI process; `run(argv, cwd)` forks a child for a case and returns (rc, stdout, stderr)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=cli_env())
        for line in self.proc.stdout:  # skip anything an import printed before the runner is ready
            if line.strip() == "ready":
                break
        else:
            raise RuntimeError("the CLI runner exited before it was ready")

    def run(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        out, err = cwd / ".case.stdout", cwd / ".case.stderr"
        job = {"argv": argv, "cwd": str(cwd), "env": env or {}, "stdout": str(out), "stderr": str(err),
               "timeout": CASE_TIMEOUT_S}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        texts = out.read_text(errors="replace"), err.read_text(errors="replace")
        out.unlink()
        err.unlink()
        return rc, *texts

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# --------------------------------------------------------------------------- inputs


def write_tone(path: Path, seconds: float = 0.6, rate: int = SR, channels: int = 1) -> Path:
    """A tone with a little noise: audio a model accepts, whatever it makes of it."""
    t = np.arange(int(rate * seconds)) / rate
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.02 * np.random.default_rng(0).standard_normal(t.size))
    audio = audio.astype(np.float32)
    sf.write(path, np.stack([audio] * channels, axis=1) if channels > 1 else audio, rate)
    return path


def write_manifest(folder: Path, lines: list[str], clips: int = 2) -> Path:
    """`clips` tone clips c0.wav, c1.wav ... beside a manifest.jsonl of exactly `lines`, blank ones included."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(clips):
        write_tone(folder / f"c{i}.wav", seconds=0.5 + 0.1 * i)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(line + "\n" for line in lines))
    return manifest


def row(i: int, **extra: object) -> str:
    """One manifest line naming clip c{i}.wav."""
    return json.dumps({"id": f"c{i}", "audio": f"c{i}.wav", "text": f"clip {i}", "lang": "en", **extra})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Whispers (byte tokenizer) saved as the convert command would: English-only, multilingual, and the
    English-only one in the lite-whisper layout."""
    import slimwhisper as sw
    from slimwhisper.loading.processor import save_processor
    from slimwhisper.lowrank import save_lite_whisper

    root = tmp_path_factory.mktemp("models")
    size = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=64, decoder_ffn_dim=64, max_target_positions=64)
    model, processor, _ = byte_whisper_pair(size, ("en", "de"), False, max_length=24)
    tiny = root / "tiny"
    model.save_pretrained(tiny)
    save_processor(processor, tiny)
    multi_model, multi_processor, _ = byte_whisper_pair(size, ("en", "de"), True, max_length=24)
    multi = root / "multi"
    multi_model.save_pretrained(multi)
    save_processor(multi_processor, multi)
    lite = root / "lite"
    audio = [np.sin(np.arange(SR) * 0.05 * (k + 1)).astype(np.float32) for k in range(2)]
    slim = sw.convert(model, sw.LowRankConfig(rank=16, granule=8), calibration=audio, progress=False)
    save_lite_whisper(slim, lite)
    save_processor(processor, lite)
    return {"tiny": tiny, "multi": multi, "lite": lite}


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    """One pre-imported CLI for the whole module: the ~10 s import is paid once."""
    r = Runner()
    yield r
    r.close()


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One class of input: `argv` may hold {tmp}, {tiny}, {multi}, {lite}, {real}; `setup(tmp, models)` builds it.

    expect 2: one stderr line containing `hint`; `out` names the --out path checked for half-written files.
    expect 0: `check(stdout, tmp)` asserts the result.
    """

    name: str
    argv: list[str]
    setup: Callable[[Path, dict[str, Path]], None] = lambda tmp, m: None
    expect: int = 2
    hint: str = ""
    out: str | None = None
    check: Callable[[str, Path], None] | None = None
    marks: tuple = field(default_factory=tuple)
    env: dict[str, str] = field(default_factory=dict)  # values may hold {tmp}


def _file(name: str, data: bytes = b"x") -> Callable[[Path, dict], None]:
    """A setup writing tmp/`name` (a file where a folder belongs, a text posing as audio, ...)."""
    return lambda tmp, m: (tmp / name).write_bytes(data)


def _copy_model(kind: str = "tiny", then: Callable[[Path], None] = lambda d: None) -> Callable[[Path, dict], None]:
    """Copy a saved model to tmp/model, then damage it with `then(folder)`."""
    def setup(tmp: Path, m: dict) -> None:
        shutil.copytree(m[kind], tmp / "model")
        then(tmp / "model")
    return setup


def _truncate(folder: Path, name: str = "model.safetensors") -> None:
    """Keep the first half of the file: a copy or download cut short."""
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _shard(folder: Path) -> None:
    """Split the weights into two shards with an index, then lose the second shard."""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    names = sorted(state)
    half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in half.items():
        save_file({k: state[k].contiguous() for k in keys}, folder / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, keys in half.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    (folder / "model-00002-of-00002.safetensors").unlink()


def _retype(dtype: str) -> Callable[[Path], None]:
    """Rewrite every weight as `dtype` (float16: a legitimate half-precision save; int8/int64: garbage)."""
    def then(folder: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        state = load_file(folder / "model.safetensors")
        cast = {k: (v * 100).to(getattr(torch, dtype)) if dtype.startswith("int") else v.to(getattr(torch, dtype))
                for k, v in state.items()}
        save_file(cast, folder / "model.safetensors", metadata={"format": "pt"})
    return then


def _bad_config(folder: Path) -> None:
    """A config.json cut short mid-object."""
    (folder / "config.json").write_text('{"model_type": "whisper", "d_model": 32,')  # cut short


def _ct2_folder(tmp: Path, m: dict) -> None:
    """A faster-whisper folder (tiny.en's files) whose model.bin was cut short."""
    from slimwhisper.loading.registry import resolve_short_name

    files = resolve_short_name("tiny.en")
    folder = tmp / "fw"
    folder.mkdir()
    for side in files.side_files():
        shutil.copy(side, folder / side.name)
    (folder / "model.bin").write_bytes(files.weights[0].read_bytes()[:4096])


def _ct2_config_only(tmp: Path, m: dict) -> None:
    """A faster-whisper folder that lost its model.bin: only the CTranslate2 config.json and tokenizer remain."""
    _ct2_folder(tmp, m)
    (tmp / "fw" / "model.bin").unlink()


def _lite_with_ct2_weights(tmp: Path, m: dict) -> None:
    """A lite-whisper config.json beside a CTranslate2 model.bin: the folders of the two formats mixed up."""
    _ct2_folder(tmp, m)
    shutil.copy(m["lite"] / "config.json", tmp / "fw" / "config.json")


def _audio(name: str, write: Callable[[Path], None]) -> Callable[[Path, dict], None]:
    """A setup writing tmp/`name` with `write`."""
    return lambda tmp, m: write(tmp / name)


def _float_wav(values: np.ndarray) -> Callable[[Path], None]:
    """A float32 WAV: the only common format that can carry NaN and Inf samples."""
    return lambda p: sf.write(p, values.astype(np.float32), SR, subtype="FLOAT")


def _nan_audio() -> np.ndarray:
    """1 s of a constant with 100 NaN samples (what a broken DSP chain exports)."""
    a = np.full(SR, 0.1, dtype=np.float32)
    a[100:200] = np.nan
    return a


def _inf_audio() -> np.ndarray:
    """1 s of a constant with one infinite sample."""
    a = np.full(SR, 0.1, dtype=np.float32)
    a[5000] = np.inf
    return a


def _resampled(rate: int, channels: int) -> Callable[[Path], None]:
    """The real clip at `rate` Hz by linear interpolation; with 2 channels the speech is in the second only, so a
    reader that kept the first channel instead of mixing would hear silence."""
    def write(path: Path) -> None:
        audio, sr = sf.read(REAL_CLIP, dtype="float32")
        t = np.arange(int(len(audio) * rate / sr)) * (sr / rate)
        out = np.interp(t, np.arange(len(audio)), audio).astype(np.float32)
        sf.write(path, np.stack([np.zeros_like(out), out], axis=1) if channels == 2 else out, rate)
    return write


def _occupied(tmp: Path, m: dict) -> None:
    """An --out folder already holding a file of the user's."""
    (tmp / "o").mkdir()
    (tmp / "o" / "keep.txt").write_text("mine")


def _says(words: str) -> Callable[[str, Path], None]:
    """A check that stdout holds `words`."""
    def check(stdout: str, tmp: Path) -> None:
        assert words in stdout, stdout
    return check


def _says_modern(stdout: str, tmp: Path) -> None:
    """The real clip says "in being comparatively modern": resampled or mixed wrongly, tiny.en would not hear it."""
    text = stdout.split("\t", 1)[-1].lower()
    assert "modern" in text, stdout


def _printed_something(stdout: str, tmp: Path) -> None:
    """A random model's text is noise; that it printed a row at all is the result."""
    assert stdout.strip(), "nothing printed"


def _silence_check(stdout: str, tmp: Path) -> None:
    """Whisper's best-known failure is text on silence ("you"); the engine prints an empty transcript."""
    assert stdout.startswith(str(tmp / "zeros.wav")), stdout
    assert stdout.split("\t", 1)[1].strip() == "", stdout


def _eval_kept(n: int, skipped: int) -> Callable[[str, Path], None]:
    """eval scored exactly `n` utterances and reported `skipped` ones, by id, in its summary."""
    def check(stdout: str, tmp: Path) -> None:
        summary = json.loads((tmp / "o" / "summary.json").read_text())
        assert summary["n_utterances"] == n, summary
        assert summary["skipped"]["n_skipped"] == skipped, summary["skipped"]
    return check


TINY = "{tiny}"
TONE = "{tmp}/tone.wav"
tone = _audio("tone.wav", write_tone)
MANIFEST = "{tmp}/d/manifest.jsonl"
EVAL = ["eval", TINY, "--data", MANIFEST, "--out", "{tmp}/o", "--quiet", "--bootstrap", "10", "--batch-size", "2"]
NOT_ROOT = (pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o500 folder"),)
NEEDS_CLIP = (pytest.mark.skipif(not REAL_CLIP.is_file(), reason=f"{REAL_CLIP} not found"),)


def _manifest(lines: list[str], clips: int = 2) -> Callable[[Path, dict], None]:
    return lambda tmp, m: write_manifest(tmp / "d", lines, clips)


def _unwritable(tmp: Path, m: dict) -> None:
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(0o500)


CASES = [
    # --- --out: a file, a folder that cannot be made, a non-empty folder
    Case("convert --out is a file", ["convert", TINY, "--kv-reduction", "0.5", "--out", "{tmp}/o"],
         _file("o"), hint="give a folder", out="o"),
    Case("compress-encoder --out is a file", ["compress-encoder", TINY, "--rank", "16", "--out", "{tmp}/o"],
         _file("o"), hint="give a folder", out="o"),
    Case("transcribe --out is a file", ["transcribe", TINY, TONE, "--out", "{tmp}/o"],
         lambda tmp, m: (tone(tmp, m), _file("o")(tmp, m)), hint="give a folder", out="o"),
    Case("eval --out is a file", [*EVAL], lambda tmp, m: (_manifest([row(0), row(1)])(tmp, m), _file("o")(tmp, m)),
         hint="give a folder", out="o"),
    Case("finetune --out is a file", ["finetune", TINY, "--train", MANIFEST, "--out", "{tmp}/o", "--steps", "1"],
         lambda tmp, m: (_manifest([row(0), row(1)])(tmp, m), _file("o")(tmp, m)), hint="give a folder", out="o"),
    Case("bench kv --out is a file", ["bench", "kv", "--geometry", "tiny", "--out", "{tmp}/o", "--no-held"],
         _file("o"), hint="give a folder", out="o"),
    Case("bench decode --out is a file",
         ["bench", "decode", TINY, "--out", "{tmp}/o", "--repeats", "1", "--warmup", "0", "--cache-len", "8"],
         _file("o"), hint="give a folder", out="o"),
    Case("demo --out is a file", ["demo", "--out", "{tmp}/o"], _file("o"), hint="give a folder", out="o"),
    Case("convert --out under a file", ["convert", TINY, "--kv-reduction", "0.5", "--out", "{tmp}/f/o"],
         _file("f"), hint="another place", out="f/o"),
    Case("bench kv --out under a file", ["bench", "kv", "--geometry", "tiny", "--out", "{tmp}/f/o", "--no-held"],
         _file("f"), hint="another place", out="f/o"),
    Case("convert --out in a read-only folder", ["convert", TINY, "--kv-reduction", "0.5", "--out", "{tmp}/locked/o"],
         _unwritable, hint="another place", out="locked/o", marks=NOT_ROOT),
    Case("convert --out not empty", ["convert", TINY, "--kv-reduction", "0.5", "--out", "{tmp}/o"],
         _occupied,
         hint="--overwrite", out="o"),
    Case("finetune --out not empty", ["finetune", TINY, "--train", MANIFEST, "--out", "{tmp}/o", "--steps", "1"],
         lambda tmp, m: (_manifest([row(0), row(1)])(tmp, m), _occupied(tmp, m)),
         hint="--overwrite", out="o"),
    Case("cache folder is a file", ["transcribe", TINY, TONE], lambda tmp, m: (tone(tmp, m), _file("cache")(tmp, m)),
         expect=0, check=_printed_something, env={"SLIMWHISPER_CACHE": "{tmp}/cache"}),
    # --- models that cannot be found or loaded
    Case("unknown model name", ["transcribe", "tiny.xx", TONE], tone, hint="short name"),
    Case("model folder without config.json", ["transcribe", "{tmp}/model", TONE],
         lambda tmp, m: (tone(tmp, m), _copy_model(then=lambda d: (d / "config.json").unlink())(tmp, m)),
         hint="config.json"),
    Case("config.json is not JSON", ["transcribe", "{tmp}/model", TONE],
         lambda tmp, m: (tone(tmp, m), _copy_model(then=_bad_config)(tmp, m)), hint="config.json"),
    Case("info: config.json is not JSON", ["info", "{tmp}/model"], _copy_model(then=_bad_config), hint="config.json"),
    Case("truncated model.safetensors", ["transcribe", "{tmp}/model", TONE],
         lambda tmp, m: (tone(tmp, m), _copy_model(then=_truncate)(tmp, m)), hint="again"),
    Case("missing shard", ["transcribe", "{tmp}/model", TONE],
         lambda tmp, m: (tone(tmp, m), _copy_model(then=_shard)(tmp, m)), hint="copy the whole model"),
    Case("int64 weights", ["transcribe", "{tmp}/model", TONE],
         lambda tmp, m: (tone(tmp, m), _copy_model(then=_retype("int64"))(tmp, m)), hint="dtype"),
    Case("int8 weights in a non-quantised model", ["transcribe", "{tmp}/model", TONE],
         lambda tmp, m: (tone(tmp, m), _copy_model(then=_retype("int8"))(tmp, m)), hint="dtype"),
    Case("float16 weights load as fp32", ["transcribe", "{tmp}/model", TONE],
         lambda tmp, m: (tone(tmp, m), _copy_model(then=_retype("float16"))(tmp, m)), expect=0,
         check=lambda out, tmp: None),
    Case("truncated faster-whisper model.bin", ["transcribe", "{tmp}/fw", TONE],
         lambda tmp, m: (tone(tmp, m), _ct2_folder(tmp, m)), hint="truncated"),
    Case("faster-whisper folder without model.bin", ["transcribe", "{tmp}/fw", TONE],
         lambda tmp, m: (tone(tmp, m), _ct2_config_only(tmp, m)), hint="model.bin"),
    Case("info: faster-whisper folder without model.bin", ["info", "{tmp}/fw"], _ct2_config_only, hint="model.bin"),
    Case("lite-whisper config beside a faster-whisper model.bin", ["transcribe", "{tmp}/fw", TONE],
         lambda tmp, m: (tone(tmp, m), _lite_with_ct2_weights(tmp, m)), hint="lite-whisper"),
    Case("lite-whisper folder where a faster-whisper one is expected", ["transcribe", "{lite}", TONE], tone,
         expect=0, check=_printed_something),
    Case("info on a lite-whisper folder", ["info", "{lite}"], expect=0, check=_says("d_model 32")),
    Case("lite-whisper folder without weights", ["info", "{tmp}/model"],
         _copy_model("lite", lambda d: (d / "model.safetensors").unlink()), hint="model.safetensors"),
    Case("info on a folder that is no model", ["info", "{tmp}"], _file("notes.txt"), hint="model.bin"),
    # --- audio
    Case("audio file missing", ["transcribe", TINY, "{tmp}/nope.wav"], hint="check the path"),
    Case("folder given as audio", ["transcribe", TINY, "{tmp}/clips"],
         lambda tmp, m: (tmp / "clips").mkdir(), hint="folder"),
    Case("0-byte audio file", ["transcribe", TINY, "{tmp}/a.wav"], _file("a.wav", b""), hint="convert it"),
    Case("text file named .wav", ["transcribe", TINY, "{tmp}/a.wav"], _file("a.wav", b"hello, not audio\n"),
         hint="convert it"),
    Case("WAV of 0 samples", ["transcribe", TINY, "{tmp}/a.wav"], _audio("a.wav", _float_wav(np.zeros(0))),
         hint="speech"),
    Case("WAV with NaN samples", ["transcribe", TINY, "{tmp}/a.wav"], _audio("a.wav", _float_wav(_nan_audio())),
         hint="re-export"),
    Case("WAV with Inf samples", ["transcribe", TINY, "{tmp}/a.wav"], _audio("a.wav", _float_wav(_inf_audio())),
         hint="re-export"),
    Case("5 s of digital silence", ["transcribe", "tiny.en", "{tmp}/zeros.wav"],
         _audio("zeros.wav", _float_wav(np.zeros(5 * SR))), expect=0, check=_silence_check),
    Case("0.05 s clip", ["transcribe", TINY, "{tmp}/a.wav"], _audio("a.wav", lambda p: write_tone(p, 0.05)),
         expect=0, check=_printed_something),
    Case("stereo clip is mixed down", ["transcribe", "tiny.en", "{tmp}/a.wav"],
         _audio("a.wav", _resampled(SR, 2)), expect=0, check=_says_modern, marks=NEEDS_CLIP),
    Case("8 kHz clip is resampled", ["transcribe", "tiny.en", "{tmp}/a.wav"],
         _audio("a.wav", _resampled(8000, 1)), expect=0, check=_says_modern, marks=NEEDS_CLIP),
    Case("two inputs would write one --out file", ["transcribe", TINY, TONE, "{tmp}/b/tone.wav", "--out", "{tmp}/o"],
         lambda tmp, m: (tone(tmp, m), (tmp / "b").mkdir(), write_tone(tmp / "b" / "tone.wav")), hint="rename",
         out="o"),
    Case("transcribe --out with --engine generate", ["transcribe", TINY, TONE, "--engine", "generate", "--out",
                                                     "{tmp}/o"], tone, hint="--engine", out="o"),
    Case("transcribe --out with a model that fails to load", ["transcribe", "{tmp}/model", TONE, "--out", "{tmp}/o"],
         lambda tmp, m: (tone(tmp, m), _copy_model(then=_truncate)(tmp, m)), hint="again", out="o"),
    Case("transcribe without audio", ["transcribe", TINY], hint="audio"),
    Case("transcribe --kv-cache int8 with --engine generate",
         ["transcribe", TINY, TONE, "--engine", "generate", "--kv-cache", "int8"], tone, hint="--engine"),
    Case("eval --kv-cache int8 with --engine generate", [*EVAL, "--engine", "generate", "--kv-cache", "int8"],
         _manifest([row(0)]), hint="--engine fast", out="o"),
    # --- manifests
    Case("0-byte manifest", [*EVAL], _manifest([], clips=0), hint="empty", out="o"),
    Case("manifest with a blank line in the middle", [*EVAL], _manifest([row(0), "", row(1)]), expect=0,
         check=_eval_kept(2, 0)),
    Case("manifest line that is not JSON", [*EVAL], _manifest([row(0), "{oops", row(1)]), expect=0,
         check=_eval_kept(2, 1)),
    Case("manifest of only a bad line", [*EVAL], _manifest(["{oops"], clips=0), hint="manifest", out="o"),
    Case("manifest line without audio field", [*EVAL], _manifest([row(0), '{"id": "x", "text": "t"}', row(1)]),
         expect=0, check=_eval_kept(2, 1)),
    Case("manifest audio path missing", [*EVAL], _manifest([row(0), row(5)]), expect=0, check=_eval_kept(1, 1)),
    Case("manifest duplicate ids", [*EVAL], _manifest([row(0), row(0), row(1)]), expect=0, check=_eval_kept(2, 1)),
    Case("manifest clip with NaN samples", [*EVAL],
         lambda tmp, m: (_manifest([row(0), row(1), row(2)], 2)(tmp, m),
                         _float_wav(_nan_audio())(tmp / "d" / "c2.wav")), expect=0, check=_eval_kept(2, 1)),
    Case("eval --strict with a missing clip", [*EVAL, "--strict"], _manifest([row(0), row(5)]), hint="--strict",
         out="o"),
    Case("eval --data missing", ["eval", TINY, "--data", "{tmp}/nope.jsonl", "--out", "{tmp}/o"],
         hint="--data", out="o"),
    # --- options out of range
    Case("unknown --language code", ["transcribe", "{multi}", TONE, "--language", "xx"], tone, hint="language"),
    Case("--language on a multilingual model", ["transcribe", "{multi}", TONE, "--language", "de"], tone, expect=0,
         check=_printed_something),
    Case("--language de with English-only tiny.en", ["transcribe", "tiny.en", TONE, "--language", "de"], tone,
         hint="multilingual"),
    Case("--batch-size 0", ["transcribe", TINY, TONE, "--batch-size", "0"], tone, hint="at least 1"),
    Case("--batch-size -3 on eval", [*EVAL[:-1], "-3"], _manifest([row(0)], 1), hint="at least 1", out="o"),
    Case("--beams 0", ["transcribe", TINY, TONE, "--beams", "0"], tone, hint="at least 1"),
    Case("--beams 0 on eval", [*EVAL, "--beams", "0"], _manifest([row(0)], 1), hint="at least 1", out="o"),
    Case("--kv-reduction 1.5", ["convert", TINY, "--kv-reduction", "1.5", "--out", "{tmp}/o"],
         hint="kv_reduction", out="o"),
    Case("--kv-reduction -0.1", ["convert", TINY, "--kv-reduction", "-0.1", "--out", "{tmp}/o"],
         hint="kv_reduction", out="o"),
    Case("convert --latent-rank 0", ["convert", TINY, "--latent-rank", "0", "--out", "{tmp}/o"],
         hint="latent", out="o"),
    Case("compress-encoder --rank 0", ["compress-encoder", TINY, "--rank", "0", "--out", "{tmp}/o"],
         hint="rank", out="o"),
    Case("--modules unknown_module", ["convert", TINY, "--modules", "unknown_module", "--out", "{tmp}/o"],
         hint="decoder_self", out="o"),
    Case("finetune --train missing", ["finetune", TINY, "--train", "{tmp}/nope.jsonl", "--out", "{tmp}/o"],
         hint="manifest", out="o"),
    Case("finetune --steps 0", ["finetune", TINY, "--train", MANIFEST, "--out", "{tmp}/o", "--steps", "0"],
         _manifest([row(0), row(1)]), hint="at least 1", out="o"),
    Case("--device that does not exist", ["transcribe", TINY, TONE, "--device", "tpu"], tone, hint="--device"),
    Case("info on a missing path", ["info", "{tmp}/nope"], hint="no such file"),
    Case("compress-encoder --theta not a number", ["compress-encoder", TINY, "--theta", "high", "--out", "{tmp}/o"],
         hint="--theta", out="o"),
    Case("compress-encoder --stats missing", ["compress-encoder", TINY, "--stats", "{tmp}/nope.safetensors",
                                              "--rank", "16", "--out", "{tmp}/o"], hint="stats", out="o"),
    Case("convert --calibration missing", ["convert", TINY, "--kv-reduction", "0.5", "--calibration",
                                           "{tmp}/nope", "--out", "{tmp}/o"], hint="calibration", out="o"),
    Case("bench kv --geometry unknown", ["bench", "kv", "--geometry", "huge-xl"], hint="--geometry"),
    Case("--batch-size not a number", ["transcribe", TINY, TONE, "--batch-size", "many"], hint="--batch-size"),
    Case("unknown command", ["transcode", TINY], hint="convert"),
]


def _fill(argv: list[str], tmp: Path, models: dict[str, Path]) -> list[str]:
    values = {"tmp": str(tmp), "real": str(REAL_CLIP), **{k: str(v) for k, v in models.items()}}
    return [a.format(**values) for a in argv]


def _snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under `path` with its bytes (None if `path` does not exist): to prove nothing was written."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _assert_nothing_half_written(tmp: Path, out: str, before: dict[str, bytes] | None) -> None:
    """--out is exactly as it was (not even an empty folder made) and no temporary file is left."""
    after = _snapshot(tmp / out)
    assert after == before, f"{out} changed: {sorted(after) if after is not None else 'removed'}"
    leftovers = [p for p in tmp.rglob("*") if ".tmp" in p.name or ".partial-" in p.name]
    assert not leftovers, leftovers


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, runner: Runner, models: dict[str, Path], tmp_path: Path) -> None:
    case.setup(tmp_path, models)
    before = _snapshot(tmp_path / case.out) if case.out else None
    env = dict(zip(case.env, _fill(list(case.env.values()), tmp_path, models)))
    rc, stdout, stderr = runner.run(_fill(case.argv, tmp_path, models), tmp_path, env)
    assert "Traceback" not in stderr, stderr
    if case.expect == 0:
        assert rc == 0, stderr
        case.check(stdout, tmp_path)
        return
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, f"rc={rc}\n{stderr}"
    print(f"[{case.name}] {lines[0]}")  # the message a user sees, for `pytest -s` reviews
    assert case.hint.lower() in lines[0].lower(), lines[0]
    if case.out:
        _assert_nothing_half_written(tmp_path, case.out, before)


def test_the_sweep_is_wide() -> None:
    assert len({c.name for c in CASES}) == len(CASES) >= 35


def test_real_entry_point(tmp_path: Path) -> None:
    """The same outcome through `python -m slimwhisper.cli` itself as through the forked runner."""
    (tmp_path / "o").write_text("x")
    argv = ["convert", "tiny.en", "--kv-reduction", "0.5", "--out", str(tmp_path / "o")]
    done = subprocess.run([sys.executable, "-m", "slimwhisper.cli", *argv], capture_output=True, text=True,
                          env=cli_env(), timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "give a folder" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "o").read_text() == "x"
