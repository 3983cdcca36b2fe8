"""Routing statistics of a route log, per logged layer.

    python -m analysis.stats LOG [--layer N] [--weighted] [--json] [--note]
"""

import argparse
import json
import sys

from analysis.logfile import read_for_cli
from analysis.placement import eplb_placer
from analysis.sequence import add_sequence_metrics
from analysis.metrics import (analysis_note, confidence_stats, layer_stats, load_over_time, token_specialisation,
                              top_pairs)
from analysis.tokens import decoder


def report(log, layers: list[int], weighted: bool, cached: bool = True, decode=None, placer=None) -> dict:
    return {
        "model_id": log.meta["model_id"],
        "num_experts": log.meta["num_experts"],
        "top_k": log.meta["top_k"],
        "requests": log.requests,
        "route_records": log.records,
        "duplicates": log.duplicates,
        "complete": log.end is not None and not log.truncated_tail,
        "notes": log.notes,
        # Only where the front end cut a response (a stop string): see the note.
        **({"positions_not_returned": log.not_returned} if log.not_returned else {}),
        "layers": [layer_stats(log, layer, weighted, cached, placer) for layer in layers],
        # Over every distinct record, cached ones included:
        "coactivation": [{"layer": layer, "top_pairs": top_pairs(log, layer)} for layer in layers],
        "confidence": [{"layer": layer, **confidence_stats(log, layer)} for layer in layers],
        "load_over_time": [{"layer": layer, **load_over_time(log, layer)} for layer in layers],
        # null when the log holds no token ids (written before they were logged)
        # (for the first layer asked, or up to four with --layer; dense counts per layer)
        "token_specialisation": None if log.token_counts is None else [
            {"layer": layer, "experts": token_specialisation(log, layer, decode=decode)}
            for layer in layers if layer in log.token_layers],
    }


def format_text(rep: dict) -> str:
    lines = [f"{rep['model_id']}: {rep['requests']} requests, {rep['route_records']} route records, "
             f"top-{rep['top_k']} of {rep['num_experts']} experts"]
    lines += [f"note: {n}" for n in rep["notes"]]
    for s in rep["layers"]:
        top3 = ", ".join(f"{t['expert']} ({t['share']:.1%})" for t in s["top3"])
        lines += [
            "",
            f"layer {s['layer']} ({'gate-weight' if s['weighted'] else 'selection'} shares, {s['tokens']} tokens: "
            f"{s['tokens_computed']} computed, {s['tokens_cached']} from the prefix cache"
            f"{'' if s['cached_included'] else ', left out'})",
            f"  top-3 experts      {top3}",
            f"  entropy            {s['entropy_bits']:.3f} bits, normalised {s['entropy_norm']:.3f}",
            f"  max/mean load      {s['max_over_mean']:.2f}   cv {s['cv']:.3f}   unused {s['unused_experts']}",
        ]
        for phase in ("prompt", "generated"):
            p = s[phase]
            lines.append(f"  {phase:<10} {p['tokens']:>7} tokens  entropy_norm {p['entropy_norm']:.3f}  "
                         f"max/mean {p['max_over_mean']:.2f}  cv {p['cv']:.3f}")
        pairs = next(c["top_pairs"] for c in rep["coactivation"] if c["layer"] == s["layer"])[:3]
        lines.append("  co-chosen pairs    " + (", ".join(
            f"{p['experts'][0]}+{p['experts'][1]} lift {p['lift']:.2f} ({p['count']})" for p in pairs) or "-"))
        conf = next(c for c in rep["confidence"] if c["layer"] == s["layer"])
        if conf["top1_weight"]["tokens"]:
            lines.append(f"  top-1 weight       median {conf['top1_weight']['median']:.2f}   top-k mass median "
                         f"{conf['topk_mass']['median']:.2f}")
        over_time = next(c for c in rep["load_over_time"] if c["layer"] == s["layer"])
        lines.append(f"  max/mean over time median {over_time['median']:.2f}, worst {over_time['worst']:.2f} "
                     f"({over_time['windows']} windows of {over_time['window_tokens']} tokens)")
        shares = s["shares"]
        lines.append("  shares by expert")
        for start in range(0, len(shares), 10):
            row = "  ".join(f"{start + i:>3}:{v:6.2%}" for i, v in enumerate(shares[start:start + 10]))
            lines.append(f"    {row}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Routing statistics of a VLLM_LOG_MOE log")
    parser.add_argument("log")
    parser.add_argument("--layer", type=int, action="append", help="a logged layer (repeatable; default all)")
    parser.add_argument("--weighted", action="store_true", help="shares of summed gate weight, not of selections")
    parser.add_argument("--no-cached", dest="cached", action="store_false",
                        help="leave out prompt positions served from the prefix cache (expert work, "
                             "not the routing every token got)")
    parser.add_argument("--tokenizer", help="decode token ids with this tokenizer (path or hub id; default: "
                                             "the logged model's, when its files are here)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--note", action="store_true", help="only the README analysis note (first layer asked)")
    parser.add_argument("--eplb", action="store_true", help="rebalance with vLLM's EPLB policy (imports vLLM, "
                                                            "~9 s) instead of a greedy longest-processing-time one")
    args = parser.parse_args(argv)
    log, layers = read_for_cli(args.log, args.layer)
    if args.note:
        note = analysis_note(log, layers[0])
        print(json.dumps({"layer": layers[0], "note": note}) if args.json else note)
        return 0
    placer = eplb_placer() if args.eplb else None
    rep = report(log, layers, args.weighted, args.cached, decoder(args.tokenizer, log.meta.get("model_id")), placer)
    if args.json:  # from the log's neighbouring records, through DuckDB
        add_sequence_metrics(rep, log, args.log, layers)
    print(json.dumps(rep, indent=1) if args.json else format_text(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
