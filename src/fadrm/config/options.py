"""Declaring options: the ``option()`` field, the rules a value must pass, and validation.

A stage's config (:mod:`fadrm.config.stages`) is a dataclass whose fields are each declared once
with :func:`option`: default, help text, whether the field *defines* the result or only how the
work runs, its valid values and its command-line flag. Everything else about an option (its flag,
its check, its place in the identity and in ``config.yaml``) is read from that declaration by
the functions here and in :mod:`fadrm.config.resolver`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

from ..errors import FadrmError
from ..registry import registry

# ------------------------------------------------------------------ options
Check = Callable[[Any], "str | None"]


def option(
    default: Any = MISSING,
    *,
    help: str,
    defines: bool = True,
    key: str | None = None,
    flag: str | None = None,
    check: Check | Sequence[Check] = (),
    choices: Callable[[], Sequence[str]] | Sequence[str] | None = None,
    repeat: bool = False,
    nargs: int | None = None,
    positional: bool = False,
    unset: Any = None,
    persist: bool = True,
) -> Any:
    """Declare one config field.

    Args:
        default: the package default (a list or dict is copied for each instance);
            none makes the field required.
        help: one line for ``--help`` and the docs.
        defines: whether the field changes the result. Fields that do are the run's
            identity: a resume with another value is refused; the others (devices,
            paths, batching) may change between resumes. Where a defining option stays
            out of older results' identity, :data:`fadrm.config.identity.UNCHANGED_SINCE`
            says so.
        key: the name in flat files and the identity, when not the field's name.
        flag: the command-line flag, when not ``--`` + the key with dashes.
        check: rules the value must pass (:func:`at_least`, :func:`in_range`, ...).
        choices: the valid names, or a function returning them (a registry's names).
        repeat: a list given by repeating the flag (``--teacher a --teacher b``).
        nargs: a list of exactly this many values.
        positional: a positional argument rather than a flag.
        unset: a value that, given on the command line or in a file, counts as not given
            (``--amp auto`` keeps the preset's precision).
        persist: False for a one-shot instruction (``--overwrite``): a written config holds
            its default, so replaying the file never repeats it.
    """
    metadata = {
        "help": help,
        "defines": defines,
        "key": key,
        "flag": flag,
        "repeat": repeat,
        "nargs": nargs,
        "check": tuple(check) if isinstance(check, (list, tuple)) else (check,),
        "choices": choices,
        "positional": positional,
        "unset": unset,
        "persist": persist,
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ------------------------------------------------------------------- rules
# A rule returns why a value is wrong, or None. Each carries ``invalid``: values it refuses,
# which the tests try on every option that declares it.


def _rule(check: Callable[[Any], str | None], *invalid: Any) -> Check:
    check.invalid = invalid  # type: ignore[attr-defined]
    return check


def at_least(low: float) -> Check:
    """Rule: a number >= ``low``."""
    return _rule(lambda v: None if v >= low else f"must be at least {low:g}", low - 1)


def positive(value: Any) -> str | None:
    """Rule: a finite number > 0."""
    return None if math.isfinite(value) and value > 0 else "must be a positive number"


def non_negative(value: Any) -> str | None:
    """Rule: a finite number >= 0."""
    return None if math.isfinite(value) and value >= 0 else "must be a non-negative number"


_rule(positive, 0.0, -1.0)
_rule(non_negative, -1.0)


def in_range(low: float, high: float) -> Check:
    """Rule: a number in [low, high]."""
    return _rule(lambda v: None if low <= v <= high else f"must be in [{low:g}, {high:g}]", low - 1, high + 1)


def each(rule: Check) -> Check:
    """Rule: ``rule`` holds for every element of a list."""
    return _rule(
        lambda values: next((rule(v) for v in values if rule(v)), None), *([v] for v in getattr(rule, "invalid", ()))
    )


def scale_pair(value: Sequence[float]) -> str | None:
    """Rule: an area range (low, high) with 0 < low <= high <= 1."""
    return None if 0 < value[0] <= value[1] <= 1 else "must be two numbers with 0 < low <= high <= 1"


_rule(scale_pair, [0.0, 1.0], [0.9, 0.1], [0.5, 2.0])


def registered(kind: str) -> Callable[[], list[str]]:
    """Choices: the names in the package's registry of ``kind``, read when first needed."""
    return lambda: registry(kind).names()


DIFFICULTIES = ("easy", "medium", "hard")


def difficulty_band(value: str | float) -> str | None:
    """Rule: a named band of the patch ranking, or a quantile in [0, 1] where the band starts."""
    if value in DIFFICULTIES:
        return None
    try:
        quantile = float(value)
    except (TypeError, ValueError):
        quantile = math.nan
    return None if 0.0 <= quantile <= 1.0 else "must be easy, medium, hard or a number in [0, 1]"


_rule(difficulty_band, "harder", "1.5")


def job_count_value(value: str) -> str | None:
    """Rule: auto, or a whole number of processes, at least 1."""
    return None if value == "auto" or (str(value).isdigit() and int(value) >= 1) else "must be auto or a number >= 1"


_rule(job_count_value, "0", "many")


def device_name(value: str) -> str | None:
    """Rule: auto, cpu, cuda or cuda:N."""
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) else "must be auto, cpu, cuda or cuda:N"


_rule(device_name, "gpu", "cuda:x")


def model_name(value: str) -> str | None:
    """Rule: a registered model, or ``timm:<name>``."""
    known = value in registry("model") or value.startswith("timm:")
    return None if known else "must be a registered model (fadrm list models) or timm:<name>"


_rule(model_name, "resnet9000")


def teacher_source(value: str) -> str | None:
    """Rule: an existing checkpoint file, or torchvision weights named ``arch:WEIGHTS`` (checked when loaded)."""
    path = Path(value)
    if path.is_file() or (":" in value and not path.exists()):
        return None
    given = "a folder was given" if path.is_dir() else "no such file"
    return f"must be a checkpoint file, or torchvision weights arch:WEIGHTS ({given})"


_rule(teacher_source, "missing-teacher.pt", ".")


def model_or_weights(value: str) -> str | None:
    """Rule: an architecture to train (:func:`model_name`), or torchvision weights ``arch:WEIGHTS``."""
    return None if ":" in value and not value.startswith("timm:") else model_name(value)


_rule(model_or_weights, "resnet9000")


def existing_folder(value: str) -> str | None:
    """Rule: a folder that exists."""
    return None if Path(value).is_dir() else "must be an existing folder"


_rule(existing_folder, "missing-folder")


def existing_file(value: str) -> str | None:
    """Rule: a file that exists."""
    return None if Path(value).is_file() else "must be an existing file"


_rule(existing_file, "missing-file.json")


def not_a_folder(value: str) -> str | None:
    """Rule: a file name, not an existing folder."""
    return "must be a file name, not a folder" if Path(value).is_dir() else None


def not_a_file(value: str) -> str | None:
    """Rule: a folder name, not an existing file."""
    return "must be a folder, not a file" if Path(value).is_file() else None


_rule(not_a_folder, ".")
_rule(not_a_file, __file__)  # a file that always exists: this one


# ------------------------------------------------------------- option groups
@dataclass(frozen=True)
class Options:
    """Behaviour shared by every group of declared options (a stage's config or one of its parts)."""

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain data (what ``config.yaml`` holds)."""
        return asdict(self)

    def leaves(self) -> Iterator[tuple[tuple[str, ...], dataclasses.Field, Any]]:
        """(path, field, value) of every option, parts included."""
        for path, f in option_fields(type(self)):
            value: Any = self
            for name in path:
                value = getattr(value, name)
            yield path, f, value

    def check(self) -> None:
        """Rules between fields (each stage adds its own); field rules come from the declarations."""


# ------------------------------------------------------------ declarations
def is_part(annotation: Any) -> bool:
    """Whether a field's annotation is a group of options nested in a stage (a part)."""
    return isinstance(annotation, type) and issubclass(annotation, Options)


@functools.cache
def part_names(cls: type[Options]) -> frozenset[str]:
    """The names of the fields of ``cls`` that are parts."""
    hints = typing.get_type_hints(cls)
    return frozenset(f.name for f in fields(cls) if is_part(hints[f.name]))


@functools.cache
def option_fields(cls: type[Options]) -> list[tuple[tuple[str, ...], dataclasses.Field]]:
    """(path, field) of every option of a stage, parts' options included, in declaration order."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[tuple[str, ...], dataclasses.Field]] = []
    for f in fields(cls):
        if is_part(hints[f.name]):
            out += [((f.name, *path), sub) for path, sub in option_fields(hints[f.name])]
        else:
            out.append(((f.name,), f))
    return out


def key_of(f: dataclasses.Field) -> str:
    """A field's key: its name in flat files, identities and (with dashes) its flag."""
    return f.metadata["key"] or f.name


def flatten(cls: type[Options], values: Mapping[str, Any]) -> dict[str, Any]:
    """Nested (or already flat) ``values`` of ``cls`` by key; keys it does not declare are kept."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if name in part_names(cls) and isinstance(value, Mapping):
            keys = {f.name: key_of(f) for f in fields(typing.get_type_hints(cls)[name])}
            flat.update({keys.get(k, k): v for k, v in value.items()})
        else:
            flat[name] = value
    return flat


@functools.cache
def _annotation(cls: type[Options], path: tuple[str, ...]) -> Any:
    """The annotation of the option at ``path`` as declared (``int | None`` included)."""
    owner: Any = cls
    for name in path[:-1]:
        owner = typing.get_type_hints(owner)[name]
    return typing.get_type_hints(owner)[path[-1]]


@functools.cache
def option_type(cls: type[Options], path: tuple[str, ...]) -> Any:
    """The declared type of the option at ``path`` without None (``int | None`` -> int;
    ``list[int]`` and ``str | float`` kept)."""
    hint = _annotation(cls, path)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = tuple(a for a in typing.get_args(hint) if a is not type(None))
        hint = members[0] if len(members) == 1 else typing.Union[members]
    return hint


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a field."""
    return f.metadata["flag"] or "--" + key_of(f).replace("_", "-")


def choices_of(f: dataclasses.Field) -> list[str] | None:
    choices = f.metadata["choices"]
    return list(choices() if callable(choices) else choices) if choices is not None else None


# --------------------------------------------------------------- validation
def _type_error(value: Any, hint: Any, optional: bool) -> str | None:
    """Why ``value`` is not of the declared type, or None."""
    if value is None:
        return None if optional else "must be given"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        problems = [_type_error(value, member, False) for member in typing.get_args(hint)]
        if None in problems:
            return None
        return "must be " + " or ".join(str(p).removeprefix("must be ") for p in problems)
    if origin is list:
        if not isinstance(value, list):
            return "must be a list"
        (item,) = typing.get_args(hint)
        return next((e for v in value if (e := _type_error(v, item, False))), None)
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else "must be a mapping of key=value"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be a whole number"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "must be a finite number"
    if hint is str:
        return None if isinstance(value, str) and value else "must be non-empty text"
    return None


def option_problem(cls: type[Options], path: tuple[str, ...], f: dataclasses.Field, value: Any) -> str | None:
    """Why ``value`` is not valid for the option at ``path`` of ``cls`` (its type, count, choices
    and rules, in that order), or None."""
    optional = type(None) in typing.get_args(_annotation(cls, path))
    problem = _type_error(value, option_type(cls, path), optional)
    if problem is not None or value is None:
        return problem
    nargs, choices = f.metadata["nargs"], choices_of(f)
    if nargs is not None and len(value) != nargs:
        return f"needs exactly {nargs} values"
    if choices is not None and any(v not in choices for v in (value if isinstance(value, list) else [value])):
        return f"must be one of {', '.join(choices)}"
    return next((p for rule in f.metadata["check"] if (p := rule(value))), None)


def _refuse(f: dataclasses.Field, problem: str, value: Any) -> NoReturn:
    raise FadrmError(f"{flag_of(f)} {problem}, got {value!r}")


def check_option(cls: type[Options], key: str, value: Any) -> None:
    """Refuse ``value`` for the option ``key`` of ``cls`` as :func:`validate` would, before the rest
    of the config exists (the options that choose the preset).

    Raises:
        FadrmError: one line naming the flag, what it must be and the value given.
    """
    path, f = next((path, f) for path, f in option_fields(cls) if key_of(f) == key)
    problem = option_problem(cls, path, f, value)
    if problem:
        _refuse(f, problem, value)


def validate(config: Options) -> None:
    """Check every option against its declaration, then the stage's rules between options.

    Raises:
        FadrmError: one line naming the flag, what it must be and the value given.
    """
    for path, f, value in config.leaves():
        problem = option_problem(type(config), path, f, value)
        if problem:
            _refuse(f, problem, value)
    config.check()
