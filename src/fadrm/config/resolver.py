"""Building a stage's config from its layers; reading config files and writing ``config.yaml``.

One resolver, :func:`resolve`, builds any stage's config from layers, later wins:

1. the dataclass defaults;
2. what the method itself brings (:attr:`fadrm.synthesis.methods.Method.defaults`);
3. the dataset's preset (``presets/<dataset>.yaml``), its section for the stage, then that
   section's ``overrides.<method>`` and ``overrides.<method>@<ipc>``;
4. a config file given by the user (``--config``), e.g. a ``config.yaml`` a run wrote;
5. the options given on the command line or to the Python API.

Presets, config files and the API name an option by its *key*: the field's name, or the name
it declares to stay unique within the stage (``patch_crop_scale`` for ``patches.crop_scale``).
Files may nest keys under their part (``patches: {crop_scale: ...}``), as written configs do,
or give them flat.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

import yaml

from ..errors import FadrmError
from ..io import atomic_path
from ..registry import registry
from ..yaml_input import read_yaml
from .identity import defining_settings
from .options import Options, check_option, flag_of, is_part, key_of, option_fields, part_names, validate
from .presets import preset_parts


@dataclass(frozen=True)
class StageConfig(Options):
    """A stage's whole config: what the resolver builds and a run writes as ``config.yaml``."""

    # The preset section this stage reads.
    SECTION: ClassVar[str] = ""

    def identity(self) -> dict[str, Any]:
        """The fields that define the result, by key (used to refuse resuming into a different run)."""
        return defining_settings(type(self), self.to_dict())

    @classmethod
    def protocol_method(cls, method: str | None, chosen: dict[str, Any]) -> str | None:
        """The method whose defaults and preset overrides this stage takes (its own, unless a stage says otherwise)."""
        return method

    @classmethod
    def preset_layers(
        cls, dataset: str, method: str | None, ipc: int | None, chosen: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The preset's layers for this stage: its section, then its ``overrides.<method>`` and
        ``overrides.<method>@<ipc>``, each read on its own (flat or nested keys alike)."""
        return [nest(cls, values, where) for where, values in preset_parts(dataset, cls.SECTION, method, ipc)]


def merged(cls: type[Options], *layers: Mapping[str, Any]) -> dict[str, Any]:
    """Nested layers of ``cls``, later over earlier: a part merged option by option, any other
    value (a list, a key=value mapping such as ``model_args``) replaced whole."""
    parts = part_names(cls)
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            out[key] = {**out.get(key, {}), **value} if key in parts else value
    return out


def _plain(value: Any) -> Any:
    """Paths as text and tuples as lists, as they are written to YAML and JSON."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def nest(cls: type[StageConfig], values: Mapping[str, Any], source: str, drop_unset: bool = False) -> dict[str, Any]:
    """Flat or nested ``values`` as the nested form of ``cls``; unknown keys fail naming ``source``.

    With ``drop_unset``, None and each field's ``unset`` value count as not given. A single
    value for an option given by repeating its flag (``teachers: t.pt``) is a list of one.
    """
    if not isinstance(values, Mapping):
        raise FadrmError(f"{source} is not a mapping of options")
    by_key = {key_of(f): (path, f) for path, f in option_fields(cls)}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in part_names(cls):
            if not isinstance(value, Mapping):
                raise FadrmError(f"{source}: {key} must be a mapping of its options, got {value!r}")
            items = []
            for sub_key, sub_value in value.items():
                # Inside a part, a field's own name is accepted as well as its key.
                sub = next((f for f in fields(hints[key]) if sub_key in (f.name, key_of(f))), None)
                if sub is None:
                    raise FadrmError(f"{source} sets unknown option {key}.{sub_key}")
                items.append(((key, sub.name), sub, sub_value))
        elif key in by_key:
            items = [(*by_key[key], value)]
        else:
            raise FadrmError(f"{source} sets unknown option {key!r}")
        for path, f, given in items:
            given = _plain(given)
            if drop_unset and (given is None or (f.metadata["unset"] is not None and given == f.metadata["unset"])):
                continue
            if f.metadata["repeat"] and isinstance(given, str):
                given = [given]
            target = out
            for name in path[:-1]:
                target = target.setdefault(name, {})
            target[path[-1]] = given
    return out


def build(cls: type[StageConfig], values: Mapping[str, Any]) -> StageConfig:
    """A stage config from nested values; required options that are missing fail with their flag."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if is_part(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values.get(f.name, {}))
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:
            raise FadrmError(f"give {flag_of(f) if not f.metadata['positional'] else f.name.upper()}")
    return cls(**kwargs)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's values (YAML mapping), as written next to every output."""
    path = Path(path)
    if not path.is_file():
        raise FadrmError(f"config file {path} not found")
    values = read_yaml(path, f"config file {path}")
    if not isinstance(values, dict):
        raise FadrmError(f"config file {path} does not hold a mapping of options")
    return values


def resolve(
    cls: type[StageConfig],
    given: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
    dataset: str | None = None,
    method: str | None = None,
    ipc: int | None = None,
) -> Any:
    """Build and validate a stage's config from its layers (see the module docstring).

    Args:
        cls: the stage's config class.
        given: options by key (None: not given), from the command line or the API.
        config_file: a YAML file of options (a written ``config.yaml`` replays exactly).
        dataset, method, ipc: which preset applies, when the stage has no such option
            (evaluation takes them from the distilled set); otherwise read from the options.
    """
    given_values = nest(cls, given or {}, "the options given", drop_unset=True)
    file_values = (
        nest(cls, read_config_file(config_file), f"config file {config_file}", drop_unset=True) if config_file else {}
    )
    chosen = merged(cls, file_values, given_values)
    # Which preset applies: the stage's own options where it has them and they are set (checked
    # before the preset is read), else what the caller says (evaluation: the set's dataset).
    context = {"dataset": dataset, "method": method, "ipc": ipc}
    for path, f in option_fields(cls):
        if path[0] in context and (value := chosen.get(f.name, f.default)) not in (MISSING, None):
            check_option(cls, key_of(f), value)
            context[f.name] = value
    if context["dataset"] is None:
        raise FadrmError("give --dataset")
    layers: list[dict[str, Any]] = []
    method = cls.protocol_method(None if context["method"] is MISSING else context["method"], chosen)
    if method is not None:
        method_defaults = registry("method").get(method).defaults.get(cls.SECTION, {})
        layers.append(nest(cls, method_defaults, f"method {method}"))
    layers += cls.preset_layers(context["dataset"], method, context["ipc"], chosen)
    config = build(cls, merged(cls, *layers, chosen))
    validate(config)
    return config


def write_config(path: str | Path, config: StageConfig) -> None:
    """Write the resolved config as YAML (atomically); ``--config`` reads it back."""
    with atomic_path(path) as tmp:
        tmp.write_text(dump_config(config))


def written_form(config: StageConfig) -> dict[str, Any]:
    """The config as a file holds it: one-shot options (``overwrite``) at their default."""
    values = config.to_dict()
    for path, f, _ in config.leaves():
        if not f.metadata["persist"]:
            target = values
            for name in path[:-1]:
                target = target[name]
            target[path[-1]] = f.default
    return values


class _ConfigDumper(yaml.SafeDumper):
    """Mappings as blocks, lists of plain values on one line (``sizes: [24, 28]``)."""


_ConfigDumper.add_representer(
    list,
    lambda dumper, values: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", values, flow_style=not any(isinstance(v, (list, dict)) for v in values)
    ),
)


def dump_yaml(values: Any) -> str:
    """YAML as fadrm writes configs: in declaration order, lists of plain values on one line."""
    return yaml.dump(values, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False)


def dump_config(config: StageConfig) -> str:
    """The config as the YAML that ``--config`` replays (see :func:`written_form`)."""
    return dump_yaml(written_form(config))
