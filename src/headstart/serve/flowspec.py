"""The plain description of a TaskFlow: tasks, groups, `given:` conditions and thresholds, in pure Python.

This is the one home of the flow's spec (parsing, validation, the condition language): `headstart.flow` builds its
torch TaskFlow on these classes (TaskFlow is a FlowSpec, Task a TaskSpec), and `headstart.serve` decodes with them
without torch.

`given:` grammar (`~` binds tighter than `&`)::

    expr  := unary ("&" unary)*
    unary := "~" unary | "(" expr ")" | NAME
    NAME  := [A-Za-z_][A-Za-z0-9_]* ("." [A-Za-z_][A-Za-z0-9_]*)*

Evaluation is three-valued (Kleene): a reference to task `p` is true where p's label is known, p applies and p is
true; false where p's label is known, p applies and p is false; unknown everywhere else. `~` swaps true and false and
leaves unknown alone, `&` is false if either side is false. A condition holds only where it is true, so an unknown
never becomes true. Masks are any boolean arrays supporting `&`, `|` and `~` (numpy arrays, torch tensors).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

SUPPORTED_KINDS = ("binary", "multiclass", "multilabel", "bounded_regression", "regression")
DISCRETE_KINDS = ("binary", "multiclass", "multilabel")
REGRESSION_LOSSES = ("mse", "l1", "smooth_l1")
TASK_KEYS = ("kind", "classes", "scale", "loss", "weight", "given")
SCALAR_KINDS = ("binary", "bounded_regression", "regression")

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)|(?P<op>[~&()]))")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GROUP_KEYS = ("given", "tasks")

M = TypeVar("M")  # a boolean mask type: numpy array or torch tensor


class FlowSpecError(ValueError):
    """A flow specification is malformed (unknown kind, missing classes, bad weight, bad condition)."""


class ConditionSyntaxError(ValueError):
    """A `given:` expression does not parse."""


# ---- conditions -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """A reference to a binary task by path."""

    path: str


@dataclass(frozen=True)
class Not:
    operand: Condition


@dataclass(frozen=True)
class And:
    left: Condition
    right: Condition


Condition = Ref | Not | And


def parse(text: str) -> Condition:
    """Parse a `given:` expression; raise ConditionSyntaxError with the position of the problem."""
    if not isinstance(text, str) or not text.strip():
        raise ConditionSyntaxError(f"expected an expression, got {text!r}")
    tokens = _tokenize(text)
    parser = _Parser(tokens, text)
    cond = parser.expr()
    if parser.pos != len(tokens):
        raise ConditionSyntaxError(f"unexpected {tokens[parser.pos]!r} in {text!r}")
    return cond


def names(cond: Condition) -> list[str]:
    """The task paths a condition refers to, in order of appearance, without repeats."""
    out: list[str] = []

    def walk(c: Condition) -> None:
        if isinstance(c, Ref):
            if c.path not in out:
                out.append(c.path)
        elif isinstance(c, Not):
            walk(c.operand)
        else:
            walk(c.left)
            walk(c.right)

    walk(cond)
    return out


def truth(cond: Condition, ref: Callable[[str], tuple[M, M]]) -> tuple[M, M]:
    """(true, false) bool masks of a condition; `ref(path)` gives them for one task. Neither mask = unknown."""
    if isinstance(cond, Ref):
        return ref(cond.path)
    if isinstance(cond, Not):
        true, false = truth(cond.operand, ref)
        return false, true
    lt, lf = truth(cond.left, ref)
    rt, rf = truth(cond.right, ref)
    return lt & rt, lf | rf


def to_text(cond: Condition) -> str:
    """A canonical text form (round-trips through `parse`)."""
    if isinstance(cond, Ref):
        return cond.path
    if isinstance(cond, Not):
        inner = to_text(cond.operand)
        return f"~{inner}" if isinstance(cond.operand, Ref | Not) else f"~({inner})"
    return f"{to_text(cond.left)} & {to_text(cond.right)}"


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            bad = text[pos:].lstrip()[0]
            raise ConditionSyntaxError(f"unexpected character {bad!r} in {text!r}")
        tokens.append(m.group("name") or m.group("op"))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[str], text: str) -> None:
        self.tokens, self.text, self.pos = tokens, text, 0

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self) -> Condition:
        cond = self.unary()
        while self._peek() == "&":
            self.pos += 1
            cond = And(cond, self.unary())
        return cond

    def unary(self) -> Condition:
        tok = self._peek()
        if tok is None:
            raise ConditionSyntaxError(f"unexpected end of {self.text!r}")
        self.pos += 1
        if tok == "~":
            return Not(self.unary())
        if tok == "(":
            cond = self.expr()
            if self._peek() != ")":
                raise ConditionSyntaxError(f"missing ')' in {self.text!r}")
            self.pos += 1
            return cond
        if tok in ("&", ")"):
            raise ConditionSyntaxError(f"unexpected {tok!r} in {self.text!r}")
        return Ref(tok)


# ---- tasks ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One leaf of a flow, as plain data.

    `path` is dotted (`person.shirt`); `classes` names the outputs of multiclass and multilabel tasks; `given` is the
    task's own condition text (enclosing groups' conditions live in the flow); `groups` are the paths of the
    enclosing groups, outermost first.
    """

    path: str
    kind: str
    classes: tuple[str, ...] = field(default_factory=tuple)
    weight: float = 1.0
    scale: float | None = None
    regression_loss: str | None = None
    given: str | None = None
    groups: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_spec(cls, path: str, spec: dict, groups: tuple[str, ...] = ()) -> Any:
        kind = spec.get("kind")
        if kind not in SUPPORTED_KINDS:
            raise FlowSpecError(
                f"task '{path}': kind {kind!r} is not supported; supported kinds: {', '.join(SUPPORTED_KINDS)}"
            )
        unknown = set(spec) - set(TASK_KEYS)
        if unknown:
            raise FlowSpecError(
                f"task '{path}': unknown keys {sorted(unknown)}; allowed: {', '.join(TASK_KEYS)}"
            )
        classes: tuple[str, ...] = ()
        if kind in ("multiclass", "multilabel"):
            raw = spec.get("classes")
            if isinstance(raw, int) and not isinstance(raw, bool):
                raw = [str(i) for i in range(raw)]
            minimum = 2 if kind == "multiclass" else 1
            if not isinstance(raw, Sequence) or isinstance(raw, str) or len(raw) < minimum:
                raise FlowSpecError(
                    f"task '{path}': a {kind} task needs 'classes' (a list of names or a count >= {minimum})"
                )
            classes = tuple(str(c) for c in raw)
            if len(set(classes)) != len(classes):
                raise FlowSpecError(f"task '{path}': class names repeat in {list(classes)}")
        elif "classes" in spec:
            raise FlowSpecError(f"task '{path}': 'classes' is only for multiclass and multilabel tasks")
        scale = None
        if kind == "bounded_regression":
            try:
                scale = float(spec["scale"])
            except (KeyError, TypeError, ValueError):
                raise FlowSpecError(
                    f"task '{path}': a bounded_regression task needs a positive number 'scale' "
                    f"(targets lie in [0, scale]), got {spec.get('scale')!r}"
                ) from None
            if not scale > 0:
                raise FlowSpecError(f"task '{path}': 'scale' must be > 0, got {scale}")
        elif "scale" in spec:
            raise FlowSpecError(f"task '{path}': 'scale' is only for bounded_regression tasks")
        regression_loss = None
        if kind == "regression":
            regression_loss = spec.get("loss", "mse")
            if regression_loss not in REGRESSION_LOSSES:
                raise FlowSpecError(
                    f"task '{path}': loss {regression_loss!r} is not one of {', '.join(REGRESSION_LOSSES)}"
                )
        elif "loss" in spec:
            raise FlowSpecError(f"task '{path}': 'loss' is only for regression tasks")
        try:
            weight = float(spec.get("weight", 1.0))
        except (TypeError, ValueError):
            raise FlowSpecError(
                f"task '{path}': weight must be a number, got {spec.get('weight')!r}"
            ) from None
        if not weight >= 0:
            raise FlowSpecError(f"task '{path}': weight must be >= 0, got {weight}")
        given = spec.get("given")
        if given is not None and not isinstance(given, str):
            raise FlowSpecError(f"task '{path}': 'given' must be an expression string, got {given!r}")
        return cls(
            path=path,
            kind=kind,
            classes=classes,
            weight=weight,
            scale=scale,
            regression_loss=regression_loss,
            given=given,
            groups=tuple(groups),
        )

    def to_spec(self) -> dict:
        spec: dict = {"kind": self.kind}
        if self.classes:
            spec["classes"] = list(self.classes)
        if self.scale is not None:
            spec["scale"] = self.scale
        if self.regression_loss is not None:
            spec["loss"] = self.regression_loss
        spec["weight"] = self.weight
        if self.given is not None:
            spec["given"] = self.given
        return spec

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.kind in ("multiclass", "multilabel") else 1

    @property
    def has_threshold(self) -> bool:
        return self.kind in ("binary", "multilabel")

    def default_threshold(self) -> float | list[float] | None:
        if self.kind == "binary":
            return 0.5
        if self.kind == "multilabel":
            return [0.5] * len(self.classes)
        return None


@dataclass(frozen=True)
class Group:
    """A group of tasks sharing a condition (`given`, None for none)."""

    path: str
    given: str | None = None


@dataclass(frozen=True)
class Clause:
    """One condition a task must satisfy: its own `given`, or that of an enclosing group (`owner`)."""

    owner: str
    text: str
    cond: Condition


# ---- the flow ---------------------------------------------------------------------------------------------------------


class FlowSpec:
    """Tasks declared as nested `tasks:` mappings; leaves in declaration order; validated on construction.

    A task applies on a sample where its label is present, its own `given` holds and every enclosing group's `given`
    holds. `thresholds` holds the decision threshold of every binary task (float) and multilabel task (one per
    class). Subclasses set `task_class` to build their own kind of task from a spec.
    """

    task_class: ClassVar[type[TaskSpec]] = TaskSpec

    def __init__(
        self,
        tasks: list[TaskSpec],
        groups: list[Group] | None = None,
        thresholds: Mapping[str, float | list[float]] | None = None,
    ) -> None:
        if not tasks:
            raise FlowSpecError("a flow needs at least one task")
        self.tasks: dict[str, Any] = {}
        for t in tasks:
            if t.path in self.tasks:
                raise FlowSpecError(f"task '{t.path}' is declared twice")
            self.tasks[t.path] = t
        self.groups: dict[str, Group] = {g.path: g for g in groups or []}
        for t in tasks:
            missing = [g for g in t.groups if g not in self.groups]
            if missing:
                raise FlowSpecError(f"task '{t.path}': unknown group {missing[0]!r}")
        self._clauses = {path: self._parse_clauses(task) for path, task in self.tasks.items()}
        self.order = self._check_cycles()
        self.thresholds: dict[str, float | list[float]] = {
            p: t.default_threshold() for p, t in self.tasks.items() if t.has_threshold
        }
        for path, value in (thresholds or {}).items():
            self._set_threshold(path, value)

    @classmethod
    def from_spec(cls, spec: Mapping) -> Any:
        """Build a flow from `{"tasks": {...}}` (nested groups allowed) and optional `"thresholds": {path: ...}`."""
        if not isinstance(spec, Mapping) or "tasks" not in spec:
            raise FlowSpecError("a flow spec is a mapping with a 'tasks' key")
        tasks: list[TaskSpec] = []
        groups: list[Group] = []
        _walk(spec["tasks"], "", (), tasks, groups, cls.task_class)
        thresholds = spec.get("thresholds") or {}
        if not isinstance(thresholds, Mapping):
            raise FlowSpecError(f"'thresholds' must map task paths to thresholds, got {thresholds!r}")
        return cls(tasks, groups, thresholds)

    def to_spec(self) -> dict:
        """The nested spec (plain data), with the thresholds that differ from their default."""
        root: dict = {}
        for task in self.tasks.values():
            node = root
            for gpath in task.groups:
                name = gpath.rsplit(".", 1)[-1]
                if name not in node:
                    given = self.groups[gpath].given
                    node[name] = ({"given": given} if given is not None else {}) | {"tasks": {}}
                node = node[name]["tasks"]
            node[task.name] = task.to_spec()
        spec: dict = {"tasks": root}
        tuned = {
            p: plain_threshold(v)
            for p, v in self.thresholds.items()
            if plain_threshold(v) != self.tasks[p].default_threshold()
        }
        if tuned:
            spec["thresholds"] = tuned
        return spec

    def state(self) -> dict:
        """What training learns besides weights (the thresholds), as plain data for a checkpoint."""
        return {"thresholds": {p: plain_threshold(v) for p, v in self.thresholds.items()}}

    def load_state(self, state: Mapping) -> None:
        for path, value in (state.get("thresholds") or {}).items():
            self._set_threshold(path, value)

    @property
    def leaf_paths(self) -> list[str]:
        return list(self.tasks)

    @property
    def conditional(self) -> bool:
        """Whether any task carries a condition (its own or a group's)."""
        return any(self._clauses.values())

    def condition_text(self, path: str) -> str | None:
        """The whole condition of a task (groups' and its own, joined with `&`), or None."""
        texts = [c.text if len(self._clauses[path]) == 1 else f"({c.text})" for c in self._clauses[path]]
        return " & ".join(texts) if texts else None

    def depends_on(self, path: str) -> list[str]:
        """The binary tasks a task's condition (groups' included) refers to, in order of appearance."""
        out: list[str] = []
        for clause in self._clauses[path]:
            out += [n for n in names(clause.cond) if n not in out]
        return out

    def holds(self, present: Mapping[str, M], value: Mapping[str, M]) -> dict[str, M]:
        """{path: bool[N]} where each task's condition (groups' included) is true, given where each task's label
        is `present` and the `value` of each binary task (ground truth or thresholded predictions)."""
        result: dict[str, M] = {}

        def ref(p: str) -> tuple[M, M]:
            known = present[p] & result[p]
            return known & value[p], known & ~value[p]

        for path in self.order:
            h = present[path] | ~present[path]  # all true, of the mask type and device given
            for clause in self._clauses[path]:
                h = h & truth(clause.cond, ref)[0]
            result[path] = h
        return result

    # ---- validation -------------------------------------------------------------------------------------------------

    def _set_threshold(self, path: str, value: float | list[float]) -> None:
        task = self.tasks.get(path)
        if task is None or not task.has_threshold:
            raise FlowSpecError(f"thresholds: '{path}' is not a binary or multilabel task of this flow")
        if task.kind == "binary":
            ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0
            value = float(value) if ok else value
        else:
            ok = (
                isinstance(value, Sequence) and not isinstance(value, str) and len(value) == len(task.classes)
            )
            ok = ok and all(isinstance(v, int | float) and 0.0 <= float(v) <= 1.0 for v in value)
            value = [float(v) for v in value] if ok else value
        if not ok:
            raise FlowSpecError(
                f"thresholds: '{path}' needs {'a number' if task.kind == 'binary' else 'one number per class'}"
                f" in [0, 1], got {value!r}"
            )
        self.thresholds[path] = value

    def _parse_clauses(self, task: TaskSpec) -> list[Clause]:
        sources = [
            (f"group '{g}'", self.groups[g].given) for g in task.groups if self.groups[g].given is not None
        ]
        if task.given is not None:
            sources.append((f"task '{task.path}'", task.given))
        clauses = []
        for owner, text in sources:
            where = owner if owner.startswith("task") else f"task '{task.path}' (in {owner})"
            try:
                cond = parse(text)
            except ConditionSyntaxError as e:
                raise FlowSpecError(f"{where}: bad condition given: {text!r}: {e}") from None
            for name in names(cond):
                if name not in self.tasks:
                    hint = " (a group, not a task)" if name in self.groups else ""
                    raise FlowSpecError(
                        f"{where}: condition given: {text!r} refers to unknown task '{name}'{hint}; "
                        f"tasks: {', '.join(self.tasks)}"
                    )
                if self.tasks[name].kind != "binary":
                    raise FlowSpecError(
                        f"{where}: condition given: {text!r} refers to '{name}', a {self.tasks[name].kind} "
                        "task; conditions may only refer to binary tasks"
                    )
            clauses.append(Clause(owner, text, cond))
        return clauses

    def _check_cycles(self) -> list[str]:
        """A topological order of the tasks (dependencies first); FlowSpecError naming a cycle if there is one."""
        order: list[str] = []
        state: dict[str, int] = {}  # 1: on the stack, 2: done

        def visit(path: str, stack: list[str]) -> None:
            if state.get(path) == 2:
                return
            if state.get(path) == 1:
                cycle = [*stack[stack.index(path) :], path]
                first = cycle[0]
                raise FlowSpecError(
                    f"task '{first}': condition given: {self.condition_text(first)!r} makes a cycle: "
                    + " -> ".join(cycle)
                )
            state[path] = 1
            for dep in self.depends_on(path):
                visit(dep, [*stack, path])
            state[path] = 2
            order.append(path)

        for path in self.tasks:
            visit(path, [])
        return order


def plain_threshold(value: float | list[float] | None) -> float | list[float] | None:
    """A threshold as plain data (a list, not a tuple or array, for multilabel)."""
    return list(value) if isinstance(value, Sequence) else value


def _walk(
    spec: Mapping,
    prefix: str,
    enclosing: tuple[str, ...],
    tasks: list[TaskSpec],
    groups: list[Group],
    task_class: type[TaskSpec],
) -> None:
    """Collect leaves (declaration order) and groups from a nested `tasks:` mapping."""
    where = f"group '{prefix[:-1]}'" if prefix else "'tasks'"
    if not isinstance(spec, Mapping) or not spec:
        raise FlowSpecError(f"{where}: expected a non-empty mapping of tasks")
    for name, node in spec.items():
        path = f"{prefix}{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise FlowSpecError(
                f"task '{path}': a task or group name is letters, digits and '_' (not starting with a digit); "
                "nest groups instead of writing dots"
            )
        if not isinstance(node, Mapping):
            raise FlowSpecError(f"task '{path}': expected a mapping with 'kind', got {node!r}")
        if "tasks" in node:
            unknown = set(node) - set(_GROUP_KEYS)
            if unknown:
                raise FlowSpecError(
                    f"group '{path}': unknown keys {sorted(unknown)}; a group has only 'given' and 'tasks'"
                )
            given = node.get("given")
            if given is not None and not isinstance(given, str):
                raise FlowSpecError(f"group '{path}': 'given' must be an expression string, got {given!r}")
            groups.append(Group(path, given))
            _walk(node["tasks"], f"{path}.", (*enclosing, path), tasks, groups, task_class)
        else:
            tasks.append(task_class.from_spec(path, dict(node), groups=enclosing))
