"""The synthesis engine: patch selection, BN-statistics matching, the stage loop with ARC."""

from .bn_stats import BNStatMatcher
from .methods import METHODS, Method
from .recover import RecoverSettings, recover

__all__ = ["BNStatMatcher", "METHODS", "Method", "RecoverSettings", "recover"]
