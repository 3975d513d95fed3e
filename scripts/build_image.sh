#!/usr/bin/env bash
# Build the container image (docker/Dockerfile) and print its size and build time.
#   scripts/build_image.sh [--base cuda|local-debian|IMAGE] [--tag TAG] [--engine auto|docker|podman]
#                          [--no-cache] [--user-uid UID] [--prune]
# --base cuda (default): the Dockerfile's CUDA 13 devel base (needs a registry to pull it).
# --base local-debian: a Debian bookworm base made here with debootstrap and imported into the
#   engine, cached as a tarball in $ECHOCARE_IMAGE_CACHE (default /var/cache/echocare), so no
#   registry is needed; it is what CI builds and runs (tests/test_container.py). Needs root.
# --base IMAGE: any Debian/Ubuntu image the engine can get.
# --prune: afterwards remove dangling images (earlier builds' layers no tag uses any more):
#   each rebuild of the heavy layer leaves ~8 GB behind otherwise (CI passes it).
# Engine: docker when a Docker engine answers, else podman (rootful, with the flags in
# ENGINE/BUILD_FLAGS below, reasons in docs/container.md).
# The last line printed is machine-readable:
#   [build_image] image=TAG engine=E base=B seconds=S size_bytes=N
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ECHOCARE_IMAGE_CACHE:-/var/cache/echocare}"
DEBIAN_MIRROR="${ECHOCARE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
LOCAL_BASE=localhost/echocare-base:bookworm
VERSION="$(sed -n 's/^ *version="\([^"]*\)".*/\1/p' "$ROOT/setup.py" | head -n 1)"

say() { echo "[build_image] $*" >&2; }
die() { say "error: $*"; exit 2; }

base=cuda tag="" engine=auto no_cache=() user_uid=10001 prune=0
while [ "$#" -gt 0 ]; do
    case "$1" in
        --base) base="${2:?--base needs a value}"; shift 2 ;;
        --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
        --engine) engine="${2:?--engine needs a value}"; shift 2 ;;
        --no-cache) no_cache=(--no-cache); shift ;;
        --prune) prune=1; shift ;;
        --user-uid) user_uid="${2:?--user-uid needs a value}"; shift 2 ;;
        -h|--help) sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
case "$engine" in auto|docker|podman) ;; *) die "--engine $engine: expected auto, docker or podman" ;; esac
[[ "$user_uid" =~ ^[0-9]+$ ]] || die "--user-uid $user_uid: expected a number"

if [ "$engine" = auto ]; then
    if command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null 2>&1; then
        engine=podman
    else
        die "no container engine: no Docker engine answers and podman is not installed (apt-get install podman runc)"
    fi
fi
# podman as root on a cgroup-v1 host without systemd: crun fails here ("cgroups in hybrid
# mode", setrlimit denied), runc works; cgroupfs because there is no systemd to ask for cgroups.
ENGINE=("$engine")
BUILD_FLAGS=()
if [ "$engine" = podman ]; then
    ENGINE+=(--runtime runc --cgroup-manager cgroupfs)
    # The default rlimits podman asks for are above this host's hard limit: setrlimit fails.
    # --format docker: the OCI format drops SHELL (the RUN lines need bash's pipefail).
    BUILD_FLAGS+=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --format docker --layers)
fi
if [ -z "$tag" ]; then
    tag="echocare-dist:$VERSION"
    # podman does not resolve short names without a registry: local images live under localhost/.
    if [ "$engine" = podman ]; then tag="localhost/$tag"; fi
fi

image_exists() {
    if [ "$engine" = podman ]; then "${ENGINE[@]}" image exists "$1"; else docker image inspect "$1" >/dev/null 2>&1; fi
}

# The debootstrapped Debian base: made once, kept as a tarball outside the checkout, so a clean
# CI checkout on the same machine (or a wiped image store) imports it again in seconds.
make_local_base() {
    local tarball="$CACHE/debian-bookworm-minbase.tar"
    if image_exists "$LOCAL_BASE"; then
        say "base $LOCAL_BASE: already in the $engine image store"
        return
    fi
    if [ ! -s "$tarball" ]; then
        [ "$(id -u)" = 0 ] || die "--base local-debian: debootstrap needs root (or put $tarball in place)"
        command -v debootstrap >/dev/null 2>&1 || die "--base local-debian needs debootstrap (apt-get install debootstrap)"
        mkdir -p "$CACHE"
        local rootfs
        rootfs="$(mktemp -d "$CACHE/bootstrap.XXXXXX")"
        # shellcheck disable=SC2064  # expand now: the path is local to this function
        trap "rm -rf '$rootfs'" EXIT
        say "debootstrap bookworm (minbase) from $DEBIAN_MIRROR into $rootfs"
        local t0=$SECONDS
        debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$DEBIAN_MIRROR" \
            >"$CACHE/debootstrap.log" 2>&1 || { tail -n 30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
        # minbase lists only "bookworm main": add the point-release and security updates.
        cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb ${DEBIAN_MIRROR%/debian}/debian-security bookworm-security main
EOF
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
        # Written next to its final name, then renamed: an interrupted run leaves no half tarball.
        tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
        mv -f "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
        trap - EXIT
        say "base tarball $tarball: $(du -h "$tarball" | cut -f1) in $((SECONDS - t0)) s"
    fi
    "${ENGINE[@]}" import --change 'CMD ["/bin/bash"]' "$tarball" "$LOCAL_BASE" >/dev/null
    say "imported $tarball as $LOCAL_BASE"
}

# pip's settings on this host, carried into the build: local wheel folders and file:// indexes
# are mounted read-only at the same path (podman only: docker build cannot mount), and the CA
# bundle pip trusts (a TLS-intercepting proxy's) is mounted where the build's pip reads it.
BUILD_ARGS=(--build-arg "USER_UID=$user_uid" --build-arg "VERSION=$VERSION")
pip_setting() {  # $1 = pip option name; the environment wins over the config files, as in pip
    local env_name="PIP_${1^^}"
    env_name="${env_name//-/_}"
    if [ -n "${!env_name:-}" ]; then echo "${!env_name}"; return; fi
    local py
    for py in "$ROOT/.venv/bin/python" python3; do
        if "$py" -m pip --version >/dev/null 2>&1; then
            "$py" -m pip config get "global.$1" 2>/dev/null || true
            return
        fi
    done
}
local_dir() { local p="${1#file://}"; if [ -d "$p" ]; then echo "$p"; fi; }
carry_pip_settings() {
    local name value item dir kept
    for name in index-url extra-index-url find-links; do
        value="$(pip_setting "$name")"
        [ -n "$value" ] || continue
        kept=()
        for item in $value; do
            case "$item" in
                http://*|https://*) kept+=("$item") ;;
                *)
                    dir="$(local_dir "$item")"
                    if [ -z "$dir" ]; then continue; fi
                    # An index's pages (.../simple) link to files beside it: mount its parent.
                    if [ "$name" != find-links ]; then dir="$(dirname "$dir")"; fi
                    if [ "$engine" = podman ]; then
                        BUILD_FLAGS+=(-v "$dir:$dir:ro")
                        kept+=("$item")
                    fi ;;
            esac
        done
        if [ "${#kept[@]}" -gt 0 ]; then
            local arg="PIP_${name^^}"
            BUILD_ARGS+=(--build-arg "${arg//-/_}=${kept[*]}")
        fi
    done
    value="$(pip_setting cert)"
    if [ -n "$value" ] && [ -f "$value" ] && [ "$engine" = podman ]; then
        BUILD_FLAGS+=(-v "$value:/run/echocare-build-ca.crt:ro")
        BUILD_ARGS+=(--build-arg "PIP_CERT=/run/echocare-build-ca.crt")
    fi
}

# The commit the image is built from, read from .git without running git.
revision() {
    local head ref
    head="$(cat "$ROOT/.git/HEAD" 2>/dev/null)" || { echo unknown; return; }
    if [[ "$head" == "ref: "* ]]; then
        ref="${head#ref: }"
        if [ -f "$ROOT/.git/$ref" ]; then cat "$ROOT/.git/$ref"; return; fi
        awk -v r="$ref" '$2 == r {print $1; found=1} END {if (!found) print "unknown"}' "$ROOT/.git/packed-refs" 2>/dev/null || echo unknown
    else
        echo "$head"
    fi
}

t_start=$SECONDS
case "$base" in
    cuda) ;;
    local-debian) make_local_base; BUILD_ARGS+=(--build-arg "BASE_IMAGE=$LOCAL_BASE") ;;
    *) BUILD_ARGS+=(--build-arg "BASE_IMAGE=$base") ;;
esac
carry_pip_settings
BUILD_ARGS+=(--build-arg "REVISION=$(revision)" --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")

say "building $tag with $engine (base: $base)"
t_build=$SECONDS
"${ENGINE[@]}" build --network host "${BUILD_FLAGS[@]}" "${no_cache[@]}" "${BUILD_ARGS[@]}" \
    -f "$ROOT/docker/Dockerfile" -t "$tag" "$ROOT"
build_s=$((SECONDS - t_build))
size="$("${ENGINE[@]}" image inspect --format '{{.Size}}' "$tag")"
if [ "$prune" = 1 ]; then
    say "removing dangling images: $("${ENGINE[@]}" image prune -f | wc -l) removed"
fi
say "built $tag in ${build_s} s (base preparation included: $((SECONDS - t_start)) s); image size $((size / 1024 / 1024)) MiB"
echo "[build_image] image=$tag engine=$engine base=$base seconds=$build_s size_bytes=$size"
