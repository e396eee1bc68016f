"""bench/decode_throughput.py on the tiny trained model: every mode runs and the JSON adds up."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_decode_bench_reports_every_mode(tiny_trained: dict) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench/decode_throughput.py"), "--model-dir",
         str(tiny_trained["model_dir"]), "--processed", str(tiny_trained["processed"]),
         "--limit", "12", "--loop-limit", "4", "--batch-size", "4", "--beam", "3", "--threads",
         "1", "--int8", "--no-cuda"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    cpu = report["cpu"]
    assert report["test_sources"] == 12 and report["loop_sources"] == 4
    for mode, n in (("loop_greedy", 4), ("batched_greedy", 12), ("batched_beam", 12),
                    ("batched_beam_int8", 12), ("loop_greedy_int8", 4),
                    ("loop_greedy_full_vocab", 4), ("batched_beam_full_vocab", 12)):
        assert cpu[mode]["sentences"] == n, mode
        assert cpu[mode]["sentences_per_s"] > 0 and 0 <= cpu[mode]["bleu"] <= 100, mode
    # the model folder has the shortlist stage's file: the product modes use it
    assert cpu["shortlist"] == {"top_k": 100, "frequent": 100}
    # a batch's shortlist is the union over its sentences, so one sentence alone may differ
    assert 0 <= cpu["loop_matches_batched_greedy"] <= 1
    assert 0 <= cpu["batched_beam_int8"]["same_output_as_fp32"] <= 1
    assert 0 <= cpu["batched_beam_full_vocab"]["same_output_as_shortlist"] <= 1
    full = cpu["batched_beam"]["sentences_per_s"] / cpu["loop_greedy_full_vocab"][
        "sentences_per_s"]
    assert abs(cpu["speedup_batched_beam_vs_loop_full_vocab"] - full) <= 0.06 + 0.01 * full
    ratio = cpu["batched_beam"]["sentences_per_s"] / cpu["loop_greedy"]["sentences_per_s"]
    assert abs(cpu["speedup_batched_beam_vs_loop"] - ratio) <= 0.06 + 0.01 * ratio
    assert set(cpu["targets_met"]) == {"beam_vs_loop_10x", "beam_150_per_s",
                                       "beam_vs_loop_full_vocab_10x",
                                       "beam_int8_vs_loop_10x", "beam_int8_150_per_s"}
    assert cpu["targets_met"]["beam_150_per_s"] == (cpu["batched_beam"]["sentences_per_s"]
                                                    >= 150)
