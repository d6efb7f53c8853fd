-- One-sentence OIP v2 infer requests for wrk; the sentence varies per request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local sentences = {
  "The quick brown fox jumps over the lazy dog.",
  "Edge devices run small encoders close to the data.",
  "How far is the nearest charging station?",
  "Kubernetes schedules pods onto nodes.",
}
local i = 0
request = function()
  i = i + 1
  local s = sentences[(i % #sentences) + 1]
  local body = '{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","data":["' .. s .. '"]}]}'
  return wrk.format(nil, "/v2/models/minilm/infer", nil, body)
end
local codes = {}
response = function(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT p50_ms=%.2f p99_ms=%.2f rps=%.1f requests=%d non2xx=%d timeouts=%d\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests / (summary.duration / 1e6), summary.requests,
    summary.errors.status, summary.errors.timeout))
end
