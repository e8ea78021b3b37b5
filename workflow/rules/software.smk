# Software of each step, for --software-deployment-method conda or apptainer (ignored otherwise): a conda env
# file envs/<step>.yaml, and an image built from its lock file envs/<step>.linux-64.lock.txt (containers/).
#
# EARL_CONTAINERS says where the images are: a directory of earl-<step>.sif files (default: containers/images
# of this checkout, where `containers/build.sh apptainer` puts them), or a registry prefix such as
# docker://ghcr.io/ORG for images earl-<step>:<tag>, <tag> the first 12 hex digits of the lock's sha256 (the
# tag `containers/build.sh podman` gives them).
import hashlib
import os

ENVS = Path(workflow.basedir) / "envs"


def conda_env(step):
    return str(ENVS / f"{step}.yaml")


def container_image(step):
    where = os.environ.get(
        "EARL_CONTAINERS", str(Path(workflow.basedir) / "containers" / "images")
    )
    if "://" in where:
        lock = (ENVS / f"{step}.linux-64.lock.txt").read_bytes()
        return (
            f"{where.rstrip('/')}/earl-{step}:{hashlib.sha256(lock).hexdigest()[:12]}"
        )
    return f"{where}/earl-{step}.sif"
