-- KEYS: the batch records (hash), the owner's index (zset by created_at), the running batches
-- (set), the owner's running batches (set), the ended ones (zset by ended_at), the owners
-- (hash). ARGV: batch id, record, created_at, ended_at ('' while it runs), owner.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[6], ARGV[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if ARGV[4] == '' then
  redis.call('SADD', KEYS[3], ARGV[1]); redis.call('SADD', KEYS[4], ARGV[1])
else
  redis.call('SREM', KEYS[3], ARGV[1]); redis.call('SREM', KEYS[4], ARGV[1])
  redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1])
end
