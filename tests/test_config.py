"""Configuration: the shipped config.toml, defaults, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_with_the_contract_names() -> None:
    cfg = load_config(ROOT / "config.toml")
    assert cfg.node.ae_title == "SRNODE" and cfg.node.port == 11112
    assert cfg.node.database_url.startswith("sqlite:///") and cfg.node.database_url.endswith(".db")
    assert Path(cfg.node.storage_dir).is_absolute()
    assert cfg.series.quiet_period_seconds == 20.0
    # every option of every section is documented in the shipped file
    text = (ROOT / "config.toml").read_text()
    for section in (cfg.node, cfg.series, cfg.worker, cfg.engine, cfg.derived, cfg.safety,
                    cfg.retention, cfg.http):
        for name in vars(section):
            if name != "tls":
                assert f"{name} =" in text, name


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None)
    assert cfg.node.ae_title == "SRNODE" and cfg.rules == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"node": {"ae_title": "A" * 17}}, "AE title"),
        ({"node": {"port": 70000}}, "port"),
        ({"node": {"port": True}}, "integer"),
        ({"node": {"max_pdu_size": 1.5}}, "integer"),
        ({"node": {"scp_engine": "dcmtk"}}, "scp_engine"),
        ({"node": {"allowed_calling_ae_titles": "CT1"}}, "list of strings"),
        ({"node": {"allowed_hosts": {"CT1": "10.0.0.1"}}}, "table of string lists"),
        ({"worker": {"enabled": "yes"}}, "true/false"),
        ({"node": {"bogus": 1}}, "bogus"),
        ({"nodes": {}}, "unknown section"),
        ({"series": {"quiet_period_seconds": 0}}, "quiet_period_seconds"),
        ({"rules": [{"name": "r", "mode": "slice", "scale": 3}]},
         r"\[\[rules\]\] r: scale x3 is not supported in slice mode \(use x2, x4\)"),
        ({"rules": [{"name": "chest", "mode": "plane"}]}, r"\[\[rules\]\] chest: mode must be"),
        ({"rules": [{"name": "brain", "model": "fsat"}]},
         r"\[\[rules\]\] brain: unknown model 'fsat'"),
        ({"rules": [{"name": "r", "destinations": ["missing"]}]}, "missing"),
        ({"rules": [{"name": "r", "series_description": "("}]}, "pattern"),
        ({"destinations": [{"name": "d", "ae_title": "D", "host": "h", "port": 1,
                            "transfer_syntax": "jpeg"}]}, "transfer_syntax"),
        ({"node": {"tls": {"enabled": True}}}, "cert_file"),
        ({"retention": {"max_storage_gb": -1}}, "max_storage_gb"),
        ({"node": {"warn_free_disk_mb": -1}}, "warn_free_disk_mb"),
        ({"retention": {"keep": 1}}, "keep"),
        ({"http": {"port": 70000}}, "port"),
        ({"http": {"enabled": "yes"}}, "true/false"),
    ],
)
def test_invalid_values_give_clear_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


@pytest.mark.parametrize("name", ["explicit", "implicit", "deflate", "rle", "jpeg2000-lossless"])
def test_every_output_transfer_syntax_name_is_accepted(name: str) -> None:
    dest = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
            "transfer_syntax": name}
    assert parse_config({"destinations": [dest]}).destinations[0].transfer_syntax == name
    with pytest.raises(ConfigError, match="transfer_syntax"):
        parse_config({"destinations": [{**dest, "transfer_syntax": name + "-x"}]})
