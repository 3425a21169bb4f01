"""Which TensorRT names a module uses, found by reading its AST (tests/test_tensorrt_api.py checks them).

A value is a TensorRT value when it is:
- the module itself: `import tensorrt [as X]`, a call to `import_tensorrt()`, or a parameter named `trt`;
- a parameter or function result annotated with a `trt.X` type (annotations are how the modules
  mark TensorRT objects passed around, under `if TYPE_CHECKING: import tensorrt as trt`);
- an attribute, call, subscript or iteration of a TensorRT value (`builder.create_network(...)`);
- a name, `self.attr` or tuple element assigned from one of the above.
A use is every attribute read or written on a TensorRT value (`getattr`/`hasattr` with a constant
name included), and every method a class derived from a TensorRT class defines (an override must
match a TensorRT name). Flow-insensitive and iterated to a fixed point: it may over-collect, which
can only make the conformance test stricter.
"""

from __future__ import annotations

import ast

IMPORTERS = {"import_tensorrt"}


class _Collector(ast.NodeVisitor):
    def __init__(self) -> None:
        self.scopes: dict[int, set[str]] = {}      # id(function node) or 0 (module) -> TensorRT names
        self.self_attrs: dict[str, set[str]] = {}  # class name -> self attributes holding TensorRT values
        self.returns: set[str] = set(IMPORTERS)    # functions whose result is a TensorRT value
        self.uses: set[str] = set()
        self._stack: list[int] = [0]
        self._classes: list[str] = []

    def size(self) -> int:
        return (sum(map(len, self.scopes.values())) + sum(map(len, self.self_attrs.values())) + len(self.returns)
                + len(self.uses))

    def _scope(self) -> set[str]:
        return self.scopes.setdefault(self._stack[-1], set())

    def is_trt(self, node: ast.AST | None) -> bool:
        if isinstance(node, ast.Name):
            return any(node.id in self.scopes.get(s, ()) for s in self._stack)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and self._classes:
                return node.attr in self.self_attrs.get(self._classes[-1], ())
            return self.is_trt(node.value)
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name in ("getattr",) and node.args:
                return self.is_trt(node.args[0])
            if name in self.returns and (isinstance(func, ast.Name) or _on_self(func)):
                return True
            return self.is_trt(func)
        if isinstance(node, ast.Subscript):
            return self.is_trt(node.value)
        if isinstance(node, ast.BinOp):
            return self.is_trt(node.left) or self.is_trt(node.right)
        if isinstance(node, (ast.ListComp, ast.GeneratorExp, ast.SetComp)):
            return self.is_trt(node.elt)
        return False

    def mentions_trt(self, annotation: ast.AST | None) -> bool:
        """An annotation naming a TensorRT type anywhere (`trt.ITimingCache | None`, `tuple[trt.X, ...]`)."""
        return annotation is not None and any(isinstance(n, ast.Attribute) and self.is_trt(n.value)
                                              for n in ast.walk(annotation))

    def _bind(self, target: ast.AST) -> None:
        if isinstance(target, ast.Name):
            self._scope().add(target.id)
        elif isinstance(target, ast.Attribute) and _on_self(target) and self._classes:
            self.self_attrs.setdefault(self._classes[-1], set()).add(target.attr)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._bind(t)

    def _assign(self, target: ast.AST, value: ast.AST) -> None:
        if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)) \
                and len(target.elts) == len(value.elts):
            for t, v in zip(target.elts, value.elts):
                self._assign(t, v)
        elif self.is_trt(value):
            self._bind(target)

    # --- visitors -------------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "tensorrt":
                self._scope().add(alias.asname or "tensorrt")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "tensorrt":
            for alias in node.names:
                self.uses.add(alias.name)
                self._scope().add(alias.asname or alias.name)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            self._assign(target, node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self._assign(node.target, node.value)
        if self.mentions_trt(node.annotation):
            self._bind(node.target)
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        if self.is_trt(node.iter):
            self._bind(node.target)
        self.generic_visit(node)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        if self.is_trt(node.iter):
            self._bind(node.target)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if not (_on_self(node) and self._classes) and self.is_trt(node.value):
            self.uses.add(node.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name in ("getattr", "hasattr", "setattr") and len(node.args) >= 2 and self.is_trt(node.args[0]) \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            self.uses.add(node.args[1].value)
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for d in node.decorator_list + [a.annotation for a in _all_args(node.args)] + [node.returns]:
            if d is not None:
                self.visit(d)
        if self.mentions_trt(node.returns):
            self.returns.add(node.name)
        args = [(a.arg, self.mentions_trt(a.annotation)) for a in _all_args(node.args)]
        self._stack.append(id(node))
        scope = self._scope()
        scope.update(name for name, typed in args if typed or name == "trt")
        for stmt in node.body:
            self.visit(stmt)
        self._stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for base in node.bases:
            self.visit(base)
        if any(self.is_trt(b) for b in node.bases):  # an override must be a TensorRT method
            self.uses.update(s.name for s in node.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)))
        self._classes.append(node.name)
        for stmt in node.body:
            self.visit(stmt)
        self._classes.pop()


def _on_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"


def _all_args(args: ast.arguments) -> list[ast.arg]:
    return [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, (args.vararg, args.kwarg))]


def tensorrt_uses(source: str) -> set[str]:
    """Every TensorRT attribute name `source` uses (see the module docstring)."""
    tree = ast.parse(source)
    collector = _Collector()
    before = -1
    while before != collector.size():
        before = collector.size()
        collector.visit(tree)
    return collector.uses


def identifiers(source: str) -> set[str]:
    """Every attribute name, identifier and identifier-like string constant in `source`."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            out.add(node.value)
    return out
