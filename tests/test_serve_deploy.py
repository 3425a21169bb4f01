"""deploy/: the Ray Serve config and the KubeRay RayService manifest, loaded with Ray's own config schema
(ServeDeploySchema) and checked for the fields Ray and KubeRay read; their `args` build the application."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'sdengine[ray]'")
yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _check_serve_config(config: dict):
    """The config as Ray validates it, and what sdengine needs of it: one GPU per replica, TensorRT, the volume."""
    from ray.serve.schema import ServeDeploySchema

    from sdengine.serve.ray import build_app

    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "sdengine.serve.ray:app_builder" and app.route_prefix == "/"
    assert app.args["backend"] == "tensorrt" and app.args["device"] == "cuda"
    assert app.args["model"].startswith("/engines/")
    (deployment,) = app.deployments
    assert deployment.ray_actor_options.num_gpus == 1  # one replica per GPU
    assert deployment.max_ongoing_requests == app.args["max_batch"] + app.args["max_queue"] + 8
    # The builder Ray calls with `args`: an application whose deployment the config's override names.
    built = build_app(**app.args)
    assert built._bound_deployment.name == deployment.name == "sdengine"
    assert built._bound_deployment.ray_actor_options["num_gpus"] == 1  # TensorRT's default, as in the config
    return schema


def test_serve_config_loads_with_rays_schema():
    config = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    schema = _check_serve_config(config)
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8000
    assert schema.applications[0].deployments[0].num_replicas == 2


def test_rayservice_manifest_is_what_kuberay_reads():
    manifest = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    spec = manifest["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])  # KubeRay hands this string to Ray Serve as is
    schema = _check_serve_config(serve_config)
    # The same application as deploy/serve.yaml.
    assert serve_config["applications"] == yaml.safe_load((DEPLOY / "serve.yaml").read_text())["applications"]
    cluster = spec["rayClusterConfig"]
    import ray

    assert cluster["rayVersion"] == ray.__version__  # the image's Ray is the one tested here
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    assert {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]} >= {6379, 8000}
    (workers,) = cluster["workerGroupSpecs"]
    replicas = schema.applications[0].deployments[0].num_replicas
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == replicas
    assert workers["rayStartParams"]["num-gpus"] == "1"
    pod = workers["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 == resources["requests"]["nvidia.com/gpu"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    head_env = {e["name"]: e["value"] for e in head["template"]["spec"]["containers"][0].get("env", [])}
    from sdengine.serve.proxy import ENV, IMPORT_PATH

    assert env.get(ENV) == head_env.get(ENV) == IMPORT_PATH  # every node's proxy speaks the server's errors
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = container["volumeMounts"]
    assert "persistentVolumeClaim" in volumes[mount["name"]]
    model = schema.applications[0].args["model"]
    assert model.startswith(mount["mountPath"].rstrip("/") + "/")  # the engine set is on the volume
    assert container["image"] == head["template"]["spec"]["containers"][0]["image"]
