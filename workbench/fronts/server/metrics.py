"""The gateway's Prometheus metrics, in a registry of its own per app (two servers in one process never mix)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds, from well under a millisecond (the gateway's own work) to a long generation.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    """Requests, errors by status, latency, time to first token and queue wait, labelled by route (never by raw path)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("autoglm_gateway_requests", "Requests answered, by route and method.",
                                ("route", "method"), registry=self.registry)
        self.errors = Counter("autoglm_gateway_errors", "Requests answered with a 4xx or 5xx status, by route and status.",
                              ("route", "status"), registry=self.registry)
        self.latency = Histogram("autoglm_gateway_request_seconds",
                                 "Time from a request's arrival to its response (for a stream: to its last event).",
                                 ("route",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("autoglm_gateway_ttft_seconds",
                              "Streams: time from the request's arrival to its first token, by chain or model.",
                              ("target",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("autoglm_gateway_queue_wait_seconds",
                                    "Time a run waited for one of the gateway's run slots (max_in_flight) to free up.",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("autoglm_gateway_runs_in_flight", "Runs the gateway is running now.",
                               registry=self.registry)
        self.waiting = Gauge("autoglm_gateway_runs_waiting",
                             "Calls waiting for one of the gateway's run slots now (at most max_queued).",
                             registry=self.registry)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, str(status)).inc()

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric here."""
        return generate_latest(self.registry)
