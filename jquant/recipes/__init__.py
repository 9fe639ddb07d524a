"""Quantization recipes: ordered rules matched by site path; built-in named recipes."""

from jquant.recipes.builtin import BUILTIN as BUILTIN
from jquant.recipes.builtin import get as get
from jquant.recipes.builtin import list_recipes as list_recipes
from jquant.recipes.rules import DEFAULT_KEEP_FLOAT as DEFAULT_KEEP_FLOAT
from jquant.recipes.rules import Recipe as Recipe
from jquant.recipes.rules import Rule as Rule
from jquant.recipes.rules import TransformStep as TransformStep

__all__ = ["BUILTIN", "DEFAULT_KEEP_FLOAT", "Recipe", "Rule", "TransformStep", "get", "list_recipes"]
