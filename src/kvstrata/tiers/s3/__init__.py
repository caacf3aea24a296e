"""The S3 tier (:mod:`.tier`, kind ``s3``), its settings (:mod:`.settings`) and its transports:
the protocol and the choice (:mod:`.transport`), obstore (:mod:`.obstore_transport`), aioboto3
(:mod:`.aioboto3_transport`) and NIXL's OBJ plugin (:mod:`.nixl`)."""
