"""The S3 conformance suite against a real Ceph RGW (scripts/rgw.sh: one mon, one memstore
OSD, radosgw on 127.0.0.1), through both pure-Python-process transports.

Opt-in (``-m rgw``): the first start installs Debian's Ceph packages (about 30-45 s) and CI
keeps SeaweedFS. Run: ``pytest -m rgw tests/test_rgw.py``.
"""

from __future__ import annotations

import pytest

from kvstrata.tiers.base import Tier, create_tier
from tests.conftest import s3_settings, unique
from tests.test_tier_conformance import (  # noqa: F401  (collected here, against RGW)
    test_concurrent_puts_and_gets_from_many_tasks,
    test_contains_and_delete,
    test_corrupt_foreign_and_future_objects_are_misses,
    test_garbage_is_a_miss_not_a_crash,
    test_large_objects_and_long_headers,
    test_put_keeps_no_reference_to_a_mutable_buffer,
    test_put_replaces_object_and_its_cached_header,
    test_round_trip_every_layer_range_is_bit_exact,
    test_whole_gets_of_one_and_of_many_keys_with_absent_ones,
)

pytestmark = pytest.mark.rgw


@pytest.fixture(params=["obstore", "aioboto3"])
async def tier(request, rgw_server):
    """An S3 tier on the RGW (overrides conftest's ``tier`` for this module)."""
    t = create_tier(
        "s3",
        name=f"rgw-{request.param}",
        **s3_settings(rgw_server, request.param, prefix=f"t-{unique()}/"),
    )
    yield t
    await t.close()


async def test_a_wrong_secret_is_refused(rgw_server) -> None:
    """RGW checks signatures (a mock would not): a wrong secret can neither read nor write."""
    from kvstrata.tiers.base import TierError
    from tests.conftest import make_keys, make_object

    settings = s3_settings(rgw_server, "obstore", prefix=f"t-{unique()}/")
    settings["secret_access_key"] = "wrong"
    bad: Tier = create_tier("s3", **settings)
    (key,) = make_keys(1)
    with pytest.raises(TierError):
        await bad.put([(key, make_object(key)[0])])
    await bad.close()
