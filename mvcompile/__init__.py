"""mvcompile: an ONNX-first graph compiler and INT8 quantizer for MobileViT.

Python API::

    from mvcompile import BuildOptions, build
    result = build(BuildOptions(size="xxs", resolution=256, out_dir="out/xxs"))
    result.model_path, result.report["models"]["onnx"]["parameters"]

The names are imported on first use (PEP 562), so that importing a submodule, and starting
the CLI (:mod:`mvcompile._entry`), loads nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time, __getattr__ below
    from mvcompile.builder import BuildOptions, BuildResult, build
    from mvcompile.errors import UserError

__all__ = ["BuildOptions", "BuildResult", "UserError", "build"]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    if name in ("BuildOptions", "BuildResult", "build"):
        from mvcompile import builder

        return getattr(builder, name)
    if name == "UserError":
        from mvcompile.errors import UserError

        return UserError
    raise AttributeError(f"module 'mvcompile' has no attribute {name!r}")
