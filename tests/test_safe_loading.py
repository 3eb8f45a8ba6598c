"""Nothing in the package unpickles a file it is given (issue 25, safe loading).

Scanned from the source (AST), so a new call is caught however it is reached:

- every ``torch.load`` passes ``weights_only=True`` (better: safetensors, as the checkpoints);
- every model ``from_pretrained`` passes ``use_safetensors=True`` (processors, tokenizers and
  configs read no weights);
- ``pyproject.toml`` requires torch >= 2.6: before it, ``weights_only=True`` could be bypassed
  to run code (CVE-2025-32434).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

import flora_lightning

PACKAGE = Path(flora_lightning.__file__).parent
ROOT = PACKAGE.parent
NO_WEIGHTS = ("Processor", "Tokenizer", "TokenizerFast", "Config")
"""``from_pretrained`` receivers (by name suffix) that read no weight files."""


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def _torch_load_names(tree: ast.AST) -> set[str]:
    """Names bound to ``torch.load`` by ``from torch import load [as x]``."""
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization")
        for alias in node.names
        if alias.name == "load"
    }


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def unsafe_loads(source: str, where: str = "<source>") -> list[str]:
    """``file:line call`` of each ``torch.load`` without ``weights_only=True`` and each model
    ``from_pretrained`` without ``use_safetensors=True`` in ``source``."""
    tree = ast.parse(source)
    load_names = _torch_load_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        is_torch_load = name in ("torch.load", "torch.serialization.load") or name in load_names
        if is_torch_load and not _keyword_is_true(node, "weights_only"):
            found.append(f"{where}:{node.lineno} {name}")
        if name.endswith(".from_pretrained"):
            receiver = name.rsplit(".", 2)[-2]
            if not receiver.endswith(NO_WEIGHTS) and not _keyword_is_true(node, "use_safetensors"):
                found.append(f"{where}:{node.lineno} {name}")
    return found


def test_the_scan_finds_unsafe_loads():
    """The scan itself (on code written here), so the package test below cannot pass vacuously."""
    source = (
        "import torch\n"
        "from torch import load as tl\n"
        "torch.load(f)\n"
        "torch.load(f, weights_only=False)\n"
        "tl(f)\n"
        "torch.load(f, weights_only=True)\n"
        "CLIPModel.from_pretrained(p)\n"
        "transformers.CLIPModel.from_pretrained(p, use_safetensors=True)\n"
        "AutoProcessor.from_pretrained(p)\n"
        "PeftModel.from_pretrained(m, p)\n"
    )
    assert unsafe_loads(source) == [
        "<source>:3 torch.load",
        "<source>:4 torch.load",
        "<source>:5 tl",
        "<source>:7 CLIPModel.from_pretrained",
        "<source>:10 PeftModel.from_pretrained",
    ]


def test_the_package_loads_no_pickle():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))
    assert found == [], "load weights with safetensors (use_safetensors=True, weights_only=True)"


def test_torch_is_required_at_2_6_or_later():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (torch,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch"]
    assert not torch.specifier.contains("2.5.1"), torch  # weights_only bypass (CVE-2025-32434)
    assert torch.specifier.contains("2.6.0"), torch
