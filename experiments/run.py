"""The GSM8K routing experiment: the prompt slice twice, without and with the route log.

    python -m experiments.run                      # Qwen/Qwen1.5-MoE-A2.7B-Chat, GPU or CPU
    python -m experiments.run --demo               # tiny local Qwen2-MoE: no GPU, no hub
    python -m experiments.run --model DIR --load-format dummy --layers all --out results/x

Each run is a fresh process with the same prompts, seed and sampling (greedy, 128 new
tokens, seed 1234); the second sets VLLM_LOG_MOE. The runs must generate the same
tokens. Writes timing.json, moe_routes.jsonl and, through experiments.report,
expert_hist.png, stats.json and analysis_note.md into --out.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.prompts import chat_prompts, load_questions, read_prompts

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MODEL = "Qwen/Qwen1.5-MoE-A2.7B-Chat"
LOCAL_TOKENIZER = SHARED / "models" / "qwen1.5-moe-a2.7b-chat"
LOCAL_GSM8K = SHARED / "data" / "gsm8k_test_first25.jsonl"


def say(message: str) -> None:
    print(f"[experiments.run] {message}", flush=True)


def child(args) -> dict:
    """One engine: generate the slice once and time it (runs in its own process)."""
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    if args.device != "auto" and (args.device == "cpu") != on_cpu:
        raise SystemExit(
            f"--device {args.device}: this vLLM is built for {'CPU' if on_cpu else current_platform.device_type}; "
            "CPU: bash scripts/setup.sh, GPU: bash scripts/setup.sh --gpu (README)")
    t0 = time.perf_counter()
    llm = LLM(model=args.model, tokenizer=args.tokenizer, load_format=args.load_format, seed=args.seed,
              served_model_name=args.served_model_name,
              max_model_len=args.max_model_len,
              gpu_memory_utilization=0.3 if on_cpu else 0.9, dtype=args.dtype)
    start = time.perf_counter() - t0
    prompts = chat_prompts(llm.get_tokenizer(), json.loads(Path(args.questions).read_text()))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, seed=args.seed)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    generated = sum(map(len, tokens))
    return {
        "wall_time_sec": round(wall, 4),
        "tokens_generated": generated,
        "tokens_per_sec": round(generated / wall, 1),
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
        "requests": len(outputs),
        "engine_start_sec": round(start, 2),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name(),
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "request_ids": [o.request_id for o in outputs],
        "token_ids": tokens,
        "texts": [o.outputs[0].text for o in outputs],
    }


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"CPU: {names[0]}, {len(names)} cores" if names else "CPU"


def run_once(args, questions_file: Path, out: Path, log: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOG_MOE")}
    if log is not None:
        env.update(VLLM_LOG_MOE=str(log), VLLM_LOG_MOE_LAYERS=args.layers)
    result_file = out / ("run_log.json" if log else "run_no_log.json")
    cmd = [sys.executable, "-m", "experiments.run", "--child", "--questions", str(questions_file),
           "--child-out", str(result_file), "--model", args.model, "--tokenizer", args.tokenizer,
           "--load-format", args.load_format, "--seed", str(args.seed), "--dtype", args.dtype,
           "--max-model-len", str(args.max_model_len), "--max-tokens", str(args.max_tokens),
           "--device", args.device] + (["--served-model-name", args.served_model_name] if args.served_model_name else [])
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return result


def timing(no_log: dict, log: dict, log_path: Path, args) -> dict:
    keep = ("wall_time_sec", "tokens_generated", "tokens_per_sec", "prompt_tokens", "requests", "engine_start_sec")
    return {
        "no_log": {k: no_log[k] for k in keep},
        "log": {**{k: log[k] for k in keep}, "log_bytes": log_path.stat().st_size},
        "overhead_ratio": round(log["wall_time_sec"] / no_log["wall_time_sec"], 4),
        "same_tokens": no_log["token_ids"] == log["token_ids"],
        "model": args.model, "load_format": args.load_format, "layers": args.layers,
        "seed": args.seed, "temperature": 0.0, "max_tokens": args.max_tokens,
        "max_model_len": args.max_model_len, "dtype": args.dtype,
        "device": log["device"], "vllm_version": log["vllm_version"], "torch_version": log["torch_version"],
        "note": "one timed generate() of the whole slice per fresh process, engine start excluded",
    }


def prepare(args) -> list[str]:
    if args.demo:
        from experiments.tiny_moe import DEMO, build_moe

        demo_dir = ROOT / ".cache" / "tiny-qwen2-moe-demo"  # 160 MB of random weights: not a result
        if not (demo_dir / "config.json").exists():
            say(f"building the demo model (tiny Qwen2-MoE, random weights) in {demo_dir}")
            build_moe(DEMO, demo_dir, tokenizer_dir=args.tokenizer)
        args.model, args.tokenizer = str(demo_dir), str(demo_dir)
    if args.prompts:
        return read_prompts(args.prompts)
    local = args.from_jsonl or (LOCAL_GSM8K if LOCAL_GSM8K.exists() else None)
    say(f"prompts: first 25 GSM8K test questions from {local or 'the hub (openai/gsm8k)'}")
    return load_questions(25, local)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--tokenizer", help="default: the model's, or the local Qwen1.5-MoE one for --demo")
    parser.add_argument("--served-model-name", help="the model's name in the log and plots (e.g. the hub id of "
                                                    "local weights); default: --model")
    parser.add_argument("--load-format", default="auto", help="'dummy': the architecture with random weights")
    parser.add_argument("--layers", default="0", help="VLLM_LOG_MOE_LAYERS: 0, 0,12,23, 0-23 or all")
    parser.add_argument("--prompts", type=Path, help="prompts.txt from experiments.make_prompts")
    parser.add_argument("--from-jsonl", type=Path, help="GSM8K records from a local JSONL instead of the hub")
    parser.add_argument("--out", type=Path, default=Path("results/run"))
    parser.add_argument("--demo", action="store_true", help="tiny local model, CPU friendly")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="check that the installed vLLM runs there (vLLM's platform comes with its build)")
    parser.add_argument("--no-analysis", action="store_true", help="runs only (analyse later: experiments.report)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--questions", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(args)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    args.tokenizer = args.tokenizer or (str(LOCAL_TOKENIZER) if args.demo and LOCAL_TOKENIZER.exists() else
                                        MODEL if args.demo else args.model)
    questions = prepare(args)
    questions_file = args.out / "questions.json"
    questions_file.write_text(json.dumps(questions))
    log_path = args.out / "moe_routes.jsonl"
    say(f"run 1/2 without logging: {args.model}, {len(questions)} prompts")
    no_log = run_once(args, questions_file, args.out, None)
    say(f"run 1/2 done: {no_log['wall_time_sec']:.2f} s, {no_log['tokens_generated']} tokens")
    say(f"run 2/2 with VLLM_LOG_MOE={log_path} VLLM_LOG_MOE_LAYERS={args.layers}")
    log = run_once(args, questions_file, args.out, log_path)
    say(f"run 2/2 done: {log['wall_time_sec']:.2f} s, {log['tokens_generated']} tokens")
    result = timing(no_log, log, log_path, args)
    (args.out / "timing.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "outputs.json").write_text(json.dumps(
        [{"request_id": r, "text": t} for r, t in zip(log["request_ids"], log["texts"])], indent=1) + "\n")
    questions_file.unlink()
    say(f"timing.json: overhead {result['overhead_ratio']:.3f}x, same tokens: {result['same_tokens']}")
    if not result["same_tokens"]:
        say("ERROR: the two runs generated different tokens")
        return 1
    if not args.no_analysis:
        from experiments.report import write_report

        for path in write_report(args.out):
            say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
