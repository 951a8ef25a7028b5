#!/bin/bash
# What a first deployment goes through, on a running `docker compose up -d` stack of this
# project (run from the directory of its docker-compose.yml, with its .env):
#
#   deploy/compose-smoke.sh            # about 3 minutes; leaves the stack up and healthy
#
#  1. 2000 deliveries sent while one ingest worker is stopped (SIGTERM) and another killed
#     (SIGKILL): every one lands in webhook_events, exactly once, and none is a dead letter;
#  2. `down` then `up` with the volumes kept: healthy again, nothing lost, schema up to date;
#  3. `ingest migrate` started while Postgres is stopped waits for it, and succeeds;
#  4. a worker started while Redis is stopped waits for it (and stops at once on SIGTERM);
#  5. the optional dashboard profile builds and answers.
# Deliveries are sent from inside the network by the project's own image (`ingest send`,
# signed with the first OUTREACH_WEBHOOK_SECRETS of .env). Exits non-zero on the first failure.
set -euo pipefail
[ -f docker-compose.yml ] && [ -f .env ] || { echo "run from the project's root, with .env"; exit 2; }
T0=$(date +%s)
say() { echo "[smoke $(( $(date +%s) - T0 ))s] $*"; }
fail() { say "FAILED: $*"; docker compose ps -a; exit 1; }
trap 'say "FAILED at line $LINENO: $BASH_COMMAND"' ERR

rows() { docker compose exec -T postgres psql -U ingest -d ingest -tAc 'select count(*) from webhook_events'; }
dupes() { docker compose exec -T postgres psql -U ingest -d ingest -tAc \
  'select count(*) from (select 1 from webhook_events group by provider, dedup_key having count(*) > 1) d'; }
send() {  # send COUNT SEED: signed Outreach deliveries, from inside the network
  docker compose run --rm --no-deps -T acceptor send outreach --url http://acceptor:8000 \
    --count "$1" --concurrency 4 --seed "$2" 2>&1 | tail -8
}
wait_rows() {  # wait_rows N SECONDS
  for _ in $(seq "$2"); do [ "$(rows)" -ge "$1" ] && return 0; sleep 1; done
  fail "webhook_events has $(rows) rows, expected $1"
}
healthy() {  # every running service healthy, migrate exited 0; prints the seconds it took
  local t; t=$(date +%s)
  for _ in $(seq 120); do
    if docker compose ps -a --format '{{.Service}} {{.State}} {{.Health}} {{.ExitCode}}' | awk '
        $1=="migrate"{ if ($2!="exited"||$NF!=0) bad=1; next }
        $2!="running" || ($3!="" && $3!="healthy") {bad=1} END{exit bad}'; then
      echo $(( $(date +%s) - t )); return 0
    fi
    sleep 1
  done
  fail "not healthy after 120 s"
}

# 1. Stop one worker and kill another while deliveries arrive.
docker compose up -d --scale worker=3 >/dev/null 2>&1
healthy >/dev/null
base=$(rows)
send 2000 101 > /tmp/compose-smoke-send.log &
sender=$!
sleep 3
workers=($(docker compose ps -q worker))
t=$(date +%s); docker stop -t 330 "${workers[0]}" >/dev/null
say "worker stopped (SIGTERM) in $(( $(date +%s) - t ))s while deliveries arrived"
docker kill "${workers[1]}" >/dev/null
say "worker killed (SIGKILL)"
wait "$sender" || fail "ingest send failed: $(cat /tmp/compose-smoke-send.log)"
grep -q "accepted (200)    │ 2000 " /tmp/compose-smoke-send.log || fail "not all accepted: $(cat /tmp/compose-smoke-send.log)"
# A killed worker's job is retried by the watchdog after INGEST_ABANDONED_AFTER (45 s).
wait_rows $((base + 2000)) 240
[ "$(rows)" -eq $((base + 2000)) ] || fail "$(rows) rows, expected $((base + 2000))"
[ "$(dupes)" -eq 0 ] || fail "duplicate events"
dead=$(docker compose run --rm --no-deps -T acceptor dlq list 2>&1 | tail -1)
[ "$dead" = "0 failed" ] || fail "dead letters: $dead"
say "2000 deliveries, one worker stopped and one killed: $(( $(rows) - base )) new rows, no duplicate, $dead"
docker compose up -d --scale worker=1 >/dev/null 2>&1

# 2. down and up again, volumes kept.
before=$(rows)
docker compose down >/dev/null 2>&1
t=$(date +%s); docker compose up -d >/dev/null 2>&1; healthy >/dev/null
say "second up (volumes kept): all healthy $(( $(date +%s) - t ))s after \`up -d\` began"
[ "$(rows)" -eq "$before" ] || fail "rows after down/up: $(rows), expected $before"
docker compose logs migrate 2>&1 | tail -1 | grep -q "schema is up to date" || fail "migrate: $(docker compose logs migrate | tail -3)"
send 5 102 >/dev/null; wait_rows $((before + 5)) 60
say "after down/up: $before rows kept, 5 more landed, migrate found the schema up to date"

# 3. migrate waits for a Postgres that comes back late.
docker compose stop postgres >/dev/null 2>&1
docker compose run --rm --no-deps -T migrate > /tmp/compose-smoke-migrate.log 2>&1 &
migrate=$!
sleep 6
docker compose start postgres >/dev/null 2>&1
wait "$migrate" || fail "migrate did not wait: $(cat /tmp/compose-smoke-migrate.log)"
grep -q "waiting for Postgres" /tmp/compose-smoke-migrate.log || fail "migrate did not say it waited"
say "migrate waited for Postgres: $(grep -o 'Postgres at [^"]*answers, after [0-9.]* s' /tmp/compose-smoke-migrate.log)"

# 4. A worker started without Redis waits, and stops at once when asked to.
docker compose stop redis >/dev/null 2>&1
docker compose restart worker >/dev/null 2>&1
sleep 4
docker compose logs --since 10s worker 2>&1 | grep -q "waiting for Redis" || fail "worker did not say it waits for Redis"
t=$(date +%s); docker compose stop worker >/dev/null 2>&1
stopped=$(( $(date +%s) - t ))
[ "$stopped" -lt 30 ] || fail "a worker waiting for Redis took ${stopped}s to stop"
say "worker waiting for Redis stopped in ${stopped}s on SIGTERM"
docker compose up -d >/dev/null 2>&1
healthy >/dev/null

# 5. The dashboard.
docker compose --profile dashboard up -d >/dev/null 2>&1
healthy >/dev/null
code=$(python3 -c "import urllib.request as r, urllib.error as e
try: print(r.urlopen('http://127.0.0.1:9181/', timeout=5).status)
except e.HTTPError as x: print(x.code)")
[ "$code" = 200 ] || [ "$code" = 401 ] || fail "dashboard answered $code"
say "dashboard profile healthy, answers $code on 127.0.0.1:9181"
docker compose --profile dashboard stop rq-dashboard >/dev/null 2>&1
say "all checks passed"
