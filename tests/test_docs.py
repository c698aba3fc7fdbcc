"""The docs cover what users can set and what the code points them to."""

import re
from pathlib import Path

from raydiff.config import RaydiffConfig
from raydiff.config.root import _leaf_keys

ROOT = Path(__file__).resolve().parents[1]


def _reference_sections() -> dict[str, str]:
    """README's config reference: section name -> its paragraph."""
    text = (ROOT / "README.md").read_text()
    reference = text[text.index("## Config reference"):]
    reference = reference[:reference.index("\n## ", 3)]
    parts = re.split(r"\n\*\*(\w+)\*\*", reference)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_config_key_is_documented_in_its_readme_section():
    sections = _reference_sections()
    missing = []
    for key in _leaf_keys(RaydiffConfig):
        section, _, leaf = key.partition(".")
        leaf = leaf.split(".")[0] or section
        if f"`{leaf}`" not in sections.get(section, ""):
            missing.append(key)
    assert missing == []


def test_every_doc_and_example_the_code_and_docs_refer_to_exists():
    referenced = set()
    for path in [*ROOT.glob("raydiff/**/*.py"), ROOT / "README.md", *ROOT.glob("docs/*.md")]:
        # (a path inside another project's folder, e.g. `DIFFUSERS/examples/...`, is not one of ours)
        referenced |= set(re.findall(r"(?<![\w/])((?:docs|examples)/[\w./-]+\.(?:md|yaml|py))", path.read_text()))
    assert any(r.startswith("docs/") for r in referenced) and any(r.startswith("examples/") for r in referenced)
    assert [ref for ref in sorted(referenced) if not (ROOT / ref).is_file()] == []


def test_the_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 3)] if "\n## " in layout[3:] else layout
    modules = [p for p in ROOT.glob("raydiff/**/*.py") if p.name != "__init__.py" and "__main__" not in p.name]
    assert modules
    assert [str(p.relative_to(ROOT)) for p in modules if p.name not in layout] == []
