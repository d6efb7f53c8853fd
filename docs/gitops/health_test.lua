-- Table test of the Argo CD health check: `lua5.4 docs/gitops/health_test.lua` from the repo root.
local function check(o)
  obj = o
  return dofile("docs/gitops/edgedeployment-health.lua")
end
local function ed(gen, observed, phase, ready)
  return { metadata = { generation = gen }, status = { observedGeneration = observed, phase = phase,
    conditions = { { type = "Ready", status = ready, message = "m" } } } }
end
local cases = {
  { { metadata = { generation = 1 } }, "Progressing" },
  { ed(2, 1, "Healthy", "True"), "Progressing" },
  { ed(2, 2, "Healthy", "True"), "Healthy" },
  { ed(2, 2, "Progressing", "False"), "Progressing" },
  { ed(2, 2, "Paused", "False"), "Suspended" },
  { ed(2, 2, "RolledBack", "True"), "Degraded" },
  { ed(2, 2, "Failed", "False"), "Degraded" },
}
for i, c in ipairs(cases) do
  local hs = check(c[1])
  assert(hs.status == c[2], i .. ": " .. hs.status .. " ~= " .. c[2])
end
print("ok")
