#!/usr/bin/env bash
# Start (or install, then start) the MariaDB and Redis the test suite uses, on
# loopback, unless they already answer. Never stops or flushes a running one.
# Honours QUARTCHAT_TEST_MYSQL_URL / QUARTCHAT_TEST_REDIS_URL hosts only in the
# sense that it checks the default ports; custom URLs are the caller's business.
set -euo pipefail

need_apt_update=1
apt_install() {
  if [ "$need_apt_update" = 1 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    need_apt_update=0
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() {
  python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PY
}

wait_port() {
  for _ in $(seq 1 60); do
    port_open "$1" && return 0
    sleep 0.5
  done
  echo "ensure-services: nothing listens on 127.0.0.1:$1 after 30 s" >&2
  return 1
}

# --- Redis ---------------------------------------------------------------
if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_port 6379
fi
command -v redis-server >/dev/null || apt_install redis-server  # fault tests run their own

# --- MariaDB -------------------------------------------------------------
if ! port_open 3306; then
  if [ ! -x /usr/sbin/mariadbd ]; then
    apt_install mariadb-server
  fi
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  wait_port 3306
fi
# Debian's root@localhost logs in through the socket only; tests connect over TCP.
if command -v mariadb >/dev/null; then
  mariadb -uroot -e "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
    GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;" 2>/dev/null || true
fi
# --- nginx and Prometheus (binaries only: tests run their own instances) ---
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v prometheus >/dev/null || missing+=(prometheus)
if [ "${#missing[@]}" -gt 0 ]; then
  # Debian may try to start the packaged services; policy-rc.d keeps them stopped.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt_install --no-install-recommends "${missing[@]}"
  rm -f /usr/sbin/policy-rc.d
fi
# --- Browser tests and JS unit tests: Debian's chromium (driven by Playwright,
# which never downloads a browser here) and node for `node --test`.
# (chromium with its recommends: fonts-liberation, so pages render real text.)
[ -x /usr/bin/chromium ] || apt_install chromium
command -v node >/dev/null || apt_install --no-install-recommends nodejs
echo "ensure-services: redis and mariadb are up; nginx, prometheus, chromium and node are installed"
