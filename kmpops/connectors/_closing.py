"""A context-manager base for connectors whose ``close()`` releases what they hold."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """``with obj:`` returns ``obj`` and calls ``obj.close()`` on the way out (errors propagate).

    Subclasses implement :meth:`close`; it must be safe to call more than once.
    """

    def close(self) -> None:
        """Release held resources; the default holds none."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
