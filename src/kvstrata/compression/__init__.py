"""Codecs that compress KV before it is written to a tier."""
