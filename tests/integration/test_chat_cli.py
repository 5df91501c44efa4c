"""`mlchat chat`, the terminal client, as a child process against a real leader."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from chat_process import ChatProcess

from mlchat.leader.process import LeaderProcess

LIVE = r"^\[\d\d:\d\d:\d\d\] #{channel} {user}@us-east \([+-]\d+ ms\): {body}$"
PAST = r"^\[\d\d:\d\d:\d\d\] #{channel} {user}@us-east: {body}$"


def _run(leader: LeaderProcess, user: str, key_file: Path, commands: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlchat", "chat", "--user", user, "--connect", f"us-east={leader.address}",
         "--key-file", str(key_file)], input=commands, capture_output=True, text=True, timeout=60)


def test_a_piped_session_shows_messages_with_region_and_latency(leader: LeaderProcess, unique: str, tmp_path: Path):
    user, channel = f"alice_{unique}", f"c{unique}"
    run = _run(leader, user, tmp_path / "key", f"/join {channel}\nfirst post\nsecond post\n"
                                               f"/status away out for lunch\n/who {user}\n/history 5\n/quit\n")
    assert run.returncode == 0 and run.stderr == "", run.stderr
    out = run.stdout.splitlines()
    assert out[0] == f"* signed in as {user} in us-east (claim CONFIRMED)"
    assert out[1] == f"* now in #{channel} (following #{channel})"
    assert re.match(LIVE.format(channel=channel, user=user, body="first post"), out[2]), out
    assert re.match(LIVE.format(channel=channel, user=user, body="second post"), out[3]), out
    assert re.match(rf"^\* {user} is away: out for lunch \(set in us-east at \d\d:\d\d:\d\d\)$", out[4]), out
    assert out[5] == f"* {user}: claim CONFIRMED (claimed in us-east)"
    assert re.match(PAST.format(channel=channel, user=user, body="first post"), out[7]), out
    assert re.match(PAST.format(channel=channel, user=user, body="second post"), out[8]), out
    assert len(out) == 9, out


def test_the_same_key_signs_in_as_the_same_user_and_sees_its_history(leader: LeaderProcess, unique: str,
                                                                      tmp_path: Path):
    user, channel = f"carol_{unique}", f"c{unique}"
    assert _run(leader, user, tmp_path / "key", f"/join {channel}\nbefore\n").returncode == 0
    again = _run(leader, user, tmp_path / "key", f"/join {channel}\n/history\n")
    assert again.returncode == 0, again.stderr
    assert re.search(PAST.format(channel=channel, user=user, body="before"), again.stdout, re.M), again.stdout
    stranger = _run(leader, user, tmp_path / "other-key", "")
    assert stranger.returncode == 1 and "ALREADY_EXISTS" in stranger.stderr and "Traceback" not in stranger.stderr


def test_a_second_client_sees_the_first_ones_message_live(leader: LeaderProcess, unique: str, tmp_path: Path):
    channel = f"c{unique}"
    reader = ChatProcess(f"bob_{unique}", tmp_path / "bob", "--connect", leader.address)
    try:
        reader.send(f"/join {channel}")
        reader.wait_for(rf"^\* now in #{channel}")
        writer = _run(leader, f"dave_{unique}", tmp_path / "dave", f"/join {channel}\nhi bob, live\n")
        assert writer.returncode == 0, writer.stderr
        reader.wait_for(LIVE.format(channel=channel, user=f"dave_{unique}", body="hi bob, live"))
        assert reader.finish() == ""
    finally:
        reader.stop()


def test_errors_show_the_grpc_status_and_never_a_traceback(leader: LeaderProcess, unique: str, tmp_path: Path):
    run = _run(leader, f"erin_{unique}", tmp_path / "key",
               f"a post before any join\n/join Not-A-Channel\n/who nobody_{unique}\n/history lots\n"
               f"/region mars\n/private p{unique}\n/add nobody_{unique}\n/quit\nnot read\n")
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout.splitlines()[1:] == [
        "! no current channel: /join CHANNEL first",
        "! INVALID_ARGUMENT: channel 'Not-A-Channel' is invalid: use 1 to 64 characters, lowercase letters, "
        "digits, '_', '.' and '-', starting with a letter or digit (^[a-z0-9][a-z0-9_.-]{0,63}$)",
        f"! NOT_FOUND: {_not_found(run.stdout)}",
        "! usage: /history [N], N from 1 to 500",
        "! unknown region 'mars': this client was given us-east",
        f"* created private channel #p{unique}",
        f"* now in #p{unique} (following #p{unique})",
        f"! NOT_FOUND: {_not_found(run.stdout)}",
    ]


def _not_found(out: str) -> str:
    """The leader's own words for an unknown user (the test pins the shape, not the wording)."""
    return re.findall(r"^! NOT_FOUND: (.*)$", out, re.M)[0]
