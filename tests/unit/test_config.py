"""Settings: defaults, files (YAML/TOML), environment overrides, one-line errors naming the field, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.cli import main
from dicomnode.config import DicomSettings, DicomwebDestination, DimseDestination, Settings, load_settings
from dicomnode.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_without_file() -> None:
    s = load_settings(None, environ={})
    assert (s.dicom.ae_title, s.dicom.port, s.dicom.host) == ("DICOMNODE", 11112, "127.0.0.1")
    assert s.dicom.accept_other_storage_classes == "ignore"
    assert (s.http.host, s.http.port) == ("127.0.0.1", 8000)
    assert s.data_dir == Path("dicomnode-data")
    assert s.database_url is None
    assert s.database_url_resolved() == "sqlite:///dicomnode-data/dicomnode.sqlite3"
    assert s.spool_dir == Path("dicomnode-data/spool")
    assert s.destinations == [] and s.rules_file is None
    assert (s.workers.executor, s.analysis.backend, s.analysis.contrast_policy) == (
        "local",
        "classical",
        "offset",
    )


def test_yaml_file_and_relative_paths(tmp_path: Path) -> None:
    cfg = tmp_path / "conf" / "node.yaml"
    cfg.parent.mkdir()
    cfg.write_text(
        "data_dir: data\nrules_file: rules.yaml\n"
        "dicom: {ae_title: BMDNODE, port: 104,\n"
        "        allowed_calling_aets: [PACS, {ae_title: CT1, address: 10.0.0.7}]}\n"
        "destinations:\n"
        "  - {kind: dimse, name: pacs, ae_title: PACS, host: 10.0.0.5, port: 104}\n"
        "  - {kind: dicomweb, name: web, url: 'http://archive/dicom-web/',\n"
        "     auth: {kind: bearer, token: t0k}}\n"
    )
    s = load_settings(cfg, environ={})
    assert s.data_dir == cfg.parent / "data"  # relative to the file, not the working directory
    assert s.rules_file == cfg.parent / "rules.yaml"
    assert s.database_url_resolved().endswith("conf/data/dicomnode.sqlite3")
    assert s.dicom.ae_title == "BMDNODE" and s.dicom.port == 104
    assert s.destination_names == ("pacs", "web")
    pacs, web = s.destinations
    assert isinstance(pacs, DimseDestination) and pacs.calling_ae is None
    assert isinstance(web, DicomwebDestination) and web.url == "http://archive/dicom-web"
    assert web.auth is not None and web.auth.kind == "bearer"
    assert "t0k" not in repr(s)  # secrets are not printed
    assert s.destination("web") is web
    with pytest.raises(KeyError):
        s.destination("nope")


def test_allowed_calling_aets() -> None:
    d = DicomSettings.model_validate(
        {"allowed_calling_aets": ["PACS", {"ae_title": "CT1", "address": "10.0.0.7"}]}
    )
    assert d.is_allowed("PACS", "1.2.3.4")
    assert d.is_allowed("CT1 ", "10.0.0.7")
    assert not d.is_allowed("CT1", "10.0.0.8")
    assert not d.is_allowed("OTHER")
    assert DicomSettings().is_allowed("ANYONE")  # empty list: anyone


def test_toml_file(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        'database_url = "postgresql+psycopg://u@db/dn"\n'
        "[http]\nport = 9000\n[completion]\nmax_wait_seconds = 60\n"
    )
    s = load_settings(cfg, environ={})
    assert s.http.port == 9000 and s.completion.max_wait_seconds == 60
    assert s.database_url_resolved() == "postgresql+psycopg://u@db/dn"


def test_environment_overrides_file(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text("dicom: {ae_title: FROMFILE, port: 104}\nhttp: {port: 9000}\n")
    env = {
        "DICOMNODE_DICOM__PORT": "11113",
        "DICOMNODE_WORKERS__EXECUTOR": "celery",
        "DICOMNODE_WORKERS__BROKER_URL": "redis://127.0.0.1:6379/0",
        "DICOMNODE_DESTINATIONS": '[{"kind": "dimse", "name": "p", "ae_title": "P", "host": "h", "port": 1}]',
        "DICOMNODE_TEST_DATA": "/somewhere",  # other DICOMNODE_ variables are not settings: ignored
        "UNRELATED": "x",
    }
    s = load_settings(cfg, environ=env)
    assert s.dicom.port == 11113
    assert s.dicom.ae_title == "FROMFILE"  # nested merge: the rest of the section stays
    assert s.http.port == 9000
    assert s.workers.executor == "celery"
    assert s.destination_names == ("p",)


def test_process_environment_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMNODE_HTTP__PORT", "8123")
    assert load_settings().http.port == 8123
    assert load_settings(environ={}).http.port == 8000


@pytest.mark.parametrize(
    ("yaml_text", "env", "message"),
    [
        ("dicom: {port: abc}\n", {}, "config: dicom.port: Input should be a valid integer"),
        ("", {"DICOMNODE_DICOM__PORT": "x"}, "config: dicom.port: Input should be a valid integer"),
        ("dicom: {port: 70000}\n", {}, "config: dicom.port: Input should be less than or equal to 65535"),
        ("dicom: {prot: 104}\n", {}, "config: dicom.prot: unknown setting"),
        ("colour: blue\n", {}, "config: colour: unknown setting"),
        ("dicom: {ae_title: 'THIS AE TITLE IS WAY TOO LONG'}\n", {}, "config: dicom.ae_title: must be 1-16"),
        (
            "dicom: {accept_other_storage_classes: maybe}\n",
            {},
            "dicom.accept_other_storage_classes: Input should be",
        ),
        (
            "destinations: [{kind: dimse, name: p, ae_title: P, host: h, port: x}]\n",
            {},
            "config: destinations[0].port: Input should be a valid integer",
        ),
        ("destinations: [{kind: carrier, name: p}]\n", {}, "config: destinations[0]: Input tag 'carrier'"),
        (
            "destinations: [{kind: dicomweb, name: w, url: 'ftp://x'}]\n",
            {},
            "destinations[0].url: must be an http",
        ),
        (
            "destinations: [{kind: dicomweb, name: w, url: 'http://x', auth: {kind: basic, username: u}}]\n",
            {},
            "config: destinations[0].auth.password: Field required",
        ),
        (
            "destinations:\n  - {kind: dimse, name: p, ae_title: P, host: h, port: 1}\n"
            "  - {kind: dicomweb, name: p, url: 'http://x'}\n",
            {},
            "destination names must be unique, repeated: p",
        ),
        ("workers: {executor: celery}\n", {}, "config: workers: broker_url is required"),
        (
            "delivery: {backoff_base_seconds: 60, backoff_max_seconds: 10}\n",
            {},
            "backoff_max_seconds must be >=",
        ),
        ("database_url: 'mysql://x/y'\n", {}, "config: database_url: must be a sqlite"),
        ("analysis: {contrast_policy: ignore}\n", {}, "config: analysis.contrast_policy: Input should be"),
        ("analysis: {backend: 'bundle:'}\n", {}, "config: analysis.backend: must be a name"),
        ("- a\n- list\n", {}, "must hold a mapping"),
        ("dicom: [unclosed\n", {}, "is not valid YAML"),
    ],
)
def test_bad_config_names_the_field(
    tmp_path: Path, yaml_text: str, env: dict[str, str], message: str
) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg, environ=env)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml", environ={})


def test_analysis_backend_specs() -> None:
    s = load_settings(None, environ={"DICOMNODE_ANALYSIS__BACKEND": "bundle:models/spine-v1"})
    assert s.analysis.backend == "bundle:models/spine-v1"
    assert s.analysis.segmentation_backend is None


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(Exception, match="frozen"):
        s.http = s.http  # type: ignore[misc]


def test_example_config_is_valid() -> None:
    s = load_settings(REPO / "dicomnode.example.yaml", environ={})
    assert s.destination_names == ("pacs", "archive")
    assert s.dicom.allowed_calling_aets[0].ae_title == "ORTHANC"


def test_check_config_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    good = tmp_path / "good.yaml"
    good.write_text(
        "data_dir: data\n"
        "destinations: [{kind: dimse, name: pacs, ae_title: PACS, host: 127.0.0.1, port: 4242}]\n"
    )
    assert main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config OK")
    assert "destination   pacs (dimse) PACS@127.0.0.1:4242" in out
    assert "rules         default" in out
    assert not (tmp_path / "data").exists()  # checking starts and creates nothing

    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom:\n  port: eleven\n")
    assert main(["check-config", str(bad)]) == 2
    assert "config: dicom.port: Input should be a valid integer" in capsys.readouterr().err

    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: r\n    action: analyse\n    destinations: [elsewhere]\n")
    with_rules = tmp_path / "with_rules.yaml"
    with_rules.write_text("rules_file: rules.yaml\n")
    assert main(["check-config", str(with_rules)]) == 2
    assert "rule 'r': unknown destination 'elsewhere'" in capsys.readouterr().err

    monkeypatch.setenv("DICOMNODE_CONFIG", str(good))
    assert main(["check-config"]) == 0
    assert "good.yaml" in capsys.readouterr().out


def test_stow_allow_addresses_and_worker_leases(tmp_path: Path) -> None:
    s = load_settings(None, environ={})
    assert s.http.stow_allow_addresses == []  # credentials required by default
    assert (s.workers.delivery_lease_seconds, s.workers.stale_job_seconds) == (120.0, 300.0)
    f = tmp_path / "c.yaml"
    f.write_text(
        "http: {stow_allow_addresses: [' 10.0.0.5 ', 10.0.1.0/24, '::1']}\n"
        "workers: {delivery_lease_seconds: 30, stale_job_seconds: 60}\n"
    )
    s = load_settings(f, environ={"DICOMNODE_WORKERS__STALE_JOB_SECONDS": "75"})
    assert s.http.stow_allow_addresses == ["10.0.0.5", "10.0.1.0/24", "::1"]
    assert (s.workers.delivery_lease_seconds, s.workers.stale_job_seconds) == (30.0, 75.0)
    f.write_text("http: {stow_allow_addresses: [pacs.hospital]}\n")
    with pytest.raises(ConfigError, match=r"http\.stow_allow_addresses.*not an IP address"):
        load_settings(f, environ={})
    f.write_text("workers: {stale_job_seconds: -5}\n")
    with pytest.raises(ConfigError, match=r"workers\.stale_job_seconds"):
        load_settings(f, environ={})


# -- TLS settings (issue 13) -----------------------------------------------------------------------------


def test_tls_sections_and_relative_certificate_paths(tmp_path: Path) -> None:
    cfg = tmp_path / "conf" / "node.yaml"
    cfg.parent.mkdir()
    cfg.write_text(
        "dicom:\n"
        "  port: null\n"
        "  tls: {port: 2762, certificate: certs/node.pem, private_key: certs/node.key,\n"
        "        ca_bundle: /etc/pki/ca.pem, require_client_certificate: true}\n"
        "http:\n"
        "  tls: {certificate: certs/web.pem, private_key: certs/web.key}\n"
        "  hsts_seconds: 600\n"
        "  forwarded_allow_ips: [10.0.0.9]\n"
        "destinations:\n"
        "  - {kind: dimse, name: pacs, ae_title: PACS, host: pacs.example.org, port: 2762,\n"
        "     tls: {ca_bundle: certs/ca.pem, certificate: certs/client.pem, private_key: certs/client.key}}\n"
        "  - {kind: dicomweb, name: web, url: 'https://pacs.example.org/dicom-web',\n"
        "     tls: {ca_bundle: ca.pem}}\n"
        "  - {kind: dimse, name: plain, ae_title: OLD, host: 127.0.0.1, port: 104}\n"
    )
    s = load_settings(cfg, environ={})
    base = cfg.parent
    assert s.dicom.port is None and s.dicom.tls is not None
    assert (s.dicom.tls.port, s.dicom.tls.certificate, s.dicom.tls.private_key) == (
        2762,
        base / "certs/node.pem",
        base / "certs/node.key",
    )
    assert s.dicom.tls.ca_bundle == Path("/etc/pki/ca.pem") and s.dicom.tls.require_client_certificate
    assert s.dicom.tls.handshake_timeout_seconds == 10.0
    assert s.http.tls is not None and s.http.tls.certificate == base / "certs/web.pem"
    assert (s.http.hsts_seconds, s.http.forwarded_allow_ips) == (600, ["10.0.0.9"])
    pacs, web, plain = s.destinations
    assert pacs.tls is not None and pacs.tls.verify and pacs.tls.check_hostname
    assert (pacs.tls.ca_bundle, pacs.tls.certificate) == (base / "certs/ca.pem", base / "certs/client.pem")
    assert web.tls is not None and web.tls.ca_bundle == base / "ca.pem"
    assert plain.tls is None
    # Defaults: plain DICOM only, no HTTPS, HSTS a year when HTTPS is on, no proxy trusted (issue 14).
    d = load_settings(None, environ={})
    assert (d.dicom.port, d.dicom.tls, d.http.tls) == (11112, None, None)
    assert (d.http.hsts_seconds, d.http.forwarded_allow_ips) == (31_536_000, [])


def test_tls_settings_from_the_environment() -> None:
    s = load_settings(
        None,
        environ={
            "DICOMNODE_DICOM__TLS__PORT": "2762",
            "DICOMNODE_DICOM__TLS__CERTIFICATE": "/etc/dicomnode/node.pem",
            "DICOMNODE_DICOM__TLS__PRIVATE_KEY": "/etc/dicomnode/node.key",
            "DICOMNODE_DICOM__TLS__KEY_PASSWORD": "pw",
        },
    )
    assert s.dicom.tls is not None and s.dicom.port == 11112  # both listeners side by side
    assert s.dicom.tls.key_password is not None and s.dicom.tls.key_password.get_secret_value() == "pw"
    assert "pw" not in repr(s.dicom.tls)


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"dicom": {"port": None}}, "dicom", "no DICOM listener"),
        (
            {"dicom": {"port": 2762, "tls": {"port": 2762, "certificate": "a", "private_key": "b"}}},
            "dicom",
            "must differ",
        ),
        (
            {
                "dicom": {
                    "tls": {
                        "port": 2762,
                        "certificate": "a",
                        "private_key": "b",
                        "require_client_certificate": True,
                    }
                }
            },
            "dicom.tls",
            "needs a ca_bundle",
        ),
        ({"dicom": {"tls": {"port": 2762, "certificate": "a"}}}, "dicom.tls.private_key", "Field required"),
        (
            {"http": {"tls": {"certificate": "a", "private_key": "b", "ciphers": "x"}}},
            "http.tls.ciphers",
            "unknown",
        ),
        (
            {
                "destinations": [
                    {"kind": "dicomweb", "name": "w", "url": "http://x/dw", "tls": {"ca_bundle": "c"}}
                ]
            },
            "destinations[0]",
            "https:// url",
        ),
        (
            {
                "destinations": [
                    {
                        "kind": "dimse",
                        "name": "p",
                        "ae_title": "P",
                        "host": "h",
                        "port": 1,
                        "tls": {"certificate": "c"},
                    }
                ]
            },
            "destinations[0].tls",
            "go together",
        ),
    ],
)
def test_bad_tls_settings_name_the_field(
    tmp_path: Path, data: dict[str, object], field: str, words: str
) -> None:
    import yaml

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, environ={})
    msg = str(err.value)
    assert msg.startswith(f"config: {field}") and words in msg and "\n" not in msg, msg
