"""Attack budgets: pixel units, parsing of "5px" / "5/255" / 0.0196 (ambiguous bare values refused), step rules."""

from __future__ import annotations

import math
import re

import numpy as np

STEP_RULES = ("kurakin", "kurakin_round")


def px(n: float) -> float:
    """``n`` pixels (0..255 scale) in [0,1] units: ``n / 255``."""
    return float(n) / 255.0


def parse_number(value: str | float, name: str) -> float:
    """A non-negative finite number from a float or a string ("5px", "5/255", "0.0196"); no upper bound."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number or a string like '5px' / '5/255' / '0.0196', got {value!r}")
    if isinstance(value, str):
        s = value.strip().lower().replace(" ", "")
        try:
            if s.endswith("px"):
                v = float(s[:-2]) / 255.0
            elif "/" in s:
                num, den = s.split("/", 1)
                v = float(num) / float(den)
            else:
                v = float(s)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{name}={value!r} is not a number; expected e.g. 0.0196, '5/255' or '5px'") from None
    else:
        v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}={value!r} must be finite")
    if v < 0:
        raise ValueError(f"{name}={value!r} must be >= 0")
    return v


def parse_eps(value: str | float, name: str = "eps") -> float:
    """A budget in [0,1] units from a float or a string ("5px", "5/255", "0.0196").

    Refused as pixel units in disguise: values > 1, and a bare integer >= 1 (``1``, ``"1"``: one pixel or the
    whole range?). ``0`` is a zero budget; the float ``1.0`` (or ``"1.0"``) is the whole [0,1] range.
    """
    v = parse_number(value, name)
    if v > 1 and isinstance(value, str) and value.strip().lower().endswith("px"):
        raise ValueError(f"{name}={value!r} = {v:.4g} exceeds 1, the whole [0,1] pixel range")
    if v > 1 or _is_bare_integer(value) and v >= 1:
        n = f"{int(v)}" if _is_bare_integer(value) else value.strip() if isinstance(value, str) else f"{v:g}"
        what = "is ambiguous (1 pixel or the whole [0,1] range?)" if v == 1 else "looks like pixel units"
        whole = "; 1.0 is the whole range" if v == 1 else ""
        raise ValueError(f"{name}={n} {what}; budgets are in [0,1] units: use px({n}) or '{n}px' (= {n}/255)"
                         f"{whole}")
    return v


def _is_bare_integer(value: object) -> bool:
    """An int (not bool) or a string of digits only: what a pixel count looks like."""
    if isinstance(value, str):
        return re.fullmatch(r"\s*\+?\d+\s*", value) is not None
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def resolve_steps(steps: int | str, eps: float) -> int:
    """An iteration count, or a rule: "kurakin" = int(min(eps_px+4, 1.25 eps_px)) (Bai), "kurakin_round" = round()."""
    if isinstance(steps, str) and steps.strip().lower() in STEP_RULES:
        e = round(eps * 255.0, 6)
        t = min(e + 4.0, 1.25 * e)
        return int(t) if steps.strip().lower() == "kurakin" else int(round(t))
    try:
        if isinstance(steps, bool):
            raise ValueError
        n = int(steps)
        if isinstance(steps, float) and n != steps:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"steps={steps!r} must be an int >= 0 or one of {STEP_RULES}") from None
    if n < 0:
        raise ValueError(f"steps={steps!r} must be >= 0")
    return n


def parse_eps_list(text: str, name: str = "eps_list") -> list[float]:
    """``"1px,2px,4px"`` or ``"0.004,0.008"`` -> budgets in [0,1] units (each parsed like :func:`parse_eps`); an
    error names every bare value that looks like pixel units and gives the whole list rewritten in ``px``."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise ValueError(f"{name} {text!r}: empty list; expected e.g. 1px,2px,4px,8px")
    pixel_like = [s for s in items if _is_number(s) and (float(s) > 1 or _is_bare_integer(s) and float(s) >= 1)]
    if pixel_like:
        fixed = ",".join(f"{s}px" if s in pixel_like else s for s in items)
        names = pixel_like[0] if len(pixel_like) == 1 else f"{', '.join(pixel_like[:-1])} and {pixel_like[-1]}"
        verb = "looks" if len(pixel_like) == 1 else "look"
        note = " (a bare 1 is ambiguous: 1 pixel or the whole range)" if any(float(s) == 1 for s in pixel_like) \
            else ""
        raise ValueError(f"{name}={','.join(items)}: {names} {verb} like pixel units{note}; budgets are in [0,1] "
                         f"units: for the whole list use {fixed}")
    out = []
    for s in items:
        try:
            out.append(float(parse_eps(s, name)))
        except ValueError as e:
            raise ValueError(" ".join(str(e).split())) from None
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def eps_label(eps: float) -> str:
    """A budget in [0,1] units as a short pixel label: ``5/255`` -> "5px", ``0.01`` -> "2.55px"."""
    v = eps * 255
    return f"{round(v)}px" if math.isclose(v, round(v), abs_tol=1e-6) else f"{v:.3g}px"
