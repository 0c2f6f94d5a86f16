"""The proxy's own endpoints. Everything under OPS_PREFIX is answered by the proxy itself
(ops.py) and never forwarded to the cluster."""

OPS_PREFIX = "/-/"
HEALTHY = OPS_PREFIX + "healthy"
READY = OPS_PREFIX + "ready"
METRICS = OPS_PREFIX + "metrics"
STATUS = OPS_PREFIX + "status"
# Liveness and readiness probes answer any Host and need no client token: kubelet and Docker's
# HEALTHCHECK send neither. They reveal nothing and act on nothing.
PROBE_PATHS = frozenset((HEALTHY, READY))
