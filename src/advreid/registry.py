"""The one registry and factory mechanism: named builders with preset defaults, checked parameters, did-you-mean.

Datasets, backbones, heads, models, attacks, passive and proactive defenses and training recipes all register here.
A :class:`Preset` is a builder (a class or a function) plus the defaults of one named preset; building it checks
every keyword against the builder's signature up front, so a typo is one clear line (with "did you mean") instead of
a silently ignored setting. Unknown names and unknown parameters raise one error type, :class:`RegistryError`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError, ValueError, TypeError):
    """An unknown name or an unknown parameter. It is a KeyError, a ValueError and a TypeError at once, so callers
    written against any of the three keep working; its message is the plain text (not KeyError's quoted repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def param_names(builder: Callable[..., Any], skip: int = 0) -> set[str]:
    """Keyword names a builder accepts: a function's parameters, or a class's ``__init__`` parameters along its MRO
    for as long as each ``__init__`` forwards ``**kwargs``. The first ``skip`` positional parameters (after
    ``self``) are left out: they are passed positionally (e.g. the model an attack is built on)."""
    chain = [k.__init__ for k in builder.__mro__ if "__init__" in vars(k)] if inspect.isclass(builder) else [builder]
    names: set[str] = set()
    for fn in chain:
        params = list(inspect.signature(fn).parameters.values())
        if inspect.isclass(builder):
            params = params[1:]  # self
        for p in params[skip:]:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                names.add(p.name)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


class Preset:
    """A named builder plus preset defaults: ``preset(*args, **params)`` builds ``builder(*args, **{**defaults,
    **params})`` after checking every name in ``params`` (``allowed`` overrides the names read off the signature;
    ``exclude`` removes some, e.g. arguments the caller always passes itself)."""

    def __init__(self, kind: str, name: str, builder: Callable[..., Any], defaults: dict[str, Any] | None = None, *,
                 skip: int = 0, allowed: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> None:
        self.kind, self.name, self.builder = kind, name, builder
        self.defaults = dict(defaults or {})
        self._allowed = (set(allowed) if allowed is not None else param_names(builder, skip)) - set(exclude)
        bad = sorted(set(self.defaults) - self._allowed)
        if bad:
            raise RegistryError(f"{kind} preset {name!r}: {getattr(builder, '__name__', builder)} has no "
                                f"parameter(s) {bad}")

    def allowed(self) -> set[str]:
        """The parameter names this preset accepts."""
        return set(self._allowed)

    def check(self, params: Iterable[str]) -> None:
        """Raise :class:`RegistryError` naming every unknown parameter (with did-you-mean) and the valid ones."""
        bad = sorted(set(params) - self._allowed)
        if bad:
            hints = ", ".join(f"{b!r}{did_you_mean(b, self._allowed)}" for b in bad)
            raise RegistryError(f"{self.kind} {self.name!r}: unknown parameter(s) {hints}; "
                                f"allowed: {sorted(self._allowed)}")

    def resolve(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The preset's defaults updated with ``params`` (checked)."""
        params = dict(params or {})
        self.check(params)
        return {**self.defaults, **params}

    def __call__(self, *args: Any, **params: Any) -> Any:
        obj = self.builder(*args, **self.resolve(params))
        if hasattr(obj, "__dict__") and not inspect.isclass(obj):
            try:
                obj.name = self.name  # a built object knows the preset name it was made from (labels, tables)
            except AttributeError:  # a read-only property
                pass
        return obj

    def __repr__(self) -> str:
        return f"Preset({self.kind}:{self.name} -> {getattr(self.builder, '__name__', self.builder)}, {self.defaults})"


class Registry(Generic[T]):
    """Name -> object mapping (often :class:`Preset` s). Names are case-insensitive; registering a taken name is an
    error unless ``overwrite=True``; an unknown name is a :class:`RegistryError` listing the names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False) -> Any:
        """Register ``obj`` under ``name``; without ``obj`` acts as a decorator."""
        if obj is None:
            def deco(o: T) -> T:
                self.register(name, o, overwrite=overwrite)
                return o

            return deco
        key = name.lower()
        if key in self._items and not overwrite and self._items[key] is not obj:
            raise RegistryError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
        self._items[key] = obj
        return obj

    def add_preset(self, name: str, builder: Callable[..., Any], *, skip: int = 0,
                   allowed: Iterable[str] | None = None, exclude: Iterable[str] = (), overwrite: bool = False,
                   **defaults: Any) -> Preset:
        """Register a :class:`Preset` of ``builder`` with ``defaults`` under ``name``."""
        preset = Preset(self.kind, name, builder, defaults, skip=skip, allowed=allowed, exclude=exclude)
        self.register(name, preset, overwrite=overwrite)  # type: ignore[arg-type]
        return preset

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what was registered under it."""
        obj = self.get(name)
        del self._items[str(name).lower()]
        return obj

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            raise RegistryError(f"unknown {self.kind} {name!r}{did_you_mean(key, self._items)}; expected one of: "
                                f"{', '.join(sorted(self._items))}")
        return self._items[key]

    def build(self, name: str, *args: Any, **params: Any) -> Any:
        """Look up ``name`` and call it (a preset checks ``params`` first)."""
        return self.get(name)(*args, **params)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Build: look up ``name`` and call it with the given arguments."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]
