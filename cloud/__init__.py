"""Stitch cloud: pruned large VLM (SGP) in PyTorch behind a gRPC service."""
