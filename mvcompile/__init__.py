"""mvcompile: an ONNX-first graph compiler and INT8 quantizer for MobileViT."""
