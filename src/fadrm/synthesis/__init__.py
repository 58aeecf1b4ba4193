"""The synthesis engine: methods, initialisers, work units, statistics matching, the stage loop with ARC."""

from .matching import BNStatMatcher, StatMatcher
from .methods import METHODS, Method
from .recover import recover

__all__ = ["BNStatMatcher", "METHODS", "Method", "StatMatcher", "recover"]
