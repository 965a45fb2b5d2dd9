"""Every public name of rotalabs-steer 1.2.0 imports from the same path here, with the same
positional parameters (extra keyword-only parameters are fine), and the datasets' constants
have the reference's shapes while holding this package's own text.

The reference's names come from its installed source, read with ``ast`` (nothing of it is
imported, so its optional dependencies need not be installed); its folder is found by the
reference interpreter (tests/reference_venv.py). Without that venv everything here skips.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reference_venv import REPO, reference_python, run_reference

PACKAGE = "rotalabs_steer"
PYDANTIC_BASES = {"BaseModel", "LLM", "BaseChatModel"}


@dataclass
class Name:
    module: str
    name: str
    kind: str  # function, class, constant, import
    positional: list[str] | None = None  # functions and class constructors
    fields: list[str] | None = None  # pydantic models: the field names
    dataclass_bases: list[str] = field(default_factory=list)  # dataclasses: their bases' names
    methods: dict[str, list[str] | None] = field(default_factory=dict)  # None: a property
    source: tuple[str, str] | None = None  # imports: (module, name) it comes from


def reference_source() -> Path | None:
    python = reference_python()
    if python is None:
        return None
    done = subprocess.run([str(python), "-c", "import importlib.util as u; "
                           f"print(u.find_spec({PACKAGE!r}).submodule_search_locations[0])"],
                          capture_output=True, text=True, cwd="/", timeout=120)
    return Path(done.stdout.strip()) if done.returncode == 0 else None


def positional(args: ast.arguments, drop_first: bool) -> list[str]:
    names = [a.arg for a in args.posonlyargs + args.args]
    return names[1:] if drop_first and names else names


def decorators(node) -> set[str]:
    return {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in node.decorator_list}


def describe_class(module: str, node: ast.ClassDef) -> Name:
    bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
    entry = Name(module, node.name, "class")
    annotated = [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    for item in node.body:
        if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        marks = decorators(item)
        if item.name == "__init__":
            entry.positional = positional(item.args, drop_first=True)
        elif not item.name.startswith("_"):
            if "property" in marks or "setter" in marks:
                entry.methods[item.name] = None
            else:
                entry.methods[item.name] = positional(item.args, drop_first="staticmethod" not in marks)
    if bases & PYDANTIC_BASES:
        entry.fields = [a for a in annotated if not a.startswith("_")]
    elif entry.positional is None and "dataclass" in decorators(node):
        # __init__ parameters: fields not declared field(init=False), after the base dataclass's
        entry.positional = [s.target.id for s in node.body
                            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and not _no_init(s)]
        entry.dataclass_bases = sorted(bases)
    return entry


def _no_init(statement: ast.AnnAssign) -> bool:
    value = statement.value
    return isinstance(value, ast.Call) and any(
        k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False for k in value.keywords)


def dataclass_positional(entry: Name) -> list[str]:
    inherited = []
    for base in entry.dataclass_bases:
        parent = REFERENCE.get((entry.module, base))
        if parent is not None and parent.positional is not None:
            inherited += dataclass_positional(parent)
    return inherited + entry.positional


def top_level(statements):
    """Module-level statements, looking inside try/except and if blocks."""
    for statement in statements:
        if isinstance(statement, ast.Try):
            yield from top_level(statement.body + [s for h in statement.handlers for s in h.body]
                                 + statement.orelse + statement.finalbody)
        elif isinstance(statement, ast.If):
            yield from top_level(statement.body + statement.orelse)
        else:
            yield statement


def walk_reference(root: Path) -> dict[tuple[str, str], Name]:
    names: dict[tuple[str, str], Name] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(p.startswith("_") and p != "__init__" for p in parts):
            continue  # private modules (_telemetry, _version)
        is_package = parts[-1] == "__init__"
        module = ".".join((PACKAGE, *(parts[:-1] if is_package else parts)))
        for node in top_level(ast.parse(path.read_text(encoding="utf-8")).body):
            found: list[Name] = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found = [Name(module, node.name, "function", positional(node.args, drop_first=False))]
            elif isinstance(node, ast.ClassDef):
                found = [describe_class(module, node)]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for leaf in (target.elts if isinstance(target, ast.Tuple) else [target]):
                        if isinstance(leaf, ast.Name):
                            found.append(Name(module, leaf.id, "constant"))
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGE)):
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                found = [Name(module, a.asname or a.name, "import", source=(source, a.name)) for a in node.names]
            for entry in found:
                if entry.name.startswith("_") or entry.kind == "import" and not is_package:
                    continue  # a plain module's imports are its own business, not its API
                if (module, entry.name) not in names or entry.kind != "constant":
                    names[(module, entry.name)] = entry  # a definition wins over `X = None` fallbacks
        exported = module_all(path)
        if exported is not None:  # __all__ is the module's own word on what is public
            for key in [k for k in names if k[0] == module and k[1] not in exported]:
                names[key].kind = "private"
    return names


def module_all(path: Path) -> set[str] | None:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    return None


def resolve(names: dict, entry: Name) -> Name:
    seen = 0
    while entry.kind == "import" and seen < 20:
        target = names.get(entry.source)
        if target is None:
            return entry
        entry, seen = target, seen + 1
    return entry


SOURCE = reference_source()
REFERENCE = walk_reference(SOURCE) if SOURCE is not None else {}


def params_of(obj) -> list[str]:
    parameters = inspect.signature(obj).parameters.values()
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def method_params(cls, name: str) -> list[str]:
    """Positional parameters of a method as called on an instance (no self / cls)."""
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, staticmethod):
        return params_of(raw.__func__)
    function = raw.__func__ if isinstance(raw, classmethod) else raw
    return params_of(function)[1:]


def cases():
    if not REFERENCE:
        return [pytest.param(None, marks=pytest.mark.skip(reason="the reference venv is absent"))]
    result = []
    for (module, name), entry in sorted(REFERENCE.items()):
        if entry.kind != "private":
            result.append(pytest.param(entry, id=f"{module}:{name}"))
    return result


@pytest.mark.parametrize("entry", cases())
def test_public_name(entry):
    module = importlib.import_module(entry.module)
    assert hasattr(module, entry.name), f"{entry.module} has no {entry.name}"
    ours = getattr(module, entry.name)
    want = resolve(REFERENCE, entry)
    if ours is None and want.kind in ("function", "class"):
        pytest.fail(f"{entry.module}.{entry.name} is None here (an optional dependency missing?)")
    if want.kind == "function":
        assert params_of(ours) == want.positional, f"{entry.module}.{entry.name}"
    elif want.kind == "class":
        assert inspect.isclass(ours)
        if want.fields is not None:
            missing = set(want.fields) - set(ours.model_fields)
            assert not missing, f"{entry.name} lacks the reference's fields {sorted(missing)}"
        elif want.positional is not None:
            assert params_of(ours) == dataclass_positional(want), f"{entry.name}.__init__"
        for method, wanted in want.methods.items():
            assert hasattr(ours, method), f"{entry.name}.{method} is missing"
            if wanted is not None:
                assert method_params(ours, method) == wanted, f"{entry.name}.{method}"


def test_the_walk_found_the_reference():
    if not REFERENCE:
        pytest.skip("the reference venv is absent")
    found = {(m, n) for m, n in REFERENCE}
    for expected in [("rotalabs_steer.utils", "download_vectors"), ("rotalabs_steer.core.injection", "MultiVectorInjector"),
                     ("rotalabs_steer.integrations.langchain", "SteeredLLM"), ("rotalabs_steer.integrations", "HAS_LANGCHAIN"),
                     ("rotalabs_steer.datasets.humor_pairs", "HUMOR_PAIRS"), ("rotalabs_steer", "SteeringVector")]:
        assert expected in found
    assert resolve(REFERENCE, REFERENCE[("rotalabs_steer", "SteeringVector")]).positional == [
        "behavior", "layer_index", "vector", "model_name", "extraction_method", "metadata"]


# --- the datasets' constants --------------------------------------------------------------------

CONSTANTS = {name: module for (module, name), entry in REFERENCE.items()
             if module.startswith(f"{PACKAGE}.datasets.") and module.endswith("_pairs") and entry.kind == "constant"}


@pytest.mark.slow
def test_dataset_constants_have_the_reference_shapes_and_our_own_text():
    if not CONSTANTS:
        pytest.skip("the reference venv is absent")
    reference = run_reference(
        "import importlib, json\n"
        f"constants = {CONSTANTS!r}\n"
        "print(json.dumps({n: getattr(importlib.import_module(m), n) for n, m in constants.items()}))")
    shipped = {}
    for name, module in CONSTANTS.items():
        ours = getattr(importlib.import_module(module), name)
        theirs = reference[name]
        assert type(ours) is list and ours, name
        shapes = {tuple(sorted(item)) for item in theirs}
        assert {tuple(sorted(item)) for item in ours} == shapes == {("negative", "positive")}, name
        assert all(isinstance(v, str) and v.startswith("User: ") and "\nAssistant: " in v
                   for item in ours for v in item.values()), name
        assert all("\nAssistant: " in v for item in theirs for v in item.values())  # the same rendering
        theirs_text = {v for item in theirs for v in item.values()}
        assert not theirs_text & {v for item in ours for v in item.values()}, f"{name} copies reference text"
        shipped[name] = ours
    datasets = importlib.import_module(f"{PACKAGE}.datasets")
    assert datasets.HUMOR_PAIRS is shipped["HUMOR_PAIRS"]  # one list, as in the reference
