-- Argo CD health of an ElmBranch: Merged is Healthy, Failed is Degraded, Suspended is
-- Suspended, anything else (Pending, Waiting, Training, ...) is Progressing.
local hs = { status = "Progressing", message = "waiting for the operator" }
if obj.status == nil then
  return hs
end
local generation = obj.metadata.generation or 0
if obj.status.observedGeneration ~= nil and obj.status.observedGeneration < generation then
  hs.message = "the operator has not seen the latest spec yet"
  return hs
end
local phase = obj.status.phase or "Pending"
if phase == "Merged" then
  hs.status = "Healthy"
elseif phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Suspended" then
  hs.status = "Suspended"
end
local progress = ""
if obj.status.progress ~= nil and obj.status.progress.summary ~= nil then
  progress = " " .. obj.status.progress.summary
end
hs.message = phase .. progress .. ": " .. (obj.status.message or "")
return hs
