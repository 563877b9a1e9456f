-- The PACS's routing rule: each new CT, CR or DX series goes to the second-reader node once it is
-- stable (no new instance for StableAge seconds). The node's own results (SR, SEG, KO) come back to
-- this PACS as series of other modalities, so they are never routed back.
local READ = { CT = true, CR = true, DX = true }

function OnStableSeries(seriesId, tags, metadata)
  if READ[tags['Modality']] then
    -- The whole series on one association (Lua's SendToModality takes instances only).
    RestApiPost('/modalities/reader/store', seriesId)
  end
end
