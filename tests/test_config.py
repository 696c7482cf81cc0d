import subprocess
import sys

import pytest

from kernel.settings import ConfigError, load_settings


def test_file_values_and_environment_overrides(tmp_path, monkeypatch):
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        "ae_title: NODE_A\nport: 11112\ndata_dir: d\n"
        "peers:\n  - {ae_title: CT1, host: 10.1.2.3}\n"
        "destinations:\n  - {name: pacs, ae_title: PACS, host: 10.1.2.4, port: 104}\n"
    )
    monkeypatch.setenv("DICOM_NODE_PORT", "11113")
    monkeypatch.setenv("DICOM_NODE_WEB__PORT", "9090")
    monkeypatch.setenv("DICOM_NODE_PEERS", '[{"ae_title": "*", "host": "192.168.0.0/16"}]')

    s = load_settings(cfg)

    assert s.ae_title == "NODE_A"
    assert s.port == 11113
    assert s.web.port == 9090
    assert s.data_dir == tmp_path / "d"  # relative to the settings file
    assert s.db_url == f"sqlite:///{tmp_path / 'd' / 'node.db'}"
    assert s.peer_allowed("ANY_AE", "192.168.7.7")
    assert not s.peer_allowed("CT1", "10.1.2.3")  # the environment replaced the list
    assert s.destination("pacs").port == 104


def test_environment_alone_is_enough(monkeypatch, tmp_path):
    monkeypatch.setenv("DICOM_NODE_PORT", "11112")
    monkeypatch.setenv("DICOM_NODE_DATA_DIR", str(tmp_path / "srv"))
    s = load_settings(None)
    assert s.port == 11112 and s.data_dir == tmp_path / "srv"
    assert s.peers == []  # default deny


def test_peer_with_named_ae_must_match_ae_and_address(tmp_path):
    s = load_settings(None, peers=[{"ae_title": "CT1", "host": "10.0.0.5"}])
    assert s.peer_allowed("CT1", "10.0.0.5")
    assert not s.peer_allowed("CT2", "10.0.0.5")
    assert not s.peer_allowed("CT1", "10.0.0.6")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("port: abc\n", "port: Input should be a valid integer"),
        ("ae_title: THIS_AE_TITLE_IS_TOO_LONG\n", "ae_title: AE title"),
        ("peers:\n  - {ae_title: X, host: not-an-ip}\n", "peers.0.host"),
        ("colour: red\n", "colour: unknown key"),
        (
            "destinations:\n  - {name: a, ae_title: A, host: h, port: 1}\n"
            "result_destinations: [b]\n",
            "unknown destinations: ['b']",
        ),
    ],
)
def test_invalid_file_names_the_key_and_problem(tmp_path, text, expected):
    cfg = tmp_path / "node.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert expected in str(err.value)
    assert str(cfg) in str(err.value)


def test_serve_with_invalid_file_exits_with_the_message(tmp_path):
    cfg = tmp_path / "node.yaml"
    cfg.write_text("port: 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "-c", str(cfg), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "port: Input should be greater than or equal to 1" in proc.stderr


def test_example_settings_file_is_valid_and_documents_every_key():
    from kernel.settings import REPO_ROOT, NodeSettings

    example = REPO_ROOT / "node.example.yaml"
    settings = load_settings(example)
    assert settings.destinations[0].name == "pacs"
    text = example.read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    for key in NodeSettings.model_fields:
        assert f"\n{key}:" in text, f"{key} missing from node.example.yaml"
        assert f"`{key}`" in readme, f"{key} missing from README.md"
