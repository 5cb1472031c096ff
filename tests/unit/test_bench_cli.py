"""`textgen bench`: the installed console script on a tiny configuration (random weights), and the
report it writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=500, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
# embed + lm_head + per layer (qkv, o, gate_up, down, 2 norms) + final norm
TINY_PARAMS = 2 * 500 * 64 + 2 * (64 * (64 + 2 * 32) + 64 * 64 + 64 * 256 + 128 * 64 + 2 * 64) + 64
STATS = {"avg", "min", "max", "p50", "p90", "p99"}


def _textgen(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("textgen")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
    return subprocess.run([str(script), "bench", *args], env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    folder = tmp_path_factory.mktemp("bench")
    (folder / "tiny.json").write_text(json.dumps({"_source": "test", **TINY}))
    out = folder / "out" / "report.json"
    done = _textgen("--model-id", str(folder / "tiny.json"), "--batch-size", "1", "3", "--batch-size", "2",
                    "--sequence-length", "5", "--decode-length", "4", "--runs", "1", "--warmups", "1",
                    "--backend", "cpu", "--dtype", "float32", "--output", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()), done.stdout


def test_report_names_the_model_and_the_machine(report: tuple[dict, str]) -> None:
    data, _ = report
    model = data["model"]
    assert (model["architecture"], model["load_format"], model["dtype"], model["attention"]) == (
        "LlamaForCausalLM", "dummy", "float32", "cpu_fused")
    assert model["num_parameters"] == TINY_PARAMS
    assert model["backend"].startswith("cpu")
    assert data["machine"]["cores"] == os.cpu_count() and len(data["machine"]["load_average"]) == 3
    assert data["settings"]["batch_sizes"] == [1, 3, 2] and data["settings"]["sequence_lengths"] == [5]


def test_one_result_per_grid_point_with_consistent_statistics(report: tuple[dict, str]) -> None:
    data, _ = report
    assert [(r["batch_size"], r["sequence_length"], r["decode_length"], r["runs"]) for r in data["results"]] == [
        (1, 5, 4, 1), (3, 5, 4, 1), (2, 5, 4, 1)]
    for r in data["results"]:
        b, prefill, decode, samples = r["batch_size"], r["prefill"], r["decode"], r["samples"]
        assert set(prefill) == {"latency_ms", "throughput_tokens_per_s"}
        assert set(decode) == {"token_latency_ms", "throughput_tokens_per_s", "total_latency_ms"}
        assert all(set(group[k]) == STATS for group in (prefill, decode) for k in group)
        assert len(samples["prefill_ms"]) == 1 and len(samples["decode_step_ms"]) == 3  # runs x (decode_length - 1)
        steps = np.asarray(samples["decode_step_ms"])
        assert decode["token_latency_ms"]["p50"] == pytest.approx(np.median(steps))
        assert decode["throughput_tokens_per_s"]["avg"] == pytest.approx(np.mean(b * 1e3 / steps))
        assert decode["total_latency_ms"]["avg"] == pytest.approx(steps.sum())
        assert prefill["throughput_tokens_per_s"]["avg"] == pytest.approx(b * 5 * 1e3 / samples["prefill_ms"][0])


def test_table_has_a_row_per_grid_point(report: tuple[dict, str]) -> None:
    _, stdout = report
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [tuple(c.strip() for c in row.split("|")[1:3]) for row in rows] == [("1", "5"), ("3", "5"), ("2", "5")]


def test_unknown_model_id_fails_with_the_known_names() -> None:
    from textgen.api.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--decode-length"])  # argparse: missing value
    from textgen.api.bench_models import resolve_bench_model

    with pytest.raises(ValueError, match="not a known configuration .*llama-100m"):
        resolve_bench_model("no-such-config")


def test_bad_settings_exit_2_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    from textgen.api.cli import main

    assert main(["bench", "--model-id", "llama-100m", "--decode-length", "1"]) == 2
    assert "--decode-length must be >= 2" in capsys.readouterr().err


def test_covering_tokenizer_maps_every_id(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from textgen.api.bench_models import write_covering_tokenizer

    write_covering_tokenizer(tmp_path, {"vocab_size": 50, "bos_token_id": 7, "eos_token_id": [9, 10]})
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 50 and (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (7, 9, 0, None)
    assert tok.convert_ids_to_tokens([0, 1, 7, 9, 10, 49]) == ["<unk>", "\u0120t1", "<s>", "</s>", "\u0120t10", "\u0120t49"]
    assert tok.decode([1, 2, 9, 3]) == " t1 t2</s> t3"
    assert tok.encode(" t1 t49 t3", add_special_tokens=False) == [1, 49, 3]
