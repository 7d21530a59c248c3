"""Name-based registries: a new router or dispatch is one file plus one `register` line.

An entry may declare its options: a frozen `jmoe.options.Options` dataclass kept next to
its code (`ROUTERS.add("topk", router, options=TopKOptions)`). `MoEConfig` builds, checks and
stores the options of the methods it selects.
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from jmoe.options import NoOptions, Options

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to implementations with helpful errors.

    >>> COLORS = Registry("color")
    >>> COLORS.add("red", 1)
    1
    >>> COLORS.get("blue")
    Traceback (most recent call last):
    ...
    ValueError: unknown color 'blue'; known: red
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._options: dict[str, type[Options]] = {}

    def add(self, name: str, item: T, *, options: type[Options] | None = None) -> T:
        """Register `item` as `name`, with its options class (none by default)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if options is not None and not (isinstance(options, type) and issubclass(options, Options)):
            raise ValueError(f"{self.kind} {name!r}: options must be a jmoe.options.Options subclass")
        self._items[name] = item
        self._options[name] = options or NoOptions
        return item

    def register(self, name: str, *, options: type[Options] | None = None):
        """Decorator form of `add`."""

        def deco(item: T) -> T:
            return self.add(name, item, options=options)

        return deco

    def remove(self, name: str) -> None:
        """Unregister `name` (for entries added by scripts and tests)."""
        self.get(name)
        del self._items[name]
        del self._options[name]

    def options(self, name: str) -> type[Options]:
        """The options class of entry `name` (`NoOptions` when it takes none)."""
        self.get(name)
        return self._options[name]

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items)) or 'none'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items
        except TypeError:  # unhashable
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


# The registries of the stack. Implementations register themselves when their module is
# imported; `import jmoe` imports all of them.
ROUTERS: Registry = Registry("router")
DISPATCHERS: Registry = Registry("dispatch")
DROPLESS_IMPLS: Registry = Registry("dropless impl")
ACTIVATIONS: Registry = Registry("activation")
BALANCE_LOSSES: Registry = Registry("balance loss")
ADAPTERS: Registry = Registry("adapter")
ROUTING_EDITS: Registry = Registry("routing edit")
