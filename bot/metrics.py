"""Prometheus metrics of one bot process, measured at the engine from the model service's events,
so they mean the same on every backend."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class Metrics:
    """The process's metrics in a registry of their own (so several can live in one test process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("idefics_queue_depth", "Requests waiting for the model", registry=r)
        self.in_flight = Gauge("idefics_requests_in_flight", "Replies being worked on", registry=r)
        self.batch_size = Histogram(
            "idefics_batch_size", "Rows of the running batch when a request joined it", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.queue_wait = Histogram("idefics_queue_wait_seconds", "Time from request to generation start", buckets=_LATENCY_BUCKETS, registry=r)
        self.generation = Histogram("idefics_generation_seconds", "Time from generation start to the end of the reply", buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("idefics_generated_tokens", "Tokens generated", registry=r)
        self.replies = Counter("idefics_replies", "Replies finished, by how they ended", ["outcome"], registry=r)
        self.errors = Counter("idefics_errors", "Requests not answered by the model, by kind", ["kind"], registry=r)
        self.feedback = Counter(
            "idefics_feedback", "Votes on answers, by platform, vote and whether the answer was still stored", ["platform", "vote", "outcome"], registry=r
        )
        self.adapter_events = Counter("idefics_adapter_events", "Platform events handled, by adapter and kind", ["adapter", "kind"], registry=r)

    def adapter_event(self, adapter: str, kind: str) -> None:
        """Count one platform event. Kinds: message (answered), command, duplicate (a re-delivery),
        ignored (not for the bot), refused (by the access rules), resumed (answered after a restart),
        reply_lost (the platform never took the reply)."""
        self.adapter_events.labels(adapter=adapter, kind=kind).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
