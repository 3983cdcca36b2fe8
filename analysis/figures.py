"""The report's figures beyond the expert histogram: co-activation lift, gate confidence
and load over time. Each takes what analysis.metrics computed and writes one PNG."""

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


def _expert_ticks(ax, num_experts: int, axis: str = "x") -> None:
    step = max(1, num_experts // 20)
    ticks = range(0, num_experts, step)
    getattr(ax, f"set_{axis}ticks")(ticks, [str(e) for e in ticks], fontsize=7)


def draw_coactivation(lift: np.ndarray, title: str, path: Path) -> None:
    """Experts x experts, colour = lift on a log scale centred on 1 (as independent)."""
    matplotlib, plt = _pyplot()
    e = lift.shape[0]
    finite = lift[np.isfinite(lift) & (lift > 0)]
    top = max(2.0, float(np.percentile(finite, 99))) if finite.size else 2.0
    norm = matplotlib.colors.LogNorm(vmin=1 / top, vmax=top)
    size = min(12, max(5, 0.12 * e + 3))
    fig, ax = plt.subplots(figsize=(size + 2.5, size))
    shown = np.where(lift > 0, lift, np.nan)
    image = ax.imshow(shown, cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax.set_facecolor("#dddddd")
    _expert_ticks(ax, e, "x")
    _expert_ticks(ax, e, "y")
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title(title, fontsize=10)
    ticks = [t for t in (0.125, 0.25, 0.5, 1, 2, 4, 8, 16) if 1 / top <= t <= top]
    bar = fig.colorbar(image, ax=ax, shrink=0.8, ticks=ticks,
                       label="lift: chosen together / if independent\n(1: as expected; grey: never together)")
    bar.ax.set_yticklabels([f"{t:g}" for t in ticks])
    bar.ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_confidence(confidence, selection_shares, weight_shares, title: str, path: Path) -> None:
    """Histograms of the top-1 weight and the top-k mass; each expert's share of the
    gate weight against its share of the selections."""
    matplotlib, plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, measure, label in zip(axes, ("top1_weight", "topk_mass"), ("top-1 gate weight", "top-k weight mass")):
        rows = confidence[confidence["measure"] == measure]
        centres, shares, width = _rebinned(rows["bin_low"].to_numpy(), rows["count"].to_numpy())
        ax.bar(centres, shares, width=width * 0.95, color="#4c72b0")
        ax.set_xlim(centres[0] - width, centres[-1] + width)
        ax.set_xlabel(f"{label} per token")
        ax.set_ylabel("share of tokens")
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax = axes[2]
    ax.scatter(selection_shares, weight_shares, s=14, color="#4c72b0")
    top = max(float(np.nanmax(selection_shares)), float(np.nanmax(weight_shares))) * 1.1
    ax.plot([0, top], [0, top], color="black", linestyle="--", linewidth=1, label="equal shares")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("expert's share of selections")
    ax.set_ylabel("expert's share of gate weight")
    ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_load_over_time(windows, title: str, path: Path, max_layers: int = 8) -> None:
    """Max/mean expert load per window of tokens, one line per layer (the first
    ``max_layers`` logged)."""
    matplotlib, plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    layers = sorted(windows["layer"].unique())[:max_layers]
    size = int(windows["tokens"].max()) if len(windows) else 0
    partial = bool((windows["tokens"] < size).any()) and bool((windows["tokens"] == size).any())
    for layer in layers:
        rows = windows[windows["layer"] == layer]
        if partial:  # a last window of a few tokens would look like a spike
            rows = rows[rows["tokens"] == size]
        ax.plot(rows["window"], rows["max_over_mean"], marker="o" if len(rows) < 30 else None,
                markersize=3, linewidth=1, label=f"layer {layer}")
    ax.axhline(1, color="black", linestyle="--", linewidth=1, label="balanced")
    ax.set_xlabel(f"window of {size} tokens, in the log's order" + (" (the last, partial one left out)" if partial else ""))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("busiest expert / mean load")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rebinned(lows: np.ndarray, counts: np.ndarray, bars: int = 40):
    """The occupied part of a fine histogram in about ``bars`` bars: centres, shares, width."""
    width = lows[1] - lows[0]
    used = np.flatnonzero(counts)
    if not used.size:
        return lows[:1] + width / 2, np.zeros(1), width
    first, last = used[0], used[-1] + 1
    group = max(1, -(-(last - first) // bars))
    sums = np.add.reduceat(counts[first:last], np.arange(0, last - first, group))
    centres = lows[first] + (np.arange(len(sums)) + 0.5) * group * width
    return centres, sums / counts.sum(), group * width


def draw_ep_balance(balance: dict, title: str, path: Path) -> None:
    """Per EP size: mean/max per-rank load, contiguous placement against a rebalanced one."""
    matplotlib, plt = _pyplot()
    sizes = list(balance)
    x = np.arange(len(sizes))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(sizes) + 3), 4))
    method = next(iter(balance.values()))["rebalanced_by"] if balance else ""
    for offset, key, label, colour in ((-0.2, "contiguous", "contiguous (vLLM's default placement)", "#4c72b0"),
                                       (0.2, "rebalanced", f"rebalanced from these loads ({method})", "#dd8452")):
        ax.bar(x + offset, [balance[n][key] for n in sizes], 0.4, label=label, color=colour)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="even: every rank equally loaded")
    ax.set_xticks(x, sizes)
    ax.set_xlabel("expert-parallel size (ranks)")
    ax.set_ylabel("mean / max tokens per rank")
    ax.set_ylim(0, 1.15)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_layer_affinity(affinity: list[dict], num_experts: int, title: str, path: Path) -> None:
    """Per pair of consecutively logged layers: how much the top-1 expert at the first
    leaves open at the next, in bits, with the most frequent transition named."""
    matplotlib, plt = _pyplot()
    labels = [f"{a['from']} -> {a['to']}" for a in affinity]
    values = [a["cond_entropy_bits"] for a in affinity]
    fig, ax = plt.subplots(figsize=(max(8, 0.8 * len(labels) + 3), 4.5))
    bars = ax.bar(np.arange(len(labels)), values, color="#55a868")
    limit = float(np.log2(num_experts))
    ax.axhline(limit, color="black", linestyle="--", linewidth=1,
               label=f"log2({num_experts}) = {limit:.2f} bits: nothing carried over")
    for bar, a in zip(bars, affinity):
        if a["top_transitions"]:
            t = a["top_transitions"][0]
            ax.annotate(f"{t['from_expert']}->{t['to_expert']}\n{t['share']:.1%}", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
    ax.set_xlabel("logged layer -> next logged layer (above a bar: its commonest top-1 transition)")
    ax.set_ylabel("H(top-1 at next | top-1 at this), bits")
    ax.set_ylim(0, limit * 1.25)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
