"""The S3 tier (:mod:`.tier`), its transports, and the NIXL transport (:mod:`.nixl`)."""
