#!/usr/bin/env bash
# The README's first command, as a new user runs it: a fresh venv, the command's steps exactly as the
# README's "Set up on a fresh machine" block writes them (only the port is swapped for a free one), then
# /health, one image chat through the openai client, SIGTERM -> exit 0, no CUDA wheel, RSS reported.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
VENV="$WORK/venv"
trap 'rm -rf "$WORK"' EXIT

# The first ```bash block after the set-up heading; its steps are joined by " && ".
FIRST_COMMAND=$(awk '/^## Set up on a fresh machine/{s=1} s&&/^```bash/{b=1;next} b&&/^```/{exit} b' README.md)
[[ -n "$FIRST_COMMAND" ]] || { echo "first_run: no bash block under '## Set up on a fresh machine'" >&2; exit 1; }
SERVE_STEP=${FIRST_COMMAND##*&& }
INSTALL_STEPS=${FIRST_COMMAND% && *}
[[ "$SERVE_STEP" == "vlserve serve "*"--port 8000"* ]] || { echo "first_run: last step is not 'vlserve serve ... --port 8000': $SERVE_STEP" >&2; exit 1; }
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

python -m venv "$VENV"
# The PyTorch CPU index is unreachable from CI (pip then takes torch from the local find-links); without
# retries pip gives up on it at once instead of backing off ~8 s for each of torch's dependencies.
export PIP_RETRIES=0
export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
unset PYTHONPATH
start=$(date +%s)
echo "first_run: $INSTALL_STEPS"
bash -c "$INSTALL_STEPS"
echo "first_run: install + build took $(( $(date +%s) - start )) s"

if pip list 2>/dev/null | grep -iE '^(nvidia|cuda)[-_]'; then
    echo "first_run: CUDA wheels installed by the first command (above)" >&2; exit 1
fi
pip install -q openai  # the client of the README's quick start; not a server dependency
python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torchvision") is not None)' \
    || { echo "first_run: torchvision got installed; the server must not need it" >&2; exit 1; }

python samples/media/make_media.py --out "$WORK/media" >/dev/null
echo "first_run: ${SERVE_STEP/--port 8000/--port $PORT}"
${SERVE_STEP/--port 8000/--port $PORT} >"$WORK/serve.log" 2>&1 &
SERVER=$!
start=$(date +%s)
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    if ! kill -0 "$SERVER" 2>/dev/null || (( $(date +%s) - start > 120 )); then
        cat "$WORK/serve.log" >&2; echo "first_run: server did not become healthy" >&2; exit 1
    fi
    sleep 1
done
echo "first_run: healthy after $(( $(date +%s) - start )) s"
python .ci/first_run_chat.py --port "$PORT" --image "$WORK/media/rgb.png" --server-pid "$SERVER" \
    || { cat "$WORK/serve.log" >&2; echo "first_run: the image chat failed (server log above)" >&2; exit 1; }
kill -TERM "$SERVER"
status=0; wait "$SERVER" || status=$?
[[ $status -eq 0 ]] || { cat "$WORK/serve.log" >&2; echo "first_run: server exited $status on SIGTERM" >&2; exit 1; }
echo "first_run: SIGTERM -> exit 0; OK"
