"""What a long operation tells its user, and how: lines of text and progress bars.

Library code (the training loop, the latent cache, the VAE trainer) receives a ``Console``
and never prints itself. This base class says nothing and draws nothing; the commands
pass ``commands.Terminal``, which prints lines on stdout and draws bars on a terminal.
"""

from __future__ import annotations

from typing import Iterable

__all__ = ["Bar", "Console"]


class Bar:
    """A progress bar that draws nothing."""

    disable = True

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


class Console:
    """Says nothing (the default for library calls); ``interactive`` is True where bars are drawn."""

    interactive = False

    def line(self, text: str) -> None:
        pass

    def bar(self, total: int, initial: int = 0, desc: str = "") -> Bar:
        return Bar()

    def wrap(self, iterable: Iterable, desc: str = "") -> Iterable:
        return iterable
