"""Multi-step arithmetic word problems, generated (never downloaded), with a chain of thought.

Each problem is three text segments, plain text so that an instruct model can be prompted
without a chat template::

    prompt   "Question: Tom has 12 apples. He buys 3 bags of 4 apples. He gives 5 apples to Mia.
              How many apples does Tom have now?\\nAnswer:"
    thought  " Tom has 12 apples. He buys 3 bags of 4: 3 * 4 = 12. 12 + 12 = 24.\\n"
             "He gives away 5: 24 - 5 = 19.\\n"                  (one line per step)
    answer   "The answer is 19."

Operations: add, subtract, multiply (x2, x3), divide (exact, by 2-5) and "n bags of m" (a product
then a sum). Every intermediate value stays in [1, MAX_VALUE] and every operand is small, so a
135M model learns the task in a few hundred steps.

Determinism: ``arithmetic_problems(n, seed)`` draws from ``random.Random(seed)`` only, so the same
arguments give the same problems on every machine and Python version.

Train/test separation: every possible problem belongs to exactly one ``split``, decided by a
stable hash (BLAKE2b) of its prompt text; a call keeps only problems of its split. So a test set
(``split="test"``, any seed) never shares a prompt with a train set (``split="train"``, any seed),
and no call returns the same prompt twice. Two train sets of different seeds may overlap.
"""

import hashlib
import numbers
import random
import re
from collections.abc import Collection
from dataclasses import dataclass

__all__ = ["ArithmeticProblem", "Step", "arithmetic_problems", "tokenize_problems", "parse_answer", "split_of",
           "MAX_VALUE"]

MAX_VALUE = 150
MAX_STEPS = 8
SPLITS = ("train", "test")
_TEST_SHARE = 5  # one prompt hash in five belongs to the test split

_PEOPLE = (("Tom", "He", "him"), ("Mia", "She", "her"), ("Ben", "He", "him"), ("Ava", "She", "her"),
           ("Sam", "He", "him"), ("Lily", "She", "her"), ("Omar", "He", "him"), ("Zoe", "She", "her"),
           ("Leo", "He", "him"), ("Nora", "She", "her"), ("Raj", "He", "him"), ("Ella", "She", "her"),
           ("Max", "He", "him"), ("Ivy", "She", "her"), ("Jack", "He", "him"), ("Rosa", "She", "her"))
_OBJECTS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards",
            "books", "coins", "flowers", "toy cars", "beads", "eggs", "candies", "balloons")

# (question sentence, thought line) per operation; {n} name, {p} object pronoun, {P} pronoun, {o} objects, {f} friend,
# {a} operand, {c} count of groups, {s} group size, {x} current value, {g} group total, {y} result.
_TEMPLATES = {
    "add": (("{P} buys {a} more {o}.", "{P} buys {a} more: {x} + {a} = {y}."),
            ("{P} finds {a} more {o}.", "{P} finds {a} more: {x} + {a} = {y}."),
            ("{f} gives {p} {a} {o}.", "{f} gives {a}: {x} + {a} = {y}.")),
    "sub": (("{P} gives {a} {o} to {f}.", "{P} gives away {a}: {x} - {a} = {y}."),
            ("{P} loses {a} {o}.", "{P} loses {a}: {x} - {a} = {y}."),
            ("{P} sells {a} {o}.", "{P} sells {a}: {x} - {a} = {y}.")),
    "mul": (("Then the number of {o} {n} has becomes {a} times as large.", "{a} times as many: {x} * {a} = {y}."),
            ("{f} gives {p} enough {o} to have {a} times as many.", "{a} times as many: {x} * {a} = {y}.")),
    "div": (("{P} splits the {o} equally into {a} boxes and keeps one box.",
             "One box of {a}: {x} / {a} = {y}."),
            ("{P} puts the {o} into {a} equal piles and keeps one pile.",
             "One pile of {a}: {x} / {a} = {y}.")),
    "groups": (("{P} buys {c} bags of {s} {o}.", "{P} buys {c} bags of {s}: {c} * {s} = {g}. {x} + {g} = {y}."),
               ("{f} gives {p} {c} boxes with {s} {o} each.",
                "{c} boxes of {s}: {c} * {s} = {g}. {x} + {g} = {y}.")),
}
_ANSWER = re.compile(r"the answer is\s*(-?\d+)(?!\.?\d)", re.IGNORECASE)


@dataclass(frozen=True)
class Step:
    """One operation on the running value: ``op`` in add, sub, mul, div (operand ``a``) or
    groups (adds ``count * size``; ``a`` is then 0)."""
    op: str
    a: int = 0
    count: int = 0
    size: int = 0


@dataclass(frozen=True)
class ArithmeticProblem:
    prompt: str
    thought: str
    answer: str
    value: int          # the final answer as an integer
    start: int          # the value before the first step
    steps: tuple        # the Steps, in order


def _check_positive_int(name, value):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _step_counts(steps):
    """The allowed numbers of steps per problem, from an int or a collection of ints."""
    counts = (steps,) if isinstance(steps, numbers.Integral) and not isinstance(steps, bool) else steps
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Collection) or not counts:
        raise ValueError(f"steps must be an int or a non-empty collection of ints in [1, {MAX_STEPS}], got {steps!r}")
    for count in counts:
        if not isinstance(count, numbers.Integral) or isinstance(count, bool) or not 1 <= count <= MAX_STEPS:
            raise ValueError(f"steps must hold ints in [1, {MAX_STEPS}], got {count!r} in {steps!r}")
    return tuple(sorted(set(int(c) for c in counts)))


def _possible_steps(rng, x):
    """The steps that keep the value in [1, MAX_VALUE] from ``x``, one candidate per operation."""
    candidates = [Step("add", rng.randint(1, min(20, MAX_VALUE - x)))] if x < MAX_VALUE else []
    if x > 1:
        candidates.append(Step("sub", rng.randint(1, min(20, x - 1))))
    factors = [f for f in (2, 3) if x * f <= min(MAX_VALUE, 60)]
    if factors:
        candidates.append(Step("mul", rng.choice(factors)))
    divisors = [d for d in range(2, 6) if x % d == 0]
    if divisors:
        candidates.append(Step("div", rng.choice(divisors)))
    count, size = rng.randint(2, 5), rng.randint(2, 10)
    if x + count * size <= MAX_VALUE:
        candidates.append(Step("groups", count=count, size=size))
    return candidates


def _apply_step(x, step):
    """The value after ``step`` from ``x``."""
    if step.op == "add":
        return x + step.a
    if step.op == "sub":
        return x - step.a
    if step.op == "mul":
        return x * step.a
    if step.op == "div":
        return x // step.a
    return x + step.count * step.size


def _render(rng, person, objects, friend, start, steps):
    name, pronoun, object_pronoun = person
    fields = {"n": name, "p": object_pronoun, "P": pronoun, "o": objects, "f": friend}
    sentences, lines, x = [f"{name} has {start} {objects}."], [], start
    for step in steps:
        y = _apply_step(x, step)
        question, thought = rng.choice(_TEMPLATES[step.op])
        values = dict(fields, a=step.a, c=step.count, s=step.size, g=step.count * step.size, x=x, y=y)
        sentences.append(question.format(**values))
        lines.append(thought.format(**values))
        x = y
    lines[0] = f"{name} has {start} {objects}. {lines[0]}"
    prompt = f"Question: {' '.join(sentences)} How many {objects} does {name} have now?\nAnswer:"
    thought = " " + "".join(line + "\n" for line in lines)
    return ArithmeticProblem(prompt, thought, f"The answer is {x}.", x, start, tuple(steps))


def _draw(rng, counts):
    person = rng.choice(_PEOPLE)
    friend = rng.choice([p[0] for p in _PEOPLE if p is not person])
    objects = rng.choice(_OBJECTS)
    start = rng.randint(2, 20)
    steps, x = [], start
    for _ in range(rng.choice(counts)):
        step = rng.choice(_possible_steps(rng, x))
        steps.append(step)
        x = _apply_step(x, step)
    return _render(rng, person, objects, friend, start, steps)


def split_of(prompt):
    """"train" or "test": the split a prompt belongs to, from a stable hash of its text."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "little") % _TEST_SHARE == 0 else "train"


def arithmetic_problems(n, seed, steps=(2, 3), split="train"):
    """``n`` distinct problems of ``split`` ("train" or "test"), deterministic for a given ``seed``
    (an int >= 0). ``steps``: the number of operations per problem, an int or a collection of
    ints in [1, MAX_STEPS] drawn from uniformly. See the module docstring for the format and
    the train/test guarantee."""
    _check_positive_int("n", n)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    counts = _step_counts(steps)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(seed)
    problems, seen = [], set()
    attempts = 100 * n + 10_000  # the space is large; this only stops a hopeless request
    for _ in range(attempts):
        problem = _draw(rng, counts)
        if problem.prompt not in seen and split_of(problem.prompt) == split:
            seen.add(problem.prompt)
            problems.append(problem)
            if len(problems) == n:
                return problems
    raise ValueError(f"n={n} is more distinct {split} problems than steps={steps!r} yields "
                     f"({len(problems)} found in {attempts} draws)")


def _encode(tokenizer, text):
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenize_problems(problems, tokenizer, append_eos=True):
    """Examples ``{"segments": [("prompt", ids), ("thought", ids), ("answer", ids)]}`` for the
    collators of :mod:`sparseft.data.collators`. Each segment is encoded on its own without
    special tokens (segments begin at a word or line boundary, so the ids equal those of the
    joined text for byte-level BPE tokenizers); the answer ends with ``tokenizer.eos_token_id``
    when ``append_eos``, so that generation learns to stop."""
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer must have an encode method (a Hugging Face tokenizer), "
                        f"got {type(tokenizer).__name__}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if append_eos and (not isinstance(eos, numbers.Integral) or isinstance(eos, bool) or eos < 0):
        raise ValueError(f"tokenizer has no eos_token_id (got {eos!r}); set one or pass append_eos=False")
    examples = []
    for i, problem in enumerate(problems):
        if not isinstance(problem, ArithmeticProblem):
            raise TypeError(f"problems[{i}] must be an ArithmeticProblem, got {type(problem).__name__}")
        answer = _encode(tokenizer, problem.answer) + ([int(eos)] if append_eos else [])
        examples.append({"segments": [("prompt", _encode(tokenizer, problem.prompt)),
                                      ("thought", _encode(tokenizer, problem.thought)),
                                      ("answer", answer)]})
    return examples


def parse_answer(text):
    """The integer after the first "The answer is" in ``text`` (a greedy generation), or None
    when there is none or it is not a whole number ("The answer is 2.5" gives None)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    match = _ANSWER.search(text)
    return None if match is None else int(match.group(1))
