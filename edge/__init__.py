"""Stitch edge: ONNX export, ORT runtime, SEE gate, gRPC client SDK."""
