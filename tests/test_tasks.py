"""Tasks: safe expression evaluation, Countdown validity, generated splits, file-backed loading, templates."""

import json
from fractions import Fraction

import pytest
from test_chat import CHATML, make_tokenizer

from nanoseek.errors import BadInputError, NotFoundError
from nanoseek.tasks import TASKS, Template, get_task
from nanoseek.tasks.base import Problem
from nanoseek.tasks.expr import ExprError, evaluate
from nanoseek.tasks.prompts import FORMAT_INSTRUCTION

# --- expressions --------------------------------------------------------------------------------------------


def test_evaluate_exact():
    assert evaluate("2 + 3 * 4").value == 14
    assert evaluate("(2 + 3) * 4").value == 20
    assert evaluate("1 / 3 * 3").value == 1                  # exact, not 0.999...
    assert evaluate("0.1 + 0.2").value == Fraction(3, 10)
    assert evaluate("-(4 - 10)").value == 6
    assert evaluate("(25 - 5) * 3 / 4").numbers == (25, 5, 3, 4)


@pytest.mark.parametrize("text", ["2 ** 3", "7 // 2", "7 % 2", "__import__('os')", "abs(-1)", "1 +", "()",
                                  "x + 1", "1 / 0", "4 / (2 - 2)", "1" * 300, "(" * 200 + "1" + ")" * 200,
                                  "1 if 1 else 2", "[1]", "1; 2", "1e5"])
def test_evaluate_rejects(text):
    with pytest.raises(ExprError):
        evaluate(text)


def test_evaluate_options():
    with pytest.raises(ExprError, match="integer"):
        evaluate("2.5 * 2", integers_only=True)
    with pytest.raises(ExprError):
        evaluate("-3 + 5", allow_unary=False)


# --- countdown ----------------------------------------------------------------------------------------------

COUNT = Problem("c", "...", "(6 - 2) * 25", {"numbers": [25, 6, 2], "target": 100})


@pytest.mark.parametrize("answer", ["(6 - 2) * 25", "25 * (6 - 2)", "25*(6-2)", "(6 - 2) * 25 = 100",
                                    "$25 * (6 - 2)$", "\\boxed{25 * (6 - 2)}"])
def test_countdown_right(answer):
    assert get_task("countdown").why_wrong(answer, COUNT) is None


@pytest.mark.parametrize("answer, why", [
    ("25 * 4", "uses"),                      # 4 is not a given number
    ("(6 - 2) * 25 * 2", "uses"),            # 2 reused
    ("(6 - 2) * 25 + 0", "uses"),            # an extra number
    ("25 * 6 - 2 * 25", "uses"),             # 25 reused
    ("25 * 6", "uses"),                      # a number left out
    ("25 / (2 - 2) * 6", "division by zero"),
    ("(6 - 2.0) * 25", "integer"),           # a decimal is not one of the numbers
    ("25 * 6 / 2", "equals"),                # valid numbers, wrong value (75)
    ("25 / 6 * 2", "equals"),                # non-integer result
    ("-(2 - 6) * 25", "not allowed"),        # a sign is an operation on no number
    ("(6 - 2) ** 25", "allowed"),
    ("", "allowed"),
])
def test_countdown_wrong(answer, why):
    reason = get_task("countdown").why_wrong(answer, COUNT)
    assert reason is not None and why in reason, reason


def test_countdown_rewards_like_tinyzero():
    task = get_task("countdown")
    assert task.reward("<think>try 6-2=4</think><answer>(6 - 2) * 25</answer>", COUNT).total == 1.0
    assert task.reward("<think>try</think><answer>25 * 4</answer>", COUNT).total == pytest.approx(0.1)
    assert task.reward("(6 - 2) * 25", COUNT).total == 0.0


def test_countdown_generated_problems_are_solvable():
    task = get_task("countdown", test_size=40, min_numbers=3, max_numbers=4, max_target=50)
    probs = task.problems("test")
    assert len(probs) == 40 and len({(tuple(sorted(p.meta["numbers"])), p.meta["target"]) for p in probs}) == 40
    for p in probs:
        assert 3 <= len(p.meta["numbers"]) <= 4 and 1 <= p.meta["target"] <= 50
        assert all(1 <= n <= 99 for n in p.meta["numbers"])
        assert task.check(p.answer, p), p
        assert str(p.meta["numbers"]) in p.prompt and str(p.meta["target"]) in p.prompt


# --- arithmetic ---------------------------------------------------------------------------------------------


def test_arithmetic_answers_and_knobs():
    task = get_task("arithmetic", digits=3, operands=3, ops="*/+", test_size=60)
    probs = task.problems("test")
    assert len({p.meta["expression"] for p in probs}) == 60
    for p in probs:
        expr = p.meta["expression"]
        parts = expr.split()
        nums, ops = parts[0::2], parts[1::2]
        assert len(nums) == 3 and all(len(n) == 3 for n in nums) and set(ops) <= set("*/+")
        assert Fraction(p.answer) == evaluate(expr).value and "/" not in p.answer   # whole numbers
        assert expr in p.prompt and task.check(p.answer, p) and not task.check(str(int(p.answer) + 1), p)
    assert any("/" in p.meta["expression"] for p in probs)


def test_arithmetic_seeded_and_disjoint():
    a = get_task("arithmetic", seed=1, test_size=50)
    assert a.problems("test") == get_task("arithmetic", seed=1, test_size=50).problems("test")
    assert a.problems("test") != get_task("arithmetic", seed=2, test_size=50).problems("test")
    test = {p.meta["expression"] for p in a.problems("test")}
    for seed in (1, 2, 3):   # no seed leaks a test problem into training: the split is by hash of the problem
        train = {p.meta["expression"] for p in get_task("arithmetic", seed=seed).problems("train", 2000)}
        assert len(train) > 1000 and not train & test
    assert a.problems("test", limit=5) == a.problems("test")[:5]


def test_generated_task_limits():
    with pytest.raises(BadInputError, match="only 7 distinct"):   # 1-digit sums: too few test problems
        get_task("arithmetic", digits=1, ops="+").problems("test")
    with pytest.raises(BadInputError, match="endless"):
        get_task("arithmetic").problems("train")
    with pytest.raises(BadInputError, match="test_size"):
        get_task("arithmetic", test_size=5).problems("test", 6)
    with pytest.raises(BadInputError, match="ops"):
        get_task("arithmetic", ops="+^")
    with pytest.raises(BadInputError, match="split"):
        get_task("arithmetic").problems("validation")


# --- file-backed tasks --------------------------------------------------------------------------------------


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_gsm8k_from_tiny_jsonl(tmp_path):
    _write(tmp_path / "test.jsonl", [{"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}, "",
                                     {"question": "Cost?", "answer": "It is 1000.\n#### 1,000"}])
    _write(tmp_path / "train.jsonl", [{"question": "Q", "answer": "#### -3"}])
    task = get_task("gsm8k", path=tmp_path)
    probs = task.problems("test")
    assert [(p.id, p.prompt, p.answer) for p in probs] == [("test/1", "How many?", "4"), ("test/3", "Cost?", "1000")]
    assert [p.answer for p in task.problems("train")] == ["-3"]
    assert get_task("gsm8k", path=tmp_path / "test.jsonl").problems("train") == probs   # a file: split ignored
    assert task.check("$1,000.00", probs[1]) and task.check("1000", probs[1]) and not task.check("100", probs[1])


@pytest.mark.parametrize("line, match", [
    ('{"question": "Q", "answer": "no final number"}', "test.jsonl:1: field 'answer' must end in '#### <number>'"),
    ('{"question": "Q"}', "field 'answer'"),
    ('{"question": 3, "answer": "#### 3"}', "field 'question'"),
    ('not json', "test.jsonl:1: not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_gsm8k_bad_lines(tmp_path, line, match):
    (tmp_path / "test.jsonl").write_text(line + "\n")
    with pytest.raises(BadInputError, match=match.replace("(", r"\(").replace(")", r"\)")):
        get_task("gsm8k", path=tmp_path).problems()


def test_gsm8k_real_file(shared_data):
    task = get_task("gsm8k", path=shared_data / "gsm8k")
    probs = task.problems("test")
    assert len(probs) == 1319 and probs[0].answer == "18" and "Janet" in probs[0].prompt
    assert len({p.id for p in probs}) == 1319
    assert task.check("18", probs[0])


def test_jsonl_task(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [
        {"prompt": "Half of one?", "answer": "\\frac{1}{2}"},
        {"id": "root", "prompt": [{"role": "user", "content": "Root of 2?"}], "answer": "\\sqrt{2}"},
        {"prompt": "Seven?", "answer": 7},
    ])
    task = get_task("jsonl", path=path)
    a, b, c = task.problems()
    assert (a.id, b.id, c.answer) == ("mine/1", "root", "7") and b.prompt[0]["content"] == "Root of 2?"
    assert task.check("0.5", a) and task.check("\\sqrt 2", b) and not task.check("2", b) and task.check("7.0", c)
    _write(path, [{"prompt": "x", "answer": None}])
    with pytest.raises(BadInputError, match="mine.jsonl:1: field 'answer'"):
        task.problems()
    with pytest.raises(NotFoundError):
        get_task("jsonl", path=tmp_path / "missing.jsonl").problems()


def test_registry():
    assert set(TASKS) == {"arithmetic", "countdown", "gsm8k", "jsonl"}
    with pytest.raises(NotFoundError, match="unknown task"):
        get_task("mmlu")
    with pytest.raises(BadInputError, match="needs path"):
        get_task("gsm8k")
    with pytest.raises(BadInputError, match="no argument 'digit'"):
        get_task("arithmetic", digit=3)


def test_votes_group_equal_numbers():
    task = get_task("arithmetic")
    assert task.answer_key("1,234") == task.answer_key("1234.0") == task.answer_key("$1234") == "1234"
    assert get_task("countdown").answer_key("(1 + 2) * 3") == "(1+2)*3"


# --- templates ----------------------------------------------------------------------------------------------


def test_templates():
    tok = make_tokenizer(CHATML)
    prob = Problem("p", "What is 2 + 2?", "4")
    chat = Template("chat").render(tok, prob)
    assert chat.text == (f"<|im_start|>system\n{FORMAT_INSTRUCTION}<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?"
                         "<|im_end|>\n<|im_start|>assistant\n<think>\n") and chat.starts_in_reasoning
    assert tok.decode(chat.ids) == chat.text
    closed = Template("chat", open_think=False).render(tok, prob)
    assert closed.text.endswith("assistant\n") and not closed.starts_in_reasoning
    own = Problem("q", [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}], "x")
    assert Template("chat").messages(own)[0]["content"] == "Be terse."
    zero = Template("r1-zero").render(tok, prob)
    assert zero.text.startswith("A conversation between User and Assistant.")
    assert zero.text.endswith("</answer>.\nUser: What is 2 + 2?\nAssistant: <think>") and zero.starts_in_reasoning
    assert Template("r1-zero", open_think=False).text(own).endswith("User: Hi\nAssistant:")
    with pytest.raises(BadInputError, match="unknown template"):
        Template("alpaca")
