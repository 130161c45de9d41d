"""Models authored as ONNX graphs with onnxscript (imported as ``mvcompile.graphs``)."""
