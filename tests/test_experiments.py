"""experiments/: the prompt slice, the two-run protocol, and the --demo path end to end."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED, vllm_release
from experiments import make_prompts, run
from experiments.prompts import read_prompts

GSM8K = SHARED / "data" / "gsm8k_test_first25.jsonl"


def test_make_prompts_from_local_jsonl(tmp_path):
    out = tmp_path / "prompts.txt"
    make_prompts.main(["--from-jsonl", str(GSM8K), "-o", str(out)])
    prompts = read_prompts(out)
    assert len(prompts) == 25 and prompts[0].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert out.read_text().count("\n\n---\n\n") == 24


def fake_run(tokens_by_run):
    calls = iter(tokens_by_run)

    def run_once(args, questions_file, out, log):
        if log is not None:
            log.write_text("{}\n")
        return {"wall_time_sec": 1.0, "tokens_generated": 3, "tokens_per_sec": 3.0, "prompt_tokens": 5,
                "requests": 1, "engine_start_sec": 1.0, "device": "cpu", "vllm_version": "x",
                "torch_version": "y", "request_ids": ["0"], "token_ids": next(calls), "texts": ["t"]}
    return run_once


def test_runs_that_disagree_fail(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "run_once", fake_run([[[1, 2, 3]], [[1, 2, 4]]]))
    args = ["--from-jsonl", str(GSM8K), "--out", str(tmp_path), "--no-analysis"]
    assert run.main(args) == 1
    assert "different tokens" in capsys.readouterr().out
    assert json.loads((tmp_path / "timing.json").read_text())["same_tokens"] is False
    monkeypatch.setattr(run, "run_once", fake_run([[[1, 2, 3]], [[1, 2, 3]]]))
    assert run.main(args) == 0


@pytest.mark.engine
def test_demo_end_to_end(tmp_path):
    """The README's --demo command, as a user runs it, and every artifact it promises."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "experiments.run", "--demo", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("run 1/2 without logging", "run 2/2 with VLLM_LOG_MOE", "same tokens: True", "wrote"):
        assert stage in proc.stdout
    timing = json.loads((out / "timing.json").read_text())
    for run_name in ("no_log", "log"):
        assert set(timing[run_name]) >= {"wall_time_sec", "tokens_generated", "tokens_per_sec"}
        assert timing[run_name]["tokens_generated"] == 25 * 128
    assert timing["same_tokens"] is True and timing["seed"] == 1234 and timing["max_tokens"] == 128
    assert timing["overhead_ratio"] > 0 and timing["vllm_version"] == vllm_release()
    with open(out / "moe_routes.jsonl") as f:
        meta = json.loads(f.readline())
        first_route = next(json.loads(line) for line in f if '"route"' in line)
    assert meta["type"] == "meta" and meta["layers_logged"] == [0] and meta["top_k"] == 4
    assert meta["num_experts"] == 16 and meta["seed"] == 1234
    assert set(first_route) >= {"req_id", "token_idx", "layer", "topk_ids", "topk_weights"}
    png = (out / "expert_hist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    stats = json.loads((out / "stats.json").read_text())
    assert stats["complete"] is True and stats["requests"] == 25
    assert meta["load_format"] == "auto" and meta["block_store"]["on"] is True
    report_md = (out / "report.md").read_text()
    for figure in ("expert_hist.png", "coactivation.png", "confidence.png", "load_over_time.png"):
        assert f"]({figure})" in report_md and (out / figure).read_bytes()[:4] == b"\x89PNG"
    note = (out / "analysis_note.md").read_text().strip().splitlines()
    assert 5 <= len(note) <= 8 and "Top-3 experts" in note[1]
