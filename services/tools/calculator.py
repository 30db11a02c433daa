"""Exact arithmetic: an iterative operator-precedence parser (shunting-yard) over fractions.Fraction.

Iterative, so nesting depth costs no Python stack; every input is bounded (length, nesting, digits, the size of
every intermediate value, checked before a power is computed), so no expression can hang the process or eat its
memory. Never eval() or Python's ast: only the grammar below.

Grammar: numbers (`12`, `0.5`, `.5`, `1.5e3`), binary `+ - * / ^ **` (also the Unicode minus, times and division
signs), unary `+ -`, parentheses.
Precedence, lowest first: `+ -`; `* /`; unary `+ -`; `^` (right-associative), so -2^2 = -4 and 2^-1 = 1/2.
"""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from services.common.errors import InvalidArgument

MAX_EXPRESSION_CHARS = 4096
MAX_NESTING = 200  # open parentheses plus pending unary signs
MAX_NUMBER_DIGITS = 1000
MAX_EXPONENT_LITERAL = 10_000  # |n| in a number's `e` notation
MAX_BITS = 100_000  # numerator and denominator of any value, intermediate or final
# The sum over all operations of their operands' sizes in bits: many operations on values near MAX_BITS (each a
# multi-millisecond gcd) would otherwise add up to seconds within the length bound.
WORK_BUDGET_BITS = 1_000_000
DEFAULT_DECIMAL_PLACES = 20
MAX_DECIMAL_PLACES = 1000

FIELD = "expression"

# Unicode spellings people (and models) paste; `x` is not among them: it reads as a variable.
# minus, times, division, dot operator, middle dot
# Other spellings of the operators, and brackets and braces that group as parentheses do (as written on paper).
_ALIASES = {"\u2212": "-", "\u00d7": "*", "\u00f7": "/", "\u22c5": "*", "\u00b7": "*",
            "[": "(", "]": ")", "{": "(", "}": ")"}
# Operators in words ("12 plus 7 times 3"), as a question is often written; whole words, any case.
_WORDS = re.compile(r"\b(plus|minus|times|multiplied by|divided by|over|to the power of)\b", re.IGNORECASE)
_WORD_OPERATORS = {"plus": "+", "minus": "-", "times": "*", "multiplied by": "*", "divided by": "/", "over": "/",
                   "to the power of": "^"}


class CalculationError(InvalidArgument):
    def __init__(self, problem: str, field: str = FIELD) -> None:
        super().__init__(field, problem)


@dataclass(frozen=True)
class _Op:
    symbol: str
    precedence: int
    right_assoc: bool
    unary: bool
    position: int


_BINARY_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "^": 4}
_UNARY_PRECEDENCE = 3


def _bits(value: Fraction) -> int:
    return value.numerator.bit_length() + value.denominator.bit_length()


def _check_size(value: Fraction, position: int) -> Fraction:
    if value.numerator.bit_length() > MAX_BITS or value.denominator.bit_length() > MAX_BITS:
        raise CalculationError(f"the value computed at position {position} exceeds {MAX_BITS} bits")
    return value


def _power(base: Fraction, exponent: Fraction, position: int) -> Fraction:
    if exponent.denominator != 1:
        raise CalculationError(f"the exponent at position {position} is {exponent}, not an integer: only integer "
                               "powers are exact")
    n = exponent.numerator
    if base == 0:
        if n < 0:
            raise CalculationError(f"division by zero: 0 raised to a negative power at position {position}")
        return Fraction(1) if n == 0 else Fraction(0)
    if abs(base) == 1:
        return Fraction(1) if base == 1 or n % 2 == 0 else Fraction(-1)
    # Bound the result's size before computing it: |n| * log2 of the larger of numerator and denominator.
    largest = max(abs(base.numerator), base.denominator)
    if abs(n) > MAX_BITS or abs(n) * math.log2(largest) > MAX_BITS:
        raise CalculationError(f"the power at position {position} would exceed {MAX_BITS} bits")
    result = base**n
    assert isinstance(result, Fraction)
    return _check_size(result, position)


def _divide(left: Fraction, right: Fraction, position: int) -> Fraction:
    if right == 0:
        raise CalculationError(f"division by zero at position {position}")
    return left / right


_BINARY: dict[str, Callable[[Fraction, Fraction, int], Fraction]] = {
    "+": lambda a, b, _: a + b,
    "-": lambda a, b, _: a - b,
    "*": lambda a, b, _: a * b,
    "/": _divide,
    "^": _power,
}


def _describe(text: str, position: int) -> str:
    return "the end of the expression" if position >= len(text) else f"{text[position]!r} at position {position}"


def _read_number(text: str, start: int) -> tuple[Fraction, int]:
    """The number literal at `start` and the position after it."""
    i, length = start, len(text)
    while i < length and text[i].isascii() and text[i].isdigit():
        i += 1
    integer = text[start:i]
    fraction = ""
    if i < length and text[i] == ".":
        i += 1
        begin = i
        while i < length and text[i].isascii() and text[i].isdigit():
            i += 1
        fraction = text[begin:i]
        if i < length and text[i] == ".":
            raise CalculationError(f"a second '.' in the number at position {start} (position {i})")
    if not integer and not fraction:
        raise CalculationError(f"a lone '.' at position {start}")
    if len(integer) + len(fraction) > MAX_NUMBER_DIGITS:
        raise CalculationError(f"the number at position {start} has more than {MAX_NUMBER_DIGITS} digits")
    exponent = 0
    if i < length and text[i] in "eE":
        j = i + 1
        sign = 1
        if j < length and text[j] in "+-":
            sign = -1 if text[j] == "-" else 1
            j += 1
        begin = j
        while j < length and text[j].isascii() and text[j].isdigit():
            j += 1
        if begin == j:
            raise CalculationError(f"the exponent of the number at position {start} has no digits (position {j})")
        digits = text[begin:j]
        if len(digits) > 6 or int(digits) > MAX_EXPONENT_LITERAL:
            raise CalculationError(f"the exponent of the number at position {start} exceeds {MAX_EXPONENT_LITERAL}")
        exponent = sign * int(digits)
        i = j
    value = Fraction(int(integer + fraction or "0"), 10 ** len(fraction))
    value = value * 10**exponent if exponent >= 0 else value / 10**-exponent
    if i < length and (text[i].isalpha() or text[i] == "_"):
        raise CalculationError(f"unexpected {text[i]!r} at position {i} after a number"
                               + (": 'x' is not multiplication, use '*'" if text[i] in "xX" else ""))
    return _check_size(value, start), i


def evaluate(expression: str) -> Fraction:
    """The exact value of `expression`; CalculationError (INVALID_ARGUMENT on `expression`) says what is wrong and
    where (0-based character positions)."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculationError(f"longer than {MAX_EXPRESSION_CHARS} characters ({len(expression)})")
    text = "".join(_ALIASES.get(ch, ch) for ch in expression)
    if _WORDS.search(text):  # positions in messages then refer to the expression with symbols
        text = _WORDS.sub(lambda m: _WORD_OPERATORS[" ".join(m.group(1).lower().split())], text)
    if not text.strip():
        raise CalculationError("empty: give an arithmetic expression such as (2 + 3) * 4")
    values: list[Fraction] = []
    ops: list[_Op | int] = []  # an int is an open parenthesis at that position
    nesting = 0
    work = 0

    def apply(op: _Op) -> None:
        nonlocal work
        if op.unary:
            operand = values.pop()
            values.append(-operand if op.symbol == "-" else operand)
            return
        right, left = values.pop(), values.pop()
        work += _bits(left) + _bits(right)
        if work > WORK_BUDGET_BITS:
            raise CalculationError(f"too much computation on large numbers (at the operator at position "
                                   f"{op.position}): over {WORK_BUDGET_BITS} bits of operands in all")
        result = _check_size(_BINARY[op.symbol](left, right, op.position), op.position)
        work += _bits(result) if op.symbol == "^" else 0
        values.append(result)

    expect_operand = True
    i, length = 0, len(text)
    while i < length:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if expect_operand:
            if (ch.isascii() and ch.isdigit()) or ch == ".":
                value, i = _read_number(text, i)
                values.append(value)
                expect_operand = False
                continue
            if ch in "+-" or ch == "(":
                nesting += 1
                if nesting > MAX_NESTING:
                    raise CalculationError(f"nested deeper than {MAX_NESTING} parentheses or signs (position {i})")
                ops.append(i if ch == "(" else _Op(ch, _UNARY_PRECEDENCE, True, True, i))
                i += 1
                continue
            raise CalculationError(f"expected a number or '(' but found {_describe(text, i)}"
                                   + _hint(ch))
        # An operator or a closing parenthesis is expected.
        if ch == ")":
            while ops and not isinstance(ops[-1], int):
                top = ops.pop()
                assert isinstance(top, _Op)
                if top.unary:
                    nesting -= 1
                apply(top)
            if not ops:
                raise CalculationError(f"unexpected ')' at position {i}: no '(' is open")
            ops.pop()
            nesting -= 1
            i += 1
            continue
        if text.startswith("**", i):
            symbol, width = "^", 2
        elif ch in _BINARY_PRECEDENCE:
            symbol, width = ch, 1
        else:
            raise CalculationError(f"expected an operator or ')' but found {_describe(text, i)}" + _hint(ch))
        incoming = _Op(symbol, _BINARY_PRECEDENCE[symbol], symbol == "^", False, i)
        while ops and not isinstance(ops[-1], int):
            top = ops[-1]
            assert isinstance(top, _Op)
            if top.precedence > incoming.precedence or (top.precedence == incoming.precedence
                                                        and not incoming.right_assoc):
                ops.pop()
                if top.unary:
                    nesting -= 1
                apply(top)
            else:
                break
        ops.append(incoming)
        expect_operand = True
        i += width
    if expect_operand:
        raise CalculationError(f"expected a number or '(' but found {_describe(text, length)}")
    while ops:
        top = ops.pop()
        if isinstance(top, int):
            raise CalculationError(f"the '(' at position {top} is never closed")
        apply(top)
    assert len(values) == 1
    return values[0]


def _hint(ch: str) -> str:
    if ch == ",":
        return ": thousands separators and decimal commas are not accepted (write 1234567.5)"
    if ch in "xX":
        return ": 'x' is not multiplication, use '*'"
    if ch == "%":
        return ": '%' is not supported (write 15/100 for 15%)"
    return ""


# ---------------------------------------------------------------------------------------------- formatting


def _int_str(n: int) -> str:
    """str(n) without Python's 4300-digit conversion limit (libmpdec converts in quasi-linear time)."""
    return str(decimal.Decimal(n)) if n.bit_length() > 10_000 else str(n)


def fraction_str(value: Fraction) -> str:
    return f"{_int_str(value.numerator)}/{_int_str(value.denominator)}"


def terminating_decimal(value: Fraction) -> str | None:
    """The exact decimal expansion of `value`, or None when it does not terminate (a prime factor other than 2 and
    5 in the denominator)."""
    q = value.denominator
    twos = (q & -q).bit_length() - 1
    q >>= twos
    fives = 0
    while q % 5 == 0:
        q //= 5
        fives += 1
    if q != 1:
        return None
    places = max(twos, fives)
    return _place_point(value.numerator * 10**places // value.denominator, places)


def rounded_decimal(value: Fraction, places: int) -> str:
    """`value` rounded half-even to `places` digits after the point, trailing zeros kept."""
    scaled = round(value * 10**places)  # Fraction.__round__ rounds half to even, exactly
    return _place_point(scaled, places)


def _place_point(scaled: int, places: int) -> str:
    sign = "-" if scaled < 0 else ""
    digits = _int_str(abs(scaled))
    if places == 0:
        return sign + digits
    digits = digits.rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def exact_str(value: Fraction) -> str:
    """A terminating decimal ("0.3", "12") when there is one, else "p/q"."""
    return terminating_decimal(value) or fraction_str(value)


@dataclass(frozen=True)
class Evaluation:
    value: str
    fraction: str
    decimal: str
    exact_decimal: bool


def calculate(expression: str, decimal_places: int = 0) -> Evaluation:
    if decimal_places > MAX_DECIMAL_PLACES:
        raise CalculationError(f"at most {MAX_DECIMAL_PLACES}", field="decimal_places")
    result = evaluate(expression)
    exact = terminating_decimal(result)
    return Evaluation(value=exact or fraction_str(result), fraction=fraction_str(result),
                      decimal=rounded_decimal(result, decimal_places or DEFAULT_DECIMAL_PLACES),
                      exact_decimal=exact is not None)
