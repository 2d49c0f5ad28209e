-- A replica's heartbeat: extend the lease of boot ARGV[1] by ARGV[2] ms (Redis's clock), drop
-- leases that ended a day ago, and report whether this boot's contribution is still there:
-- 1 when KEYS[2] (its seed mark) exists, else 0 after setting it (the caller then rewrites
-- everything it holds: Redis was restarted empty or flushed). Also returns the live boots of
-- replica ARGV[3] other than this one (a second process with the same replica_id).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 86400000)
local seeded = redis.call('EXISTS', KEYS[2])
if seeded == 0 then
  redis.call('SET', KEYS[2], '1')
end
local others = 0
for _, b in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  if b ~= ARGV[1] and string.sub(b, 1, #ARGV[3] + 1) == ARGV[3] .. '/' then
    others = others + 1
  end
end
return {seeded, others}
