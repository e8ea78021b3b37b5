#!/usr/bin/env bash
# Build the step images from envs/<step>.linux-64.lock.txt, from the repository root.
#
#   containers/build.sh apptainer [STEP...]    containers/images/earl-<step>.sif (where the rules look by default)
#   containers/build.sh podman [STEP...]       localhost/earl-<step>:<tag>, to push to a registry; then run with
#                                              EARL_CONTAINERS=docker://REGISTRY/ORG (workflow/rules/software.smk)
#
# STEP: data vq tokenize sft rl evaluate report vllm (default: all). <tag>: the first 12 hex digits of the
# sha256 of the step's lock file, the tag the rules ask for, so a changed lock is a new image.
set -euo pipefail
cd "$(dirname "$0")/.."

tool=${1:?usage: containers/build.sh apptainer|podman [STEP...]}
shift
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(data vq tokenize sft rl evaluate report vllm)
tag() { sha256sum "$1" | cut -c1-12; }

case $tool in
apptainer)
    mkdir -p containers/images
    [[ -f containers/images/earl-base.sif ]] ||
        apptainer build containers/images/earl-base.sif containers/base/apptainer.def
    for step in "${steps[@]}"; do
        apptainer build --force "containers/images/earl-$step.sif" "containers/$step/apptainer.def"
    done
    ;;
podman | docker | buildah)
    build=("$tool" build)
    [[ $tool == buildah ]] && build=(buildah bud)
    # EARL_BUILD_OPTS: more options for every build, e.g. a CA bundle for pip behind a TLS-re-signing proxy:
    #   --volume /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt
    read -r -a extra <<<"${EARL_BUILD_OPTS:-}"
    build+=("${extra[@]}")
    base=localhost/earl-base:$(tag containers/base/Containerfile)
    # EARL_DEBIAN_IMAGE: another Debian 12 image to start from (tests/containers/test_build.sh makes one with
    # debootstrap where no container registry can be reached)
    "${build[@]}" -f containers/base/Containerfile ${EARL_DEBIAN_IMAGE:+--build-arg "DEBIAN=$EARL_DEBIAN_IMAGE"} \
        -t "$base" .
    for step in "${steps[@]}"; do
        "${build[@]}" -f "containers/$step/Containerfile" --build-arg "BASE=$base" \
            -t "localhost/earl-$step:$(tag "envs/$step.linux-64.lock.txt")" .
    done
    ;;
*)
    echo "containers/build.sh: unknown tool $tool (apptainer, podman, docker, buildah)" >&2
    exit 2
    ;;
esac
