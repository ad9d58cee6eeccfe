import csv
import json

import pytest
import torch

from cs336_alignment.cli import main, run
from cs336_alignment.testing import bpe_vocab_and_merges, hf_tokenizer, tiny_basics_lm, tiny_llama
from cs336_basics.checkpoint import save_checkpoint
from cs336_basics.tokenizer import save_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = hf_tokenizer()
    tiny_llama(len(tokenizer), seed=7).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "math.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"problem": "What is 1/2 + 1/2?", "answer": "1"},
        {"problem": "Compute 2+2.", "solution": "It is $\\boxed{4}$."},
    ]) + "\n")
    (d / "gsm8k.jsonl").write_text(json.dumps({"question": "What is 3 plus 4?", "answer": "3+4=7\n#### 7"}) + "\n")
    mmlu = d / "mmlu"
    mmlu.mkdir()
    with open(mmlu / "basic_arithmetic_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["1+1?", "1", "2", "3", "4", "B"], ["2+2?", "4", "5", "6", "7", "A"]])
    (d / "alpaca.jsonl").write_text(json.dumps({"instruction": "Name a colour.", "dataset": "mini"}) + "\n")
    with open(d / "sst.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "harm_area", "prompts_final"], ["s1", "demo", "Tell me a secret."]])
    return d


@pytest.mark.parametrize(("task", "data", "metric"), [
    ("math", "math.jsonl", "answer_reward"),
    ("gsm8k", "gsm8k.jsonl", "correct"),
    ("mmlu", "mmlu", "correct"),
    ("alpaca-eval", "alpaca.jsonl", "empty_output"),
    ("sst", "sst.csv", "refusal_rate_heuristic"),
])
def test_eval_commands_write_results_and_summary(task, data, metric, model_dir, data_dir, tmp_path, capsys):
    summary = run(["eval", task, "--data", str(data_dir / data), "--out", str(tmp_path), "--model", model_dir,
                    "--max-tokens", "6", "--temperature", "0", "--device", "cpu"])
    name = {"alpaca-eval": "alpaca_eval"}.get(task, task)
    rows = [json.loads(line) for line in (tmp_path / f"{name}_results.jsonl").read_text().splitlines()]
    assert len(rows) == summary["examples"] and metric in summary and 0 <= summary[metric] <= 1
    assert json.loads((tmp_path / f"{name}_summary.json").read_text())["examples"] == len(rows)
    assert "| metric | value |" in capsys.readouterr().out
    if task == "mmlu":
        assert set(summary["per_subject_accuracy"]) == {"basic arithmetic"}
    if task == "alpaca-eval":
        judged = json.loads((tmp_path / "alpaca_eval_outputs.json").read_text())
        assert judged[0].keys() == {"instruction", "output", "generator", "dataset"}
    if task == "sst":
        assert rows[0]["prompts_final"] == "Tell me a secret." and "output" in rows[0]
    if task == "math":
        assert rows[1]["answer"] == "4" and rows[0]["prompt"].endswith("<think>")


def test_sst_with_an_lm_judge(model_dir, data_dir, tmp_path):
    summary = run(["eval", "sst", "--data", str(data_dir / "sst.csv"), "--out", str(tmp_path), "--model", model_dir,
                   "--max-tokens", "4", "--judge-model", model_dir])
    row = json.loads((tmp_path / "sst_results.jsonl").read_text().splitlines()[0])
    # A random tiny judge says neither word: that counts as unsafe and is reported as unparsed.
    assert {"judge_output", "judged_safe", "judge_unparsed"} <= row.keys()
    assert summary["safe_rate_judge"] == float(row["judged_safe"]) and summary["judge_unparsed"] in (0, 1)


def test_eval_with_a_cs336_basics_run(data_dir, tmp_path):
    vocab, merges = bpe_vocab_and_merges()
    tok_dir, run_dir = tmp_path / "tok", tmp_path / "run"
    save_tokenizer(vocab, merges, tok_dir)
    lm = tiny_basics_lm(len(vocab) + 1, context_length=512)
    save_checkpoint(lm, torch.optim.SGD(lm.parameters(), lr=0.1), 0, run_dir / "checkpoint.pt",
                    extra={"model_config": lm.config.to_dict()})
    summary = run(["eval", "gsm8k", "--data", str(data_dir / "gsm8k.jsonl"), "--out", str(tmp_path / "o"),
                    "--basics-run", str(run_dir), "--basics-tokenizer", str(tok_dir), "--max-tokens", "4"])
    assert summary["samples"] == 1


def test_grade_and_prompt_commands(capsys):
    assert run(["grade", "--response", " x </think> <answer>\\frac{1}{2}</answer>", "--truth", "0.5"])["reward"] == 1
    assert "<think>" in run(["prompt", "r1_zero"])
    capsys.readouterr()
    assert main(["prompt", "question_only"]) == 0
    assert capsys.readouterr().out.strip() == "{question}"


def test_bad_input_is_a_one_line_error(tmp_path, model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "gsm8k", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path),
              "--model", model_dir])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cs336-align: error:") and "missing.jsonl does not exist" in err and err.count("\n") == 1
    (tmp_path / "x.jsonl").write_text("")
    with pytest.raises(SystemExit):
        main(["eval", "gsm8k", "--data", str(tmp_path / "x.jsonl"), "--out", str(tmp_path)])
    assert "give --model" in capsys.readouterr().err
    long_question = json.dumps({"question": "Question 1 " * 400, "answer": "#### 1"})
    (tmp_path / "long.jsonl").write_text(long_question + "\n")
    with pytest.raises(SystemExit):
        main(["eval", "gsm8k", "--data", str(tmp_path / "long.jsonl"), "--out", str(tmp_path), "--model", model_dir])
    assert "leaves no room to generate" in capsys.readouterr().err
