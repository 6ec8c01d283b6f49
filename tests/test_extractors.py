"""Answer extractors and comparisons on realistic model outputs, per answer format."""
import pytest

from exgrpo.tasks import answers, get_task
from exgrpo.tasks.example import Example

NUMBER_CASES = [
    ("Natalia sold 48/2 = 24 clips in May. 48 + 24 = 72. The answer is 72.", "72"),
    ("The total is $1,234.50. The answer is $1,234.50.", "1234.5"),
    ("So she has -3 degrees. The answer is -3.", "-3"),
    ("The answer is 3/4 of the cake.", "0.75"),
    ("The answer is 1/3", "1/3"),
    ("He needs 12 cm of tape, so the answer is 12 cm.", "12"),
    ("First 5 + 7 = 12, then 12 * 2 = 24.\nThe final answer is: 24", "24"),
    ("Answer: 1,000,000", "1000000"),
    ("We get \\boxed{18} dollars.", "18"),
    ("The answer is \\frac{3}{4}", "0.75"),
    ("Total: 7 + 8 = 15 apples", "15"),                   # no answer phrase: last number
    ("The answer is 12.0.", "12"),
    ("The discount is 20%. The answer is 20%.", "20"),
    ("The answer is −4", "-4"),                           # unicode minus
    ("In 2019 she was 8; in 2023 she is 12.", "12"),
    ("The answer is 0.5 hours", "0.5"),
    ("The answer is .25", "0.25"),
]


@pytest.mark.parametrize("text,want", NUMBER_CASES)
def test_extract_number(text, want):
    assert answers.extract_number(text) == want


@pytest.mark.parametrize("text", ["I don't know.", "", "The answer is unclear."])
def test_extract_number_none(text):
    assert answers.extract_number(text) is None


@pytest.mark.parametrize("pred,gold,eq", [
    ("1234", "1,234", True), ("0.3333333", "1/3", True), ("0.75", "3/4", True), ("-5", "5", False),
    ("72", "72.0", True), ("71", "72", False), (None, "1", False), ("abc", "1", False),
])
def test_numbers_equal(pred, gold, eq):
    assert answers.numbers_equal(pred, gold) is eq


LETTER_CASES = [
    ("Let's think. Option (A) is wrong because ... The answer is (C).", "ABCDE", "C"),
    ("The answer is C", "ABCDE", "C"),
    ("Answer: b.", "ABCD", "B"),
    ("(A) seems plausible, but (D) is better.", "ABCD", "D"),
    ("The answer is (E).", "ABCD", None),                     # out of range
    ("B", "ABC", "B"),
    ("The answer is (B) bank.", "ABCDE", "B"),
    ("Among (A) through (F), the date is 05/01/2021, so the answer is (F).", "ABCDEF", "F"),
    ("I am not sure.", "ABCD", None),
    ("The answer is A: entailment.", "ABC", "A"),
]


@pytest.mark.parametrize("text,letters,want", LETTER_CASES)
def test_extract_letter(text, letters, want):
    assert answers.extract_letter(text, letters) == want


YES_NO_CASES = [
    ("Hydrogen has atomic number 1, and Spice Girls had 5 members. So the answer is no.", "no"),
    ("The answer is Yes.", "yes"),
    ("Yes. Because sharks live in the ocean.", "yes"),
    ("answer: \"no\"", "no"),
    ("The answer is true", "yes"),
    ("No, it cannot, since ... Actually yes, it can.", "yes"),
    ("I cannot tell.", None),
    ("The answer is **yes**", "yes"),
]


@pytest.mark.parametrize("text,want", YES_NO_CASES)
def test_extract_yes_no(text, want):
    assert answers.extract_yes_no(text) == want


BOXED_CASES = [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{a}{b^{2}}}", "\\frac{a}{b^{2}}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("The answer is \\boxed{10\\%}", "10"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{\\text{(C)}}", "(C)"),
    ("\\boxed{ 3\\sqrt2 }", "3\\sqrt{2}"),
    ("The answer is $\\left( 3, \\frac{\\pi}{2} \\right)$.", "(3,\\frac{\\pi}{2})"),
    ("\\boxed{90^\\circ}", "90"),
    ("unclosed \\boxed{12", None),
    ("no answer here", None),
]


@pytest.mark.parametrize("text,want", BOXED_CASES)
def test_extract_boxed(text, want):
    assert answers.extract_boxed(text) == want


def test_last_boxed_nested_braces():
    assert answers.last_boxed("a \\boxed{\\frac{\\sqrt{3}}{2}} b") == "\\frac{\\sqrt{3}}{2}"
    assert answers.last_boxed("\\fbox{7}") == "7"
    assert answers.last_boxed("\\boxed 5.") == "5"
    assert answers.last_boxed("\\boxed 5. Then the set {1, 2} ...") == "5"      # not the next brace


@pytest.mark.parametrize("pred,gold,eq", [
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True), ("0.5", "\\frac12", True), ("3\\sqrt{2}", "3\\sqrt2", True),
    ("\\frac{1}{3}", "\\frac{1}{2}", False), ("10", "10^\\circ", True), (None, "1", False),
])
def test_math_equal(pred, gold, eq):
    assert answers.math_equal(pred, gold) is eq


@pytest.mark.parametrize("pred,gold,eq", [
    ("subtract", "subtract", True), ("Subtract.", "subtract", True), ("6 apples", "6", True),
    ("yes, it is", "yes", True), ("no", "yes", False), ("the Blue whale", "blue whale", True),
    ("-2", "2", False), (None, "x", False),
])
def test_short_equal(pred, gold, eq):
    assert answers.short_equal(pred, gold) is eq


@pytest.mark.parametrize("text,want", [
    ("Because giving away removes them. The answer is subtract.", "subtract"),
    ("The answer is (blue whale).", "blue whale"),
    ("Reasoning...\nFinal line", "Final line"),
    ("", None),
])
def test_extract_short(text, want):
    assert answers.extract_short(text) == want


def test_task_extract_and_compare_end_to_end():
    ex = Example("1", "arc_challenge", "Q?", "B", ("a", "b", "c"))
    arc = get_task("arc_challenge")
    assert arc.is_correct(arc.extract("... The answer is (B).", ex), ex.answer)
    # A 3-option question: (D) is not a valid option even though ARC has up to 4.
    assert arc.extract("The answer is (D).", ex) is None
    gsm = get_task("gsm8k")
    assert gsm.is_correct(gsm.extract("so 1,200 in total. The answer is 1,200."), "1200")
    assert not gsm.is_correct(gsm.extract("The answer is 1,201."), "1200")
    sqa = get_task("StrategyQA")
    assert sqa.is_correct(sqa.extract("So the answer is No."), "no")
    tab = get_task("tabmwp")
    assert tab.is_correct(tab.extract("The answer is 3/4."), "0.75")
    assert tab.is_correct(tab.extract("The answer is Ruby."), "ruby")
    m = get_task("math")
    assert m.is_correct(m.extract("Thus \\boxed{\\dfrac{3}{4}}."), "\\frac{3}{4}")
    assert "The answer is (X)" in arc.instruction and arc.prompt(ex).startswith("Q?\n")


# ---------------------------------------------------------------- the phrasings models use, and what is refused

LETTER_PHRASINGS = [
    ("So the best option is A: bank.", "A"),
    ("the correct option is (B)", "B"),
    ("The correct choice: C, since ...", "C"),
    ("**B**", "B"),
    ("After all that, **(D)**.", "D"),
    ("The answer is **B**.", "B"),
    ("answer: B", "B"),
    ("Answer: (B) bank", "B"),
    ("Looking at each one...\nB) library", "B"),
    ("(C)", "C"),
    ("The answer is (A). Wait, re-reading the question, the answer is (C).", "C"),   # the last statement wins
    ("Answer: (b)", "B"),
    ("The answer is (B)", "B"),
    ("The answer is B.", "B"),
    ("**Answer**: B", "B"),                                  # markdown bold around the phrase
    ("**Answer:** (B) bank", "B"),
    ("The answer is option B.", "B"),
    ("The answer is choice (B).", "B"),
    ("Therefore, B is the correct answer.", "B"),            # the letter first
    ("(B) is correct, but (A) is not.", "B"),
    ("So the answer is (A). Hmm, no: D is the best choice.", "D"),   # a later statement of another kind wins
    ("\\boxed{B}", "B"),                                     # a boxed letter, as R1-style models write it
    ("The answer is $\\boxed{\\text{(B)}}$.", "B"),
    ("\\boxed{B: bank}", "B"),
    ("B", "B"),
    ("(B)", "B"),
]
LETTER_REFUSED = [
    "Because the door revolves, it keeps people out.",     # B inside a word
    "A good answer would need more context.",              # A as an English word
    "The answer is a bit unclear to me.",                  # a lower-case word, not a letter
    "The best option is F: none of them.",                 # F is not an option of a 5-option question
    "I think it depends.",
    "The answer is \\boxed{F}.",                             # boxed, but not an option
    "A is a good guess, but I am unsure.",                   # "A is", not "A is the correct"
    "Because of that, (F) and **F** are both out.",          # F in every form, none an option
]


@pytest.mark.parametrize("text,want", LETTER_PHRASINGS)
def test_letter_phrasings_are_accepted(text, want):
    assert answers.extract_letter(text, "ABCDE") == want


@pytest.mark.parametrize("text", LETTER_REFUSED)
def test_letter_phrasings_that_are_refused(text):
    assert answers.extract_letter(text, "ABCDE") is None


@pytest.mark.parametrize("text,want", [
    ("The answer is yes.", "yes"), ("**Yes**", "yes"), ("Answer: No", "no"), ("So, no.", "no"),
    ("**Answer:** Yes", "yes"), ("**Answer**: No", "no"), ("The answer is \\boxed{yes}.", "yes"),
    ("No, because ... Answer: yes", "yes")])
def test_yes_no_phrasings(text, want):
    assert answers.extract_yes_no(text) == want


@pytest.mark.parametrize("text,want", [
    ("The answer is $18$.", "18"), ("The answer is 1,234.", "1234"), ("$\\boxed{18}$", "18"),
    ("She sells 9 eggs, 9 * 2 = 18.\n#### 18", "18"), ("#### 1,072\nThat is all.", "1072"),
    ("\\boxed{18}", "18"), ("The answer is \\boxed{18}.", "18"), ("**Answer**: 18 (not 20)", "18"),
    ("**Final Answer:** $18$", "18"), ("The answer is **18**.", "18"), ("I got 20 first. #### 18", "18")])
def test_number_phrasings(text, want):
    assert answers.extract_number(text) == want


@pytest.mark.parametrize("text,want", [
    ("Final Answer: The final answer is $\\left( 3, \\frac{\\pi}{2} \\right)$. I hope it is correct.",
     "(3,\\frac{\\pi}{2})"),
    ("Final Answer: The final answer is $p - q$. I hope it is correct.", "p-q"),
    ("The answer is \\(\\frac{14}{3}\\).", "\\frac{14}{3}"),
    ("The answer is 5. I hope it is correct.", "5"),
    ("**Final Answer**: $\\frac{1}{2}$", "\\frac{1}{2}"),
    ("The answer is **5**.", "5"),
    ("The answer is $2 \\pi r$.", "2\\pi r"),                # "\\pi r" stays two tokens, not "\\pir"
    ("\\boxed{12\\text{ inches}}", "12"),                    # a unit after a number
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),  # row ends kept
    ("\\boxed{\\left\\{ 1, 2 \\right\\}}", "\\{1,2\\}"),
    ("\\boxed{a \\rightarrow b}", "a\\rightarrow b"),       # \\right removed, not \\rightarrow
])
def test_math_answer_span_stops_at_the_math(text, want):
    assert answers.extract_boxed(text) == want
