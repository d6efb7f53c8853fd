"""Calls a running `kasmina serve` with NVIDIA's own OIP v2 client (PyPI tritonclient[http]):
health, model metadata, and infer with the binary tensor extension and with plain JSON.

Usage: triton_infer.py HOST:PORT MODEL < sentences.json ; prints a JSON object."""

import json
import sys

import numpy as np
import tritonclient.http as httpclient

url, model = sys.argv[1], sys.argv[2]
sentences = json.load(sys.stdin)
client = httpclient.InferenceServerClient(url=url)
assert client.is_server_live(), "server not live"
assert client.is_server_ready(), "server not ready"
assert client.is_model_ready(model), "model not ready"
out = {"metadata": client.get_model_metadata(model)}
for binary in (True, False):
    text = httpclient.InferInput("text", [len(sentences), 1], "BYTES")
    data = np.array([[s.encode("utf-8")] for s in sentences], dtype=np.object_)
    text.set_data_from_numpy(data, binary_data=binary)
    wanted = httpclient.InferRequestedOutput("embedding", binary_data=binary)
    result = client.infer(model, [text], outputs=[wanted], request_id="triton-check")
    embedding = result.as_numpy("embedding")
    assert embedding.dtype == np.float32, embedding.dtype
    out["binary" if binary else "json"] = embedding.tolist()
print(json.dumps(out))
