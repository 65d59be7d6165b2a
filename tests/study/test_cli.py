import hashlib

from fmalib.study.cli import main, parse_shard, write_asset_manifest


def test_data_stage_and_clear_error_exit(tmp_path, capsys):
    assert main(["data", "--fast", "--set", f"data.root={tmp_path / 'd'}", "--set", f"workdir={tmp_path / 'w'}"]) == 0
    assert "train: 12 images" in capsys.readouterr().out
    assert main(["data", "--set", "data.nope=1"]) == 2
    assert "--set data.nope=1 (over params/toy.yaml): unknown key data.nope" in capsys.readouterr().err
    assert parse_shard("3/8") == (3, 8)


def test_asset_manifest_matches_sha256sum(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"weights")
    text = write_asset_manifest(tmp_path).read_text()
    assert text == f"{hashlib.sha256(b'weights').hexdigest()}  w.pt\n"
