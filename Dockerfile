# redirect's image, for users with Docker: the same contents as
# `cargo xtask image` writes without a registry or a container tool (an OCI
# archive; see README, "Deploying"): a static (musl) redirect at
# /usr/local/bin, also named istio-iptables and redirect-cni, on an empty
# base. tests/tests/deploy.rs keeps the two in step.
#
# It is the node agent (deploy/redirect-node.yaml: `redirect cni install
# --wait ...`) and the istio-init replacement (`redirect istio-iptables
# ARGS`, Istio's own arguments). At run time: CAP_BPF, CAP_PERFMON and
# CAP_NET_ADMIN; the host's /sys/fs/bpf; the host's cgroup v2 tree at
# /host/sys/fs/cgroup.
#
# Docker is not available on the development machine: this file is not
# built there; the archive `cargo xtask image` writes is, and CI runs it in
# containerd (tests/tests/image.rs).

FROM rust:1-bookworm AS builder

# The eBPF side builds with nightly + rust-src (-Z build-std=core), linked by
# bpf-linker 0.10.4 (it uses rustc's own LLVM); the loader for musl.
RUN rustup toolchain install nightly --profile minimal --component rust-src \
 && rustup target add x86_64-unknown-linux-musl \
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
RUN cargo build --release --target x86_64-unknown-linux-musl -p redirect --bin redirect

# The layer: the binary, its two other names, and the mount points.
RUN mkdir -p /layer/usr/local/bin /layer/sys/fs/bpf /layer/host /layer/tmp \
 && cp target/x86_64-unknown-linux-musl/release/redirect /layer/usr/local/bin/redirect \
 && ln -s redirect /layer/usr/local/bin/istio-iptables \
 && ln -s redirect /layer/usr/local/bin/redirect-cni

FROM scratch
COPY --from=builder /layer/ /
ENV PATH=/usr/local/bin
ENTRYPOINT ["/usr/local/bin/redirect"]
