#!/bin/sh
# Builds target/debian/mailferry_VERSION_ARCH.deb: the release binary, its man pages and shell
# completions (generated from the clap definitions), the systemd units, example configs and docs.
# Needs cargo-deb: `cargo install --locked cargo-deb`.
set -eu
cd "$(dirname "$0")/.."

cargo build --release --locked
out=target/assets
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
target/release/mailferry manpage --out "$out/man"
gzip -9n "$out"/man/*.1
target/release/mailferry completions bash > "$out/completions/mailferry"
target/release/mailferry completions zsh > "$out/completions/_mailferry"
target/release/mailferry completions fish > "$out/completions/mailferry.fish"
cargo deb --no-build --locked "$@"
