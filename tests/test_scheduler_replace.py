"""A replaced association while its predecessor's refresh is queued, in flight or failed: what
is reported, what reaches the upstream, and what a stop leaves behind."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter

from imdsd.admin.views import session_view
from imdsd.errors import BackendError
from imdsd.model import RotationPolicy
from imdsd.scheduler import RECONCILE_STEP
from tests.helpers import ROLE_A, ROLE_B, VM_A, VM_B, make_config
from tests.test_scheduler import H, Rig


async def test_a_replaced_roles_failure_reports_no_old_session() -> None:
    """After replace-association to a role whose issue fails, the old role's session is not
    reported (nor counted) as the new role's: the state is "failed", not "failing"."""
    rig = Rig()
    await rig.rotator.prime()
    assert rig.sessions.state(VM_A, rig.clock.now()) == "fresh"
    rig.backend.failing = BackendError("AccessDenied", "role-b refused", retryable=False)
    await rig.inventory.commit(lambda: rig.inventory.replace_association(VM_A, "profile-b"))
    rig.rotator.reconcile(VM_A)
    await rig.rotator.settle(VM_A)
    assert rig.sessions.get(VM_A) is None
    assert rig.sessions.state(VM_A, rig.clock.now()) == "failed"


async def test_a_queued_refresh_of_a_replaced_association_never_reaches_the_upstream() -> None:
    """With one issuer slot held, B's refresh waits in the queue; B's association is replaced
    meanwhile: the old one's call is never made, only the new one's."""
    rig = Rig(RotationPolicy(concurrency=1))
    rig.backend.gate = asyncio.Event()
    holder = asyncio.create_task(rig.rotator.refresh(VM_A))
    queued = asyncio.create_task(rig.rotator.refresh(VM_B))
    while rig.backend.in_flight == 0:
        await asyncio.sleep(0)
    await rig.inventory.commit(lambda: rig.inventory.disassociate(VM_B))
    await rig.inventory.commit(lambda: rig.inventory.associate(VM_B, "profile-a"))
    rig.rotator.reconcile(VM_B)
    rig.backend.gate.set()
    await asyncio.gather(holder, queued, rig.rotator.settle(VM_B))
    assert rig.backend.names.count(VM_B) == 1 and rig.backend.calls == 2


async def test_a_stop_cancels_a_superseded_refresh_too() -> None:
    """aclose() cancels and awaits every refresh still running, the replaced association's
    hanging call included: nothing outlives the backend."""
    rig = Rig()
    old, new = await rig.replaced_in_flight()  # the gate is never opened: both hang
    await rig.rotator.aclose()
    assert rig.backend.in_flight == 0
    for waiter in (old, new):
        await asyncio.gather(waiter, return_exceptions=True)


def _batch_rig(policy: RotationPolicy | None = None) -> tuple[Rig, list[str]]:
    """A Rig with 3 x RECONCILE_STEP + 7 more instances, each associated with profile-a."""
    count = 3 * RECONCILE_STEP + 7
    extra = "".join(
        f'[[instances]]\nid = "i-{n:017x}"\naddresses = ["127.3.{n // 250}.{n % 250 + 1}"]\n'
        f'[[associations]]\ninstance = "i-{n:017x}"\nprofile = "profile-a"\n'
        for n in range(count)
    )
    rig = Rig(policy or RotationPolicy(), config=make_config(extra))
    return rig, [f"i-{n:017x}" for n in range(count)]


async def _replace_all(rig: Rig, keys: list[str]) -> None:
    for key in keys:
        await rig.inventory.commit(
            functools.partial(rig.inventory.replace_association, key, "profile-b")
        )


def _new_role_issues(rig: Rig, keys: list[str]) -> Counter[str]:
    return Counter(name for name, role in rig.backend.issued if role == ROLE_B and name in keys)


async def test_a_large_batch_is_reconciled_in_steps_and_shows_nothing_old() -> None:
    """An etcd transaction or a reload replacing many associations at once: from the call on,
    no guest gets the old role's session or the old association's failure, and the admin
    view shows neither (state pending), though sessions are reconciled RECONCILE_STEP a turn
    behind the call (the loop is never held for the whole batch); settle() waits for its key,
    and every key gets its new role's session from one issuer call."""
    rig, keys = _batch_rig()
    await rig.rotator.prime()
    rig.rotator.start()
    failed = keys[-1]
    rig.sessions.fail(failed, "AccessDenied", "role-a refused", rig.clock.now())
    await _replace_all(rig, keys)
    try:
        rig.rotator.reconcile_all(keys)
        served = [rig.served(key) for key in keys]
        assert all(b'"Code" : "CredentialsPending"' in body for body in served), served[-1]
        views = [session_view(rig.inventory, rig.sessions, k, rig.clock.now(), None) for k in keys]
        assert all(v["access_key"] is None and v["state"] == "pending" for v in views)
        assert all(v["last_error"] is None for v in views)
        await asyncio.sleep(0)
        old = [k for k in keys if (s := rig.sessions.get(k)) and s.role_arn == ROLE_A]
        assert 0 < len(old) < len(keys)  # one step done, the rest behind it
        await asyncio.gather(*(rig.rotator.settle(key) for key in keys))
        assert all(s is not None and s.role_arn == ROLE_B for s in map(rig.sessions.get, keys))
        assert set(_new_role_issues(rig, keys).values()) == {1}
    finally:
        await rig.rotator.aclose()


async def test_keys_waiting_for_a_worker_are_issued_once_when_a_batch_replaces_them() -> None:
    """Refreshes were due and waiting for the workers when a large batch replaced every
    association: a worker must not take a key its step has still to reconcile (the step then
    queues it again), so each key is issued once for its new role, not twice (25 of 307
    were, before)."""
    rig, keys = _batch_rig(RotationPolicy(concurrency=64))
    await rig.rotator.prime()
    rig.rotator.start()
    try:
        rig.clock.advance(12 * H)  # every refresh is due
        rig.backend.gate = asyncio.Event()
        workers = await rig.rotator.wake()
        while rig.backend.in_flight == 0:
            await asyncio.sleep(0)
        await _replace_all(rig, keys)
        rig.rotator.reconcile_all(keys)
        rig.backend.gate.set()
        await asyncio.gather(*(rig.rotator.settle(key) for key in keys))
        await asyncio.gather(*workers)
        assert all(s is not None and s.role_arn == ROLE_B for s in map(rig.sessions.get, keys))
        assert set(_new_role_issues(rig, keys).values()) == {1}
    finally:
        await rig.rotator.aclose()


async def test_a_bug_reconciling_one_key_stops_no_other() -> None:
    """A fault while reconciling one key of a batch (injected: no real part raises there) is
    logged; the batch's other keys, and every later batch, are still reconciled, and no
    settle() waits for ever."""
    rig, keys = _batch_rig()
    await rig.rotator.prime()
    rig.rotator.start()
    broken, reconcile = keys[5], rig.rotator.reconcile

    def faulty(key: str) -> None:
        if key == broken:
            raise RuntimeError("a bug")
        reconcile(key)

    rig.rotator.reconcile = faulty  # type: ignore[method-assign]
    try:
        await _replace_all(rig, keys)
        rig.rotator.reconcile_all(keys)
        others = [k for k in keys if k != broken]
        await asyncio.wait_for(asyncio.gather(*(rig.rotator.settle(k) for k in others)), 10)
        assert all(rig.sessions.get(k).role_arn == ROLE_B for k in others)  # type: ignore[union-attr]
        for key in keys:
            await rig.inventory.commit(
                functools.partial(rig.inventory.replace_association, key, "profile-a")
            )
        rig.rotator.reconcile_all(keys)
        await asyncio.wait_for(asyncio.gather(*(rig.rotator.settle(k) for k in others)), 10)
        assert all(rig.sessions.get(k).role_arn == ROLE_A for k in others)  # type: ignore[union-attr]
    finally:
        await rig.rotator.aclose()
