#!/usr/bin/env bash
# Installs what the tests need when it is missing, then runs every check and test.
# This is the README's test command; .ci/run calls it. Ends with a short run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests start for themselves (each store's issue adds its servers).
# The webdis feature builds hyper-tls on OpenSSL (libssl-dev, pkg-config); its tests run webdis,
# stunnel4 as a TLS terminator and openssl to make a test CA. The postgres tests run initdb and
# postgres from postgresql (as its `postgres` user when run as root; setpriv is util-linux's).
APT_PACKAGES=(redis-server webdis stunnel4 openssl libssl-dev pkg-config postgresql)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

step() { echo "==> $*"; "$@"; }

# Disk: a clean run built 9.5 GB, 5.3 GB of it the incremental cache, which a run that builds
# everything once never reads back, and CI ran out of disk once. Without it, and with line tables
# only as debug info (Cargo.toml's dev profile), a clean run stays near 3 GB.
export CARGO_INCREMENTAL=0
echo "==> disk before: $(df -h . | awk 'NR == 2 { print $4 " free" }')"

step cargo fmt --all -- --check
# rust-version in Cargo.toml against the newest one any locked dependency declares (every feature).
step python3 scripts/check-rust-version.py
step cargo clippy --all-features --all-targets -- -D warnings
step cargo clippy --no-default-features --all-targets -- -D warnings
# Each optional feature alone and with the defaults (cheap: lints only, no test runs).
for features in tower axum redis webdis sqlite postgres postgres-tls tracing testing; do
  step cargo clippy --no-default-features --features "$features" --all-targets -- -D warnings
  step cargo clippy --features "$features" --all-targets -- -D warnings
done
RUSTDOCFLAGS="-D warnings" step cargo doc --no-deps --all-features
# The benchmarks must build; running them is benches/*.sh's job, not CI's.
step cargo bench --all-features --no-run
# Doc examples use the memory store; the library and its own tests must work without it.
step cargo test --no-default-features --lib --tests
step cargo test --all-features

# The package as published: `cargo package` (its verification builds the packaged library), then
# in the unpacked package every test target built with every feature, and the default-feature
# tests run (the all-feature run above already ran them on this checkout; the package's own run
# catches a file the tests need that the package lacks). --allow-dirty: CI's clone is clean,
# a working copy need not be. The checkout's target dir is reused.
step cargo package --locked --allow-dirty
read -r target_dir version < <(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; m = json.load(sys.stdin); print(m["target_directory"], m["packages"][0]["version"])')
(
  cd "$target_dir/package/hyper-sessions-$version"
  export CARGO_TARGET_DIR="$target_dir"
  step cargo test --locked --all-features --no-run
  step cargo test --locked
)

# Every fuzz target for a short time box (fuzz/README.md); the fuzz crate is its own workspace.
if ! cargo fuzz --version >/dev/null 2>&1; then
  step cargo install cargo-fuzz --locked
fi
step cargo fmt --manifest-path fuzz/Cargo.toml -- --check
step cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
step bash scripts/fuzz.sh 20
echo "==> disk after: $(df -h . | awk 'NR == 2 { print $4 " free" }'), target $(du -sh target 2>/dev/null | cut -f1)"
