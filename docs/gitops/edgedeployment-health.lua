-- Argo CD resource health check for kasmina.dev/EdgeDeployment.
-- Healthy when the spec has been observed and Ready is True; Suspended while paused;
-- Degraded when the rollout was rolled back, failed, or serves with too few replicas.
local hs = { status = "Progressing", message = "Waiting for the controller" }
if obj.status == nil then
  return hs
end
local status = obj.status
if status.observedGeneration == nil or obj.metadata.generation == nil
    or status.observedGeneration < obj.metadata.generation then
  hs.message = "Waiting for the controller to observe the latest spec"
  return hs
end
local ready = nil
if status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.type == "Ready" then
      ready = c
    end
  end
end
local phase = status.phase or "Pending"
local detail = (ready ~= nil and ready.message) or phase
if phase == "Paused" then
  hs.status = "Suspended"
elseif phase == "RolledBack" or phase == "Failed" or phase == "Degraded" then
  hs.status = "Degraded"
elseif phase == "Healthy" and ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
else
  hs.status = "Progressing"
end
hs.message = phase .. ": " .. detail
return hs
