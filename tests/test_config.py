"""accelerator.config: Orthanc-style parsing, merging, validation and the example file."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from accelerator.config import (
    AWS_S3_DEFAULTS,
    AZURE_BLOB_DEFAULTS,
    DEFAULTS,
    HYBRID_MODES,
    IGNORED_ORTHANC_OPTIONS,
    TRANSFERS_DEFAULTS,
    Config,
    ObjectStorageConfig,
    Peer,
    config_from_dict,
    load_config,
    parse_config_text,
)
from protocol.errors import ConfigError
from tests.wire_samples import SAMPLES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config.example.json"
WIRE_SAMPLE = SAMPLES / "configs" / "bucket-4096k" / "a.json"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# Defaults
# ------------------------------------------------------------------------------------------


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Config.defaults()
    assert config == load_config(None)
    assert config.name == "accelerator"
    assert config.http_port == 8042
    assert config.http_bind_address == ""
    assert config.storage_directory == str(tmp_path / "OrthancStorage")
    assert config.index_directory == config.storage_directory
    assert config.storage_compression is False
    assert config.overwrite_instances is False
    assert config.remote_access_allowed is False
    assert config.authentication_enabled is False
    assert config.registered_users == {}
    assert config.maximum_request_body_size == 4096
    assert config.maximum_request_body_bytes == 4096 * 1024 * 1024
    assert config.http_timeout == 60
    assert config.https_verify_peers is True
    assert config.https_ca_certificates == ""
    assert config.http_proxy == ""
    assert config.concurrent_jobs == 2
    assert config.jobs_history_size == 10
    assert config.save_jobs is True
    assert config.dicom_aet == "ORTHANC"
    assert config.dicom_port == 4242
    assert config.http_describe_errors is True
    assert config.orthanc_peers == {}
    assert config.unknown_keys == ()
    assert config.source == "<defaults>"
    t = config.transfers
    assert (t.threads, t.bucket_size, t.cache_size, t.max_push_transactions) == (12, 4096, 512, 4)
    assert (t.max_http_retries, t.peer_connectivity_timeout, t.peer_commit_timeout) == (3, 2, 600)
    assert t.commit_threads_count == 1
    assert t.bucket_size_bytes == 4096 * 1024
    assert t.cache_size_bytes == 512 * 1024 * 1024


def test_config_is_frozen():
    config = Config.defaults()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.http_port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.transfers.threads = 1  # type: ignore[misc]


def test_config_from_dict_values(tmp_path):
    config = config_from_dict(
        {
            "StorageDirectory": str(tmp_path),
            "HttpPort": 8062,
            "OverwriteInstances": True,
            "Transfers": {"BucketSize": 64, "CommitThreadsCount": 8},
        }
    )
    assert config.storage_directory == str(tmp_path)
    assert config.index_directory == str(tmp_path)
    assert config.http_port == 8062
    assert config.overwrite_instances is True
    assert config.transfers.bucket_size == 64
    assert config.transfers.bucket_size_bytes == 65536
    assert config.transfers.commit_threads_count == 8
    assert config.transfers.threads == 12  # untouched options keep their default


def test_secrets_are_not_in_repr():
    config = config_from_dict(
        {
            "RegisteredUsers": {"alice": "s3cret-user"},
            "OrthancPeers": {
                "p": {
                    "Url": "http://h/",
                    "Username": "u",
                    "Password": "s3cret-peer",
                    "HttpHeaders": {"Authorization": "Bearer s3cret-token"},
                }
            },
        }
    )
    assert "s3cret" not in repr(config)


# ------------------------------------------------------------------------------------------
# Comments and environment variables
# ------------------------------------------------------------------------------------------


def test_comments_are_removed_but_not_inside_strings():
    text = """
    // a line comment with "quotes" and a brace {
    {
      /* block comment
         over two lines, with // and "quotes" */
      "Name": "http://host:8042/ // not a comment /* nor this */", // trailing comment
      "HttpProxy": "a\\"//b", /* inline */ "DicomAet": "X"
    }
    // last line without newline"""
    parsed = parse_config_text(text, environ={})
    assert parsed == {
        "Name": "http://host:8042/ // not a comment /* nor this */",
        "HttpProxy": 'a"//b',
        "DicomAet": "X",
    }


def test_unterminated_block_comment():
    with pytest.raises(ConfigError, match=r"unterminated /\* comment at line 2"):
        parse_config_text('{\n /* "Name": "x" }', environ={})


def test_invalid_json_names_the_source_and_line(tmp_path):
    path = write(tmp_path / "bad.json", '{\n  // comment\n  "Name": "x",\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)
    assert "line 4" in str(info.value)


@pytest.mark.parametrize("text", ["[1, 2]", '"x"', "3"])
def test_top_level_must_be_an_object(text):
    with pytest.raises(ConfigError, match="JSON object at the top level"):
        parse_config_text(text, environ={})


def test_nan_is_rejected():
    with pytest.raises(ConfigError, match="NaN"):
        parse_config_text('{"HttpTimeout": NaN}', environ={})


def test_env_substitution_in_strings_and_as_values(tmp_path):
    env = {"SITE": "site-a", "PORT": "8062", "FLAG": "true", "WINDIR": "C:\\data \"x\""}
    text = """{
      "Name": "${SITE} archive",
      "HttpPort": ${PORT},
      "OverwriteInstances": ${FLAG},
      "StorageDirectory": "${WINDIR}",
      "Transfers": {"BucketSize": ${BUCKET:-64}},
      "DicomAet": "${AET:-ORTHANC_A}",
      "HttpProxy": "${PROXY:-}"
    }"""
    parsed = parse_config_text(text, environ=env)
    assert parsed == {
        "Name": "site-a archive",
        "HttpPort": 8062,
        "OverwriteInstances": True,
        "StorageDirectory": 'C:\\data "x"',
        "Transfers": {"BucketSize": 64},
        "DicomAet": "ORTHANC_A",
        "HttpProxy": "",
    }
    config = load_config(write(tmp_path / "c.json", text), environ=env)
    assert config.http_port == 8062
    assert config.overwrite_instances is True
    assert config.transfers.bucket_size == 64


def test_env_default_used_when_variable_is_empty_and_value_used_when_set():
    text = '{"Name": "${A:-fallback}", "DicomAet": "${B:-fallback}", "HttpProxy": "${C}"}'
    parsed = parse_config_text(text, environ={"A": "", "B": "set", "C": ""})
    assert parsed == {"Name": "fallback", "DicomAet": "set", "HttpProxy": ""}


def test_env_default_in_a_string_is_json_text():
    # The default is copied as written in the file, so JSON escapes in it keep their meaning.
    parsed = parse_config_text('{"StorageDirectory": "${D:-C:\\\\data}"}', environ={})
    assert parsed == {"StorageDirectory": "C:\\data"}


def test_env_uses_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("ACCELERATOR_TEST_NAME", "from-env")
    assert parse_config_text('{"Name": "${ACCELERATOR_TEST_NAME}"}') == {"Name": "from-env"}


def test_missing_env_variable_names_variable_and_key(tmp_path):
    path = write(
        tmp_path / "c.json",
        '{\n  "Name": "x",\n  "Transfers": {\n    "Threads": 2,\n    "BucketSize": ${BUCKET}\n  }\n}',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert "BUCKET" in message
    assert "Transfers.BucketSize" in message
    assert str(path) in message
    assert "line 5" in message


def test_missing_env_variable_in_string_and_in_array():
    with pytest.raises(ConfigError, match=r"OrthancPeers\.b\[1\]: environment variable USER_B"):
        parse_config_text(
            '{"OrthancPeers": {"a": ["http://a/"], "b": ["http://b/", "${USER_B}", "p"]}}',
            environ={},
        )
    with pytest.raises(ConfigError, match=r"Name: environment variable NAME_VAR is not set"):
        parse_config_text('{"HttpPort": 1, "Name": "x-${NAME_VAR}"}', environ={})


def test_env_references_in_comments_are_ignored():
    parsed = parse_config_text('{\n // "Name": "${UNSET}"\n /* ${UNSET2} */ "Name": "n"\n}', {})
    assert parsed == {"Name": "n"}


# ------------------------------------------------------------------------------------------
# Files and folders
# ------------------------------------------------------------------------------------------


def test_load_file(tmp_path):
    path = write(tmp_path / "orthanc.json", '{"Name": "one", "HttpPort": 9000}')
    config = load_config(path, environ={})
    assert config.name == "one"
    assert config.http_port == 9000
    assert config.source == str(path)


def test_folder_is_merged_in_name_order(tmp_path):
    folder = tmp_path / "conf"
    folder.mkdir()
    write(folder / "b-http.json", '{"HttpPort": 9001, // comment\n "HttpTimeout": 5}')
    write(folder / "a-main.json", '{"Name": "merged", "Transfers": {"Threads": 7}}')
    write(folder / "notes.txt", "not json at all")
    (folder / "sub.json").mkdir()  # a folder named *.json is not a file: skipped
    config = load_config(folder, environ={})
    assert config.name == "merged"
    assert config.http_port == 9001
    assert config.http_timeout == 5
    assert config.transfers.threads == 7
    assert config.source == str(folder)


def test_folder_duplicate_top_level_key_names_both_files(tmp_path):
    write(tmp_path / "1.json", '{"HttpPort": 9001}')
    write(tmp_path / "2.json", '{"Name": "x", "HttpPort": 9002}')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, environ={})
    message = str(info.value)
    assert "HttpPort" in message
    assert str(tmp_path / "1.json") in message
    assert str(tmp_path / "2.json") in message


def test_folder_validation_error_names_the_file(tmp_path):
    write(tmp_path / "1.json", '{"Name": "x"}')
    write(tmp_path / "2.json", '{"Transfers": {"Threads": 0}}')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, environ={})
    assert str(info.value).startswith("Transfers.Threads: expected an integer >= 1, got 0")
    assert str(tmp_path / "2.json") in str(info.value)


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="no \\*.json"):
        load_config(tmp_path, environ={})
    with pytest.raises(ConfigError, match="no such configuration"):
        load_config(tmp_path / "missing.json", environ={})


def test_relative_directories_resolved_against_cwd_at_load_time(tmp_path, monkeypatch):
    conf = tmp_path / "etc"
    conf.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    path = write(conf / "c.json", '{"StorageDirectory": "data", "IndexDirectory": "../idx"}')
    monkeypatch.chdir(work)
    config = load_config(path, environ={})
    assert config.storage_directory == str(work / "data")
    assert config.index_directory == str(tmp_path / "idx")
    monkeypatch.chdir(tmp_path)  # a later chdir changes nothing
    assert config.storage_directory == str(work / "data")


def test_index_directory_defaults_to_storage_directory(tmp_path):
    config = config_from_dict({"StorageDirectory": "store"}, base_dir=tmp_path)
    assert config.storage_directory == str(tmp_path / "store")
    assert config.index_directory == str(tmp_path / "store")
    absolute = config_from_dict({"StorageDirectory": "/srv/a", "IndexDirectory": "/srv/b"})
    assert (absolute.storage_directory, absolute.index_directory) == ("/srv/a", "/srv/b")


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"HttpPort": "abc"}, 'HttpPort: expected an integer from 1 to 65535, got "abc"'),
        ({"HttpPort": 0}, "HttpPort: expected an integer from 1 to 65535, got 0"),
        ({"HttpPort": 65536}, "HttpPort: expected an integer from 1 to 65535, got 65536"),
        ({"HttpPort": 8042.0}, "HttpPort: expected an integer from 1 to 65535, got 8042.0"),
        ({"HttpPort": True}, "HttpPort: expected an integer from 1 to 65535, got true"),
        ({"DicomPort": -1}, "DicomPort: expected an integer from 1 to 65535, got -1"),
        ({"Name": 3}, "Name: expected a string, got 3"),
        ({"HttpBindAddress": None}, "HttpBindAddress: expected a string, got null"),
        ({"StorageDirectory": ""}, 'StorageDirectory: expected a non-empty string, got ""'),
        ({"IndexDirectory": 1}, "IndexDirectory: expected a non-empty string, got 1"),
        ({"StorageCompression": "yes"}, 'StorageCompression: expected true or false, got "yes"'),
        ({"OverwriteInstances": 1}, "OverwriteInstances: expected true or false, got 1"),
        ({"RemoteAccessAllowed": None}, "RemoteAccessAllowed: expected true or false, got null"),
        ({"AuthenticationEnabled": 0}, "AuthenticationEnabled: expected true or false, got 0"),
        ({"RegisteredUsers": []}, "RegisteredUsers: expected an object of strings, got []"),
        ({"RegisteredUsers": {"alice": 1}}, "RegisteredUsers.alice: expected a string, got 1"),
        ({"MaximumRequestBodySize": 0}, "MaximumRequestBodySize: expected an integer >= 1, got 0"),
        ({"HttpTimeout": -1}, "HttpTimeout: expected an integer >= 0, got -1"),
        ({"HttpsVerifyPeers": "false"}, 'HttpsVerifyPeers: expected true or false, got "false"'),
        ({"HttpsCACertificates": False}, "HttpsCACertificates: expected a string, got false"),
        ({"HttpProxy": {}}, "HttpProxy: expected a string, got {}"),
        ({"ConcurrentJobs": 0}, "ConcurrentJobs: expected an integer >= 1, got 0"),
        ({"JobsHistorySize": -5}, "JobsHistorySize: expected an integer >= 0, got -5"),
        ({"SaveJobs": "true"}, 'SaveJobs: expected true or false, got "true"'),
        ({"DicomAet": 1}, "DicomAet: expected a string, got 1"),
        ({"HttpDescribeErrors": 1}, "HttpDescribeErrors: expected true or false, got 1"),
        ({"OrthancPeers": []}, "OrthancPeers: expected an object of peers, got []"),
        ({"Transfers": 4}, "Transfers: expected an object, got 4"),
    ],
)
def test_validation_errors_name_the_key(mapping, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(mapping)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "key, minimum",
    [
        ("Threads", 1),
        ("BucketSize", 1),
        ("CacheSize", 1),
        ("MaxPushTransactions", 1),
        ("MaxHttpRetries", 0),
        ("PeerConnectivityTimeout", 1),
        ("PeerCommitTimeout", 1),
        ("CommitThreadsCount", 1),
    ],
)
@pytest.mark.parametrize("bad", ["4", -1, True, 2.5, None, "below-minimum"])
def test_transfers_options_must_be_integers_in_range(key, minimum, bad):
    value = minimum - 1 if bad == "below-minimum" else bad
    with pytest.raises(ConfigError) as info:
        config_from_dict({"Transfers": {key: value}})
    assert str(info.value) == (
        f"Transfers.{key}: expected an integer >= {minimum}, got {json.dumps(value)}"
    )
    assert config_from_dict({"Transfers": {key: minimum}}).transfers == dataclasses.replace(
        Config.defaults().transfers,
        **{_snake(key): minimum},
    )


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def test_validation_error_from_a_file_names_key_and_file(tmp_path):
    path = write(tmp_path / "c.json", '{"Transfers": {"BucketSize": 0}}')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith("Transfers.BucketSize: expected an integer >= 1, got 0")
    assert str(path) in str(info.value)


def test_long_values_are_shortened_in_messages():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"Name": ["x" * 500]})
    assert len(str(info.value)) < 120


def test_unknown_keys_are_collected_and_ignored_options_are_silent():
    config = config_from_dict(
        {
            "Plugins": ["libOrthancTransfers.so"],
            "DicomModalities": {},
            "StableAge": 60,
            "MyOwnOption": 1,
            "Transfers": {"Threads": 2, "Futuristic": 1},
            "AnotherOne": True,
        }
    )
    assert config.unknown_keys == ("MyOwnOption", "AnotherOne", "Transfers.Futuristic")
    assert config.transfers.threads == 2


def test_ignored_options_tuple():
    for key in ("Plugins", "DicomModalities", "StableAge", "ExecuteLuaEnabled",
                "LogExportedResources", "MetricsEnabled", "DicomAlwaysAllowStore",
                "DicomCheckModalityHost", "HttpCompressionEnabled"):
        assert key in IGNORED_ORTHANC_OPTIONS
    assert len(set(IGNORED_ORTHANC_OPTIONS)) == len(IGNORED_ORTHANC_OPTIONS)
    # Known options are validated, never silently ignored.
    assert not set(IGNORED_ORTHANC_OPTIONS) & (set(DEFAULTS) | {"OrthancPeers", "Transfers"})


@pytest.mark.parametrize(
    "mapping, expected",
    [
        ({}, False),
        ({"RemoteAccessAllowed": False}, False),
        ({"RemoteAccessAllowed": True}, True),
        ({"RemoteAccessAllowed": True, "AuthenticationEnabled": False}, False),
        ({"RemoteAccessAllowed": False, "AuthenticationEnabled": True}, True),
    ],
)
def test_authentication_enabled_default_rule(mapping, expected):
    assert config_from_dict(mapping).authentication_enabled is expected


# ------------------------------------------------------------------------------------------
# OrthancPeers
# ------------------------------------------------------------------------------------------


def peers(entries: dict) -> dict[str, Peer]:
    return config_from_dict({"OrthancPeers": entries}).orthanc_peers


def test_simple_peer_forms():
    result = peers(
        {"one": ["http://host:8042"], "three": ["https://host/orthanc/", "alice", "orthanctest"]}
    )
    assert result["one"] == Peer(name="one", url="http://host:8042/")
    assert result["one"].basic_auth is None
    assert result["one"].remote_self is None
    three = result["three"]
    assert three.url == "https://host/orthanc/"
    assert (three.username, three.password) == ("alice", "orthanctest")
    assert three.basic_auth == ("alice", "orthanctest")
    assert list(result) == ["one", "three"]


def test_object_peer_form():
    peer = peers(
        {
            "b": {
                "Url": "http://127.0.0.1:8043",
                "Username": "alice",
                "Password": "orthanctest",
                "HttpHeaders": {"X-Token": "t"},
                "CertificateFile": "client.crt",
                "CertificateKeyFile": "client.key",
                "CertificateKeyPassword": "kp",
                "Pkcs11": False,
                "Timeout": 30,
                "RemoteSelf": "a",
                "Flag": True,
                "Off": False,
                "Count": 12,
            }
        }
    )["b"]
    assert peer.name == "b"
    assert peer.url == "http://127.0.0.1:8043/"
    assert peer.basic_auth == ("alice", "orthanctest")
    assert peer.http_headers == {"X-Token": "t"}
    assert (peer.certificate_file, peer.certificate_key_file) == ("client.crt", "client.key")
    assert peer.certificate_key_password == "kp"
    assert peer.pkcs11 is False
    assert peer.timeout == 30
    assert peer.properties == {"RemoteSelf": "a", "Flag": "1", "Off": "0", "Count": "12"}
    assert peer.remote_self == "a"
    assert peer.effective_timeout(60) == 30


def test_peer_url_alias_and_timeout_fallback():
    peer = peers({"p": {"URL": "https://h.example/x", "Timeout": 0}})["p"]
    assert peer.url == "https://h.example/x/"
    assert peer.effective_timeout(60) == 60
    assert peers({"p": {"Url": "http://h/"}})["p"].effective_timeout(7) == 7


@pytest.mark.parametrize(
    "username, password, expected",
    [("alice", "", None), ("", "pw", None), ("alice", "pw", ("alice", "pw"))],
)
def test_basic_auth_only_with_both_credentials(username, password, expected):
    peer = peers({"p": {"Url": "http://h/", "Username": username, "Password": password}})["p"]
    assert peer.basic_auth == expected


def test_wire_sample_config_loads():
    if not WIRE_SAMPLE.exists():
        pytest.skip("wire samples not available")
    config = load_config(WIRE_SAMPLE, environ={})
    assert config.name == "wire-samples-a"
    assert config.unknown_keys == ()
    assert config.orthanc_peers["b-bidir"].remote_self == "a"
    assert config.orthanc_peers["b"].remote_self is None
    assert config.orthanc_peers["plain"].basic_auth == ("alice", "orthanctest")
    assert config.transfers.max_http_retries == 0


@pytest.mark.parametrize(
    "entry, message",
    [
        (["http://h/", "alice"], "OrthancPeers.p: expected [url] or [url, username, password], "
         "got a list of 2 elements"),
        ([], "OrthancPeers.p: expected [url] or [url, username, password], got a list of 0 "
         "elements"),
        (["http://h/", "a", "b", "c"], "OrthancPeers.p: expected [url] or [url, username, "
         "password], got a list of 4 elements"),
        (["ftp://h/"], 'OrthancPeers.p[0]: expected a URL starting with http:// or https://, '
         'got "ftp://h/"'),
        (["http://h/", 1, "pw"], "OrthancPeers.p[1]: expected a string, got 1"),
        ("http://h/", 'OrthancPeers.p: expected [url], [url, username, password] or an object, '
         'got "http://h/"'),
        ({}, "OrthancPeers.p.Url: missing (expected a URL starting with http:// or https://)"),
        ({"Url": "h:8042"}, 'OrthancPeers.p.Url: expected a URL starting with http:// or '
         'https://, got "h:8042"'),
        ({"Url": "http://"}, 'OrthancPeers.p.Url: expected a URL starting with http:// or '
         'https://, got "http://"'),
        ({"Url": 5}, "OrthancPeers.p.Url: expected a URL starting with http:// or https://, "
         "got 5"),
        ({"Url": "http://h/", "Username": 1}, "OrthancPeers.p.Username: expected a string, got 1"),
        ({"Url": "http://h/", "HttpHeaders": {"X": 1}},
         "OrthancPeers.p.HttpHeaders.X: expected a string, got 1"),
        ({"Url": "http://h/", "HttpHeaders": []},
         "OrthancPeers.p.HttpHeaders: expected an object of strings, got []"),
        ({"Url": "http://h/", "Pkcs11": "no"}, 'OrthancPeers.p.Pkcs11: expected true or false, '
         'got "no"'),
        ({"Url": "http://h/", "Timeout": -1}, "OrthancPeers.p.Timeout: expected an integer >= 0, "
         "got -1"),
        ({"Url": "http://h/", "Timeout": "10"}, 'OrthancPeers.p.Timeout: expected an integer '
         '>= 0, got "10"'),
        ({"Url": "http://h/", "RemoteSelf": ["a"]}, 'OrthancPeers.p.RemoteSelf: expected a '
         'string, a boolean or an integer (user property), got ["a"]'),
        ({"Url": "http://h/", "Ratio": 1.5}, "OrthancPeers.p.Ratio: expected a string, a boolean "
         "or an integer (user property), got 1.5"),
        ({"Url": "http://h/", "CertificateKeyFile": "k.pem"},
         "OrthancPeers.p.CertificateFile: required when a certificate key is given"),
    ],
)
def test_bad_peer_entries(entry, message):
    with pytest.raises(ConfigError) as info:
        peers({"p": entry})
    assert str(info.value) == message


def test_empty_peer_name_is_rejected():
    with pytest.raises(ConfigError, match="peer name must not be empty"):
        peers({"": ["http://h/"]})


# ------------------------------------------------------------------------------------------
# Object storage: AwsS3Storage / AzureBlobStorage
# ------------------------------------------------------------------------------------------

S3_MINIMAL = {"BucketName": "bucket", "Region": "eu-central-1"}
AZURE_MINIMAL = {"ConnectionString": "AccountName=a;AccountKey=k", "ContainerName": "container"}


def s3(**options) -> ObjectStorageConfig:
    return config_from_dict({"AwsS3Storage": {**S3_MINIMAL, **options}}).object_storage


def azure(**options) -> ObjectStorageConfig:
    return config_from_dict({"AzureBlobStorage": {**AZURE_MINIMAL, **options}}).object_storage


def test_no_object_storage_by_default():
    config = Config.defaults()
    assert config.object_storage is None
    assert config.hybrid_mode is None


def test_object_storage_config_fields():
    # The field names of the store's ObjectStorageSettings, plus hybrid_mode.
    assert [f.name for f in dataclasses.fields(ObjectStorageConfig)] == [
        "kind", "bucket_name", "region", "access_key", "secret_key", "endpoint",
        "virtual_addressing", "root_path", "storage_structure", "connection_timeout",
        "request_timeout", "max_connections", "max_retries", "connection_string",
        "container_name", "hybrid_mode",
    ]
    settings = s3().settings_kwargs()
    assert "hybrid_mode" not in settings
    assert len(settings) == len(dataclasses.fields(ObjectStorageConfig)) - 1


def test_aws_s3_defaults():
    config = config_from_dict({"AwsS3Storage": dict(S3_MINIMAL)})
    assert config.unknown_keys == ()
    assert config.hybrid_mode == "Disabled"
    assert config.object_storage == ObjectStorageConfig(
        kind="s3", bucket_name="bucket", region="eu-central-1", access_key="", secret_key="",
        endpoint="", virtual_addressing=True, root_path="", storage_structure="flat",
        connection_timeout=30, request_timeout=1200, max_connections=25, max_retries=10,
        connection_string="", container_name="", hybrid_mode="Disabled",
    )
    assert {k: v for k, v in AWS_S3_DEFAULTS.items() if v is None} == {
        "BucketName": None, "Region": None,
    }


def test_aws_s3_every_option():
    storage = s3(
        AccessKey="AKIA", SecretKey="s3cret", Endpoint="http://127.0.0.1:8333",
        VirtualAddressing=False, RootPath="orthanc/a", StorageStructure="legacy",
        ConnectionTimeout=5, RequestTimeout=60, MaxConnections=4, MaxRetries=0,
        HybridMode="WriteToFileSystem", MigrationFromFileSystemEnabled=False,
        EnableLegacyUnknownFiles=True, StorageEncryption={}, UseTransferManager=True,
        EnableAwsSdkLogs=True,
    )
    assert storage == ObjectStorageConfig(
        kind="s3", bucket_name="bucket", region="eu-central-1", access_key="AKIA",
        secret_key="s3cret", endpoint="http://127.0.0.1:8333", virtual_addressing=False,
        root_path="orthanc/a", storage_structure="legacy", connection_timeout=5,
        request_timeout=60, max_connections=4, max_retries=0, connection_string="",
        container_name="", hybrid_mode="WriteToFileSystem",
    )


def test_aws_s3_connect_timeout_is_the_older_name_of_connection_timeout():
    assert s3(ConnectTimeout=7).connection_timeout == 7
    assert s3(ConnectTimeout=7, ConnectionTimeout=9).connection_timeout == 9  # as the plugin
    with pytest.raises(ConfigError, match=r"^AwsS3Storage\.ConnectTimeout: expected an integer"):
        s3(ConnectTimeout="7")


def test_azure_defaults_and_trimmed_names():
    config = config_from_dict(
        {"AzureBlobStorage": {"ConnectionString": " AccountName=a;AccountKey=k\n",
                              "ContainerName": "container "}}
    )
    assert config.unknown_keys == ()
    assert config.object_storage == ObjectStorageConfig(
        kind="azure", bucket_name="", region="", access_key="", secret_key="", endpoint="",
        virtual_addressing=True, root_path="", storage_structure="flat", connection_timeout=30,
        request_timeout=1200, max_connections=25, max_retries=10,
        connection_string="AccountName=a;AccountKey=k", container_name="container",
        hybrid_mode="Disabled",
    )
    assert {k: v for k, v in AZURE_BLOB_DEFAULTS.items() if v is None} == {
        "ConnectionString": None, "ContainerName": None,
    }


def test_azure_every_option():
    storage = azure(
        RootPath="p", StorageStructure="legacy", HybridMode="WriteToObjectStorage",
        CreateContainerIfNotExists=False, MigrationFromFileSystemEnabled=False,
        EnableLegacyUnknownFiles=True, StorageEncryption={"Enable": False},
    )
    assert (storage.root_path, storage.storage_structure) == ("p", "legacy")
    assert storage.hybrid_mode == "WriteToObjectStorage"


@pytest.mark.parametrize("mode", HYBRID_MODES)
@pytest.mark.parametrize("section", ["AwsS3Storage", "AzureBlobStorage"])
def test_hybrid_mode_values(section, mode):
    minimal = S3_MINIMAL if section == "AwsS3Storage" else AZURE_MINIMAL
    config = config_from_dict({section: {**minimal, "HybridMode": mode}})
    assert config.object_storage.hybrid_mode == mode
    assert config.hybrid_mode == mode


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"MigrationFromFileSystemEnabled": True}, "WriteToObjectStorage"),
        ({"MigrationFromFileSystemEnabled": True, "HybridMode": "Disabled"},
         "WriteToObjectStorage"),
        ({"MigrationFromFileSystemEnabled": True, "HybridMode": "WriteToFileSystem"},
         "WriteToFileSystem"),
        ({"MigrationFromFileSystemEnabled": False}, "Disabled"),
    ],
)
def test_migration_from_file_system_is_read_as_the_plugins_do(options, expected):
    assert s3(**options).hybrid_mode == expected
    assert azure(**options).hybrid_mode == expected


@pytest.mark.parametrize(
    "options, message",
    [
        ({"BucketName": ""}, 'AwsS3Storage.BucketName: expected a non-empty string, got ""'),
        ({"BucketName": 1}, "AwsS3Storage.BucketName: expected a non-empty string, got 1"),
        ({"Region": None}, "AwsS3Storage.Region: expected a non-empty string, got null"),
        ({"AccessKey": 1}, "AwsS3Storage.AccessKey: expected a string, got 1"),
        ({"Endpoint": False}, "AwsS3Storage.Endpoint: expected a string, got false"),
        ({"VirtualAddressing": "false"},
         'AwsS3Storage.VirtualAddressing: expected true or false, got "false"'),
        ({"RootPath": "/orthanc"},
         'AwsS3Storage.RootPath: expected a string that does not start with "/", got "/orthanc"'),
        ({"RootPath": 3}, 'AwsS3Storage.RootPath: expected a string that does not start with '
         '"/", got 3'),
        ({"StorageStructure": "tree"},
         'AwsS3Storage.StorageStructure: expected "flat" or "legacy", got "tree"'),
        ({"StorageStructure": "Flat"},
         'AwsS3Storage.StorageStructure: expected "flat" or "legacy", got "Flat"'),
        ({"ConnectionTimeout": 0}, "AwsS3Storage.ConnectionTimeout: expected an integer >= 1, "
         "got 0"),
        ({"RequestTimeout": "1200"}, 'AwsS3Storage.RequestTimeout: expected an integer >= 1, '
         'got "1200"'),
        ({"MaxConnections": 0}, "AwsS3Storage.MaxConnections: expected an integer >= 1, got 0"),
        ({"MaxRetries": -1}, "AwsS3Storage.MaxRetries: expected an integer >= 0, got -1"),
        ({"MaxRetries": 1.5}, "AwsS3Storage.MaxRetries: expected an integer >= 0, got 1.5"),
        ({"HybridMode": "disabled"}, 'AwsS3Storage.HybridMode: expected "Disabled", '
         '"WriteToFileSystem" or "WriteToObjectStorage", got "disabled"'),
        ({"HybridMode": True}, 'AwsS3Storage.HybridMode: expected "Disabled", '
         '"WriteToFileSystem" or "WriteToObjectStorage", got true'),
        ({"MigrationFromFileSystemEnabled": 1},
         "AwsS3Storage.MigrationFromFileSystemEnabled: expected true or false, got 1"),
        ({"EnableLegacyUnknownFiles": "yes"},
         'AwsS3Storage.EnableLegacyUnknownFiles: expected true or false, got "yes"'),
        ({"UseTransferManager": None},
         "AwsS3Storage.UseTransferManager: expected true or false, got null"),
        ({"EnableAwsSdkLogs": 0}, "AwsS3Storage.EnableAwsSdkLogs: expected true or false, got 0"),
        ({"StorageEncryption": []}, "AwsS3Storage.StorageEncryption: expected an object, got []"),
        ({"StorageEncryption": {"Enable": "no"}},
         'AwsS3Storage.StorageEncryption.Enable: expected true or false, got "no"'),
    ],
)
def test_aws_s3_validation_errors_name_the_key(options, message):
    with pytest.raises(ConfigError) as info:
        s3(**options)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ContainerName": " "}, 'AzureBlobStorage.ContainerName: expected a non-empty string, '
         'got " "'),
        ({"ContainerName": 1}, "AzureBlobStorage.ContainerName: expected a non-empty string, "
         "got 1"),
        ({"CreateContainerIfNotExists": "true"},
         'AzureBlobStorage.CreateContainerIfNotExists: expected true or false, got "true"'),
        ({"RootPath": "/x"},
         'AzureBlobStorage.RootPath: expected a string that does not start with "/", got "/x"'),
        ({"StorageStructure": "tree"},
         'AzureBlobStorage.StorageStructure: expected "flat" or "legacy", got "tree"'),
        ({"HybridMode": "Hybrid"}, 'AzureBlobStorage.HybridMode: expected "Disabled", '
         '"WriteToFileSystem" or "WriteToObjectStorage", got "Hybrid"'),
        ({"StorageEncryption": 1}, "AzureBlobStorage.StorageEncryption: expected an object, "
         "got 1"),
    ],
)
def test_azure_validation_errors_name_the_key(options, message):
    with pytest.raises(ConfigError) as info:
        azure(**options)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"AwsS3Storage": {"Region": "r"}},
         "AwsS3Storage.BucketName: missing (required when the AwsS3Storage section is present)"),
        ({"AwsS3Storage": {}},
         "AwsS3Storage.BucketName: missing (required when the AwsS3Storage section is present)"),
        ({"AwsS3Storage": {"BucketName": "b"}},
         "AwsS3Storage.Region: missing (required when the AwsS3Storage section is present)"),
        ({"AzureBlobStorage": {"ContainerName": "c"}},
         "AzureBlobStorage.ConnectionString: missing (required when the AzureBlobStorage "
         "section is present)"),
        ({"AzureBlobStorage": {"ConnectionString": "x"}},
         "AzureBlobStorage.ContainerName: missing (required when the AzureBlobStorage section "
         "is present)"),
        ({"AwsS3Storage": "bucket"}, 'AwsS3Storage: expected an object, got "bucket"'),
        ({"AzureBlobStorage": None}, "AzureBlobStorage: expected an object, got null"),
    ],
)
def test_required_options_and_section_type(mapping, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(mapping)
    assert str(info.value) == message


def test_both_object_storage_sections_are_refused():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"AwsS3Storage": S3_MINIMAL, "AzureBlobStorage": AZURE_MINIMAL})
    assert str(info.value) == (
        "AwsS3Storage and AzureBlobStorage: only one object-storage section may be present "
        "(Orthanc loads a single object-storage plugin)"
    )


def test_both_sections_from_two_files_name_the_files(tmp_path):
    write(tmp_path / "1.json", json.dumps({"AwsS3Storage": S3_MINIMAL}))
    write(tmp_path / "2.json", json.dumps({"AzureBlobStorage": AZURE_MINIMAL}))
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, environ={})
    message = str(info.value)
    assert "only one object-storage section" in message
    assert str(tmp_path / "1.json") in message and str(tmp_path / "2.json") in message


@pytest.mark.parametrize("section", ["GoogleCloudStorage", "BlobStorage"])
def test_storage_sections_we_cannot_honour_are_refused(section):
    with pytest.raises(ConfigError, match=f"^{section}: .*not supported"):
        config_from_dict({section: {"ContainerName": "c"}})


@pytest.mark.parametrize(
    "encryption",
    [
        {"MasterKey": [3, "/keys/master.key"]},
        {"Enable": True, "MasterKey": [3, "/keys/master.key"], "MaxConcurrentInputSize": 1024},
    ],
)
@pytest.mark.parametrize("section", ["AwsS3Storage", "AzureBlobStorage"])
def test_client_side_encryption_is_refused(section, encryption):
    minimal = S3_MINIMAL if section == "AwsS3Storage" else AZURE_MINIMAL
    with pytest.raises(ConfigError) as info:
        config_from_dict({section: {**minimal, "StorageEncryption": encryption}})
    message = str(info.value)
    assert message.startswith(f"{section}.StorageEncryption: client-side encryption is not "
                              "supported")
    assert '"Enable": false' in message


@pytest.mark.parametrize(
    "encryption",
    [{}, {"Enable": False, "MasterKey": [3, "/keys/master.key"]}, {"Enable": True}],
)
def test_disabled_encryption_is_accepted(encryption):
    # Without a MasterKey, or with "Enable": false, the plugins store plain objects.
    assert s3(StorageEncryption=encryption).kind == "s3"


def test_object_storage_secrets_are_not_in_repr():
    aws = config_from_dict({"AwsS3Storage": {**S3_MINIMAL, "SecretKey": "s3cret-aws"}})
    assert "s3cret" not in repr(aws)
    assert "s3cret" not in repr(aws.object_storage)
    assert aws.object_storage.secret_key == "s3cret-aws"
    blob = config_from_dict(
        {"AzureBlobStorage": {**AZURE_MINIMAL, "ConnectionString": "AccountKey=s3cret-azure"}}
    )
    assert "s3cret" not in repr(blob)
    assert blob.object_storage.connection_string == "AccountKey=s3cret-azure"


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("AwsS3Storage", "SecretKey", ["s3cret"]),
        ("AwsS3Storage", "SecretKey", 12345),
        ("AzureBlobStorage", "ConnectionString", {"AccountKey": "s3cret"}),
        ("AzureBlobStorage", "ConnectionString", ""),
    ],
)
def test_object_storage_secrets_are_not_in_error_messages(section, key, value):
    minimal = S3_MINIMAL if section == "AwsS3Storage" else AZURE_MINIMAL
    with pytest.raises(ConfigError) as info:
        config_from_dict({section: {**minimal, key: value}})
    message = str(info.value)
    assert message.startswith(f"{section}.{key}: expected ")
    assert message.endswith("(the value is a secret: not shown)")
    assert "s3cret" not in message and "12345" not in message


def test_unknown_keys_inside_object_storage_sections():
    config = config_from_dict(
        {"AwsS3Storage": {**S3_MINIMAL, "Futuristic": 1, "TransferPoolSize": 4,
                          "TransferBufferSize": 5, "ConnectTimeout": 30}}
    )
    assert config.unknown_keys == ("AwsS3Storage.Futuristic",)
    config = config_from_dict({"AzureBlobStorage": {**AZURE_MINIMAL, "Region": "x"}})
    assert config.unknown_keys == ("AzureBlobStorage.Region",)


def test_env_substitution_inside_object_storage_sections(tmp_path):
    text = """{
      "AwsS3Storage": {
        "BucketName": "${BUCKET:-orthanc}",
        "Region": "eu-west-1",
        "AccessKey": "${S3_ACCESS_KEY}",
        "SecretKey": "${S3_SECRET_KEY}",
        "Endpoint": "${S3_ENDPOINT:-}",
        "VirtualAddressing": ${S3_VIRTUAL:-true},
        "MaxConnections": ${S3_CONNECTIONS:-25},
        "HybridMode": "${HYBRID:-Disabled}"
      }
    }"""
    path = write(tmp_path / "c.json", text)
    env = {"S3_ACCESS_KEY": "AKIA", "S3_SECRET_KEY": 'se"cr\\et', "S3_VIRTUAL": "false",
           "S3_CONNECTIONS": "8", "HYBRID": "WriteToFileSystem"}
    storage = load_config(path, environ=env).object_storage
    assert storage.bucket_name == "orthanc"
    assert (storage.access_key, storage.secret_key) == ("AKIA", 'se"cr\\et')
    assert storage.endpoint == ""
    assert storage.virtual_addressing is False
    assert storage.max_connections == 8
    assert storage.hybrid_mode == "WriteToFileSystem"

    del env["S3_SECRET_KEY"]
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env)
    message = str(info.value)
    assert "AwsS3Storage.SecretKey: environment variable S3_SECRET_KEY is not set" in message
    assert "line 6" in message

    env = {"S3_ACCESS_KEY": "a", "S3_SECRET_KEY": "s", "S3_CONNECTIONS": "0"}
    with pytest.raises(ConfigError, match=r"^AwsS3Storage\.MaxConnections: expected an integer "
                       r">= 1, got 0 \(in "):
        load_config(path, environ=env)


# ------------------------------------------------------------------------------------------
# The example file
# ------------------------------------------------------------------------------------------


def test_example_file_gives_the_defaults_except_peers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # both resolve StorageDirectory against the same directory
    example = load_config(EXAMPLE, environ={})
    defaults = Config.defaults()
    assert example.unknown_keys == ()
    assert dataclasses.replace(example, orthanc_peers={}, source="<defaults>") == defaults
    assert example.transfers == defaults.transfers


def test_example_file_lists_every_option():
    raw = parse_config_text(EXAMPLE.read_text(encoding="utf-8"), environ={})
    assert set(raw) == set(DEFAULTS) | {"OrthancPeers", "Transfers"}
    assert set(raw["Transfers"]) == set(TRANSFERS_DEFAULTS)
    for key, default in DEFAULTS.items():
        if default is not None:  # None: derived from other options, checked above
            assert raw[key] == default, key
    assert raw["Transfers"] == dict(TRANSFERS_DEFAULTS)


def test_example_file_shows_both_peer_forms():
    peers_ = load_config(EXAMPLE, environ={}).orthanc_peers
    simple = [p for p in peers_.values() if not p.properties]
    advanced = [p for p in peers_.values() if p.remote_self]
    assert simple and simple[0].basic_auth is not None
    assert advanced
    peer = advanced[0]
    assert peer.basic_auth is not None
    assert peer.http_headers
    assert peer.timeout > 0
    text = EXAMPLE.read_text(encoding="utf-8")
    assert '": ["http' in text  # the array form is written as such


def test_env_variable_can_change_the_example(monkeypatch, tmp_path):
    # A quick end-to-end check of folder + env: a second file adds an option from the env.
    folder = tmp_path / "conf"
    folder.mkdir()
    write(folder / "0-base.json", EXAMPLE.read_text(encoding="utf-8").replace(
        '"HttpPort": 8042', '"HttpPort": ${PORT:-8042}'))
    write(folder / "1-extra.json", '{"Plugins": [], "StableAge": 60}')
    assert load_config(folder, environ={"PORT": "9999"}).http_port == 9999
    assert load_config(folder, environ={}).http_port == 8042
    assert os.path.isabs(load_config(folder, environ={}).storage_directory)


EXAMPLE_ENV = {
    "S3_ACCESS_KEY": "AKIAEXAMPLE",
    "S3_SECRET_KEY": "example-secret",
    "AZURE_STORAGE_CONNECTION_STRING": "AccountName=a;AccountKey=k",
}


def commented_section(name: str) -> dict:
    """The commented-out `name` section of the example file, uncommented and parsed."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f'// "{name}": {{'))
    block = []
    for line in lines[start:]:
        text = line.strip()
        assert text.startswith("//"), f"{name} must be commented out line by line"
        block.append(text[2:])
        if text[2:].strip() in ("}", "},"):
            break
    body = "\n".join(block).rstrip().rstrip(",")
    return parse_config_text("{" + body + "}", environ=EXAMPLE_ENV)


@pytest.mark.parametrize(
    "name, defaults, placeholders",
    [
        ("AwsS3Storage", AWS_S3_DEFAULTS, {"AccessKey", "SecretKey"}),
        ("AzureBlobStorage", AZURE_BLOB_DEFAULTS, {"ConnectionString"}),
    ],
)
def test_example_file_object_storage_sections(name, defaults, placeholders):
    raw = commented_section(name)
    section = raw[name]
    assert set(section) == set(defaults)
    for key, default in defaults.items():
        if default is not None and key not in placeholders:
            assert section[key] == default, key
    text = EXAMPLE.read_text(encoding="utf-8")
    for key in placeholders:  # secrets are environment references, never values
        assert f'"{key}": "${{' in text
    # Uncommented, the section is a valid configuration with the documented defaults.
    config = config_from_dict(raw)
    assert config.unknown_keys == ()
    assert config.object_storage.hybrid_mode == "Disabled"
    assert config.object_storage.storage_structure == "flat"
