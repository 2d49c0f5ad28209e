-- One round trip of a replica with the shared budget store.
-- KEYS[1]: the live-replica set (boot id -> lease end, ms); KEYS[2 .. 1+nw]: bucket hashes this
-- replica writes; the rest: bucket hashes it reads.
-- ARGV: nw, replica, boot, seq, then per written key: cost, tokens in, tokens out, requests
-- settled; the same four in flight; the key's expiry (ms since the epoch).
-- A hash holds, per replica R: R|b (the boot that wrote it), R|q (its sequence number), R|c R|i
-- R|o R|n (settled), R|fc R|fi R|fo R|fn (in flight). Writes are absolute, never increments: a
-- newer boot of R replaces what an older one wrote; the same boot only replaces an older
-- sequence number, so late or repeated writes cannot double anything.
-- Returns, per read key, the eight sums over the replicas (in flight only of replicas whose
-- lease runs), as strings.
local nw = tonumber(ARGV[1])
local rep, boot, seq = ARGV[2], ARGV[3], tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local names = {'c', 'i', 'o', 'n', 'fc', 'fi', 'fo', 'fn'}
for i = 1, nw do
  local k = KEYS[1 + i]
  local o = 4 + (i - 1) * 9
  local cur = redis.call('HMGET', k, rep .. '|b', rep .. '|q')
  if cur[1] ~= boot or tonumber(cur[2] or -1) < seq then
    local args = {k, rep .. '|b', boot, rep .. '|q', seq}
    for m = 1, 8 do
      args[#args + 1] = rep .. '|' .. names[m]
      args[#args + 1] = ARGV[o + m]
    end
    redis.call('HSET', unpack(args))
    redis.call('PEXPIREAT', k, ARGV[o + 9])
  end
end
local alive = {}
local function live(b)
  if b == boot then return true end
  local v = alive[b]
  if v == nil then
    local s = redis.call('ZSCORE', KEYS[1], b)
    v = (s and tonumber(s) > now) or false
    alive[b] = v
  end
  return v
end
local out = {}
for i = 2 + nw, #KEYS do
  local h = redis.call('HGETALL', KEYS[i])
  local reps = {}
  for j = 1, #h, 2 do
    local f = h[j]
    local bar = string.find(f, '|', 1, true)
    if bar then
      local r = string.sub(f, 1, bar - 1)
      local e = reps[r]
      if not e then e = {}; reps[r] = e end
      e[string.sub(f, bar + 1)] = h[j + 1]
    end
  end
  local acc = {0, 0, 0, 0, 0, 0, 0, 0}
  for _, e in pairs(reps) do
    for m = 1, 4 do acc[m] = acc[m] + (tonumber(e[names[m]]) or 0) end
    if e.b and live(e.b) then
      for m = 5, 8 do acc[m] = acc[m] + (tonumber(e[names[m]]) or 0) end
    end
  end
  for m = 1, 8 do out[#out + 1] = string.format('%.17g', acc[m]) end
end
return out
