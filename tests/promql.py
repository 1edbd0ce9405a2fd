"""A PromQL parser for the checks of deploy/ (importable from any test: tests/ is on sys.path).

No PromQL parser is a dependency of the project, so this one follows the Prometheus grammar
(promql/parser/generated_parser.y) closely enough to refuse what Prometheus would refuse in our dashboards
and rules: unbalanced brackets, unknown functions or aggregations, a range vector where an instant vector
is needed (``rate(x)``, ``sum(x[5m])``), a binary operation on range vectors, bad durations, label
matchers, modifiers in the wrong place. It returns the metric names the expression selects, so a test can
check them against what the code exports. Grafana's ``$__rate_interval``-style variables are replaced by a
duration first (Grafana does that before Prometheus sees the query).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

GRAFANA_VARIABLES = re.compile(r"\$__(rate_interval|interval|range)|\$\{__(rate_interval|interval|range)\}")
_DURATION = r"(?:\d+(?:ms|[smhdwy]))+"
_TOKEN = re.compile(
    rf"""\s*(?:
    (?P<duration>{_DURATION})(?![\w.])
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|==|!=|<=|>=|[-+*/%^<>=(){{}}\[\],:@])
)""",
    re.VERBOSE,
)
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}  # fmt: skip
_RANGE_FUNCTIONS = {
    "rate", "irate", "increase", "delta", "idelta", "deriv", "predict_linear", "resets", "changes",
    "absent_over_time", "present_over_time", "avg_over_time", "min_over_time", "max_over_time",
    "sum_over_time", "count_over_time", "quantile_over_time", "stddev_over_time", "stdvar_over_time",
    "last_over_time", "mad_over_time", "holt_winters", "double_exponential_smoothing",
}  # fmt: skip
_INSTANT_FUNCTIONS = {
    "abs", "absent", "ceil", "floor", "round", "exp", "ln", "log2", "log10", "sqrt", "clamp", "clamp_max",
    "clamp_min", "histogram_quantile", "histogram_count", "histogram_sum", "histogram_fraction",
    "label_replace", "label_join", "sort", "sort_desc", "sort_by_label", "sort_by_label_desc", "sgn",
    "timestamp", "vector", "scalar", "time", "minute", "hour", "day_of_week", "day_of_month",
    "day_of_year", "days_in_month", "month", "year", "pi", "deg", "rad", "sin", "cos", "tan", "asin",
    "acos", "atan", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh",
}  # fmt: skip
_SCALAR_RESULT = {"scalar", "time", "pi", "minute", "hour", "month", "year"}
_COMPARISONS = {"==", "!=", "<=", ">=", "<", ">"}
_PRECEDENCE = [{"or"}, {"and", "unless"}, _COMPARISONS, {"+", "-"}, {"*", "/", "%", "atan2"}]
_KEYWORDS = {"and", "or", "unless", "atan2", "by", "without", "on", "ignoring", "group_left"}
_KEYWORDS |= {"group_right", "bool", "offset"}


class PromQLError(ValueError):
    pass


@dataclass
class Parsed:
    kind: str  # scalar, vector, matrix, string
    metrics: set[str] = field(default_factory=set)


def parse(expr: str) -> Parsed:
    """Parse ``expr``; raise PromQLError saying what is wrong where."""
    return _Parser(GRAFANA_VARIABLES.sub("5m", expr)).parse()


def metric_names(expr: str) -> set[str]:
    return parse(expr).metrics


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            if not text[pos:].strip():
                break
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise PromQLError(f"unexpected character at {pos}: {text[pos : pos + 20]!r}")
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()
        self.i = 0

    # --- tokens ---------------------------------------------------------------------------------------

    def peek(self, offset: int = 0) -> tuple[str, str, int]:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else ("end", "", len(self.text))

    def take(self) -> tuple[str, str, int]:
        token = self.peek()
        self.i += 1
        return token

    def at(self, *values: str) -> bool:
        kind, value, _ = self.peek()
        return kind in ("op", "ident") and value in values

    def expect(self, value: str) -> None:
        kind, got, pos = self.take()
        if got != value or kind not in ("op", "ident"):
            raise PromQLError(f"expected {value!r} at {pos}, got {got or 'the end'!r}")

    def fail(self, what: str) -> PromQLError:
        _, value, pos = self.peek()
        return PromQLError(f"{what} at {pos} (near {value or 'the end'!r}) in {self.text!r}")

    # --- grammar --------------------------------------------------------------------------------------

    def parse(self) -> Parsed:
        result = self.binary(0)
        if self.peek()[0] != "end":
            raise self.fail("unexpected token")
        return result

    def binary(self, level: int) -> Parsed:
        if level == len(_PRECEDENCE):
            return self.power()
        left = self.binary(level + 1)
        while self.at(*_PRECEDENCE[level]):
            op = self.take()[1]
            is_bool = self.modifiers(op)
            right = self.binary(level + 1)
            left = self.combine(op, left, right, is_bool)
        return left

    def power(self) -> Parsed:
        base = self.unary()
        if self.at("^"):
            self.take()
            is_bool = self.modifiers("^")
            return self.combine("^", base, self.power(), is_bool)  # right-associative
        return base

    def modifiers(self, op: str) -> bool:
        is_bool = False
        if self.at("bool"):
            if op not in _COMPARISONS:
                raise self.fail("bool modifier on a non-comparison")
            self.take()
            is_bool = True
        if self.at("on", "ignoring"):
            self.take()
            self.labels()
            if self.at("group_left", "group_right"):
                if op in ("and", "or", "unless"):
                    raise self.fail("grouping on a set operator")
                self.take()
                if self.at("("):
                    self.labels()
        return is_bool

    def combine(self, op: str, left: Parsed, right: Parsed, is_bool: bool) -> Parsed:
        for side in (left, right):
            if side.kind in ("matrix", "string"):
                raise self.fail(f"binary {op!r} on a {side.kind}")
        if op in ("and", "or", "unless") and "scalar" in (left.kind, right.kind):
            raise self.fail(f"set operator {op!r} on a scalar")
        if op in _COMPARISONS and left.kind == right.kind == "scalar" and not is_bool:
            raise self.fail("comparison between scalars needs bool")
        kind = "scalar" if left.kind == right.kind == "scalar" else "vector"
        return Parsed(kind, left.metrics | right.metrics)

    def unary(self) -> Parsed:
        if self.at("-", "+"):
            self.take()
            operand = self.unary()
            if operand.kind not in ("scalar", "vector"):
                raise self.fail(f"unary minus on a {operand.kind}")
            return operand
        return self.postfix(self.primary())

    def postfix(self, node: Parsed) -> Parsed:
        while True:
            if self.at("["):
                self.take()
                self.duration()
                if self.at(":"):  # subquery
                    self.take()
                    if not self.at("]"):
                        self.duration()
                    if node.kind != "vector":
                        raise self.fail(f"subquery of a {node.kind}")
                elif node.kind != "selector":
                    raise self.fail("range of something other than a vector selector")
                self.expect("]")
                node = Parsed("matrix", node.metrics)
            elif self.at("offset"):
                self.take()
                if self.at("-"):
                    self.take()
                self.duration()
            elif self.at("@"):
                self.take()
                if self.at("start", "end"):
                    self.take()
                    self.expect("(")
                    self.expect(")")
                elif self.take()[0] != "number":
                    raise self.fail("@ needs a timestamp")
            else:
                return Parsed("vector", node.metrics) if node.kind == "selector" else node

    def duration(self) -> None:
        kind, _, _ = self.take()
        if kind != "duration":
            self.i -= 1
            raise self.fail("expected a duration such as 5m")

    def primary(self) -> Parsed:
        kind, value, _ = self.peek()
        if kind == "number" or (kind == "ident" and value.lower() in ("inf", "nan")):
            self.take()
            return Parsed("scalar")
        if kind == "duration":
            raise self.fail("a duration where a value belongs")
        if kind == "string":
            self.take()
            return Parsed("string")
        if self.at("("):
            self.take()
            inner = self.binary(0)
            self.expect(")")
            return inner
        if self.at("{"):
            self.matchers()
            return Parsed("selector")
        if kind != "ident" or value in _KEYWORDS:
            raise self.fail("expected an expression")
        self.take()
        if value in AGGREGATIONS and (self.at("(") or self.at("by", "without")):
            return self.aggregation(value)
        if self.at("("):
            return self.call(value)
        if self.at("{"):
            self.matchers()
        return Parsed("selector", {value})

    def aggregation(self, name: str) -> Parsed:
        grouped = False
        if self.at("by", "without"):
            self.take()
            self.labels()
            grouped = True
        args = self.arguments()
        if not grouped and self.at("by", "without"):
            self.take()
            self.labels()
        takes_parameter = name in ("count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio")
        if len(args) != (2 if takes_parameter else 1):
            raise self.fail(f"{name} takes {2 if takes_parameter else 1} argument(s)")
        if args[-1].kind != "vector":
            raise self.fail(f"{name} of a {args[-1].kind} (an instant vector is needed)")
        return Parsed("vector", set().union(*(a.metrics for a in args)))

    def call(self, name: str) -> Parsed:
        if name not in _RANGE_FUNCTIONS | _INSTANT_FUNCTIONS:
            raise self.fail(f"unknown function {name!r}")
        args = self.arguments()
        if name in _RANGE_FUNCTIONS and not any(a.kind == "matrix" for a in args):
            raise self.fail(f"{name} needs a range vector")
        if name in _INSTANT_FUNCTIONS and any(a.kind == "matrix" for a in args):
            raise self.fail(f"{name} of a range vector")
        if name == "histogram_quantile" and (len(args) != 2 or args[1].kind != "vector"):
            raise self.fail("histogram_quantile(φ scalar, buckets vector)")
        return Parsed(
            "scalar" if name in _SCALAR_RESULT else "vector", set().union(*(a.metrics for a in args))
        )

    def arguments(self) -> list[Parsed]:
        self.expect("(")
        args: list[Parsed] = []
        while not self.at(")"):
            args.append(self.binary(0))
            if not self.at(")"):
                self.expect(",")
        self.expect(")")
        return args

    def labels(self) -> None:
        self.expect("(")
        while not self.at(")"):
            kind, value, _ = self.take()
            if kind != "ident" or ":" in value:
                self.i -= 1
                raise self.fail("expected a label name")
            if not self.at(")"):
                self.expect(",")
        self.expect(")")

    def matchers(self) -> None:
        self.expect("{")
        while not self.at("}"):
            kind, value, _ = self.take()
            if kind != "ident" or ":" in value:
                self.i -= 1
                raise self.fail("expected a label name")
            if not self.at("=", "!=", "=~", "!~"):
                raise self.fail("expected a label matcher operator")
            op = self.take()[1]
            kind, literal, _ = self.take()
            if kind != "string":
                self.i -= 1
                raise self.fail("expected a quoted label value")
            if op in ("=~", "!~"):
                try:
                    re.compile(literal[1:-1])
                except re.error as e:
                    raise self.fail(f"bad regular expression ({e})") from None
            if not self.at("}"):
                self.expect(",")
        self.expect("}")
