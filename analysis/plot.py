"""Expert-selection histogram of a route log (and a layers x experts heatmap when
several layers were logged).

    python -m analysis.plot LOG -o expert_hist.png [--layer N] [--weighted] [--sort] [--json]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from analysis.logfile import check_output, read_for_cli
from analysis.metrics import expert_shares, layer_stats, model_title


def draw_histogram(shares, stats: dict, title: str, path: Path, weighted: bool, sort: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = shares.sort_values(ascending=False, kind="stable").index if sort else shares.index
    values = shares.loc[order].to_numpy()
    top = {t["expert"] for t in stats["top3"]}
    colors = ["#d62728" if e in top else "#4c72b0" for e in order]
    fig, ax = plt.subplots(figsize=(max(8, 0.2 * len(values) + 3), 4.5))
    x = np.arange(len(values))
    ax.bar(x, values, color=colors, width=0.8)
    uniform = 1 / len(values)
    ax.axhline(uniform, color="black", linestyle="--", linewidth=1, label=f"uniform 1/{len(values)} = {uniform:.2%}")
    for rank, t in enumerate(stats["top3"], 1):
        xpos = list(order).index(t["expert"])
        ax.annotate(f"{rank}", (xpos, t["share"]), ha="center", va="bottom", fontsize=8, weight="bold")
    step = max(1, len(values) // 30)
    ax.set_xticks(x[::step], [str(e) for e in list(order)[::step]], fontsize=8)
    ax.set_xlabel("expert" + (" (sorted by share)" if sort else ""))
    ax.set_ylabel("share of summed gate weight" if weighted else "share of selections")
    ax.set_ylim(0, max(values.max(), uniform) * 1.25)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_title(title, fontsize=10)
    top3 = ", ".join(f"{t['expert']} ({t['share']:.1%})" for t in stats["top3"])
    ax.legend(loc="upper right", fontsize=8, title=f"red, 1-3: top-3 experts {top3}", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_heatmap(matrix: np.ndarray, layers: list[int], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_experts = matrix.shape[1]
    fig, ax = plt.subplots(figsize=(max(8, 0.18 * num_experts + 3), max(3, 0.28 * len(layers) + 2)))
    relative = matrix * num_experts  # 1 = the uniform share
    norm = matplotlib.colors.TwoSlopeNorm(vmin=0, vcenter=1, vmax=max(2.0, float(np.nanmax(relative))))
    image = ax.imshow(relative, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    step = max(1, num_experts // 30)
    ax.set_xticks(range(0, num_experts, step), [str(e) for e in range(0, num_experts, step)], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="share / uniform share (red: busier)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(log, layer: int, out: Path, weighted: bool = False, sort: bool = False) -> list[Path]:
    """The histogram of one layer at ``out``; with several layers logged, also the
    layers x experts heatmap beside it (``<stem>_layers.png``)."""
    model = model_title(log.meta)
    stats = layer_stats(log, layer, weighted)
    title = (f"{model} - layer {layer}: {stats['tokens']} tokens, {log.requests} requests, "
             f"top-{log.meta['top_k']} of {log.meta['num_experts']}")
    draw_histogram(expert_shares(log.loads, layer, weighted=weighted), stats, title, out, weighted, sort)
    layers = log.meta["layers_logged"]
    if len(layers) == 1:
        return [out]
    matrix = np.stack([expert_shares(log.loads, lay, weighted=weighted).to_numpy() for lay in layers])
    heatmap = out.with_name(f"{out.stem}_layers{out.suffix}")
    draw_heatmap(matrix, layers, f"{model}: expert share per layer", heatmap)
    return [out, heatmap]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Expert histogram of a VLLM_LOG_MOE log")
    parser.add_argument("log")
    parser.add_argument("-o", "--output", default="expert_hist.png")
    parser.add_argument("--layer", type=int, help="logged layer to plot (default: the first)")
    parser.add_argument("--weighted", action="store_true", help="summed gate weight instead of counts")
    parser.add_argument("--sort", action="store_true", help="order experts by share")
    parser.add_argument("--json", action="store_true", help="print the plotted shares as JSON")
    args = parser.parse_args(argv)
    check_output(args.output)
    log, (layer, *_) = read_for_cli(args.log, None if args.layer is None else [args.layer])
    written = write_plots(log, layer, Path(args.output), args.weighted, args.sort)
    shares = expert_shares(log.loads, layer, weighted=args.weighted)
    stats = layer_stats(log, layer, args.weighted)
    if args.json:
        print(json.dumps({"layer": layer, "weighted": args.weighted, "shares": [float(s) for s in shares],
                          "top3": stats["top3"], "files": [str(w) for w in written]}))
    else:
        print("\n".join(f"wrote {w}" for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
