"""Starting or joining Ray, the one place that decides how this process talks to a cluster."""

from __future__ import annotations

import logging
import os

from chatvec.core.config import ChatvecConfig
from chatvec.core.errors import ChatvecError

logger = logging.getLogger(__name__)


class RayStartError(ChatvecError):
    """Ray could not be started or joined."""


def ensure_ray(config: ChatvecConfig) -> None:
    """Initialise Ray once per process according to `config.ray`.

    Token authentication stays as Ray sets it (on by default since Ray 2.52): a local cluster
    makes its own token; joining a cluster needs the cluster's token in RAY_AUTH_TOKEN or
    ~/.ray/auth_token.
    """
    import ray

    if ray.is_initialized():
        return
    settings = config.ray
    kwargs: dict = {"namespace": settings.namespace, "log_to_driver": True}
    if settings.runtime_env:
        kwargs["runtime_env"] = settings.runtime_env
    address = settings.address
    if address == "local" and os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` the job's cluster is the one to use.
        address = os.environ["RAY_ADDRESS"]
    if address == "local":
        kwargs.update(include_dashboard=False)
        if settings.num_cpus is not None:
            kwargs["num_cpus"] = settings.num_cpus
        if settings.num_gpus is not None:
            kwargs["num_gpus"] = settings.num_gpus
        where = "a new local Ray instance"
        # "local" always starts one; None would join a `ray start` cluster running on this
        # machine (and refuse num_cpus/num_gpus there)
        init_address = "local"
    else:
        init_address = address
        where = f"the Ray cluster at {address}"
    logger.info("connecting to %s", where)
    try:
        ray.init(address=init_address, **kwargs)
    except ConnectionError as exc:
        raise RayStartError(
            f"cannot reach {where}: {exc}. Start one with `ray start --head`, set ray.address in "
            "ray_config.yaml, or use --workers 0 to run without Ray."
        ) from exc
    except Exception as exc:
        if "auth" in str(exc).lower() or "token" in str(exc).lower():
            raise RayStartError(
                f"{where} refused this process: {exc}. Set RAY_AUTH_TOKEN to the cluster's token "
                "(`ray get-auth-token` on the head) or copy it to ~/.ray/auth_token."
            ) from exc
        raise


def gpus_available() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def resolve_gpus(setting: float | str) -> float:
    """`auto` -> 1 when the cluster has GPUs, 0 otherwise."""
    if setting == "auto":
        return 1.0 if gpus_available() > 0 else 0.0
    return float(setting)
