"""Expert-parallel placement metrics over one layer's expert loads (an expert's number of
selections): MaxVio, and the balance of the per-rank loads of each EP size.

vLLM's EPLB rebalancer is used where asked for (``eplb_placer``): importing it loads vLLM
and torch, ~9 s here, which would triple a stats run; the default is a greedy
longest-processing-time placement with the same constraint (E/n experts per rank, no
replicas)."""

import math

import numpy as np


def max_violation(loads: np.ndarray) -> float:
    """(max load - mean load) / mean load; NaN when nothing was routed."""
    mean = loads.mean() if len(loads) else 0.0
    return float((loads.max() - mean) / mean) if mean > 0 else math.nan


def balance(rank_loads: np.ndarray) -> float:
    """Mean over max of the ranks' loads (1.0: even), vLLM's and SGLang's balancedness."""
    top = rank_loads.max() if len(rank_loads) else 0.0
    return float(rank_loads.mean() / top) if top > 0 else math.nan


def lpt_rank_loads(loads: np.ndarray, ranks: int) -> np.ndarray:
    """Per-rank loads after a greedy longest-processing-time placement: the busiest
    expert first, each onto the least loaded rank that still has room."""
    per = len(loads) // ranks
    totals, held = np.zeros(ranks), np.zeros(ranks, int)
    for load in np.sort(loads)[::-1]:
        open_ranks = np.flatnonzero(held < per)
        rank = open_ranks[np.argmin(totals[open_ranks])]
        totals[rank] += load
        held[rank] += 1
    return totals


def eplb_placer():
    """vLLM's default EPLB policy as a (loads, ranks) -> per-rank loads function."""
    import torch
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    def place(loads: np.ndarray, ranks: int) -> np.ndarray:
        phy2log = DefaultEplbPolicy.rebalance_experts(torch.tensor(loads[None], dtype=torch.float32),
                                                      len(loads), 1, 1, ranks)
        phy2log = np.asarray(phy2log[0] if not isinstance(phy2log, tuple) else phy2log[0][0])
        return loads[phy2log].reshape(ranks, -1).sum(axis=1)

    return place


def ep_balance(loads: np.ndarray, placer=None) -> dict:
    """For each EP size n > 1 dividing the number of experts: the balance with vLLM's
    default contiguous placement (rank i holds experts [i*E/n, (i+1)*E/n)) and after a
    placement computed from these loads."""
    experts = len(loads)
    rebalanced_by = "vllm-eplb" if placer is not None else "greedy-lpt"
    placer = placer or lpt_rank_loads
    return {str(n): {"contiguous": balance(loads.reshape(n, -1).sum(axis=1)),
                     "rebalanced": balance(placer(loads, n)), "rebalanced_by": rebalanced_by}
            for n in range(2, experts + 1) if experts % n == 0}
