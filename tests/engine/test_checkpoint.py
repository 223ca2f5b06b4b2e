import pytest
import torch

from medflow.engine.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from medflow.errors import DataError

MINIMAL = {
    "format": FORMAT,
    "config": {},
    "net": {},
    "preprocessing": {},
    "labels": {},
    "channel_names": [],
    "model": {"w": torch.ones(2)},
    "step": 3,
}


class Exploit:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_round_trip(tmp_path):
    save_checkpoint(tmp_path / "c.pt", MINIMAL)
    back = load_checkpoint(tmp_path / "c.pt")
    assert back["step"] == 3 and torch.equal(back["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


def test_malicious_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({**MINIMAL, "payload": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="evil.pt: refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_truncated_and_foreign_files(tmp_path):
    save_checkpoint(tmp_path / "c.pt", MINIMAL)
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "t.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="other.pt: not a medflow checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(DataError, match="text.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(DataError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
