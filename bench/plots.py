"""Draw the benchmark results already in docs/*.json as PNG plots in docs/.

    PYTHONPATH=. python bench/plots.py

Prints the path of each PNG it writes.
"""
from __future__ import annotations

import os
import sys

# Run as a script, Python puts bench/ first on sys.path: put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # no display: render straight to files
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

DOCS = os.path.join(sys.path[0], "docs")
PATH_COLORS = {"triton": "tab:blue", "direct": "tab:orange"}


def _load(name: str) -> dict:
    with open(os.path.join(DOCS, name)) as f:
        return json.load(f)


def _save(fig: plt.Figure, name: str, device: str) -> str:
    fig.text(0.99, 0.01, f"device: {device}", ha="right", va="bottom", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = os.path.join("docs", name)
    fig.savefig(os.path.join(DOCS, name), dpi=120)
    plt.close(fig)
    return path


def _case_family(case: str) -> str:
    # "32 adapters, rank 8 q,k,v,o" -> "N distinct adapters, rank 8 q,k,v,o"; "1 adapter, ..." kept.
    count, _, rest = case.partition(" ")
    if count.isdigit() and count != "1":
        return "N distinct " + rest
    return case


def plot_decode_throughput() -> str:
    data = _load("bench_engine_h100.json")
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    floor: list[tuple[int, float]] = []
    for row in data["rows"]:
        series[_case_family(row["case"])].append((row["batch"], row["tokens_per_s"]))
        if row["case"] == "LoRA off":
            floor.append((row["batch"], row["batch"] / row["floor_ms"] * 1000))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Legend in the order the bench lists cases at its largest batch, where every family is present.
    by_batch = sorted(data["rows"], key=lambda row: -row["batch"])
    for family in dict.fromkeys(_case_family(row["case"]) for row in by_batch):
        ax.plot(*zip(*sorted(series[family])), marker="o", label=family)
    ax.plot(*zip(*sorted(floor)), "k--", label="bandwidth floor (LoRA off)")
    ax.set_xscale("log", base=2)
    batches = sorted({b for b, _ in floor})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("decode throughput (tokens/s)")
    ax.set_title("Decode throughput, Llama-7B shape, fp16, context ~256 tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, "plot_decode_throughput.png", data["device"])


def plot_peers() -> str:
    runs = {"earlier run": _load("bench_peers_h100_run1.json"), "latest run": _load("bench_peers_h100.json")}
    groups = [(run, key) for run in runs for key in ("0", "16")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.38
    for i, (run, key) in enumerate(groups):
        hf, ours = runs[run]["hf_peft"][key], runs[run]["multilora"][key]
        ax.bar(i - width / 2, hf, width, color="tab:gray", label="HF + PEFT" if i == 0 else None)
        ax.bar(i + width / 2, ours, width, color="tab:green", label="multilora" if i == 0 else None)
        ax.text(i + width / 2, ours * 1.1, f"{ours / hf:.0f}x", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(groups)),
                  [f"{run}\n{'base model' if key == '0' else key + ' adapters'}" for run, key in groups])
    ax.set_yscale("log")
    ax.set_ylim(top=ax.get_ylim()[1] * 3)  # room for the ratio labels
    ax.set_ylabel("decode throughput (tokens/s, log)")
    ax.set_title("multilora against HF + PEFT (ratio above each multilora bar)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, "plot_peers.png", runs["latest run"]["device"])


def _serving_results() -> tuple[dict, list[str]]:
    data = _load("bench_serving_h100.json")
    results = [r for r in data["results"] if "skipped" not in r]
    labels = list(dict.fromkeys(r["config"]["label"] for r in results))  # first-seen order
    return data, labels


def plot_serving_latency() -> str:
    data, labels = _serving_results()
    markers = {"p50": "o", "p90": "s", "p99": "^"}
    offsets = {"triton": -0.15, "direct": 0.15}
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    for ax, metric, name in zip(axes, ("ttft_ms", "itl_ms"), ("time to first token", "inter-token latency")):
        for r in data["results"]:
            if "skipped" in r:
                continue
            x = labels.index(r["config"]["label"]) + offsets[r["path"]]
            values = r["summary"][metric]
            color = PATH_COLORS[r["path"]]
            ax.vlines(x, values["p50"], values["p99"], color=color, alpha=0.5)
            for pct, marker in markers.items():
                ax.plot(x, values[pct], marker=marker, color=color, linestyle="none")
        ax.set_yscale("log")
        ax.set_xticks(range(len(labels)), [label.replace(" ", "\n", 2) for label in labels], fontsize=8)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_ylabel(f"{name} (ms, log)")
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    handles = [Line2D([], [], color=c, lw=4, label=p) for p, c in PATH_COLORS.items()]
    handles += [Line2D([], [], color="k", marker=m, linestyle="none", label=p) for p, m in markers.items()]
    axes[1].legend(handles=handles, fontsize=8, loc="upper right")
    fig.suptitle("Serving latency percentiles: through Triton against engine-direct")
    return _save(fig, "plot_serving_latency.png", data["device"])


def plot_serving_throughput() -> str:
    data, labels = _serving_results()
    width = 0.38
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path, offset in (("triton", -width / 2), ("direct", width / 2)):
        rows = {r["config"]["label"]: r["summary"]["token_throughput"]
                for r in data["results"] if "skipped" not in r and r["path"] == path}
        xs = [i + offset for i, label in enumerate(labels) if label in rows]
        ax.bar(xs, [rows[label] for label in labels if label in rows], width,
               color=PATH_COLORS[path], label=path)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("workload (suite, adapters, request rate)")
    ax.set_ylabel("output throughput (tokens/s)")
    ax.set_title("Serving output throughput: through Triton against engine-direct")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, "plot_serving_throughput.png", data["device"])


def main() -> None:
    for plot in (plot_decode_throughput, plot_peers, plot_serving_latency, plot_serving_throughput):
        print(plot())


if __name__ == "__main__":
    main()
