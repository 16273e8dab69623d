"""cluster.yaml is a valid Ray cluster-launcher config (checked against the installed
ray's own schema) and says what the docs say it does."""

from __future__ import annotations

import copy
import json
import os

import jsonschema
import pytest
import yaml

import ray.autoscaler

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(REPO_ROOT, "cluster.yaml")
SCHEMA_PATH = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")


@pytest.fixture(scope="module")
def schema() -> dict:
    with open(SCHEMA_PATH) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def config() -> dict:
    with open(CLUSTER_YAML) as fh:
        return yaml.safe_load(fh)


def test_cluster_yaml_matches_ray_schema(config, schema):
    jsonschema.validate(config, schema)

    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"]

    node_types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in node_types
    workers = {name: t for name, t in node_types.items() if name != head}
    assert any(t["resources"].get("GPU", 0) > 0 for t in workers.values()), \
        "no worker node type advertises a GPU"
    assert node_types[head]["resources"].get("GPU", 0) == 0
    for t in workers.values():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"]
    assert config["idle_timeout_minutes"] > 0

    head_start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start

    assert "docker" not in config
    setup = " ".join(config["setup_commands"])
    assert "torch" in setup
    # The working tree is copied by file_mounts and installed from that copy.
    (remote, local), = config["file_mounts"].items()
    assert local == "."
    assert f"pip install -e {remote}" in setup


@pytest.mark.parametrize("breakage", ["unknown_top_level_key", "max_workers_wrong_type",
                                      "worker_resource_not_integer", "missing_provider"])
def test_broken_cluster_yaml_is_rejected(config, schema, breakage):
    broken = copy.deepcopy(config)
    if breakage == "unknown_top_level_key":
        broken["max_worker"] = 4  # a typo of max_workers
    elif breakage == "max_workers_wrong_type":
        broken["max_workers"] = "ten"
    elif breakage == "worker_resource_not_integer":
        broken["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5
    elif breakage == "missing_provider":
        del broken["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_cluster_yaml_survives_ray_up_preparation(config):
    # What `ray up` does before it talks to AWS: merge the provider's defaults.yaml,
    # fold head/worker setup commands, check docker and per-type worker bounds, and
    # validate the result (ray's own validate_config, which also demands the filled-in
    # defaults). Private ray API, but the very code path of the launcher.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] == config["head_node_type"]
    assert prepared["docker"] == {}  # no container: commands run on the host
    assert prepared["available_node_types"][config["head_node_type"]]["max_workers"] == 0
    assert "\n" not in "".join(prepared["setup_commands"] + prepared["head_start_ray_commands"])
