#!/bin/bash
# Prepare, on this machine, what the GPU machine needs to run llamakv serve and llama-server from
# one CUDA build of llama.cpp (see scripts/gpu_build_server.sh): the llama-cpp-python sdist's
# llama.cpp trimmed to the libraries, the server and its UI; llama-cpp-python's Python files (from
# the installed package, run over the CUDA libraries); the pure-Python wheels the GPU image lacks;
# a tokenizer GGUF for random-weight models. About 12 MB.
# usage: scripts/gpu_server_bundle.sh OUTDIR [LLAMA_CPP_PYTHON_VERSION]   (inside the venv)
set -euo pipefail
out=${1:?usage: gpu_server_bundle.sh OUTDIR [VERSION]}; ver=${2:-0.3.36}
mkdir -p "$out"; out=$(cd "$out" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$ver" -d "$tmp"
tar xzf "$tmp"/llama_cpp_python-$ver.tar.gz -C "$tmp"
src="$tmp/llama_cpp_python-$ver"; v="$src/vendor/llama.cpp"
mkdir -p "$tmp/keep" && cp "$v"/scripts/*.cmake "$tmp/keep/"
rm -rf "$src"/.git "$src"/docs "$src"/examples "$src"/tests "$v"/.git
rm -rf "$v"/{docs,models,media,benches,tests,examples,pocs,app,gguf-py,conversion,skills,ci,scripts,grammars,requirements}
mkdir -p "$v/scripts" && cp "$tmp"/keep/*.cmake "$v/scripts/"
find "$v/tools" -mindepth 1 -maxdepth 1 ! -name mtmd ! -name server ! -name ui -exec rm -rf {} +
rm -rf "$v/tools/ui/node_modules"
cat > "$v/tools/CMakeLists.txt" <<'CMAKE'
# trimmed: the server, its UI and mtmd only
find_package(Threads REQUIRED)
llama_add_compile_flags()
if (LLAMA_BUILD_SERVER)
    add_subdirectory(ui)
    add_subdirectory(server)
endif()
add_subdirectory(mtmd)
CMAKE
mv "$src" "$tmp/lcp"
tar czf "$out/lcp-src.tgz" -C "$tmp" lcp
site=$(python3 -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent.parent)")
mkdir -p "$out/py"
cp -r "$site/llama_cpp" "$out/py/" && rm -rf "$out/py/llama_cpp/lib" "$out"/py/llama_cpp/__pycache__
cp -r "$site/llama_cpp_python-$ver.dist-info" "$out/py/"
rm -f "$out/py/llama_cpp_python-$ver.dist-info/RECORD" "$out/py/llama_cpp_python-$ver.dist-info/direct_url.json"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out" \
  diskcache gguf cffi pycparser starlette uvicorn sse-starlette httpx httpcore h11 anyio sniffio idna certifi \
  click jinja2 markupsafe typing_extensions
python3 "$root/scripts/make_random_gguf.py" "$out/tok.gguf"
du -sh "$out"
