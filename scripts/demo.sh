#!/usr/bin/env bash
# The main job on the bundled sample: index the gallery, serve it, ask through the client, stop.
# Run by `make demo` (which installs first); needs `pictor` on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

work=${DEMO_DIR:-runs/demo}
port=${DEMO_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
target="127.0.0.1:$port"
# Only what an earlier demo made there: DEMO_DIR may be a folder of other things.
rm -rf "$work/index" "$work/server.log" "$work/knn.json" && mkdir -p "$work"

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
pictor classify sample/queries/*.png --classifier knn --top-k 1 --json --target "$target" >"$work/knn.json"
python - "$work/knn.json" <<'PY'
import json, pathlib, sys
# The right answer: the category folder of Google's drawing of the same emoji.
folder = {p.name: p.parent.name for p in pathlib.Path("sample/gallery").glob("*/*.png")}
results = json.loads(pathlib.Path(sys.argv[1]).read_text())
right = 0
for r in results:
    name, top = pathlib.Path(r["image"]).name, r["labels"][0]
    want = folder.get(name, "?")
    right += top["name"] == want
    miss = "" if top["name"] == want else f"  (Google's drawing is in {want})"
    print(f"  {name}: {top['name']} {top['score']:.2f}{miss}")
print(f"category right for {right} of {len(results)} queries")
PY

echo
echo "== 5. search with each Twitter drawing: where does Google's drawing of the same emoji rank?"
echo "sample/queries/1f3b9.png (Twitter's drawing), its 3 nearest in the Google gallery:"
pictor search sample/queries/1f3b9.png -k 3 --target "$target"
found=0 first=0 total=0
for q in sample/queries/*.png; do
  rank=$(pictor search "$q" -k 10 --json --target "$target" | python -c '
import json, sys
keys = [h["key"].rsplit("/", 1)[-1] for h in json.load(sys.stdin)]
print(keys.index(sys.argv[1]) + 1 if sys.argv[1] in keys else "-")' "$(basename "$q")")
  echo "  $(basename "$q"): rank $rank"
  total=$((total + 1))
  if [ "$rank" != "-" ]; then found=$((found + 1)); fi
  if [ "$rank" = "1" ]; then first=$((first + 1)); fi
done
echo "same emoji first for $first of $total queries, in the top 10 for $found"

echo
echo "== 6. stop the server"
kill -TERM "$server" && wait "$server" || true
trap - EXIT
echo "done: index in $work/index, server log in $work/server.log"
