"""NL-RX-SYNTH task: loader, prompt, and the DFA-equivalence metric, on the real data in ../shared/data."""
import random
import re
from pathlib import Path

import pytest

from raydllm.data.tasks import nlrx, regex_dfa
from raydllm.data.tasks.base import DataError, Example
from raydllm.data.tasks.nlrx import NlRxTask

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nl-rx-synth"


@pytest.fixture(scope="module")
def data() -> Path:
    if not (DATA / "targ-test.txt").is_file():
        pytest.skip(f"NL-RX-SYNTH not found at {DATA}")
    return DATA


@pytest.fixture(scope="module")
def test_gold(data) -> list[str]:
    return [e.answer for e in NlRxTask().load("test", str(data))]


def python_regex(regex: str) -> re.Pattern:
    """The same language through Python's re, for regexes without ~ and & (which re lacks); `\\b` is a
    literal b, as in the reference evaluator."""
    return re.compile(regex_dfa.unprocess(regex).replace("\\b", "b"))


def top_level_split(regex: str, op: str) -> list[str]:
    parts, depth, current = [], 0, []
    for token in regex.split():
        depth += token.count("(") - token.count(")")
        if token == op and depth == 0:
            parts.append(" ".join(current))
            current = []
        else:
            current.append(token)
    return parts + [" ".join(current)]


def test_loader_splits_and_errors(data, tmp_path):
    task = NlRxTask()
    sizes = {split: len(task.load(split, str(data))) for split in ("train", "validation", "test")}
    assert sizes == {"train": 6500, "validation": 1000, "test": 2500}
    first = task.load("test", str(data), limit=3)
    assert len(first) == 3 and all(e.prompt and e.answer for e in first)
    with pytest.raises(DataError, match="path"):
        task.load("train")
    with pytest.raises(DataError, match="src-val.txt"):
        task.load("validation", str(tmp_path))
    with pytest.raises(DataError):
        task.load("dev", str(data))


def test_every_test_gold_regex_parses(test_gold):
    for regex in test_gold:
        regex_dfa.parse(regex)  # raises RegexSyntaxError on failure


def test_gold_equals_rewritten_forms(test_gold):
    for gold in random.Random(0).sample(test_gold, 120):
        rewrites = [f"( {gold} ) | ( {gold} )", f"~ ( ~ ( {gold} ) )", f"( {gold} ) & ( . * )",
                    f"( {gold} ) | ( ( {gold} ) & ( <M1> ) )"]
        for op in ("|", "&"):  # reorder the operands of the loosest top-level operator
            parts = top_level_split(gold, op)
            if len(parts) > 1:
                rewrites.append(f" {op} ".join(reversed(parts)))
                break
        for rewrite in rewrites:
            verdict = regex_dfa.compare(gold, rewrite)
            assert verdict.equal and verdict.exact, (gold, rewrite, verdict)


@pytest.mark.parametrize("a, b", [
    ("[ <CAP> ] | [ <LOW> ]", "[ <LET> ]"),
    ("( [ <LET> ] | <M0> ) { 6 , }", "( [ <LET> ] ) { 6 , }"),  # "dog" is three letters
    ("( . ) & ( <M0> )", "~ ( . * )"),  # one character is never "dog": the empty language
    ("( [ <VOW> ] ) & ( [ <NUM> ] )", "( [ <CAP> ] ) & ( [ <LOW> ] )"),
    ("( <M0> ) { 2 , }", "<M0> <M0> ( <M0> ) *"),
    ("( <M1> ) +", "<M1> ( <M1> ) *"),
    ("~ ( <M0> ) *", "( ~ ( <M0> ) ) *"),  # ~ binds tighter than *
    ("\\ b ( [ <NUM> ] ) \\ b", "b [ <NUM> ] b"),  # the reference evaluator reads \b as the letter b
    ("( . * <M0> . * ) & ( . * <M1> . * )", "( . * <M0> . * <M1> . * ) | ( . * <M1> . * <M0> . * )"),
])
def test_equivalent_pairs(a, b):
    assert regex_dfa.compare(a, b).equal
    assert NlRxTask().score(a, Example("", b))["functional_equivalence"] == 1.0


@pytest.mark.parametrize("a, b", [
    ("<M0>", "<M1>"),
    ("[ <VOW> ] . *", "[ <LOW> ] . *"),
    ("( <M0> ) { 3 , }", "( <M0> ) { 2 , }"),
    ("~ ( <M0> ) *", "~ ( ( <M0> ) * )"),
    ("\\ b [ <NUM> ] \\ b", "[ <NUM> ]"),
    ("( . * <M0> . * ) & ( . * <M1> . * )", ". * <M0> . * <M1> . *"),  # order of the two words
])
def test_inequivalent_pairs(a, b):
    verdict = regex_dfa.compare(a, b)
    assert not verdict.equal and verdict.exact
    # the witness is a string exactly one side matches (checked through Python's re where it applies)
    if "~" not in a + b and "&" not in a + b:
        assert bool(python_regex(a).fullmatch(verdict.witness)) != bool(python_regex(b).fullmatch(verdict.witness))
    assert NlRxTask().score(a, Example("", b))["functional_equivalence"] == 0.0


def test_neighbouring_gold_rows_checked_against_python_re(test_gold):
    """Consecutive test rows mostly differ in meaning; every verdict is checked independently with re."""
    rng, checked, unequal = random.Random(1), 0, 0
    for a, b in zip(test_gold, test_gold[1:]):
        if a == b or "~" in a + b or "&" in a + b:
            continue
        verdict, ra, rb = regex_dfa.compare(a, b), python_regex(a), python_regex(b)
        if verdict.equal:  # then no string may tell them apart
            for _ in range(50):
                s = "".join(rng.choice(["dog", "truck", "ring", "lake", "b", "x", "A", "E", "Z", "7", " "])
                            for _ in range(rng.randint(0, 6)))
                assert bool(ra.fullmatch(s)) == bool(rb.fullmatch(s)), (a, b, s)
        else:
            assert bool(ra.fullmatch(verdict.witness)) != bool(rb.fullmatch(verdict.witness)), (a, b, verdict)
            unequal += 1
        checked += 1
        if checked == 150:
            break
    assert checked == 150 and unequal > 120


@pytest.mark.parametrize("bad", ["( <M0>", "[ <LET>", "<M7> . *", "( . ) { , }", "[ z - a ]", "( . ) { 9 9 9 9 }",
                                 "((((", ""])
def test_invalid_prediction_scores_zero(bad, test_gold):
    example = Example("lines with a vowel", test_gold[0])
    assert NlRxTask().score(bad, example) == {"exact_match": 0.0, "functional_equivalence": 0.0, "string_match": 0.0,
                                              "string_agreement": 0.0}
    assert regex_dfa.equivalent(bad, test_gold[0]) is False


def test_state_cap_falls_back_to_sampling():
    equal = regex_dfa.compare("( . * <M0> . * ) { 3 , }", "( . * <M0> . * ) ( . * <M0> . * ) { 2 , }", max_states=3)
    assert equal.equal and not equal.exact
    unequal = regex_dfa.compare("( . * <M0> . * ) { 3 , }", "( . * <M0> . * ) { 2 , }", max_states=3)
    assert not unequal.equal and not unequal.exact and unequal.witness.count("dog") == 2
    # an automaton that truly blows up (the 12th symbol from the end is a digit) takes the same route
    wide = ". * [ <NUM> ] " + ". " * 12
    assert regex_dfa.compare(wide, wide + "| <M0>").equal is False


def test_exact_match_prompt_and_extract(data):
    task = NlRxTask()
    train = task.load("train", str(data), limit=50)
    example = task.load("test", str(data), limit=1)[0]
    prompt = task.format_prompt(example, train[:2])
    assert prompt.startswith(f"Write a regular expression for: {train[0].prompt}\nRegex: {train[0].answer}\n\n")
    assert prompt.endswith(f"Write a regular expression for: {example.prompt}\nRegex:")
    assert task.extract(f" {example.answer}\nWrite a regular expression for: x") == example.answer
    assert task.extract("\nRegex:  ( <M0> )  +  ") == "( <M0> ) +"
    spaced = "  ".join(example.answer.split())
    assert task.score(spaced, example) == {"exact_match": 1.0, "functional_equivalence": 1.0, "string_match": 1.0,
                                           "string_agreement": 1.0}
    loosely = f"( {example.answer} ) | ( {example.answer} )"
    assert task.score(loosely, example) == {"exact_match": 0.0, "functional_equivalence": 1.0, "string_match": 1.0,
                                            "string_agreement": 1.0}


def test_200_test_strings_are_seeded_and_hold_members_and_non_members(test_gold):
    gold = "( [ <VOW> ] ) . * ( <M0> ) . *"
    strings = nlrx.test_strings(gold)
    assert len(strings) == 200 and strings == nlrx.test_strings(gold) != nlrx.test_strings(gold, seed=1)
    inside = nlrx.accepts(gold, strings)
    assert 40 < sum(inside) < 160  # both sides of the language
    # the matcher agrees with Python's re on the strings of real gold regexes (where re applies)
    both_sides = 0
    for regex in test_gold[:60]:
        strings = nlrx.test_strings(regex)
        inside = nlrx.accepts(regex, strings)
        both_sides += 0 < sum(inside) < len(strings)
        if "~" not in regex and "&" not in regex:
            assert inside == [bool(python_regex(regex).fullmatch(t)) for t in strings], regex
    assert both_sides > 40  # the rest denote the empty language or every string (e.g. `<M0> & [ <LOW> ]`)


def test_string_agreement_is_the_share_of_the_200_strings():
    task, gold = NlRxTask(), "( [ <VOW> ] ) . * ( <M0> ) . *"
    strings = nlrx.test_strings(gold)
    wrong = "( [ <LOW> ] ) . * ( <M0> ) . *"  # lower-case vowels only, and any lower-case letter
    expected = sum(a == b for a, b in zip(nlrx.accepts(wrong, strings), nlrx.accepts(gold, strings))) / 200
    scores = task.score(wrong, Example("", gold))
    assert 0 < expected < 1 and scores["string_agreement"] == expected and scores["string_match"] == 0.0
    # not the same as DFA equality: a difference that no drawn string reaches still matches on strings
    far = f"{gold} | ( <M3> ) {{ 9 }}"
    scores = task.score(far, Example("", gold))
    assert scores["functional_equivalence"] == 0.0 and scores["string_match"] == 1.0
