"""Recipes: YAML files that fully describe a training run, with ``key.sub=value`` overrides.

A recipe has five sections, each passed as keyword arguments to one object:
``model`` (``kind: baseline | mixpriv`` plus the module's arguments), ``data``
(:class:`~mixpriv.data.datamodule.MixprivDataModule`), ``trainer`` (``pytorch_lightning.Trainer``),
``logger`` (``kind: wandb | csv | none``) and the top-level ``name`` and ``seed``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

SECTIONS = ("name", "seed", "model", "data", "trainer", "logger")
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


class RecipeError(ValueError):
    """A recipe file or override is malformed."""


def find_recipe(name_or_path: str | Path) -> Path:
    """Resolve a recipe path, or a bare name looked up in ``./recipes/`` then the repository's."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    folders = [folder for folder in (Path("recipes"), RECIPES_DIR) if folder.is_dir()]
    for folder in folders:
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})
    raise RecipeError(f"recipe {name_or_path!r} not found; known recipes: {known}")


def load_recipe(name_or_path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Load a recipe and apply ``section.key=value`` overrides (values parsed as YAML).

    Example:
        >>> recipe = load_recipe("tissue-baseline", ["trainer.max_steps=10", "data.batch_size=2"])
        >>> recipe["trainer"]["max_steps"], recipe["data"]["batch_size"]
        (10, 2)
    """
    path = find_recipe(name_or_path)
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path} must hold a mapping of sections {SECTIONS}")
    unknown = set(recipe) - set(SECTIONS)
    if unknown:
        raise RecipeError(f"{path}: unknown section(s) {sorted(unknown)}; allowed: {SECTIONS}")
    return apply_overrides(recipe, overrides)


def apply_overrides(recipe: Mapping, overrides: Iterable[str]) -> dict:
    """Return a copy of ``recipe`` with ``a.b.c=value`` overrides applied."""
    result = copy.deepcopy(dict(recipe))
    for override in overrides:
        if "=" not in override:
            raise RecipeError(f"override {override!r} must look like section.key=value")
        dotted, raw = override.split("=", 1)
        keys = dotted.strip().split(".")
        if keys[0] not in SECTIONS:
            raise RecipeError(f"override {override!r}: unknown section {keys[0]!r}; allowed: {SECTIONS}")
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {override!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return result


def dump_recipe(recipe: Mapping, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(recipe), sort_keys=False))
    return path
