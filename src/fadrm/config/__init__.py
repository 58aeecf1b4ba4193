"""Every stage's typed configuration, defined once; presets; one resolver; the resolved config on disk.

Each stage has one dataclass (:class:`TeacherConfig`, :class:`DistillConfig` with its
:class:`SynthesisConfig` and :class:`PatchConfig` parts, :class:`EvalConfig`, :class:`StatsConfig`,
:class:`PriorsConfig`, and :class:`RunConfig` for the whole pipeline). Each field is declared once
with :func:`option` (:mod:`.options`): its default, its help text, whether it *defines* the result
(and so the identity a resume checks, :mod:`.identity`) or only how the work is executed, its valid
values, and its command-line flag. The CLI flags, the validation and the identities are all
generated from these declarations. Options several stages share are declared once in
:mod:`.fields`; the presets are read by :mod:`.presets`; :func:`resolve` (:mod:`.resolver`) builds a
stage's config from its layers and writes it back as ``config.yaml``.
"""

from .distillation import DEFAULT_BATCH_IMAGES, DistillConfig, PatchConfig, SynthesisConfig
from .evaluation import COMMON_PROTOCOL_METHOD, PROTOCOL_WORDS, EvalConfig
from .identity import UNCHANGED_SINCE, defining_settings
from .options import (
    DIFFICULTIES,
    Options,
    check_option,
    choices_of,
    difficulty_band,
    flag_of,
    flatten,
    in_range,
    key_of,
    option,
    option_fields,
    option_type,
    validate,
)
from .presets import DEFAULT_STUDENT_RECIPE, load_preset_section, preset_names, student_recipe
from .resolver import StageConfig, build, dump_config, dump_yaml, read_config_file, resolve, write_config, written_form
from .stages import STAGES, PriorsConfig, RunConfig, StatsConfig, TeacherConfig

__all__ = [
    "COMMON_PROTOCOL_METHOD",
    "DEFAULT_BATCH_IMAGES",
    "DEFAULT_STUDENT_RECIPE",
    "DIFFICULTIES",
    "PROTOCOL_WORDS",
    "STAGES",
    "UNCHANGED_SINCE",
    "DistillConfig",
    "EvalConfig",
    "Options",
    "PatchConfig",
    "PriorsConfig",
    "RunConfig",
    "StageConfig",
    "StatsConfig",
    "SynthesisConfig",
    "TeacherConfig",
    "build",
    "check_option",
    "choices_of",
    "defining_settings",
    "difficulty_band",
    "dump_config",
    "dump_yaml",
    "flag_of",
    "flatten",
    "in_range",
    "key_of",
    "load_preset_section",
    "option",
    "option_fields",
    "option_type",
    "preset_names",
    "read_config_file",
    "resolve",
    "student_recipe",
    "validate",
    "write_config",
    "written_form",
]
