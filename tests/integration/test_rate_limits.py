"""Per-user rate limits on a real leader: a user over its limit gets RESOURCE_EXHAUSTED with a retry
hint, nothing is stored for the refused call, and other users are not held back."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from support import wait_until

from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess


@pytest.fixture(scope="module")
def strict_leader(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeaderProcess]:
    with LeaderProcess("us-east", tmp_path_factory.mktemp("limited"), redis_url=redis_url,
                       extra_args=("--user-rate", "0.5", "--user-burst", "5")) as proc:
        yield proc


def test_a_user_over_its_rate_gets_resource_exhausted_with_a_retry_hint(strict_leader):
    hasty = ChatClient(strict_leader.address)
    hasty.claim("hasty_user", "hasty-user-claim-key-0001")
    posted = [hasty.post("limited", f"m{i}", f"limited-{i}") for i in range(5)]  # the burst
    with pytest.raises(grpc.RpcError) as refused:
        hasty.post("limited", "one too many", "limited-5")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over its limit of 0.5 calls a second" in refused.value.details()
    hint = dict(refused.value.trailing_metadata())["retry-after-ms"]
    assert 1 <= int(hint) <= 2000

    calm = ChatClient(strict_leader.address)  # another user is not held back
    calm.claim("calm_user", "calm-user-claim-key-0001")
    assert calm.list("limited").messages[-1].id == posted[-1].message.id  # the refused post was not stored
    assert len(calm.list("limited").messages) == 5

    def accepted_again() -> bool:
        try:
            hasty.post("limited", "one too many", "limited-5")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return False
        return True

    wait_until(accepted_again, 5, "the user's calls accepted once its bucket refilled")
