"""analysis/: metrics with known answers on synthetic logs, reader robustness, CLIs."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from analysis import plot, report, seen_keys, stats
from analysis.log_format import LogFormatError
from analysis.logfile import read_log
from analysis.seen_keys import SeenKeys, SeenRoutes
from analysis.metrics import (analysis_note, coactivation, confidence_stats, expert_shares, layer_stats,
                              load_over_time, model_title, token_specialisation, top_pairs)


def meta(num_experts=8, top_k=2, layers=(0,)):
    return {"type": "meta", "schema": 1, "model_id": "tiny", "layers_logged": list(layers),
            "num_experts": num_experts, "top_k": top_k}


def write_log(path, header, requests, routes, end=True):
    """requests: {req_id: prompt_len}; routes: (req_id, token_idx, layer, ids, weights)."""
    lines = [header] + [{"type": "request", "req_id": r, "engine_req_id": f"{r}-0", "prompt_len": p,
                         "prompt_tokens_cached": 0} for r, p in requests.items()]
    lines += [{"type": "route", "req_id": r, "token_idx": t, "layer": layer, "topk_ids": list(i),
               "topk_weights": list(w)} for r, t, layer, i, w in routes]
    if end:
        lines.append({"type": "end", "route_records": len(routes)})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_uniform(tmp_path):
    routes = [("a", t, 0, (2 * t % 8, (2 * t + 1) % 8), (0.5, 0.5)) for t in range(8)]
    log = read_log(write_log(tmp_path / "u.jsonl", meta(), {"a": 4}, routes))
    s = layer_stats(log, 0)
    assert s["shares"] == [0.125] * 8
    assert (s["entropy_bits"], s["entropy_norm"], s["max_over_mean"], s["cv"]) == (3.0, 1.0, 1.0, 0.0)
    assert s["tokens"] == 8 and s["prompt"]["tokens"] == 4 and s["generated"]["tokens"] == 4


def test_one_hot(tmp_path):
    routes = [("a", t, 0, (3,), (1.0,)) for t in range(5)]
    log = read_log(write_log(tmp_path / "o.jsonl", meta(top_k=1), {"a": 5}, routes))
    s = layer_stats(log, 0)
    assert s["top3"][0] == {"expert": 3, "share": 1.0}
    assert s["entropy_bits"] == 0 and s["max_over_mean"] == 8
    assert s["cv"] == pytest.approx(math.sqrt(7)) and s["unused_experts"] == 7


def test_known_skew_counts_and_weights(tmp_path):
    chosen = [0, 0, 0, 0, 1, 1, 2, 3]
    weights = [0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.6, 0.6]
    routes = [("a", t, 0, (e,), (w,)) for t, (e, w) in enumerate(zip(chosen, weights))]
    log = read_log(write_log(tmp_path / "s.jsonl", meta(num_experts=4, top_k=1), {"a": 8}, routes))
    s = layer_stats(log, 0)
    assert s["shares"] == [0.5, 0.25, 0.125, 0.125]
    assert s["entropy_bits"] == pytest.approx(1.75) and s["entropy_norm"] == pytest.approx(0.875)
    assert s["max_over_mean"] == 2.0 and [t["expert"] for t in s["top3"]] == [0, 1, 2]
    weighted = expert_shares(log.loads, 0, weighted=True)
    assert weighted.to_numpy() == pytest.approx(np.array([0.4, 1.8, 0.6, 0.6]) / 3.4)


def test_prompt_and_generated_apart_and_layers_apart(tmp_path):
    routes = [("a", t, layer, (0 if t < 3 else 1, 2 + layer), (0.6, 0.4)) for t in range(6) for layer in (0, 5)]
    routes += [("b", 0, 0, (7, 6), (0.5, 0.5))]  # no 'request' record: phase unknown
    log = read_log(write_log(tmp_path / "p.jsonl", meta(layers=(0, 5)), {"a": 3}, routes))
    prompt = expert_shares(log.loads, 0, "prompt")
    generated = expert_shares(log.loads, 0, "generated")
    assert prompt[0] == 0.5 and prompt[2] == 0.5 and generated[1] == 0.5 and generated[2] == 0.5
    assert expert_shares(log.loads, 5)[7] == 0.5 * 0 + 0.5  # layer 5: experts 0/1 and 7
    assert layer_stats(log, 0)["unknown_phase_tokens"] == 1


def test_repeated_lines_count_once_across_chunks(tmp_path):
    routes = [("a", t, 0, (t % 8, (t + 1) % 8), (0.5, 0.5)) for t in range(40)]
    routes += routes[5:9] + [("a", 3, 0, (0, 1), (0.5, 0.5))]
    path = write_log(tmp_path / "d.jsonl", meta(), {"a": 10}, routes)
    for chunk in (2, 1 << 20):
        log = read_log(path, batch_rows=chunk)
        assert (log.records, log.duplicates) == (45, 5)
        assert layer_stats(log, 0)["tokens"] == 40
        assert layer_stats(log, 0)["shares"] == [0.125] * 8


def test_truncated_last_line_is_reported_not_fatal(tmp_path):
    routes = [("a", t, 0, (t % 8, (t + 3) % 8), (0.5, 0.5)) for t in range(16)]
    path = write_log(tmp_path / "t.jsonl", meta(), {"a": 8}, routes, end=False)
    data = path.read_bytes()
    path.write_bytes(data[:-30])
    log = read_log(path, batch_rows=3)
    assert log.records == 15 and len(log.truncated_tail) > 0 and log.end is None
    assert any("unfinished" in n for n in log.notes) and any("had not closed the log" in n for n in log.notes)
    assert "1 of 1 requests (or samples) have no 'request_end': they were running where the log stops" in log.notes


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda lines: lines[:4] + ["{not json"] + lines[4:], "line 5: not valid JSON"),
        (lambda lines: lines[1:], "line 1: missing meta header"),
        (lambda lines: ["[]"] + lines[1:], "line 1: missing meta header"),
        (lambda lines: [lines[0].replace('"schema": 1', '"schema": 9')] + lines[1:], "schema 9"),
        (lambda lines: lines[:3] + ['{"type": "route", "req_id": "a", "layer": 0, "topk_ids": [1, 2], '
                                    '"topk_weights": [0.5, 0.5]}'] + lines[3:], "line 4: route record without token_idx"),
        (lambda lines: lines[:3] + ['{"type": "route", "req_id": "a", "token_idx": 0, "layer": 0, '
                                    '"topk_ids": [1], "topk_weights": [0.5]}'] + lines[3:], "line 4: expected top_k=2"),
        (lambda lines: lines[:3] + ['{"type": "route", "req_id": "a", "token_idx": 0, "layer": 3, '
                                    '"topk_ids": [1, 2], "topk_weights": [0.5, 0.5]}'] + lines[3:], "line 4: layer or expert"),
    ],
)
def test_malformed_logs_name_the_line(tmp_path, corrupt, message):
    routes = [("a", t, 0, (t % 8, (t + 1) % 8), (0.5, 0.5)) for t in range(6)]
    path = write_log(tmp_path / "m.jsonl", meta(), {"a": 2}, routes)
    path.write_text("\n".join(corrupt(path.read_text().splitlines())) + "\n")
    with pytest.raises(LogFormatError, match=message):
        read_log(path, batch_rows=3)


def test_note_and_cli(tmp_path, capsys):
    routes = [("a", t, layer, (t % 3, 3 + t % 5), (0.7, 0.3)) for t in range(30) for layer in (0, 1)]
    path = write_log(tmp_path / "c.jsonl", meta(layers=(0, 1)), {"a": 12}, routes)
    note = analysis_note(read_log(path), 0)
    assert 5 <= len(note.splitlines()) <= 8 and "Top-3 experts" in note and "Entropy" in note
    assert stats.main([str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [s["layer"] for s in rep["layers"]] == [0, 1] and rep["complete"] is True
    assert sum(rep["layers"][0]["shares"]) == pytest.approx(1.0)
    assert stats.main([str(path), "--note", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["note"] == note
    with pytest.raises(SystemExit, match="2"):
        stats.main([str(path), "--layer", "4"])
    out = tmp_path / "hist.png"
    assert plot.main([str(path), "-o", str(out), "--sort", "--weighted", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["files"] == [str(out), str(tmp_path / "hist_layers.png")]
    for png in printed["files"]:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_a_bad_log_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"type": "route"}\n')
    for cli, args in ((stats, []), (plot, ["-o", str(tmp_path / "x.png")])):
        with pytest.raises(SystemExit, match="2"):
            cli.main([str(path), *args])
    assert capsys.readouterr().err.count("line 1: missing meta header") == 2


def test_cached_positions_are_counted_or_left_out(tmp_path):
    """Request b's first 4 positions came from the prefix cache (expert 1); computed
    positions chose expert 0. A 'gap' record of 2 positions becomes a note."""
    path = write_log(tmp_path / "c.jsonl", meta(num_experts=4, top_k=1), {"a": 4, "b": 6},
                     [("a", t, 0, (0,), (1.0,)) for t in range(4)] + [("b", t, 0, (0,), (1.0,)) for t in (4, 5)])
    lines = path.read_text().splitlines()
    cached = [{"type": "route", "req_id": "b", "cached": True, "token_idx": t, "layer": 0, "topk_ids": [1],
               "topk_weights": [1.0]} for t in range(4)]
    gap = {"type": "gap", "req_id": "c", "first_token_idx": 0, "last_token_idx": 1, "reason": "test"}
    path.write_text("\n".join(lines[:-1] + [json.dumps(x) for x in cached + [gap]] + lines[-1:]) + "\n")
    log = read_log(path)
    with_cached, without = layer_stats(log, 0), layer_stats(log, 0, cached=False)
    assert (with_cached["tokens"], with_cached["tokens_computed"], with_cached["tokens_cached"]) == (10, 6, 4)
    assert with_cached["shares"] == [0.6, 0.4, 0, 0] and with_cached["prompt"]["tokens"] == 10
    assert (without["tokens"], without["shares"], without["prompt"]["tokens"]) == (6, [1, 0, 0, 0], 6)
    assert log.gap_records == 2 and any("2 route records" in n for n in log.notes)
    rep = stats.report(log, [0], weighted=False, cached=False)
    assert rep["layers"][0]["cached_included"] is False and rep["layers"][0]["tokens_cached"] == 4


SEED_META = ('{"type":"meta","model_id":"Qwen/Qwen1.5-MoE-A2.7B-Chat","vllm_version":"0.26.0",'
             '"torch_version":"2.11.0","device":"H200","seed":1234,"layers_logged":[0],"top_k":2}')


def test_a_log_in_the_seed_schema_is_analysed(tmp_path, capsys):
    """Exactly the required header and route record; then a numeric req_id, an extra
    field and a record of an unknown type, which are read or ignored."""
    path = tmp_path / "seed.jsonl"
    path.write_text(SEED_META + "\n"
                    '{"type":"route","req_id":"r1","token_idx":17,"layer":0,"topk_ids":[3,12],"topk_weights":[0.72,0.28]}\n')
    log = read_log(path)
    assert log.meta["num_experts"] == 13 and any("13 inferred" in n for n in log.notes)
    assert layer_stats(log, 0)["tokens"] == 1 and log.end is None
    with open(path, "a") as f:
        f.write('{"type":"route","req_id":7,"token_idx":0,"layer":0,"topk_ids":[3,20],"topk_weights":[0.6,0.4],"x":1}\n'
                '{"type":"heartbeat","at":5}\n'
                '{"type":"route","req_id":"r1","token_idx":17,"layer":0,"topk_ids":[3,12],"topk_weights":[0.72,0.28]}\n')
    log = read_log(path, batch_rows=2)
    assert (log.records, log.duplicates, log.meta["num_experts"], log.unknown_types) == (3, 1, 21, {"heartbeat": 1})
    assert stats.main([str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["layers"][0]["tokens"] == 2 and rep["layers"][0]["top3"][0] == {"expert": 3, "share": 0.5}


def test_coactivation_confidence_and_load_over_time_have_known_answers(tmp_path):
    """Tokens 0-3 choose experts (0, 1), tokens 4-7 alternate (0, 1) and (2, 3), tokens
    8-9 choose (2, 3); weights (0.72, 0.28). Windows of 4 tokens."""
    pick = [(0, 1)] * 4 + [(0, 1), (2, 3)] * 2 + [(2, 3)] * 2
    routes = [("a", t, 0, ids, (0.72, 0.28)) for t, ids in enumerate(pick)]
    log = read_log(write_log(tmp_path / "k.jsonl", meta(num_experts=4), {"a": 5}, routes), window=4)
    # Loads 6, 6, 4, 4: independent pairs in proportion to 36 (0+1), 24 (x4), 16 (2+3),
    # scaled to the 10 pairs there were: 36 / 148 * 10 expected for 0+1, 6 seen.
    lift = coactivation(log, 0)
    assert lift[0, 1] == lift[1, 0] == pytest.approx(6 / (360 / 148)) and lift[2, 3] == pytest.approx(4 / (160 / 148))
    assert lift[0, 2] == 0 and np.isnan(lift[0, 0])
    assert top_pairs(log, 0, min_count=1) == [{"experts": [2, 3], "count": 4, "lift": 3.7},
                                              {"experts": [0, 1], "count": 6, "lift": 2.467}]
    conf = confidence_stats(log, 0)
    assert conf["top1_weight"]["median"] == pytest.approx(0.7205) and conf["topk_mass"]["median"] == pytest.approx(0.9995)
    assert conf["mean_weight_when_chosen"] == pytest.approx([0.72, 0.28, 0.72, 0.28])
    over_time = load_over_time(log, 0)
    assert over_time["max_over_mean"] == [2.0, 1.0, 2.0] and (over_time["windows"], over_time["window_tokens"]) == (3, 4)
    assert (over_time["median"], over_time["worst"]) == (1.5, 2.0)  # full windows only


def test_report_writes_every_figure_and_embeds_them(tmp_path, capsys):
    rng = np.random.default_rng(0)
    routes = [("r%d" % (t // 40), t % 40, layer, tuple(int(e) for e in rng.choice(16, 4, replace=False)), (0.4, 0.3, 0.2, 0.1))
              for t in range(3000) for layer in (0, 5)]
    header = meta(num_experts=16, top_k=4, layers=(0, 5)) | {"model_id": "org/tiny-moe", "load_format": "dummy"}
    path = write_log(tmp_path / "r.jsonl", header, {f"r{i}": 20 for i in range(75)}, routes)
    assert report.main([str(path), "-o", str(tmp_path / "out"), "--layer", "5", "--json"]) == 0
    files = {name: Path(p) for name, p in json.loads(capsys.readouterr().out).items()}
    figures = ("expert_hist", "expert_layers", "coactivation", "confidence", "load_over_time", "ep_balance",
               "layer_affinity")
    assert set(files) == {*figures, "stats", "note", "report"}
    text = files["report"].read_text()
    assert text.startswith("# Routing report: org/tiny-moe [dummy weights]") and "layer 5" in text
    assert "| 0 -> 5 |" in text and "| 8 |" in text  # the layer pair; EP size 8 of 16 experts
    for name in figures:
        assert files[name].read_bytes()[:4] == b"\x89PNG" and f"]({files[name].name})" in text
    stats_json = json.loads(files["stats"].read_text())
    assert [c["layer"] for c in stats_json["coactivation"]] == [0, 5] and stats_json["load_over_time"][0]["windows"] == 3


def test_token_specialisation_joins_token_ids_given_once_per_request(tmp_path):
    """a: prompt 100 101 102, fed after it 200 201; b (n=2): prompt 100 103, then 300 /
    301. Each route record is joined with the token at its position, whether the
    request's end comes in the same read chunk or a later one."""
    def route(req, pos, expert, sample=None):
        return {"type": "route", "req_id": req, **({} if sample is None else {"sample": sample}),
                "token_idx": pos, "layer": 0, "topk_ids": [expert], "topk_weights": [1.0]}
    lines = [meta(num_experts=4, top_k=1),
             {"type": "request", "req_id": "a", "prompt_len": 3, "prompt_token_ids": [100, 101, 102]},
             {"type": "request", "req_id": "b", "sample": 0, "prompt_len": 2, "prompt_token_ids": [100, 103]},
             {"type": "request", "req_id": "b", "sample": 1, "prompt_len": 2, "prompt_token_ids": [100, 103]}]
    lines += [route("a", p, e) for p, e in enumerate([0, 0, 1, 0, 2])]
    lines += [route("b", p, e, 0) for p, e in enumerate([0, 3, 3])] + [route("b", p, e, 1) for p, e in enumerate([0, 3, 1])]
    lines += [{"type": "request_end", "req_id": "a", "generated_token_ids": [200, 201]},
              {"type": "request_end", "req_id": "b", "sample": 0, "generated_token_ids": [300]},
              {"type": "request_end", "req_id": "b", "sample": 1, "generated_token_ids": [301]},
              {"type": "end", "route_records": 11}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    for chunk in (1 << 20, 2):
        log = read_log(path, batch_rows=chunk)
        got = {(r.expert, r.token): r.count for r in log.token_counts.itertuples()}
        assert got == {(0, 100): 3, (0, 101): 1, (0, 200): 1, (1, 102): 1, (1, 301): 1,
                       (2, 201): 1, (3, 103): 2, (3, 300): 1}, chunk
    experts = token_specialisation(log, 0, top=2, min_count=1, decode=lambda t: f"<{t}>")
    assert experts[0]["most_seen"][0] == {"token": 100, "text": "<100>", "count": 3, "share": 0.6, "lift": 2.2}  # 0.6 / (3 / 11)
    assert [t["token"] for t in experts[3]["most_specific"]] == [103, 300] and experts[3]["selections"] == 3
    assert [t["token"] for t in experts[2]["most_seen"]] == [201]  # its only token, none of expert 3's
    assert read_log(write_log(tmp_path / "none.jsonl", meta(), {"a": 2}, [])).token_counts is None


def test_titles_name_the_model_as_served_and_say_when_weights_were_random():
    assert model_title({"model_id": "/tmp/kit/models/qwen", "served_model_name": "Qwen/Qwen1.5-MoE-A2.7B-Chat",
                        "load_format": "dummy"}) == "Qwen/Qwen1.5-MoE-A2.7B-Chat [dummy weights]"
    assert model_title({"model_id": "/tmp/kit/models/qwen", "served_model_name": "/tmp/kit/models/qwen",
                        "load_format": "auto"}) == "models/qwen"
    assert model_title({"layers_logged": [0], "top_k": 2}) == "unnamed model"


def test_pairs_and_windows_match_a_plain_count_whatever_the_chunks(tmp_path):
    """Three layers interleaved per token, as a JSONL log has them; ids in either order.
    Read in chunks that cut windows anywhere, the pairs and windows equal a direct count."""
    rng = np.random.default_rng(3)
    routes = [(f"r{r}", t, layer, tuple(rng.choice(6, 3, replace=False).tolist()), (0.5, 0.3, 0.2))
              for r in range(4) for t in range(9) for layer in (0, 2, 5)]
    path = write_log(tmp_path / "w.jsonl", meta(num_experts=6, top_k=3, layers=(0, 2, 5)), {}, routes)
    pairs, windows = {}, []
    for layer in (0, 2, 5):
        rows = [ids for _, _, at, ids, _ in routes if at == layer]
        for ids in rows:
            for i in range(3):
                for j in range(i + 1, 3):
                    key = (layer, min(ids[i], ids[j]), max(ids[i], ids[j]))
                    pairs[key] = pairs.get(key, 0) + 1
        for n, first in enumerate(range(0, len(rows), 7)):
            counts = np.bincount(np.ravel(rows[first:first + 7]), minlength=6)
            windows.append((layer, n, len(rows[first:first + 7]), counts.max() / counts.mean()))
    for chunk in (3, 17, 1 << 20):
        log = read_log(path, batch_rows=chunk, window=7)
        assert {(r.layer, r.a, r.b): r.count for r in log.pairs.itertuples()} == pairs, chunk
        assert sorted(log.windows.itertuples(index=False, name=None)) == windows, chunk


def test_summed_weights_are_exact_whatever_the_chunks(tmp_path):
    """Each expert's summed gate weight is the exact sum of the 9-decimal weights, rounded
    once: no order of reading (chunks, or a parquet log's batches) changes a bit of it."""
    from decimal import Decimal

    rng = np.random.default_rng(5)
    texts = [f"{w:.9f}" for w in rng.random(300)]
    routes = [("a", t, 0, (t % 7, 7), (float(texts[t]), 0.5)) for t in range(300)]
    path = write_log(tmp_path / "s.jsonl", meta(), {"a": 300}, routes)
    exact = [float(sum((Decimal(texts[t]) for t in range(300) if t % 7 == e), Decimal(0))) for e in range(7)]
    for chunk in (2, 9, 1 << 20):
        loads = read_log(path, batch_rows=chunk).loads
        weight = loads[loads["phase"] == "prompt"].set_index("expert")["weight"]
        assert weight.tolist()[:7] == exact and weight[7] == 150.0, chunk


def seen_routes_against_a_set(chunks, exact=False) -> SeenRoutes:
    """Feeds (group, position) chunks to SeenRoutes and checks every answer against a set."""
    seen, reference = SeenRoutes(exact), set()
    for group, position in chunks:
        group, position = np.asarray(group, np.int64), np.asarray(position, np.int64)
        expected = []
        for key in zip(group.tolist(), position.tolist()):
            expected.append(key not in reference)
            reference.add(key)
        assert seen.add_new(group, position).tolist() == expected
    return seen


def test_seen_routes_prove_growing_chunks_new_without_a_set():
    """Groups interleaved, each one's positions growing from chunk to chunk (not within
    one: a chunk may hold a group's positions in any order): no key is kept."""
    rng = np.random.default_rng(1)
    chunks = []
    for start in range(0, 60, 12):
        group = np.repeat(np.arange(5), 12)
        position = np.tile(np.arange(start, start + 12), 5)
        order = rng.permutation(60)
        chunks.append((group[order], position[order]))
    seen = seen_routes_against_a_set(chunks)
    assert seen.exact is None and seen.top.tolist() == [59] * 5


@pytest.mark.parametrize("late", [
    ([0, 1, 0], [12, 0, 12]),     # a repeat inside the chunk
    ([0], [5]),                   # a group going back to a position it had
    ([1], [3]),                   # going back to one it never had: new, but only a set can tell
    ([2, 0], [10_000, 12]),       # a span too sparse for the chunk's count
])
def test_seen_routes_ask_for_the_exact_set_when_a_chunk_breaks_the_proof(late):
    from analysis.seen_keys import OutOfOrder

    chunks = [([0] * 12 + [1] * 4, list(range(12)) + [0, 1, 2, 5]), late, ([0, 1, 2], [13, 6, 3]), ([0, 0], [13, 14])]
    with pytest.raises(OutOfOrder):
        seen_routes_against_a_set(chunks)
    assert seen_routes_against_a_set(chunks, exact=True).exact is not None


def test_seen_keys_tell_new_keys_exactly_across_chunks(monkeypatch):
    """Against a Python set: repeats within a chunk and across chunks, and, with a bitmap
    of 256 bits, many new keys whose bit an earlier key set."""
    monkeypatch.setattr(seen_keys, "BITS", 8)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 4000, dtype=np.uint64)
    pool = np.concatenate([base, base ^ np.uint64(1), base ^ np.uint64(1 << 20)])
    seen, reference = SeenKeys(), set()
    for _ in range(12):  # enough chunks for runs to merge
        chunk = rng.choice(pool, 1500)
        expected = []
        for key in chunk.tolist():
            expected.append(key not in reference)
            reference.add(key)
        assert seen.add_new(chunk).tolist() == expected
    assert len(seen) == len(reference) and len(seen.runs) < 6


def small_log(tmp_path):
    routes = [("a", t, 0, (t % 8, (t + 1) % 8), (0.5, 0.5)) for t in range(6)]
    return write_log(tmp_path / "s.jsonl", meta(), {"a": 3}, routes)


def test_the_clis_refuse_an_output_they_cannot_write_before_reading(tmp_path, capsys):
    log = small_log(tmp_path)
    for cli, args in ((plot, [str(log), "-o", str(tmp_path / "missing" / "x.png")]),
                      (report, [str(log), "-o", str(tmp_path / "missing" / "deeper")])):
        with pytest.raises(SystemExit) as e:
            cli.main(args)
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"{args[-1]}: directory {Path(args[-1]).parent} does not exist"]


def test_experiments_report_names_a_folder_without_a_log(tmp_path):
    from experiments import report as experiments_report

    with pytest.raises(SystemExit, match=f"{tmp_path}: no moe_routes.jsonl here"):
        experiments_report.main([str(tmp_path)])


def test_convert_refuses_a_destination_that_does_not_name_its_form(tmp_path, capsys):
    from analysis import convert

    log = small_log(tmp_path)
    assert convert.main([str(log), str(tmp_path / "x.txt")]) == 2
    assert "name it *.parquet, or say --to parquet" in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()
    assert convert.main([str(log), str(tmp_path / "x.txt"), "--to", "jsonl"]) == 2
    assert "is already jsonl; it converts to parquet" in capsys.readouterr().err
    assert convert.main([str(log), str(tmp_path / "x.txt"), "--to", "parquet"]) == 0
    assert read_log(tmp_path / "x.txt").records == 6


GOOD = {"type": "route", "req_id": "a", "token_idx": 0, "layer": 0, "topk_ids": [1, 2], "topk_weights": [0.5, 0.5]}


@pytest.mark.parametrize("change, message", [
    ({"token_idx": "three"}, 'token_idx must be an integer, got "three"'),
    ({"layer": "0"}, 'layer must be an integer, got "0"'),
    ({"topk_ids": ["1", "2"]}, 'topk_ids must be a list of integers, got ["1", "2"]'),
    ({"topk_ids": [1.5, 2]}, "topk_ids must be a list of integers, got [1.5, 2]"),
    ({"topk_ids": [1, True]}, "topk_ids must be a list of integers, got [1, true]"),
    ({"topk_ids": [[1], 2]}, "topk_ids must be a list of integers, got [[1], 2]"),
    ({"topk_ids": [1, None]}, "topk_ids must be a list of integers, got [1, null]"),
    ({"layer": 1e0}, "layer must be an integer, got 1.0"),
    ({"layer": True}, "layer must be an integer, got true"),
    ({"sample": [0]}, "sample must be an integer, got [0]"),
    ({"sample": "0"}, 'sample must be an integer, got "0"'),
    ({"req_id": True}, "req_id must be a string, got true"),
    ({"req_id": ["a"]}, 'req_id must be a string, got ["a"]'),
    ({"topk_weights": [-0.31, 0.5]}, "topk_weights must lie in [0, 1], got [-0.31, 0.5]"),
    ({"topk_weights": [1e300, 0.5]}, "topk_weights must lie in [0, 1], got [1e+300, 0.5]"),
    ({"token_idx": 1 << 32}, "token_idx outside 0..2147483647"),
    ({"token_idx": -1}, "token_idx outside 0..2147483647"),
    ({"topk_ids": [3, 3]}, "topk_ids names an expert twice: [3, 3]"),
])
def test_bad_values_stop_the_reading_with_their_line(tmp_path, change, message):
    """Line 4 of 5: a value no writer gives is named, never turned into a number."""
    lines = [meta(), {"type": "request", "req_id": "a", "prompt_len": 2}, GOOD, {**GOOD, "token_idx": 1, **change},
             {**GOOD, "token_idx": 2}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(LogFormatError) as e:
        read_log(path)
    assert str(e.value) == f"line 4: {message}"


@pytest.mark.parametrize("header, message", [
    ({"layers_logged": "0"}, 'line 1: layers_logged must be a list of layer indices, got "0"'),
    ({"top_k": 0}, "line 1: top_k must be a whole number >= 1, got 0"),
    ({"num_experts": "8"}, 'line 1: num_experts must be a whole number >= 1, got "8"'),
])
def test_a_bad_header_is_named(tmp_path, header, message):
    path = write_log(tmp_path / "h.jsonl", {**meta(), **header}, {"a": 1}, [])
    with pytest.raises(LogFormatError, match=re.escape(message)):
        read_log(path)


def test_null_weights_count_as_zero_in_a_note(tmp_path):
    """The writer writes a weight that was not finite in the engine as null."""
    lines = [meta(), GOOD, {**GOOD, "token_idx": 1, "topk_weights": [None, 1.0]}]
    path = tmp_path / "n.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    log = read_log(path)
    assert "1 gate weights are null (not finite in the engine): counted as 0 in weighted figures" in log.notes
    assert layer_stats(log, 0, weighted=True)["shares"][1] == pytest.approx(0.5 / 2.0)


def test_placement_metrics_have_known_answers():
    from analysis.placement import ep_balance, lpt_rank_loads, max_violation

    assert max_violation(np.array([4.0, 0, 0, 0])) == 3.0 and max_violation(np.array([2.0, 2, 2, 2])) == 0.0
    assert math.isnan(max_violation(np.zeros(4)))
    skewed = ep_balance(np.array([3.0, 3, 1, 1]))
    assert skewed["2"] == {"contiguous": 4 / 6, "rebalanced": 1.0, "rebalanced_by": "greedy-lpt"}
    assert skewed["4"]["contiguous"] == skewed["4"]["rebalanced"] == 2 / 3
    assert list(ep_balance(np.ones(60))) == ["2", "3", "4", "5", "6", "10", "12", "15", "20", "30", "60"]
    assert sorted(lpt_rank_loads(np.array([5.0, 4, 3, 3, 2, 1]), 3)) == [6.0, 6.0, 6.0]


def test_stats_json_carries_the_placement_metrics(tmp_path, capsys):
    """One expert of eight takes every first choice: planted skew, known answers."""
    routes = [("a", t, 0, (0, 1 + t % 7), (0.75, 0.25)) for t in range(14)]
    path = write_log(tmp_path / "p.jsonl", meta(), {"a": 7}, routes)
    assert stats.main([str(path), "--json"]) == 0
    layer = json.loads(capsys.readouterr().out)["layers"][0]
    assert layer["max_violation"] == pytest.approx(14 / (28 / 8) - 1)  # expert 0: 14 of 28 selections
    assert layer["ep_balance"]["2"]["contiguous"] == pytest.approx(14 / 20)  # ranks [14+2+2+2, 2+2+2+2]
    assert layer["ep_balance"]["2"]["rebalanced"] == pytest.approx(14 / 20)  # expert 0 alone outweighs the rest
    assert layer["ep_balance"]["8"]["rebalanced_by"] == "greedy-lpt"


def test_vllm_eplb_placement_is_used_when_asked():
    from analysis.placement import ep_balance, eplb_placer

    loads = np.array([3.0, 3, 1, 1, 5, 0, 2, 1])
    balanced = ep_balance(loads, eplb_placer())
    assert {v["rebalanced_by"] for v in balanced.values()} == {"vllm-eplb"}
    assert all(v["rebalanced"] >= v["contiguous"] for v in balanced.values())
    assert balanced["4"] == {"contiguous": 8 / 12, "rebalanced": 0.8, "rebalanced_by": "vllm-eplb"}


@pytest.mark.parametrize("base, num_experts", [(0, 8), (63, 200)])
def test_sequence_metrics_have_known_answers(tmp_path, capsys, base, num_experts):
    """Planted: position t routes to {t, t+1} at layer 0 (consecutive sets share one of
    three experts) and its layer-0 top-1 decides layer 1's top-1 (t -> t+1); a repeated
    record and a second request do not change either. Experts 63-70 of 200 straddle the
    64-expert words the sets are compared in."""
    routes = [(r, t, 0, (base + t, base + t + 1), (0.75, 0.25)) for r in ("a", "b") for t in range(6)]
    routes += [(r, t, 1, (base + t + 2, base + t + 1), (0.4, 0.6)) for r in ("a", "b") for t in range(6)]
    routes.append(("a", 3, 0, (base + 3, base + 4), (0.75, 0.25)))
    path = write_log(tmp_path / "seq.jsonl", meta(num_experts, layers=(0, 1)), {"a": 2, "b": 2}, routes)
    assert stats.main([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [layer["adjacent_overlap"] for layer in out["layers"]] == [pytest.approx(1 / 3)] * 2
    (affinity,) = out["layer_affinity"]
    assert (affinity["from"], affinity["to"], affinity["positions"]) == (0, 1, 12)
    assert affinity["cond_entropy_bits"] == 0.0
    assert affinity["top_transitions"][0] == {"from_expert": base, "to_expert": base + 1, "share": 2 / 12}
    from analysis.sequence import conditional_entropy

    assert conditional_entropy({(0, 1): 2, (0, 2): 2, (1, 1): 4}) == pytest.approx(0.5)  # X=0: 1 bit, half the mass


def test_streamed_neighbours_equal_duckdb_joins_in_any_order(tmp_path):
    """The reader's pairs (in small batches and large, JSONL and parquet) equal DuckDB's
    join of the whole log; a shuffled log, whose order can hide pairs from the stream,
    is counted out of order and joined by DuckDB, with the same numbers. Rows as the
    engine writes them: step by step, a prefix-cache replay after its request's first step."""
    import copy
    import random

    from analysis import convert
    from analysis.sequence import add_sequence_metrics

    rng = random.Random(0)
    layers = (0, 2, 5)
    routes = []
    for step in range(12):
        for r, first in (("a", 0), ("b", 4)):
            positions = range(first, first + 8) if step == 0 else [first + 7 + step]
            for t in positions:
                for layer in layers:
                    ids = rng.sample(range(70), 3)
                    routes.append((r, t, layer, ids, [0.5, 0.3, 0.2]))
            if step == 0 and r == "b":  # positions 0-3 of b from the prefix cache, replayed after
                routes += [("b", t, layer, rng.sample(range(70), 3), [0.6, 0.3, 0.1]) for t in range(4) for layer in layers]
    header = meta(num_experts=70, top_k=3, layers=layers)
    ordered = write_log(tmp_path / "o.jsonl", header, {"a": 8, "b": 8}, routes)
    shuffled = write_log(tmp_path / "s.jsonl", header, {"a": 8, "b": 8}, rng.sample(routes, len(routes)))
    assert convert.main([str(ordered), str(tmp_path / "o.parquet")]) == 0

    def sequence(path, chunk=1 << 20, joined=False):
        log = read_log(path) if Path(path).is_dir() else read_log(path, batch_rows=chunk)
        rep = stats.report(log, list(layers), weighted=False)
        if joined:
            log.neighbours = copy.copy(log.neighbours)
            log.neighbours.unordered = 1
        add_sequence_metrics(rep, log, path, list(layers))
        return log.neighbours.unordered, [s["adjacent_overlap"] for s in rep["layers"]], rep["layer_affinity"]

    unordered, overlap, affinity = sequence(ordered)
    assert unordered == 0 and [a["positions"] for a in affinity] == [19 + 23] * 2  # a: 8 + 11, b: 4 + 8 + 11
    assert sequence(ordered, joined=True)[1:] == (overlap, affinity)
    for chunk in (2, 13):
        assert sequence(ordered, chunk) == (0, overlap, affinity)
    assert sequence(tmp_path / "o.parquet") == (0, overlap, affinity)
    unordered, *rest = sequence(shuffled, 13)
    assert unordered > 0 and rest == [overlap, affinity]


def test_a_conflicting_repeat_is_named_in_a_note(tmp_path):
    """Same key, other experts: the first record counts, and the note says the log is not
    one engine's; an identical repeat only counts once."""
    lines = [meta(), GOOD, {**GOOD, "token_idx": 1}, {**GOOD, "token_idx": 1, "topk_ids": [4, 5]}, GOOD]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    log = read_log(path)
    assert (log.records, log.duplicates) == (4, 2) and layer_stats(log, 0)["tokens"] == 2
    assert ("2 repeated route records were counted once (the first of each key); 1 key(s) were logged with "
            "different experts or weights: not one engine's log (shards of different runs merged?)") in log.notes
    assert expert_shares(log.loads, 0)[1] == 0.5


def test_layer_major_order_is_a_sort_by_layer_stream_position():
    """The neighbours' order, on rows grouped by layer whose positions are runs of one
    sequence cut at either end (a parquet part), on layers that are not, and on rows in
    log order, equals a plain sort."""
    from analysis.neighbours import _layer_major

    rng = np.random.default_rng(0)
    sequence = rng.permutation(200)
    stream, position = sequence // 20, sequence % 20 + 5
    runs = [(0, 200), (3, 200), (0, 197), (10, 150), (0, 200)]
    slot = np.concatenate([np.full(b - a, s) for s, (a, b) in enumerate(runs)])
    rows = np.concatenate([np.arange(a, b) for a, b in runs])
    stream, position = stream[rows], position[rows]
    position[-30:] = position[-30:][::-1] + 100  # the last layer: not a run of the sequence
    for s, p, l in ((stream, position, slot), (stream[::-1].copy(), position[::-1].copy(), slot[::-1].copy())):
        order, starts = _layer_major(s, l, p)
        assert sorted(order.tolist()) == list(range(len(l)))
        triples = list(zip(l[order].tolist(), s[order].tolist(), p[order].tolist()))
        assert triples == sorted(triples)
        assert (l[order][starts[:-1]] == np.unique(l)).all() and starts[-1] == len(l)


def test_positions_past_what_the_front_end_returned_are_counted(tmp_path, capsys):
    """a: 3 prompt + 4 fed positions, 2 tokens returned: positions 5 and 6 never reached
    its caller. b: cut at its second-last position. d: 2 of 4 prompt positions cached,
    1 token returned, position 5 past it. c: ended by the engine, no count. The JSONL
    and parquet forms say the same."""
    lengths = {"a": (3, 7, 2), "b": (2, 4, 3), "c": (2, 5, None), "d": (4, 6, 1)}
    path = write_log(tmp_path / "cut.jsonl", meta(num_experts=4, top_k=1), {r: p for r, (p, _, _) in lengths.items()},
                     [(r, t, 0, (t % 4,), (1.0,)) for r, (_, n, _) in lengths.items() for t in range(n)])
    lines = path.read_text().splitlines()
    ends = [{"type": "request_end", "req_id": r, "finished": True, "routed_positions": n - 2 * (r == "d"),
             "recomputed_positions": 0, "cached_positions": 2 * (r == "d"),
             **({} if got is None else {"returned_tokens": got})} for r, (_, n, got) in lengths.items()]
    path.write_text("\n".join(lines[:-1] + [json.dumps(e) for e in ends] + lines[-1:]) + "\n")
    assert read_log(path).not_returned == {"requests": 3, "positions": 3}
    assert stats.main([str(path), "--json"]) in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["positions_not_returned"] == {"requests": 3, "positions": 3}
    assert any("3 requests were cut by the front end" in n for n in out["notes"])
    from analysis import convert

    convert.main([str(path), str(tmp_path / "cut.parquet")])
    assert read_log(tmp_path / "cut.parquet").not_returned == {"requests": 3, "positions": 3}
    assert "positions_not_returned" not in stats.report(read_log(small_log(tmp_path)), [0], weighted=False)
    lines = path.read_text().splitlines()
    lines[-1] = json.dumps({"type": "end", "route_records": 22, "returned_tokens_error": "No such file (/tmp/x)"})
    path.write_text("\n".join(lines) + "\n")
    assert any("could not read the front end's counts (No such file (/tmp/x))" in n for n in read_log(path).notes)
