"""Reading YAML that a user (or a preset) wrote: strict, bounded, and every fault one line naming its source.

PyYAML's safe loader builds no objects, but it lets the last of two equal keys win silently,
expands aliases (a kilobyte of nested aliases becomes gigabytes) and recurses once per nesting
level. The loader here refuses a repeated key, refuses aliases (write the value out), and
refuses nesting deeper than :data:`MAX_DEPTH`; text must be UTF-8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from .errors import FadrmError

# Deeper than any config fadrm reads (a part's list of values is three levels).
MAX_DEPTH = 32


class StrictLoader(yaml.SafeLoader):
    """:class:`yaml.SafeLoader` without repeated keys, aliases or deep nesting."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ComposerError(None, None, f"it uses the alias *{event.anchor}: write the value out", event.start_mark)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ComposerError(None, None, f"it nests deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is not None:
                raise ConstructorError(None, None, f"the key {key!r} appears twice (lines {first} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str) -> Any:
    """The value ``text`` holds, read by :class:`StrictLoader`.

    Raises:
        FadrmError: ``<source> is not valid YAML (<why>)``, on one line.
    """
    try:
        return yaml.load(text, Loader=StrictLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise FadrmError(f"{source} is not valid YAML ({problem}{where})") from None


def read_yaml(path: Path, source: str) -> Any:
    """The value the YAML file ``path`` holds (see :func:`load_yaml`); ``source`` names it in errors.

    Raises:
        FadrmError: the file cannot be read, is not UTF-8 text, or is not valid YAML.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FadrmError(f"cannot read {source} ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FadrmError(
            f"{source} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); give a YAML file"
        ) from None
    return load_yaml(text, source)
