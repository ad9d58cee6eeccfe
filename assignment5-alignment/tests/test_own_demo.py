"""The demonstration's parts: the problem generator against an independent evaluation of its own text, the
digit-preserving tokenizer, the held-out split, and the whole pipeline on a CPU-sized configuration."""

import json
import random
import re
from dataclasses import replace

import pytest

from cs336_alignment.demo.__main__ import main
from cs336_alignment.demo.config import preset
from cs336_alignment.demo.problems import generate, is_held_out, maybe_slip
from cs336_alignment.demo.tokenizer import train_demo_tokenizer
from cs336_alignment.reward import r1_zero_reward
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)

WORD_OPS = {"buys": "+", "finds": "+", "gives away": "-", "loses": "-"}


def solve_from_text(question: str) -> int:
    """Reads the question's sentences and computes the answer (independent of the generator's step list)."""
    value = int(re.match(r"\w+ has (\d+) ", question).group(1))
    for sentence in re.split(r"(?<=\.) ", question)[1:-1]:
        if m := re.search(r"(buys|finds|gives away|loses) (\d+)", sentence):
            value = value + int(m.group(2)) if WORD_OPS[m.group(1)] == "+" else value - int(m.group(2))
        elif "doubles" in sentence:
            value *= 2
        elif "triples" in sentence:
            value *= 3
        elif m := re.search(r"makes it (\d+) times", sentence):
            value *= int(m.group(1))
        elif m := re.search(r"among (\d+) friends", sentence):
            assert value % int(m.group(1)) == 0
            value //= int(m.group(1))
        else:
            raise AssertionError(f"unparsed sentence {sentence!r}")
    return value


def test_problems_are_consistent_with_their_text_and_reward():
    problems = generate(300, seed=3, held_out=False)
    rng = random.Random(0)
    for p in problems:
        assert solve_from_text(p.question) == p.answer and 0 <= p.answer <= 999
        # The trace's equations are true arithmetic, and the clean SFT target earns the full reward.
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", p.r1_response()):
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
                    "/": int(a) // int(b)}[op] == int(c)
        assert r1_zero_reward(p.r1_response(), str(p.answer))["reward"] == 1.0
        slip = maybe_slip(p, rng, error_rate=1.0)
        noisy = p.r1_response(slip)
        if p.reasoning(slip)[1] != p.answer:
            assert r1_zero_reward(noisy, str(p.answer)) == {"format_reward": 1.0, "answer_reward": 0.0,
                                                            "reward": 0.0}
    assert len({p.question for p in problems}) == 300


def test_held_out_split_is_disjoint_and_seeded():
    train = generate(2000, seed=0, held_out=False)
    held = generate(200, seed=1, held_out=True)
    assert not {p.question for p in train} & {p.question for p in held}
    assert all(is_held_out(p) for p in held) and not any(is_held_out(p) for p in train)
    assert [p.question for p in generate(50, seed=1, held_out=True)] == [p.question for p in held[:50]]


def test_tokenizer_keeps_digits_single_and_round_trips():
    problems = generate(300, seed=5, held_out=False)
    text = "<|endoftext|>".join(p.plain_text() for p in problems)
    tok = train_demo_tokenizer(text, 400)
    for p in problems[:50]:
        s = p.r1_prompt() + p.r1_response()
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert all(len(tok.decode([i])) == 1 for i in ids if any(ch.isdigit() for ch in tok.decode([i])))
    assert len(tok.encode(problems[0].plain_text())) < 0.7 * len(problems[0].plain_text())  # merges still help


def test_preset_overrides_and_errors(capsys):
    assert preset("cpu-smoke", ["grpo_steps=3", "grpo_lr=0.5"]).grpo_steps == 3
    with pytest.raises(ValueError, match="bad override"):
        preset("cpu-smoke", ["no_such_field=1"])
    assert main(["--preset", "cpu-smoke", "--out-dir", "x", "--set", "grpo_steps=abc"]) == 2
    assert "not a int" in capsys.readouterr().err


TINY = replace(preset("cpu-smoke"), n_pretrain_problems=400, pretrain_steps=3, pretrain_batch_size=2, sft_steps=2,
               sft_batch_size=2, sft_grad_accum=1, n_heldout=4, n_eval_in_loop=4, max_new_tokens=8,
               throughput_rows=4, throughput_tokens=8, grpo_steps=2, rollout_batch_size=8, train_batch_size=8,
               grpo_grad_accum=1, grpo_lr=1e-2)


def numbers(results: dict) -> str:
    """Everything a seed must fix: rewards, entropies, lengths, losses, curves (wall times and speeds aside)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()
                    if k not in ("timings_s", "native_throughput", "started_from", "pretrain") and "second" not in k
                    and "per_s" not in k}
        return [strip(v) for v in value] if isinstance(value, list) else value
    return json.dumps(strip(results), sort_keys=True, default=float)


def test_pipeline_end_to_end_on_cpu(tmp_path, monkeypatch):
    import cs336_alignment.demo.__main__ as entry

    monkeypatch.setattr(entry, "preset", lambda name, overrides: TINY)
    assert main(["--preset", "cpu-smoke", "--out-dir", str(tmp_path)]) == 0
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == ["a5_demo_entropy_length.png", "a5_demo_log.jsonl", "a5_demo_results.json", "a5_demo_reward.png",
                     "a5_demo_samples.jsonl", "a5_demo_summary.md"]
    results = json.loads((tmp_path / "a5_demo_results.json").read_text())
    assert results["pretrain"]["steps"] == 3 and results["sft_steps_run"] == 2 and results["grpo_steps_run"] == 2
    held = results["heldout"]
    assert held["n"] == 4 and 0 <= held["sft"]["sampled"]["reward"] <= 1
    assert results["reward_gain_sampled"] == pytest.approx(held["grpo"]["sampled"]["reward"]
                                                           - held["sft"]["sampled"]["reward"])
    tp = results["native_throughput"]
    assert tp["tokens"] == tp["rows"] * tp["new_tokens_per_row"] and tp["tokens_per_s"] > 0
    assert [e["step"] for e in results["curves"]["grpo_eval"]] == [0, 1, 2]


def test_a_seed_fixes_every_number_and_a_saved_start_resumes_exactly(tmp_path):
    """Step counts, not clocks, decide each stage: the same seed twice gives identical results (pretraining,
    SFT, every sampled evaluation and rollout), and GRPO from a saved SFT start gives what the run that trained
    the start gave. (The tiny model earns no reward, so its GRPO steps carry no gradient; the GRPO loop's own
    exact resumption with a live signal is tested in test_own_loops.)"""
    from cs336_alignment.demo.pipeline import run_demo

    first = run_demo(TINY, str(tmp_path / "a"), save_start_to=str(tmp_path / "start.pt"))
    again = run_demo(TINY, str(tmp_path / "b"))
    resumed = run_demo(TINY, str(tmp_path / "c"), start_from=str(tmp_path / "start.pt"))
    assert numbers(first) == numbers(again) == numbers(resumed)
    assert first["pretrain"] == {**again["pretrain"], "seconds": first["pretrain"]["seconds"],
                                 "tokens_per_s": first["pretrain"]["tokens_per_s"]}
    other = run_demo(replace(TINY, seed=1), str(tmp_path / "d"))
    assert numbers(other) != numbers(first)


def test_a_start_made_with_other_settings_is_refused(tmp_path, capsys):
    from cs336_alignment.demo.pipeline import run_demo

    run_demo(TINY, str(tmp_path / "a"), save_start_to=str(tmp_path / "start.pt"), start_only=True)
    assert (tmp_path / "start.pt").is_file() and not (tmp_path / "a" / "a5_demo_results.json").exists()
    code = main(["--preset", "cpu-smoke", "--out-dir", str(tmp_path / "b"), "--start-from", str(tmp_path / "start.pt"),
                 "--set", "pretrain_steps=4"])
    assert code == 2 and "pretrain_steps=3" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before the run made its folder
    assert main(["--preset", "cpu-smoke", "--out-dir", "x", "--start-only"]) == 2


def test_seed_changes_every_data_choice():
    from cs336_alignment.demo.pipeline import make_data

    small = replace(TINY, n_pretrain_problems=200, n_sft_examples=16, n_grpo_questions=32)
    a, b, c = make_data(small), make_data(small), make_data(replace(small, seed=1))
    assert a.sft_examples == b.sft_examples and a.heldout == b.heldout and a.pretrain_texts == b.pretrain_texts
    assert a.sft_examples != c.sft_examples and a.heldout.prompts != c.heldout.prompts
    assert a.grpo_questions.prompts != c.grpo_questions.prompts
