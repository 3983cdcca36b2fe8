"""Every analysis of a route log in one folder: the figures, stats.json, the short note
and report.md, which embeds the figures.

    python -m analysis.report LOG -o DIR [--layer N] [--no-cached] [--json]
"""

import argparse
import json
import sys
from pathlib import Path

from analysis.figures import (draw_coactivation, draw_confidence, draw_ep_balance, draw_layer_affinity,
                              draw_load_over_time)
from analysis.logfile import check_output, read_for_cli
from analysis.metrics import analysis_note, coactivation, expert_shares, model_title
from analysis.plot import write_plots
from analysis.sequence import add_sequence_metrics
from analysis.stats import report
from analysis.tokens import decoder


def write_report(log, out: Path, layer: int, cached: bool = True, decode=None,
                 path: Path | None = None) -> dict[str, Path]:
    """The files written, by name. ``path``: the log's, for the metrics DuckDB computes
    over neighbouring records (analysis/sequence.py); without it they are left out."""
    out.mkdir(parents=True, exist_ok=True)
    title = model_title(log.meta)
    files = dict(zip(("expert_hist", "expert_layers"), write_plots(log, layer, out / "expert_hist.png")))
    files["coactivation"] = out / "coactivation.png"
    draw_coactivation(coactivation(log, layer), f"{title} - layer {layer}: experts chosen together",
                      files["coactivation"])
    files["confidence"] = out / "confidence.png"
    draw_confidence(log.confidence[log.confidence["layer"] == layer], expert_shares(log.loads, layer),
                    expert_shares(log.loads, layer, weighted=True), f"{title} - layer {layer}: gate confidence",
                    files["confidence"])
    files["load_over_time"] = out / "load_over_time.png"
    draw_load_over_time(log.windows, f"{title}: expert load imbalance over time", files["load_over_time"])
    stats = report(log, log.meta["layers_logged"], weighted=False, cached=cached, decode=decode)
    layer_stats = next(s for s in stats["layers"] if s["layer"] == layer)
    files["ep_balance"] = out / "ep_balance.png"
    draw_ep_balance(layer_stats["ep_balance"], f"{title} - layer {layer}: expert-parallel balance",
                    files["ep_balance"])
    if path is not None:
        add_sequence_metrics(stats, log, path, log.meta["layers_logged"])
        if stats["layer_affinity"]:
            files["layer_affinity"] = out / "layer_affinity.png"
            draw_layer_affinity(stats["layer_affinity"], log.meta["num_experts"],
                                f"{title}: top-1 expert carried from layer to layer", files["layer_affinity"])
    files["stats"] = out / "stats.json"
    files["stats"].write_text(json.dumps(stats, indent=1) + "\n")
    files["note"] = out / "analysis_note.md"
    files["note"].write_text(analysis_note(log, layer) + "\n")
    files["report"] = out / "report.md"
    files["report"].write_text(markdown(log, stats, layer, files))
    return files


def markdown(log, stats: dict, layer: int, files: dict[str, Path]) -> str:
    layer_stats = next(s for s in stats["layers"] if s["layer"] == layer)
    pairs = next(c["top_pairs"] for c in stats["coactivation"] if c["layer"] == layer)[:5]
    conf = next(c for c in stats["confidence"] if c["layer"] == layer)
    over_time = next(c for c in stats["load_over_time"] if c["layer"] == layer)
    lines = [f"# Routing report: {model_title(log.meta)}", "",
             f"{stats['requests']} requests, {stats['route_records']} route records, top-{stats['top_k']} "
             f"of {stats['num_experts']} experts, layers {log.meta['layers_logged']}; figures for layer {layer}. "
             f"Tokens: {layer_stats['tokens_computed']} computed, {layer_stats['tokens_cached']} "
             f"from the prefix cache{'' if layer_stats['cached_included'] else ' (left out)'}.", ""]
    lines += [f"- note: {n}" for n in stats["notes"]] + ([""] if stats["notes"] else [])
    lines += ["## Expert load", "", analysis_note(log, layer), "", f"![expert load]({files['expert_hist'].name})", ""]
    if "expert_layers" in files:
        lines += [f"![expert load per layer]({files['expert_layers'].name})", ""]
    lines += ["## Co-activation", "",
              "Pairs of experts chosen for the same token, against independent choices with the same "
              "loads (lift 1). Highest lift, at least 10 tokens:", "",
              "| experts | tokens | lift |", "| --- | --- | --- |"]
    lines += [f"| {a} + {b} | {p['count']} | {p['lift']:.2f} |" for p in pairs for a, b in [p["experts"]]]
    lines += ["", f"![co-activation]({files['coactivation'].name})", "", "## Gate confidence", ""]
    if conf["top1_weight"]["tokens"]:
        lines += [f"Top-1 weight: median {conf['top1_weight']['median']:.2f} (p10 {conf['top1_weight']['p10']:.2f}, "
                  f"p90 {conf['top1_weight']['p90']:.2f}); top-k mass: median {conf['topk_mass']['median']:.2f}.", ""]
    lines += [f"![gate confidence]({files['confidence'].name})", "", "## Load over time", "",
              f"Max/mean expert load per window of {over_time['window_tokens']} tokens: median "
              f"{over_time['median']:.2f}, worst {over_time['worst']:.2f} over {over_time['windows']} windows.", "",
              f"![load over time]({files['load_over_time'].name})", ""]
    balance = layer_stats["ep_balance"]
    lines += ["## Expert-parallel placement", "",
              f"MaxVio (max load - mean load) / mean load: {layer_stats['max_violation']:.2f}. Mean/max tokens "
              "per rank with vLLM's contiguous placement and after rebalancing from these loads "
              f"({next(iter(balance.values()))['rebalanced_by'] if balance else '-'}):", "",
              "| EP size | contiguous | rebalanced |", "| --- | --- | --- |"]
    lines += [f"| {n} | {b['contiguous']:.3f} | {b['rebalanced']:.3f} |" for n, b in balance.items()]
    lines += ["", f"![expert-parallel balance]({files['ep_balance'].name})", ""]
    if "layer_affinity" in files:
        lines += ["## Layer to layer", "",
                  "How much the top-1 expert at one logged layer leaves open at the next (0 bits: it decides it; "
                  "log2 of the expert count: nothing carried over), and the mean overlap of consecutive positions' "
                  "top-k sets:", "", "| layers | bits | most frequent top-1 transition |", "| --- | --- | --- |"]
        for a in stats["layer_affinity"]:
            t = a["top_transitions"][0] if a["top_transitions"] else None
            lines.append(f"| {a['from']} -> {a['to']} | {a['cond_entropy_bits']:.2f} | "
                         + (f"{t['from_expert']} -> {t['to_expert']} ({t['share']:.1%})" if t else "-") + " |")
        lines += ["", f"Adjacent-position overlap (Jaccard) at layer {layer}: {layer_stats['adjacent_overlap']:.3f}.", "",
                  f"![layer affinity]({files['layer_affinity'].name})", ""]
    return "\n".join(lines + token_table(stats, layer))


def token_table(stats: dict, layer: int, experts: int = 8) -> list[str]:
    """The busiest experts' most specific tokens (lift over the token's frequency)."""
    lines = ["## Token specialisation", ""]
    if stats["token_specialisation"] is None:
        return lines + ["This log holds no token ids (written before the fork logged them).", ""]
    rows = next((t["experts"] for t in stats["token_specialisation"] if t["layer"] == layer), None)
    if rows is None:
        return lines + [f"Token ids were counted for layers {[t['layer'] for t in stats['token_specialisation']]} only.", ""]
    busiest = sorted(rows, key=lambda r: -r["selections"])[:experts]
    lines += [f"The {len(busiest)} busiest experts of layer {layer}: the tokens each sees most often "
              "relative to their frequency (lift), seen at least 5 times.", "",
              "| expert | selections | most specific tokens (lift) |", "| --- | --- | --- |"]
    for r in busiest:
        tokens = ", ".join(f"{_shown(t)} ({t['lift']:.1f})" for t in r["most_specific"]) or "-"
        lines.append(f"| {r['expert']} | {r['selections']} | {tokens} |")
    return lines + [""]


def _shown(token: dict) -> str:
    """The id, and the decoded text when there is some (a Markdown table cell)."""
    text = token.get("text")
    shown = f"`{token['token']}`" + (f" `{text!r}`" if text else "")
    return shown.replace("|", "\\|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="All analyses of a VLLM_LOG_MOE log, with report.md")
    parser.add_argument("log")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the report")
    parser.add_argument("--layer", type=int, help="logged layer of the figures (default: the first)")
    parser.add_argument("--no-cached", dest="cached", action="store_false",
                        help="statistics without the positions served from the prefix cache")
    parser.add_argument("--tokenizer", help="decode token ids with this tokenizer (default: the logged model's)")
    parser.add_argument("--json", action="store_true", help="print the files written as JSON")
    args = parser.parse_args(argv)
    check_output(args.output)
    log, (layer, *_) = read_for_cli(args.log, None if args.layer is None else [args.layer])
    files = write_report(log, args.output, layer, args.cached, decoder(args.tokenizer, log.meta.get("model_id")),
                         Path(args.log))
    if args.json:
        print(json.dumps({name: str(path) for name, path in files.items()}))
    else:
        print("\n".join(f"wrote {path}" for path in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
