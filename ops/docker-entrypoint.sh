#!/bin/sh
# Entrypoint of the quartchat image (ops/Dockerfile).
#
#   migrate-and-serve [OPTIONS]   apply the migrations once, then serve (default)
#   serve [OPTIONS] | migrate     the quartchat command of that name
#   -OPTION ...                   `quartchat serve -OPTION ...`
#   anything else                 run as given (e.g. `sh`)
set -eu

# prometheus-client multiprocess mode: the directory must exist before the first
# metric is touched, and files left by an earlier run of this container (a
# restart keeps /tmp) must not be summed in with the live workers.
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -maxdepth 1 -name '*.db' -type f -delete
fi

case "${1:-migrate-and-serve}" in
    migrate-and-serve)
        if [ "$#" -gt 0 ]; then shift; fi
        quartchat migrate
        # exec: quartchat gets SIGTERM from `docker stop` and drains.
        exec quartchat serve "$@"
        ;;
    serve | migrate)
        exec quartchat "$@"
        ;;
    -*)
        exec quartchat serve "$@"
        ;;
esac
exec "$@"
