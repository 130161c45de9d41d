"""Option types shared by the command lines (``mvcompile`` and ``mvcompile train``)."""

from __future__ import annotations

import math
from typing import Any

import click


class FloatRange(click.FloatRange):
    """click's FloatRange, refusing NaN, which it lets through (every comparison with NaN is
    false, so no bound ever fails), and infinity, which no option of ours means (an infinite
    learning rate or tolerance)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if isinstance(number, float) and math.isnan(number):
            self.fail("must be a number, not NaN.", param, ctx)
        if isinstance(number, float) and math.isinf(number):
            self.fail("must be a finite number.", param, ctx)
        return number


class NonEmptyPath(click.Path):
    """click.Path that refuses an empty string, which would otherwise mean the current folder
    (a quoting slip such as --data "$UNSET" then searches all of it), or, for an optional
    path such as --resume "$RUN", no value at all."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        if value == "":
            self.fail("is empty; give a file or folder path.", param, ctx)
        return super().convert(value, param, ctx)
