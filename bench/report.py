"""Render bench/RESULTS.md and bench/results.png from the section JSON files in bench/results/.

Called by run_bench.py after every workload; `python bench/run_bench.py --render-only`
re-renders without running anything.
"""

from __future__ import annotations

import json
from pathlib import Path

TARGET_REFERENCE = {5: 25.0, 1: 4.0}   # ours at least this many times faster than rotalabs-steer 1.2.0
TARGET_STEERING_VECTORS = 1.5          # ... than steering-vectors at the same batch size
TARGET_OVER_STOPPED = 1.05             # ours at most this times the bare forward stopped after the deepest block
TARGET_REL_L2 = 1e-4                   # vectors vs each peer's, float32
TARGET_RSS_GROWTH = 0.05               # peak RSS, 64 -> 1,024 pairs
TARGET_LINEAR = 0.15                   # time per pair at 1,024 pairs within this of that at 64 pairs

SYSTEM_LABELS = {
    "ours": "ours",
    "reference": "rotalabs-steer 1.2.0",
    "steering-vectors": "steering-vectors 0.12.2",
    "bare-full": "bare forward, full depth",
    "bare-stopped": "bare forward, stopped",
}
SECTION_TITLES = {"cpu": "CPU", "gpu": "GPU", "methods": "Estimators, full tables (`run_bench.py --methods`)"}
COLORS = {"reference": "#c0392b", "steering-vectors": "#2980b9", "bare-full": "#7f8c8d", "bare-stopped": "#27ae60"}


def load_sections(results_dir: Path) -> list[dict]:
    """The run_bench.py sections; the other scripts' JSON (evaluation, steering, prefix) has no
    "section" and its RESULTS.md section is written by that script (``replace_section``)."""
    sections = [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("*.json"))]
    sections = [s for s in sections if "section" in s and "workloads" in s]
    rank = {"cpu": 0, "gpu": 1}
    return sorted(sections, key=lambda s: (rank.get(s["section"], 9), s["section"]))


def _mib(kib) -> str:
    return f"{kib / 1024:,.0f}" if kib else "—"


def _system_label(system: str, workload: dict) -> str:
    label = SYSTEM_LABELS.get(system, system)
    if system in ("ours", "steering-vectors", "bare-full", "bare-stopped"):
        label += f" (batch {workload['batch_size']})"
    if system == "bare-stopped":
        label = label.replace("stopped", f"stopped after block {max(workload['layers'])}")
    return label


def workload_table(name: str, w: dict, gpu: bool) -> list[str]:
    lines = [
        f"### {name}: {w['title']}",
        "",
        f"{w['pairs']:,} pairs, {w['texts']:,} texts, {w['tokens']:,} real tokens; median of {w['repeats']} run(s); "
        f"{w['date']}.",
        "",
        "| system | median wall (s) | runs (s) | time / ours | peak RSS (MiB) | "
        + ("peak GPU mem (MiB) | " if gpu else "") + "tokens/s | rel. L2 error vs ours |",
        "|---|---:|---|---:|---:|" + ("---:|" if gpu else "") + "---:|---:|",
    ]
    for system, row in w["rows"].items():
        label = _system_label(system, w)
        blank = "| — " * (5 if gpu else 4)  # the columns between the first and the last
        if "skipped" in row:
            lines.append(f"| {label} | — {blank}| skipped: {row['skipped']} |")
            continue
        if "error" in row:
            lines.append(f"| {label} | failed {blank}| {row['error']} |")
            continue
        runs = ", ".join(f"{t:.2f}" for t in row["times_s"])
        shared = f" (measured in {row['shared_with']})" if row.get("shared_with") else ""
        ratio = row.get("ratio_to_ours")
        error = row.get("rel_l2_vs_ours")
        cells = [
            f"{label}{shared}", f"{row['median_s']:.2f}", runs,
            "1 (ours)" if system == "ours" else (f"{ratio:.2f}x" if ratio else "—"),
            _mib(row.get("peak_rss_kib")),
        ]
        if gpu:
            mem = row.get("peak_device_mem_bytes")
            cells.append(f"{mem / 2**20:,.0f}" if mem else "—")
        cells += [f"{row['tokens_per_s']:,.0f}", f"{error:.1e}" if error is not None else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def targets(sections: list[dict]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for every target the results allow checking."""
    out = []
    for section in sections:
        if section["section"] == "methods":  # four methods against one per peer pass: issue 7's targets are for CAA
            continue
        prefix = SECTION_TITLES.get(section["section"], section["section"]) + ": "
        float32 = section["meta"].get("dtype") == "float32"
        workloads = section["workloads"]
        for name, w in workloads.items():
            rows = w["rows"]
            ours = rows.get("ours", {})
            if "median_s" not in ours:
                continue
            n_layers = len(w["layers"])
            ref = rows.get("reference", {})
            if "ratio_to_ours" in ref and n_layers in TARGET_REFERENCE:
                goal = TARGET_REFERENCE[n_layers]
                out.append((f"{prefix}{name}: ≥{goal:g}x faster than rotalabs-steer 1.2.0",
                            f"{ref['ratio_to_ours']:.1f}x", ref["ratio_to_ours"] >= goal))
            sv = rows.get("steering-vectors", {})
            if "ratio_to_ours" in sv:
                out.append((f"{prefix}{name}: ≥{TARGET_STEERING_VECTORS:g}x faster than steering-vectors (same batch size)",
                            f"{sv['ratio_to_ours']:.2f}x", sv["ratio_to_ours"] >= TARGET_STEERING_VECTORS))
            stopped = rows.get("bare-stopped", {})
            if "ratio_to_ours" in stopped:
                over = 1 / stopped["ratio_to_ours"]
                cpu = section["section"] == "cpu"
                out.append((f"{prefix}{name}: ≤{TARGET_OVER_STOPPED:g}x the bare forward stopped after block "
                            f"{max(w['layers'])}" + ("" if cpu else " (a CPU target; shown for reference)"),
                            f"{over:.3f}x", (over <= TARGET_OVER_STOPPED) if cpu else None))
            for peer in ("reference", "steering-vectors"):
                error = rows.get(peer, {}).get("rel_l2_vs_ours")
                if error is not None:
                    out.append((f"{prefix}{name}: vectors match {SYSTEM_LABELS[peer]} (rel. L2 ≤ {TARGET_REL_L2:g}"
                                f"{', float32' if float32 else ''})", f"{error:.1e}",
                                error <= TARGET_REL_L2 if float32 else None))
        small, large = workloads.get("scaling-64", {}), workloads.get("scaling-1024", {})
        ours_small, ours_large = small.get("rows", {}).get("ours", {}), large.get("rows", {}).get("ours", {})
        if "median_s" in ours_small and "median_s" in ours_large:
            growth = ours_large["peak_rss_kib"] / ours_small["peak_rss_kib"] - 1
            bare_small = small["rows"].get("bare-stopped", {}).get("peak_rss_kib")
            bare_large = large["rows"].get("bare-stopped", {}).get("peak_rss_kib")
            bare = f"; bare forward stopped: {bare_large / bare_small - 1:+.1%}" if bare_small and bare_large else ""
            out.append((f"{prefix}scaling: ours' peak RSS grows ≤{TARGET_RSS_GROWTH:.0%} from "
                        f"{small['pairs']:,} to {large['pairs']:,} pairs",
                        f"{growth:+.1%} ({_mib(ours_small['peak_rss_kib'])} → {_mib(ours_large['peak_rss_kib'])} MiB{bare})",
                        growth <= TARGET_RSS_GROWTH))
            per_small = ours_small["median_s"] / small["pairs"]
            per_large = ours_large["median_s"] / large["pairs"]
            ratio = per_large / per_small
            # Linear or better: fixed costs (model warm-up per call, tokenizer start) amortize,
            # so time per pair may fall with more pairs; it must not rise.
            out.append((f"{prefix}scaling: time at most linear in pairs (time per pair at {large['pairs']:,} "
                        f"pairs ≤ {1 + TARGET_LINEAR:.2f}x that at {small['pairs']:,})",
                        f"{per_small * 1e3:.2f} → {per_large * 1e3:.2f} ms/pair ({ratio:.2f}x)",
                        ratio <= 1 + TARGET_LINEAR))
    return out


def render(results_dir: Path, md_path: Path, png_path: Path) -> None:
    sections = load_sections(results_dir)
    lines = [
        "# Extraction benchmark",
        "",
        "Written by `make bench` (`bench/run_bench.py`, drivers in `bench/peers/`) from the JSON in "
        "`bench/results/`; `python bench/run_bench.py --render-only` re-renders it.",
        "",
        "- Every system runs in its own process, in its own virtual environment (the peers from PyPI at pinned "
        "versions, see `bench/setup_peers.sh`), loads the same weights from one Hugging Face directory, "
        "and uses the same torch thread count.",
        "- Time: median wall time of the timed runs, after one untimed warm-up call (CPU: on the first pair; "
        "GPU: on all pairs, so first-use costs of each batch shape stay out of the timings). "
        "*time / ours* is that median over ours: above 1, ours is faster.",
        "- Peak RSS: the driver process's `ru_maxrss` (interpreter, imports and model included).",
        "- Tokens/s: the workload's real (unpadded) tokens divided by the median time (the same token count "
        "for every system of a workload).",
        "- rel. L2 error: max over layers of ‖ours − theirs‖ / ‖theirs‖, from the vectors of the same run.",
        "",
        "Systems, as each is driven (`bench/peers/*_driver.py`):",
        "",
        "- **ours**: `rotalabs_steer.extraction.extract_caa_vectors(..., batch_size=16, show_progress=False)`, "
        "defaults otherwise: texts bucketed by length, right-padded batches of 16, all layers in one pass, "
        "the forward stopped after the deepest requested block, float64 sums in the C accumulator.",
        "- **rotalabs-steer 1.2.0** (the reference, PyPI): its `extract_caa_vectors(model, tokenizer, dataset, "
        "layers, token_position, show_progress=False)`, which has no batch size: for each layer, one full "
        "forward per text (LM head over every position, KV cache built: `model(**inputs)`), a hook on that "
        "one block.",
        "- **steering-vectors 0.12.2** (PyPI): `train_steering_vector(model, tokenizer, pairs, layers=..., "
        "read_token_index=-1, aggregator=mean_aggregator(), batch_size=16)`: per 16 pairs, one forward of the "
        "16 positive texts and one of the 16 negatives, padded to the longest in that batch on the tokenizer's "
        "padding side (right for SmolLM2; the read index is shifted for left padding), no length bucketing, "
        "full depth with the LM head, every hooked block's whole output cloned. Its mean of "
        "(positive − negative) equals CAA's difference of means. It reads one token index, so it has no "
        "`mean` rows. Installed with `--no-deps` beside transformers 5.24.0 (it declares transformers<5, "
        "yet runs unchanged).",
        "- **bare forward**: our batches through the model with no hooks, full depth (LM head included) or "
        "stopped after the deepest requested block (a hook raises): the least compute any block-output "
        "reader needs. It does not depend on the token position, so one measurement serves the `last` "
        "and `mean` workloads.",
        "",
    ]
    for section in sections:
        meta = section["meta"]
        title = SECTION_TITLES.get(section["section"], section["section"])
        command = meta.get("command", "")
        lines += [f"## {title}", ""]
        if "--quick" in command or "--pairs" in command:
            lines += ["**Trial run (`--quick` / `--pairs`): not the full workloads; not the benchmark's result.**", ""]
        machine = f"{meta['cpu']}, {meta['cores']} cores ({meta['usable_cores']} usable)"
        if meta.get("gpu"):
            machine += f", GPU {meta['gpu']}"
        lines += [
            f"- Date: {meta['date']}; machine: {machine}; load average at the end: {meta.get('load_average') or 0:.2f}.",
            f"- torch {meta['torch']}, transformers {meta['transformers']}, Python {meta['python']}; "
            f"{meta['threads']} torch threads in every system; {meta['device']}, {meta['dtype']}.",
            f"- Command: `{meta['command']}`" + (f", at commit {meta['commit']}." if meta.get("commit") else "."),
        ]
        for name, m in meta.get("models", {}).items():
            lines.append(f"- Model `{name}`: {m['parameters'] / 1e6:,.1f}M parameters, {m['blocks']} decoder blocks.")
        commands = sorted({w["command"] for w in section["workloads"].values()} - {meta["command"]})
        for command in commands:
            lines.append(f"- Some workloads below come from an earlier run: `{command}` (dates in each table).")
        lines.append("")
        for name, w in section["workloads"].items():
            lines += workload_table(name, w, section["section"] == "gpu" or meta["device"] != "cpu")
    checks = targets(sections)
    if checks:
        lines += ["## Targets (issue 7)", "", "| target | measured | status |", "|---|---:|---|"]
        for what, measured, met in checks:
            status = "met" if met else ("missed" if met is not None else "n/a")
            lines.append(f"| {what} | {measured} | {status} |")
        lines.append("")
    # Sections other scripts wrote (bench_prefix.py, bench_evaluation.py, ...) stay, after these.
    generated = {line for line in lines if line.startswith("## ")}
    old = md_path.read_text() if md_path.is_file() else ""
    kept = [part for part in _sections(old) if part.splitlines()[0] not in generated]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines).rstrip("\n") + "".join("\n\n" + part.strip("\n") for part in kept) + "\n")
    plot(sections, png_path)


def _sections(text: str) -> list[str]:
    """The ``## `` sections of a markdown text, each from its heading to the next."""
    starts = [i for i, line in enumerate(text.splitlines()) if line.startswith("## ")]
    lines = text.splitlines()
    return ["\n".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]


def replace_section(md_path: Path, heading: str, text: str) -> None:
    """Put ``text`` (starting with the ``## heading`` line) in place of that section of
    ``md_path``, or append it."""
    if text.splitlines()[0] != heading:
        raise ValueError(f"text must start with its heading {heading!r}")
    old = md_path.read_text() if md_path.is_file() else ""
    lines = old.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    head = "\n".join(lines[:first]).strip("\n")
    parts = [part.strip("\n") for part in _sections(old)]
    if heading in (part.splitlines()[0] for part in parts):
        parts = [text.strip("\n") if part.splitlines()[0] == heading else part for part in parts]
    else:
        parts.append(text.strip("\n"))
    md_path.write_text("\n\n".join(([head] if head else []) + parts) + "\n")


def plot(sections: list[dict], png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    bars = []  # (label, ratio, system)
    for section in sections:
        tag = SECTION_TITLES.get(section["section"], section["section"])
        for name, w in section["workloads"].items():
            for system, row in w["rows"].items():
                if system != "ours" and row.get("ratio_to_ours"):
                    bars.append((f"{tag} {name} · {SYSTEM_LABELS.get(system, system)}", row["ratio_to_ours"], system))
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(bars) + 1.6))
    y = list(range(len(bars)))[::-1]
    ax.barh(y, [b[1] for b in bars], color=[COLORS.get(b[2], "#999999") for b in bars])
    ax.set_yticks(y, [b[0] for b in bars], fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(1, color="black", linewidth=0.8)
    for yy, (_, ratio, _) in zip(y, bars):
        ax.text(ratio * 1.05, yy, f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x", va="center", fontsize=7)
    ax.set_xlabel("system's median time / ours (log scale; > 1: ours faster)")
    ax.set_title("Steering-vector extraction: time relative to ours")
    ax.set_xlim(right=max(b[1] for b in bars) * 2.5)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
