"""Every NATS subject is built in contract.bus: one worker's subjects are all different, and
no two workers or deployments share one."""

from __future__ import annotations

from contract import bus

WORKER_SUBJECTS = (
    bus.worker_subject,
    bus.abort_subject,
    bus.kv_snapshot_subject,
    bus.prefill_subject,
    bus.decode_subject,
    bus.kv_push_subject,
    bus.media_subject,  # a frontend process id in place of the worker id
)
DEPLOYMENT_SUBJECTS = (bus.kv_events_subject, bus.load_metrics_subject, bus.frontend_load_subject)


def test_subjects_never_collide() -> None:
    subjects = [
        build(deployment, worker_id)
        for build in WORKER_SUBJECTS
        for deployment in ("d1", "d2")
        for worker_id in ("w1", "w2")
    ] + [build(deployment) for build in DEPLOYMENT_SUBJECTS for deployment in ("d1", "d2")]
    assert len(set(subjects)) == len(subjects)
    assert all(s.startswith(("hpcserve.d1.", "hpcserve.d2.")) for s in subjects)
