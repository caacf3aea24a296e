"""Routing policies: which tiers a request reads and
writes, and whether loading beats recomputing."""
