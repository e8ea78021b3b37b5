#!/usr/bin/env bash
# Build the shared base and one step's image with podman, then run COMMAND in that image (optional).
#
#   tests/containers/build_and_run.sh STEP [COMMAND ...]     exit status: COMMAND's (77: cannot run here)
#
# No container registry is reachable from the project's machines, so the base starts from a Debian 12 made by
# debootstrap (minbase, from the mirror apt uses here) and imported into podman; everything else is
# containers/build.sh's. COMMAND runs with the checkout mounted read-only at /repo (the working directory),
# PYTHONPATH=/repo/steps, and $EARL_CONTAINER_OUT (if set) mounted read-write at the same path.
# Heavy: debootstrap (~45 s), the base's apt and pip, then the step's lock (data: ~30 packages; the torch steps
# download several GB). Needs root; installs podman, runc and debootstrap from Debian when missing.
# This machine's sandbox needs runc (crun refuses hybrid cgroups), the cgroupfs manager and lower ulimits:
# a private containers.conf sets them.
set -euo pipefail
cd "$(dirname "$0")/../.."
step=${1:?usage: tests/containers/build_and_run.sh STEP [COMMAND ...]}
shift

[[ $(id -u) == 0 ]] || { echo "build_and_run.sh: needs root" >&2; exit 77; }
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    echo "build_and_run.sh: installing ${missing[*]} (Debian packages)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "${missing[@]}" >&2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/earl-containers.XXXXXX")
trap 'rm -rf "$work"' EXIT
cat >"$work/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
export CONTAINERS_CONF=$work/containers.conf

debian=localhost/earl-debian:bookworm
if ! podman image exists "$debian"; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null ||
        awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
    debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
        { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
    tar -C "$work/rootfs" -c . | podman import - "$debian" >/dev/null
    rm -rf "$work/rootfs"
fi
# pip inside the build trusts what pip trusts here (this machine's bundle may hold a proxy's CA)
ca=$(python3 -c "import ssl; print(ssl.get_default_verify_paths().cafile or '')")
ca=${PIP_CERT:-${ca:-/etc/ssl/certs/ca-certificates.crt}}
EARL_DEBIAN_IMAGE=$debian EARL_BUILD_OPTS="--volume $ca:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt" \
    containers/build.sh podman "$step"

[[ $# -gt 0 ]] || exit 0
image=localhost/earl-$step:$(sha256sum "envs/$step.linux-64.lock.txt" | cut -c1-12)
mounts=(-v "$PWD:/repo:ro")
[[ -z ${EARL_CONTAINER_OUT:-} ]] || mounts+=(-v "$EARL_CONTAINER_OUT:$EARL_CONTAINER_OUT")
# not exec: the EXIT trap must still remove $work (set -e passes podman's exit status on)
podman run --rm "${mounts[@]}" -w /repo -e PYTHONPATH=/repo/steps "$image" "$@"
