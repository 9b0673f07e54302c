# redirect as an init container image: `redirect apply ...` runs once per pod,
# attaches and pins the eBPF programs, and exits.
#
# At run time it needs:
#   - CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN; CAP_SYS_PTRACE too when it
#     applies to a pod whose proxy is already listening (the loader borrows
#     the listening socket with pidfd_getfd to register it);
#   - bpffs mounted (the pin dir, default /sys/fs/bpf/redirect, must be on it);
#   - the host's cgroup v2 hierarchy mounted, so that --cgroup can name the
#     pod's cgroup directory;
#   - the pod's network namespace, reachable as the container's own or through
#     --netns.
#
# Docker is not available on the development machine, so this image is not
# built in CI and has not been built or tested.

FROM rust:1-bookworm AS builder

# The eBPF side builds with nightly + rust-src (-Z build-std=core), linked by
# bpf-linker 0.10.4 (it uses rustc's own LLVM).
RUN rustup toolchain install nightly --profile minimal --component rust-src \
 && cargo install bpf-linker --version 0.10.4 --locked

WORKDIR /src
# Every workspace member's manifest is needed; target/ is not copied.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY redirect redirect
COPY redirect-common redirect-common
COPY redirect-ebpf redirect-ebpf
COPY tests tests
COPY xtask xtask
RUN cargo build --release -p redirect

# redirect runs no external tool (iproute2 was for the demo's throwaway pods,
# which are test fixtures now and not in this image).
FROM debian:bookworm-slim
COPY --from=builder /src/target/release/redirect /usr/local/bin/redirect
ENTRYPOINT ["redirect"]
