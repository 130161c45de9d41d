"""Lowering to deployment formats: ONNX Runtime mobile (.ort) and Core ML (.mlpackage).

- :func:`mvcompile.backends.ort.write_ort` — ``.ort`` plus the operator configs for a
  reduced-op ORT build, verified against the ``.onnx``.
- :func:`mvcompile.backends.coreml.write_coreml` — MIL program → ML Program ``.mlpackage``,
  verified against ONNX Runtime (``MLModel.predict`` on macOS, the NumPy MIL evaluator in
  :mod:`.mil_eval` elsewhere).

The modules are not imported here: coremltools takes seconds to import.
"""
