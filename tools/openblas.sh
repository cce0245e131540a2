#!/usr/bin/env bash
# Linux CPU only: MLX's CPU wheel bundles the reference BLAS (~5 GFLOP/s fp32). Preloading OpenBLAS makes
# matmuls ~20x faster (../shared/ASSETS.md). `openblas.sh` installs it when missing (Debian/Ubuntu, as root);
# `openblas.sh --path` prints the library to put in LD_PRELOAD (nothing on other systems).
set -u
[ "$(uname -s)" = Linux ] || exit 0
find_lib() { ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 2>/dev/null | head -1; }
if [ "${1:-}" = --path ]; then find_lib; exit 0; fi
if [ -z "$(find_lib)" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1; }) \
    || echo "warning: could not install libopenblas0-pthread; MLX CPU matmuls will be slow" >&2
fi
[ -n "$(find_lib)" ] || echo "warning: OpenBLAS not found; MLX CPU matmuls will be slow (apt-get install libopenblas0-pthread)" >&2
exit 0
