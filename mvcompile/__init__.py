"""mvcompile: an ONNX-first graph compiler and INT8 quantizer for MobileViT.

Python API::

    from mvcompile import BuildOptions, build
    result = build(BuildOptions(size="xxs", resolution=256, out_dir="out/xxs"))
    result.model_path, result.report["models"]["onnx"]["parameters"]
"""

from mvcompile.builder import BuildOptions, BuildResult, build
from mvcompile.errors import UserError

__all__ = ["BuildOptions", "BuildResult", "UserError", "build"]
