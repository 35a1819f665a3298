#!/bin/bash
# On the GPU machine, from the project root, with the bundle of scripts/gpu_server_bundle.sh:
# one CUDA build (Hopper, sm_90) of llama.cpp's shared libraries and llama-server, a site folder
# /tmp/site with llama-cpp-python's Python files over those libraries (so llamakv and llama-server
# run the same build) and the wheels, and a random-weight GGUF of Llama-3.1-8B's shape, Q4_0.
# About 5 minutes on 16 cores. Afterwards, in the same warm machine:
#   export PYTHONPATH=/tmp/site:$PWD
#   python3 scripts/bench_server.py --model /tmp/l8b.gguf --llama-server /tmp/lcb/build/bin/llama-server -ngl 99 -fa ...
# usage: scripts/gpu_build_server.sh BUNDLEDIR
set -euo pipefail
b=$(cd "${1:?usage: gpu_build_server.sh BUNDLEDIR}" && pwd)
t0=$(date +%s)
if [ ! -x /tmp/lcb/build/bin/llama-server ]; then
  rm -rf /tmp/lcb && mkdir -p /tmp/lcb && tar xzf "$b/lcp-src.tgz" -C /tmp/lcb
  cmake -S /tmp/lcb/lcp/vendor/llama.cpp -B /tmp/lcb/build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DCMAKE_BUILD_TYPE=Release > /tmp/cmake.log 2>&1 || { tail -30 /tmp/cmake.log; exit 1; }
  cmake --build /tmp/lcb/build --target llama-server -j"$(nproc)" > /tmp/build.log 2>&1 \
    || { tail -40 /tmp/build.log; exit 1; }
fi
echo "build: $(( $(date +%s) - t0 )) s"
mkdir -p /tmp/site/include
cp -r "$b"/py/* /tmp/site/
mkdir -p /tmp/site/llama_cpp/lib
cp -P /tmp/lcb/build/bin/lib*.so* /tmp/site/llama_cpp/lib/
cp /tmp/lcb/lcp/vendor/llama.cpp/include/*.h /tmp/lcb/lcp/vendor/llama.cpp/ggml/include/*.h /tmp/site/include/
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$b"/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'gpu', llama_cpp.llama_supports_gpu_offload())"
[ -f /tmp/l8b.gguf ] || python3 scripts/make_random_gguf.py /tmp/l8b.gguf --shape llama-3.1-8b --qtype q4_0 --like "$b/tok.gguf"
ls -la /tmp/l8b.gguf
