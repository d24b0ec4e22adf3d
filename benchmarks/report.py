"""Rebuild BENCHMARKS.md (and README.md's results block) from the stored results, without measuring.

Every folder benchmarks/results/NAME/ holds the result.json a benchmark command wrote there
(`slimwhisper bench ... --out benchmarks/results/NAME`; the scripts in benchmarks/ take the same --out).
Each result holds the command that made it, the machine, the versions and the commit. This script renders
one section per result, grouped by kind (the folder name's prefix) in the order of SECTIONS, with the
command and the machine under every table:

    python benchmarks/report.py            # or: make benchmarks
    python benchmarks/report.py --check    # exit 1 when BENCHMARKS.md is not what the results give

Only the standard library is used, so it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS = ROOT / "BENCHMARKS.md"
README = ROOT / "README.md"
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


# ------------------------------------------------------------------ formatting helpers
def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def command(result: dict) -> str:
    """The command as a user types it (the executable's path shortened to its name)."""
    words = result.get("command", "").split()
    if words and Path(words[0]).name == "slimwhisper":
        words[0] = "slimwhisper"
    elif words and "python" in Path(words[0]).name:
        words[0] = "python"
    elif words and words[0].endswith(".py"):  # a script records its own path as argv[0]
        words.insert(0, "python")
    return " ".join(words)


def provenance(result: dict) -> str:
    """Command, machine and versions under a table (after the result's `inputs`: how its inputs were made)."""
    m, v = result.get("machine", {}), result.get("versions", {})
    machine = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('threads', '?')} threads, " \
              f"{m.get('memory_gib', '?')} GiB" + (f", {m['gpu']}" if m.get("gpu") else ", no GPU")
    versions = ", ".join(f"{k} {val}" for k, val in v.items())
    inputs = f"Inputs: {result['inputs']}  \n" if result.get("inputs") else ""
    return (f"{inputs}Command: `{command(result)}`  \nMachine: {machine}; {versions}; "
            f"{result.get('date', '?')}, commit {str(result.get('commit', '?'))[:12]}.")


# ------------------------------------------------------------------ one renderer per kind of result
def render_longform(name: str, r: dict) -> str:
    """bench e2e --long-form: every long-form decoder on one joined recording."""
    ref = "faster_whisper_batched_int8"
    base = r["rtf"].get(ref)
    rows = []
    for system, rtf in r["rtf"].items():
        engine = r["details"].get(system, {}).get("engine", {})
        counters = ", ".join(f"{k} {engine[k]}" for k in ("windows", "retries", "redecoded", "continued")
                             if k in engine)
        ratio = num(rtf / base, 2) + "x" if rtf and base else "n/a"
        rows.append([f"`{system}`", num(rtf), ratio, pct(r["wer"].get(system)), counters])
    head = (f"One recording of {r['audio_seconds']:.0f} s: {r['utterances']} utterances joined with "
            f"{r.get('pause_s', 0.6)} s pauses (`{name}`).")
    return head + "\n\n" + table(["system", "RTF", f"time vs `{ref}`", "WER %", "engine work"], rows)


def render_e2e(name: str, r: dict) -> str:
    """bench e2e: short clips through the engine, generate and faster-whisper."""
    ref = "faster_whisper_int8"
    base = r["rtf"].get(ref)
    rows = [[f"`{s}`", num(rtf), num(rtf / base, 2) + "x" if rtf and base else "n/a", pct(r["wer"].get(s))]
            for s, rtf in r["rtf"].items()]
    out = f"{r['utterances']} utterances, {r['audio_seconds']:.0f} s of audio (`{name}`).\n\n"
    out += table(["system", "RTF", f"time vs `{ref}`", "WER %"], rows)
    for run, figures in (r.get("per_token") or {}).items():
        speed = figures.get("speedup_vs_hf_generate", {})
        rows = [[f"`{s}`", num(ms, 2), num(speed.get(s), 2) + "x" if s in speed else ""]
                for s, ms in figures["ms_per_token"].items()]
        out += f"\n\nDecoder alone, {run.replace('_', ' ')} ({figures['windows']} windows, fastest of " \
               f"{figures['rounds']} interleaved rounds):\n\n" + table(["system", "ms per token", "vs generate"], rows)
    return out


def render_decode(name: str, r: dict) -> str:
    """bench decode: one decode step of the whole batch, model against baseline."""
    speed, same, bound = r.get("speedup", {}), r.get("speedup_same_cache", {}), r["traffic"]["bound_speedup"]
    roof = r.get("roofline", {}).get("entries", {})

    def roofline(k: str) -> list[str]:
        e = roof.get(k)
        if not e:
            return ["", "", ""]
        return [f"{e['gflop']:.2f} / {e['mbytes']:.0f}", f"{e['bound_ms']:.2f} ({e['bound_by']})",
                pct(e["attained"], 0)]

    rows = [[f"`{k}`", num(ms, 2), num(speed.get(k), 2), num(same.get(k), 2), num(bound.get(k), 2), *roofline(k)]
            for k, ms in r["ms_per_token"].items()]
    settings = f"batch {r.get('batch')}, {r.get('cache_len')} cached tokens" + \
               (f", {r['quantize']} linears" if r.get("quantize") else "") + \
               (f", {r['kv_cache']} KV cache" if r.get("kv_cache", "float") != "float" else "")
    machine = r.get("roofline", {}).get("machine")
    if machine:
        settings += f"; roofline on this machine's {machine['gflops']:.0f} GFLOP/s and {machine['gbps']:.0f} GB/s"
    return f"{settings} (`{name}`).\n\n" + table(
        ["entry", "ms per step", "speedup vs baseline", "speedup, same cache", "traffic bound",
         "GFLOP / MB per step", "roofline ms", "% of roofline"], rows)


def render_encoder(name: str, r: dict) -> str:
    """bench encoder: one 30-s encoder pass, its roofline and where its time goes."""
    speed, ratio = r.get("speedup", {}), r.get("params_ratio", {})
    roof = r.get("roofline", {}).get("entries", {})

    def roofline(k: str) -> list[str]:
        e = roof.get(k)
        return [f"{e['gflop']:.1f}", f"{e['gflops_achieved']:.0f}", f"{e['bound_ms']:.0f} ({e['bound_by']})",
                pct(e["attained"], 0)] if e else ["", "", "", ""]

    base = roof.get("baseline")
    bound = {k: base["bound_ms"] / e["bound_ms"] for k, e in roof.items() if base and k != "baseline"}
    rows = [[f"`{k}`", num(ms, 1), num(speed.get(k), 2), num(bound.get(k), 2), num(ratio.get(k), 3), *roofline(k)]
            for k, ms in r["ms_per_pass"].items()]
    precision = "int8 linears" if r.get("quantize") == "int8" else "float32"
    path = r.get("attention_path", "auto")
    path = "" if path == "auto" else f", the model's low-rank attention on the {path} path"
    out = f"batch {r.get('batch')}, {precision}{path} (`{name}`).\n\n" + table(
        ["model", "ms per pass", "speedup vs baseline", "roofline speed-up", "encoder params vs baseline", "GFLOP",
         "GFLOP/s", "roofline ms", "of roofline"], rows)
    profile = r.get("profile")
    if profile:
        parts = [p for p in next(iter(profile.values())) if p not in ("total", "wall")]
        rows = [[f"`{k}`", *[num(v[p], 0) for p in parts], num(v["wall"], 0)] for k, v in profile.items()]
        out += f"\n\nWhere a pass's time goes (ms, torch.profiler, median of {r.get('profile_passes', 1)}):\n\n"
        out += table(["model", *parts, "wall"], rows)
    return out


def render_kv_plan(name: str, r: dict) -> str:
    """bench kv --geometry: the memory plan of a released size, without weights."""
    rows = []
    for model, plans in r["plans"].items():
        for cache, e in plans.items():
            rows.append([f"`{model}`", cache, gib(e["weight_bytes"]), f"{e['cache_bytes_per_sequence'] / 2**20:.1f}",
                         f"{e['activation_bytes_per_sequence'] / 2**20:.1f}", e["largest_batch"]])
    mla = r["mla"]
    recipe = f"{', '.join(mla['modules'])} at {mla['kv_reduction']:g} KV reduction"
    header = ["model", "cache", "weights GiB (fp16)", "cache MiB per sequence", "activations MiB per sequence",
              "largest batch"]
    return (f"`{r['geometry']}` geometry, no weights needed; compressed = {recipe}; budget "
            f"{r['budget_bytes'] / 2**30:g} GiB at {r['tokens']} tokens (`{name}`).\n\n" + table(header, rows))


def render_kv(name: str, r: dict) -> str:
    """bench kv: cache bytes and the largest batch in a budget."""
    if "plans" in r:
        return render_kv_plan(name, r)
    rows = []
    for model, e in r["models"].items():
        fit = e["max_batch_in_budget"]
        rows.append([f"`{model}`", e["self_bytes_per_token"], e["cross_bytes_per_frame"], fit["self"],
                     fit["self_cross"]])
    budget = r["budget_bytes"] / 2**30
    header = ["model", "self bytes per token", "cross bytes per frame", "largest batch (self)",
              "largest batch (self + cross)"]
    return f"{r['dtype']} cache, budget {budget:g} GiB at {r['budget_length']} tokens (`{name}`).\n\n" + table(
        header, rows)


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f}"


def render_calibrate(name: str, r: dict) -> str:
    """bench calibrate: peak RSS of compress-encoder calibration per layer count, and the full model's."""
    rows = [[r_["layers"], r_["groups"], r_["largest_group_layers"], gib(r_["weight_bytes"]),
             gib(r_["peak_rss_bytes"] - r_["rss_before_bytes"]), gib(r_["peak_rss_bytes"])] for r_ in r["rows"]]
    full = r["full_model"]
    rows.append([f"{full['encoder_layers']} (estimate)", "", full["largest_group_layers"], gib(full["weight_bytes"]),
                 gib(full["group_stats_bytes"] + full["activation_and_other_bytes"]), gib(full["peak_rss_bytes"])])
    head = (f"`{r['geometry']}` geometry, random weights, {r['seconds']:g} s of audio, statistics budget "
            f"{gib(r['stats_budget_bytes'])} GiB; every linear of every layer holding its sums at once would need "
            f"{gib(full['all_layers_stats_bytes'])} GiB (`{name}`).")
    return head + "\n\n" + table(["encoder layers", "passes", "layers per pass", "weights GiB (fp32)",
                                    "added by calibration GiB", "peak RSS GiB"], rows)


def render_table(name: str, r: dict) -> str:
    """A benchmark script's own table: `header` and `rows` in its JSON, and its `plot` (a file beside it)."""
    figure = f"\n\n![{name}](benchmarks/results/{name}/{r['plot']})" if r.get("plot") else ""
    return f"(`{name}`)\n\n" + table(r["header"], r["rows"]) + figure


# (kind = file-name prefix, section title, what it measures, renderer)
SECTIONS: list[tuple[str, str, str, Callable[[str, dict], str]]] = [
    ("longform", "Long recordings",
     "Recordings of minutes: each long-form decoder transcribes one recording made by joining a dataset's "
     "utterances. RTF = wall time / audio duration (feature extraction, voice activity detection included).",
     render_longform),
    ("e2e", "End to end on short clips",
     "Real-time factor and WER of the engine, transformers `generate` and faster-whisper on the same weights, "
     "audio and threads; then the decoders alone on shared encoder outputs.", render_e2e),
    ("decode", "Decode step", "Median wall time of one decode step for the whole batch.", render_decode),
    ("encoder", "Encoder", "Median wall time of one encoder pass over 30-s windows.", render_encoder),
    ("kv", "KV-cache memory", "Analytic cache bytes (checked against a held cache) and what fits a budget.",
     render_kv),
    ("calibrate", "Calibration memory",
     "Peak resident memory of compress-encoder's calibration (a fresh process per layer count), and the full "
     "model's extrapolated from its weights, its largest layer group and the measured rest.", render_calibrate),
    ("table", "Other measurements", "Tables written by the scripts in benchmarks/.", render_table),
]


def results() -> dict[str, list[tuple[str, dict]]]:
    """Result files by kind, sorted by name."""
    by_kind: dict[str, list[tuple[str, dict]]] = {kind: [] for kind, *_ in SECTIONS}
    for path in sorted(RESULTS.glob("*/result.json")):
        name = path.parent.name
        kind = next((k for k, *_ in SECTIONS if name.startswith(k + "-")), "table")
        by_kind[kind].append((name, json.loads(path.read_text())))
    return by_kind


def render_benchmarks(found: dict[str, list[tuple[str, dict]]]) -> str:
    parts = ["# Benchmarks", "",
             "Generated by `python benchmarks/report.py` from the JSON results in `benchmarks/results/`; "
             "each table names the command that measured it and the machine. Speed figures come from shared "
             "machines: compare within one table (one run), as ratios, not across tables.", ""]
    for kind, title, about, render in SECTIONS:
        if not found[kind]:
            continue
        parts += [f"## {title}", "", about, ""]
        for name, r in found[kind]:
            parts += [f"### {r.get('title', name)}", "", render(name, r), "", provenance(r), ""]
    return "\n".join(parts).rstrip() + "\n"


def ratio(r: dict, system: str, reference: str) -> str:
    """`system`'s time as a multiple of `reference`'s in the same run."""
    a, b = r["rtf"].get(system), r["rtf"].get(reference)
    return f"{a / b:.2f}x" if a and b else "n/a"


def render_readme_block(found: dict[str, list[tuple[str, dict]]]) -> str:
    """The README's results: per long recording, WER of the engine and its peers, and the engine's time as a
    multiple of faster-whisper int8's (batched against batched, sequential against sequential)."""
    wer = {name: r["wer"] for name, r in found["longform"]}
    rows = [[name, f"{r['audio_seconds']:.0f} s", pct(wer[name].get("slimwhisper_fp32")),
             pct(wer[name].get("slimwhisper")), pct(wer[name].get("hf_generate")),
             pct(wer[name].get("faster_whisper_batched_int8")),
             ratio(r, "slimwhisper", "faster_whisper_batched_int8"),
             ratio(r, "slimwhisper_sequential", "faster_whisper_int8")]
            for name, r in found["longform"]]
    header = ["recording", "audio", "WER engine", "WER engine int8", "WER generate", "WER faster-whisper batched",
              "time int8 batched", "time int8 sequential"]
    long_form = "Long recordings:\n\n" + table(header, rows)
    if not found.get("e2e"):
        return long_form
    systems = ("slimwhisper_fp32", "slimwhisper", "hf_generate", "faster_whisper_int8")
    rows = [[name, f"{r['audio_seconds']:.0f} s", *(pct(r["wer"].get(k)) for k in systems),
             ratio(r, "slimwhisper", "faster_whisper_int8")] for name, r in found["e2e"]]
    header = ["clips", "audio", "WER engine", "WER engine int8", "WER generate", "WER faster-whisper int8",
              "time int8 vs faster-whisper int8"]
    return long_form + "\n\nShort clips (each at most 30 s):\n\n" + table(header, rows)


def update_readme(text: str, found: dict[str, list[tuple[str, dict]]]) -> str:
    block = f"{README_START}\n{render_readme_block(found)}\n{README_END}"
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    return pattern.sub(lambda _: block, text) if pattern.search(text) else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = parser.parse_args(argv)
    found = results()
    wanted = {BENCHMARKS: render_benchmarks(found), README: update_readme(README.read_text(), found)}
    stale = [p.name for p, text in wanted.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        print("up to date" if not stale else f"stale: {', '.join(stale)}; run python benchmarks/report.py")
        return 1 if stale else 0
    for path, text in wanted.items():
        path.write_text(text)
    print(f"wrote {BENCHMARKS.name} ({sum(len(v) for v in found.values())} results) and README's results block")
    return 0


if __name__ == "__main__":
    sys.exit(main())
