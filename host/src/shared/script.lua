-- One round trip of a replica with the shared budget store.
-- KEYS[1]: the live-replica set (boot id -> lease end, ms); KEYS[2]: the store's epoch mark;
-- KEYS[3]: the recovery mark; KEYS[4]: the rebuilt marks (replica -> the boot that rewrote
-- everything it holds after it started); KEYS[5 .. 4+nw]: bucket hashes this replica writes;
-- the rest: bucket hashes it reads.
-- ARGV: nw, replica, boot, seq, recovery grace (ms), the epoch this replica saw last ('' if
-- none), then per written key: cost, tokens in, tokens out, requests settled; the same four in
-- flight; the key's expiry (ms since epoch).
-- An epoch other than the one a replica saw last (missing, or made anew) means Redis lost its
-- data (restarted empty, flushed): every replica must rewrite its contribution, so for the
-- grace period every call answers "recovering" (the caller treats the sums as unavailable:
-- rules that fail closed deny) instead of sums that miss what the replicas have not
-- rewritten yet. A first start (no replica saw an epoch) has nothing to recover.
-- Returns {state, epoch, sums...}.
-- A hash holds, per replica R: R|b (the boot that wrote it), R|q (its sequence number), R|c R|i
-- R|o R|n (settled), R|fc R|fi R|fo R|fn (in flight). Writes are absolute, never increments: a
-- newer boot of R replaces what an older one wrote; the same boot only replaces an older
-- sequence number, so late or repeated writes cannot double anything.
-- Returns, per read key, the eight sums over the replicas, as strings: settled, then in
-- flight at the replicas whose lease runs; the in-flight money of a replica whose lease ran out
-- is counted as settled (see below).
local nw = tonumber(ARGV[1])
local rep, boot, seq = ARGV[2], ARGV[3], tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local names = {'c', 'i', 'o', 'n', 'fc', 'fi', 'fo', 'fn'}
local state = 'ok'
local known = ARGV[6]
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = tostring(now) .. '-' .. boot
  redis.call('SET', KEYS[2], epoch)
end
if known ~= '' and known ~= epoch then
  redis.call('SET', KEYS[3], now, 'PX', tonumber(ARGV[5]))
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  state = 'recovering'
end
for i = 1, nw do
  local k = KEYS[4 + i]
  local o = 6 + (i - 1) * 9
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
-- Whether a newer boot of replica r than b has rewritten all it holds (from its logs, which
-- record b's lost requests as unanswered): then what b left in a key the newer boot did not
-- write is stale. Boot ids are `{replica}/{uuid v7 in hex}`: of one replica, a later boot's
-- id sorts after an earlier one's (a boot after the mark's is never taken as superseded).
local rebuilt = {}
local function superseded(r, b)
  local v = rebuilt[r]
  if v == nil then
    v = redis.call('HGET', KEYS[4], r)
    rebuilt[r] = v
  end
  return v ~= false and v > b
end
local out = {state, epoch}
if state ~= 'ok' then
  return out
end
for i = 5 + nw, #KEYS do
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
  for r, e in pairs(reps) do
    -- A replica whose lease ran out (killed, or cut off from Redis) cannot settle what it
    -- holds in flight, and its provider may well have billed it: that money counts as spent,
    -- at the reservation, as the replica's restart on its logs records it (`unanswered`),
    -- until a newer boot of it has rewritten everything from those logs. Books a crash leaves
    -- are conservative, never optimistic.
    local alive_rep = e.b and live(e.b)
    local stale = (not alive_rep) and e.b and superseded(r, e.b)
    for m = 1, 4 do
      acc[m] = acc[m] + (tonumber(e[names[m]]) or 0)
      local held = tonumber(e[names[m + 4]]) or 0
      if alive_rep then
        acc[m + 4] = acc[m + 4] + held
      elseif not stale then
        acc[m] = acc[m] + held
      end
    end
  end
  for m = 1, 8 do out[#out + 1] = string.format('%.17g', acc[m]) end
end
return out
