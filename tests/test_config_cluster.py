"""[cluster] and [peer]: what a cell needs to meet its peers, checked before start."""

from __future__ import annotations

import pytest

from celld.config import ConfigError, Listen, PeerConfig, from_dict


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "cluster.key"
    path.write_text("ab" * 32 + "\n")
    return str(path)


def test_without_listen_the_cell_runs_alone(key):
    config = from_dict({"cluster": {"key_file": key}})
    assert config.cluster is None
    assert config.peer == PeerConfig(upload_slots=4, upload_rate=0)


def test_the_issue_example(key):
    config = from_dict(
        {
            "cluster": {
                "key_file": key,
                "listen": "10.0.0.5:7946",
                "seeds": ["10.0.0.2:7946", "10.0.0.3:7946"],
                "zone": "rack-1",
            },
            "peer": {"upload_slots": 6, "upload_rate": "100MiB", "stall_timeout": 12},
        }
    )
    assert config.cluster is not None
    assert config.cluster.listen == Listen("10.0.0.5", 7946)
    assert config.cluster.advertise == Listen("10.0.0.5", 7946)  # defaults to listen
    assert config.cluster.seeds == (Listen("10.0.0.2", 7946), Listen("10.0.0.3", 7946))
    assert config.cluster.zone == "rack-1"
    assert config.peer == PeerConfig(upload_slots=6, upload_rate=100 * 2**20, stall_timeout=12.0)


@pytest.mark.parametrize(
    "cluster,peer,says",
    [
        ({"listen": "nowhere"}, {}, "cluster.listen"),
        ({"listen": "10.0.0.5:7946", "seeds": ["10.0.0.2"]}, {}, "cluster.seeds[0]"),
        ({"listen": "10.0.0.5:7946", "seeds": "10.0.0.2:1"}, {}, "cluster.seeds"),
        ({"listen": "0.0.0.0:7946"}, {}, "cluster.advertise"),
        ({"listen": "10.0.0.5:7946", "zone": "a b"}, {}, "cluster.zone"),
        ({"seeds": ["10.0.0.2:7946"]}, {}, "cluster.seeds: needs cluster.listen"),
        ({"listen": "127.0.0.1:5050"}, {}, "cluster.listen: must differ"),
        ({"listen": "10.0.0.5:7946"}, {"upload_rate": "fast"}, "peer.upload_rate"),
        ({"listen": "10.0.0.5:7946"}, {"upload_slots": True}, "peer.upload_slots"),
        ({"listen": "10.0.0.5:7946"}, {"slots": 3}, "peer.slots: unknown key"),
        ({"listen": "10.0.0.5:7946"}, {"stall_timeout": 0}, "peer.stall_timeout"),
        ({"listen": "10.0.0.5:7946"}, {"stall_timeout": "30s"}, "peer.stall_timeout"),
    ],
)
def test_bad_values_name_the_key(key, cluster, peer, says):
    with pytest.raises(ConfigError) as exc:
        from_dict({"cluster": {"key_file": key, **cluster}, "peer": peer})
    assert says in str(exc.value)
