"""rotalabs_steer/_core.pyi describes the compiled module rotalabs_steer._core.

The stub is hand-written, so nothing else keeps it in step with csrc/. These tests read it
with ast and compare it with the runtime module: the public names both ways, each class's
bases, methods and attributes, and every signature the C code publishes (the `--` line of
its docstring, i.e. __text_signature__) against the stub's parameter names, kinds and
defaults. mypy's stubtest runs as well where mypy is installed.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys

import pytest

from rotalabs_steer import _core

STUB = os.path.join(os.path.dirname(os.path.abspath(_core.__file__)), "_core.pyi")
P = inspect.Parameter
NO_DEFAULT = "<none>"  # a parameter without a default
UNCHECKED = "<...>"  # a stub default written as `...`


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def _stub_tree() -> ast.Module:
    with open(STUB, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=STUB)


def _stub_module_names(tree: ast.Module) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


STUB_NAMES = _stub_module_names(_stub_tree())
STUB_CLASSES = {n: node for n, node in STUB_NAMES.items() if isinstance(node, ast.ClassDef)}
STUB_FUNCTIONS = {n: node for n, node in STUB_NAMES.items() if isinstance(node, ast.FunctionDef)}


def _is_property(node: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list)


def _class_members(node: ast.ClassDef) -> tuple[dict[str, ast.FunctionDef], set[str]]:
    """(methods, attributes) a stub class declares; properties and annotations are attributes."""
    methods, attributes = {}, set()
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            if _is_property(item):
                attributes.add(item.name)
            else:
                methods[item.name] = item
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            attributes.add(item.target.id)
    return methods, attributes


def _stub_default(node: ast.expr | None):
    if node is None:
        return NO_DEFAULT
    if isinstance(node, ast.Constant) and node.value is Ellipsis:
        return UNCHECKED
    return ast.literal_eval(node)


def _stub_parameters(func: ast.FunctionDef, *, drop_first: bool) -> list[tuple]:
    """(name, kind, default) per parameter of a stub function, as inspect would report them."""
    a = func.args
    positional = [(arg, P.POSITIONAL_ONLY) for arg in a.posonlyargs]
    positional += [(arg, P.POSITIONAL_OR_KEYWORD) for arg in a.args]
    first_default = len(positional) - len(a.defaults)
    params = []
    for i, (arg, kind) in enumerate(positional):
        default = a.defaults[i - first_default] if i >= first_default else None
        params.append((arg.arg, kind, _stub_default(default)))
    if a.vararg is not None:
        params.append((a.vararg.arg, P.VAR_POSITIONAL, NO_DEFAULT))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        params.append((arg.arg, P.KEYWORD_ONLY, _stub_default(default)))
    if a.kwarg is not None:
        params.append((a.kwarg.arg, P.VAR_KEYWORD, NO_DEFAULT))
    return params[1:] if drop_first else params


def _runtime_parameters(obj, *, drop_first: bool) -> list[tuple]:
    """(name, kind, default) from the C docstring's signature line (__text_signature__)."""
    try:
        signature = inspect.signature(obj)
    except ValueError as e:  # no `--` signature line in the docstring
        pytest.fail(f"{obj!r} publishes no signature: {e}")
    params = [
        (p.name, p.kind, NO_DEFAULT if p.default is P.empty else p.default)
        for p in signature.parameters.values()
    ]
    # A class's signature (from its tp_doc) already leaves out cls; methods keep $self.
    return params[1:] if drop_first else params


def _assert_same_parameters(what: str, stub: list[tuple], runtime: list[tuple]) -> None:
    # `...` as a stub default only says "has a default": compare its presence, not its value
    runtime = [
        (n, k, UNCHECKED if stub_default is UNCHECKED and d is not NO_DEFAULT else d)
        for (n, k, d), (_, _, stub_default) in zip(runtime, stub)
    ] + runtime[len(stub):]
    assert stub == runtime, f"{what}: stub {stub} != runtime {runtime}"


# ------------------------------------------------------------------------------- names


def test_stub_parses_and_only_public_names_are_runtime_names():
    stub_public = {n for n in STUB_NAMES if _is_public(n)}
    runtime_public = {n for n in dir(_core) if _is_public(n)}
    assert stub_public - runtime_public == set(), "in the stub but not in the module"
    assert runtime_public - stub_public == set(), "in the module but not in the stub"


def test_stub_helpers_are_private():
    # aliases and protocols that exist only for typing must not look like module API
    for name, node in STUB_NAMES.items():
        if isinstance(node, (ast.Assign, ast.AnnAssign)) or (
            isinstance(node, ast.ClassDef) and not hasattr(_core, name)
        ):
            assert not _is_public(name), f"stub-only helper {name} should be private"


@pytest.mark.parametrize("name", sorted(STUB_FUNCTIONS))
def test_function_kinds(name):
    assert callable(getattr(_core, name)) and not isinstance(getattr(_core, name), type)


# ----------------------------------------------------------------------------- classes


RUNTIME_CLASSES = sorted(n for n in STUB_CLASSES if hasattr(_core, n))  # less private helpers


@pytest.mark.parametrize("name", RUNTIME_CLASSES)
def test_class_bases(name):
    runtime = getattr(_core, name)
    assert isinstance(runtime, type)
    stub_bases = [b.id for b in STUB_CLASSES[name].bases if isinstance(b, ast.Name)]
    runtime_bases = [b.__name__ for b in runtime.__bases__ if b is not object]
    assert stub_bases == runtime_bases


@pytest.mark.parametrize("name", RUNTIME_CLASSES)
def test_class_members_match(name):
    runtime = getattr(_core, name)
    methods, attributes = _class_members(STUB_CLASSES[name])
    stub_public = {m for m in methods if _is_public(m)} | {a for a in attributes if _is_public(a)}
    runtime_public = {m for m in vars(runtime) if _is_public(m)}
    assert stub_public == runtime_public
    for attr in attributes:
        descriptor = vars(runtime)[attr]
        assert inspect.isdatadescriptor(descriptor), f"{name}.{attr} is not an attribute"
    for method in methods:
        if method == "__new__":
            continue
        assert callable(getattr(runtime, method)), f"{name}.{method} is not callable"


def test_read_only_attributes_are_read_only():
    acc = _core.Accumulator(1, 2)
    hook = _core.CaptureHook(acc, 0)
    for obj, cls in ((acc, "Accumulator"), (hook, "CaptureHook")):
        for attr in _class_members(STUB_CLASSES[cls])[1]:
            with pytest.raises(AttributeError):
                setattr(obj, attr, getattr(obj, attr))


# -------------------------------------------------------------------------- signatures


def _signature_cases():
    """(runtime object, stub function, whether the runtime signature starts with $self)."""
    for name, node in sorted(STUB_FUNCTIONS.items()):
        yield pytest.param(getattr(_core, name), node, False, id=name)
    for cls_name, node in sorted(STUB_CLASSES.items()):
        runtime = getattr(_core, cls_name, None)
        if runtime is None:
            continue
        for method_name, method in sorted(_class_members(node)[0].items()):
            if method_name == "__new__":
                # the constructor's signature is the class's (from tp_doc), which has no cls
                yield pytest.param(runtime, method, False, id=f"{cls_name}()")
            elif _is_public(method_name):
                yield pytest.param(getattr(runtime, method_name), method, True,
                                   id=f"{cls_name}.{method_name}")
            # Dunder slots such as CaptureHook.__call__ have CPython's generic
            # (self, /, *args, **kwargs) wrapper signature: nothing of ours to compare.


@pytest.mark.parametrize("runtime, node, runtime_has_self", list(_signature_cases()))
def test_signatures_match(runtime, node, runtime_has_self):
    in_class = node not in STUB_FUNCTIONS.values()
    stub = _stub_parameters(node, drop_first=in_class)  # self, or cls of __new__
    actual = _runtime_parameters(runtime, drop_first=runtime_has_self)
    _assert_same_parameters(node.name, stub, actual)


def test_signature_comparison_catches_a_mismatch():
    # the check itself: a stub that forgot the `/` of add_batch must not pass
    wrong = ast.parse("def add_batch(self, slot, activations): ...").body[0]
    with pytest.raises(AssertionError):
        _assert_same_parameters(
            "add_batch",
            _stub_parameters(wrong, drop_first=True),
            _runtime_parameters(_core.Accumulator.add_batch, drop_first=True),
        )


# ---------------------------------------------------------------------------- stubtest


def test_mypy_stubtest():
    pytest.importorskip("mypy.stubtest", reason="mypy is not installed; the ast checks above stand")
    root = os.path.dirname(os.path.dirname(os.path.abspath(_core.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "rotalabs_steer._core"],
        capture_output=True, text=True, cwd=root, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
