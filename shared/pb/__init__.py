"""Generated gRPC stubs for proto/stitch/v1 (do not edit; run python -m stitchvlm.shared.codegen)."""
