"""Offline jobs: model conversion, KV capture, document precompute, the offline vLLM runner."""
