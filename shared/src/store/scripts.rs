//! The Lua scripts behind atomic store operations.

/// Creates a task record if absent, announces it on the firehose and adds it
/// to its tenant's listing index.
/// KEYS: record, firehose, tenant index, tenants. ARGV: firehose maxlen, task
/// id, event type, tenant, then field/value pairs.
pub const CREATE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'task', ARGV[2], 'type', ARGV[3])
redis.call('ZADD', KEYS[3], 0, ARGV[2])
redis.call('SADD', KEYS[4], ARGV[4])
return 1
"#;

/// Moves a task to a new state if its current state is allowed and, when given,
/// the fencing token matches. Fills `from` and `attempt` into the event.
/// KEYS: record, events, firehose, lease.
/// ARGV: 1 allowed states (comma separated), 2 new state, 3 event json,
/// 4 events maxlen, 5 firehose maxlen, 6 fence ('' = unchecked), 7 attempts delta,
/// 8 retention seconds applied when 9 = '1' (terminal), 10 release lease holder
/// ('' = keep), 11 completion event json written just before the state
/// change ('' = none; ADR 0035), 12 its type, then field/value pairs.
pub const TRANSITION: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {'missing', ''} end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == cur then allowed = true end
end
if not allowed then return {'refused', cur} end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'fence') ~= ARGV[6] then
  return {'fenced', cur}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', tonumber(ARGV[7]))
redis.call('HSET', KEYS[1], 'state', ARGV[2])
if #ARGV >= 13 then redis.call('HSET', KEYS[1], unpack(ARGV, 13)) end
if ARGV[11] ~= '' then
  local done = cjson.decode(ARGV[11])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[11])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'task', done['task_id'], 'type', ARGV[12])
end
local ev = cjson.decode(ARGV[3])
ev['from'] = cur
ev['attempt'] = attempts
local sid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', cjson.encode(ev))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'task', ev['task_id'], 'type', 'state_changed', 'to', ARGV[2])
if ARGV[10] ~= '' and redis.call('GET', KEYS[4]) == ARGV[10] then
  redis.call('DEL', KEYS[4])
end
if ARGV[9] == '1' and tonumber(ARGV[8]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  redis.call('EXPIRE', KEYS[2], ARGV[8])
end
return {'ok', cur, tostring(attempts), sid}
"#;

/// Takes the lease if free and bumps the record's fencing token.
/// KEYS: lease, record. ARGV: holder prefix, ttl ms.
pub const LEASE_ACQUIRE: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder then return {0, holder} end
local fence = redis.call('HINCRBY', KEYS[2], 'fence', 1)
local value = ARGV[1] .. '/' .. fence
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {1, tostring(fence)}
"#;

/// Extends the lease if still held by the caller. A lease that expired
/// while Redis was away (ADR 0032) is taken back when nobody took it since:
/// the record's fencing token is still the caller's, so no other holder
/// existed (and the task still runs). KEYS: lease, record. ARGV: value, ttl ms, fence.
pub const LEASE_RENEW: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local state = redis.call('HGET', KEYS[2], 'state')
if not holder and (state == 'leased' or state == 'running')
    and redis.call('HGET', KEYS[2], 'fence') == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// Appends events to their tasks' streams at most once each: a task's
/// `appended` hash keeps, per producer, the highest sequence written, and an
/// event at or below it is skipped (a retry after a lost reply; ADR 0032).
/// KEYS: firehose, then per event its stream and its `appended` hash.
/// ARGV: 1 events maxlen, 2 firehose maxlen, 3 retention seconds, 4 producer,
/// then per event: sequence, type, json. Returns the number written.
pub const APPEND_SEQUENCED: &str = r#"
local written = 0
local n = (#ARGV - 4) / 3
for i = 0, n - 1 do
  local stream = KEYS[2 + 2 * i]
  local seen = KEYS[3 + 2 * i]
  local seq = tonumber(ARGV[5 + 3 * i])
  local last = tonumber(redis.call('HGET', seen, ARGV[4]) or '0')
  if seq > last then
    local ev = cjson.decode(ARGV[7 + 3 * i])
    redis.call('XADD', stream, 'MAXLEN', '~', ARGV[1], '*', 'event', ARGV[7 + 3 * i])
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'task', ev['task_id'], 'type', ARGV[6 + 3 * i])
    redis.call('HSET', seen, ARGV[4], ARGV[5 + 3 * i])
    if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', seen, ARGV[3]) end
    written = written + 1
  end
end
return written
"#;

/// Drops the lease if still held by the caller. KEYS: lease. ARGV: value.
pub const LEASE_RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Marks a task that a worker holds as to be cancelled, once, with its event.
/// KEYS: record, events, firehose. ARGV: now, event json, events maxlen,
/// firehose maxlen, terminal states (comma separated).
/// Returns {state, '1' if newly marked else '0'}; {'missing', '0'} if absent.
pub const CANCEL_REQUEST: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {'missing', '0'} end
for s in string.gmatch(ARGV[5], '[^,]+') do
  if s == cur then return {cur, '0'} end
end
if redis.call('HSETNX', KEYS[1], 'cancel_requested_at', ARGV[1]) == 0 then
  return {cur, '0'}
end
local ev = cjson.decode(ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'task', ev['task_id'], 'type', 'cancel_requested')
return {cur, '1'}
"#;
