-- Reference PACS auto-routing: every stable CT *image* series goes to the node (modality "dicomnode").
--
-- Routed per series, never per study: a study-level route would see the node's own SR/SC arrive, call the
-- study unstable again and send everything back (stack.md G6). The node's outputs are excluded three ways:
-- by modality (SR, OT), by SOP class (only CT Image / Enhanced CT Image storage is routed), and by origin
-- (nothing received from the node's AE title is ever sent back to it).

local NODE_MODALITY = 'dicomnode'
local NODE_AET = 'DICOMNODE'
local CT_SOP_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.2'] = true,    -- CT Image Storage
  ['1.2.840.10008.5.1.4.1.1.2.1'] = true,  -- Enhanced CT Image Storage
}

local function firstInstance(seriesId)
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  if series == nil or series['Instances'] == nil then
    return nil
  end
  return series['Instances'][1]
end

local function metadata(instanceId, name)
  -- Missing metadata answers an HTTP error; treat it as "unknown".
  local ok, value = pcall(RestApiGet, '/instances/' .. instanceId .. '/metadata/' .. name)
  if ok then
    return value
  end
  return nil
end

function OnStableSeries(seriesId, tags, metadataOfSeries)
  if tags['Modality'] ~= 'CT' then
    return
  end
  local instanceId = firstInstance(seriesId)
  if instanceId == nil then
    return
  end
  local sopClass = metadata(instanceId, 'SopClassUid')
  if sopClass ~= nil and not CT_SOP_CLASSES[sopClass] then
    print('autoroute: series ' .. seriesId .. ' is not a CT image series (' .. sopClass .. '), not routed')
    return
  end
  if metadata(instanceId, 'RemoteAET') == NODE_AET then
    return
  end
  print('autoroute: sending CT series ' .. seriesId .. ' to ' .. NODE_MODALITY)
  RestApiPost('/modalities/' .. NODE_MODALITY .. '/store',
    '{"Resources":["' .. seriesId .. '"],"Synchronous":false}')
end
