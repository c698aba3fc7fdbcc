"""No unsafe loaders in the package: checkpoints, configs and hub code are untrusted input.

The scan parses each raydiff/**/*.py file (a text grep would flag `model.eval()` and comments) and
resolves import aliases (`import torch as th; th.load(...)`). Each hit fails with file:line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raydiff"

UNPICKLERS = {f"{m}.{f}" for m in ("pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "joblib")
              for f in ("load", "loads")} | {"pickle.Unpickler", "numpy.load", "pandas.read_pickle"}
YAML_SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _mentions_trust(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "trust_remote_code"
               or isinstance(n, ast.Attribute) and n.attr == "trust_remote_code" for n in ast.walk(node))


def _call_problem(call: ast.Call, aliases: dict[str, str]) -> str | None:
    name = _dotted(call.func, aliases)
    kw = {k.arg: k.value for k in call.keywords}
    if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
        return f"{name}() runs arbitrary code"
    if name == "torch.load" and not _is_true(kw.get("weights_only")):
        return "torch.load without weights_only=True unpickles arbitrary objects"
    if name in UNPICKLERS:
        if name == "numpy.load" and not _is_true(kw.get("allow_pickle")):
            return None  # numpy refuses pickles unless allow_pickle=True
        return f"{name} unpickles arbitrary objects"
    if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
        return f"{name} can build arbitrary objects; use yaml.safe_load"
    if name in ("yaml.load", "yaml.load_all"):
        loader = kw.get("Loader", call.args[1] if len(call.args) > 1 else None)
        loader = _dotted(loader, aliases) if loader is not None else None
        if loader is None or loader.rsplit(".", 1)[-1] not in YAML_SAFE_LOADERS:
            return f"{name} without SafeLoader; use yaml.safe_load"
    return None


def scan_source(text: str, filename: str = "<snippet>") -> list[str]:
    """`file:line: problem` for each unsafe loader, eval/exec, or unconditional trust_remote_code=True."""
    tree = ast.parse(text, filename=filename)
    aliases, hits = _aliases(tree), []

    def visit(node: ast.AST, guarded: bool) -> None:
        problem = None
        if isinstance(node, ast.Call):
            problem = _call_problem(node, aliases)
            if not guarded and any(k.arg == "trust_remote_code" and _is_true(k.value) for k in node.keywords):
                problem = "trust_remote_code=True literal (runs hub code); pass the user's setting"
        elif isinstance(node, ast.Dict) and not guarded and any(
                isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _is_true(v)
                for k, v in zip(node.keys, node.values)):
            problem = "trust_remote_code: True literal (runs hub code); pass the user's setting"
        elif isinstance(node, ast.Assign) and not guarded and _is_true(node.value) and any(
                isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
                and t.slice.value == "trust_remote_code" for t in node.targets):
            problem = "trust_remote_code set to True unconditionally; gate it on the user's setting"
        if problem:
            hits.append(f"{filename}:{node.lineno}: {problem}")
        # True is fine only under `if <the user's trust_remote_code setting>:`
        if isinstance(node, ast.If) and _mentions_trust(node.test):
            visit(node.test, guarded)
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return hits


def test_package_source_has_no_unsafe_loaders():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    hits = [hit for f in files for hit in scan_source(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert hits == [], "unsafe code in the package:\n" + "\n".join(hits)


@pytest.mark.parametrize("snippet", [
    "import torch\nx = torch.load('a.pt')",
    "import torch\nx = torch.load('a.pt', map_location='cpu', weights_only=False)",
    "import torch as th\nx = th.load(\n  'a.pt',\n  map_location='cpu')",
    "from torch import load\nx = load('a.pt')",
    "import pickle\nx = pickle.load(open('f', 'rb'))",
    "import pickle\nx = pickle.loads(b'')",
    "from pickle import loads as l\nx = l(b'')",
    "import cloudpickle\nx = cloudpickle.loads(b'')",
    "import numpy as np\nx = np.load('a.npy', allow_pickle=True)",
    "import yaml\nx = yaml.load(open('c.yaml'))",
    "import yaml\nx = yaml.load(s, Loader=yaml.Loader)",
    "import yaml\nx = yaml.load(s, yaml.UnsafeLoader)",
    "import yaml\nx = yaml.full_load(s)",
    "import yaml\nx = yaml.unsafe_load(s)",
    "m = AutoModel.from_pretrained('x', trust_remote_code=True)",
    "kwargs = {'trust_remote_code': True}",
    "kwargs = {}\nkwargs['trust_remote_code'] = True",
    "if debug:\n    kwargs['trust_remote_code'] = True",
    "x = eval('1 + 1')",
    "exec('print(1)')",
    "import builtins\nbuiltins.eval('1')",
])
def test_scanner_catches_each_unsafe_pattern(snippet):
    hits = scan_source(snippet, "bad.py")
    assert len(hits) == 1 and hits[0].startswith("bad.py:"), hits
    line = 2 if "th.load(\n" in snippet else len(snippet.splitlines())  # where the offending call starts
    assert hits[0].split(":")[1] == str(line), hits


def test_scanner_allows_the_safe_forms():
    snippet = '''
import torch, yaml, numpy as np
from yaml import SafeLoader
state = torch.load("a.pt", map_location="cpu", weights_only=True)
cfg = yaml.safe_load(open("c.yaml"))
cfg = yaml.load(s, Loader=yaml.SafeLoader)
cfg = yaml.load(s, Loader=SafeLoader)
cfg = yaml.load(s, yaml.CSafeLoader)
arr = np.load("a.npy")
model.eval()
self.evaluator.eval(x)
m = AutoModel.from_pretrained("x", trust_remote_code=cfg.model.trust_remote_code)
m = AutoModel.from_pretrained("x", trust_remote_code=False)
if trust_remote_code:  # the user's own setting
    kwargs["trust_remote_code"] = True
if cfg.model.trust_remote_code:
    m = AutoModel.from_pretrained("x", trust_remote_code=True)
# torch.load(path) and eval(x) in a comment, or in a string: "pickle.loads(b)"
'''
    assert scan_source(snippet) == []
