"""Tasks and verifiers: hand-written reward cases, held-out eval sets, determinism, schedules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hotlora.agents import corpus
from hotlora.agents.tasks import (
    EVAL_SIZE,
    TASKS,
    ContinualSchedule,
    Problem,
    clean_completion,
    get_task,
    is_held_out,
    render_prompt,
)

SEEDS = (0, 1, 2, 7, 12345)


def _arithmetic(prompt: str) -> str:
    expr = prompt.removesuffix("=")
    if "+" in expr:
        a, b = expr.split("+")
        return str(int(a) + int(b))
    a, b = expr.split("-")
    return str(int(a) - int(b))


def _count(prompt: str) -> str:
    _, letter, _, word = prompt.removesuffix(":").split(" ")
    return str(word.count(letter))


def _format(prompt: str) -> str:
    _, key, value = prompt.removesuffix(":").split(" ")
    return json.dumps({key: int(value)})


# Independent reference solvers parsed from the prompt text, to check the answers the tasks carry.
ORACLES = {
    "arithmetic": _arithmetic,
    "reverse": lambda prompt: prompt.removeprefix("reverse ").removesuffix(":")[::-1],
    "sort": lambda prompt: "".join(sorted(prompt.removeprefix("sort ").removesuffix(":"))),
    "count": _count,
    "format": _format,
    "digits": _arithmetic,
}
# Tasks that reuse another task's generator with a different verifier.
GENERATOR_OF = {"digits": "arithmetic"}


def test_all_required_tasks_exist_and_reuse_corpus_generators():
    assert set(TASKS) == {"arithmetic", "reverse", "sort", "count", "format", "digits"}
    for name, task in TASKS.items():
        assert task.name == name
        assert task.generate is corpus.GENERATORS[GENERATOR_OF.get(name, name)]


@pytest.mark.parametrize(
    ("completion", "reward"),
    [(" 19</s>", 1.0), (" 1a", 0.5), ("<123><7>", 4 / 8), (" abc", 0.0), ("", 0.0), (" </s>", 0.0)],
)
def test_digit_share_is_dense(completion: str, reward: float) -> None:
    assert get_task("digits").reward(Problem("12+7=", "19"), completion) == pytest.approx(reward)


@pytest.mark.parametrize(
    ("task", "prompt", "answer", "completion", "reward"),
    [
        # correct, with and without the model's separator space and trailing EOS/whitespace
        ("arithmetic", "12+7=", "19", " 19", 1.0),
        ("arithmetic", "12+7=", "19", "19", 1.0),
        ("arithmetic", "12+7=", "19", " 19</s>", 1.0),
        ("arithmetic", "12+7=", "19", " 19 \n</s></s>", 1.0),
        ("arithmetic", "50-8=", "42", " 42\n", 1.0),
        # wrong, extra text, padding the verifier must not forgive
        ("arithmetic", "12+7=", "19", " 18", 0.0),
        ("arithmetic", "12+7=", "19", " 19 20", 0.0),
        ("arithmetic", "12+7=", "19", " 019", 0.0),
        ("arithmetic", "12+7=", "19", "  19", 0.0),
        ("arithmetic", "12+7=", "19", " 19.0", 0.0),
        ("arithmetic", "12+7=", "19", "", 0.0),
        ("arithmetic", "12+7=", "19", " ", 0.0),
        ("arithmetic", "12+7=", "19", "</s>", 0.0),
        ("arithmetic", "12+7=", "19", " １９", 0.0),
        ("arithmetic", "12+7=", "19", " 19\u200b", 0.0),
        ("reverse", "reverse abc:", "cba", " cba", 1.0),
        ("reverse", "reverse abc:", "cba", " abc", 0.0),
        ("reverse", "reverse abc:", "cba", " cba abc", 0.0),
        ("reverse", "reverse abc:", "cba", " CBA", 0.0),
        ("reverse", "reverse abc:", "cba", " cbá", 0.0),
        ("sort", "sort dbca:", "abcd", " abcd</s>", 1.0),
        ("sort", "sort dbca:", "abcd", " abdc", 0.0),
        ("sort", "sort dbca:", "abcd", " a b c d", 0.0),
        ("sort", "sort dbca:", "abcd", " abcd.", 0.0),
        ("count", "count a in banana:", "3", " 3", 1.0),
        ("count", "count a in banana:", "3", " 3 ", 1.0),
        ("count", "count a in banana:", "3", " 2", 0.0),
        ("count", "count a in banana:", "3", " three", 0.0),
        ("count", "count a in banana:", "3", " 3 times", 0.0),
        ("count", "count a in banana:", "3", " ٣", 0.0),
        # format: exact text 1.0; any other valid JSON object 0.5 (documented partial credit)
        ("format", "format x 5:", '{"x": 5}', ' {"x": 5}', 1.0),
        ("format", "format x 5:", '{"x": 5}', ' {"x": 5}</s>', 1.0),
        ("format", "format x 5:", '{"x": 5}', ' {"x": 6}', 0.5),
        ("format", "format x 5:", '{"x": 5}', ' {"x":5}', 0.5),
        ("format", "format x 5:", '{"x": 5}', ' {"y": 5}', 0.5),
        ("format", "format x 5:", '{"x": 5}', " [5]", 0.0),
        ("format", "format x 5:", '{"x": 5}', " 5", 0.0),
        ("format", "format x 5:", '{"x": 5}', ' {"x": 5', 0.0),
        ("format", "format x 5:", '{"x": 5}', ' {"x": 5} ok', 0.0),
        ("format", "format x 5:", '{"x": 5}', " {'x': 5}", 0.0),
        ("format", "format x 5:", '{"x": 5}', "", 0.0),
        ("format", "format x 5:", '{"x": 5}', " \ufffd\x00", 0.0),
    ],
)
def test_verifier_hand_written_cases(task, prompt, answer, completion, reward):
    assert get_task(task).reward(Problem(prompt, answer), completion) == reward


def test_clean_completion_strips_exactly_one_leading_space():
    assert clean_completion(" abc") == "abc"
    assert clean_completion("  abc") == " abc"
    assert clean_completion(" abc \t</s> </s>\n") == "abc"
    assert clean_completion("") == ""


@pytest.mark.parametrize("name", sorted(TASKS))
def test_reference_answers_score_full_reward(name):
    task = get_task(name)
    for problem in task.problems(seed=3, n=50) + task.eval_set()[:20]:
        assert task.reward(problem, f" {problem.answer}</s>") == 1.0


@pytest.mark.parametrize("name", sorted(TASKS))
def test_eval_set_fixed_right_size_and_held_out(name):
    task = get_task(name)
    evals = task.eval_set()
    assert len(evals) == EVAL_SIZE
    assert len({p.prompt for p in evals}) == EVAL_SIZE
    assert evals == task.eval_set()
    assert all(is_held_out(p.prompt) for p in evals)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_training_problems_disjoint_from_eval_set(name):
    task = get_task(name)
    eval_prompts = {p.prompt for p in task.eval_set()}
    for seed in SEEDS:
        train = task.problems(seed, 200)
        assert len(train) == 200
        assert not eval_prompts & {p.prompt for p in train}
        assert not any(is_held_out(p.prompt) for p in train)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_problems_deterministic_by_seed_and_match_corpus_format(name):
    task = get_task(name)
    assert task.problems(5, 30) == task.problems(5, 30)
    assert task.problems(5, 30) != task.problems(6, 30)
    # a longer draw extends a shorter one, so n does not reshuffle a seed's problems
    assert task.problems(5, 40)[:30] == task.problems(5, 30)
    problems = task.problems(5, 30) + task.eval_set()
    for p in problems:
        assert ORACLES[name](p.prompt) == p.answer
        assert render_prompt(p) == p.prompt
        assert not render_prompt(p).endswith(" ")
        assert corpus.render((p.prompt, p.answer)) == f"{render_prompt(p)} {p.answer}"


def test_problems_seed_does_not_collide_across_tasks():
    assert [p.prompt for p in get_task("reverse").problems(0, 10)] != [
        p.prompt.replace("sort", "reverse") for p in get_task("sort").problems(0, 10)
    ]


def test_get_task_error_lists_available_names():
    with pytest.raises(KeyError) as info:
        get_task("chess")
    message = str(info.value)
    assert "chess" in message
    for name in TASKS:
        assert name in message


def test_schedule_boundaries():
    schedule = ContinualSchedule((("arithmetic", 20), ("reverse", 10), ("count", 5)))
    assert schedule.total_steps == 35
    assert schedule.task_at(0) == "arithmetic"
    assert schedule.task_at(19) == "arithmetic"
    assert schedule.task_at(20) == "reverse"
    assert schedule.task_at(29) == "reverse"
    assert schedule.task_at(30) == "count"
    assert schedule.task_at(34) == "count"
    assert schedule.seen_before(0) == []
    assert schedule.seen_before(19) == []
    assert schedule.seen_before(20) == ["arithmetic"]
    assert schedule.seen_before(34) == ["arithmetic", "reverse"]
    for step in (-1, 35):
        with pytest.raises(ValueError):
            schedule.task_at(step)


def test_schedule_revisited_task_is_current_not_forgotten():
    schedule = ContinualSchedule((("arithmetic", 2), ("reverse", 2), ("arithmetic", 2), ("reverse", 2)))
    assert schedule.seen_before(4) == ["reverse"]
    assert schedule.seen_before(6) == ["arithmetic"]


def test_schedule_validation_and_parse():
    assert ContinualSchedule.parse("arithmetic:20, reverse:20,count:20") == ContinualSchedule(
        (("arithmetic", 20), ("reverse", 20), ("count", 20))
    )
    with pytest.raises(ValueError):
        ContinualSchedule(())
    with pytest.raises(ValueError):
        ContinualSchedule((("arithmetic", 0),))
    with pytest.raises(KeyError):
        ContinualSchedule((("chess", 5),))
    for bad in ("arithmetic", "arithmetic:x", "arithmetic:-3", ""):
        with pytest.raises(ValueError):
            ContinualSchedule.parse(bad)


def test_phase_ends_mark_the_last_step_of_each_phase() -> None:
    schedule = ContinualSchedule((("sort", 2), ("format", 1), ("reverse", 3)))
    assert [s for s in range(schedule.total_steps) if schedule.phase_ends_at(s)] == [1, 2, 5]


def test_the_agents_tokenizer_gives_autotokenizers_ids(tiny_model_path: Path, tmp_path: Path) -> None:
    """``agents.tokenizer`` reads tokenizer.json without transformers; ids and texts must be AutoTokenizer's."""
    from transformers import AutoTokenizer

    from hotlora.agents.tokenizer import TextTokenizer
    from hotlora.models.shapes import build_shape_tokenizer

    padded = tmp_path / "padded"
    build_shape_tokenizer(600).save_pretrained(padded)  # the real shapes' tokenizer, filler tokens and all
    texts = [render_prompt(p) for name in sorted(TASKS) for p in TASKS[name].problems(3, 4)]
    texts += [
        "",
        " 12+30=42, always",
        'caf\u00e9 {"k": "v"} \u00fc\u00df \u4e2d\u6587 \U0001f600',
        "<s> not special </s>",
    ]
    for model in (tiny_model_path, padded):
        reference, ours = AutoTokenizer.from_pretrained(model), TextTokenizer.from_model_dir(model)
        assert (ours.bos_token_id, ours.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
        for text in texts:
            ids = reference.encode(text, add_special_tokens=False)
            assert ours.encode(text) == ids, text
            with_specials = [reference.bos_token_id, *ids, reference.eos_token_id, reference.pad_token_id]
            assert ours.decode(with_specials) == reference.decode(with_specials, skip_special_tokens=True), text
