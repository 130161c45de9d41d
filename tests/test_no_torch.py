"""The compiler, quantizer and ONNX Runtime backend must not import torch (only train/ does)."""

from __future__ import annotations

import subprocess
import sys

MODULES = ["mvcompile", "mvcompile.cli", "mvcompile.builder", "mvcompile.int8_build",
           "mvcompile.optimize", "mvcompile.backends.ort", "mvcompile.pipeline",
           "mvcompile.passes.unfold_fold", "mvcompile.calibration.quantize",
           "mvcompile.graphs.factory", "mvcompile.train.data", "mvcompile.train.sampler"]


def test_importing_the_compiler_does_not_import_torch() -> None:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in MODULES)
            + "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False", result.stderr
