"""Route-log overhead on a GPU: the GSM8K slice on the Qwen1.5-MoE-A2.7B architecture.

    python benchmarks/bench_route_log.py run --out bench-r0.json [--round 0] [--repeats 8]
        [--tp 2] [--modes off,layer0,all]
    python benchmarks/bench_route_log.py report bench-*.json [--write BENCHMARKS.md [--section gpu]]

`run` starts one fresh process per mode (see MODES), in an order
that rotates with --round; each process times one warm-up and --repeats generations of
the 25 questions (greedy, 128 new tokens, ignore_eos so every run makes the same
number of tokens, seed 1234, prefix caching off so repeats are alike), with dummy
weights. Log modes are checked for completeness: every routed position of every
generation is logged once per logged layer. `report` merges rounds into the table of
median wall time, tokens/s and ratio to "off" that BENCHMARKS.md carries.
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

import markdown_section

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
V1 = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
MODES = {  # name -> (environment, extra engine arguments); "off" is vLLM's default
    "off": ({}, {}),
    # Unpatched vLLM, where scripts/device_setup.sh provides it.
    "stock": ({"PYTHONPATH": os.environ.get("STOCK_VLLM_PYTHONPATH", "")}, {}),
    "layer0": ({"VLLM_LOG_MOE_LAYERS": "0"}, {}),
    "all": ({"VLLM_LOG_MOE_LAYERS": "all"}, {}),
    # vLLM 0.26 captures routed experts only with the V1 runner: compare it with V1.
    "off_v1": (V1, {}),
    "all_v1": ({**V1, "VLLM_LOG_MOE_LAYERS": "all"}, {}),
    "vllm_capture": (V1, {"enable_return_routed_experts": True}),
}
BASELINE = {"off_v1": "off_v1", "all_v1": "off_v1", "vllm_capture": "off_v1"}  # else "off"


def child(args) -> dict:
    """One engine, one mode: runs in its own process (the parent sets VLLM_LOG_MOE*)."""
    import torch
    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    sys.path.insert(0, str(ROOT))
    from experiments.prompts import chat_prompts, load_questions

    _, extra = MODES[args.mode]
    model = str(args.model)
    prompts = chat_prompts(AutoTokenizer.from_pretrained(model), load_questions(25, args.data))
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True, seed=1234)
    t0 = time.perf_counter()
    llm = LLM(model=model, load_format="dummy", seed=1234, max_model_len=512,
              enable_prefix_caching=False, tensor_parallel_size=args.tp, **extra)
    start_s = time.perf_counter() - t0
    outs = llm.generate(prompts, params, use_tqdm=False)
    walls, tokens = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        walls.append(time.perf_counter() - t0)
        tokens.append(sum(len(o.outputs[0].token_ids) for o in outs))
    return {
        "mode": args.mode, "tensor_parallel_size": args.tp, "start_s": start_s, "wall_s": walls, "tokens": tokens,
        "routed_positions": sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs),
        "output_digest": hash(tuple(tuple(o.outputs[0].token_ids) for o in outs)),
        "device": torch.cuda.get_device_name(), "vllm": vllm.__version__, "torch": torch.__version__,
    }


def check_log(path: Path, result: dict) -> dict:
    """Counts route records and reads the closing record after the engine has exited
    (by hand, not with analysis/: the GPU machine has no pandas or pyarrow)."""
    meta, routes, end = None, 0, None
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b'{"type":"route"'):
                routes += 1
            elif meta is None:
                meta = json.loads(line)
            else:
                record = json.loads(line)
                end = record if record["type"] == "end" else end
    generations = 1 + len(result["wall_s"])
    expected = generations * result["routed_positions"] * len(meta["layers_logged"])
    return {"route_records": routes, "expected_records": expected, "complete": routes == expected,
            "end_record": end is not None, "engine_waits": end and end["engine_waits"],
            "bytes": path.stat().st_size, "model_runner": meta["model_runner"],
            "cudagraph_mode": meta["cudagraph_mode"], "async_scheduling": meta["async_scheduling"]}


def run(args) -> None:
    names = [m for m in args.modes.split(",") if m != "stock" or os.environ.get("STOCK_VLLM_PYTHONPATH")]
    order = names[args.round % len(names):] + names[: args.round % len(names)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:

        def child_cmd(mode: str, repeats: int, out: Path) -> list[str]:
            return [sys.executable, __file__, "child", "--mode", mode, "--repeats", str(repeats),
                    "--tp", str(args.tp),
                    "--model", str(args.model), "--data", str(args.data), "--out", str(out)]

        # An untimed first process fills the torch.compile cache, so that start times
        # compare like with like (the V1 runner of vllm_capture compiles its own).
        subprocess.run(child_cmd("off", 0, Path(tmp) / "warm.json"), check=True)
        for mode in order:
            env = {**os.environ, **MODES[mode][0]}
            log = Path(tmp) / f"{mode}.jsonl"
            if "VLLM_LOG_MOE_LAYERS" in env:
                env["VLLM_LOG_MOE"] = str(log)
            out = Path(tmp) / f"{mode}.json"
            print(f"[bench] round {args.round}: {mode}", flush=True)
            subprocess.run(child_cmd(mode, args.repeats, out), env=env, check=True)
            result = json.loads(out.read_text())
            if log.exists():
                result["log"] = check_log(log, result)
                log.unlink()
            result["round"] = args.round
            print(f"[bench] {mode}: start {result['start_s']:.1f}s, wall {sorted(result['wall_s'])}, "
                  f"log {result.get('log')}", flush=True)
            results.append(result)
            Path(args.out).write_text(json.dumps(results, indent=1))  # kept if a later mode fails


def wall(result: dict) -> float:
    return statistics.median(result["wall_s"])


def table(results: list[dict]) -> str:
    """Ratios are taken within a round (one machine), then listed per round: the lent
    machines differ between calls by more than the effects measured here."""
    rounds = sorted({r["round"] for r in results})
    cell = {(r["mode"], r["round"]): r for r in results}
    first = results[0]
    lines = [
        f"Card: {first.get('tensor_parallel_size', 1)} x {first['device']} (tensor parallel size "
        f"{first.get('tensor_parallel_size', 1)}); vLLM {first['vllm']} (+ route logger), torch {first['torch']}; "
        f"rounds {', '.join(map(str, rounds))} (one device call each), a fresh process "
        "per mode and round, modes in rotating order, one untimed warm-up generation then "
        f"{len(first['wall_s'])} timed ones per process. Values per round, separated by '/'.",
        "",
        "| mode | runner | wall s (median) | tokens/s | vs off, same runner | engine start s | log complete | log MB per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        runs = [cell.get((mode, n)) for n in rounds]
        if not any(runs):
            continue
        base = BASELINE.get(mode, "off")

        def per_round(fn) -> str:
            return " / ".join("-" if r is None else fn(r) for r in runs)

        def ratio(r) -> str:
            b = cell.get((base, r["round"]))
            return "-" if b is None else f"{wall(r) / wall(b):.3f}x"

        logs = [r["log"] for r in runs if r and "log" in r]
        complete = "-" if not logs else ("yes" if all(x["complete"] and x["end_record"] for x in logs) else "NO")
        size = "-" if not logs else f"{logs[0]['bytes'] / (1 + len(first['wall_s'])) / 1e6:.1f}"
        walls = per_round(lambda r: f"{wall(r):.3f}")
        speeds = per_round(lambda r: f"{r['tokens'][0] / wall(r):.0f}")
        starts = per_round(lambda r: f"{r['start_s']:.0f}")
        runner = "V1" if mode in BASELINE else "V2"
        lines.append(f"| {mode} | {runner} | {walls} | {speeds} | {per_round(ratio)} | {starts} "
                     f"| {complete} | {size} |")
    same = "yes" if len({r["output_digest"] for r in results}) == 1 else "NO"
    lines += ["", f"Same tokens in every mode and round: {same}."]
    return "\n".join(lines)


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=SHARED / "models" / "qwen1.5-moe-a2.7b-chat")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "gsm8k_test_first25.jsonl")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--mode", choices=list(MODES))
    p.add_argument("--modes", default=",".join(MODES), help="comma list of MODES to run")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")


if __name__ == "__main__":
    markdown_section.main(__doc__, options, child, run, table, "gpu")
