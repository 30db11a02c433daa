"""lmesh-tools' calculator: exact results, precise errors, and bounded work on adversarial input."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.tools.calculator import (
    MAX_BITS,
    MAX_EXPRESSION_CHARS,
    MAX_NESTING,
    calculate,
    evaluate,
    exact_str,
    rounded_decimal,
)


def refused(expression: str) -> str:
    with pytest.raises(InvalidArgument) as info:
        evaluate(expression)
    assert info.value.field == "expression"
    return info.value.problem


@pytest.mark.parametrize(("expression", "value"), [
    ("0.1 + 0.2", Fraction(3, 10)),
    ("1/3", Fraction(1, 3)),
    ("2^100", Fraction(2**100)),
    ("2**100", Fraction(2**100)),
    ("-2^2", Fraction(-4)),
    ("(-2)^2", Fraction(4)),
    ("2^-2", Fraction(1, 4)),
    ("2^3^2", Fraction(512)),
    ("10 - 4 - 3", Fraction(3)),
    ("24 / 4 / 3", Fraction(2)),
    ("1 + 2 * 3", Fraction(7)),
    ("(1 + 2) * 3", Fraction(9)),
    ("7 \u00f7 2 \u00d7 3 \u2212 1", Fraction(19, 2)),  # division, times, minus signs
    ("12 plus 7 times 3 minus 4", Fraction(29)),  # operators in words
    ("9 Divided By 6 multiplied by 2 to the power of 2 over 3", Fraction(2)),
    ("{12} + [2 * (3 + 1)]", Fraction(20)),  # brackets and braces group as parentheses
    ("--3", Fraction(3)),
    ("+.5", Fraction(1, 2)),
    ("1.5e3 + 2E-2", Fraction(150002, 100)),
    ("0^0", Fraction(1)),
    ("(-1)^1000001", Fraction(-1)),
    ("1^123456789012345678901234567890", Fraction(1)),
    ("(1/2)^-3", Fraction(8)),
    ("123456789012345678901234567890 * 987654321098765432109876543210",
     Fraction(123456789012345678901234567890 * 987654321098765432109876543210)),
])
def test_exact_values(expression: str, value: Fraction) -> None:
    assert evaluate(expression) == value


def test_result_forms() -> None:
    third = calculate("1/3")
    assert (third.value, third.fraction, third.decimal, third.exact_decimal) == (
        "1/3", "1/3", "0.33333333333333333333", False)
    sum_ = calculate("0.1+0.2")
    assert (sum_.value, sum_.fraction, sum_.exact_decimal) == ("0.3", "3/10", True)
    assert calculate("2/3", decimal_places=5).decimal == "0.66667"
    assert calculate("-1/8").value == "-0.125"
    assert calculate("2^100").value == str(2**100)
    # Beyond Python's 4300-digit str() limit, still exact.
    big = calculate("3^20000")
    assert big.value == str(__import__("decimal").Decimal(3**20000)) and len(big.value) == 9543
    with pytest.raises(InvalidArgument) as info:
        calculate("1", decimal_places=1001)
    assert info.value.field == "decimal_places"


def test_rounding_is_half_even_and_signed() -> None:
    assert rounded_decimal(Fraction(5, 2), 0) == "2"
    assert rounded_decimal(Fraction(-1, 3), 3) == "-0.333"
    assert rounded_decimal(Fraction(1, 200), 2) == "0.00"  # 0.005 rounds to even
    assert exact_str(Fraction(-7, 1)) == "-7"


@pytest.mark.parametrize(("expression", "problem"), [
    ("", "empty"),
    ("   ", "empty"),
    ("1/0", "division by zero at position 1"),
    ("1/(2-2)", "division by zero at position 1"),
    ("0^-1", "division by zero"),
    ("(1+2", "the '(' at position 0 is never closed"),
    ("1+2)", "unexpected ')' at position 3"),
    ("()", "found ')' at position 1"),
    ("1 +", "found the end of the expression"),
    ("1 2", "expected an operator or ')' but found '2' at position 2"),
    ("2 x 3", "'x' is not multiplication"),
    ("1,000", "thousands separators"),
    ("5%", "'%' is not supported"),
    ("1..2", "a second '.'"),
    (".", "a lone '.'"),
    ("2^0.5", "not an integer"),
    ("1e", "has no digits"),
    ("1e99999", "exceeds 10000"),
    ("abc", "expected a number or '(' but found 'a' at position 0"),
    ("__import__('os')", "found '_' at position 0"),
    ("2 ** ** 3", "found '*' at position 5"),
])
def test_errors_name_the_problem_and_position(expression: str, problem: str) -> None:
    assert problem in refused(expression)


@pytest.mark.parametrize("expression", [
    "(" * 10_000 + "1" + ")" * 10_000,  # too long
    "(" * (MAX_NESTING + 1) + "1" + ")" * (MAX_NESTING + 1),  # too deep, within the length bound
    "-" * (MAX_NESTING + 1) + "1",
    "10^10^10",
    "2^(2^40)",
    "9^99999",
    "(1/3)^99999",
    "9" * (MAX_EXPRESSION_CHARS + 1),
    "9" * 1001,
    "1e10000^1000",
    "(2^60000)*(2^60000)",
    "2^-200000",
    # Each term within the bounds, but their sum would take seconds of 100 000-bit gcds: the work budget stops it.
    ("3^63000/7^35000+" * 256)[:MAX_EXPRESSION_CHARS - 1],
])
def test_adversarial_input_is_refused_quickly(expression: str) -> None:
    started = time.perf_counter()
    refused(expression)
    assert time.perf_counter() - started < 1.0


def test_huge_values_within_bounds_are_exact() -> None:
    assert evaluate("2^99999 / 2^99998") == 2
    assert evaluate("(2^(MAXB) - 1) + 1".replace("MAXB", str(MAX_BITS - 1))) == 2 ** (MAX_BITS - 1)
    nested = "(" * MAX_NESTING + "1" + ")" * MAX_NESTING
    assert evaluate(nested) == 1


# -------------------------------------------------------------------------------------------- properties


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> tuple[str, Fraction]:
    """A random expression over small fractions, with its value computed by Fraction arithmetic directly."""
    if depth >= 4 or draw(st.integers(0, 2)) == 0:
        numerator = draw(st.integers(0, 10_000))
        places = draw(st.integers(0, 3))
        value = Fraction(numerator, 10**places)
        text = f"{numerator // 10**places}.{numerator % 10**places:0{places}d}" if places else str(numerator)
        return text, value
    op = draw(st.sampled_from(["+", "-", "*", "/", "^", "neg"]))
    left, lval = draw(trees(depth + 1))
    if op == "neg":
        return f"-({left})", -lval
    if op == "^":
        exponent = draw(st.integers(-3, 3))
        if lval == 0 and exponent < 0:
            exponent = -exponent
        return f"({left})^{exponent}" if exponent >= 0 else f"({left})^({exponent})", lval**exponent
    right, rval = draw(trees(depth + 1))
    if op == "/" and rval == 0:
        op = "+"
    spelled = draw(st.sampled_from({"*": ["*", "\u00d7"], "/": ["/", "\u00f7"], "-": ["-", "\u2212"], "+": ["+"]}[op]))
    value = {"+": lval + rval, "-": lval - rval, "*": lval * rval, "/": lval / rval if rval else lval}[op]
    return f"({left}) {spelled} ({right})", value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_random_trees_equal_fraction_arithmetic(tree: tuple[str, Fraction]) -> None:
    text, value = tree
    assert evaluate(text) == value


NEAR_MISSES = st.text(alphabet=st.sampled_from(list("0123456789.+-*/^()eE ,x%\u2212\u00d7\u00f7_a")), max_size=80)


@settings(max_examples=500, deadline=None)
@given(NEAR_MISSES | st.text(max_size=80))
def test_garbage_raises_only_invalid_argument_quickly(garbage: str) -> None:
    started = time.perf_counter()
    try:
        result = evaluate(garbage)
    except InvalidArgument as exc:
        assert exc.field == "expression" and exc.problem
    else:
        assert isinstance(result, Fraction)
    assert time.perf_counter() - started < 0.5
