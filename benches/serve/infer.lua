-- wrk script for `just bench-serve`: one-sentence OIP v2 infer requests against the model
-- named by the MODEL environment variable (default minilm). Prints one RESULT line:
-- client-side p50/p99 over all responses (wrk's own histogram), throughput, status counts,
-- and the p50/p99 of admitted (200) requests from the runtime's Server-Timing header.
local model = os.getenv("MODEL") or "minilm"
-- Mean milliseconds each connection waits between requests: an offered rate, not a spin.
-- The waits are exponential (Poisson arrivals), so connections shed together do not retry
-- together: a fixed wait would keep them in lockstep bursts that leave the replica idle
-- in between.
local pace = tonumber(os.getenv("PACE_MS") or "0")
local path = "/v2/models/" .. model .. "/infer"
local sentences = {
  "The quick brown fox jumps over the lazy dog.",
  "Edge devices run small encoders close to the data.",
  "How far is the nearest charging station?",
  "Kubernetes schedules pods onto nodes.",
}
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0))
  counter = 0
  ok_ms = {}
  status_counts = {}
end

function request()
  counter = counter + 1
  local s = sentences[(counter % #sentences) + 1]
  local body = '{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","data":["' .. s .. '"]}]}'
  return wrk.format(nil, path, nil, body)
end

function response(status, headers, body)
  status_counts[status] = (status_counts[status] or 0) + 1
  if status == 200 then
    local timing = headers["server-timing"] or headers["Server-Timing"]
    local ms = timing and tonumber(string.match(timing, "dur=([%d%.]+)"))
    if ms then table.insert(ok_ms, ms) end
  end
end

function delay()
  if pace <= 0 then return 0 end
  return -pace * math.log(1 - math.random())
end

local function percentile(sorted, p)
  if #sorted == 0 then return 0 end
  local i = math.max(1, math.ceil(#sorted * p / 100))
  return sorted[i]
end

function done(summary, latency, requests)
  local all, counts = {}, {}
  for _, t in ipairs(threads) do
    for _, v in ipairs(t:get("ok_ms")) do table.insert(all, v) end
    for k, v in pairs(t:get("status_counts")) do counts[k] = (counts[k] or 0) + v end
  end
  table.sort(all)
  io.write(string.format(
    "RESULT p50_ms=%.1f p99_ms=%.1f rps=%.1f ok=%d shed=%d other=%d ok_server_p50_ms=%.1f ok_server_p99_ms=%.1f\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests / (summary.duration / 1e6),
    counts[200] or 0, counts[503] or 0,
    summary.requests - (counts[200] or 0) - (counts[503] or 0),
    percentile(all, 50), percentile(all, 99)))
end
