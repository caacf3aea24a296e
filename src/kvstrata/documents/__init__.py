"""Per-document precomputed KV for static corpora (KVLink-style), training-free.

Compute each document's KV once, alone (``precompute``), store it in a corpus
namespace of some tiers with a manifest (``corpus``), and stitch documents
into any prompt that starts with them, keys re-rotated to their positions
(``rope``, ``stitch``), inside vLLM through StrataConnector (``connector``).
See docs/documents.md.
"""

from kvstrata.documents.corpus import Corpus, DocEntry, Manifest, corpus_tiers, tokens_hash
from kvstrata.documents.rope import Rope, UnsupportedRope
from kvstrata.documents.stitch import REPAIRS, Segment, StitchPlan, plan_stitch

__all__ = [
    "REPAIRS",
    "Corpus",
    "DocEntry",
    "Manifest",
    "Rope",
    "Segment",
    "StitchPlan",
    "UnsupportedRope",
    "corpus_tiers",
    "plan_stitch",
    "tokens_hash",
]
