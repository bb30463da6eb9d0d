"""A flow's structure from its source, without running any of it: what an editor draws as the user types.

The file is parsed, never imported (an editor's buffer is half-written, and
its module code could do anything), and each ``@step`` method goes through
Metaflow's own graph parser (``DAGNode``: ``self.next`` read as Metaflow
reads it, branches, foreach, switches) and ``FlowGraph``'s traversal (joins
matched, steps in order, what runs per foreach item). Decorators and
parameters come from the source as written: badges and a launch form need
their names and defaults, not their objects.
"""

from __future__ import annotations

import ast
from typing import Any

from metaflow_stack.errors import InvalidInput

#: Steps a flow may have at most (a buffer with more is not drawn; the editor says why).
MAX_STEPS = 1_000
#: Steps Metaflow's traversal may visit: it walks every path from ``start`` (joins after each split or foreach
#: are walked once per path), which doubles with each split and join in a row: 20 of them, 5 KB of source,
#: took 11 s. Real flows visit hundreds.
MAX_VISITS = 20_000


def _flow_class(tree: ast.Module) -> ast.ClassDef | None:
    """The module's flow: the last class deriving from ``FlowSpec`` (by name, as written)."""
    found = [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and any(ast.unparse(base).split(".")[-1] == "FlowSpec" for base in node.bases)
    ]
    return found[-1] if found else None


def _decorator_name(decorator: ast.expr) -> str:
    return ast.unparse(decorator.func if isinstance(decorator, ast.Call) else decorator).split(".")[-1]


def _is_step(node: ast.stmt) -> bool:
    return isinstance(node, ast.FunctionDef) and any(_decorator_name(d) == "step" for d in node.decorator_list)


def _parameter(node: ast.stmt) -> dict[str, Any] | None:
    """``x = Parameter("x", default=..., type=..., help=...)`` as written (its values as source text)."""
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.value, ast.Call)):
        return None
    kind = _decorator_name(node.value)
    if kind not in ("Parameter", "IncludeFile", "Config"):
        return None
    keywords = {k.arg: ast.unparse(k.value) for k in node.value.keywords if k.arg}
    named = node.value.args[0] if node.value.args else None
    return {
        "attribute": ast.unparse(node.targets[0]),
        "name": named.value if isinstance(named, ast.Constant) and isinstance(named.value, str) else None,
        "kind": kind,
        "default": keywords.get("default"),
        "type": keywords.get("type"),
        "help": _literal_text(node.value.keywords, "help"),
        "required": keywords.get("required") == "True",
        "line": node.lineno,
    }


def _literal_text(keywords: list[ast.keyword], name: str) -> str | None:
    value = next((k.value for k in keywords if k.arg == name), None)
    return value.value if isinstance(value, ast.Constant) and isinstance(value.value, str) else None


def _graph(name: str, steps: list[ast.FunctionDef], path: str, doc: str | None) -> Any:
    """Metaflow's ``FlowGraph`` over nodes made from the source (its own parser; nothing imported)."""
    from metaflow.graph import DAGNode, FlowGraph

    class SourceGraph(FlowGraph):
        def __init__(self) -> None:  # FlowGraph's own steps, from nodes it did not have to import
            self.name = name
            self.nodes = {
                step.name: DAGNode(
                    step,
                    [],
                    [],
                    [],
                    ast.get_docstring(step),
                    path,
                    1,
                    is_start_step=step.name == "start",
                    is_end_step=step.name == "end",
                )
                for step in steps
            }
            self.doc = doc or ""
            self.sorted_nodes = []
            self._identify_start_end()
            _within_visits(self.nodes, self.start_step, path)
            self._traverse_graph()
            self._postprocess()

    return SourceGraph()


def _within_visits(nodes: dict[str, Any], start: str | None, path: str) -> None:
    """Count the visits ``FlowGraph._traverse_graph`` would make (each path from ``start``, a step at most once
    in a path, unknown steps skipped), stopping at ``MAX_VISITS``: past it, ``InvalidInput`` rather than a walk
    that could take hours."""
    if start is None or start not in nodes:
        return
    visits, stack = 0, [(start, frozenset())]  # (as Metaflow: start itself is not yet seen)
    while stack:
        name, seen = stack.pop()
        visits += 1
        if visits > MAX_VISITS:
            raise InvalidInput(path, f"has over {MAX_VISITS:,} paths through its steps", fix="an editor draws fewer")
        stack.extend((out, seen | {out}) for out in nodes[name].out_funcs if out not in seen and out in nodes)


def flow_graph(source: str, path: str = "<buffer>") -> dict[str, Any]:
    """The flow ``source`` defines: its name, doc, parameters and steps (type, next steps, line, doc,
    decorators, foreach artifact, matching join, whether it runs per foreach item), steps in the order they
    run; ``InvalidInput`` naming the line when the source does not parse or defines no flow."""
    try:
        return _flow_graph(source, path)
    except (RecursionError, MemoryError, ValueError) as exc:  # a source built to exhaust the parser
        raise InvalidInput("source", f"cannot be read as a flow ({type(exc).__name__})") from None


def _flow_graph(source: str, path: str) -> dict[str, Any]:
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as exc:
        where = f"line {exc.lineno}" if exc.lineno else "the source"
        raise InvalidInput(where, exc.msg or "is not Python", fix="finish the line") from None
    flow = _flow_class(tree)
    if flow is None:
        raise InvalidInput(path, "defines no FlowSpec class", fix="class MyFlow(FlowSpec): with @step methods")
    steps = [node for node in flow.body if _is_step(node)]
    if len(steps) > MAX_STEPS:
        raise InvalidInput(path, f"has {len(steps):,} steps", fix=f"an editor draws at most {MAX_STEPS:,}")
    graph = _graph(flow.name, steps, path, ast.get_docstring(flow))
    by_name = {step.name: step for step in steps}
    order = graph.sorted_nodes + sorted(name for name in by_name if name not in graph.sorted_nodes)
    drawn = {}
    for step_name in order:
        node, step = graph[step_name], by_name[step_name]
        drawn[step_name] = {
            "type": _type(node),
            "next": list(node.out_funcs),
            "line": step.lineno,
            "doc": node.doc or None,
            "decorators": [_decorator_name(d) for d in step.decorator_list if _decorator_name(d) != "step"],
            # Metaflow's parser keeps whatever constant was written (``foreach=b"x"``, ``...``, ``1e999``);
            # only a name is an artifact, and only a name is sure to be JSON.
            "foreach_artifact": node.foreach_param if isinstance(node.foreach_param, str) else None,
            "matching_join": node.matching_join,
            "inside_foreach": node.is_inside_foreach,
            "reachable": step_name in graph.sorted_nodes,
            "invalid_next": node.invalid_tail_next or (not node.has_tail_next and step_name != graph.end_step),
        }
    parameters = [found for found in map(_parameter, flow.body) if found is not None]
    return {
        "flow": flow.name,
        "line": flow.lineno,
        "doc": graph.doc or None,
        "decorators": [_decorator_name(d) for d in flow.decorator_list],
        "parameters": parameters,
        "start_step": graph.start_step,
        "end_step": graph.end_step,
        "steps": drawn,
    }


def _type(node: Any) -> str:
    """The step's type as Metaflow records it in ``_graph_info`` (``split-static``, ``split-foreach``...)."""
    kinds = {"split": "split-static", "foreach": "split-parallel" if node.parallel_foreach else "split-foreach"}
    return kinds.get(node.type, node.type or "unknown")
