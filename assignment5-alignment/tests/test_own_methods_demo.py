"""The head-to-head of the RL methods (`python -m cs336_alignment.demo.multi methods`), end to end in its tiny
CPU mode: every method from each seed's one SFT start with one rollout budget, the reward model of ppo-rm
trained and scored on held-out pairs, and the gathered JSON, table and figure consistent with the runs they
summarise (the tiny model learns nothing, so no number here is a result)."""

import copy
import json
import math
import sys

import pytest

from cs336_alignment.demo import compare, multi
from cs336_alignment.demo.config import METHODS, preset
from cs336_alignment.demo.multi import main
from cs336_basics.cli_support import UserError
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)

SEEDS = (0, 1)


def commands_in_this_process(jobs: dict[str, list[str]], root: str, max_parallel: int = 0) -> dict[str, int]:
    """Stands in for `multi.run_children`: each child's command line, run through the demo's own CLI entry
    point here instead of a new Python process (the GPU run's path, minus process start-up)."""
    from cs336_alignment.demo.__main__ import main as demo_main

    codes = {}
    for label, command in jobs.items():
        assert command[:3] == [sys.executable, "-m", "cs336_alignment.demo"]
        codes[label] = demo_main(command[3:])
    return codes


@pytest.fixture(scope="module")
def head_to_head(tmp_path_factory):
    """The device command's path (per-seed starts, then one child per seed and method, each a demo command
    line) on the tiny preset, for two seeds."""
    root = tmp_path_factory.mktemp("methods")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(multi, "run_children", commands_in_this_process)
        code = main(["methods", "--preset", "tiny", "--seeds", *map(str, SEEDS), "--out-dir", str(root / "runs"),
                     "--fig-dir", str(root / "fig")])
    return code, root


def run_results(root, seed: int, method: str) -> dict:
    return json.loads((root / "runs" / f"seed{seed}" / method / "a5_demo_results.json").read_text())


def se(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) / math.sqrt(len(values))


def test_head_to_head_writes_json_table_and_figure(head_to_head):
    code, root = head_to_head
    assert code == 0
    comparison = json.loads((root / "runs" / "a5_methods.json").read_text())
    assert comparison["card"] == "cpu" and comparison["seeds"] == list(SEEDS)
    assert list(comparison["per_method"]) == list(METHODS) and not comparison["missing"]
    for name in ("runs/a5_methods_cpu.png", "fig/a5_methods_cpu.png"):
        assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (root / "runs" / "a5_methods.md").read_text()
    for label in compare.LABELS.values():
        assert f"| {label} |" in table
    assert "same rollout budget for every run: yes" in table and "within each seed: yes" in table


def test_every_method_has_the_same_budget_and_start(head_to_head):
    _, root = head_to_head
    config = preset("tiny")
    comparison = json.loads((root / "runs" / "a5_methods.json").read_text())
    assert comparison["checks"] == {"same_rollout_budget": True, "same_start_within_seed": True,
                                    "stopped_by_guard": []}
    for seed in SEEDS:
        runs = {m: run_results(root, seed, m) for m in METHODS}
        starts = {(r["curves"]["grpo_eval"][0]["reward"], r["heldout"]["sft"]["sampled"]["reward"],
                   r["heldout"]["sft"]["greedy"]["reward"]) for r in runs.values()}
        assert len(starts) == 1  # one SFT start per seed, evaluated identically by every method
        for method, r in runs.items():
            train = r["curves"]["grpo_train"]
            budget = r["budget"]
            assert r["method"] == method and r["config"]["seed"] == seed
            assert budget["rl_steps"] == len(train) == config.grpo_steps
            assert budget["rollouts"] == config.grpo_steps * config.rollout_batch_size
            assert budget["max_new_tokens"] == config.max_new_tokens
            assert budget["generated_tokens"] == round(sum(t["response_length"] for t in train)
                                                       * config.rollout_batch_size)
            # Two optimizer steps per rollout batch for every method (train batch = half the rollout batch).
            assert budget["optimizer_steps"] == config.grpo_steps * config.rollout_batch_size // config.train_batch_size
            assert [e["step"] for e in r["curves"]["grpo_eval"]] == list(range(config.grpo_steps + 1))
            assert (budget["reward_model_rollouts"] > 0) == (method == "ppo-rm")
            saved = comparison["per_method"][method]["seeds"][str(seed)]
            assert saved["budget"] == budget
            assert saved["curve"] == [{"step": e["step"], "reward": e["reward"]} for e in r["curves"]["grpo_eval"]]
            assert saved["end"] == r["heldout"]["grpo"]["sampled"]["reward"]


def test_reward_model_is_trained_on_rule_scored_pairs_and_scored_held_out(head_to_head):
    _, root = head_to_head
    config = preset("tiny")
    for seed in SEEDS:
        rm = run_results(root, seed, "ppo-rm")["reward_model"]
        assert rm["rollouts"] == config.rm_questions * config.rm_group_size
        assert rm["train_pairs"] > 0 and rm["heldout_pairs"] > 0 and rm["steps"] == config.rm_steps
        assert 0 <= rm["heldout_accuracy"] <= 1 and rm["heldout_accuracy_start"] is not None
        for method in ("grpo", "gspo", "ppo-rule"):
            assert run_results(root, seed, method)["reward_model"] is None


def test_means_and_standard_errors_follow_from_the_per_seed_values(head_to_head):
    _, root = head_to_head
    comparison = json.loads((root / "runs" / "a5_methods.json").read_text())
    for method, entry in comparison["per_method"].items():
        per_seed = [entry["seeds"][str(s)] for s in SEEDS]
        for key in ("start", "end", "start_greedy", "end_greedy"):
            values = [r[key] for r in per_seed]
            assert entry[key]["values"] == values
            assert entry[key]["mean"] == pytest.approx(sum(values) / len(values))
            assert entry[key]["se"] == pytest.approx(se(values))
        gains = [r["end"] - r["start"] for r in per_seed]
        assert entry["gain"]["mean"] == pytest.approx(sum(gains) / len(gains))
        assert entry["gain"]["se"] == pytest.approx(se(gains))
        for point in entry["curve_mean"]:
            values = [next(p["reward"] for p in r["curve"] if p["step"] == point["step"]) for r in per_seed]
            assert point["mean"] == pytest.approx(sum(values) / len(values))
            assert point["se"] == pytest.approx(se(values)) and point["n"] == len(SEEDS)
        accuracy = entry["reward_model_heldout_accuracy"]
        assert (accuracy is not None) == (method == "ppo-rm")
    best = max(comparison["per_method"], key=lambda m: comparison["per_method"][m]["end"]["mean"])
    assert comparison["winner"]["end"] == comparison["per_method"][best]["end"]["mean"]


def test_aggregation_of_varied_per_seed_rewards(head_to_head):
    """The tiny runs all score 0, so the same aggregation is checked on their results with distinct rewards
    written in: means, standard errors across seeds, the winner and its paired margin over the runner-up."""
    _, root = head_to_head
    seeds = [*SEEDS, 7]
    runs, end = {}, {}
    for i, method in enumerate(METHODS):
        for j, seed in enumerate(seeds):
            r = run_results(root, SEEDS[j % len(SEEDS)], method)
            held = r["heldout"]
            held["sft"]["sampled"]["reward"] = 0.3 + 0.01 * j
            end[(seed, method)] = held["grpo"]["sampled"]["reward"] = 0.4 + 0.1 * i + 0.03 * j * j
            for k, e in enumerate(r["curves"]["grpo_eval"]):
                e["reward"] = 0.3 + 0.01 * j + k * (0.05 * i + 0.02 * j)
            runs[(seed, method)] = r
    comparison = compare.compare(runs, seeds, list(METHODS))
    for method in METHODS:
        ends = [end[(s, method)] for s in seeds]
        entry = comparison["per_method"][method]
        assert entry["end"]["mean"] == pytest.approx(sum(ends) / 3) and entry["end"]["se"] == pytest.approx(se(ends))
        gains = [e - (0.3 + 0.01 * j) for j, e in enumerate(ends)]
        assert entry["gain"]["se"] == pytest.approx(se(gains)) and entry["gain"]["se"] > 0
        last = entry["curve_mean"][-1]
        values = [runs[(s, method)]["curves"]["grpo_eval"][-1]["reward"] for s in seeds]
        assert last["mean"] == pytest.approx(sum(values) / 3) and last["se"] == pytest.approx(se(values))
    assert comparison["winner"]["method"] == "ppo-rm" and comparison["winner"]["runner_up"] == "ppo-rule"
    assert comparison["winner"]["margin"] == pytest.approx(0.1)
    assert comparison["winner"]["margin_se"] == pytest.approx(0)


def test_drift_reports_the_reward_a_run_was_given_against_what_it_became(head_to_head):
    """A PPO (reward model) run whose reward-model score climbs while its answers shrink: the drift entry is the
    mean score of the first and last four steps, the held-out format reward and length, and the last KL; a rule
    run's training reward is its rule reward. Both show in the table's second part."""
    _, root = head_to_head
    rm, rule = run_results(root, SEEDS[0], "ppo-rm"), run_results(root, SEEDS[0], "grpo")
    scores = [-0.5 + 0.25 * i for i in range(10)]
    rm["curves"]["grpo_train"] = [{"step": i + 1, "reward_mean": 0.4, "score_mean": v, "kl": 0.1 * i}
                                  for i, v in enumerate(scores)]
    rm["heldout"]["sft"]["sampled"].update(format_reward=0.98, response_length=41.0)
    rm["heldout"]["grpo"]["sampled"].update(format_reward=0.02, response_length=6.5)
    rule["curves"]["grpo_train"] = [{"step": i + 1, "reward_mean": 0.3 + 0.01 * i} for i in range(6)]
    d = compare.drift(rm)
    assert d["trained_reward_first"] == pytest.approx(sum(scores[:4]) / 4)
    assert d["trained_reward_last"] == pytest.approx(sum(scores[-4:]) / 4)
    assert d["kl_last"] == pytest.approx(0.9)
    assert (d["format_reward_start"], d["format_reward_end"]) == (0.98, 0.02)
    assert (d["response_length_start"], d["response_length_end"]) == (41.0, 6.5)
    r = compare.drift(rule)
    assert r["trained_reward_first"] == pytest.approx(0.315) and r["trained_reward_last"] == pytest.approx(0.335)
    assert r["kl_last"] is None
    table = compare.markdown(compare.compare({(0, "ppo-rm"): rm, (0, "grpo"): rule}, [0], ["grpo", "ppo-rm"]))
    assert "| PPO (reward model) | -0.125 → 1.375 | 0.980 → 0.020 | 41.0 → 6.5 | 0.90 |" in table
    assert "| GRPO | 0.315 → 0.335 |" in table and table.count("| – |") >= 1


def test_checks_catch_unequal_budgets_and_starts_and_report_redraws(head_to_head, tmp_path):
    _, root = head_to_head
    comparison = json.loads((root / "runs" / "a5_methods.json").read_text())
    unequal = copy.deepcopy(comparison)
    unequal["per_method"]["gspo"]["seeds"]["1"]["budget"]["rollouts"] -= 1
    assert not compare.checks(unequal)["same_rollout_budget"]
    other_start = copy.deepcopy(comparison)
    other_start["per_method"]["ppo-rule"]["seeds"]["0"]["curve"][0]["reward"] += 0.5
    assert not compare.checks(other_start)["same_start_within_seed"]
    (tmp_path / "a5_methods.json").write_text(json.dumps(unequal))
    assert main(["report", "--of", "methods", "--out-dir", str(tmp_path)]) == 0
    assert "same rollout budget for every run: NO" in (tmp_path / "a5_methods.md").read_text()
    assert (tmp_path / "a5_methods_cpu.png").is_file()


def test_report_compares_run_folders_gathered_from_separate_jobs(head_to_head, tmp_path):
    """Seeds run as separate device jobs (`--seeds 0`, `--seeds 1`) leave only their run folders' results;
    `report --of methods` over the union gives the comparison of one job that ran both."""
    _, root = head_to_head
    for seed in SEEDS:
        for method in METHODS:
            folder = tmp_path / f"seed{seed}" / method
            folder.mkdir(parents=True)
            (folder / "a5_demo_results.json").write_text(json.dumps(run_results(root, seed, method)))
    (tmp_path / "seed7").mkdir()  # a seed folder without finished runs is not a seed of the comparison
    assert main(["report", "--of", "methods", "--out-dir", str(tmp_path)]) == 0
    gathered = json.loads((tmp_path / "a5_methods.json").read_text())
    one_job = json.loads((root / "runs" / "a5_methods.json").read_text())
    assert gathered["seeds"] == list(SEEDS) and gathered["methods"] == list(METHODS)
    assert gathered["per_method"] == one_job["per_method"] and gathered["winner"] == one_job["winner"]
    assert (tmp_path / "a5_methods_cpu.png").is_file()


def test_tiny_mode_in_one_process_gives_the_same_numbers(head_to_head, tmp_path):
    """`--tiny` (every stage in this process, in turn) reproduces the child-command path's seed-0 run."""
    _, root = head_to_head
    assert main(["methods", "--tiny", "--seeds", "0", "--methods", "gspo", "--out-dir", str(tmp_path)]) == 0
    inline = json.loads((tmp_path / "seed0" / "gspo" / "a5_demo_results.json").read_text())
    children = run_results(root, 0, "gspo")
    for key in ("heldout", "budget", "curves"):
        assert strip_speeds(inline[key]) == strip_speeds(children[key])
    assert json.loads((tmp_path / "a5_methods.json").read_text())["methods"] == ["gspo"]


def strip_speeds(value):
    if isinstance(value, dict):
        return {k: strip_speeds(v) for k, v in value.items() if "second" not in k and "per_s" not in k}
    return [strip_speeds(v) for v in value] if isinstance(value, list) else value


def test_card_names_and_bad_methods():
    assert compare.card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert compare.card_slug("NVIDIA H200") == "h200" and compare.card_slug("cpu") == "cpu"
    with pytest.raises(UserError, match="unknown method"):
        preset("tiny", ["method=dpo"])
    assert main(["methods", "--tiny", "--methods", "grpo", "grpo", "--out-dir", "/nonexistent/x"]) == 2


def test_run_children_keeps_at_most_max_parallel_running(tmp_path):
    """Real child processes: each appends its start and end time; no instant may have more than two running."""
    script = ("import sys, time; f = open(sys.argv[1], 'a'); f.write(f'{time.time()} 1\\n'); f.flush(); "
              "time.sleep(0.6); f.write(f'{time.time()} -1\\n'); sys.exit(int(sys.argv[2]))")
    jobs = {f"job{i}": [sys.executable, "-c", script, str(tmp_path / f"events{i}"), str(int(i == 3))]
            for i in range(5)}
    codes = multi.run_children(jobs, str(tmp_path), max_parallel=2)
    assert codes == {f"job{i}": int(i == 3) for i in range(5)}
    events = sorted((float(t), int(d)) for i in range(5)
                    for t, d in (line.split() for line in (tmp_path / f"events{i}").read_text().splitlines()))
    running = [sum(d for _, d in events[: k + 1]) for k in range(len(events))]
    assert max(running) == 2 and running[-1] == 0


def test_resume_runs_only_what_did_not_finish(head_to_head, tmp_path):
    """After the head-to-head, `--resume` keeps every start and run; with one run's results removed it runs
    that one alone, from its seed's kept start, and the comparison is complete again."""
    _, root = head_to_head
    runs = tmp_path / "runs"
    import shutil

    shutil.copytree(root / "runs", runs)
    (runs / "seed1" / "gspo" / "a5_demo_results.json").unlink()
    ran: list[str] = []

    def recording(jobs, where, max_parallel=0):
        ran.extend(jobs)
        return commands_in_this_process(jobs, where, max_parallel)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(multi, "run_children", recording)
        code = main(["methods", "--preset", "tiny", "--seeds", *map(str, SEEDS), "--out-dir", str(runs), "--resume"])
    assert code == 0 and ran == ["seed1/gspo"]
    again, before = run_results(tmp_path, 1, "gspo"), run_results(root, 1, "gspo")
    rewards = lambda r: {(stage, mode): r["heldout"][stage][mode]["reward"] for stage in ("sft", "grpo")
                         for mode in ("sampled", "greedy")}
    assert rewards(again) == rewards(before) and again["budget"] == before["budget"]  # same start, same run
    assert [e["reward"] for e in again["curves"]["grpo_eval"]] == [e["reward"] for e in before["curves"]["grpo_eval"]]
    assert not json.loads((runs / "a5_methods.json").read_text())["missing"]


def test_max_parallel_must_not_be_negative(tmp_path, capsys):
    assert main(["methods", "--preset", "tiny", "--out-dir", str(tmp_path), "--max-parallel", "-1"]) == 2
    assert "--max-parallel" in capsys.readouterr().err
