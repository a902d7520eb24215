"""The deployment files in cluster/: the launcher YAMLs against the schema Ray's autoscaler
ships, the KubeRay manifests' fields the product relies on, the runtime_env's pins against
pyproject.toml, and the job entrypoints against the config system."""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from icd_dist.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def pyproject_requirements() -> dict[str, Requirement]:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_config_is_valid_for_rays_autoscaler(name):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(config, schema)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}  # no training on the head
    gpu = [n for k, n in nodes.items() if k != config["head_node_type"]]
    assert gpu and all(n["max_workers"] >= 1 for n in gpu)
    node = gpu[0]["node_config"]
    if config["provider"]["type"] == "aws":
        assert node["InstanceType"].startswith(("p4d", "p5"))
    else:
        assert node["guestAccelerators"][0]["acceleratorCount"] == 8
    options = " ".join(config["docker"]["run_options"])
    assert "--env WANDB_API_KEY" in options and "--shm-size" in options


def kuberay(name):
    return yaml.safe_load((CLUSTER / "kuberay" / name).read_text())


def containers(cluster_spec):
    head = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]
    workers = [c for g in cluster_spec["workerGroupSpecs"]
               for c in g["template"]["spec"]["containers"]]
    return head, workers


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_have_what_the_product_needs(name):
    doc = kuberay(name)
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head, workers = containers(spec)
    assert {c["image"] for c in head + workers} == {"icd-dist:latest"}
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["maxReplicas"]
    for c in workers:
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "8"
        env = {e["name"]: e for e in c["env"]}
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "wandb"


def test_rayjob_entrypoint_is_a_valid_run_of_a_shipped_config():
    job = kuberay("rayjob.yaml")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:4] == ["python", "-m", "icd_dist.run", "--config"]
    cfg = load_config(ROOT / argv[4], argv[5:])  # every override is a real key and value
    assert cfg.run.storage_path.startswith("s3://") and cfg.engine.device == "cuda"
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/app"  # where the Dockerfile puts the project
    assert "WORKDIR /app" in (ROOT / "Dockerfile").read_text()


def test_runtime_env_pins_fit_pyproject_and_pass_wandb_through():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    wanted = pyproject_requirements()
    for line in env["pip"]:
        req = Requirement(line)
        assert req.name in wanted, f"{req.name} is not a project dependency"
        pinned = re.fullmatch(r"==(.+)", str(req.specifier))
        if pinned:
            assert wanted[req.name].specifier.contains(pinned.group(1)), line
    assert env["env_vars"] == {"WANDB_API_KEY": "${WANDB_API_KEY}",
                               "WANDB_MODE": "${WANDB_MODE}"}
    # The image pins the same torch as the runtime_env.
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in env["pip"]:
        if line.startswith(("torch==", "torchvision==")):
            assert f'"{line}"' in dockerfile
    assert "cluster/runtime_env.yaml" in (CLUSTER / "aws.yaml").read_text()  # documented use
