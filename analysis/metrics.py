"""Routing statistics: pure functions over the expert-load table of logfile.read_log
(columns layer, phase, expert, count, weight)."""

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.placement import ep_balance, max_violation
from analysis.log_format import PHASES, RouteLog


def short_name(model_id: str) -> str:
    """Hub ids ("org/name") stay as they are; a local checkpoint path is shown by its
    last two parts."""
    local = model_id.startswith(("/", ".")) or model_id.count("/") > 1
    return "/".join(Path(model_id).parts[-2:]) if local else model_id


def model_title(meta: dict) -> str:
    """The model as plots name it: the served name when one was given, else the model id
    (a local path by its last two parts); says so when the weights were random (load_format dummy)."""
    name = short_name(meta.get("served_model_name") or meta.get("model_id", "unnamed model"))
    return f"{name} [dummy weights]" if meta.get("load_format") == "dummy" else name


def expert_shares(loads: pd.DataFrame, layer: int, phases=None, weighted: bool = False) -> pd.Series:
    """Each expert's share of the layer's selections (or of its summed gate weight),
    every expert present, summing to 1; all NaN if nothing was routed."""
    keep = loads["layer"].to_numpy() == layer
    if phases is not None:
        keep &= np.isin(loads["phase"].to_numpy(), [phases] if isinstance(phases, str) else phases)
    column = "weight" if weighted else "count"
    experts, values = loads["expert"].to_numpy()[keep], loads[column].to_numpy()[keep]
    present = np.unique(experts)
    totals = np.bincount(experts, weights=values)[present] if len(experts) else np.zeros(0)
    shares = totals / totals.sum() if totals.sum() > 0 else totals * np.nan
    return pd.Series(shares, index=pd.Index(present, name="expert"), name=column)


def entropy_bits(shares: pd.Series) -> float:
    p = shares[shares > 0].to_numpy()
    return float(-(p * np.log2(p)).sum()) if len(p) else math.nan


def distribution_stats(shares: pd.Series) -> dict:
    """Top-3, entropy (bits and / log2(num_experts)), max/mean load, coefficient of variation."""
    num_experts = len(shares)
    values, experts = shares.to_numpy(), shares.index.to_numpy()
    if np.isnan(values).all():
        return {"top3": [], "entropy_bits": math.nan, "entropy_norm": math.nan,
                "max_over_mean": math.nan, "cv": math.nan, "unused_experts": num_experts}
    top = np.argsort(-values, kind="stable")[:3]  # ties: the lower expert first
    entropy = entropy_bits(shares)
    mean = 1.0 / num_experts
    return {
        "top3": [{"expert": int(e), "share": float(s)} for e, s in zip(experts[top], values[top])],
        "entropy_bits": entropy,
        "entropy_norm": entropy / math.log2(num_experts) if num_experts > 1 else math.nan,
        "max_over_mean": float(values.max() / mean),
        "cv": float(values.std() / mean),
        "unused_experts": int((values == 0).sum()),
    }


def layer_stats(log: RouteLog, layer: int, weighted: bool = False, cached: bool = True, placer=None) -> dict:
    """One layer: the distribution over all tokens, then prompt and generated apart, and
    the expert-parallel placement metrics of its selections (analysis/placement.py).
    ``cached``: count prompt positions the prefix cache served (the routing the model
    saw for every token) or leave them out (the work the experts did)."""
    tokens = log.tokens[log.tokens["layer"] == layer].set_index("phase")["tokens"]
    counted = [p for p in PHASES if cached or p != "cached"]
    shares = expert_shares(log.loads, layer, counted, weighted)
    out = {"layer": layer, "weighted": weighted, "cached_included": cached,
           "tokens": int(tokens[counted].sum()), "tokens_computed": int(tokens.drop("cached").sum()),
           "tokens_cached": int(tokens.get("cached", 0)), **distribution_stats(shares),
           "shares": [float(s) for s in shares]}
    for phase, phases in (("prompt", ["prompt", "cached"] if cached else ["prompt"]), ("generated", ["generated"])):
        phase_shares = expert_shares(log.loads, layer, phases, weighted)
        out[phase] = {"tokens": int(tokens[phases].sum()), **distribution_stats(phase_shares)}
    if tokens.get("unknown", 0):
        out["unknown_phase_tokens"] = int(tokens["unknown"])
    selections = expert_shares(log.loads, layer, counted).fillna(0).to_numpy()
    out["max_violation"] = max_violation(selections)
    out["ep_balance"] = ep_balance(selections, placer)
    return out


def interpretation(stats: dict) -> str:
    if not stats["top3"]:
        return "Nothing was routed in this layer."
    top = stats["top3"][0]
    if stats["max_over_mean"] >= 2 or stats["entropy_norm"] < 0.85:
        return (f"Routing is concentrated: expert {top['expert']} takes "
                f"{stats['max_over_mean']:.1f}x its uniform share, so a few experts carry much of the load.")
    if stats["max_over_mean"] <= 1.25 and stats["entropy_norm"] >= 0.98:
        return "Routing is close to uniform: no expert is favoured much over the others."
    return (f"Routing is mildly uneven: the busiest expert ({top['expert']}) takes "
            f"{stats['max_over_mean']:.2f}x its uniform share.")


def analysis_note(log: RouteLog, layer: int) -> str:
    """The 5-8 line plain-language note the README carries."""
    s = layer_stats(log, layer)
    num_experts = log.meta["num_experts"]
    top3 = ", ".join(f"expert {t['expert']} ({t['share']:.1%})" for t in s["top3"])
    low = min(s["shares"])
    return "\n".join([
        f"- Model {model_title(log.meta)}, layer {layer}: {s['tokens']} routed tokens from "
        f"{log.requests} requests, top-{log.meta['top_k']} of {num_experts} experts.",
        f"- Top-3 experts by selections: {top3} (uniform share {1 / num_experts:.1%}).",
        f"- Distribution: shares range from {low:.1%} to {max(s['shares']):.1%}; "
        f"{s['unused_experts']} experts never chosen; coefficient of variation {s['cv']:.2f}.",
        f"- Entropy {s['entropy_bits']:.2f} bits of {math.log2(num_experts):.2f} possible "
        f"(normalised {s['entropy_norm']:.3f}); max/mean load {s['max_over_mean']:.2f}.",
        f"- Prompt vs generated tokens: normalised entropy {s['prompt']['entropy_norm']:.3f} vs "
        f"{s['generated']['entropy_norm']:.3f}.",
        f"- {interpretation(s)}",
    ])


def coactivation(log: RouteLog, layer: int) -> np.ndarray:
    """[experts, experts] lift: how often each pair was chosen for the same token, over
    what independent choices with the same loads would give, scaled so that both count
    the same number of pairs (each token's top-k makes k(k-1)/2 pairs). 1: as expected;
    NaN where either expert was never chosen; symmetric, NaN on the diagonal."""
    e = log.meta["num_experts"]
    rows = log.pairs[log.pairs["layer"].to_numpy() == layer]
    counts = np.zeros((e, e))
    counts[rows["a"], rows["b"]] = rows["count"]
    chosen = log.loads[log.loads["layer"] == layer].groupby("expert")["count"].sum().reindex(range(e), fill_value=0)
    p = chosen.to_numpy(dtype=float)
    independent = np.triu(np.outer(p, p), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = counts / (independent * counts.sum() / independent.sum())
    lift = np.triu(lift, 1) + np.triu(lift, 1).T
    lift[np.outer(p, p) == 0] = np.nan
    np.fill_diagonal(lift, np.nan)
    return lift


def top_pairs(log: RouteLog, layer: int, top: int = 10, min_count: int = 10) -> list[dict]:
    """The pairs with the highest lift among those chosen together at least ``min_count``
    times: [{"experts": [a, b], "count": n, "lift": x}]."""
    rows = log.pairs[(log.pairs["layer"].to_numpy() == layer) & (log.pairs["count"].to_numpy() >= min_count)]
    if rows.empty:
        return []
    lift = coactivation(log, layer)[rows["a"], rows["b"]]
    rows = rows.assign(lift=lift).sort_values(["lift", "count"], ascending=False, kind="stable").head(top)
    return [{"experts": [int(a), int(b)], "count": int(n), "lift": round(float(x), 3)}
            for a, b, n, x in rows[["a", "b", "count", "lift"]].itertuples(index=False)]


def confidence_stats(log: RouteLog, layer: int) -> dict:
    """The top-1 gate weight and the top-k weight mass per token: mean and deciles (from
    1,000-bin histograms over [0, 1], so to 0.001); and each expert's mean weight when chosen."""
    out = {}
    for measure in ("top1_weight", "topk_mass"):
        rows = log.confidence[(log.confidence["layer"] == layer) & (log.confidence["measure"] == measure)]
        counts, lows = rows["count"].to_numpy(), rows["bin_low"].to_numpy()
        total = counts.sum()
        if not total:
            out[measure] = {"tokens": 0}
            continue
        width = lows[1] - lows[0]
        cumulative = np.cumsum(counts) / total
        quantile = {q: round(float(lows[np.searchsorted(cumulative, q)] + width / 2), 4) for q in (0.1, 0.5, 0.9)}
        out[measure] = {"tokens": int(total), "mean": round(float((counts * (lows + width / 2)).sum() / total), 4),
                        "p10": quantile[0.1], "median": quantile[0.5], "p90": quantile[0.9]}
    loads = log.loads[log.loads["layer"] == layer].groupby("expert")[["count", "weight"]].sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        out["mean_weight_when_chosen"] = [None if c == 0 else round(float(w / c), 4)
                                          for c, w in loads.itertuples(index=False)]
    return out


def load_over_time(log: RouteLog, layer: int) -> dict:
    """Max/mean expert load per window of tokens in the log's order (arrival order)."""
    rows = log.windows[log.windows["layer"] == layer]
    full = rows[rows["tokens"] == rows["tokens"].max()] if len(rows) else rows
    values = full["max_over_mean"]
    return {"window_tokens": int(rows["tokens"].max()) if len(rows) else 0, "windows": len(rows),
            "max_over_mean": [round(float(v), 3) for v in rows["max_over_mean"]],
            "median": float(values.median()) if len(values) else math.nan,
            "worst": float(values.max()) if len(values) else math.nan}


def token_specialisation(log: RouteLog, layer: int, top: int = 5, min_count: int = 5,
                         decode=None) -> list[dict] | None:
    """Per expert, the tokens it saw most (``most_seen``) and those it saw most over
    their frequency in the layer (``most_specific``: lift = the token's share of the
    expert's selections / its share of all tokens; at least ``min_count`` times).
    ``decode``: token id -> text, when a tokenizer is at hand. None without token ids."""
    if log.token_counts is None:
        return None
    rows = log.token_counts[log.token_counts["layer"] == layer]  # by expert, then token
    token, expert, count = (rows[c].to_numpy() for c in ("token", "expert", "count"))
    selections = np.bincount(expert, weights=count)
    share = count / selections[expert]
    lift = share / (np.bincount(token, weights=count) / count.sum())[token]

    def entries(picked):
        return [{"token": t, **({"text": decode(t)} if decode else {}), "count": n,
                 "share": round(sh, 4), "lift": round(li, 2)}
                for t, n, sh, li in zip(token[picked].tolist(), count[picked].tolist(),
                                        share[picked].tolist(), lift[picked].tolist())]

    out = []
    for e in np.unique(expert).tolist():
        first, last = np.searchsorted(expert, [e, e + 1])
        rows_e = np.arange(first, last)
        strong = rows_e[count[rows_e] >= min_count]
        out.append({"expert": e, "selections": int(selections[e]),
                    "most_seen": entries(rows_e[_leading([count[rows_e]], top)]),
                    "most_specific": entries(strong[_leading([lift[strong], count[strong]], top)])})
    return out


def _leading(keys: list[np.ndarray], top: int) -> np.ndarray:
    """Positions of the ``top`` rows that a stable sort by ``keys`` (each descending, the
    first most significant) puts first; ties keep row order. Only the rows whose first
    key reaches the top-th largest are sorted (with one key, the first of the tied ones)."""
    first = keys[0]
    rows = np.arange(len(first))
    if len(first) > top:
        cut = -np.partition(-first, top - 1)[top - 1]  # the top-th largest (selecting near the start is faster)
        above, tied = np.flatnonzero(first > cut), np.flatnonzero(first == cut)
        rows = np.concatenate([above, tied if len(keys) > 1 else tied[: top - len(above)]])
    order = np.lexsort([rows] + [-k[rows] for k in reversed(keys)])
    return rows[order[:top]]
