"""Lowering to deployment formats: ONNX Runtime mobile (.ort) and Core ML (.mlpackage)."""
