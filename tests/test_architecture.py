"""The package's shape against ARCHITECTURE.md: every import follows its layer table,
and every encoder has the interface the model asks of it."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mos_jax"


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def documented_layers() -> list[tuple[str, list[str]]]:
    """(layer, modules in order) for each row of the table in ARCHITECTURE.md's
    "Layers" section."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2 or cells[0] in ("layer", "---"):
            continue
        rows.append((cells[0], re.findall(r"`(\w+)`", cells[1])))
    return rows


def package_imports(source: str) -> set[str]:
    """The mos_jax modules `source` imports, at module level or inside functions:
    `from mos_jax import X`, `from mos_jax.X import ...`, `import mos_jax.X`, and
    the relative forms `from . import X`, `from .X import ...`."""
    names = set(modules())
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 0 and parts[:1] != ["mos_jax"]:
                continue
            if node.level == 0:
                parts = parts[1:]
            if parts:
                found.add(parts[0])
            else:  # from mos_jax import X / from . import X
                found |= {a.name for a in node.names if a.name in names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "mos_jax" and len(parts) > 1:
                    found.add(parts[1])
    return found


def import_graph() -> dict[str, set[str]]:
    return {m: package_imports((PACKAGE / f"{m}.py").read_text()) - {m}
            for m in modules()}


def test_the_import_parser_sees_every_form():
    src = """
import os
import mos_jax.data
from mos_jax import config as config_lib, heads
from mos_jax.model import ModelConfig

def f():
    from mos_jax import plot
    import mos_jax.rank as r
    from . import train
    from .evaluate import scan_windows
    from mos_jax import __version__
"""
    assert package_imports(src) == {"data", "config", "heads", "model", "plot", "rank",
                                    "train", "evaluate"}
    graph = import_graph()
    assert "errors" in graph["data"]  # module level
    assert "subword" in graph["data"]  # only inside functions


def test_every_module_is_in_exactly_one_layer():
    rows = documented_layers()
    assert len(rows) >= 5, rows  # the table was found and read
    listed = [m for _, mods in rows for m in mods]
    twice = sorted({m for m in listed if listed.count(m) > 1})
    assert not twice, f"in more than one place of ARCHITECTURE.md's layers: {twice}"
    missing = sorted(set(modules()) - set(listed))
    assert not missing, f"modules missing from ARCHITECTURE.md's layers: {missing}"
    unknown = sorted(set(listed) - set(modules()))
    assert not unknown, f"ARCHITECTURE.md's layers name no such module: {unknown}"


def test_every_import_points_up_the_layers():
    order = [m for _, mods in documented_layers() for m in mods]
    position = {m: i for i, m in enumerate(order)}
    layer = {m: name for name, mods in documented_layers() for m in mods}
    backwards = [f"{m} ({layer.get(m)}) imports {dep} ({layer.get(dep)})"
                 for m, deps in sorted(import_graph().items()) for dep in sorted(deps)
                 if m in position and dep in position and position[dep] > position[m]]
    assert not backwards, ("imports against ARCHITECTURE.md's layer order (a module "
                           "imports only modules above it, or to its left in its row): "
                           + "; ".join(backwards))


def test_the_package_init_imports_only_the_first_layer():
    first = documented_layers()[0][1]
    assert package_imports((PACKAGE / "__init__.py").read_text()) <= set(first)


# ------------------------------------------------------------------ the encoders

INTERFACE = ("check", "output_size", "init_carry", "generation_state", "flops_per_token",
             "encode")


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_every_encoder_subclasses_the_interface_and_implements_it(name):
    from mos_jax import layers, model
    cls = model.ENCODERS[name]
    assert issubclass(cls, layers.Encoder)
    assert model.Encoder is layers.Encoder
    for method in INTERFACE:
        assert getattr(cls, method) is not getattr(layers.Encoder, method), (name, method)
    assert isinstance(cls.stateful, bool) and cls.width_key
    # the width key sets the output width the (MoS) head reads
    cfg = model.ModelConfig(vocab_size=50, emsize=16, nhid=16, nlayers=1, n_experts=4,
                            encoder=name, n_heads=2, **{cls.width_key: 24})
    assert cls.check(cfg) == []
    assert cls.output_size(cfg) == cfg.output_size == 24
    assert cls.stateful == (name == "lstm")
    assert sorted(model.ENCODERS) == ["lstm", "transformer"]


def test_the_docs_name_every_head_that_splits_its_vocabulary():
    """docs/parallel.md and ARCHITECTURE.md list the heads that run with the
    vocabulary split over `model` (`shards_vocab`): exactly those, adaptive ones too."""
    from mos_jax import heads
    heads.load_plugins("")
    able = {name for name, cls in heads.HEADS.items() if cls.shards_vocab}
    assert {"softmax", "mos", "adaptive", "adaptive_mos"} <= able
    text = " ".join((ROOT / "docs" / "parallel.md").read_text().split())
    listed = text.split("The heads that split their vocabulary are", 1)[1].split("(", 1)[0]
    assert set(re.findall(r"`(\w+)`", listed)) == able, listed
    text = " ".join((ROOT / "ARCHITECTURE.md").read_text().split())
    listed = text.split("declares `shards_vocab = True` (", 1)[1].split(")", 1)[0]
    assert set(re.findall(r"`(\w+)`", listed)) == able, listed
