#!/usr/bin/env python3
"""Checks Cargo.toml's `rust-version` against the locked dependencies (scripts/test.sh runs it).

Reads `cargo metadata --format-version 1 --all-features --locked` (every feature, every
platform, dev-dependencies included: the resolve Cargo.lock pins) and fails, naming the
dependency, when a locked package declares a `rust-version` newer than the crate's own.
What the crate's own code needs (let-chains: 1.88) is not visible here: clippy's
`incompatible_msrv` lint, in scripts/test.sh's clippy runs, catches newer standard-library APIs.

    python3 scripts/check-rust-version.py [--manifest-path Cargo.toml]
"""
import argparse
import json
import subprocess
import sys


def parse(version):
    """'1.88' or '1.88.0' as (1, 88, 0)."""
    parts = [int(p) for p in version.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest-path", default="Cargo.toml")
    args = ap.parse_args()
    cmd = ["cargo", "metadata", "--format-version", "1", "--all-features", "--locked",
           "--manifest-path", args.manifest_path]
    out = subprocess.run(cmd, stdout=subprocess.PIPE)
    if out.returncode != 0:
        sys.exit(f"error: `{' '.join(cmd)}` failed (its message is above)")
    meta = json.loads(out.stdout)
    members = set(meta["workspace_members"])
    ours = [p for p in meta["packages"] if p["id"] in members]
    deps = [p for p in meta["packages"] if p["id"] not in members and p.get("rust_version")]
    if not deps:
        sys.exit("no locked dependency declares a rust-version: is this the right manifest?")
    newest = max(deps, key=lambda p: parse(p["rust_version"]))
    failed = False
    for pkg in ours:
        declared = pkg.get("rust_version")
        if not declared:
            print(f"error: {pkg['name']} declares no rust-version in Cargo.toml", file=sys.stderr)
            failed = True
            continue
        too_new = sorted(
            (p for p in deps if parse(p["rust_version"]) > parse(declared)),
            key=lambda p: (parse(p["rust_version"]), p["name"]),
            reverse=True,
        )
        for p in too_new:
            print(
                f"error: {pkg['name']} declares rust-version {declared}, but the locked "
                f"dependency {p['name']} {p['version']} needs Rust {p['rust_version']}: "
                f"raise rust-version in Cargo.toml (and the README's minimum supported Rust "
                f"version) or lock an older {p['name']}",
                file=sys.stderr,
            )
            failed = True
        if not too_new:
            print(
                f"{pkg['name']}: rust-version {declared}; the newest any locked dependency "
                f"needs is {newest['rust_version']} ({newest['name']} {newest['version']}, "
                f"of {len(deps)} that declare one)"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
