"""`given:` expressions (a task path, `~`, `&`, parentheses): the parser lives in `headstart.serve.flowspec`, the one
home of the flow's spec, so that serving decodes without torch; this module names it for the flow."""

from headstart.serve.flowspec import (
    And,
    Condition,
    ConditionSyntaxError,
    Not,
    Ref,
    evaluate,
    names,
    parse,
    to_text,
)

__all__ = ["And", "Condition", "ConditionSyntaxError", "Not", "Ref", "evaluate", "names", "parse", "to_text"]
