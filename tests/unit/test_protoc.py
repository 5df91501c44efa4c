"""The committed generated code matches what the .proto files generate now."""

from pathlib import Path

from mlchat.protoc import ROOT, generate


def test_generated_code_is_current(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "mlchat" / "v1").iterdir())
    assert fresh, "protoc generated nothing"
    for rel in fresh:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is not committed: run make proto"
        assert committed.read_text() == (tmp_path / rel).read_text(), f"{rel} is stale: run make proto"
    stubs = {p.name for p in (ROOT / "mlchat" / "v1").glob("*.pyi")}
    assert {"chat_pb2.pyi", "chat_pb2_grpc.pyi", "cluster_pb2.pyi", "cluster_pb2_grpc.pyi"} <= stubs
