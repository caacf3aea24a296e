"""Test and benchmark helpers for kvstrata (real local Redis and S3 servers: see ``services``)."""
