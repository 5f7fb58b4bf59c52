"""A programmatic verifier for math: final-answer match after normalization, as outcome labels.

Grading follows the usual MATH / PRM800K practice (Hendrycks et al. 2021; Lightman et al. 2023):

1. *Extract* the final answer of a response: the last ``\\boxed{…}`` (or ``\\fbox{…}``), else the
   PRM800K ``# Answer`` section, else the text after the last "the answer is" / "final answer:".
2. *Normalize* both answers: drop ``$``, ``\\$``, ``\\left``/``\\right``, spacing commands,
   ``\\text{…}`` wrappers (keeping the text), degree and percent signs (``50\\%`` = ``50``),
   thousands separators, a trailing period, unit words after a number (``29 cents`` = ``29``),
   ``\\(…\\)`` delimiters, and a leading one-letter assignment (``x = 2`` = ``2``).
3. *Compare*: equal strings match; otherwise both sides are parsed into sympy (``\\frac``,
   ``\\sqrt``, ``\\pi``, ``^``, ``\\cdot`` translated) and match when their difference simplifies
   to 0, or is a number within 1e-9 relative (so ``0.5`` = ``\\frac{1}{2}`` but ``0.33`` ≠ ``1/3``).
   Comma-separated answers (tuples, lists of roots) compare element by element, in order.
   Answers with ``_`` (``40_9`` in base 9) compare as strings only (Python reads ``40_9`` as 409).

Parsing is restricted, because responses are untrusted model text: only digits, single-letter
variables, ``sqrt``, ``pi``, arithmetic, decimal points and parentheses reach sympy (no
names, attribute access or strings), at most 120 characters, and every exponent must be a
variable or a number of magnitude ≤ 1000 written without powers (so ``9^{9^{9}}`` is refused
instead of computed).

Outcome labels (`MathVerifier`): the correct response wins with confidence 1; both correct is a
tie (equal outcomes); neither correct abstains — the outcome says nothing about which wrong
answer is better, so the comparison goes back to the queue for another judge or a human. A
prompt without a reference answer abstains too.

>>> extract_answer("so $x = 2$, and the answer is $\\\\boxed{\\\\frac{1}{2}}$.")
'\\\\frac{1}{2}'
>>> answers_match("\\\\frac{1}{2}", "0.5"), answers_match("0.33", "1/3")
(True, False)
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from tokenize import TokenError
from typing import Any

import sympy
from sympy.parsing.sympy_parser import (
    convert_xor,
    implicit_multiplication_application,
    parse_expr,
    standard_transformations,
)

from actors.core.judges.protocol import JudgeInput, JudgeKind, Judgment, abstain

MAX_EXPR_CHARS = 120
MAX_EXPONENT = 1000
REL_TOL = 1e-9

_ANSWER_SECTION = re.compile(r"^#+[ \t]*Answer[ \t]*:?[ \t]*\n\s*(\S[^\n]*)",
                             re.MULTILINE | re.IGNORECASE)
_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s|\.$|\n|$)",
                        re.IGNORECASE)
_ASSIGNMENT = re.compile(r"^[A-Za-z]\s*=\s*([^=]+)$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_UNITS = re.compile(r"^(-?[\d.]+(?:/\d+)?)\s+(?:[A-Za-z]{3,}\s*){1,2}$")
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_DROP = ("\\left", "\\right", "\\displaystyle", "\\(", "\\)", "\\[", "\\]", "\\!", "\\,",
         "\\;", "\\:", "\\ ", "\\$", "$", "^\\circ", "^{\\circ}", "°", "\\%", "%")
_SAFE_GLOBALS: dict[str, Any] = {
    "Integer": sympy.Integer, "Float": sympy.Float, "Rational": sympy.Rational,
    "Symbol": sympy.Symbol, "Add": sympy.Add, "Mul": sympy.Mul, "Pow": sympy.Pow,
    "__builtins__": {},
}
_SAFE_LOCALS: dict[str, Any] = {c: sympy.Symbol(c) for c in string.ascii_letters}
_SAFE_LOCALS.update(sqrt=sympy.sqrt, pi=sympy.pi)
_TRANSFORMS = (*standard_transformations, implicit_multiplication_application, convert_xor)
_ALLOWED = re.compile(r"^[0-9A-Za-z+\-*/().\s]+$")
_ATTRIBUTE = re.compile(r"[A-Za-z)]\s*\.|\.(?!\d)")  # a dot that is not a decimal point


# -- extraction -----------------------------------------------------------------------------------


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The argument at ``text[start:]`` — a balanced ``{…}`` or one non-space character — and
    the index after it."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        return text[i], i + 1
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j], j + 1
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a response (see the module docstring), or None."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)", text)]
    if starts:
        found = _braced(text, starts[-1])
        if found is not None:
            return found[0].strip()
    sections = _ANSWER_SECTION.findall(text)
    if sections:
        return sections[-1].strip()
    stated = _ANSWER_IS.findall(text)
    return stated[-1].strip() if stated else None


# -- normalization --------------------------------------------------------------------------------


def normalize_answer(answer: str) -> str:
    """A canonical string form of an answer (see the module docstring).

    >>> normalize_answer("\\\\$1,240.")
    '1240'
    >>> normalize_answer("\\\\text{29 cents}")
    '29'
    """
    s = answer.strip()
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    for token in _DROP:
        s = s.replace(token, "")
    s = _TEXT_WRAPPERS.sub(r"\1", s).strip().rstrip(".").strip()
    assignment = _ASSIGNMENT.match(s)
    if assignment:
        s = assignment.group(1).strip()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    units = _UNITS.match(s)
    if units:
        s = units.group(1)
    return re.sub(r"\s+", "", s)


def _latex_to_sympy_text(s: str) -> str | None:
    """Translate the LaTeX subset of answers into sympy's syntax (None: outside the subset)."""
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i) or s.startswith("\\sqrt", i):
            command, i = s[i:i + 5], i + 5
            root = None
            if command == "\\sqrt" and i < len(s) and s[i] == "[":
                close = s.find("]", i)
                if close < 0:
                    return None
                root, i = s[i + 1:close], close + 1
            first = _braced(s, i)
            if first is None:
                return None
            inner = _latex_to_sympy_text(first[0])
            if inner is None:
                return None
            if command == "\\sqrt":
                out.append(f"sqrt({inner})" if root is None else f"(({inner})**(1/({root})))")
                i = first[1]
                continue
            second = _braced(s, first[1])
            denominator = None if second is None else _latex_to_sympy_text(second[0])
            if second is None or denominator is None:
                return None
            out.append(f"(({inner})/({denominator}))")
            i = second[1]
        elif s.startswith(("\\cdot", "\\times"), i):
            out.append("*")
            i += 5 if s.startswith("\\cdot", i) else 6
        elif s.startswith("\\div", i):
            out.append("/")
            i += 4
        elif s.startswith("\\pi", i):
            out.append(" pi ")
            i += 3
        elif s[i] == "\\":
            return None  # any other command: not in the subset
        else:
            out.append({"{": "(", "}": ")", "^": "**"}.get(s[i], s[i]))
            i += 1
    return "".join(out)


def _small_exponent(exponent: sympy.Basic) -> bool:
    """A symbol, or a number built without powers (divisions aside) of magnitude ≤ 1000."""
    if exponent.is_Symbol:
        return True
    towers = [n for n in sympy.preorder_traversal(exponent)
              if isinstance(n, sympy.Pow) and n.exp != -1]
    return (not towers and exponent.is_number
            and abs(complex(exponent.evalf())) <= MAX_EXPONENT)


def _safe(expr: sympy.Basic) -> bool:
    """No huge integers and no exponent that could take long to compute (unevaluated tree)."""
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow) and node.exp != -1 and not _small_exponent(node.exp):
            return False
        if isinstance(node, sympy.Integer) and abs(node) > 10**100:
            return False
    return True


def to_sympy(answer: str) -> sympy.Expr | None:
    """Parse a normalized answer into sympy under the restrictions of the module docstring."""
    if len(answer) > MAX_EXPR_CHARS or "_" in answer:
        return None
    text = _latex_to_sympy_text(answer)
    if text is None or not _ALLOWED.match(text) or _ATTRIBUTE.search(text):
        return None
    if any(len(name) > 1 and name not in ("sqrt", "pi")
           for name in re.findall(r"[A-Za-z]+", text)):
        return None
    parse = dict(local_dict=dict(_SAFE_LOCALS), global_dict=dict(_SAFE_GLOBALS),
                 transformations=_TRANSFORMS)
    try:
        raw = parse_expr(text, evaluate=False, **parse)  # check before computing anything
        if not isinstance(raw, sympy.Expr) or not _safe(raw):
            return None
        return parse_expr(text, **parse)
    except (SyntaxError, TokenError, TypeError, ValueError, AttributeError, ZeroDivisionError,
            sympy.SympifyError):
        return None


def _components(s: str) -> list[str]:
    """Split at depth-0 commas, after stripping one pair of parentheses around a tuple."""
    if s.startswith("(") and s.endswith(")") and _closing(s, 0) == len(s) - 1 and "," in s:
        s = s[1:-1]
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(s):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(s[last:i])
            last = i + 1
    return [*parts, s[last:]]


def _closing(s: str, start: int) -> int:
    depth = 0
    for i in range(start, len(s)):
        depth += {"(": 1, ")": -1}.get(s[i], 0)
        if depth == 0:
            return i
    return -1


def _same_value(a: str, b: str) -> bool:
    if a == b:
        return True
    x, y = to_sympy(a), to_sympy(b)
    if x is None or y is None:
        return False
    try:
        diff = sympy.simplify(x - y)
        if diff == 0:
            return True
        if diff.is_number and y.is_number:
            return abs(complex(diff)) <= REL_TOL * max(1.0, abs(complex(y)))
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError):
        return False
    return False


def answers_match(predicted: str, reference: str) -> bool:
    """Whether two final answers are equivalent (see the module docstring)."""
    a, b = normalize_answer(predicted), normalize_answer(reference)
    if not a or not b:
        return False
    if a == b:
        return True
    parts_a, parts_b = _components(a), _components(b)
    if len(parts_a) != len(parts_b):
        return False
    return all(_same_value(x, y) for x, y in zip(parts_a, parts_b, strict=True))


def grade(response: str, reference: str, steps: Sequence[str] | None = None) -> bool:
    """Whether ``response``'s final answer (else the last step's) matches ``reference``."""
    answer = extract_answer(response)
    if answer is None and steps:
        answer = extract_answer(steps[-1])
    return answer is not None and answers_match(answer, reference)


# -- outcome labels -------------------------------------------------------------------------------


class MathVerifier:
    """Outcome labels by final-answer match against a reference answer per prompt.

    Args:
        answers: The reference answer of each prompt: a mapping from prompt text, or a function
            ``prompt -> answer | None`` (a module-level function, to travel to a Ray actor).
    """

    kind: JudgeKind = "ai"

    def __init__(self, answers: Mapping[str, str] | Callable[[str], str | None]):
        self.answers = answers

    def reference(self, prompt: str) -> str | None:
        """The reference answer of ``prompt`` (None: unknown)."""
        if callable(self.answers):
            return self.answers(prompt)
        return self.answers.get(prompt)

    def judge(self, items: Sequence[JudgeInput]) -> list[Judgment]:
        return [self._one(item) for item in items]

    def _one(self, item: JudgeInput) -> Judgment:
        reference = self.reference(item.prompt)
        if reference is None:
            return abstain("verifier: no reference answer for this prompt")
        ok_a = grade(item.response_a, reference, item.steps_a)
        ok_b = grade(item.response_b, reference, item.steps_b)
        if ok_a and ok_b:
            return Judgment("tie", 1.0, f"verifier: both answers match {reference!r}")
        if ok_a or ok_b:
            return Judgment("a" if ok_a else "b", 1.0,
                            f"verifier: only {'a' if ok_a else 'b'} matches {reference!r}")
        return abstain(f"verifier: neither answer matches {reference!r}")
