"""The calculator tool: GSM8K's ``<<48/2=24>>`` annotations as calls the model makes and the engine answers.

The text form of one call is GSM8K's annotation ``<<expr=result>>``; its token form is

    <|tool_start|> expr <|tool_end|> <|output_start|> result <|output_end|>

The model writes the call (``<|tool_start|> expr <|tool_end|>``); the decoding engine asks ``Calculator.forced``
after each sampled token and forces the output it returns, never trained (``gpt2lab.chat.template.render`` with
``tools`` masks it). ``calculate`` evaluates arithmetic only, by walking Python's parse tree of the expression
over a whitelist of nodes (numbers, + - * / // % **, unary signs, parentheses): nothing is ever ``eval``-ed, and
the expression's length, exponents and the size of every intermediate number are bounded, so no input hangs or
fills memory. It computes with exact fractions (0.2 * 50 is 10, not 10.000000000000002).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Sequence
from fractions import Fraction

TOOL_ERROR = "error"  # what the engine forces when an expression does not evaluate (calculate returns None)
MAX_EXPRESSION = 256  # characters: GSM8K's longest annotation has about 60
MAX_BITS = 4096  # the largest numerator or denominator any step may make (about 1,233 digits)
MAX_DIGITS = 30  # digits of a result's integer part: past it, an error rather than a long forced output
DECIMALS = 6  # a non-integral result is rounded to this many decimals, trailing zeros dropped

# One call in text: <<expr=result>>; the expression runs to the last '=' (a result holds none).
TOOL_CALL = re.compile(r"<<([^<>]*)=([^<>=]*)>>")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # "1,200" -> "1200"
_LEADING_ZEROS = re.compile(r"(?<![\d.])0+(?=\d)")  # "05" -> "5" (Python rejects leading zeros)
_EXPONENT = re.compile(r"[eE]([+-]?\d+)")

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Refused(Exception):
    """An expression outside the calculator's arithmetic, or past its bounds."""


def calculate(expression: str) -> str | None:
    """The result of an arithmetic expression as the text the engine forces, or None (not arithmetic, too big,
    division by zero). Accepts GSM8K's forms: "48/2", "1,200 * 3", "48 / 2 =", "0.2*50", "(3+4)*.5".

    Integral results print as integers ("24"), others rounded to DECIMALS decimals ("0.333333", "2.5").
    """
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION:
        return None
    text = expression.strip().removesuffix("=").strip()
    text = _LEADING_ZEROS.sub("", _THOUSANDS.sub("", text))
    try:
        value = _value(ast.parse(text, mode="eval").body, text)
    except (_Refused, SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None
    return format_number(value)


def format_number(value: Fraction) -> str | None:
    """'24' for 24, '0.333333' for 1/3, '-2.5' for -5/2; None past MAX_DIGITS integer digits."""
    scaled = round(abs(value) * 10**DECIMALS)  # an int: exact rounding (half to even)
    whole, frac = divmod(scaled, 10**DECIMALS)
    if len(str(whole)) > MAX_DIGITS:
        return None
    sign = "-" if value < 0 and scaled else ""
    return sign + str(whole) + (f".{frac:0{DECIMALS}d}".rstrip("0") if frac else "")


def _value(node: ast.AST, text: str) -> Fraction:
    """The exact value of a whitelisted parse-tree node; anything else raises _Refused."""
    if isinstance(node, ast.Constant):
        return _number(node, text)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand, text))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return _power(_value(node.left, text), _value(node.right, text))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _bounded(_BINARY[type(node.op)](_value(node.left, text), _value(node.right, text)))
    raise _Refused(type(node).__name__)


def _number(node: ast.Constant, text: str) -> Fraction:
    """A literal, exactly: a decimal is read from its digits ("0.2" is 1/5, not the nearest float)."""
    if isinstance(node.value, bool) or not isinstance(node.value, int | float):
        raise _Refused("not a number")
    if isinstance(node.value, int):
        return _bounded(Fraction(node.value))
    digits = (ast.get_source_segment(text, node) or "").replace("_", "")
    exponent = _EXPONENT.search(digits)
    if exponent and abs(int(exponent.group(1))) > MAX_BITS:  # "1e99999999" would build a 10**99999999
        raise _Refused("exponent too large")
    return _bounded(Fraction(digits))


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    """base ** exponent: exact for an integer exponent whose result stays within MAX_BITS, else through floats
    (a root: 16 ** 0.5); complex or infinite results are refused."""
    if exponent.denominator == 1:
        bits = max(base.numerator.bit_length(), base.denominator.bit_length())
        if bits * abs(exponent.numerator) > MAX_BITS and abs(base) not in (0, 1):
            raise _Refused("exponent too large")
        return _bounded(base ** int(exponent))
    result = float(base) ** float(exponent)
    if not isinstance(result, float) or not math.isfinite(result):
        raise _Refused("not a real number")
    return _bounded(Fraction(result))


def _bounded(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise _Refused("number too large")
    return value


def split_calls(text: str) -> list[str | tuple[str, str]]:
    """Text cut at its calls: plain pieces (str) and (expr, result) pairs, in order, empty pieces left out.

    'Half is 48/2 = <<48/2=24>>24.' -> ['Half is 48/2 = ', ('48/2', '24'), '24.']
    """
    pieces: list[str | tuple[str, str]] = []
    end = 0
    for m in TOOL_CALL.finditer(text):
        pieces += [text[end : m.start()]] if m.start() > end else []
        pieces.append((m.group(1), m.group(2)))
        end = m.end()
    return pieces + ([text[end:]] if end < len(text) else [])


class Calculator:
    """What the engine forces after a call: ``forced(generated)`` after each sampled token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tool_start = tokenizer.special_id("<|tool_start|>")
        self.tool_end = tokenizer.special_id("<|tool_end|>")
        self.output_start = tokenizer.special_id("<|output_start|>")
        self.output_end = tokenizer.special_id("<|output_end|>")
        self.banned = (self.output_start, self.output_end)  # the engine writes outputs: the model never samples them

    def forced(self, generated: Sequence[int]) -> list[int]:
        """The ids to force after ``generated`` (the tokens so far, the last one just sampled): [] unless that
        token is <|tool_end|> closing an open <|tool_start|> (the latest, no <|tool_end|> after it); then
        <|output_start|> result <|output_end|>, the result of the expression between them, or TOOL_ERROR."""
        if not generated or generated[-1] != self.tool_end:
            return []
        for i in range(len(generated) - 2, -1, -1):  # back to the call's start, from the token before the end
            if generated[i] == self.tool_end:
                return []  # this <|tool_end|> closes nothing: the latest call was closed already
            if generated[i] == self.tool_start:
                expression = self.tokenizer.decode(list(generated[i + 1 : -1]))
                result = calculate(expression) or TOOL_ERROR
                return [self.output_start, *self.tokenizer.encode_ordinary(result), self.output_end]
        return []
