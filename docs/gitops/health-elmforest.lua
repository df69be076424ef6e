-- Argo CD health of an ElmForest, from its status (phase and the Ready condition).
local hs = { status = "Progressing", message = "waiting for the operator" }
if obj.status == nil then
  return hs
end
local generation = obj.metadata.generation or 0
if obj.status.observedGeneration ~= nil and obj.status.observedGeneration < generation then
  hs.message = "the operator has not seen the latest spec yet"
  return hs
end
local ready = nil
for _, condition in ipairs(obj.status.conditions or {}) do
  if condition.type == "Ready" then
    ready = condition
  end
end
local phase = obj.status.phase or "Pending"
if phase == "Failed" then
  hs.status = "Degraded"
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
end
hs.message = (ready ~= nil and ready.message) or obj.status.message or phase
return hs
