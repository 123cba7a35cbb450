#!/usr/bin/env bash
# Builds a stripped release binary and a .deb for one target.
#
#   cross/build.sh TARGET [ROUTE]
#
# TARGET: aarch64-unknown-linux-gnu (arm64: Pi 3/4/5, 64-bit OS)
#         armv7-unknown-linux-gnueabihf (armhf: Pi 2/3/4/5, 32-bit OS)
#         arm-unknown-linux-gnueabihf (armhf ARMv6: Pi Zero/1; zig route only, see below)
#         aarch64-unknown-linux-musl (static; zig route)
#         x86_64-unknown-linux-gnu (amd64, native)
# ROUTE:  gcc   (default) plain cargo with Debian's cross gcc; needs
#               gcc-aarch64-linux-gnu libc6-dev-arm64-cross / gcc-arm-linux-gnueabihf
#               libc6-dev-armhf-cross. The binary needs the build machine's glibc
#               (Debian 12: 2.34+ at most), so it does not run on Bullseye.
#         zig   cargo-zigbuild (cargo install cargo-zigbuild; pip install ziglang) with
#               GLIBC (default 2.31): runs on Bullseye and Bookworm.
#         cross the `cross` tool (Docker), images from Cross.toml.
#
# Linker and C compiler (ring and the bundled SQLite have C parts) are set here through
# CARGO_TARGET_<TRIPLE>_LINKER and CC_<triple>, never in .cargo/config.toml, so that the
# other routes and native builds are unaffected.
#
# Output: target/TARGET/release/fieldbridge and target/debian/fieldbridge_<ver>-1_<arch>.deb
# (under $CARGO_TARGET_DIR if set). NO_DEB=1 skips the package.
set -euo pipefail

target=${1:?usage: cross/build.sh TARGET [gcc|zig|cross]}
route=${2:-gcc}
glibc=${GLIBC:-2.31}
cd "$(dirname "$0")/.."

case "$target" in
    aarch64-unknown-linux-gnu) gcc=aarch64-linux-gnu ;;
    armv7-unknown-linux-gnueabihf) gcc=arm-linux-gnueabihf ;;
    arm-unknown-linux-gnueabihf)
        gcc=""
        if [ "$route" = gcc ]; then
            # Debian's arm-linux-gnueabihf-gcc targets ARMv7 (Thumb-2, VFPv3): its C objects
            # and crt files die with SIGILL on the ARMv6 core of a Pi Zero/1.
            echo "ARMv6: Debian's armhf gcc emits ARMv7 code; use: $0 $target zig" >&2
            exit 2
        fi
        ;;
    aarch64-unknown-linux-musl) gcc="" ; [ "$route" = gcc ] && { echo "musl: use the zig route" >&2; exit 2; } ;;
    x86_64-unknown-linux-gnu) gcc="" ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
esac

rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target" || {
    # Rust 1.94 and 1.95 ship no rust-std for arm-unknown-linux-gnueabihf (404 from rustup).
    echo "no rust-std for $target on this toolchain; e.g. rustup toolchain install 1.93.0" \
         "--profile minimal --target $target; RUSTUP_TOOLCHAIN=1.93.0 $0 $*" >&2
    exit 2
}

triple_env=$(echo "$target" | tr 'a-z-' 'A-Z_')
triple_cc=$(echo "$target" | tr '-' '_')
case "$route" in
    gcc)
        if [ -n "$gcc" ]; then
            command -v "$gcc-gcc" >/dev/null || {
                echo "$gcc-gcc not found: apt-get install gcc-$gcc libc6-dev-*-cross" >&2
                exit 2
            }
            export "CARGO_TARGET_${triple_env}_LINKER=$gcc-gcc"
            export "CC_${triple_cc}=$gcc-gcc" "AR_${triple_cc}=$gcc-ar"
        fi
        cargo build --release --locked --target "$target"
        ;;
    zig)
        command -v cargo-zigbuild >/dev/null || { echo "cargo install cargo-zigbuild" >&2; exit 2; }
        zig_target=$target
        case "$target" in *-gnu | *-gnueabihf) zig_target="$target.$glibc" ;; esac
        cargo zigbuild --release --locked --target "$zig_target"
        ;;
    cross)
        cross build --release --locked --target "$target"
        ;;
    *) echo "unknown route $route" >&2; exit 2 ;;
esac

out="${CARGO_TARGET_DIR:-target}/$target/release/fieldbridge"
ls -l "$out"
if command -v "${gcc:-x}-objdump" >/dev/null; then objdump="$gcc-objdump"; else objdump=objdump; fi
if "$objdump" -T "$out" >/dev/null 2>&1; then
    echo "needs $("$objdump" -T "$out" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)"
fi

if [ "${NO_DEB:-0}" != 1 ]; then
    command -v cargo-deb >/dev/null || { echo "cargo install cargo-deb" >&2; exit 2; }
    # Already stripped by the release profile; cargo-deb would need the target's strip.
    variant=()
    # cargo-deb's $auto would require the build machine's libc in Depends (a static musl
    # binary gets none from $auto, which is right).
    case "$route $glibc $target" in
        "zig 2.31 "*-gnu | "zig 2.31 "*-gnueabihf) variant=(--variant glibc231) ;;
    esac
    cargo deb --no-build --no-strip --target "$target" "${variant[@]}"
fi
