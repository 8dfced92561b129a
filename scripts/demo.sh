#!/usr/bin/env bash
# The main job on the bundled sample: index the gallery, serve it, ask through the client, stop.
# Run by `make demo` (which installs first); needs `pictor` on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

work=${PICTOR_DEMO_DIR:-runs/demo}
port=${PICTOR_DEMO_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
target="127.0.0.1:$port"
rm -rf "$work" && mkdir -p "$work"

echo "== 1. index the sample gallery (270 Google emoji in 9 category folders)"
pictor index sample/gallery --out "$work/index" --no-progress

echo "== 2. serve it on $target"
pictor serve --index "$work/index" --host 127.0.0.1 --port "$port" >"$work/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  pictor info --target "$target" --timeout 2 >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { cat "$work/server.log"; exit 1; }
  sleep 1
done
pictor info --target "$target"

echo
echo "== 3. classify a photo with the backbone's ImageNet labels"
pictor classify sample/photos/*.jpg --top-k 3 --target "$target"

echo
echo "== 4. classify Twitter's drawings by a kNN vote over the Google gallery's categories"
pictor classify sample/queries/*.png --classifier knn --top-k 1 --target "$target"

echo
echo "== 5. search: the same emoji drawn by another artist should come first"
for q in $(ls sample/queries/*.png | head -n 4); do
  echo "query $q"
  pictor search "$q" -k 3 --target "$target"
done

echo
echo "== 6. stop the server"
kill -TERM "$server" && wait "$server" || true
trap - EXIT
echo "done: index in $work/index, server log in $work/server.log"
