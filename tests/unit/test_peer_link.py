"""What a region keeps of a peer's stream: the cursor of the peer's outbox, and what the peer holds."""

from mlchat.leader.replication import PeerLink


def test_the_later_cursor_of_one_outbox_is_kept_and_what_the_peer_holds_stays():
    link = PeerLink("eu-west", "127.0.0.1:1", cursor="e1:0005", vector={"eu-west": "h9"})
    link.told_cursor("e1:0007")
    link.told_cursor("e1:0006")  # a stream told an older one (a resumed stream's catch-up)
    assert link.cursor == "e1:0007"
    assert link.vector == {"eu-west": "h9"}


def test_a_cursor_of_another_outbox_replaces_the_cursor_and_forgets_what_the_peer_held():
    # The peer's Redis lost or restored its data: it now holds less than its stream told before, and relays it
    # lacks must not be dropped as held.
    link = PeerLink("eu-west", "127.0.0.1:1", cursor="e1:0007", vector={"eu-west": "h9", "us-east": "h4"})
    link.told_cursor("e2:0001")
    assert link.cursor == "e2:0001"
    assert link.vector == {}


def test_the_first_cursor_told_keeps_what_the_catch_up_said_the_peer_holds():
    link = PeerLink("eu-west", "127.0.0.1:1", vector={"eu-west": "h9"})
    link.told_cursor("e1:0001")
    assert link.cursor == "e1:0001"
    assert link.vector == {"eu-west": "h9"}
