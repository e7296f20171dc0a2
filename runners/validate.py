"""Up-front checks of the numbers a user types on the command line.

Why: a bad value must cost no work and show no traceback. Hydra accepts any override (``steps=0``, ``guidance=abc``)
and the error would otherwise surface minutes later, deep in a sampler, as a ZeroDivisionError; or never, as with a
negative prompt limit that silently drops the last prompt of every set. Each check names the key, the value and the
fix in one line (a :class:`HarnessError`, printed by ``run.py`` with exit status 2).
"""

from __future__ import annotations

from typing import Any

from runners.models import HarnessError

# key -> (kind, minimum): kind "int" takes integers only, "number" integers or floats
GENERATION_NUMBERS: dict[str, tuple[str, float]] = {
    "steps": ("int", 1),
    "guidance": ("number", 0.0),
    "height": ("int", 8),
    "width": ("int", 8),
    "images_per_prompt": ("int", 1),
    "batch_size": ("int", 1),
    "seed": ("int", 0),
}
OPTIONAL_POSITIVE: tuple[tuple[str, str], ...] = (
    ("model", "max_prompts_per_set"),
    ("model", "max_attack_targets"),
    ("", "threads"),
)


def validate_config(cfg: dict[str, Any]) -> None:
    """Raise one :class:`HarnessError` for the first value that cannot work; return silently otherwise."""
    generation = (cfg.get("model") or {}).get("generation") or {}
    for key, (kind, minimum) in GENERATION_NUMBERS.items():
        if key in generation:
            _check_number(f"model.generation.{key}", generation[key], kind, minimum)
    for key in ("height", "width"):
        value = generation.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value % 8:
            raise HarnessError(f"model.generation.{key}={value}: the VAE needs a multiple of 8 (e.g. "
                               f"{max(8, value // 8 * 8)})")
    for group, key in OPTIONAL_POSITIVE:
        section = cfg.get(group) or {} if group else cfg
        if group:
            check_limit(f"{group}.{key}", section.get(key))
        elif section.get(key) is not None:
            _check_number(key, section[key], "int", 1, "; or null")


def check_limit(name: str, value: Any) -> None:
    """An optional positive count (``model.max_attack_targets``...): null, or an integer >= 1."""
    if value is not None:
        _check_number(name, value, "int", 1, "; or null for no limit")


def _check_number(name: str, value: Any, kind: str, minimum: float, alternative: str = "") -> None:
    allowed = (int,) if kind == "int" else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        what = "an integer" if kind == "int" else "a number"
        raise HarnessError(f"{name}={value!r} is not {what}; give {what} >= {_plain(minimum)}{alternative}")
    if value < minimum or value != value:
        raise HarnessError(f"{name}={value!r} is below {_plain(minimum)}; give a value >= {_plain(minimum)}"
                           f"{alternative}")


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)
