"""The synthesis engine: methods, initialisers, statistics matching, the stage loop with ARC."""

from .bn_stats import BNStatMatcher
from .methods import METHODS, Method
from .recover import recover

__all__ = ["BNStatMatcher", "METHODS", "Method", "recover"]
