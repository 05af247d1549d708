#!/usr/bin/env bash
# The generate endpoints of the multilora model with curl.
#   client_examples/curl_generate.sh [--url http://localhost:8000] [--lora upper] [PROMPT]
# /generate answers one JSON object; /generate_stream one server-sent event per response.
set -euo pipefail
URL=http://localhost:8000
LORA=upper
PROMPT="hello world"
while [ $# -gt 0 ]; do
  case "$1" in
    --url) URL=$2; shift 2 ;;
    --lora) LORA=$2; shift 2 ;;
    -h|--help) sed -n 2,4p "$0"; exit 0 ;;
    *) PROMPT=$1; shift ;;
  esac
done
case "$URL" in http*) ;; *) URL="http://$URL" ;; esac

# Build the JSON with python3 so any prompt is quoted right.
body() {
  python3 -c 'import json, sys
print(json.dumps({"text_input": sys.argv[1], "lora_name": sys.argv[2], "stream": sys.argv[3] == "1",
                  "sampling_parameters": json.dumps({"max_tokens": 32, "temperature": 0}),
                  "exclude_input_in_output": True, "return_finish_reason": True}))' "$PROMPT" "$LORA" "$1"
}

echo "POST $URL/v2/models/multilora/generate"
curl -sS --fail-with-body -X POST "$URL/v2/models/multilora/generate" \
  -H 'Content-Type: application/json' -d "$(body 0)"
echo
echo "POST $URL/v2/models/multilora/generate_stream"
curl -sS -N --fail-with-body -X POST "$URL/v2/models/multilora/generate_stream" \
  -H 'Content-Type: application/json' -d "$(body 1)"
