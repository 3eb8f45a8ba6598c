"""A class's ``__init__`` signature read from its source file, without importing its module.

``flora`` checks a config before torch and friends are imported (:mod:`flora_lightning.config_check`),
but the classes whose signatures are the config (``FederatedLoop``, ``FederatedDataModule``, the
methods) live in modules that import them. This module reads such a signature from the source
(the same text jsonargparse reads after the import: one source of truth) and builds a stand-in
function with the same parameters, types, defaults and docstring for a jsonargparse parser.

Names in annotations and defaults are resolved as the module would resolve them: by importing
where that import is light, else by following the import or assignment in the source
(``Precision = Literal[...]``, a re-export). A name that only a heavy module defines (e.g.
``Strategy``) resolves to :data:`OPAQUE` (``typing.Any``): that parameter accepts anything here
and is checked by the full parser.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import importlib.util
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE = "flora_lightning"
PACKAGE_DIR = Path(__file__).resolve().parent
OPAQUE = Any
"""What a name resolves to when only a heavy module defines it."""


@dataclass
class SourceSignature:
    """The stand-in for a class's ``__init__`` and what could not be resolved light."""

    function: typing.Callable
    """A function with the ``__init__``'s parameters (without ``self``), types, defaults and the
    class docstring (its ``Args:`` section is the help), for ``add_function_arguments``."""
    opaque: set[str] = field(default_factory=set)
    """Parameters whose type names a class that only a heavy module defines."""


def module_file(module: str) -> Path | None:
    """The source file of ``module`` (this package's without importing anything)."""
    if module == PACKAGE or module.startswith(PACKAGE + "."):
        base = PACKAGE_DIR.joinpath(*module.split(".")[1:])
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and origin.endswith(".py") else None


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - node.level + 1]
    return ".".join([*parts, node.module] if node.module else parts)


class _ModuleSource:
    """Top-level names of one module's source: imports, assignments, classes."""

    def __init__(self, module: str):
        self.module = module
        self.path = module_file(module)
        self.tree = ast.parse(self.path.read_text()) if self.path else ast.Module([], [])
        is_package = self.path is not None and self.path.name == "__init__.py"
        self.imports: dict[str, tuple[str, str | None]] = {}  # name -> (module, attribute)
        self.assigned: dict[str, ast.expr] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        for node in self.tree.body:
            if isinstance(node, ast.ImportFrom):
                source = _absolute(module, node, is_package)
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = (source, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name if alias.asname else alias.name.split(".")[0]
                    self.imports[alias.asname or top] = (top, None)
            elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                if isinstance(node.targets[0], ast.Name):
                    self.assigned[node.targets[0].id] = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if node.value is not None:
                    self.assigned[node.target.id] = node.value
            elif isinstance(node, ast.ClassDef):
                self.classes[node.name] = node


class Resolver:
    """Resolves names as a module's own code would, importing only what imports light."""

    def __init__(self):
        self._sources: dict[str, _ModuleSource] = {}
        self._modules: dict[str, Any] = {}

    def source(self, module: str) -> _ModuleSource:
        if module not in self._sources:
            self._sources[module] = _ModuleSource(module)
        return self._sources[module]

    def _import(self, module: str):
        """The module, or None where importing it needs a library that is not imported here."""
        if module not in self._modules:
            try:
                self._modules[module] = importlib.import_module(module)
            except ImportError:
                self._modules[module] = None
        return self._modules[module]

    def _light(self, value: Any) -> Any:
        """``value``, or :data:`OPAQUE` for a class whose module or one of its packages does
        not import here (a parser imports each of them to name the class)."""
        module = getattr(value, "__module__", None) if isinstance(value, type) else None
        if module:
            parts = module.split(".")
            for end in range(1, len(parts) + 1):
                if self._import(".".join(parts[:end])) is None:
                    return OPAQUE
        return value

    def name(self, module: str, name: str, depth: int = 0) -> Any:
        """``module.name`` as an object, or :data:`OPAQUE`."""
        if depth > 20:
            return OPAQUE
        if hasattr(builtins, name) and name not in self.source(module).imports:
            return getattr(builtins, name)
        loaded = self._import(module)
        if loaded is not None:
            return self._light(getattr(loaded, name, OPAQUE))
        source = self.source(module)
        if name in source.imports:
            target, attribute = source.imports[name]
            if attribute is None:
                return self._import(target) or OPAQUE
            if self.source(target).path is None or target == PACKAGE:
                loaded = self._import(target)
                return self._light(getattr(loaded, attribute, OPAQUE)) if loaded else OPAQUE
            return self.name(target, attribute, depth + 1)
        if name in source.assigned:
            return self.evaluate(module, source.assigned[name], depth + 1)
        return OPAQUE  # a class or function of a module that is not imported here

    def evaluate(self, module: str, node: ast.expr, depth: int = 0) -> Any:
        """The value of expression ``node`` in ``module``'s namespace (light names only)."""
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        namespace = {n: self.name(module, n, depth) for n in names}
        return eval(compile(ast.Expression(node), "<annotation>", "eval"), namespace)  # noqa: S307


def _init_of(cls: ast.ClassDef) -> ast.FunctionDef | None:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            return node
    return None


def _find_class(resolver: Resolver, module: str, name: str, depth: int = 0):
    """(module, ClassDef) where ``module.name`` is defined, following re-exports."""
    source = resolver.source(module)
    if name in source.classes:
        return module, source.classes[name]
    if name in source.imports and depth < 20:
        target, attribute = source.imports[name]
        if attribute is not None:
            return _find_class(resolver, target, attribute, depth + 1)
    return None


def _mentions_opaque(value: Any) -> bool:
    if value is OPAQUE:
        return True
    return any(_mentions_opaque(arg) for arg in typing.get_args(value))


def source_signature(module: str, name: str, resolver: Resolver | None = None) -> SourceSignature:
    """The stand-in for ``module.name.__init__`` (see the module docstring).

    Raises:
        LookupError: ``module`` has no class ``name`` (directly or re-exported) with an
            ``__init__`` of its own.
    """
    resolver = resolver or Resolver()
    found = _find_class(resolver, module, name)
    doc = ast.get_docstring(found[1]) if found else None
    init = _init_of(found[1]) if found else None
    while found and init is None and found[1].bases:  # inherited: the first base's (FedVMLC)
        base = found[1].bases[0]
        found = _find_class(resolver, found[0], base.id) if isinstance(base, ast.Name) else None
        init = _init_of(found[1]) if found else None
    if init is None:
        raise LookupError(f"{module}.{name}: no __init__ found in the source")
    owner = found[0]
    args = init.args
    if args.vararg or args.kwarg:  # jsonargparse follows *args/**kwargs; this reader does not
        raise LookupError(f"{module}.{name}.__init__ takes *args or **kwargs")
    positional = args.posonlyargs + args.args
    params, opaque = [], set()
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(positional, defaults, strict=True))[1:]  # without self
    pairs += list(zip(args.kwonlyargs, args.kw_defaults, strict=True))
    for arg, default in pairs:
        annotation = inspect.Parameter.empty
        if arg.annotation is not None:
            try:
                annotation = resolver.evaluate(owner, arg.annotation)
            except Exception:  # noqa: BLE001 (anything unresolvable is left to the full parser)
                annotation = OPAQUE
        value = inspect.Parameter.empty
        if default is not None:
            try:
                value = resolver.evaluate(owner, default)
            except Exception:  # noqa: BLE001
                value, annotation = None, OPAQUE
        if _mentions_opaque(annotation):
            # no type: a parser takes the value as it is (with a type that allows a class,
            # jsonargparse would import the class_path it is given)
            opaque.add(arg.arg)
            annotation = inspect.Parameter.empty
        kind = (
            inspect.Parameter.KEYWORD_ONLY
            if arg in args.kwonlyargs
            else (inspect.Parameter.POSITIONAL_OR_KEYWORD)
        )
        params.append(inspect.Parameter(arg.arg, kind, default=value, annotation=annotation))

    def stand_in(*args, **kwargs):  # only its signature and docstring are read
        raise NotImplementedError

    stand_in.__signature__ = inspect.Signature(params)
    stand_in.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not p.empty}
    stand_in.__doc__ = doc
    stand_in.__name__ = stand_in.__qualname__ = name
    # jsonargparse imports __module__ to name the origin of a parameter: this module, light
    stand_in.__module__ = __name__
    return SourceSignature(stand_in, opaque)


def _methods(cls: ast.ClassDef) -> tuple[set[str], set[str]]:
    """(methods defined, of which abstract) in a class body."""
    defined, abstract = set(), set()
    for node in cls.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            defined.add(node.name)
            names = {getattr(d, "id", getattr(d, "attr", "")) for d in node.decorator_list}
            if "abstractmethod" in names:
                abstract.add(node.name)
    return defined, abstract


@functools.cache
def subclass_names(base: str, package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """Public, concrete classes of this package deriving (by name, transitively) from a class
    named ``base``: ``{class name: dotted path}``, read from the source files. Concrete: no
    abstract method left unimplemented (its own or a base's), as ``inspect.isabstract``."""
    classes: dict[str, tuple[str, list[str], set[str], set[str]]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                parents = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")
                           for b in node.bases]  # fmt: skip
                classes.setdefault(node.name, (f"{module}.{node.name}", parents, *_methods(node)))

    def mro(name: str, depth: int = 0) -> list[str]:
        """C3 linearisation by name (as Python's, over the classes of this package)."""
        parents = classes[name][1] if name in classes and depth < 50 else []
        seqs = [mro(p, depth + 1) for p in parents] + [list(parents)]
        result = [name]
        while seqs := [s for s in seqs if s]:
            head = next((s[0] for s in seqs if not any(s[0] in o[1:] for o in seqs)), seqs[0][0])
            result.append(head)
            seqs = [s[1:] if s[0] == head else s for s in seqs]
        return result

    def abstract(name: str) -> bool:
        """Some abstract method resolves, along the MRO, to an abstract definition."""
        order = [c for c in mro(name) if c in classes]
        candidates = set().union(*(classes[c][3] for c in order))
        for method in candidates:
            first = next(c for c in order if method in classes[c][2])
            if method in classes[first][3]:
                return True
        return False

    def derives(name: str, seen: frozenset = frozenset()) -> bool:
        parents = classes[name][1] if name in classes else []
        return base in parents or any(p not in seen and derives(p, seen | {p}) for p in parents)

    return {
        name: path
        for name, (path, *_) in classes.items()
        if not name.startswith("_") and derives(name) and not abstract(name)
    }
