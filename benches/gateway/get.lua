-- wrk script for `just bench-gateway`: GET of PATH (default /v2/health/ready), or with
-- INFER=1 the bench-serve sentence as an OIP infer. One RESULT line, latencies in µs.
local infer = os.getenv("INFER") == "1"
wrk.method = infer and "POST" or "GET"
wrk.path = os.getenv("PATH_") or "/v2/health/ready"
if infer then
  wrk.path = "/v2/models/minilm/infer"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = '{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","data":["Kubernetes schedules pods onto nodes."]}]}'
end

function done(summary, latency, requests)
  io.write(string.format("RESULT p50_us=%.0f p99_us=%.0f rps=%.1f errors=%d non2xx=%d\n",
    latency:percentile(50), latency:percentile(99),
    summary.requests / (summary.duration / 1e6),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
