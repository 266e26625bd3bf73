-- wrk script: cycle through signed tracking URLs (one path per line in URLS_FILE),
-- so every request is a distinct open or click, as in real traffic.
--   URLS_FILE=urls.txt [DELAY_MS=10] wrk -t2 -c64 -d10s -s loadtest/wrk/urls.lua http://127.0.0.1:8080
-- A line may carry a user agent after a tab (path<TAB>agent): mail clients and image
-- proxies send one, and the consumer classifies events by it.
local paths = {}
local agents = {}
local index = 0
-- DELAY_MS paces each connection (wrk waits this long before every request), which
-- turns wrk into a fixed-rate client: about connections * 1000 / DELAY_MS requests/s.
local delay_ms = tonumber(os.getenv("DELAY_MS") or "0")

function init(args)
  local file = io.open(os.getenv("URLS_FILE") or "urls.txt", "r")
  for line in file:lines() do
    local path, agent = line:match("^([^\t]*)\t(.*)$")
    paths[#paths + 1] = path or line
    agents[#agents + 1] = agent or false
  end
  file:close()
  -- Each wrk thread starts at a different offset so threads do not send the same URL.
  index = math.random(#paths)
end

function delay()
  return delay_ms
end

function request()
  index = index % #paths + 1
  if agents[index] then
    return wrk.format("GET", paths[index], {["User-Agent"] = agents[index]})
  end
  return wrk.format("GET", paths[index])
end
